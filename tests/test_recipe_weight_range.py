"""squant+ step 4: the per-channel weight clipping weighted by the input
channels' variances (``weight_range="bn-mse"``, ``"auto"``)."""

from __future__ import annotations

import numpy as np
import pytest

import squant_rs
from squant_rs.model.recipe import (
    CLIP_RATIOS,
    clip_ratios,
    clip_rows,
    resolve_recipe,
    weight_importance,
    weight_range_for,
)

torch = pytest.importorskip("torch")
nn = torch.nn

from test_recipe import LAYERS, SHAPE, _digest, _tiny  # noqa: E402

# One row, 2 bits (levels 0..3 steps): with r = 1 the grid 0, 1, 2, 3
# holds 0 and 3 exactly and rounds the three 1.3s to 1 (error 3 * 0.09);
# with r = 0.65 the grid 0, 0.65, 1.3, 1.95 holds 0 and 1.3 and clips 3 to
# 1.95 (error 1.05^2 = 1.1025). Every other ratio of CLIP_RATIOS costs more
# than r = 1 with equal weights (e.g. r = 0.95: 3 * 0.35^2 + 0.15^2 = 0.39).
ROW = np.array([[0.0, 1.3, 1.3, 1.3, 3.0]])


def test_clip_ratios_hand_computed() -> None:
    assert CLIP_RATIOS[0] == 1.0 and len(CLIP_RATIOS) == 11
    # equal weights: the full range
    assert clip_ratios(ROW, np.ones_like(ROW), 2).tolist() == [1.0]
    # the 1.3s' inputs vary 1000x more than the outlier's: clip to 0.65
    imp = np.array([[1.0, 10.0, 10.0, 10.0, 0.01]])
    assert clip_ratios(ROW, imp, 2)[0] == pytest.approx(0.65)
    # reversed importance (the outlier's input matters most): keep it
    imp_rev = np.array([[1.0, 0.01, 0.01, 0.01, 10.0]])
    assert clip_ratios(ROW, imp_rev, 2).tolist() == [1.0]
    # rows are independent
    both = np.concatenate([ROW, ROW])
    got = clip_ratios(both, np.concatenate([imp_rev, imp]), 2)
    assert got[0] == 1.0 and got[1] == pytest.approx(0.65)


def _clip_ratios_numpy(
    w: np.ndarray, importance: np.ndarray, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS
) -> np.ndarray:
    """The recipe's former numpy clip_ratios: the reference of the native one."""
    with np.errstate(over="ignore"):  # all-equal rows: a 1e-30 width
        return _clip_ratios_numpy_body(w, importance, bits, ratios)


def _clip_ratios_numpy_body(
    w: np.ndarray, importance: np.ndarray, bits: int, ratios: tuple[float, ...]
) -> np.ndarray:
    x = np.asarray(w, dtype=np.float64)
    imp = np.asarray(importance, dtype=np.float32)
    mn, mx = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    levels = float(2**bits - 1)
    width = np.maximum(mx - mn, 1e-30)
    u = ((x - mn) * (levels / width)).astype(np.float32)
    t = np.empty_like(u)
    k = np.empty_like(u)
    best = np.full(x.shape[0], np.inf)
    chosen = np.ones(x.shape[0])
    for r in ratios:
        off = ((r - 1.0) * mn * (levels / width)).astype(np.float32)
        np.subtract(u, off, out=t)
        t *= np.float32(1.0 / r)
        np.rint(t, out=k)
        np.clip(k, 0.0, levels, out=k)
        k -= t
        k *= k
        if imp.shape == k.shape:
            k *= imp
            err = k.sum(axis=1, dtype=np.float64)
        else:
            row = np.broadcast_to(imp, (1, k.shape[1]))[0]
            err = np.einsum("on,n->o", k, row, dtype=np.float64)
        err *= r * r
        better = err < best
        best = np.where(better, err, best)
        chosen = np.where(better, r, chosen)
    return chosen


def test_clip_ratios_matches_numpy_reference() -> None:
    """The native clip_ratios gives the numpy code's ratios bit for bit:
    full (OC, N) and row (1, N) importance, float32 and float64 weights,
    2..8 bits, one-row weights, all-equal rows, rows longer than numpy's
    8192-element buffer, and many close ratios (near-ties)."""
    rng = np.random.default_rng(11)
    fine = tuple(float(r) for r in np.linspace(1.0, 0.5, 101))
    shapes = [(1, 9), (1, 144), (32, 27), (96, 9), (24, 144), (7, 1280), (3, 9000), (50, 1)]
    for case, (oc, n) in enumerate(shapes):
        for bits in range(2, 9):
            dtype = np.float32 if (case + bits) % 2 else np.float64
            scale = [0.01, 1.0, 30.0][(case + bits) % 3]
            w = (rng.standard_normal((oc, n)) * scale).astype(dtype)
            w[:, rng.integers(0, n)] *= 8.0  # an outlier column
            if oc > 1:
                w[rng.integers(0, oc)] = 0.125 * (bits - 4)  # an all-equal row
            full = (rng.random((oc, n)) ** 3).astype(np.float32)
            row = (rng.random((1, n)) * 100.0).astype(np.float32)
            for imp in (full, row, np.ones((1, n))):
                for ratios in (CLIP_RATIOS, fine):
                    want = _clip_ratios_numpy(w, imp, bits, ratios)
                    got = clip_ratios(w, imp, bits, ratios)
                    assert got.dtype == np.float64 and got.shape == (oc,)
                    assert got.tobytes() == want.tobytes(), (oc, n, bits, imp.shape)
    # non-finite weights and importance, huge and nearly flat rows
    w = rng.standard_normal((6, 20))
    w[0, 3], w[1, 5], w[2, 7] = np.nan, np.inf, -np.inf
    w[3], w[3, 0], w[4] = 1e10, 1e10 + 1e-3, 5e30
    nan_imp = np.where(rng.random((6, 20)) < 0.1, np.nan, 1.0)
    for imp in (rng.random((6, 20)), rng.random((1, 20)), nan_imp):
        for bits in (2, 4, 8):
            with np.errstate(invalid="ignore"):
                want = _clip_ratios_numpy(w, imp, bits)
            assert clip_ratios(w, imp, bits).tobytes() == want.tobytes()
    # a one-row importance given as a 1-D vector, and empty weights
    w = rng.standard_normal((5, 16))
    imp1 = rng.random(16).astype(np.float32)
    assert clip_ratios(w, imp1, 4).tolist() == _clip_ratios_numpy(w, imp1, 4).tolist()
    assert clip_ratios(np.zeros((0, 16)), np.ones((1, 16)), 4).shape == (0,)
    assert clip_ratios(np.zeros((3, 0)), np.ones((1, 0)), 4).tolist() == [1.0] * 3


def test_clip_ratios_same_for_every_thread_count() -> None:
    # big enough for the parallel path (rows split into tasks)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 1152)).astype(np.float32)
    imp = rng.random((300, 1152)).astype(np.float32)
    one = clip_ratios(w, imp, 4, threads=1)
    assert one.tolist() == _clip_ratios_numpy(w, imp, 4).tolist()
    assert clip_ratios(w, imp, 4, threads=2).tolist() == one.tolist()
    assert clip_ratios(w, imp, 4, threads=3).tolist() == one.tolist()


def test_clip_ratios_rejects_bad_input() -> None:
    from squant_rs._squant_rs import clip_ratios as native

    w = np.ones((2, 3))
    with pytest.raises(squant_rs.InvalidArgumentError, match="2-D"):
        clip_ratios(np.ones(3), np.ones((1, 3)), 4)
    with pytest.raises(squant_rs.InvalidArgumentError, match="importance"):
        native(w, np.ones((3, 3), np.float32), 4, [1.0])
    with pytest.raises(squant_rs.InvalidArgumentError, match="float32 or float64"):
        native(np.ones((2, 3), np.int32), np.ones((1, 3), np.float32), 4, [1.0])
    with pytest.raises(squant_rs.InvalidArgumentError, match="bits"):
        clip_ratios(w, np.ones((1, 3)), 1)
    with pytest.raises(squant_rs.InvalidArgumentError, match="ratios"):
        clip_ratios(w, np.ones((1, 3)), 4, (1.0, 0.0))
    for bad in (np.ones((1, 4)), np.ones((2, 3, 1))):  # not one row of w's width
        with pytest.raises(ValueError):
            clip_ratios(w, bad, 4)


def _clip_rows_numpy(w: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The recipe's former numpy clipping: the reference of the native one."""
    lo = (r[:, None] * w.min(axis=1, keepdims=True)).astype(w.dtype)
    hi = (r[:, None] * w.max(axis=1, keepdims=True)).astype(w.dtype)
    out: np.ndarray = np.clip(w, lo, hi)
    return out


def test_clip_rows_matches_numpy() -> None:
    """The native clipping gives np.clip's copy bit for bit (dtype, NaN,
    infinities, zeros of one sign), on every thread count."""
    from squant_rs._squant_rs import clip_rows as native

    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        for oc, n in ((1, 1), (7, 3), (33, 141), (300, 520)):  # the last: parallel
            w = rng.standard_normal((oc, n)).astype(dtype)
            r = rng.choice([1.0, 0.5, 0.95, 0.65], oc)
            r[0] = 0.5
            cases = [w, w.copy(), w.copy(), np.abs(w), -np.abs(w), np.zeros_like(w)]
            cases[1][rng.random((oc, n)) < 0.02] = np.nan
            cases[2][rng.random((oc, n)) < 0.02] = np.inf
            cases[2][rng.random((oc, n)) < 0.02] = -np.inf
            cases[3][rng.random((oc, n)) < 0.2] = 0.0  # zero minima
            cases[4][rng.random((oc, n)) < 0.2] = -0.0  # negative zero maxima
            for x in cases:
                want = _clip_rows_numpy(x, r)
                for threads in (1, 2, 3):
                    got = native(x, r, threads)
                    assert got is not None
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert got.tobytes() == want.tobytes()
                assert clip_rows(x, r).tobytes() == want.tobytes()
    # a strided w (copied row-major first)
    w = rng.standard_normal((20, 30))[:, ::3]
    r = np.full(20, 0.7)
    assert clip_rows(w, r).tobytes() == _clip_rows_numpy(w, r).tobytes()
    assert native(np.zeros((3, 0), np.float32), np.ones(3)).shape == (3, 0)


def test_clip_rows_leaves_ambiguous_rows_to_numpy() -> None:
    # numpy's min of a row with 0.0 and -0.0 is either, by its reduction
    # order; NaNs of different bits likewise: the native code declines and
    # clip_rows falls back to np.clip.
    from squant_rs._squant_rs import clip_rows as native

    mixed = np.array([[1.0, 0.0, -0.0, 2.0], [-1.0, 3.0, 2.0, 1.0]], np.float32)
    nans = np.array([[1.0, np.nan, -np.nan, 2.0]])
    cases = [mixed, nans]
    # NaNs other than np.nan: numpy's min/max give the row's own NaN or
    # np.nan by row length and position (x86's 0*inf NaN is -nan)
    for dtype, bits in ((np.float32, [0xFFC00000, 0x7FC12345]), (np.float64, [0xFFF8 << 48])):
        udt = np.uint32 if dtype == np.float32 else np.uint64
        for b in bits:
            for n in (3, 64, 1000):
                w = np.linspace(-1.0, 1.0, 2 * n).astype(dtype).reshape(2, n)
                w.view(udt)[0, n // 2] = b
                cases.append(w)
    for w in cases:
        r = np.full(w.shape[0], 0.5)
        assert native(w, r) is None
        assert clip_rows(w, r).tobytes() == _clip_rows_numpy(w, r).tobytes()


def test_clip_rows_ties_keep_numpys_zero() -> None:
    from squant_rs._squant_rs import clip_rows as native

    # np.clip keeps the element on a tie of +0 with a -0 bound (and the
    # other way round); a bound of -0 comes from an underflowing r * min.
    for dtype, tiny in ((np.float32, -1e-45), (np.float64, -5e-324)):
        w = np.array([[tiny, 0.0, 1.0], [-1.0, 2.0, -3.0]], dtype)
        for r in (np.array([0.5, 0.0]), np.array([0.5, 0.5])):
            want = _clip_rows_numpy(w, r)
            assert native(w, r, 1).tobytes() == want.tobytes()
            assert clip_rows(w, r).tobytes() == want.tobytes()


def test_clip_rows_rejects_bad_input() -> None:
    from squant_rs._squant_rs import clip_rows as native

    w = np.ones((2, 3))
    with pytest.raises(squant_rs.InvalidArgumentError, match="2-D"):
        native(np.ones(3), np.ones(3))
    with pytest.raises(squant_rs.InvalidArgumentError, match="ratios"):
        native(w, np.ones(3))
    with pytest.raises(squant_rs.InvalidArgumentError, match="finite"):
        native(w, np.array([1.0, np.nan]))
    with pytest.raises(squant_rs.InvalidArgumentError, match="float32 or float64"):
        native(np.ones((2, 3), np.int32), np.ones(2))
    with pytest.raises(squant_rs.InvalidArgumentError, match="threads"):
        native(w, np.ones(2), 0)


def test_weight_importance_columns() -> None:
    var = np.array([1.0, 2.0, 3.0, 4.0])
    dense = weight_importance(nn.Conv2d(4, 2, 2), (2, 4, 2, 2), var)
    assert dense.shape == (1, 16)  # the same row for every output channel
    # row-major (OC, IC, kh, kw): each input channel's 4 kernel positions
    assert dense[0].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4 + [4.0] * 4
    dw = weight_importance(nn.Conv2d(4, 4, 3, groups=4), (4, 1, 3, 3), var)
    assert dw.shape == (4, 9) and dw[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    grouped = weight_importance(nn.Conv2d(4, 4, 1, groups=2), (4, 2, 1, 1), var)
    assert grouped.tolist() == [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]
    lin = weight_importance(nn.Linear(4, 3), (3, 4), var)
    assert lin.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert weight_importance(nn.Linear(4, 3), (3, 4), None).tolist() == [[1.0] * 4]


def test_auto_resolution() -> None:
    plus = resolve_recipe("squant+")
    assert plus.weight_range == "auto"
    assert weight_range_for(plus, 4, None, "asymmetric") == "bn-mse"
    assert weight_range_for(plus, 3, 8, "asymmetric") == "bn-mse"
    assert weight_range_for(plus, 4, 4, "asymmetric") == "minmax"
    assert weight_range_for(plus, 6, None, "asymmetric") == "minmax"
    assert weight_range_for(plus, 4, None, "symmetric") == "minmax"
    assert resolve_recipe("paper").weight_range == "minmax"
    explicit = resolve_recipe("squant+", weight_range="bn-mse")
    assert weight_range_for(explicit, 8, 4, "asymmetric") == "bn-mse"
    with pytest.raises(squant_rs.InvalidArgumentError, match="asymmetric"):
        weight_range_for(explicit, 4, None, "symmetric")


def test_quantize_model_clips_only_where_asked() -> None:
    model = _tiny()
    before = _digest(model)
    q, rep = squant_rs.quantize_model(model, 4, input_shape=SHAPE, return_report=True)
    assert _digest(model) == before  # the caller's model is untouched
    ratios = {r.name: r.clip_ratio for r in rep.layers}
    # the stem's input (the image) has no statistics: min/max
    assert ratios["stem.0"] == 1.0
    assert all(0.5 <= ratios[n] <= 1.0 for n in LAYERS)
    assert any(ratios[n] < 1.0 for n in LAYERS)
    # the report shows the ratio
    lowest = min(rep.layers, key=lambda r: r.clip_ratio)
    assert f"{lowest.clip_ratio:.3f}" in str(rep) and "clip" in str(rep)
    _, rep_mm = squant_rs.quantize_model(
        model, 4, input_shape=SHAPE, weight_range="minmax", return_report=True
    )
    assert all(r.clip_ratio == 1.0 for r in rep_mm.layers)
    # "auto" at 4-bit activations and at 8-bit weights: min/max, bit for bit
    for w, a in ((4, 4), (8, None)):
        auto = squant_rs.quantize_model(model, w, a, input_shape=SHAPE)
        mm = squant_rs.quantize_model(model, w, a, input_shape=SHAPE, weight_range="minmax")
        assert _digest(auto) == _digest(mm)
    with pytest.raises(squant_rs.InvalidArgumentError, match="asymmetric"):
        squant_rs.quantize_model(model, 4, quantizer="symmetric", weight_range="bn-mse")


def test_bias_correction_uses_unclipped_weights() -> None:
    """The bias correction compares the quantized weight with the float
    (unclipped) one: on inputs from the assumed distribution the mean
    output error per channel stays small with clipping."""
    model = _tiny()
    q, rep = squant_rs.quantize_model(
        model, 4, input_shape=SHAPE, weight_range="bn-mse", return_report=True
    )
    assert any(r.clip_ratio < 1.0 for r in rep.layers)
    torch.manual_seed(3)
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        out = q(x)
        nb = squant_rs.quantize_model(
            model, 4, input_shape=SHAPE, weight_range="bn-mse", bias_correction=False
        )(x)
    err_bc = (out - ref).mean(0).abs().mean()
    err_nb = (nb - ref).mean(0).abs().mean()
    assert err_bc < err_nb


def test_minmax_is_the_recipe_before() -> None:
    """``weight_range="minmax"`` gives squant+'s W4 output from before the
    clipping search, bit for bit (its digest was pinned in test_recipe)."""
    q = squant_rs.quantize_model(_tiny(), 4, input_shape=SHAPE, weight_range="minmax")
    assert _digest(q) == "a7fe16113c766da44f0a90b64662b6833faaf5f38585c754ee34272f733cf3e2"
