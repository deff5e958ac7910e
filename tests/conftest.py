"""Shared tensor generators for the squant_rs test suite."""

from __future__ import annotations

import os
import signal
import sys
import zlib

import numpy as np
from hypothesis import settings

# Hypothesis budgets: the default keeps the suite quick; run with
# SQUANT_HYPOTHESIS_PROFILE=stress for a long hunt.
settings.register_profile("squant", max_examples=60, deadline=None)
settings.register_profile("stress", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("SQUANT_HYPOTHESIS_PROFILE", "squant"))

# Make ``import reference`` work whatever pytest's import mode is.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DISTRIBUTIONS = (
    "normal",
    "student_t",
    "outliers",
    "pruned",
    "zero_channel",
    "constant_channels",
    "tiny",
    "offset",
    "uniform",
    "grid",
)


def seed_for(*parts) -> int:
    """Deterministic seed from test parameters."""
    return zlib.crc32(repr(parts).encode())


def tmin_tmax(bits: int) -> tuple[int, int]:
    n = 2 ** (bits - 1)
    return -n, n - 1


def make_weight(rng: np.random.Generator, shape, dist: str, bits: int = 4) -> np.ndarray:
    """A float32 weight of ``shape`` drawn from the named distribution
    (``bits`` only matters for "grid")."""
    shape = tuple(shape)
    oc = shape[0]
    if dist == "normal":
        w = rng.normal(0.0, 0.05, shape)
    elif dist == "student_t":
        w = rng.standard_t(2.0, shape) * 0.02
    elif dist == "outliers":
        w = rng.normal(0.0, 0.02, shape)
        flat = w.reshape(-1)
        idx = rng.choice(flat.size, size=max(1, flat.size // 200), replace=False)
        flat[idx] *= 40.0
    elif dist == "pruned":
        w = rng.normal(0.0, 0.05, shape)
        w[rng.random(shape) < 0.7] = 0.0
    elif dist == "zero_channel":
        w = rng.normal(0.0, 0.05, shape)
        w[rng.integers(oc)] = 0.0
    elif dist == "constant_channels":
        w = rng.normal(0.0, 0.05, shape)
        for o in rng.choice(oc, size=max(1, oc // 2), replace=False):
            w[o] = rng.normal(0.0, 1.0)
    elif dist == "tiny":
        w = rng.normal(0.0, 1e-6, shape)
    elif dist == "offset":
        offs = rng.normal(0.0, 3.0, (oc,) + (1,) * (len(shape) - 1))
        w = rng.normal(0.0, 0.1, shape) + offs
    elif dist == "uniform":
        w = rng.uniform(-1.0, 1.0, shape)
    elif dist == "grid":
        return grid_weight(rng, shape, bits=bits)
    else:  # pragma: no cover
        raise ValueError(dist)
    return np.ascontiguousarray(w, dtype=np.float32)


def grid_weight(rng: np.random.Generator, shape, bits: int, p: int = 2) -> np.ndarray:
    """Weights whose x = s*W - z lands on exact quarter steps.

    Per channel s = 2**p exactly: the channel spans (2**bits - 1) / 2**p with an
    integer-multiple-of-1/4 offset, so s*W is a multiple of 1/4 and x too.  This
    makes .5 rounding ties, equal priorities and group sums of exactly k + 0.5
    common.  All values are exact in float32.
    """
    shape = tuple(shape)
    oc = shape[0]
    span_q = 4 * (2**bits - 1)  # channel span in quarter steps
    q = rng.integers(0, span_q + 1, size=shape).reshape(oc, -1)
    q[:, 0] = 0  # make sure the channel min and max are present
    q[:, -1] = span_q  # (a single-element channel is then constant)
    offs = rng.integers(-40, 41, size=(oc, 1))
    vals = (q + offs).astype(np.float64) / 4.0 / 2.0**p
    w = vals.reshape(shape).astype(np.float32)
    assert np.array_equal(w.astype(np.float64), vals.reshape(shape))
    return w


def interior_weight(rng: np.random.Generator, shape, bits: int) -> np.ndarray:
    """Weights for which clamping can never bind (docs/algorithm.md section 4 preconditions).

    Per channel s = 2**p exactly and z is an integer, with the channel min/max
    mapping exactly onto x = tmin / x = tmax (error 0, so they never need a
    flip).  Every other element has x strictly inside (tmin, tmax), hence is a
    real candidate in the direction of its error and its flips stay in range.
    """
    shape = tuple(shape)
    oc = shape[0]
    levels = 2**bits - 1
    n = 2 ** (bits - 1)
    inner = rng.uniform(0.02, 0.98, size=(oc, int(np.prod(shape[1:]))))
    kind = rng.integers(0, 3)
    if kind == 1:  # concentrate near the middle (like trained weights)
        inner = np.clip(0.5 + rng.normal(0, 0.12, inner.shape), 0.02, 0.98)
    elif kind == 2:  # a coarse grid: many exact ties
        inner = np.clip(np.round(inner * 4 * levels) / (4 * levels), 0.02, 0.98)
    u = inner * levels  # position in levels, in (0, levels)
    cols = rng.permutation(u.shape[1])
    if u.shape[1] >= 2:
        u[:, cols[0]] = 0.0
        u[:, cols[1]] = float(levels)
    p = int(rng.integers(-3, 4))
    offs = rng.integers(-n, n + 1, size=(oc, 1))  # integer s*mn
    # float32 rounding of u first, then the exact scaling by 2**-p.
    w = ((u + offs).astype(np.float32) * np.float32(2.0**-p)).reshape(shape)
    return np.ascontiguousarray(w, dtype=np.float32)


def x_of(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """x = s*W - z in float32 (multiply, then subtract), shaped (OC, IC, K)."""
    w32 = np.asarray(w).astype(np.float32)
    oc, ic = w32.shape[0], w32.shape[1]
    w3 = w32.reshape(oc, ic, -1)
    prod = (scale.astype(np.float32)[:, None, None] * w3).astype(np.float32)
    return (prod - zero_point.astype(np.float32)[:, None, None]).astype(np.float32)


def default_signal_handlers() -> None:
    """``preexec_fn`` of the signal tests' child processes: the default
    SIGHUP / SIGTERM / SIGINT dispositions, whatever the test run inherited
    (``nohup`` ignores SIGHUP, and an ignored signal stays ignored in the
    children, which then never see what the tests send)."""
    for name in ("SIGHUP", "SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
