"""The torch adapter and both backends: Rust (CPU, numpy buffers) against
the vectorized torch path, on CPU here and on CUDA where a GPU exists."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import squant_rs

from conftest import DISTRIBUTIONS, make_weight, seed_for

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

SHAPES = [
    (16, 24),  # Linear
    (8, 6, 5),  # Conv1d
    (12, 10, 3, 3),  # Conv2d
    (16, 1, 3, 3),  # depthwise
    (12, 4, 3, 3),  # grouped (IC / groups = 4)
    (24, 16, 1, 1),  # 1x1
    (4, 3, 3, 3, 3),  # Conv3d
    (5, 7, 7, 7),  # odd sizes, 7x7
    (1, 1, 1),
    (3, 130, 1),  # long channels at K = 1
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _both(w: torch.Tensor, bits: int, mode: str) -> tuple[object, object]:
    a = squant_rs.quantize_tensor(w, bits, mode, backend="rust")
    b = squant_rs.quantize_tensor(w, bits, mode, backend="torch")
    return a, b


def _assert_same(a: squant_rs.QuantizedTensor, b: squant_rs.QuantizedTensor) -> None:
    assert a.codes.dtype == b.codes.dtype == torch.int8
    assert torch.equal(a.codes.cpu(), b.codes.cpu())
    assert torch.equal(a.scale.cpu(), b.scale.cpu())
    assert torch.equal(a.zero_point.cpu(), b.zero_point.cpu())
    assert (a.k_flips, a.c_flips) == (b.k_flips, b.c_flips)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_rust_and_torch_agree_on_cpu(shape: tuple[int, ...], dist: str) -> None:
    rng = np.random.default_rng(seed_for("backends", shape, dist))
    for bits in (2, 4, 7):
        w = torch.from_numpy(make_weight(rng, shape, dist, bits=bits))
        for mode in squant_rs.MODES:
            _assert_same(*_both(w, bits, mode))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip(dtype: torch.dtype) -> None:
    w = (torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    a, b = _both(w, 4, "squant")
    _assert_same(a, b)
    assert a.codes.shape == w.shape
    d = a.dequantize()
    assert d.dtype == dtype and d.shape == w.shape and d.device == w.device
    assert torch.equal(d, b.dequantize())
    # float32 arithmetic whatever the input dtype: same codes as float32 input.
    c = squant_rs.quantize_tensor(w.to(torch.float32), 4)
    assert torch.equal(c.codes, a.codes)


def test_auto_backend_and_zero_copy() -> None:
    w = torch.randn(32, 16, 3, 3)
    qt = squant_rs.quantize_tensor(w, 4)  # CPU -> Rust
    ref = squant_rs.quantize_tensor(w.numpy(), 4)
    assert torch.equal(qt.codes, torch.from_numpy(ref.codes))
    # A contiguous float32 CPU tensor is handed to Rust as a view.
    from squant_rs.torch.adapter import to_numpy_f32

    assert to_numpy_f32(w).ctypes.data == w.data_ptr()


def test_input_untouched_and_grad_tensors() -> None:
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    before = w.detach().clone()
    for backend in ("rust", "torch"):
        qt = squant_rs.quantize_tensor(w, 4, backend=backend)
        assert not qt.dequantize().requires_grad
    assert torch.equal(w.detach(), before)


def test_non_contiguous_tensor() -> None:
    w = torch.randn(9, 8, 3, 3)
    t = w.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not t.is_contiguous()
    for backend in ("rust", "torch"):
        a = squant_rs.quantize_tensor(t, 4, backend=backend)
        b = squant_rs.quantize_tensor(w, 4, backend=backend)
        assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("backend", ["rust", "torch"])
def test_bad_torch_inputs(backend: str) -> None:
    w = torch.randn(4, 3, 3, 3)
    w[2, 1, 0, 0] = float("nan")
    with pytest.raises(squant_rs.NonFiniteWeightError, match="channel 2"):
        squant_rs.quantize_tensor(w, 4, backend=backend)
    with pytest.raises(TypeError, match="int32"):
        squant_rs.quantize_tensor(torch.ones(4, 4, dtype=torch.int32), 4, backend=backend)
    with pytest.raises(ValueError, match="2 dimensions"):
        squant_rs.quantize_tensor(torch.ones(4), 4, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        squant_rs.quantize_tensor(torch.ones(0, 4), 4, backend=backend)
    with pytest.raises(ValueError, match="bits"):
        squant_rs.quantize_tensor(torch.ones(4, 4), 9, backend=backend)
    big = torch.full((2, 3), 1e32)
    with pytest.raises(squant_rs.WeightRangeError, match="channel 0"):
        squant_rs.quantize_tensor(big, 4, backend=backend)


def _bad_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, value, where in (
        ("nan", float("nan"), (2, 9)),
        ("inf", float("inf"), (1, 4)),
        ("-inf", -float("inf"), (3, 26)),
    ):
        w = torch.randn(4, 27, generator=g)
        w[where] = value
        out[name] = w.view(4, 3, 3, 3)
    out["nan-and-big"] = torch.full((3, 5), 1e32)
    out["nan-and-big"][2, 1] = float("nan")
    out["too-large"] = torch.full((2, 3), 1e32)
    w = torch.randn(3, 4, generator=g)
    w[1, 0], w[1, 1] = 3e38, -3e38  # mx - mn overflows
    out["range-overflow"] = w
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w[1, 2] = 1e300
    out["float64-beyond-float32"] = w
    out["float16-inf"] = torch.randn(3, 4, generator=g).half()
    out["float16-inf"][2, 3] = float("inf")
    out["bfloat16-nan"] = torch.randn(3, 4, generator=g).bfloat16()
    out["bfloat16-nan"][0, 0] = float("nan")
    return out


def _force_strategy(monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    """Make the torch backend take its ``"cpu"`` or ``"dense"`` strategy."""
    from squant_rs.torch import backend as tb

    monkeypatch.setattr(
        tb,
        "quantize_torch",
        lambda w, bits, mode, *, check=None, **kw: tb._quantize(
            w, bits, mode, on_cpu=strategy == "cpu", check=check, **kw
        ),
    )


@pytest.mark.parametrize("strategy", ["cpu", "dense"])
@pytest.mark.parametrize("name", list(_bad_weights()))
def test_torch_value_errors(monkeypatch: pytest.MonkeyPatch, strategy: str, name: str) -> None:
    """The torch path raises exactly what the full value check raises (the
    backend calls it only when its own per-channel test flags a channel,
    after the levels on the dense strategy) and leaves the input alone."""
    from squant_rs.torch.adapter import _check_values_torch

    _force_strategy(monkeypatch, strategy)
    w = _bad_weights()[name]
    # The Rust backend's error: the torch path must raise the very same.
    with pytest.raises(squant_rs.SquantError) as rust:
        squant_rs.quantize_tensor(w, 4, backend="rust")
    devices = ["cpu"] + (["cuda"] if CUDA else [])
    for device in devices:
        wd = w.to(device)
        before = wd.clone()
        with pytest.raises(squant_rs.SquantError) as want:
            _check_values_torch(wd.float(), 4, wd if wd.dtype == torch.float64 else None)
        assert (type(want.value), str(want.value)) == (type(rust.value), str(rust.value))
        for mode in squant_rs.MODES:
            with pytest.raises(squant_rs.SquantError) as got:
                squant_rs.quantize_tensor(wd, 4, mode, backend="torch")
            assert type(got.value) is type(want.value)
            assert str(got.value) == str(want.value)
        assert torch.equal(wd.view(-1).view(torch.uint8), before.view(-1).view(torch.uint8))


_TOO_LARGE = "weight values too large to quantize in float32"
_F64 = "a float64 value exceeds the float32 range"
_NONFINITE = "weight contains NaN or infinity in output channel"


def _multi_problem_weights() -> dict[str, tuple[torch.Tensor, type[Exception], str]]:
    """Weights with bad values in several channels (and kinds), each with
    the error that the rule of squant_rs.tensor.validate gives for the
    asymmetric quantizer: the lowest channel with any problem; in it a NaN
    or infinity, then a float64 value beyond float32, then the range."""
    g = torch.Generator().manual_seed(11)
    nonfinite, rng_err = squant_rs.NonFiniteWeightError, squant_rs.WeightRangeError
    out: dict[str, tuple[torch.Tensor, type[Exception], str]] = {}

    def w_(dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    w = w_()
    w[0], w[2, 1] = 1e32, float("nan")
    out["f32-range-then-nan"] = (w, rng_err, f"output channel 0: {_TOO_LARGE}")
    w = w_()
    w[0, 2], w[1] = float("nan"), 1e32
    out["f32-nan-then-range"] = (w, nonfinite, f"{_NONFINITE} 0 (element 2 ")
    w = w_()
    w[0, 0], w[0, -1], w[1, 3] = 3.4e38, -3.4e38, float("inf")
    out["f32-near-max-then-inf"] = (w, rng_err, f"output channel 0: {_TOO_LARGE}")
    w = w_()
    w[1, 0], w[1, 1], w[1, 3] = 3e38, -3e38, -float("inf")
    out["f32-range-and-inf-in-one-channel"] = (w, nonfinite, f"{_NONFINITE} 1 (element 3 ")
    w = w_(torch.float64)
    w[0, 1], w[1, 2] = float("nan"), 1e300
    out["f64-nan-then-beyond-f32"] = (w, nonfinite, f"{_NONFINITE} 0 (element 1 ")
    w = w_(torch.float64)
    w[0, 1], w[2, 0] = 1e300, float("nan")
    out["f64-beyond-f32-then-nan"] = (w, rng_err, f"output channel 0: {_F64}")
    w = w_(torch.float64)
    w[0, 0], w[0, -1], w[1, 2] = 3.4e38, -3.4e38, 1e300
    out["f64-range-then-beyond-f32"] = (w, rng_err, f"output channel 0: {_TOO_LARGE}")
    w = w_(torch.float64)
    w[1, 0], w[1, 3] = -1e300, float("nan")
    out["f64-beyond-f32-and-nan-in-one-channel"] = (w, nonfinite, f"{_NONFINITE} 1 (element 3 ")
    w = w_(torch.float64)
    w[0], w[0, 2] = 1e32, 1e300
    out["f64-range-and-beyond-f32-in-one-channel"] = (w, rng_err, f"output channel 0: {_F64}")
    w = w_(torch.float64, (4, 3, 3, 3))
    w[1, 0, 0, 1], w[1, 2, 1, 0], w[3, 0, 0, 0] = 1e300, float("nan"), 1e32
    out["f64-conv"] = (w, nonfinite, f"{_NONFINITE} 1 (element 21 ")
    w = w_(torch.bfloat16)
    w[1], w[2, 1] = 1e32, float("nan")
    out["bf16-range-then-nan"] = (w, rng_err, f"output channel 1: {_TOO_LARGE}")
    w = w_(torch.float16)
    w[1, 1], w[0, 3] = float("nan"), float("inf")
    out["f16-inf-then-nan"] = (w, nonfinite, f"{_NONFINITE} 0 (element 3 ")
    return out


@pytest.mark.parametrize("strategy", ["cpu", "dense"])
@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("name", list(_multi_problem_weights()))
def test_backends_agree_on_the_first_bad_channel(
    monkeypatch: pytest.MonkeyPatch, strategy: str, quantizer: str, name: str
) -> None:
    """A weight with bad values in several channels: every path -- the Rust
    backend (torch and numpy input), the torch backend's two strategies
    (on CUDA too where there is one), quantize_tensors with either backend
    ("weight 1: " in front) -- raises the same exception with the same
    message, the one of the rule in squant_rs.tensor.validate (the Rust
    backend named another channel than the torch one before, and the
    float64 check ran over the whole weight before any other)."""
    from squant_rs.torch import backend as tb

    monkeypatch.setattr(tb, "_ON_CPU", strategy == "cpu")
    w, kind, message = _multi_problem_weights()[name]

    def error(call: Callable[..., object], *args: object, **kw: object) -> tuple[type, str]:
        with pytest.raises(squant_rs.SquantError) as exc:
            call(*args, 4, quantizer=quantizer, **kw)
        return type(exc.value), str(exc.value)

    def unprefixed(err: tuple[type, str], index: int) -> tuple[type, str]:
        assert err[1].startswith(f"weight {index}: "), err
        return err[0], err[1][len(f"weight {index}: ") :]

    want = error(squant_rs.quantize_tensor, w, backend="rust")
    if quantizer == "asymmetric":
        assert want[0] is kind and want[1].startswith(message), want
    got = {}
    for device in ["cpu"] + (["cuda"] if CUDA else []):
        wd = w.to(device)
        got[f"torch-{device}"] = error(squant_rs.quantize_tensor, wd, backend="torch")
        for backend in ("rust", "torch"):
            batch = [torch.ones(2, 2, device=device), wd]
            err = error(squant_rs.quantize_tensors, batch, backend=backend)
            got[f"batch-{backend}-{device}"] = unprefixed(err, 1)
    if w.dtype != torch.bfloat16:
        got["numpy"] = error(squant_rs.quantize_tensor, w.numpy())
        got["numpy-batch"] = unprefixed(error(squant_rs.quantize_tensors, [w.numpy()]), 0)
    # quantize_model's pass on a layer holding the weight ("w: " in front)
    layer = torch.nn.Linear(1, 1)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    for backend in ("rust", "torch"):
        with pytest.raises(squant_rs.SquantError) as exc:
            squant_rs.quantize_model(
                torch.nn.ModuleDict({"w": layer}),
                4,
                recipe="paper",
                backend=backend,
                quantizer=quantizer,
            )
        assert str(exc.value).startswith("w: "), exc.value
        got[f"model-{backend}"] = (type(exc.value), str(exc.value)[len("w: ") :])
    for path, err in got.items():
        assert err == want, path


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        squant_rs.quantize_tensor(torch.ones(4, 4), 4, backend="cuda")


@pytest.mark.parametrize("backend", [3, None, b"rust", ["rust"]])
def test_backend_of_the_wrong_type_is_a_type_error(backend: object) -> None:
    """As mode=3 and quantizer=1 (the README and docstrings say wrongly
    typed arguments raise TypeError; backend=3 raised InvalidArgumentError)."""
    w = np.ones((4, 4), np.float32)
    for call in (
        lambda: squant_rs.quantize_tensor(w, 4, backend=backend),  # type: ignore[arg-type]
        lambda: squant_rs.quantize_tensors([w], 4, backend=backend),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match="backend must be a string") as err:
            call()
        assert not isinstance(err.value, ValueError)


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_cuda_matches_rust(shape: tuple[int, ...], dist: str) -> None:
    rng = np.random.default_rng(seed_for("cuda", shape, dist))
    for bits in (2, 4, 8):
        w = torch.from_numpy(make_weight(rng, shape, dist, bits=bits))
        for mode in squant_rs.MODES:
            a = squant_rs.quantize_tensor(w, bits, mode, backend="rust")
            b = squant_rs.quantize_tensor(w.cuda(), bits, mode)  # auto -> torch on CUDA
            assert b.codes.is_cuda and b.scale.is_cuda
            _assert_same(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dtypes_and_rust_backend(dtype: torch.dtype) -> None:
    w = (torch.randn(64, 32, 3, 3) * 0.05).to(dtype).cuda()
    a = squant_rs.quantize_tensor(w, 4, backend="rust")  # copied to the host and back
    b = squant_rs.quantize_tensor(w, 4, backend="torch")
    assert a.codes.is_cuda
    _assert_same(a, b)
    assert b.dequantize().dtype == dtype and b.dequantize().is_cuda


@needs_cuda
def test_cuda_large_layers() -> None:
    for shape in [(512, 512, 3, 3), (2048, 512, 1, 1), (1000, 2048)]:
        w = torch.randn(shape) * 0.02
        a = squant_rs.quantize_tensor(w, 4, backend="rust")
        b = squant_rs.quantize_tensor(w.cuda(), 4)
        _assert_same(a, b)


F32_MAX = float(np.finfo(np.float32).max)


def _near_f32_max() -> dict[str, torch.Tensor]:
    below = float(np.nextafter(np.float32(F32_MAX), np.float32(0)))
    return {
        "max-and-zero": torch.tensor([[F32_MAX, 3e38, 1e38, 0.0], [1.0, -2.0, 0.5, 0.25]]),
        "max-both-signs": torch.tensor([[F32_MAX, -F32_MAX, 0.0, 1.0]]),
        "below-max": torch.tensor([[below, 2e38, -1e30, 0.0], [below, below, below, below]]),
        "negative-max": torch.tensor([[-F32_MAX, -3e38, 0.0, 1e37]]),
        "half-max": torch.tensor([[F32_MAX / 2, -F32_MAX / 2, 0.0, 1.0]]),
        # float64 values that round to float32's largest value
        "float64-to-max": torch.tensor(
            [[F32_MAX * (1 + 2.0**-26), 3e38, 0.0, -1.0]], dtype=torch.float64
        ),
        "conv": torch.tensor([F32_MAX, 1e38, 0.0, -1e38] * 9).reshape(4, 1, 3, 3),
    }


def _outcome(w: torch.Tensor, *args: object, **kw: object) -> tuple[str, object]:
    """What ``quantize_tensor(w, *args, **kw)`` gives: the error's type and
    message, or the result's codes, scale and zero point bits and flips."""
    try:
        qt = squant_rs.quantize_tensor(w, *args, **kw)  # type: ignore[arg-type]
    except squant_rs.SquantError as exc:
        return type(exc).__name__, str(exc)
    return "ok", (
        qt.codes.cpu().tolist(),
        qt.scale.cpu().view(torch.int32).tolist(),
        qt.zero_point.cpu().view(torch.int32).tolist(),
        qt.k_flips,
        qt.c_flips,
    )


@pytest.mark.parametrize("strategy", ["cpu", "dense"])
@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("name", list(_near_f32_max()))
def test_backends_agree_at_float32_max(
    monkeypatch: pytest.MonkeyPatch, strategy: str, quantizer: str, name: str
) -> None:
    """Weights at and near float32's largest value: the torch backend (its
    value check recomputes the scale by true division, bit for bit the Rust
    core's) quantizes exactly what the Rust backend quantizes, and refuses
    only what it refuses; one at a time and in a batch."""
    _force_strategy(monkeypatch, strategy)
    w = _near_f32_max()[name]
    oks = 0
    for bits in range(2, 9):
        for mode in ("squant", "rtn"):
            want = _outcome(w, bits, mode, backend="rust", quantizer=quantizer)
            got = _outcome(w, bits, mode, backend="torch", quantizer=quantizer)
            assert got == want, (bits, mode)
            oks += want[0] == "ok"
    # mx - mn overflows float32 in these: the asymmetric quantizer refuses them
    refused = quantizer == "asymmetric" and name in (
        "max-both-signs",
        "below-max",
        "negative-max",
        "conv",
    )
    assert (oks == 0) == refused


@pytest.mark.parametrize("quantizer", ["asymmetric", "symmetric"])
def test_batch_backends_agree_at_float32_max(quantizer: str) -> None:
    ws = [
        w
        for name, w in _near_f32_max().items()
        if quantizer == "symmetric" or name in ("max-and-zero", "half-max", "float64-to-max")
    ]
    for bits in (4, 8):
        want = squant_rs.quantize_tensors(ws, bits, backend="rust", quantizer=quantizer)
        got = squant_rs.quantize_tensors(ws, bits, backend="torch", quantizer=quantizer)
        for a, b in zip(want, got):
            _assert_same(a, b)
