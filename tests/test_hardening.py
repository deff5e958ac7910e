"""Issue 9, the tensor / torch / model / bindings half: overflowing grids,
tied weights, un-copyable models, warnings, threads, picklable exceptions,
huge views, public names, memory-saving block paths, a self-contained repo."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import pickle
import re
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import squant_rs
from squant_rs import _squant_rs as native
from squant_rs.model.layers import dequantize_tensors, relative_error
from squant_rs.tensor import quantized as quantized_mod
from squant_rs.tensor.validate import dtype_max, dtype_name

torch = pytest.importorskip("torch")
nn = torch.nn

ROOT = Path(__file__).resolve().parent.parent
ERRORS = (
    squant_rs.SquantError,
    squant_rs.NonFiniteWeightError,
    squant_rs.WeightRangeError,
    squant_rs.InvalidArgumentError,
    squant_rs.FormatError,
    squant_rs.UnsupportedDtypeError,
)


def _linear(weight: np.ndarray, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.data = torch.from_numpy(weight).to(dtype)
    return layer


# --------------------------------------------------------------------------
# item 4: dequantized values that would not be finite


OVERFLOW = np.array([[1.0, -1.0], [3.4028235e38, 0.0]], np.float32)  # channel 1 overflows


@pytest.mark.parametrize(
    "call",
    [
        lambda w: squant_rs.quantize_tensor(w, 2),
        lambda w: squant_rs.quantize_tensor(torch.from_numpy(w), 2),
        lambda w: squant_rs.quantize_tensor(torch.from_numpy(w), 2, backend="torch"),
        lambda w: squant_rs.quantize_tensors([w], 2),
        lambda w: squant_rs.quantize_tensors([torch.from_numpy(w)], 2, backend="torch"),
    ],
    ids=["numpy", "torch-rust", "torch-torch", "batch-numpy", "batch-torch"],
)
def test_grid_beyond_float32_is_a_range_error_on_every_backend(call) -> None:
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 1: weight values too"):
        call(OVERFLOW)


def test_grid_beyond_float32_through_quantize_model() -> None:
    for backend in ("rust", "torch"):
        model = nn.Sequential(_linear(OVERFLOW))
        with pytest.raises(squant_rs.WeightRangeError, match=r"^0: output channel 1"):
            squant_rs.quantize_model(model, wbits=2, backend=backend)


def test_issue_example_no_longer_dequantizes_to_inf() -> None:
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 0"):
        squant_rs.quantize_tensor(np.array([[3.4028235e38, 0.0]], np.float32), 2).dequantize()


def test_float16_output_beyond_float16_is_a_range_error() -> None:
    # Values finite in float32 (about 1e6) but not in float16: a hand-made
    # QuantizedTensor (the quantize functions never make one).
    codes = np.array([[0, 127], [-128, 127]], np.int8)
    scale = np.array([1.0, 1e-4], np.float32)
    zp = np.array([0.0, 0.0], np.float32)
    qt = squant_rs.QuantizedTensor(codes, scale, zp, 8, "squant", np.dtype(np.float16), 0, 0)
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 1: .*overflow float16"):
        qt.dequantize()
    tq = squant_rs.QuantizedTensor(
        torch.from_numpy(codes),
        torch.from_numpy(scale),
        torch.from_numpy(zp),
        8,
        "squant",
        torch.float16,
        0,
        0,
    )
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 1: .*overflow float16"):
        tq.dequantize()
    # float32 output of the same values is fine.
    ok = squant_rs.QuantizedTensor(codes, scale, zp, 8, "squant", np.dtype(np.float32), 0, 0)
    assert np.isfinite(ok.dequantize()).all()


@pytest.mark.parametrize(
    "dtype", [np.dtype(np.float16), "float16", np.float16, np.half, "f2", "<f2", "e"], ids=repr
)
def test_float16_output_in_any_spelling_is_checked_and_clamped(dtype: object) -> None:
    """Every spelling of float16 that ``np.dtype`` (and so check_fields)
    takes gets float16's overflow check and clamp: ``np.float16`` was named
    ``"float16'>"`` and ``"f2"`` ``"f2"``, so dequantize() returned inf."""
    assert dtype_name(dtype) == "float16" and dtype_max(dtype) == 65504.0
    codes = np.array([[-8, 7], [0, 1]], np.int8)
    scale = np.array([1e-4, 1.0], np.float32)  # channel 0 reaches about 8e4
    qt = squant_rs.QuantizedTensor(codes, scale, np.zeros(2, np.float32), 4, "squant", dtype, 0, 0)
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 0: .*overflow float16"):
        qt.dequantize()
    # A float16 weight at float16's limits: the grid end one step beyond is clamped.
    q = squant_rs.quantize_tensor(np.array([[65504, -65504, 0, 1]], np.float16), 2)
    hand = dataclasses.replace(q, dtype=dtype, grid_checked=False)
    got = hand.dequantize()
    assert got.dtype == np.float16 and np.array_equal(got, q.dequantize())
    assert np.isfinite(got).all()
    assert np.array_equal(dequantize_tensors([hand])[0].numpy(), got)


def test_dtype_names_of_every_output_dtype() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert dtype_name(dtype) == str(dtype).removeprefix("torch.")
    for name in ("float16", "float32", "float64"):
        assert dtype_name(np.dtype(name)) == dtype_name(getattr(np, name)) == name
    assert dtype_max(torch.bfloat16) == float(torch.finfo(torch.bfloat16).max)
    assert dtype_max(torch.float32) == dtype_max(np.float64) == dtype_max("float32") == np.inf


def test_hand_made_grid_beyond_float32_is_a_range_error() -> None:
    codes = np.array([[1, 1]], np.int8)
    qt = squant_rs.QuantizedTensor(
        codes, np.array([1e-45], np.float32), np.zeros(1, np.float32), 4, "squant", np.float32, 0, 0
    )
    with pytest.raises(squant_rs.WeightRangeError, match="output channel 0"):
        qt.dequantize()


def _hand_made_cases() -> dict[str, tuple[object, type, str]]:
    """name -> (QuantizedTensor, expected exception, message pattern)."""
    w = np.random.default_rng(5).standard_normal((6, 5, 3)).astype(np.float32)
    q = squant_rs.quantize_tensor(w, 4)
    t = squant_rs.quantize_tensor(torch.from_numpy(w), 4)
    QT = squant_rs.QuantizedTensor
    f32 = np.dtype(np.float32)
    err, dt = squant_rs.InvalidArgumentError, squant_rs.UnsupportedDtypeError
    return {
        "float64 scale": (
            QT(q.codes, q.scale.astype(np.float64), q.zero_point, 4, "squant", f32, 0, 0),
            TypeError,
            r"QuantizedTensor\.scale must be float32, got float64",
        ),
        "int16 codes": (
            QT(q.codes.astype(np.int16), q.scale, q.zero_point, 4, "squant", f32, 0, 0),
            TypeError,
            r"QuantizedTensor\.codes must be int8",
        ),
        "codes as a list": (
            QT(q.codes.tolist(), q.scale, q.zero_point, 4, "squant", f32, 0, 0),
            TypeError,
            r"QuantizedTensor\.codes must be a numpy array or a torch tensor, got list",
        ),
        "1-d codes": (
            QT(q.codes[0, 0], q.scale, q.zero_point, 4, "squant", f32, 0, 0),
            err,
            r"QuantizedTensor\.codes must have 2\+ dimensions",
        ),
        "bits 0": (
            QT(q.codes, q.scale, q.zero_point, 0, "squant", f32, 0, 0),
            err,
            r"QuantizedTensor\.bits must be an integer in 2\.\.8, got 0",
        ),
        "bits 9": (
            QT(q.codes, q.scale, q.zero_point, 9, "squant", f32, 0, 0),
            err,
            r"QuantizedTensor\.bits must be an integer in 2\.\.8, got 9",
        ),
        "short zero point": (
            QT(q.codes, q.scale, q.zero_point[:3], 4, "squant", f32, 0, 0),
            err,
            r"QuantizedTensor\.zero_point must have shape \(6,\)",
        ),
        "int8 output dtype": (
            QT(q.codes, q.scale, q.zero_point, 4, "squant", np.dtype(np.int8), 0, 0),
            dt,
            r"QuantizedTensor\.dtype must be numpy float16, float32 or float64",
        ),
        "torch scale with numpy codes": (
            QT(q.codes, t.scale, q.zero_point, 4, "squant", f32, 0, 0),
            TypeError,
            r"QuantizedTensor\.scale must be a numpy array like codes, got Tensor",
        ),
        "torch float64 scale": (
            QT(t.codes, t.scale.double(), t.zero_point, 4, "squant", torch.float32, 0, 0),
            TypeError,
            r"QuantizedTensor\.scale must be float32, got torch\.float64",
        ),
        "torch numpy output dtype": (
            QT(t.codes, t.scale, t.zero_point, 4, "squant", f32, 0, 0),
            dt,
            r"QuantizedTensor\.dtype must be torch float16, bfloat16, float32 or float64",
        ),
        "meta": (
            QT(
                *(a.to("meta") for a in (t.codes, t.scale, t.zero_point)),
                4,
                "squant",
                t.dtype,
                0,
                0,
            ),
            err,
            r"QuantizedTensor\.codes is a meta tensor: it has no values to dequantize",
        ),
        "meta scale": (
            QT(t.codes, t.scale.to("meta"), t.zero_point, 4, "squant", t.dtype, 0, 0),
            err,
            r"QuantizedTensor\.scale is on meta but codes are on cpu",
        ),
        # codes beyond the bits range: float16 clamped to 65504 silently,
        # float32 inf (scale 1e-37), where the grid check passes
        "codes beyond bits": (
            QT(
                np.array([[0, 1], [127, 1]], np.int8),
                np.full(2, 1e-3, np.float32),
                np.zeros(2, np.float32),
                2,
                "squant",
                np.dtype(np.float16),
                0,
                0,
            ),
            err,
            r"QuantizedTensor\.codes must lie in \[-2, 1\] at bits=2: output channel 1 holds "
            r"codes in \[1, 127\]",
        ),
        "codes beyond bits, float32": (
            QT(
                np.array([[127, 1]], np.int8),
                np.array([1e-37], np.float32),
                np.zeros(1, np.float32),
                2,
                "squant",
                f32,
                0,
                0,
            ),
            err,
            r"QuantizedTensor\.codes must lie in \[-2, 1\] at bits=2: output channel 0 holds "
            r"codes in \[1, 127\]",
        ),
        "torch codes below bits": (
            QT(_with_code(t.codes, -9), t.scale, t.zero_point, 4, "squant", t.dtype, 0, 0),
            err,
            r"QuantizedTensor\.codes must lie in \[-8, 7\] at bits=4: output channel 2 holds "
            r"codes in \[-9, -?\d+\]",
        ),
        # scales and zero points that overflow nothing were called "too large
        # to quantize in float32"; sparse fields failed inside torch
        "negative scale": (
            QT(
                q.codes,
                np.where(np.arange(6) == 3, -1.0, q.scale).astype(np.float32),
                q.zero_point,
                4,
                "squant",
                f32,
                0,
                0,
            ),
            squant_rs.WeightRangeError,
            r"^output channel 3: scale -1\.0 is not a positive finite number$",
        ),
        "zero torch scale": (
            QT(t.codes, t.scale * 0, t.zero_point, 4, "squant", t.dtype, 0, 0),
            squant_rs.WeightRangeError,
            r"^output channel 0: scale 0\.0 is not a positive finite number$",
        ),
        "nan zero point": (
            QT(q.codes, q.scale, np.full(6, np.nan, np.float32), 4, "squant", f32, 0, 0),
            squant_rs.WeightRangeError,
            r"^output channel 0: zero point nan is not finite$",
        ),
        "sparse torch codes": (
            QT(t.codes.to_sparse(), t.scale, t.zero_point, 4, "squant", t.dtype, 0, 0),
            err,
            r"QuantizedTensor\.codes must be a dense \(strided\) tensor, got layout "
            r"torch\.sparse_coo",
        ),
        "sparse torch scale": (
            QT(t.codes, t.scale.to_sparse(), t.zero_point, 4, "squant", t.dtype, 0, 0),
            err,
            r"QuantizedTensor\.scale must be a dense \(strided\) tensor",
        ),
    }


def _with_code(codes: torch.Tensor, value: int) -> torch.Tensor:
    """A copy of ``codes`` with one code of channel 2 set to ``value``."""
    out = codes.clone()
    out[2, 1, 0] = value
    return out


def test_quantized_codes_are_not_range_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The O(size) code check is for hand-made instances only."""
    w = np.random.default_rng(5).standard_normal((6, 5, 3)).astype(np.float32)
    q, t = squant_rs.quantize_tensor(w, 4), squant_rs.quantize_tensor(torch.from_numpy(w), 4)

    def refuse(codes: object, bits: int) -> None:
        raise AssertionError("codes checked")

    monkeypatch.setattr(quantized_mod, "check_codes", refuse)
    q.dequantize()
    t.dequantize()
    dequantize_tensors([q, t])
    with pytest.raises(AssertionError, match="codes checked"):
        dataclasses.replace(q, grid_checked=False).dequantize()


@pytest.mark.parametrize("case", list(_hand_made_cases()))
def test_hand_made_fields_are_checked_on_dequantize(case: str) -> None:
    """A hand-made QuantizedTensor with a field of the wrong type or value:
    a clear error naming the field (it was a bare numpy/pyo3 TypeError, an
    AttributeError, "negative shift count", or silently wrong output)."""
    qt, exc, match = _hand_made_cases()[case]
    with pytest.raises(exc, match=match):
        qt.dequantize()  # type: ignore[attr-defined]


def _refused_cases() -> dict[str, object]:
    """name -> a hand-made QuantizedTensor that dequantize() refuses: the
    field cases above, and grids that are not finite in the output dtype."""
    cases = {name: qt for name, (qt, _, _) in _hand_made_cases().items()}
    w = np.random.default_rng(8).standard_normal((4, 6)).astype(np.float32)
    QT = squant_rs.QuantizedTensor
    for r, f16 in (
        (squant_rs.quantize_tensor(w, 4), np.float16),
        (squant_rs.quantize_tensor(torch.from_numpy(w), 4), torch.float16),
    ):
        kind = type(r.codes).__name__
        s, z = r.scale, r.zero_point
        cases[f"{kind} scale 0"] = QT(r.codes, s * 0, z, 4, "squant", r.dtype, 0, 0)
        cases[f"{kind} negative scale"] = QT(r.codes, -s, z, 4, "squant", r.dtype, 0, 0)
        cases[f"{kind} infinite zero point"] = QT(
            r.codes, s, z + float("inf"), 4, "squant", r.dtype, 0, 0
        )
        cases[f"{kind} float16 overflow"] = QT(r.codes, s * 1e-30, z, 4, "squant", f16, 0, 0)
    return cases


@pytest.mark.parametrize("case", list(_refused_cases()))
def test_dequantize_tensors_refuses_what_dequantize_refuses(case: str) -> None:
    """dequantize_tensors is dequantize() bit for bit, so a hand-made
    instance gets its exceptions too (with the weight's position): it
    checked nothing, and returned inf or wrong values for a zero or negative
    scale or an infinite zero point, clamped a float16 overflow silently, or
    failed inside on a field of the wrong type."""
    bad = _refused_cases()[case]
    with pytest.raises((TypeError, ValueError)) as want:
        bad.dequantize()  # type: ignore[attr-defined]
    ok = squant_rs.quantize_tensor(np.ones((2, 3), np.float32), 4)
    with pytest.raises((TypeError, ValueError)) as got:
        dequantize_tensors([ok, bad])  # type: ignore[list-item]
    assert type(got.value) is type(want.value)
    assert str(got.value) == f"weight 1: {want.value}"


@pytest.mark.parametrize("threads", [True, 0, 1025, 1.5, "2"])
def test_dequantize_tensors_checks_threads_as_dequantize_does(threads: object) -> None:
    q = squant_rs.quantize_tensor(torch.randn(4, 6), 4)
    with pytest.raises((TypeError, ValueError)) as want:
        q.dequantize(threads=threads)  # type: ignore[arg-type]
    with pytest.raises(type(want.value), match=f"^{re.escape(str(want.value))}$"):
        dequantize_tensors([q], threads=threads)  # type: ignore[arg-type]


def test_hand_made_scale_requiring_grad_dequantizes() -> None:
    w = np.random.default_rng(6).standard_normal((4, 3, 3)).astype(np.float32)
    t = squant_rs.quantize_tensor(torch.from_numpy(w), 4)
    qt = squant_rs.QuantizedTensor(
        t.codes,
        t.scale.clone().requires_grad_(),
        t.zero_point.clone().requires_grad_(),
        4,
        "squant",
        torch.float32,
        0,
        0,
    )
    out = qt.dequantize()
    assert not out.requires_grad
    assert torch.equal(out, t.dequantize())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("field", ["codes", "scale", "zero_point"])
def test_hand_made_negative_views_dequantize(field: str, dtype: str) -> None:
    """A hand-made instance whose codes, scale or zero point is a negative
    view (``torch._neg_view``, what ``-t`` may give lazily): the same values
    as the plain tensors, not "Can't call numpy() on Tensor that has
    negative bit set" from the CPU path."""
    w = np.random.default_rng(7).standard_normal((5, 4, 3)).astype(np.float32)
    t = squant_rs.quantize_tensor(torch.from_numpy(w), 4)
    fields = {"codes": t.codes, "scale": t.scale, "zero_point": t.zero_point}
    plain = squant_rs.QuantizedTensor(*fields.values(), 4, "squant", getattr(torch, dtype), 0, 0)
    fields[field] = torch._neg_view(-fields[field])
    assert fields[field].is_neg()
    qt = squant_rs.QuantizedTensor(*fields.values(), 4, "squant", getattr(torch, dtype), 0, 0)
    out = qt.dequantize()
    assert out.dtype == getattr(torch, dtype)
    assert torch.equal(out, plain.dequantize())
    (batch,) = dequantize_tensors([qt])  # was torch's RuntimeError from numpy()
    assert batch.dtype == out.dtype and torch.equal(batch, out)


# --------------------------------------------------------------------------
# float16 / bfloat16 in blocks of channels (no full float32 copy)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_block_paths_equal_one_call(monkeypatch, dtype: str) -> None:
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((37, 5, 3, 3)).astype(np.float32)
    tw = torch.from_numpy(w32).to(getattr(torch, dtype))
    want = squant_rs.quantize_tensor(tw.float(), 4)  # one call on float32 values
    monkeypatch.setattr(quantized_mod, "BLOCK_ELEMENTS", 2 * 45)  # blocks of 2 channels
    inputs = [tw] + ([tw.numpy()] if dtype == "float16" else [])
    for w in inputs:
        got = squant_rs.quantize_tensor(w, 4)
        codes = got.codes if isinstance(got.codes, np.ndarray) else got.codes.numpy()
        assert np.array_equal(codes, want.codes.numpy())
        assert (got.k_flips, got.c_flips) == (want.k_flips, want.c_flips)
        back = got.dequantize(threads=1)
        ref = want.dequantize().to(tw.dtype)
        back_t = back if isinstance(back, torch.Tensor) else torch.from_numpy(back)
        assert back_t.dtype == tw.dtype and torch.equal(back_t, ref)
    # An error in a later block names the channel in the whole weight.
    bad = tw.clone()
    bad[7, 1, 1, 1] = float("nan")
    with pytest.raises(squant_rs.NonFiniteWeightError, match="output channel 7 "):
        squant_rs.quantize_tensor(bad, 4)
    if dtype == "float16":
        with pytest.raises(squant_rs.NonFiniteWeightError, match="output channel 7 "):
            squant_rs.quantize_tensor(bad.numpy(), 4)


# --------------------------------------------------------------------------
# item 6: tied weights and skip


def _tied_pair() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    return model


def test_tied_weights_are_quantized_once_and_reported_under_every_name() -> None:
    model = _tied_pair()
    qmodel, report = squant_rs.quantize_model(model, return_report=True)
    assert [(r.name, r.tied_to) for r in report.layers] == [("0", None), ("2", "0")]
    assert report.layers[0].rel_error == report.layers[1].rel_error
    assert report.params == 64 and report.k_flips == report.layers[0].k_flips
    assert qmodel[0].weight is qmodel[2].weight  # still tied in the copy
    want = squant_rs.quantize_tensor(model[0].weight.detach(), 4).dequantize()
    assert torch.equal(qmodel[2].weight, want)
    assert "2 (tied to 0)" in str(report)


@pytest.mark.parametrize("skip", ["0", "2"])
def test_skip_of_any_tied_layer_keeps_the_shared_weight_float(skip: str) -> None:
    model = _tied_pair()
    qmodel, report = squant_rs.quantize_model(model, skip=skip, return_report=True)
    assert report.layers == [] and report.skipped == ["0", "2"]
    other = "2" if skip == "0" else "0"
    assert report.notes == [
        f"{other}: shares its weight with {skip!r}, which is left float; left float"
    ]
    assert torch.equal(qmodel[0].weight, model[0].weight)
    assert torch.equal(qmodel[2].weight, model[0].weight)


def test_linear_tied_to_embedding_stays_float() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 12, bias=False)
            self.head.weight = self.emb.weight

    model = LM()
    qmodel, report = squant_rs.quantize_model(model, return_report=True)
    assert [r.name for r in report.layers] == ["body"]
    assert report.skipped == ["head"] and "emb.weight (Embedding)" in report.notes[0]
    assert torch.equal(qmodel.emb.weight, model.emb.weight)
    assert "note: head: shares its weight with emb.weight" in str(report)


# --------------------------------------------------------------------------
# item 9: un-copyable models, empty layers, too many dimensions


def test_old_weight_norm_model_is_a_clear_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old API is deprecated
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(squant_rs.InvalidArgumentError, match="cannot be deep-copied.*weight_norm"):
        squant_rs.quantize_model(model)


@pytest.mark.parametrize(
    "kwargs",
    [{"recipe": "paper"}, {}, {"fold_bn": False}, {"abits": 8, "input_shape": (2, 3, 5, 5)}],
    ids=["paper", "squant+", "squant+-no-fold", "squant+-abits"],
)
def test_meta_model_is_a_clear_error(kwargs: dict[str, object]) -> None:
    """A model on the meta device (shapes, no values): squant+ read its
    BatchNorm statistics before the weight check and raised torch's
    NotImplementedError ("Cannot copy out of meta tensor"); every recipe
    now gives the weight check's error first."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    with pytest.raises(squant_rs.InvalidArgumentError, match="0: weight is a meta tensor"):
        squant_rs.quantize_model(model, 4, **kwargs)  # type: ignore[arg-type]


def test_meta_batchnorm_is_a_clear_error() -> None:
    """Real weights but a BatchNorm on the meta device: named, not torch's
    NotImplementedError."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, device="meta")).eval()
    with pytest.raises(squant_rs.InvalidArgumentError, match="1: BatchNorm .* is a meta tensor"):
        squant_rs.quantize_model(model, 4)


@pytest.mark.parametrize("layer", [0, 3])
def test_meta_bias_is_a_clear_error(layer: int) -> None:
    """Real weights but a bias on the meta device: named (squant+'s bias
    correction raised torch's NotImplementedError from its write)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model[layer].bias = nn.Parameter(torch.empty(4, device="meta"))
    with pytest.raises(squant_rs.InvalidArgumentError, match=f"{layer}: bias is a meta tensor"):
        squant_rs.quantize_model(model.eval(), 8)


def test_meta_bias_of_a_skipped_layer_is_not_folded_into() -> None:
    """A skipped layer with a meta bias and a BatchNorm after it: the BN is
    not folded into it (folding raised torch's NotImplementedError)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model[0].bias = nn.Parameter(torch.empty(4, device="meta"))
    q, rep = squant_rs.quantize_model(model.eval(), 8, skip="0", return_report=True)
    assert isinstance(q[1], nn.BatchNorm2d) and q[0].bias.is_meta
    assert [r.name for r in rep.layers] == ["3"]


def test_uncopyable_model_is_a_clear_error() -> None:
    class Locked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(squant_rs.InvalidArgumentError, match=r"cannot be deep-copied \(TypeError"):
        squant_rs.quantize_model(Locked())


def test_zero_element_linear_is_skipped_with_a_note() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        empty = nn.Linear(0, 4)
    model = nn.Sequential(empty, nn.Linear(4, 3))
    qmodel, report = squant_rs.quantize_model(model, return_report=True)
    assert [r.name for r in report.layers] == ["1"]
    assert report.skipped == ["0"]
    assert report.notes == ["0: weight of shape (4, 0) has no element, left as is"]
    assert qmodel[0].weight.shape == (4, 0)


def test_more_than_64_dimensions_is_a_clear_error() -> None:
    t = torch.ones([2, 2] + [1] * 63)
    for backend in ("rust", "torch"):
        with pytest.raises(squant_rs.InvalidArgumentError, match="65 dimensions, more than"):
            squant_rs.quantize_tensor(t, backend=backend)
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 1: weight has 65 dim"):
        squant_rs.quantize_tensors([torch.ones(2, 2), t])
    deep: object = [[1.0, 2.0]]
    for _ in range(64):
        deep = [deep]
    with pytest.raises(TypeError):  # numpy cannot even hold it
        squant_rs.quantize_tensor(deep)


# --------------------------------------------------------------------------
# item 11: no numpy warnings, one error class for float64 beyond float32


BIG64 = np.array([[1e39, 0.0], [1.0, 2.0]])


@pytest.mark.parametrize(
    "call",
    [
        lambda: squant_rs.quantize_tensor(BIG64),
        lambda: squant_rs.quantize_tensor(torch.from_numpy(BIG64)),
        lambda: squant_rs.quantize_tensor(torch.from_numpy(BIG64), backend="torch"),
        lambda: squant_rs.quantize_tensors([BIG64]),
        lambda: squant_rs.quantize_tensors([torch.from_numpy(BIG64)]),
        lambda: squant_rs.quantize_tensors([torch.from_numpy(BIG64)], backend="torch"),
        lambda: squant_rs.quantize_model(nn.Sequential(_linear(BIG64, torch.float64))),
    ],
    ids=["numpy", "torch-rust", "torch-torch", "batch", "batch-rust", "batch-torch", "model"],
)
def test_float64_beyond_float32_is_a_range_error_everywhere(call) -> None:
    # pytest turns any numpy RuntimeWarning into an error: none may come first.
    with pytest.raises(squant_rs.WeightRangeError, match="exceeds the float32 range"):
        call()


def test_rel_error_is_finite_for_huge_and_tiny_weights() -> None:
    rng = np.random.default_rng(1)
    for magnitude in (1e20, 1e-30, 1.0):
        w = (rng.standard_normal((16, 64)) * magnitude).astype(np.float32)
        w_hat = w * np.float32(1.001)
        want = np.linalg.norm(w_hat.astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64))
        assert relative_error(w, w_hat) == pytest.approx(want, rel=1e-6)
        assert relative_error(torch.from_numpy(w), torch.from_numpy(w_hat)) == pytest.approx(
            want, rel=1e-6
        )
    model = nn.Sequential(_linear((rng.standard_normal((8, 8)) * 1e20).astype(np.float32)))
    _, report = squant_rs.quantize_model(model, return_report=True)
    assert 0 < report.layers[0].rel_error < 0.2


# --------------------------------------------------------------------------
# item 12: threads= takes precedence over a bad SQUANT_NUM_THREADS


def test_explicit_threads_override_a_bad_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SQUANT_NUM_THREADS", "lots")
    w = np.random.default_rng(2).standard_normal((64, 600)).astype(np.float32)
    qt = squant_rs.quantize_tensor(w, threads=2)
    assert qt.dequantize(threads=2).shape == w.shape
    tq = squant_rs.quantize_tensor(torch.from_numpy(w), threads=2)
    assert tq.dequantize(threads=2).shape == w.shape
    model = nn.Sequential(_linear(w))
    squant_rs.quantize_model(model, threads=2)
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(model, path, threads=2)
    # Without threads=, the environment is read and reported as itself.
    for call in (
        qt.dequantize,
        tq.dequantize,
        lambda: squant_rs.quantize_tensor(w),
        lambda: squant_rs.load_quantized(path),
    ):
        with pytest.raises(squant_rs.InvalidArgumentError, match="SQUANT_NUM_THREADS") as info:
            call()
        assert not isinstance(info.value, squant_rs.FormatError)


# --------------------------------------------------------------------------
# item 14: exceptions cross processes


def _raise_in_worker() -> None:
    native.resolve_threads(0)  # raised by the Rust glue


def test_exceptions_pickle_with_their_public_module() -> None:
    for cls in ERRORS:
        assert cls.__module__ == "squant_rs" and getattr(squant_rs, cls.__name__) is cls
        back = pickle.loads(pickle.dumps(cls("boom")))
        assert type(back) is cls and str(back) == "boom"
    assert native.InvalidArgumentError is squant_rs.InvalidArgumentError
    with pytest.raises(squant_rs.InvalidArgumentError) as info:
        _raise_in_worker()
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is squant_rs.InvalidArgumentError and str(back) == str(info.value)


def test_exception_reaches_the_parent_process() -> None:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_raise_in_worker)
        with pytest.raises(squant_rs.InvalidArgumentError, match="threads must be"):
            future.result(timeout=120)


# --------------------------------------------------------------------------
# item 15: huge broadcast views fail up front on every backend


def test_huge_broadcast_view_is_a_memory_error_at_once() -> None:
    view = torch.ones(1, 1).expand(2**28, 2**28)
    for backend in ("rust", "torch"):
        with pytest.raises(MemoryError, match="GiB"):
            squant_rs.quantize_tensor(view, backend=backend)
    with pytest.raises(MemoryError, match="weight 0: "):
        squant_rs.quantize_tensors([view], backend="torch")
    half = torch.ones(1, 1, dtype=torch.float16).expand(2**28, 2**28)
    with pytest.raises(MemoryError):
        squant_rs.quantize_tensor(half)
    with pytest.raises(MemoryError):
        squant_rs.quantize_tensor(np.broadcast_to(np.float16(1), (2**28, 2**28)))


def test_channel_limit_is_checked_before_the_torch_backend_runs() -> None:
    view = torch.ones(1, 1).expand(2, 2**32)
    with pytest.raises(squant_rs.InvalidArgumentError, match="more than the supported"):
        squant_rs.quantize_tensor(view, backend="torch")


# --------------------------------------------------------------------------
# item 18: skip patterns that match nothing, models without layers


def test_unmatched_skip_pattern_warns(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="skip pattern 'fc' matches no Conv/Linear layer"):
        squant_rs.quantize_model(model, skip=["fc", "0"])
    with pytest.warns(UserWarning, match="skip pattern 'features.0.\\*' matches no"):
        squant_rs.save_quantized(model, tmp_path / "a.safetensors", skip="features.0.*")
    with pytest.warns(UserWarning, match="skip pattern 'fc' matches no tensor"):
        squant_rs.save_quantized(model.state_dict(), tmp_path / "b.safetensors", skip="fc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squant_rs.quantize_model(model, skip=["0", "2"])  # both match: silent
        squant_rs.save_quantized(model.state_dict(), tmp_path / "c.safetensors", skip="2")


def test_model_without_layers_warns(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"\(Sequential\) has no Conv1d/2d/3d or Linear layer"):
        squant_rs.quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.warns(UserWarning, match="state dict has no tensor to quantize"):
        squant_rs.save_quantized({"bias": torch.ones(3)}, tmp_path / "n.safetensors")


# --------------------------------------------------------------------------
# item 20: the public surface


def test_public_names_and_docstrings() -> None:
    names = dir(squant_rs)
    assert "annotations" not in names
    for name in ("DEFAULT_INPUT_SHAPE", "default_s_sigma", "select_state_dict"):
        assert name in squant_rs.__all__ and hasattr(squant_rs, name)
    for fn in (squant_rs.quantize_tensor, squant_rs.quantize_tensors, squant_rs.quantize_model):
        doc = fn.__doc__ or ""
        assert "Returns:" in doc and "Raises:" in doc, fn.__name__
    # Every squant_rs.NAME a public docstring mentions exists.
    for obj in (squant_rs.quantize_model, squant_rs.save_quantized, squant_rs.quantize_tensor):
        for name in re.findall(r"squant_rs\.(\w+)", obj.__doc__ or ""):
            assert hasattr(squant_rs, name), name


# --------------------------------------------------------------------------
# item 16: the repository stands alone


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    keep = (".md", ".py", ".pyi", ".rs", ".toml", ".sh", ".txt")
    return [ROOT / p for p in out if p.endswith(keep) and (ROOT / p).is_file()]


def test_nothing_points_outside_the_repository() -> None:
    assert (ROOT / "docs" / "algorithm.md").is_file()
    # (Written with classes so that this line does not match itself.)
    pattern = re.compile(r"S[P]EC\b|\.\./shar[e]d|shar[e]d/S|/wor[k]/")
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _tracked_text_files()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_readme_links_work_on_a_package_index() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    # A relative link or image breaks on a package index page.
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert [t for t in targets if not t.startswith(("https://", "http://", "#"))] == []
    assert "docs/algorithm.md" in text


def test_blockwise_relative_error_matches_the_full_one() -> None:
    """save_quantized's report error, taken a block of channels at a time
    (no weight-sized dequantized copy), equals the one of the whole weight."""
    from squant_rs.model.layers import quantized_relative_error, relative_error

    w = np.random.default_rng(3).standard_normal((600, 64, 3, 3)).astype(np.float32)
    for weight in (w, w.astype(np.float16)):
        qt = squant_rs.quantize_tensor(weight, 4)
        full = relative_error(weight, qt.dequantize())
        assert quantized_relative_error(weight, qt) == pytest.approx(full, rel=1e-5)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(w)
    qt = squant_rs.quantize_tensor(t, 3)
    assert quantized_relative_error(t, qt) == pytest.approx(
        relative_error(t, qt.dequantize()), rel=1e-5
    )


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_checkpoint_entries_named_in_storage_errors(tmp_path) -> None:
    """Storing a state dict: a negative-bit view (lazily negated, which
    quantize_tensor takes) is stored by its values (it raised torch's
    RuntimeError), and entries that cannot be stored -- complex, quantized,
    meta -- are refused naming the entry (the messages named neither the
    entry nor, for meta, squant-rs: torch's NotImplementedError)."""
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 4)
    bias = torch.randn(5)
    out = tmp_path / "x.safetensors"
    squant_rs.save_quantized({"a.weight": w, "bias": torch._neg_view(-bias)}, out)
    loaded = squant_rs.load_quantized(out)
    assert torch.equal(loaded["bias"], bias)
    bad = {
        "c": (torch.randn(3, dtype=torch.cfloat), squant_rs.UnsupportedDtypeError),
        "q": (
            torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
            squant_rs.UnsupportedDtypeError,
        ),
        "m": (torch.empty(4, device="meta"), squant_rs.InvalidArgumentError),
    }
    for key, (value, kind) in bad.items():
        with pytest.raises(kind, match=f"state dict entry '{key}'"):
            squant_rs.save_quantized({"a.weight": w, key: value}, tmp_path / f"{key}.safetensors")
        assert not (tmp_path / f"{key}.safetensors").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_checkpoint_cli_messages(tmp_path, capsys) -> None:
    """The Python CLI on torch checkpoints: a negative-bit entry is read
    (it was refused); an entry that cannot be stored is named with the
    file; a non-string key is called a key (it said 'is a Tensor, not a
    tensor'); a TorchScript archive is called one (torch's truncated text
    suggested weights_only=False)."""
    torch = pytest.importorskip("torch")
    from squant_rs.cli import main

    w = torch.randn(16, 8)
    torch.save({"a.weight": torch._neg_view(-w)}, tmp_path / "neg.pt")
    assert main(["quantize", "-q", str(tmp_path / "neg.pt"), str(tmp_path / "n.safetensors")]) == 0
    want = squant_rs.quantize_tensor(w, 4).dequantize()
    assert torch.equal(squant_rs.load_quantized(tmp_path / "n.safetensors")["a.weight"], want)
    cases = {
        "cplx.pt": ({"a.weight": w, "c": torch.randn(3, dtype=torch.cfloat)}, "entry 'c'"),
        "key.pt": ({1: w}, "checkpoint key 1 is a int, not a string"),
    }
    for name, (obj, text) in cases.items():
        torch.save(obj, tmp_path / name)
        assert main(["quantize", "-q", str(tmp_path / name), str(tmp_path / "o.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and str(tmp_path / name) in err, err
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), tmp_path / "ts.pt")
    assert main(["quantize", "-q", str(tmp_path / "ts.pt"), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "TorchScript archive" in err and "weights_only=False" not in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_bytes_output_path_is_a_type_error(tmp_path) -> None:
    """A bytes output path: TypeError, as load_quantized gives (it was an
    InvalidArgumentError saying b'.safetensors' is not .safetensors)."""
    with pytest.raises(TypeError, match="output path must be a str"):
        squant_rs.save_quantized(
            {"a.weight": np.ones((4, 4), np.float32)},
            bytes(str(tmp_path / "o.safetensors"), "utf-8"),
        )


def test_quantize_checkpoint_is_public() -> None:
    """The README names quantize_checkpoint beside save_quantized and
    load_quantized; it was only in squant_rs.formats.safetensors."""
    from squant_rs.formats.safetensors import quantize_checkpoint

    assert squant_rs.quantize_checkpoint is quantize_checkpoint
    assert "quantize_checkpoint" in squant_rs.__all__


def test_inspect_and_verify_quantized_are_public(tmp_path) -> None:
    """docs/format.md and the README name inspect_quantized and
    verify_quantized beside load_quantized; they were only in
    squant_rs.formats.safetensors (``from squant_rs import
    inspect_quantized`` failed)."""
    from squant_rs.formats import safetensors

    for name in ("inspect_quantized", "verify_quantized"):
        assert getattr(squant_rs, name) is getattr(safetensors, name)
        assert name in squant_rs.__all__
    out = tmp_path / "q.safetensors"
    squant_rs.save_quantized({"a.weight": np.ones((4, 4), np.float32)}, out)
    assert [t.name for t in squant_rs.inspect_quantized(out).quantized] == ["a.weight"]
    squant_rs.verify_quantized(out)


def test_file_functions_document_what_they_return_and_raise(tmp_path) -> None:
    """The classes that inspect_quantized and quantize_checkpoint return are
    importable from squant_rs (QuantizedFileInfo, TensorInfo and
    CheckpointResult were only in squant_rs.formats.safetensors), and
    inspect_quantized / verify_quantized / load_quantized list the
    InvalidArgumentError they raise for a FIFO, a device or a directory
    (their docstrings named only FormatError and OSError)."""
    import re

    from squant_rs.formats import safetensors

    for name in ("QuantizedFileInfo", "TensorInfo", "CheckpointResult"):
        assert name in squant_rs.__all__ and getattr(squant_rs, name) is getattr(safetensors, name)
    fns = (
        squant_rs.inspect_quantized,
        squant_rs.verify_quantized,
        squant_rs.load_quantized,
        squant_rs.quantize_checkpoint,
    )
    for fn in fns:
        doc = fn.__doc__ or ""
        returns = doc.split("Returns:")[1].split("Raises:")[0] if "Returns:" in doc else ""
        for cls in re.findall(r":class:`(\w+)`", returns):
            assert cls in squant_rs.__all__, (fn.__name__, cls)
        raises = doc.split("Raises:")[1]
        assert "InvalidArgumentError:" in raises and "FIFO" in raises, fn.__name__
    (tmp_path / "d").mkdir()
    for fn in fns[:3]:
        with pytest.raises(squant_rs.InvalidArgumentError, match="is a directory, not a regular"):
            fn(tmp_path / "d")
    out = tmp_path / "q.safetensors"
    squant_rs.save_quantized({"a.weight": np.ones((4, 4), np.float32)}, out)
    info = squant_rs.inspect_quantized(out)
    assert isinstance(info, squant_rs.QuantizedFileInfo)
    assert all(isinstance(t, squant_rs.TensorInfo) for t in info.tensors)


@pytest.mark.parametrize("abits", [None, 8])
def test_a_quantized_model_is_not_quantized_again_by_save_or_export(tmp_path, abits) -> None:
    """save_quantized / export_onnx quantize a float model: given what
    quantize_model returned, they quantized its weights a second time
    (2687 of 5760 elements of a Linear changed at 4 bits) and dropped its
    activation quantizers without a word. Now a clear error, nothing written."""
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).eval()
    q = squant_rs.quantize_model(model, 4, abits, recipe="paper", input_shape=(2, 3, 8, 8))
    lost = "and its activation quantizers lost" if abits else "a second time;"
    out = tmp_path / "q.safetensors"
    with pytest.raises(squant_rs.InvalidArgumentError, match="output of quantize_model") as e:
        squant_rs.save_quantized(q, out, 4)
    assert lost in str(e.value) and not out.exists()
    squant_rs.save_quantized(model, out, 4)  # the float model: as before
    if importlib.util.find_spec("onnx") is not None:
        path = tmp_path / "q.onnx"
        with pytest.raises(squant_rs.InvalidArgumentError, match="export_onnx quantizes"):
            squant_rs.export_onnx(q, path, torch.rand(1, 3, 8, 8), 8)
        assert not path.exists()
