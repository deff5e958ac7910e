"""`quantize_tensors`: many weights in one call, the same results as
`quantize_tensor` on each (numpy and CPU torch inputs, Rust core)."""

from __future__ import annotations

import numpy as np
import pytest

import squant_rs

from conftest import make_weight, seed_for
from reference import MODES

SHAPES = [
    (16, 8, 3, 3),
    (5, 8, 3, 3),
    (32, 64),
    (7, 1, 3, 3),
    (6, 4, 5),
    (3, 2, 7, 7),
    (40, 33, 1, 1),
]


def _weights(dtype=np.float32, key="batch"):
    return [
        make_weight(np.random.default_rng(seed_for(key, s)), s, "normal").astype(dtype)
        for s in SHAPES
    ]


def _same(a, b) -> None:
    assert np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert np.array_equal(np.asarray(a.scale).view(np.uint32), np.asarray(b.scale).view(np.uint32))
    assert np.array_equal(
        np.asarray(a.zero_point).view(np.uint32), np.asarray(b.zero_point).view(np.uint32)
    )
    assert (a.k_flips, a.c_flips, a.bits, a.mode, a.dtype) == (
        b.k_flips,
        b.c_flips,
        b.bits,
        b.mode,
        b.dtype,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_equals_one_call_per_weight(mode, bits, dtype):
    ws = _weights(dtype, key=f"eq{dtype.__name__}")
    before = [w.copy() for w in ws]
    got = squant_rs.quantize_tensors(ws, bits, mode)
    assert len(got) == len(ws)
    for w, b, qt in zip(ws, before, got):
        _same(qt, squant_rs.quantize_tensor(w, bits, mode))
        assert w.tobytes() == b.tobytes()  # inputs untouched
        assert qt.dequantize().dtype == w.dtype


def test_thread_count_does_not_matter():
    ws = _weights(key="threads")
    one = squant_rs.quantize_tensors(ws, 4, threads=1)
    for threads in (2, 3, 7):
        for a, b in zip(one, squant_rs.quantize_tensors(ws, 4, threads=threads)):
            _same(a, b)


def test_empty_list_and_iterables():
    assert squant_rs.quantize_tensors([]) == []
    ws = _weights(key="iter")[:2]
    for a, b in zip(squant_rs.quantize_tensors(iter(ws)), squant_rs.quantize_tensors(tuple(ws))):
        _same(a, b)


def test_strided_and_fortran_inputs():
    base = _weights(key="layout")
    views = [np.asfortranarray(base[0]), base[2][:, ::2], base[3][::-1]]
    for v, qt in zip(views, squant_rs.quantize_tensors(views)):
        _same(qt, squant_rs.quantize_tensor(np.ascontiguousarray(v)))


def test_errors_name_the_weight():
    ws = _weights(key="err")
    bad = [w.copy() for w in ws]
    bad[3][5, 0, 1, 2] = np.nan
    with pytest.raises(squant_rs.NonFiniteWeightError, match=r"^weight 3: .*output channel 5"):
        squant_rs.quantize_tensors(bad)
    bad = list(ws)
    bad[2] = np.zeros((0, 4), np.float32)
    with pytest.raises(squant_rs.InvalidArgumentError, match=r"^weight 2: .*empty"):
        squant_rs.quantize_tensors(bad)
    bad[2] = np.arange(6, dtype=np.int32).reshape(2, 3)
    with pytest.raises(squant_rs.UnsupportedDtypeError, match=r"^weight 2: .*int32"):
        squant_rs.quantize_tensors(bad)
    bad[2] = np.ones(4, np.float32)
    with pytest.raises(squant_rs.InvalidArgumentError, match=r"^weight 2: .*2 dimensions"):
        squant_rs.quantize_tensors(bad)
    big = list(ws)
    big[1] = np.full((2, 3), 1e39, np.float64)
    with pytest.raises(squant_rs.WeightRangeError, match=r"^weight 1: "):
        squant_rs.quantize_tensors(big)
    with pytest.raises(squant_rs.InvalidArgumentError, match="bits"):
        squant_rs.quantize_tensors(ws, 9)
    with pytest.raises(squant_rs.InvalidArgumentError, match="mode"):
        squant_rs.quantize_tensors(ws, 4, "squant-x")


def test_native_errors_name_the_weight():
    ws = [w.astype(np.float32) for w in _weights(key="nat")]
    ws[4] = ws[4].copy()
    ws[4][2, 1, 3] = np.inf
    with pytest.raises(squant_rs.NonFiniteWeightError, match=r"^weight 4: .*output channel 2"):
        squant_rs._squant_rs.quantize_many(ws, 4, "squant")


def test_torch_cpu_tensors_take_the_rust_path():
    torch = pytest.importorskip("torch")
    ws = _weights(key="torch")
    ts = [torch.from_numpy(w) for w in ws]
    ts[1] = ts[1].to(torch.bfloat16)
    got = squant_rs.quantize_tensors(ts + [ws[0]], 4)
    for t, qt in zip(ts, got):
        ref = squant_rs.quantize_tensor(t, 4)
        assert isinstance(qt.codes, torch.Tensor) and qt.codes.device == t.device
        assert torch.equal(qt.codes, ref.codes) and qt.dtype == t.dtype
        assert (qt.k_flips, qt.c_flips) == (ref.k_flips, ref.c_flips)
    assert isinstance(got[-1].codes, np.ndarray)


@pytest.mark.parametrize("threads", (2, 3))
def test_large_weight_errors_name_the_lowest_channel(threads):
    """Weights above the serial threshold are shared between the calling
    thread and pool workers by chunks of channels; an error still names the
    lowest failing channel, whichever thread met it."""
    w = make_weight(np.random.default_rng(seed_for("shared", threads)), (96, 64, 3, 3), "normal")
    assert w.size >= 1 << 15
    bad = w.copy()
    bad[70, 3, 1, 1] = np.inf
    bad[41, 0, 2, 2] = np.nan
    with pytest.raises(
        squant_rs.NonFiniteWeightError, match=r"output channel 41 \(element 8 of that channel\)"
    ):
        squant_rs.quantize_tensor(bad, 4, threads=threads)
    huge = w.copy()
    huge[90] = 1e32  # constant channel: the quantizer's scale overflows
    huge[60] = 2e32
    with pytest.raises(squant_rs.WeightRangeError, match=r"output channel 60"):
        squant_rs.quantize_tensor(huge, 4, threads=threads)
    # And without errors, the same results at every thread count.
    one = squant_rs.quantize_tensor(w, 4, threads=1)
    _same(squant_rs.quantize_tensor(w, 4, threads=threads), one)


def _first_error(ws, **kw):
    """The error of one call per weight, in order: type and prefixed message."""
    for i, w in enumerate(ws):
        try:
            squant_rs.quantize_tensor(w, 4, **kw)
        except Exception as exc:
            return type(exc), f"weight {i}: {exc}"
    raise AssertionError("no bad weight")


_BAD = {
    "nan": lambda: np.array([[1.0, np.nan], [0.5, 2.0]], np.float32),
    "too-large": lambda: np.full((2, 3), 1e39, np.float64),
    "1-d": lambda: np.ones(4, np.float32),
    "int32": lambda: np.ones((2, 3), np.int32),
    "empty": lambda: np.zeros((0, 4), np.float32),
}


def _snapshot(w):
    return (w.numpy() if hasattr(w, "numpy") else w).copy()


@pytest.mark.parametrize("late", list(_BAD))
@pytest.mark.parametrize("early", list(_BAD))
@pytest.mark.parametrize(
    "inputs", ["numpy", "torch-rust", "torch-torch", "torch-torch-mixed0", "torch-torch-mixed1"]
)
def test_lowest_index_bad_weight_wins(inputs, early, late):
    """Whatever the kinds of error (a value found while quantizing, or a
    shape or dtype refused up front), the lowest-index bad weight's error is
    raised, as one call per weight would raise it, on every route."""
    good = [w.astype(np.float32) for w in _weights(key="first")][:4]
    ws = [good[0], good[1], _BAD[early](), good[2], _BAD[late](), good[3]]
    kw = {}
    if inputs != "numpy":
        torch = pytest.importorskip("torch")
        kw["backend"] = inputs.split("-")[1]
        ts = [torch.from_numpy(w) for w in ws]
        # mixed{r}: numpy arrays at the even (r = 0) or odd (r = 1) positions
        # take the Rust core, the tensors the torch backend
        r = int(inputs[-1]) if "mixed" in inputs else -1
        ws = [w if i % 2 == r else t for i, (w, t) in enumerate(zip(ws, ts))]
    before = [_snapshot(w) for w in ws]
    want_type, want_msg = _first_error(ws, **kw)
    assert want_msg.startswith("weight 2: ")
    with pytest.raises(Exception) as got:
        squant_rs.quantize_tensors(ws, 4, **kw)
    assert type(got.value) is want_type
    assert str(got.value) == want_msg
    for w, b in zip(ws, before):
        assert np.array_equal(_snapshot(w), b, equal_nan=True)
