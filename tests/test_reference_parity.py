"""Bit-exact parity of squant_rs.quantize_tensor with the plain Python oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import squant_rs

from conftest import DISTRIBUTIONS, grid_weight, make_weight, seed_for
from reference import MODES, group_sum, nearest_reference, squant_reference

ALL_BITS = tuple(range(2, 9))

SHAPES = (
    (16, 24),  # Linear
    (1, 40),  # Linear, OC = 1
    (7, 1),  # Linear, IC = 1
    (33, 17),  # Linear, odd sizes
    (8, 6, 5),  # Conv1d
    (6, 1, 7),  # Conv1d, IC = 1
    (12, 8, 3, 3),  # Conv2d
    (1, 9, 3, 3),  # Conv2d, OC = 1
    (5, 7, 5, 3),  # Conv2d, odd kernel
    (3, 2, 7, 7),  # Conv2d, large kernel
    (16, 1, 3, 3),  # depthwise
    (12, 4, 3, 3),  # grouped conv, IC/groups = 4
    (10, 16, 1, 1),  # 1x1 conv (K = 1)
    (4, 3, 2, 3, 3),  # Conv3d
    (3, 5, 1, 1, 1),  # 1x1x1 Conv3d
)


def _describe_mismatch(got: np.ndarray, want: np.ndarray) -> str:
    oc = want.shape[0]
    g = got.reshape(oc, -1)
    r = want.reshape(oc, -1)
    bad = np.argwhere(g != r)
    o, j = bad[0]
    return (
        f"{len(bad)} code(s) differ; first at channel {o}, flat index {j}: "
        f"fast={g[o, j]} reference={r[o, j]}; channels involved: "
        f"{sorted(set(bad[:, 0].tolist()))[:10]}"
    )


def assert_parity(w: np.ndarray, bits: int, mode: str) -> None:
    qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
    codes, s, z, k_changed, c_changed = squant_reference(w, bits, mode)
    assert qt.codes.dtype == np.int8
    assert qt.codes.shape == w.shape
    assert np.array_equal(qt.codes, codes), _describe_mismatch(qt.codes, codes)
    assert qt.scale.dtype == np.float32 and qt.scale.shape == (w.shape[0],)
    assert qt.zero_point.dtype == np.float32
    assert qt.zero_point.shape == (w.shape[0],)
    assert np.array_equal(qt.scale.view(np.uint32), s.view(np.uint32))
    assert np.array_equal(qt.zero_point.view(np.uint32), z.view(np.uint32))
    assert (qt.k_flips, qt.c_flips) == (k_changed, c_changed)
    assert qt.bits == bits
    assert qt.mode == mode


# --------------------------------------------------------------------------
# The oracle itself, on examples worked by hand from docs/algorithm.md.


def test_reference_hand_worked_conv():
    """One channel, IC = 2 kernels of K = 3, 4 bits (n = 8, codes in [-8, 7]).

    mn = 0, mx = 1.875 -> s = 15 / 1.875 = 8 (exact), z = rne(8 * 0) + 8 = 8,
    x = 8 W - 8 (all exact):
        W = [0, 1.078125, 1.703125 | 1.875, 1.296875, 1.375]
        x = [-8, 0.625, 5.625      | 7,     2.375,    3    ]
        r = [-8, 1,     6          | 7,     2,        3    ]
        e = [0,  .375,  .375       | 0,    -.375,     0    ]
    up priority   = [0, 0, 0 | 0, .375, 0]   (x[3] = 7 = tmax is no candidate)
    down priority = [0, .375, .375 | 0, 0, 0] (x[0] = -8 = tmin, e = 0 anyway)

    K level (orders first, then all priorities zeroed):
      kernel 0: S = .75 -> down, A = .75, t = 1, over (1 >= .75).
        down order [1, 2, 0] (tie .375/.375 keeps the lower position first)
        flip 1 down: r[1] = 0, e[1] = .375 - 1 = -.625   (k_changed = 1)
        carry c = order[0] = 1: up.priority[1] = .625
      kernel 1: S = -.375 -> up, A = .375, t = 0, not over; no flips.
        up order [4, 3, 5]; carry c = order[0] = 4: up.priority[4] = .375
    C level: e = [0, -.625, .375, 0, -.375, 0], S = -.625 -> up, t = 1, over.
      up order [1 (.625), 4 (.375), 0, 2, 3, 5]; flip 1 up.  Element 1 was a
      down candidate, so it is no up candidate: up.value = r0 = 1 and
      up.error = 0 (release quirk) -> r[1] = 1 again (c_changed = 1).
    Final codes [-8, 1, 6 | 7, 2, 3].

    squant-k stops after K: [-8, 0, 6 | 7, 2, 3] (k=1, c=0).
    squant-c: S = .375 -> down, t = 0, no flips: [-8, 1, 6 | 7, 2, 3].
    """
    w = np.array([[[0.0, 1.078125, 1.703125], [1.875, 1.296875, 1.375]]], dtype=np.float32)
    expected = {
        "squant": ([[[-8, 1, 6], [7, 2, 3]]], 1, 1),
        "squant-k": ([[[-8, 0, 6], [7, 2, 3]]], 1, 0),
        "squant-c": ([[[-8, 1, 6], [7, 2, 3]]], 0, 0),
        "squant-e": ([[[-8, 1, 6], [7, 2, 3]]], 0, 0),
    }
    for mode, (want, kc, cc) in expected.items():
        codes, s, z, k_changed, c_changed = squant_reference(w, 4, mode)
        assert codes.tolist() == want, mode
        assert (k_changed, c_changed) == (kc, cc), mode
        assert s.tolist() == [8.0] and z.tolist() == [8.0]
        assert_parity(w, 4, mode)


def test_reference_hand_worked_linear_ties():
    """Linear (1, 5), 2 bits (n = 2, codes in [-2, 1]); K = 1 so no K level.

    mn = 0, mx = .75 -> s = 3 / .75 = 4, z = 0 + 2 = 2, x = 4 W - 2:
        W = [0,  .75, .625, .125, .5625]
        x = [-2, 1,   .5,  -1.5,  .25  ]
        r = [-2, 1,   0,   -2,    0    ]   (rne: .5 -> 0, -1.5 -> -2)
        e = [0,  0,  -.5,  -.5,  -.25  ]
    up priority = [0, 0, .5, .5, .25] (x = 1 = tmax is no candidate).
    C level: S = -1.25 -> up, A = 1.25, t = 1, not over.
      up order [2, 3, 4, 0, 1] (the .5 tie keeps position 2 first)
      flip 2 up: r[2] = 1, e[2] = .5; carry c = order[1] = 3.
    Final codes [-2, 1, 1, -2, 0] (c_changed = 1).
    """
    w = np.array([[0.0, 0.75, 0.625, 0.125, 0.5625]], dtype=np.float32)
    stats: dict = {}
    codes, s, z, k_changed, c_changed = squant_reference(w, 2, "squant", stats=stats)
    assert codes.tolist() == [[-2, 1, 1, -2, 0]]
    assert (k_changed, c_changed) == (0, 1)
    assert s.tolist() == [4.0] and z.tolist() == [2.0]
    assert stats["rint_ties"] == 2 and stats["boundary_ties"] == 1
    for mode in MODES:
        assert_parity(w, 2, mode)
    assert nearest_reference(w, 2).tolist() == [[-2, 1, 0, -2, 0]]


def test_fixed_point_group_sum_is_pinned():
    """S is a fixed-point sum with F = 40 fractional bits, not a float sum.

    8 bits, W = x exactly (mn = -128, mx = 127 -> s = 1, z = 0).  Errors:
    e = [0, 0, .25, .25 + 2**-25, 2**-45].  The fixed-point sum drops 2**-45
    (rint(2**-5) = 0): S = .5 + 2**-25, whose float32 rounding is a tie that
    goes to .5 -> t = rne(.5) = 0, no flip.  An exact/float64 sum would give
    A = .5 + 2**-24 -> t = 1 and flip element 3 down.
    """
    w = np.array([[-128.0, 127.0, -0.25, -(0.25 + 2.0**-25), -(2.0**-45)]], dtype=np.float32)
    assert group_sum([0.25, np.float32(0.25 + 2.0**-25), np.float32(2.0**-45)]) == (0.5 + 2.0**-25)
    codes, s, z, _, c_changed = squant_reference(w, 8, "squant")
    assert s.tolist() == [1.0] and z.tolist() == [0.0]
    assert codes.tolist() == [[-128, 127, 0, 0, 0]] and c_changed == 0
    for mode in MODES:
        assert_parity(w, 8, mode)


@pytest.mark.parametrize("length", (2**22, 2**22 + 1))
def test_fixed_point_fraction_bits_shrink_for_huge_channels(length):
    """F = min(40, 62 - ceil_log2(len)) drops to 39 above 2**22 elements.

    As in the test above, plus e = 2**-40 (x = -2**-40) and zeros elsewhere:
    len = 2**22:     F = 40 keeps 2**-40: S = .5 + 2**-25 + 2**-40, A rounds up
                     to .5 + 2**-24 -> t = 1, over: element 3 flips down to -1.
    len = 2**22 + 1: F = 39, rint(2**-40 * 2**39) = rint(.5) = 0:
                     S = .5 + 2**-25 -> A = .5 -> t = 0, no flip.
    """
    w = np.zeros((1, length), np.float32)
    w[0, :5] = [-128.0, 127.0, -0.25, -(0.25 + 2.0**-25), -(2.0**-40)]
    flipped = length == 2**22
    for mode in ("squant", "squant-c"):
        codes, _, _, _, c_changed = squant_reference(w, 8, mode)
        assert codes[0, :5].tolist() == [-128, 127, 0, -1 if flipped else 0, 0]
        assert c_changed == int(flipped)
        assert not codes[0, 5:].any()
        assert_parity(w, 8, mode)


def test_group_sum_fraction_bits():
    # F = min(40, 62 - ceil_log2(len)): 40 for small groups.
    assert group_sum([np.float32(2.0**-41)] * 3) == 0.0  # rint(.5) = 0 each
    assert group_sum([np.float32(3 * 2.0**-41)]) == 2.0**-39  # rint(1.5) = 2
    assert group_sum([np.float32(-0.5)] * 7) == -3.5


# --------------------------------------------------------------------------
# Parity on many random tensors.


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_shapes_and_distributions(shape, dist):
    rng = np.random.default_rng(seed_for("shape-dist", shape, dist))
    i = SHAPES.index(shape) + DISTRIBUTIONS.index(dist)
    for bits in (ALL_BITS[i % 7], 4 if i % 2 else 8):
        w = make_weight(rng, shape, dist, bits=bits)
        for mode in MODES:
            assert_parity(w, bits, mode)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("mode", MODES)
def test_parity_all_bits_and_modes(bits, mode):
    rng = np.random.default_rng(seed_for("bits-modes", bits, mode))
    for shape, dist in (
        ((24, 16, 3, 3), "normal"),
        ((20, 48), "student_t"),
        ((8, 4, 5, 5), "outliers"),
        ((6, 8, 3), "pruned"),
    ):
        assert_parity(make_weight(rng, shape, dist), bits, mode)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(
    "shape", ((8, 6, 3, 3), (16, 32), (6, 8, 5)), ids=("conv2d", "linear", "conv1d")
)
def test_parity_exact_grid_ties(shape, bits):
    """x on exact quarter steps: .5 rounding ties, equal priorities at the
    flip boundary, and group sums of exactly k + .5 all really happen."""
    rng = np.random.default_rng(seed_for("grid", shape, bits))
    stats: dict = {}
    for p in (-3, 0, 2, 5):
        w = grid_weight(rng, shape, bits, p=p)
        squant_reference(w, bits, "squant", stats=stats)
        assert stats["rint_ties"] > 0, stats
        for mode in MODES:
            assert_parity(w, bits, mode)
    assert stats.get("half_sums", 0) > 0, stats
    assert stats.get("boundary_ties", 0) > 0, stats


@pytest.mark.parametrize("dtype", (np.float16, np.float64))
@pytest.mark.parametrize("dist", ("normal", "student_t", "grid", "tiny"))
def test_parity_other_float_dtypes(dtype, dist):
    rng = np.random.default_rng(seed_for("dtype", np.dtype(dtype).name, dist))
    for shape in ((10, 6, 3, 3), (12, 20)):
        w32 = make_weight(rng, shape, dist)
        if dtype is np.float64:
            # Use values that are not float32-exact so the conversion matters.
            w = w32.astype(np.float64) * (1 + 1e-9 * rng.standard_normal(shape))
        else:
            w = w32.astype(np.float16)
        for bits in (3, 4, 8):
            for mode in MODES:
                assert_parity(w, bits, mode)
                qt = squant_rs.quantize_tensor(w, bits=bits, mode=mode)
                ref32 = squant_rs.quantize_tensor(w.astype(np.float32), bits, mode)
                assert np.array_equal(qt.codes, ref32.codes)


def test_parity_medium_tensor():
    rng = np.random.default_rng(seed_for("medium"))
    w = make_weight(rng, (64, 32, 3, 3), "normal")
    for mode in ("squant", "squant-k"):
        assert_parity(w, 4, mode)


def test_parity_tiny_but_nonconstant_ranges():
    """Channel ranges just above and below the 1e-8 floor of the quantizer."""
    rng = np.random.default_rng(seed_for("tiny-range"))
    base = rng.normal(0, 1, (6, 1, 1)).astype(np.float32)
    for spread in (1e-7, 3e-8, 1e-8, 5e-9, 1e-9):
        w = (base + rng.uniform(0, spread, (6, 5, 3))).astype(np.float32)
        for bits in (2, 4, 8):
            for mode in MODES:
                assert_parity(w, bits, mode)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    oc=st.integers(1, 6),
    ic=st.integers(1, 9),
    kernel=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=st.sampled_from(ALL_BITS),
    seed=st.integers(0, 2**32 - 1),
)
def test_parity_hypothesis(oc, ic, kernel, dist, bits, seed):
    shape = (oc, ic, *kernel)
    w = make_weight(np.random.default_rng(seed), shape, dist, bits=bits)
    for mode in MODES:
        assert_parity(w, bits, mode)


@pytest.mark.parametrize(
    "channel", ([1e30, 1e30, 1e30], [-3e38, 0.0, 3e38]), ids=("huge", "range-overflow")
)
def test_both_reject_weights_too_large_for_float32(channel):
    w = np.zeros((2, 3), np.float32)
    w[1] = channel
    with pytest.raises(ValueError, match="channel 1"):
        squant_reference(w, 4, "squant")
    with pytest.raises(ValueError, match="channel 1"):
        squant_rs.quantize_tensor(w, bits=4)
