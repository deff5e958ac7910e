"""Property tests for the docs/algorithm.md section 4 invariants of squant_rs.quantize_tensor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import squant_rs

from conftest import (
    DISTRIBUTIONS,
    interior_weight,
    make_weight,
    seed_for,
    tmin_tmax,
    x_of,
)
from reference import MODES, nearest_reference, squant_reference

SETTINGS = settings(deadline=None)  # max_examples from the profile (conftest)

bits_st = st.integers(2, 8)
seed_st = st.integers(0, 2**32 - 1)
mode_st = st.sampled_from(MODES)


@st.composite
def shapes(draw, min_kernel: int = 1, min_channel: int = 2):
    """(OC, IC, *kernel) with prod(kernel) >= min_kernel, IC*K >= min_channel."""
    oc = draw(st.integers(1, 6))
    ic = draw(st.integers(1, 8))
    kernel = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    k = int(np.prod(kernel)) if kernel else 1
    if k < min_kernel:
        kernel = [*kernel, min_kernel]
        k *= min_kernel
    if ic * k < min_channel:
        ic = min_channel
    return (oc, ic, *kernel)


def true_errors(qt, w) -> np.ndarray:
    """codes - x in float64, shaped (OC, IC, K); x = s*W - z in float32."""
    x = x_of(w, qt.scale, qt.zero_point).astype(np.float64)
    return qt.codes.reshape(x.shape).astype(np.float64) - x


def sum_tolerance(count: int) -> float:
    # S is exact to 2**-40 per element and A is rounded to float32.
    return 1e-5 + 1e-6 * count


# --------------------------------------------------------------------------
# Invariants that hold for any finite input.


@SETTINGS
@given(
    shape=shapes(min_channel=1),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=bits_st,
    mode=mode_st,
    seed=seed_st,
)
def test_codes_in_range_and_error_below_one(shape, dist, bits, mode, seed):
    w = make_weight(np.random.default_rng(seed), shape, dist, bits=bits)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
    tmin, tmax = tmin_tmax(bits)
    assert qt.codes.dtype == np.int8 and qt.codes.shape == w.shape
    assert qt.codes.min() >= tmin and qt.codes.max() <= tmax
    assert np.all(np.isfinite(qt.scale)) and np.all(qt.scale > 0)
    assert np.array_equal(qt.zero_point, np.rint(qt.zero_point))
    err = true_errors(qt, w).reshape(qt.codes.shape)
    inside = (qt.codes > tmin) & (qt.codes < tmax)
    assert np.all(np.abs(err[inside]) < 1.0)


@SETTINGS
@given(
    shape=shapes(min_channel=1),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=bits_st,
    seed=seed_st,
)
def test_squant_e_is_nearest_rounding(shape, dist, bits, seed):
    w = make_weight(np.random.default_rng(seed), shape, dist, bits=bits)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode="squant-e")
    tmin, tmax = tmin_tmax(bits)
    # Same quantizer, computed independently of the reference module.
    w2 = w.reshape(w.shape[0], -1)
    mn, mx = w2.min(axis=1), w2.max(axis=1)
    s = np.float32(2**bits - 1) / np.maximum(mx - mn, np.float32(1e-8))
    z = np.rint(s * mn) + np.float32(2 ** (bits - 1))
    assert np.array_equal(qt.scale.view(np.uint32), s.view(np.uint32))
    assert np.array_equal(qt.zero_point.view(np.uint32), z.view(np.uint32))
    x = (s[:, None] * w2) - z[:, None]
    want = np.clip(np.rint(x), tmin, tmax).astype(np.int8).reshape(w.shape)
    assert np.array_equal(qt.codes, want)
    assert np.array_equal(qt.codes, nearest_reference(w, bits))
    assert (qt.k_flips, qt.c_flips) == (0, 0)


@SETTINGS
@given(
    shape=shapes(min_channel=1),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=bits_st,
    seed=seed_st,
)
def test_mode_structure(shape, dist, bits, seed):
    """K = 1 skips the kernel level; squant-e/-c never count K flips, etc."""
    w = make_weight(np.random.default_rng(seed), shape, dist, bits=bits)
    q = {m: squant_rs.quantize_tensor(w, bits=bits, mode=m) for m in MODES}
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    for m in MODES:
        assert q[m].bits == bits and q[m].mode == m
        assert np.array_equal(q[m].scale, q["squant-e"].scale)
        assert np.array_equal(q[m].zero_point, q["squant-e"].zero_point)
    assert q["squant-c"].k_flips == 0 and q["squant-k"].c_flips == 0
    assert q["squant"].k_flips == q["squant-k"].k_flips
    if k == 1:
        assert q["squant-k"].k_flips == 0 and q["squant"].k_flips == 0
        assert np.array_equal(q["squant-k"].codes, q["squant-e"].codes)
        assert np.array_equal(q["squant"].codes, q["squant-c"].codes)
        assert q["squant"].c_flips == q["squant-c"].c_flips


@SETTINGS
@given(
    shape=shapes(min_channel=1),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=bits_st,
    mode=mode_st,
    seed=seed_st,
)
def test_channels_are_independent(shape, dist, bits, mode, seed):
    """Every level works within one output channel: quantizing a permutation
    of the channels permutes the result, and a single channel alone gives the
    same codes."""
    rng = np.random.default_rng(seed)
    w = make_weight(rng, shape, dist, bits=bits)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
    perm = rng.permutation(shape[0])
    qp = squant_rs.quantize_tensor(np.ascontiguousarray(w[perm]), bits, mode)
    assert np.array_equal(qp.codes, qt.codes[perm])
    assert np.array_equal(qp.scale, qt.scale[perm])
    assert np.array_equal(qp.zero_point, qt.zero_point[perm])
    assert (qp.k_flips, qp.c_flips) == (qt.k_flips, qt.c_flips)
    o = int(rng.integers(shape[0]))
    q1 = squant_rs.quantize_tensor(np.ascontiguousarray(w[o : o + 1]), bits, mode)
    assert np.array_equal(q1.codes[0], qt.codes[o])


@SETTINGS
@given(
    shape=shapes(min_channel=1),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=bits_st,
    mode=mode_st,
    seed=seed_st,
)
def test_independent_of_thread_count(shape, dist, bits, mode, seed):
    w = make_weight(np.random.default_rng(seed), shape, dist, bits=bits)
    base = squant_rs.quantize_tensor(w, bits=bits, mode=mode, threads=1)
    for threads in (2, 3, None):
        qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode, threads=threads)
        assert np.array_equal(qt.codes, base.codes)
        assert np.array_equal(qt.scale, base.scale)
        assert np.array_equal(qt.zero_point, base.zero_point)
        assert (qt.k_flips, qt.c_flips) == (base.k_flips, base.c_flips)


@pytest.mark.parametrize("mode", MODES)
def test_independent_of_thread_count_large(mode):
    rng = np.random.default_rng(seed_for("threads-large", mode))
    for shape in ((256, 64, 3, 3), (1024, 300), (3, 2048, 3, 3)):
        w = make_weight(rng, shape, "normal")
        base = squant_rs.quantize_tensor(w, bits=4, mode=mode, threads=1)
        for threads in (2, 3, 4, 7, 16, None):
            qt = squant_rs.quantize_tensor(w, bits=4, mode=mode, threads=threads)
            assert np.array_equal(qt.codes, base.codes), threads
            assert (qt.k_flips, qt.c_flips) == (base.k_flips, base.c_flips)


# --------------------------------------------------------------------------
# Invariants that need enough candidates: tensors where clamping cannot bind.


def _interior(shape, bits, seed):
    w = interior_weight(np.random.default_rng(seed), shape, bits)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode="squant-e")
    x = x_of(w, qt.scale, qt.zero_point)
    tmin, tmax = tmin_tmax(bits)
    # Precondition of the construction: every element with a non-zero error
    # lies strictly inside (tmin, tmax).
    nonzero = np.rint(x) != x
    assert np.all((x[nonzero] > tmin) & (x[nonzero] < tmax))
    return w


@SETTINGS
@given(shape=shapes(), bits=bits_st, mode=mode_st, seed=seed_st)
def test_interior_error_below_one_everywhere(shape, bits, mode, seed):
    w = _interior(shape, bits, seed)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
    tmin, tmax = tmin_tmax(bits)
    assert qt.codes.min() >= tmin and qt.codes.max() <= tmax
    assert np.all(np.abs(true_errors(qt, w)) < 1.0)


@SETTINGS
@given(shape=shapes(min_kernel=2), bits=bits_st, seed=seed_st)
def test_kernel_sums_after_squant_k(shape, bits, seed):
    w = _interior(shape, bits, seed)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode="squant-k")
    err = true_errors(qt, w)
    sums = err.sum(axis=2)
    assert np.all(np.abs(sums) <= 0.5 + sum_tolerance(err.shape[2])), sums
    # Every K flip here moves a real candidate by one level.
    qe = squant_rs.quantize_tensor(w, bits=bits, mode="squant-e")
    diff = qt.codes.astype(np.int16) - qe.codes
    assert np.all(np.abs(diff) <= 1)
    assert qt.k_flips == np.count_nonzero(diff)


@SETTINGS
@given(
    shape=shapes(),
    bits=bits_st,
    mode=st.sampled_from(("squant-c", "squant")),
    seed=seed_st,
)
def test_channel_sums_after_c(shape, bits, mode, seed):
    w = _interior(shape, bits, seed)
    qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
    err = true_errors(qt, w)
    sums = err.sum(axis=(1, 2))
    count = err.shape[1] * err.shape[2]
    assert np.all(np.abs(sums) <= 0.5 + sum_tolerance(count)), sums
    if mode == "squant-c":
        qe = squant_rs.quantize_tensor(w, bits=bits, mode="squant-e")
        diff = qt.codes.astype(np.int16) - qe.codes
        assert np.all(np.abs(diff) <= 1)
        assert qt.c_flips == np.count_nonzero(diff)


@SETTINGS
@given(shape=shapes(min_kernel=2), bits=bits_st, seed=seed_st)
def test_c_level_flips_at_most_one_per_kernel(shape, bits, seed):
    w = _interior(shape, bits, seed)
    qk = squant_rs.quantize_tensor(w, bits=bits, mode="squant-k")
    qs = squant_rs.quantize_tensor(w, bits=bits, mode="squant")
    oc, ic = shape[0], shape[1]
    diff = qs.codes.astype(np.int16) - qk.codes.astype(np.int16)
    diff = diff.reshape(oc, ic, -1)
    assert np.all(np.abs(diff) <= 1)
    assert np.all(np.count_nonzero(diff, axis=2) <= 1)
    assert qs.k_flips == qk.k_flips
    assert qs.c_flips == np.count_nonzero(diff)


@settings(deadline=None, max_examples=max(25, settings().max_examples // 3))
@given(shape=shapes(min_kernel=2), bits=bits_st, seed=seed_st)
def test_invariants_hold_for_the_reference(shape, bits, seed):
    """Spot-check the same invariants on the oracle (it shares nothing with
    the fast code, so a wrong invariant shows up here too)."""
    w = _interior(shape, bits, seed)
    tmin, tmax = tmin_tmax(bits)
    out = {m: squant_reference(w, bits, m) for m in MODES}
    for m, (codes, s, z, _, _) in out.items():
        x = x_of(w, s, z).astype(np.float64)
        err = codes.reshape(x.shape).astype(np.float64) - x
        assert codes.min() >= tmin and codes.max() <= tmax
        assert np.all(np.abs(err) < 1.0)
        if m == "squant-k":
            assert np.all(np.abs(err.sum(axis=2)) <= 0.5 + sum_tolerance(x.shape[2]))
        if m in ("squant-c", "squant"):
            tol = sum_tolerance(x.shape[1] * x.shape[2])
            assert np.all(np.abs(err.sum(axis=(1, 2))) <= 0.5 + tol)
    diff = out["squant"][0].astype(np.int16) - out["squant-k"][0]
    diff = diff.reshape(shape[0], shape[1], -1)
    assert np.all(np.count_nonzero(diff, axis=2) <= 1)
    assert out["squant"][4] == np.count_nonzero(diff)
