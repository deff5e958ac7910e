"""Plain, slow Python oracle for SQuant weight quantization (docs/algorithm.md sections 1-4).

It follows docs/algorithm.md line by line and is deliberately written with
Python loops over groups so that it shares no structure with the fast
implementation.  The one deliberate deviation from a naive float sum is the
CASE group sum S, which is accumulated in fixed point (see ``group_sum``) so
that every backend gets a bit-identical S whatever the summation order.

Public entry point::

    squant_reference(w, bits, mode, quantizer="asymmetric")
        -> (codes int8 w.shape, s float32 (OC,), z float32 (OC,),
            k_changed int, c_changed int)

``quantizer="symmetric"`` replaces section 1 by the symmetric quantizer (zero point 0,
``s = (2^(b-1) - 1) / max|W|``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``).

``s`` is docs/algorithm.md's inverse scale (levels per unit) and ``z`` its zero point, so
``dequantized = (codes + z) / s``.
"""

from __future__ import annotations

import math

import numpy as np

MODES = ("squant", "squant-e", "squant-k", "squant-c")

F32 = np.float32


def ceil_log2(n: int) -> int:
    """ceil(log2(n)) for n >= 1, as the bit length of n - 1."""
    return (n - 1).bit_length()


def group_sum(errors) -> float:
    """Order-independent fixed-point sum of float32 errors, returned as float64.

    F = min(40, 62 - ceil_log2(len)); each term is int64(rint(float64(e) * 2**F)),
    the terms are added exactly, and S = float64(total) * 2**-F.
    """
    e64 = np.asarray(errors, dtype=np.float32).astype(np.float64)
    frac_bits = min(40, 62 - ceil_log2(e64.size))
    terms = np.rint(e64 * np.float64(2.0**frac_bits)).astype(np.int64)
    total = sum(terms.tolist())  # Python ints: exact, order-independent
    assert -(2**63) <= total < 2**63, "fixed-point sum overflowed int64"
    return float(np.float64(total) * np.float64(2.0**-frac_bits))


def code_bounds(bits: int, quantizer: str = "asymmetric") -> tuple[int, int]:
    """[tmin, tmax]: [-n, n - 1] (asymmetric) or [-(n - 1), n - 1] (symmetric)."""
    n = 2 ** (bits - 1)
    return (-(n - 1) if quantizer == "symmetric" else -n), n - 1


def channel_quantizer(w2: np.ndarray, bits: int, quantizer: str = "asymmetric"):
    """docs/algorithm.md section 1: per-output-channel asymmetric min/max
    quantizer (or the symmetric one).

    w2 is the float32 weight viewed as (OC, IC*K).  Returns float32 (s, z, x).
    """
    n = 2 ** (bits - 1)
    mx = w2.max(axis=1)
    mn = w2.min(axis=1)
    if quantizer == "symmetric":
        amax = np.maximum(np.abs(mx), np.abs(mn))
        s = (F32(n - 1) / np.maximum(amax, F32(1e-8))).astype(F32)
        z = np.zeros_like(s)
    else:
        levels = F32(2**bits - 1)
        denom = np.maximum(mx - mn, F32(1e-8))  # float32 subtraction and max
        s = (levels / denom).astype(F32)  # float32 division
        z = (np.rint(s * mn) + F32(n)).astype(F32)
    # x = s * W - z: a float32 multiply, then a float32 subtract (no FMA).
    prod = (s[:, None] * w2).astype(F32)
    x = (prod - z[:, None]).astype(F32)
    assert s.dtype == z.dtype == x.dtype == F32
    return s, z, x


def _descending_order(group: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Positions of ``group`` (ascending) sorted by priority descending; ties
    keep the lower position first (stable sort of the negated priorities)."""
    keys = -priority[group].astype(np.float64) + 0.0  # + 0.0: no -0.0 keys
    return group[np.argsort(keys, kind="stable")]


class _State:
    """Flat (row-major) per-element state of one tensor."""

    def __init__(self, x: np.ndarray, tmin: int, tmax: int):
        x = x.reshape(-1).astype(F32)
        self.x = x
        # docs/algorithm.md section 2: nearest rounding.
        self.r = np.rint(x).astype(F32)
        self.e = (self.r - x).astype(F32)
        r, e = self.r, self.e
        one = F32(1)
        # Up table: candidate when e < 0 and x < tmax.
        up_cand = (e < 0) & (x < F32(tmax))
        self.up_value = np.where(up_cand, r + one, r).astype(F32)
        self.up_error = np.where(up_cand, e + one, F32(0)).astype(F32)
        self.up_priority = np.where(up_cand, np.abs(e), F32(0)).astype(F32)
        # Down table: candidate when e > 0 and x > tmin.
        down_cand = (e > 0) & (x > F32(tmin))
        self.down_value = np.where(down_cand, r - one, r).astype(F32)
        self.down_error = np.where(down_cand, e - one, F32(0)).astype(F32)
        self.down_priority = np.where(down_cand, e, F32(0)).astype(F32)

    def table(self, direction: str):
        if direction == "up":
            return self.up_value, self.up_error, self.up_priority
        return self.down_value, self.down_error, self.down_priority

    def orders(self, group):
        return {
            "up": _descending_order(group, self.up_priority),
            "down": _descending_order(group, self.down_priority),
        }


def case_step(state: _State, group, orders, stats=None) -> int:
    """docs/algorithm.md section 3: one CASE step on ``group`` (an int array of ascending
    flat positions) with precomputed ``orders``.  Returns the number of
    elements whose value actually changed."""
    size = len(group)
    s_sum = group_sum(state.e[group])
    direction = "up" if s_sum < 0 else "down"  # S == 0 goes down
    opposite = "down" if direction == "up" else "up"
    a = F32(abs(s_sum))
    t_f = np.rint(a)  # float32 round-half-to-even
    over = bool(t_f >= a)
    t = int(t_f)
    if t > size:
        t = size
    order = orders[direction]
    value, error, priority = state.table(direction)

    if stats is not None:
        stats["groups"] = stats.get("groups", 0) + 1
        if float(a) - math.floor(float(a)) == 0.5:
            stats["half_sums"] = stats.get("half_sums", 0) + 1
        if 0 < t < size:
            before, after = priority[order[t - 1]], priority[order[t]]
            if before == after and before > 0:
                stats["boundary_ties"] = stats.get("boundary_ties", 0) + 1

    changed = 0
    for j in order[:t].tolist():
        if value[j] != state.r[j]:
            changed += 1
        state.r[j] = value[j]
        state.e[j] = error[j]

    if over:
        # t == 0 only when S == 0: order[-1] is then the last position.
        c = int(order[t - 1])
        state.table(opposite)[2][c] = np.abs(state.e[c])
    elif t < size:
        c = int(order[t])
        priority[c] = np.abs(state.e[c])
    return changed


def squant_reference(
    w: np.ndarray, bits: int, mode: str, *, stats=None, quantizer: str = "asymmetric"
):
    """Quantize ``w`` (ndim >= 2, any float dtype) per docs/algorithm.md sections 1-4.

    Returns (codes int8, s float32 (OC,), z float32 (OC,), k_changed, c_changed).
    If ``stats`` is a dict it is filled with counters useful to check that a
    test really exercised ties ("rint_ties", "half_sums", "boundary_ties").
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if not (2 <= bits <= 8):
        raise ValueError(f"bits must be in 2..8, got {bits}")
    w32 = np.asarray(w).astype(F32)
    if w32.ndim < 2 or w32.size == 0:
        raise ValueError("need a non-empty tensor with at least 2 dimensions")
    if not np.all(np.isfinite(w32)):
        raise ValueError("NaN or infinity in weights")

    oc, ic = w32.shape[0], w32.shape[1]
    k = int(np.prod(w32.shape[2:], dtype=np.int64)) if w32.ndim > 2 else 1
    tmin, tmax = code_bounds(bits, quantizer)

    with np.errstate(over="ignore", invalid="ignore"):
        s, z, x = channel_quantizer(w32.reshape(oc, ic * k), bits, quantizer)
    bad = ~(np.isfinite(z) & (s > 0) & np.all(np.isfinite(x), axis=1))
    if bad.any():
        o = int(np.flatnonzero(bad)[0])
        raise ValueError(f"channel {o}: weights too large for the float32 quantizer")
    state = _State(x, tmin, tmax)
    if stats is not None:
        frac = x.astype(np.float64) - np.floor(x.astype(np.float64))
        stats["rint_ties"] = int(np.count_nonzero(frac == 0.5))

    k_changed = 0
    c_changed = 0

    # SQuant-K: kernel groups of K elements, only when K > 1.
    if k > 1 and mode in ("squant-k", "squant"):
        kernels = [np.arange(g * k, (g + 1) * k) for g in range(oc * ic)]
        kernel_orders = [state.orders(g) for g in kernels]
        state.up_priority[:] = 0
        state.down_priority[:] = 0
        for group, orders in zip(kernels, kernel_orders):
            k_changed += case_step(state, group, orders, stats)

    # SQuant-C: output-channel groups of IC*K elements.
    if mode in ("squant-c", "squant"):
        width = ic * k
        for o in range(oc):
            group = np.arange(o * width, (o + 1) * width)
            c_changed += case_step(state, group, state.orders(group), stats)

    codes = np.clip(state.r, tmin, tmax).astype(np.int8).reshape(w32.shape)
    return codes, s, z, k_changed, c_changed


def nearest_reference(w: np.ndarray, bits: int, quantizer: str = "asymmetric") -> np.ndarray:
    """SQuant-E codes computed directly: clamp(rne(s*W - z))."""
    w32 = np.asarray(w).astype(F32)
    oc = w32.shape[0]
    tmin, tmax = code_bounds(bits, quantizer)
    _, _, x = channel_quantizer(w32.reshape(oc, -1), bits, quantizer)
    return np.clip(np.rint(x), tmin, tmax).astype(np.int8).reshape(w32.shape)
