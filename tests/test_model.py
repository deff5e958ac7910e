"""quantize_model: weights, skip patterns, the report, and the W/A pipeline."""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import numpy as np
import pytest

import squant_rs
from squant_rs.model import (
    DEFAULT_INPUT_SHAPE,
    ActivationQuantizer,
    activation_quantizers,
    default_s_sigma,
)

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c2 = nn.Conv2d(6, 8, 3, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.dw = nn.Conv2d(8, 8, 5, groups=8)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 3))
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2)
        self.head = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 5))


LAYERS = ["c1", "c2", "grouped", "dw", "c3", "head.0", "head.2"]


def _mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Mixed()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


# --------------------------------------------------------------------------
# weights


@pytest.mark.parametrize("mode", ["squant", "squant-e", "squant-c"])
def test_weights_are_squant_dequantized(mode: str) -> None:
    model = _mixed()
    before = _snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    qmodel = squant_rs.quantize_model(model, wbits=3, mode=mode)

    # the original is untouched: same values, same parameter objects
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert qmodel is not model

    sd = qmodel.state_dict()
    assert list(sd) == list(model.state_dict())  # names unchanged
    for name in LAYERS:
        w = _get(model, name).weight.detach()
        want = squant_rs.quantize_tensor(w, 3, mode).dequantize()
        got = _get(qmodel, name).weight
        assert isinstance(got, nn.Parameter) and got.dtype == w.dtype
        assert torch.equal(got, want), name
        assert not torch.equal(got, w)
    for key, value in sd.items():  # everything else is unchanged
        if not any(key == f"{n}.weight" for n in LAYERS):
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_weight_dtype_preserved(dtype: str) -> None:
    model = _mixed().to(getattr(torch, dtype))
    qmodel = squant_rs.quantize_model(model, wbits=4)
    for name in LAYERS:
        w = _get(model, name).weight.detach()
        got = _get(qmodel, name).weight
        assert got.dtype == getattr(torch, dtype)
        assert torch.equal(got, squant_rs.quantize_tensor(w, 4).dequantize())


def test_backend_torch_gives_same_weights() -> None:
    model = _mixed()
    a = squant_rs.quantize_model(model, backend="rust").state_dict()
    b = squant_rs.quantize_model(model, backend="torch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("skip", "quantized"),
    [
        ((), LAYERS),
        ("c*", ["grouped", "dw", "head.0", "head.2"]),
        (("head.*",), ["c1", "c2", "grouped", "dw", "c3"]),
        (["c2", "head.2", "dw"], ["c1", "grouped", "c3", "head.0"]),
        (("*",), []),
        (("head",), LAYERS),  # a pattern names modules: "head" is not a layer (warns)
    ],
)
def test_skip_patterns(skip, quantized: list[str]) -> None:
    model = _mixed()
    with contextlib.ExitStack() as stack:
        if skip == ("head",):
            stack.enter_context(pytest.warns(UserWarning, match="'head' matches no"))
        qmodel, report = squant_rs.quantize_model(model, skip=skip, return_report=True)
    assert [r.name for r in report.layers] == quantized
    for name in LAYERS:
        same = torch.equal(_get(qmodel, name).weight, _get(model, name).weight)
        assert same == (name not in quantized), name
    assert "up" in report.skipped  # ConvTranspose is never quantized
    assert set(report.skipped) == {"up", *(set(LAYERS) - set(quantized))}


def test_report() -> None:
    model = _mixed()
    qmodel, report = squant_rs.quantize_model(model, wbits=4, return_report=True)
    assert qmodel.squant_report is report
    assert [r.name for r in report.layers] == LAYERS
    for r in report.layers:
        w = _get(model, r.name).weight.detach()
        qt = squant_rs.quantize_tensor(w, 4)
        assert r.shape == tuple(w.shape) and r.params == w.numel()
        assert (r.k_flips, r.c_flips) == (qt.k_flips, qt.c_flips)
        w64 = w.double().numpy()
        want = np.linalg.norm(qt.dequantize().double().numpy() - w64) / np.linalg.norm(w64)
        assert r.rel_error == pytest.approx(want, rel=1e-5)
        assert r.time_ms >= 0 and r.bits == 4 and r.act_bits is None
    assert report.total_ms == pytest.approx(sum(r.time_ms for r in report.layers))
    assert report.wall_ms >= report.total_ms
    assert report.params == sum(r.params for r in report.layers)
    assert report.mean_rel_error == pytest.approx(np.mean([r.rel_error for r in report.layers]))
    text = str(report)
    for name in LAYERS:
        assert name in text
    assert "total: 7 layers" in text and "left float: up" in text
    # without return_report: just the model, report attached
    assert isinstance(squant_rs.quantize_model(model).squant_report, squant_rs.QuantReport)


def test_report_of_default_call_is_copyable() -> None:
    qmodel = squant_rs.quantize_model(_mixed())
    clone = copy.deepcopy(qmodel)
    assert len(clone.squant_report.layers) == len(LAYERS)


def test_argument_errors() -> None:
    model = _mixed()
    with pytest.raises(squant_rs.InvalidArgumentError, match="wbits"):
        squant_rs.quantize_model(model, wbits=1)
    with pytest.raises(squant_rs.InvalidArgumentError, match="abits"):
        squant_rs.quantize_model(model, abits=9)
    with pytest.raises(TypeError, match="wbits"):
        squant_rs.quantize_model(model, wbits=4.0)  # type: ignore[arg-type]
    with pytest.raises(squant_rs.InvalidArgumentError, match="mode"):
        squant_rs.quantize_model(model, mode="squant-x")
    with pytest.raises(squant_rs.InvalidArgumentError, match="backend"):
        squant_rs.quantize_model(model, backend="cuda")
    with pytest.raises(squant_rs.InvalidArgumentError, match="calibration"):
        squant_rs.quantize_model(model, abits=4, calibration="data")
    with pytest.raises(squant_rs.InvalidArgumentError, match="input_shape"):
        squant_rs.quantize_model(model, abits=4, input_shape=(1, 0))
    with pytest.raises(squant_rs.InvalidArgumentError, match="s_sigma"):
        squant_rs.quantize_model(model, abits=4, s_sigma=-1.0)
    with pytest.raises(TypeError, match="skip"):
        squant_rs.quantize_model(model, skip=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="nn.Module"):
        squant_rs.quantize_model({"w": torch.zeros(2, 2)})  # type: ignore[arg-type]


def test_non_finite_weight_names_the_layer() -> None:
    model = _mixed()
    with torch.no_grad():
        model.grouped.weight[1, 2, 0, 0] = float("inf")
    with pytest.raises(squant_rs.NonFiniteWeightError, match="grouped"):
        squant_rs.quantize_model(model)


# --------------------------------------------------------------------------
# activation quantization


def test_default_s_sigma() -> None:
    assert [default_s_sigma(b) for b in range(2, 9)] == [12, 12, 12, 13, 14, 19.5, 25]


def _fake_quant(a: np.ndarray, x_min: float, x_max: float, bits: int) -> np.ndarray:
    """docs/algorithm.md section 5, written out independently in numpy float32."""
    f32 = np.float32
    signed = x_min < 0
    s = f32(2**bits - 1) / max(f32(x_max) - f32(x_min), f32(1e-8))
    z = np.rint(s * f32(x_min)) + f32(2 ** (bits - 1) if signed else 0)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = np.clip(np.rint(s * a.astype(np.float32) - z), lo, hi)
    return ((q + z) / s).astype(np.float32)


def test_activation_quantizer_by_hand() -> None:
    # unsigned, 4 bits: sigma = std([1, 2, 3, 4]) = 1.29; 12 sigma > max, so alpha = 4
    q = ActivationQuantizer("x", 4, 12.0)
    q.observe(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert (q.x_min, q.x_max) == (0.0, 4.0)
    assert (q.scale, q.zero_point, q.qmin, q.qmax) == (3.75, 0.0, 0, 15)
    # s * a = [0, 3.75, 7.5, 11.25, 15] -> [0, 4, 8, 11, 15] (7.5 rounds to even)
    out = q.quantize(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0, -1.0]))
    want = torch.tensor([0, 4, 8, 11, 15, 15, 0], dtype=torch.float32) / 3.75
    assert torch.equal(out, want)

    # signed, 4 bits: alpha = min(12 * std / 1.25, max) = 2; range [-2, 2], s = 3.75,
    # z = rne(-7.5) + 8 = 0; codes clamp to [-8, 7]
    q = ActivationQuantizer("y", 4, 12.0)
    q.observe(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    assert (q.x_min, q.x_max, q.scale, q.zero_point) == (-2.0, 2.0, 3.75, 0.0)
    out = q.quantize(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    assert torch.equal(out, torch.tensor([-8, -4, 0, 4, 7], dtype=torch.float32) / 3.75)

    # 8 bits (same s_sigma, as the release's last layer): no clip to max
    q.set_bits(8)
    sigma = np.std([-2, -1, 0, 1, 2], ddof=1)
    assert q.x_max == pytest.approx(12 * sigma / 1.25, rel=1e-6)
    assert q.x_min == -q.x_max


class ThreeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 16)
        self.l2 = nn.Linear(16, 12)
        self.l3 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(F.relu(self.l1(x))))


def _calib_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    # the documented calibration batch
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def _linear(x: np.ndarray, layer: nn.Linear) -> np.ndarray:
    w = layer.weight.detach().numpy().astype(np.float64)
    b = layer.bias.detach().numpy().astype(np.float64)
    return x.astype(np.float64) @ w.T + b


@pytest.mark.parametrize("abits", [4, 6])
def test_activation_pipeline_known_answer(abits: int) -> None:
    torch.manual_seed(1)
    model = ThreeLayer()
    shape = (64, 6)
    qmodel, report = squant_rs.quantize_model(
        model, wbits=4, abits=abits, input_shape=shape, seed=3, return_report=True
    )
    s_sigma = {4: 12.0, 6: 14.0}[abits]

    # calibration statistics on the float model, computed independently (float64)
    x = _calib_input(shape, seed=3)
    h1 = np.maximum(_linear(x, model.l1), 0)  # input of l2: unsigned
    h2 = _linear(h1, model.l2)  # input of l3 (the last layer): signed, 8 bits
    assert h2.min() < 0
    alpha2 = s_sigma * np.std(h1[h1 > 0], ddof=1)
    if abits < 6:
        alpha2 = min(alpha2, h1.max())
    alpha3 = s_sigma * np.std(h2, ddof=1) / 1.25  # 8 bits: no clip

    rows = {r.name: r for r in report.layers}
    assert rows["l1"].act_bits is None and rows["l1"].act_range is None  # first: float
    assert rows["l2"].act_bits == abits
    assert rows["l2"].act_range == pytest.approx((0.0, alpha2), rel=1e-5)
    assert rows["l3"].act_bits == 8
    assert rows["l3"].act_range == pytest.approx((-alpha3, alpha3), rel=1e-5)

    # inference: fake-quantized inputs of l2 and l3, quantized weights
    hooks = activation_quantizers(qmodel)
    assert set(hooks) == {"l1", "l2", "l3"} and not hooks["l1"].enabled
    t = torch.randn(10, 6)
    a1 = F.relu(F.linear(t, qmodel.l1.weight, qmodel.l1.bias)).detach().numpy()
    a1q = _fake_quant(a1, *rows["l2"].act_range, abits)
    a2 = F.linear(torch.from_numpy(a1q), qmodel.l2.weight, qmodel.l2.bias).detach().numpy()
    a2q = _fake_quant(a2, *rows["l3"].act_range, 8)
    want = F.linear(torch.from_numpy(a2q), qmodel.l3.weight, qmodel.l3.bias)
    with torch.no_grad():
        got = qmodel(t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(np.unique(a1q)) <= 2**abits
    # the original model has no hooks and gives the float answer
    assert not activation_quantizers(model)
    with torch.no_grad():
        assert torch.equal(model(t), model.l3(model.l2(F.relu(model.l1(t)))))


def test_calibration_quantized_follows_the_release() -> None:
    torch.manual_seed(2)
    model = ThreeLayer()
    shape = (32, 6)
    qmodel, report = squant_rs.quantize_model(
        model, wbits=3, abits=4, input_shape=shape, calibration="quantized", return_report=True
    )
    x = _calib_input(shape)
    # statistics on the quantized-weight model, upstream activations quantized
    h1 = np.maximum(_linear(x, qmodel.l1), 0)
    alpha2 = min(12.0 * np.std(h1[h1 > 0], ddof=1), h1.max())
    rows = {r.name: r for r in report.layers}
    assert rows["l2"].act_range == pytest.approx((0.0, alpha2), rel=1e-5)
    h1q = _fake_quant(h1.astype(np.float32), *rows["l2"].act_range, 4)
    h2 = _linear(h1q, qmodel.l2)
    alpha3 = 12.0 * np.std(h2, ddof=1) / 1.25
    assert rows["l3"].act_range == pytest.approx((-alpha3, alpha3), rel=1e-5)


def test_s_sigma_override_applies_to_every_quantizer() -> None:
    torch.manual_seed(1)
    model = ThreeLayer()
    _, r12 = squant_rs.quantize_model(
        model, abits=8, input_shape=(16, 6), s_sigma=12, return_report=True
    )
    _, r25 = squant_rs.quantize_model(model, abits=8, input_shape=(16, 6), return_report=True)
    for a, b in zip(r12.layers[1:], r25.layers[1:]):
        assert a.act_range is not None and b.act_range is not None
        assert a.act_range[1] == pytest.approx(b.act_range[1] * 12 / 25, rel=1e-6)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, padding=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.unused = nn.Linear(4, 4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.pw(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_cnn_with_activations_pickles_and_copies(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    qmodel, report = squant_rs.quantize_model(
        model, wbits=4, abits=4, input_shape=(4, 3, 16, 16), recipe="paper", return_report=True
    )
    assert model.training and qmodel.training  # modes restored after calibration
    assert qmodel.state_dict().keys() == model.state_dict().keys()
    rows = {r.name: r for r in report.layers}
    assert rows["conv"].act_bits is None
    assert rows["dw"].act_bits == 4 and rows["pw"].act_bits == 4
    assert rows["fc"].act_bits == 8  # last to run, though "unused" is registered before it
    assert rows["unused"].act_range is None  # never ran: float input
    assert "act range" in str(report)

    qmodel.eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        y = qmodel(x)
        assert torch.equal(copy.deepcopy(qmodel)(x), y)
        clone = pickle.loads(pickle.dumps(qmodel))
        assert torch.equal(clone(x), y)
        path = tmp_path / "m.pt"
        torch.save(qmodel, path)
        loaded = torch.load(path, weights_only=False)
        assert torch.equal(loaded(x), y)
        # the hooks really act: without them the output differs
        plain = SmallCNN().eval()
        plain.load_state_dict(qmodel.state_dict())
        assert not torch.equal(plain(x), y)
        # an uncalibrated quantizer passes its input through
        v = torch.randn(3, 4)
        assert torch.equal(qmodel.unused(v), F.linear(v, qmodel.unused.weight, qmodel.unused.bias))


def test_calibration_uses_model_dtype_and_restores_nothing_else() -> None:
    torch.manual_seed(0)
    model = SmallCNN().to(torch.float64)
    state = torch.get_rng_state()
    qmodel = squant_rs.quantize_model(model, abits=6, input_shape=(2, 3, 8, 8))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    with torch.no_grad():
        y = qmodel.eval()(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


def test_bad_input_shape_is_explained() -> None:
    with pytest.raises(squant_rs.InvalidArgumentError, match="input_shape"):
        squant_rs.quantize_model(ThreeLayer(), abits=4)  # image-shaped default for an MLP
    assert DEFAULT_INPUT_SHAPE == (8, 3, 224, 224)


def test_single_layer_model_keeps_float_input() -> None:
    model = nn.Linear(5, 3)
    qmodel, report = squant_rs.quantize_model(
        model, abits=4, input_shape=(8, 5), return_report=True
    )
    assert report.layers[0].name == "" and report.layers[0].act_bits is None
    x = torch.rand(2, 5)
    assert torch.equal(qmodel(x), F.linear(x, qmodel.weight, qmodel.bias))


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_spectral_norm_in_training_mode_is_not_run(recipe: str) -> None:
    """Reading a parametrized weight runs the parametrization: in training
    mode, spectral_norm's power iteration would update the caller's _u/_v.
    The weight is left float without being read."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert model.training
    before = _snapshot(model)
    q, rep = squant_rs.quantize_model(model, 4, recipe=recipe, return_report=True)
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert rep.skipped == ["0"] and [r.name for r in rep.layers] == ["2"]


def test_layers_left_float_by_rule_are_noted(tmp_path) -> None:
    """ConvTranspose layers and parametrized weights stay float by design:
    they were in report.skipped with no note, like a caller's own skip.
    quantize_model and save_quantized note each (a skip pattern's layer is
    not noted)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    class Times1(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 1.0

    torch.manual_seed(0)
    custom = nn.Conv2d(8, 8, 1)
    parametrize.register_parametrization(custom, "weight", Times1())
    model = nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3)),
        nn.ConvTranspose2d(8, 8, 3),
        spectral_norm(nn.Conv2d(8, 8, 1)),
        custom,
        nn.Conv2d(8, 4, 1),
        nn.ConvTranspose1d(4, 4, 1),
    ).eval()
    expected = [
        "0: parametrized weight (torch.nn.utils.parametrize), not quantized; left float",
        "1: ConvTranspose2d, not quantized; left float",
        "2: parametrized weight (torch.nn.utils.parametrize), not quantized; left float",
        "3: parametrized weight (torch.nn.utils.parametrize), not quantized; left float",
        "5: ConvTranspose1d, not quantized; left float",
    ]
    _, rep = squant_rs.quantize_model(model, 4, return_report=True)
    assert rep.skipped == ["0", "1", "2", "3", "5"] and [r.name for r in rep.layers] == ["4"]
    assert rep.notes == expected
    saved = squant_rs.save_quantized(model, tmp_path / "m.safetensors", 4)
    assert saved.notes == expected
    _, rep = squant_rs.quantize_model(model, 4, skip=["1", "2"], return_report=True)
    assert rep.notes == [expected[0], expected[3], expected[4]]


def test_seed_and_return_report_are_checked() -> None:
    model = ThreeLayer()
    for seed in (2**64, -(2**63) - 1):
        for abits in (None, 4):  # checked whether or not a noise pass runs
            with pytest.raises(squant_rs.InvalidArgumentError, match="seed"):
                squant_rs.quantize_model(model, 4, abits, input_shape=(2, 6), seed=seed)
    for seed in (2**64 - 1, -(2**63)):
        squant_rs.quantize_model(model, 4, 4, input_shape=(2, 6), seed=seed)
    with pytest.raises(TypeError, match="return_report"):
        squant_rs.quantize_model(model, 4, return_report="yes")  # type: ignore[call-overload]


def test_unallocatable_input_shape_is_explained() -> None:
    with pytest.raises(squant_rs.InvalidArgumentError, match="input_shape"):
        squant_rs.quantize_model(
            ThreeLayer(), 4, 4, input_shape=(2**20, 3, 2**20, 8), recipe="paper"
        )


def test_torchscript_submodule_is_noted() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.Conv2d(8, 4, 1))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), scripted).eval()
    q, rep = squant_rs.quantize_model(model, 4, return_report=True)
    assert [r.name for r in rep.layers] == ["0"]
    assert len(rep.notes) == 1 and rep.notes[0].startswith("2: a TorchScript module")
    assert torch.equal(q[2].weight, model[2].weight)  # left float


class _Attention(nn.Module):
    """Self-attention (packed ``in_proj_weight``), attention with other
    key/value sizes (``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight``) and the self-attention module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.MultiheadAttention(16, 2, batch_first=True)
        self.b = nn.MultiheadAttention(16, 2, batch_first=True, kdim=6, vdim=6)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = self.a(x, x, x, need_weights=False)[0]
        h = self.a(h, h, h, need_weights=False)[0]
        h = self.b(h, m, m, need_weights=False)[0]
        return self.head(h)


ATTENTION_LAYERS = ["a.in_proj", "a.out_proj", "b.q_proj", "b.k_proj", "b.v_proj", "b.out_proj"]


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_attention_projections_are_quantized(recipe: str, backend: str) -> None:
    """nn.MultiheadAttention's input projections are parameters of the
    attention, not Linear layers: they were left float (a quarter of a
    transformer layer's weights). Each is now quantized per output channel
    (a row) as a Linear weight would be, named ``<attention>.in_proj``
    (``.q_proj``...), and reported; skip patterns apply; the caller's model
    is unchanged."""
    torch.manual_seed(0)
    model = _Attention().eval()
    before = _snapshot(model)
    x, m = torch.rand(2, 5, 16), torch.rand(2, 7, 6)
    q, rep = squant_rs.quantize_model(model, 4, recipe=recipe, backend=backend, return_report=True)
    assert [r.name for r in rep.layers] == [*ATTENTION_LAYERS, "head"]
    rows = {r.name: r for r in rep.layers}
    for name, pname in [
        ("a.in_proj", "a.in_proj_weight"),
        ("b.q_proj", "b.q_proj_weight"),
        ("b.k_proj", "b.k_proj_weight"),
        ("b.v_proj", "b.v_proj_weight"),
    ]:
        w = model.get_parameter(pname)
        assert rows[name].kind == "MultiheadAttention" and rows[name].shape == tuple(w.shape)
        qt = squant_rs.quantize_tensor(w, 4, backend=backend)
        assert torch.equal(q.get_parameter(pname), torch.as_tensor(qt.dequantize()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (q(x, m) - model(x, m)).abs().max() > 0
    q2, rep2 = squant_rs.quantize_model(model, 4, skip=["*.in_proj"], return_report=True)
    assert "a.in_proj" in rep2.skipped and torch.equal(q2.a.in_proj_weight, model.a.in_proj_weight)


def test_attention_projections_save_and_load(tmp_path) -> None:
    """save_quantized of a model stores the projections quantized, and
    load_quantized gives quantize_model(recipe="paper")'s state dict."""
    torch.manual_seed(0)
    model = _Attention().eval()
    path = tmp_path / "m.safetensors"
    rep = squant_rs.save_quantized(model, path, 4)
    assert {r.name for r in rep.layers} >= {"a.in_proj_weight", "b.k_proj_weight"}
    q = squant_rs.quantize_model(model, 4, recipe="paper")
    loaded = squant_rs.load_quantized(path)
    want = q.state_dict()
    assert loaded.keys() == want.keys()
    for k, v in loaded.items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_attention_inputs_and_uncalled_layers_are_noted(recipe: str) -> None:
    """With abits, an attention's out_proj Linear is never called (the
    attention reads its weight directly), so its input stays float: that
    was silent, the report now says so. Its packed input projection's
    inputs are quantized by a pre-hook on the attention (they stayed
    float, noted), but in the first layer to run."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, rep = squant_rs.quantize_model(
            model, 8, 8, input_shape=(2, 5, 16), recipe=recipe, return_report=True
        )
    rows = {r.name: r for r in rep.layers}
    for i in range(2):
        attn = f"layers.{i}.self_attn"
        assert rows[f"{attn}.out_proj"].act_bits is None
        assert not any(n.startswith(f"{attn}.in_proj") for n in rep.notes)
        uncalled = f"{attn}.out_proj: no range, its forward never ran"
        assert any(n.startswith(uncalled) for n in rep.notes)
        assert not torch.equal(
            q.get_submodule(attn).in_proj_weight, model.get_submodule(attn).in_proj_weight
        )
    assert rows["layers.0.self_attn.in_proj"].act_bits is None  # the first layer: float
    assert rows["layers.1.self_attn.in_proj"].act_bits == 8
    assert rows["layers.1.linear1"].act_bits == 8  # layers that run are calibrated
    assert len(rep.notes) == 2


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(input=torch.relu(self.a(x)))))


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_range_notes_only_where_a_layer_has_no_range(recipe: str) -> None:
    """The first layer's float input is the algorithm's rule, not a
    missing range (no note, with or without a noise pass); a layer called
    with its input as a keyword gets no range and says why."""
    torch.manual_seed(0)
    bn = nn.Sequential(
        nn.Conv1d(3, 8, 3),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 8, 3),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Conv1d(8, 4, 1),
    ).eval()
    _, rep = squant_rs.quantize_model(
        bn, 8, 8, input_shape=(2, 3, 16), recipe=recipe, return_report=True
    )
    assert rep.notes == [] and rep.layers[0].act_bits is None
    _, rep = squant_rs.quantize_model(
        _KeywordCall().eval(), 8, 8, input_shape=(2, 4), recipe=recipe, return_report=True
    )
    assert [r.act_bits for r in rep.layers] == [None, None, 8]
    assert len(rep.notes) == 1 and rep.notes[0].startswith("b: no range, its forward never ran")


# --------------------------------------------------------------------------
# Activation ranges: float32 limits, negative inputs, aliases, re-quantization


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
@pytest.mark.parametrize(
    "s_sigma",
    [
        1e39,
        1e300,
        1e-50,
        pytest.param(10**400, id="10**400"),
        pytest.param(-(10**400), id="-10**400"),
    ],
)
def test_s_sigma_beyond_float32_is_refused(recipe: str, s_sigma: float) -> None:
    """The ranges are float32: an s_sigma that float32 makes infinite (or 0)
    was accepted and gave the range (0, inf), scale 0 and NaN outputs. (An
    int beyond float64 raised a bare OverflowError naming no argument.)"""
    with pytest.raises(squant_rs.InvalidArgumentError, match="s_sigma"):
        squant_rs.quantize_model(_mlp(), 4, 8, input_shape=(4, 6), s_sigma=s_sigma, recipe=recipe)


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
@pytest.mark.parametrize("calibration", ["float", "quantized"])
def test_range_overflowing_float32_names_s_sigma_and_layer(recipe: str, calibration: str) -> None:
    """s_sigma within float32 whose product with sigma overflows: a clear
    error naming s_sigma and the layer, also with warnings as errors (the
    numpy overflow warning was misreported as a failed forward pass)."""
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(100.0)  # layer "4" sees a wide input
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(squant_rs.InvalidArgumentError, match=r"layer '4'.*s_sigma=3e\+38"):
            squant_rs.quantize_model(
                model,
                4,
                4,
                input_shape=(4, 6),
                s_sigma=3e38,
                recipe=recipe,
                calibration=calibration,
            )


@pytest.mark.parametrize("abits", [2, 4, 5])
def test_all_negative_input_keeps_its_sign_below_6_bits(abits: int) -> None:
    """A layer whose calibration input has no positive value: the cap
    alpha = min(alpha, max a) made alpha negative and inverted the range
    (inputs around -10 came out as +9.7). The cap is max|a| there."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].bias.fill_(-10.0)
    seen: list[torch.Tensor] = []
    model[2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.rand((16, 6), generator=torch.Generator().manual_seed(0)))
    a = seen[0]
    assert float(a.max()) < 0
    qmodel, report = squant_rs.quantize_model(
        model, 8, abits, input_shape=(16, 6), recipe="paper", return_report=True
    )
    q = activation_quantizers(qmodel)["2"]
    x_min, x_max = report.layers[2].act_range
    assert x_min < 0 < x_max and x_min == -x_max
    sigma = float(a.std())
    alpha = np.float32(q.s_sigma) * np.float32(sigma) / np.float32(1.25)
    expected = min(alpha, np.float32(float(a.abs().max())))
    assert x_max == float(expected)
    out = q.quantize(a)
    assert bool((out < 0).all())  # the sign survives


def test_all_negative_wide_input_range_covers_its_magnitude() -> None:
    """Where s_sigma * sigma exceeds max|a|, the range is [-max|a|, max|a|]."""
    q = ActivationQuantizer("x", 4, 12.0)
    a = -torch.linspace(0.5, 10.0, 101)
    q.observe(a)
    assert (q.x_min, q.x_max) == (-10.0, 10.0)
    out = q.quantize(a)
    assert bool((out <= 0).all())  # (-0.5 rounds to 0 on the 4-bit grid)
    assert float(out.min()) <= -9.0


def test_input_with_positive_values_keeps_the_release_cap() -> None:
    """The spec's cases stay bit for bit: a signed input with max a > 0 is
    capped at max a below 6 bits."""
    a = torch.cat([-torch.linspace(0.0, 20.0, 50), torch.tensor([0.25])])
    q = ActivationQuantizer("x", 4, 12.0)
    q.observe(a)
    assert (q.x_min, q.x_max) == (-0.25, 0.25)
    assert squant_rs.model.activation_range(True, float(a.std()), 0.25, 4, 12.0) == (-0.25, 0.25)


class _Alias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.b_alias = self.b  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b2 = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.b2.weight = self.b.weight  # a distinct module sharing the weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b2(F.relu(self.b(F.relu(self.a(x)))))))


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_alias_row_reports_the_modules_quantizer(recipe: str) -> None:
    """A module under two names has one hook: both rows report it (the
    alias's row said float input)."""
    torch.manual_seed(0)
    qmodel, report = squant_rs.quantize_model(
        _Alias(), 8, 4, input_shape=(16, 6), recipe=recipe, return_report=True
    )
    rows = {r.name: r for r in report.layers}
    hook = activation_quantizers(qmodel)["b"]
    for name in ("b", "b_alias"):
        assert rows[name].act_bits == hook.bits == 4
        assert rows[name].act_range == (hook.x_min, hook.x_max)
        assert rows[name].range_source == "sigma"
    assert rows["b_alias"].tied_to == "b"


@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_tied_distinct_module_reports_its_own_quantizer(recipe: str) -> None:
    torch.manual_seed(0)
    qmodel, report = squant_rs.quantize_model(
        _Tied(), 8, 4, input_shape=(16, 6), recipe=recipe, return_report=True
    )
    rows = {r.name: r for r in report.layers}
    hooks = activation_quantizers(qmodel)
    for name in ("b", "b2"):
        assert rows[name].act_range == (hooks[name].x_min, hooks[name].x_max)
    assert rows["b"].act_range != rows["b2"].act_range


def test_requantizing_an_activation_quantized_model_is_refused() -> None:
    """A second call with abits stacked a second quantizer on every layer."""
    qmodel = squant_rs.quantize_model(_mlp(), 8, 4, input_shape=(4, 6))
    with pytest.raises(squant_rs.InvalidArgumentError, match="already carries squant activation"):
        squant_rs.quantize_model(qmodel, 8, 4, input_shape=(4, 6))
    # weights only: allowed, the copy keeps the one quantizer per layer
    again = squant_rs.quantize_model(qmodel, 8)
    for module in again.modules():
        hooks = [
            h for h in module._forward_pre_hooks.values() if isinstance(h, ActivationQuantizer)
        ]
        assert len(hooks) <= 1


def test_save_quantized_report_has_the_notes(tmp_path) -> None:
    """save_quantized of a model reported what it left float in `skipped`
    but dropped the reasons quantize_model gives in `notes`."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "fc": nn.Linear(8, 8)})
    _, want = squant_rs.quantize_model(model, 4, return_report=True)
    rep = squant_rs.save_quantized(model, tmp_path / "m.safetensors", 4)
    assert rep.skipped == want.skipped == ["head"]
    assert rep.notes == want.notes and "shares its weight with emb.weight" in rep.notes[0]


def test_shared_attention_is_tied() -> None:
    """One encoder layer used twice (ALBERT-style) and an in_proj_weight
    tied to a Linear: sorting the report rows looked the projection names
    up among module names (KeyError)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = squant_rs.quantize_model(nn.Sequential(layer, layer).eval(), 4, return_report=True)
    assert [(r.name, r.tied_to) for r in rep.layers][3:5] == [
        ("0.linear2", None),
        ("1.self_attn.in_proj", "0.self_attn.in_proj"),
    ]
    a, lin = nn.MultiheadAttention(16, 2), nn.Linear(16, 48)
    lin.weight = a.in_proj_weight
    q, rep = squant_rs.quantize_model(nn.ModuleDict({"a": a, "lin": lin}), 4, return_report=True)
    assert [(r.name, r.tied_to) for r in rep.layers] == [
        ("a.in_proj", None),
        ("a.out_proj", None),
        ("lin", "a.in_proj"),
    ]
    assert q["lin"].weight is q["a"].in_proj_weight


class _AttentionFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(self.attn(x, x, x, need_weights=False)[0])))


@pytest.mark.parametrize("calibration", ["float", "quantized"])
@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_an_attention_first_is_the_first_layer(recipe: str, calibration: str) -> None:
    """An attention whose projections are quantized is the first quantized
    layer to run when it runs first: its inputs stay float, and the next
    layer gets abits (it kept a float input too, silently)."""
    torch.manual_seed(0)
    _, rep = squant_rs.quantize_model(
        _AttentionFirst().eval(),
        4,
        4,
        input_shape=(2, 5, 16),
        recipe=recipe,
        calibration=calibration,
        return_report=True,
    )
    assert [(r.name, r.act_bits) for r in rep.layers] == [
        ("attn.in_proj", None),
        ("attn.out_proj", None),
        ("l1", 4),
        ("l2", 8),
    ]


class _SelfAndCross(nn.Module):
    """A Linear, a self-attention (query, key and value one tensor) and a
    cross-attention called with key and value (one tensor) as keywords,
    then a head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.a = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.c = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        h = self.a(h, h, h, need_weights=False)[0]
        m = x + 1
        return self.head(self.c(h, key=m, value=m, need_weights=False)[0])


@pytest.mark.parametrize("calibration", ["float", "quantized"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("recipe", ["paper", "squant+"])
def test_attention_inputs_are_quantized(recipe: str, batch_first: bool, calibration: str) -> None:
    """With abits, the query, key and value of an attention whose packed
    input projection is quantized (positional or keywords) are
    fake-quantized by one pre-hook on the attention, with the sigma-rule
    range of the distinct ones pooled (they stayed float); the same tensor
    is passed where key and value (and query) were one tensor; the report
    row of in_proj gives the range; out_proj's input stays float."""
    torch.manual_seed(0)
    model = _SelfAndCross(batch_first).eval()
    shape = (2, 5, 16) if batch_first else (5, 2, 16)
    q, rep = squant_rs.quantize_model(
        model,
        8,
        6,
        input_shape=shape,
        recipe=recipe,
        calibration=calibration,
        return_report=True,
    )
    hooks = activation_quantizers(q)
    qa, qc = hooks["a.in_proj"], hooks["c.in_proj"]
    assert (qa.name, qc.name) == ("a.in_proj", "c.in_proj")
    rows = {r.name: r for r in rep.layers}
    for name, hook in (("a.in_proj", qa), ("c.in_proj", qc)):
        assert rows[name].act_bits == 6 and rows[name].act_range == (hook.x_min, hook.x_max)
        assert rows[name].range_source == "sigma"
    assert rows["a.out_proj"].act_bits is None and rows["pre"].act_bits is None
    assert rows["head"].act_bits == 8
    # the ranges: the sigma rule on the noise pass's (pooled) inputs
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    src = model if calibration == "float" else q  # (quantized: q's hooks apply)
    with torch.no_grad():
        h = src.pre(noise)
        h_a = src.a(h, h, h, need_weights=False)[0]
    for hook, seen in ((qa, h), (qc, torch.cat([h_a.reshape(-1), (noise + 1).reshape(-1)]))):
        want = ActivationQuantizer("ref", 6, default_s_sigma(6))
        want.observe(seen)
        assert (hook.x_min, hook.x_max) == (want.x_min, want.x_max)
    # the same tensor for key and value, and for all three in self-attention
    same: list[bool] = []

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = [*args, *(kwargs[k] for k in ("key", "value") if k in kwargs)]
        same.append(inputs[1] is inputs[2] and (module is q.c or inputs[0] is inputs[1]))

    handles = [m.register_forward_pre_hook(check, with_kwargs=True) for m in (q.a, q.c)]
    x = torch.rand(shape)
    with torch.no_grad():
        got = q(x)
        for hd in handles:
            hd.remove()
        assert same == [True, True]
        # by hand: the attentions with their hooks off, on quantized inputs
        qa.enabled = qc.enabled = False
        float_inputs = q(x)
        h = q.pre(x)
        hq = qa.quantize(h)
        h = q.a(hq, hq, hq, need_weights=False)[0]
        mq = qc.quantize(x + 1)
        by_hand = q.head(q.c(qc.quantize(h), mq, mq, need_weights=False)[0])
    assert torch.equal(got, by_hand)
    assert not torch.equal(got, float_inputs)


def test_state_dict_skip_by_projection_layer_name(tmp_path) -> None:
    """skip=("a.in_proj",) (quantize_model's layer name) works for a state
    dict too, as the docstring promises for skip=("fc",)."""
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.MultiheadAttention(16, 2), "fc": nn.Linear(16, 4)})
    for src in (m, m.state_dict()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rep = squant_rs.save_quantized(
                src, tmp_path / "m.safetensors", 4, skip=["a.in_proj", "fc"]
            )
        assert [r.name for r in rep.layers] == ["a.out_proj.weight"]


def test_calibration_of_a_several_input_model_says_so() -> None:
    """The calibration passes one U[0,1) tensor: a model whose forward
    needs more was told to pass input_shape=, which cannot help."""
    with pytest.raises(squant_rs.InvalidArgumentError) as exc:
        squant_rs.quantize_model(nn.MultiheadAttention(16, 2).eval(), 8, 8, input_shape=(5, 2, 16))
    msg = str(exc.value)
    assert "takes more than one input" in msg and "abits=None" in msg
    assert "input_shape=" not in msg.split("failed", 1)[1]
