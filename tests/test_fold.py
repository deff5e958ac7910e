"""model.fold: exact BatchNorm folding, and quantize_model(fold_bn=)."""

from __future__ import annotations

import numpy as np
import pytest

import squant_rs
from squant_rs.model.fold import BatchNormFold, fold_batchnorm

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters on every BN."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen))


def _pairs_by_both_tracers(model: nn.Module) -> tuple[list[tuple[str, str]], ...]:
    """The (layer, BN) pairs folding would take, from the capture's graph
    and from torch.fx's."""
    from squant_rs.model import capture
    from squant_rs.model.fold import _fx_pairs, trace_fx

    modules = dict(model.named_modules())
    fx_graph = trace_fx(model)
    assert fx_graph is not None
    return _fx_pairs(model, capture.capture(model), modules), _fx_pairs(model, fx_graph, modules)


def _assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = float((a.double() - b.double()).norm() / b.double().norm())
    assert err <= rel, err


CASES = {
    "conv1d": (
        lambda bias: nn.Sequential(nn.Conv1d(4, 6, 3, bias=bias), nn.BatchNorm1d(6)),
        (5, 4, 11),
    ),
    "conv2d": (
        lambda bias: nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8)),
        (2, 3, 9, 9),
    ),
    "conv3d": (
        lambda bias: nn.Sequential(nn.Conv3d(2, 5, (1, 2, 3), bias=bias), nn.BatchNorm3d(5)),
        (2, 2, 4, 5, 6),
    ),
    "grouped": (
        lambda bias: nn.Sequential(nn.Conv2d(8, 12, 3, groups=4, bias=bias), nn.BatchNorm2d(12)),
        (2, 8, 7, 7),
    ),
    "depthwise": (
        lambda bias: nn.Sequential(nn.Conv2d(6, 6, 5, groups=6, bias=bias), nn.BatchNorm2d(6)),
        (2, 6, 9, 9),
    ),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_fold_is_exact(case: str, bias: bool) -> None:
    build, shape = CASES[case]
    torch.manual_seed(1)
    model = build(bias).eval()
    _randomize_bn(model, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
    folded, folds = fold_batchnorm(model)
    assert len(folds) == 1 and folds[0].layer == "0" and folds[0].bn == "1"
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(model[1], nn.modules.batchnorm._BatchNorm)  # original untouched
    assert folded[0].bias is not None
    with torch.no_grad():
        _assert_close(folded(x), ref)
    bn = model[1]
    np.testing.assert_array_equal(folds[0].mean, bn.bias.detach().double().numpy())
    np.testing.assert_array_equal(folds[0].std, bn.weight.detach().double().abs().numpy())
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}


class Block(nn.Module):
    """conv -> bn -> relu6, a residual add, a BN fed by a non-conv, a conv
    feeding two users and a functional call: only the first BN folds via fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU6()
        self.bn_after_add = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.bn_after_add(y + x)
        z = self.conv2(y)
        return self.bn2(z) + z  # conv2's output has two users: not foldable


def test_fold_graph_rules() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    _randomize_bn(model, 5)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    folded, folds = fold_batchnorm(model)
    assert [(f.layer, f.bn, f.via) for f in folds] == [("conv", "bn", "fx")]
    assert isinstance(folded.bn, nn.Identity)
    assert isinstance(folded.bn_after_add, nn.BatchNorm2d)
    assert isinstance(folded.bn2, nn.BatchNorm2d)
    with torch.no_grad():
        _assert_close(folded(x), ref)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            return self.features(x)
        return self.features(-x)


def test_fold_sequential_fallback() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    _randomize_bn(model, 7)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    folded, folds = fold_batchnorm(model)
    assert [(f.layer, f.bn, f.via) for f in folds] == [("features.0", "features.1", "sequential")]
    with torch.no_grad():
        _assert_close(folded(x), ref)


def test_fold_leaves_unfoldable_bn_alone() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),  # eval uses batch statistics
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4, affine=False),  # no affine: gamma = 1, beta = 0
    ).eval()
    _randomize_bn(model, 1)
    folded, folds = fold_batchnorm(model)
    assert [(f.layer, f.bn) for f in folds] == [("2", "3")]
    np.testing.assert_array_equal(folds[0].std, np.ones(4))
    np.testing.assert_array_equal(folds[0].mean, np.zeros(4))
    assert isinstance(folded[1], nn.BatchNorm2d)


def test_fold_inplace_and_type_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    out, folds = fold_batchnorm(model, inplace=True)
    assert out is model and isinstance(model[1], nn.Identity)
    assert isinstance(folds[0], BatchNormFold)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold_batchnorm("model")  # type: ignore[arg-type]


def test_quantize_model_fold_bn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    _randomize_bn(model, 3)
    folded_ref, _ = fold_batchnorm(model)
    q = squant_rs.quantize_model(model, wbits=8, fold_bn=True)
    assert isinstance(q[1], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)
    # the quantized weights are the SQuant codes of the folded weights
    expect = squant_rs.quantize_tensor(folded_ref[0].weight.detach(), 8).dequantize()
    torch.testing.assert_close(q[0].weight.detach(), expect, rtol=0, atol=0)
    torch.testing.assert_close(q[0].bias.detach(), folded_ref[0].bias.detach(), rtol=0, atol=0)
    plain = squant_rs.quantize_model(model, wbits=8, recipe="paper")
    assert isinstance(plain[1], nn.BatchNorm2d)
    with pytest.raises(TypeError, match="fold_bn"):
        squant_rs.quantize_model(model, fold_bn=1)  # type: ignore[call-overload]


def test_fold_skips_tied_weights() -> None:
    """A layer whose weight another module also holds is not folded (the
    fold would change the other layer too); the output stays exact."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 1)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.bn(self.a(x)))

    torch.manual_seed(0)
    model = Tied().eval()
    _randomize_bn(model, 5)
    x = torch.randn(2, 4, 5, 5)
    folded, folds = fold_batchnorm(model)
    assert folds == []
    assert isinstance(folded.bn, nn.BatchNorm2d)
    seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    seq[2].weight = seq[0].weight
    _randomize_bn(seq, 6)
    from squant_rs.model.fold import fold_batchnorm_graph

    assert fold_batchnorm_graph(seq, None) == []  # the nn.Sequential fallback too
    with torch.no_grad():
        _assert_close(folded(x), model(x))
    q, rep = squant_rs.quantize_model(model, 8, recipe="squant+", return_report=True)
    assert not any(r.folded for r in rep.layers)
    assert q.a.weight is q.b.weight


def test_quantize_model_squant_plus_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1)
    ).eval()
    _randomize_bn(model, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = squant_rs.quantize_model(model, 4, 4, recipe="squant+", input_shape=(2, 3, 8, 8))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    assert isinstance(q[1], nn.Identity) and q[0].bias is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        # Linear on (N, L, F), BatchNorm1d(L): the BN normalizes L, not the features
        (nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), (4, 8, 8)),
        # 2-D input (where folding would be right): the graph cannot tell, never folded
        (nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9)), (16, 7)),
        # unbatched Conv2d output (C, H, W) into BatchNorm1d: normalizes H
        (nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm1d(6)), (3, 6, 5)),
    ],
    ids=["linear-3d", "linear-2d", "conv2d-bn1d"],
)
def test_fold_skips_a_bn_on_an_ambiguous_axis(model: nn.Module, shape: tuple[int, ...]) -> None:
    """A BN is folded only into a Conv of its own dimension: after a Linear
    (or a Conv of another dimension) the axis it normalizes is not known."""
    torch.manual_seed(0)
    model.eval()
    _randomize_bn(model, 1)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert folds == [] and isinstance(folded[1], nn.BatchNorm1d)
        assert torch.equal(folded(x), ref)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert not rep.layers[0].folded
        assert _rel(q(x), ref) < 0.01  # was 1.37 for linear-3d


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: BN, then an activation, in forward."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class StdConv2d(nn.Conv2d):
    """Weight standardization in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class LoRAConv2d(nn.Conv2d):
    """A LoRA-style extra branch in _conv_forward."""

    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.lora = nn.Parameter(torch.randn(self.out_channels, self.in_channels))

    def _conv_forward(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        return super()._conv_forward(x, w, b) + torch.einsum("oi,nihw->nohw", self.lora, x)


class TaggedConv2d(nn.Conv2d):
    """A subclass that only adds an attribute: folds like nn.Conv2d."""

    tag = "plain"


class TaggedBN2d(nn.BatchNorm2d):
    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize(
    ("conv", "bn", "folds"),
    [
        (nn.Conv2d, BatchNormAct2d, False),
        (StdConv2d, nn.BatchNorm2d, False),
        (LoRAConv2d, nn.BatchNorm2d, False),
        (TaggedConv2d, TaggedBN2d, True),
    ],
)
def test_fold_only_stock_forwards(conv: type, bn: type, folds: bool) -> None:
    """Subclasses with a forward of their own compute more than the fold
    knows: left alone (the result stays exact); others fold."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 1), bn(8), nn.Conv2d(8, 4, 1)).eval()
    _randomize_bn(model, 1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
        folded, got = fold_batchnorm(model)
        assert [(f.layer, f.bn) for f in got] == ([("0", "1")] if folds else [])
        _assert_close(folded(x), ref)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert rep.layers[0].folded == folds
        assert _rel(q(x), ref) < 0.01  # BatchNormAct2d: 0.69, StdConv2d 0.41, LoRA 1.67


class Aliased(nn.Module):
    """The BN under two attribute names; forward calls the alias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.norm = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def test_fold_replaces_every_name_of_the_bn() -> None:
    torch.manual_seed(0)
    model = Aliased().eval()
    _randomize_bn(model, 1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert [(f.layer, f.bn) for f in folds] == [("conv", "bn")]
        assert isinstance(folded.bn, nn.Identity) and folded.norm is folded.bn
        _assert_close(folded(x), ref)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert rep.layers[0].folded and isinstance(q.norm, nn.Identity)
        assert _rel(q(x), ref) < 0.01  # was 0.73: the BN ran on the folded conv


class TiedBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1)
        self.b.bias = self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


def test_fold_skips_tied_biases() -> None:
    """Folding writes the bias: a bias another module holds is not folded into."""
    torch.manual_seed(0)
    model = TiedBias().eval()
    _randomize_bn(model, 1)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert folds == [] and folded.a.bias is folded.b.bias
        assert torch.equal(folded(x), ref)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert not any(r.folded for r in rep.layers)
        assert _rel(q(x), ref) < 0.01  # was 0.50


HOOKS = {
    "bn-forward": lambda conv, bn: bn.register_forward_hook(lambda m, i, o: None),
    "bn-forward-kwargs": lambda conv, bn: bn.register_forward_hook(
        lambda m, a, k, o: None, with_kwargs=True
    ),
    "bn-pre": lambda conv, bn: bn.register_forward_pre_hook(lambda m, i: None),
    "bn-backward": lambda conv, bn: bn.register_full_backward_hook(lambda m, gi, go: None),
    "bn-backward-pre": lambda conv, bn: bn.register_full_backward_pre_hook(lambda m, go: None),
    "conv-forward": lambda conv, bn: conv.register_forward_hook(lambda m, i, o: None),
    "conv-backward": lambda conv, bn: conv.register_full_backward_hook(lambda m, gi, go: None),
}


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("traceable", [True, False])
def test_fold_keeps_hooked_pairs(hook: str, traceable: bool) -> None:
    """Folding would drop the BN's hooks (it becomes a fresh nn.Identity)
    and show the conv's hooks the BN's output: such pairs are not folded,
    in the traced graph or the nn.Sequential fallback."""
    torch.manual_seed(0)
    model = (Sequential3() if traceable else Untraceable()).eval()
    _randomize_bn(model, 7)
    HOOKS[hook](model.features[0], model.features[1])
    folded, folds = fold_batchnorm(model)
    assert folds == []
    assert isinstance(folded.features[1], nn.BatchNorm2d)


class Sequential3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def test_fold_keeps_hooks_firing() -> None:
    """The caller's hooks on the BN and the conv see what they saw in the
    float model; a forward pre-hook on the conv (its input) allows folding."""
    seen: dict[str, torch.Tensor] = {}

    def tap(name: str):  # type: ignore[no-untyped-def]
        def hook(m: nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
            seen[name] = out.detach().clone()

        return hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    model.eval()
    _randomize_bn(model, 1)
    model[0].register_forward_hook(tap("conv"))
    model[1].register_forward_hook(tap("bn"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        ref = dict(seen)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        seen.clear()
        q(x)
    assert sorted(seen) == ["bn", "conv"] and not rep.layers[0].folded
    assert _rel(seen["conv"], ref["conv"]) < 0.01  # was 3.56: it saw the BN's output
    pre = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    pre[0].register_forward_pre_hook(lambda m, i: None)
    assert len(fold_batchnorm(pre)[1]) == 1


def test_fold_skips_training_mode_bn() -> None:
    """A BN in training mode normalizes with the batch's statistics: folding
    its running statistics would not be exact in that mode, so it is not
    folded (the copy computes what the model computes, in either mode)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.bn_add = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn_add(self.bn(self.conv(x)) + x))

    import copy

    torch.manual_seed(0)
    model = Net()
    _randomize_bn(model, 1)
    model.train()
    x = torch.randn(8, 4, 6, 6)
    folded, folds = fold_batchnorm(model)
    assert folds == [] and isinstance(folded.bn, nn.BatchNorm2d)
    with torch.no_grad():
        ref_train = copy.deepcopy(model)(x)
        ref_eval = copy.deepcopy(model).eval()(x)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert q.training and not any(r.folded for r in rep.layers)
        assert _rel(copy.deepcopy(q)(x), ref_train) < 0.01  # was 0.21
        assert _rel(copy.deepcopy(q).eval()(x), ref_eval) < 0.01
    # in eval mode the same model folds
    assert len(fold_batchnorm(model.eval())[1]) == 1


class _Times1(nn.Module):
    """A parametrization that computes a new tensor on every read."""

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b * 1.0


def test_fold_skips_a_parametrized_bias() -> None:
    """A parametrized bias is computed on every read: the folded bias
    written into it was lost (the BN became nn.Identity, its shift dropped:
    W8 error 0.77 instead of 0.0024). Such a layer is not folded, as one
    with a parametrized weight."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    _randomize_bn(model, 1)
    parametrize.register_parametrization(model[0], "bias", _Times1())
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert folds == [] and isinstance(folded[1], nn.BatchNorm2d)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert not rep.layers[0].folded and isinstance(q[1], nn.BatchNorm2d)
        assert _rel(q(x), ref) < 0.01


def test_no_bias_correction_into_a_parametrized_bias() -> None:
    """Bias correction wrote its shift into the parametrization's output (a
    temporary): the report said bias_corrected=True, the bias never
    changed. Such a layer is not corrected, and the report says so."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)).eval()
    _randomize_bn(model, 1)
    plain = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)).eval()
    plain.load_state_dict(model.state_dict())
    parametrize.register_parametrization(model[1], "bias", _Times1())
    _, rep = squant_rs.quantize_model(plain, 4, return_report=True)
    assert rep.layers[0].bias_corrected  # the same layer with a plain bias is corrected
    q, rep = squant_rs.quantize_model(model, 4, return_report=True)
    assert not rep.layers[0].bias_corrected
    assert torch.equal(q[1].bias, model[1].bias)


class TiedAutoencoder(nn.Module):
    """The encoder Conv (followed by its BN) also decodes, transposed,
    through ``F.conv_transpose2d(h, self.enc.weight)``: a ``get_attr``
    read of the weight in the graph."""

    def __init__(self, read: str = "weight") -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)
        self.read = read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(F.relu(self.bn(self.enc(x))))
        if self.read == "weight":
            return F.conv_transpose2d(h, self.enc.weight, padding=1)
        if self.read == "bias":
            return h + self.enc.bias.view(1, -1, 1, 1)
        # the parameter itself, not through the attribute (no getattr)
        weight = next(iter(self.enc.parameters()))
        return F.conv_transpose2d(h, weight, padding=1)


@pytest.mark.parametrize("read", ["weight", "bias", "parameters"])
def test_fold_skips_a_layer_whose_weight_the_graph_reads(read: str) -> None:
    """Folding writes the layer's weight and bias: a forward that also reads
    them directly (a tied decoder) got the folded values (W8 error 5.49
    instead of 0.005). Such a layer is not folded, by the capture and by
    torch.fx alike."""
    torch.manual_seed(0)
    model = TiedAutoencoder(read).eval()
    _randomize_bn(model, 1)
    assert _pairs_by_both_tracers(model) == ([], [])
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert folds == [] and isinstance(folded.bn, nn.BatchNorm2d)
        for kw in ({}, {"fold_bn": True, "bias_correction": False}):
            q, rep = squant_rs.quantize_model(model, 8, return_report=True, **kw)
            assert not any(r.folded for r in rep.layers)
            assert _rel(q(x), ref) < 0.02  # was 5.49


class ReadsMetadata(nn.Module):
    """A forward that reads only metadata of a folded layer's weight (CLIP's
    ``x.type(self.conv1.weight.dtype)``), or a bias it never uses."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "dtype":
            x = x.type(self.conv1.weight.dtype)
        elif self.how == "shape":
            x = x[:, : self.conv1.weight.shape[1]]
        elif self.how == "size":
            x = x[:, : self.conv1.weight.size(1)]
        elif self.how == "unused" and self.conv1.bias is not None:
            pass
        return self.fc(F.relu(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("how", ["dtype", "shape", "size", "unused"])
def test_a_metadata_read_of_a_weight_keeps_the_fold(how: str) -> None:
    """Only reads of values block folding and bias correction: a forward
    that reads a weight's dtype or shape, or has an unused attribute node,
    sees nothing folding writes (capture and torch.fx alike)."""
    torch.manual_seed(0)
    model = ReadsMetadata(how).eval()
    _randomize_bn(model, 1)
    assert _pairs_by_both_tracers(model) == ([("conv1", "bn1")], [("conv1", "bn1")])
    _, rep = squant_rs.quantize_model(
        model, 8, input_shape=(2, 3, 8, 8), recipe="squant+", return_report=True
    )
    rows = {r.name: r for r in rep.layers}
    assert rows["conv1"].folded and rows["fc"].bias_corrected


class ReadsBN(nn.Module):
    """A forward that reads its BN's tensors besides calling it."""

    def __init__(self, read: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Conv2d(8, 4, 1)
        self.read = read

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(F.relu(self.bn(self.conv(x))))
        if self.read == "weight":  # a network-slimming style penalty
            return y, self.bn.weight.abs().sum()
        return y, y.mean() * self.bn.running_var  # a buffer, an argument of the graph


@pytest.mark.parametrize("read", ["weight", "running_var"])
def test_fold_skips_a_bn_whose_tensors_the_graph_reads(read: str) -> None:
    """The folded model crashed ('Identity' object has no attribute
    'weight'); a BN whose tensors the graph reads is not folded."""
    torch.manual_seed(0)
    model = ReadsBN(read).eval()
    _randomize_bn(model, 1)
    assert _pairs_by_both_tracers(model) == ([], [])
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert not rep.layers[0].folded and isinstance(q.bn, nn.BatchNorm2d)
        out = q(x)
        assert _rel(out[0], ref[0]) < 0.01 and _rel(out[1], ref[1]) < 0.01


class ReadsBNAttributes(nn.Module):
    """A forward that reads a plain attribute of its BN (no graph node)
    and, when ``untraceable``, the BN's tensors (no graph at all: the
    ``nn.Sequential`` fallback folds)."""

    def __init__(self, untraceable: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.untraceable = untraceable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        y = y.view(y.size(0), self.body[1].num_features // 2, -1)
        if self.untraceable and x.sum() > 0:  # data-dependent: no graph
            return y, self.body[1].weight.abs().sum() + self.body[1].running_var.sum()
        return y, y.new_zeros(()) + self.body[1].eps


@pytest.mark.parametrize("untraceable", [False, True])
def test_a_folded_bn_keeps_its_attributes(untraceable: bool) -> None:
    """The nn.Identity that replaces a folded BN keeps the BN's attributes
    (num_features, eps, ...) and its tensors as non-persistent buffers: a
    forward that reads them still runs (it raised AttributeError) and
    reads the same values; the state dict is the folded model's."""
    torch.manual_seed(0)
    model = ReadsBNAttributes(untraceable).eval()
    _randomize_bn(model, 1)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert [(f.layer, f.bn, f.via) for f in folds] == [
            ("body.0", "body.1", "sequential" if untraceable else "fx")
        ]
        out = folded(x)  # AttributeError: 'Identity' object has no attribute 'num_features'
        _assert_close(out[0], ref[0])
        _assert_close(out[1], ref[1], rel=1e-6)
        ident, bn = folded.body[1], model.body[1]
        assert isinstance(ident, nn.Identity) and not ident.training
        assert (ident.num_features, ident.eps, ident.momentum) == (8, bn.eps, bn.momentum)
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ident, name), getattr(bn, name))
        assert list(ident.parameters()) == []
        assert set(folded.state_dict()) == {"body.0.weight", "body.0.bias"}
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        assert rep.layers[0].folded
        out = q(x)
        assert _rel(out[0], ref[0]) < 0.01 and _rel(out[1], ref[1]) < 1e-6
    # picklable as before (a whole-model torch.save)
    import io

    buf = io.BytesIO()
    torch.save(folded, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.body[1].num_features == 8


class UntraceableAlias(nn.Module):
    """An untraceable model whose Sequential's Conv is also registered
    earlier under another name (``stem``): ``named_modules`` knows it as
    ``stem`` only."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 8, 3, padding=1)
        self.stem = conv
        self.body = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if x.sum() > 0 else -y  # untraceable by torch.fx


class UntraceableShared(nn.Module):
    """An untraceable model in which one module is a child of two
    nn.Sequentials: the Conv (``shared="conv"``: each Sequential with its own
    BN), or the BN (``"bn"``: after its own Conv in ``a``, after a ReLU in
    ``b``)."""

    def __init__(self, shared: str) -> None:
        super().__init__()
        conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        if shared == "conv":
            self.a = nn.Sequential(conv, bn)
            self.b = nn.Sequential(conv, nn.BatchNorm2d(8))
        else:
            self.a = nn.Sequential(conv, bn)
            self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # untraceable by torch.fx
            return self.a(x) - self.b(x)
        return self.a(x)


def test_fold_sequential_fallback_aliases_and_shared_modules() -> None:
    """The fallback named a pair by the Sequential's children (``body.0``),
    which ``named_modules`` does not list for an aliased module: KeyError.
    Pairs are now named as ``named_modules`` names them, and a module that
    more than one nn.Sequential (or position) holds is not folded (the
    fallback's "called once"): folding it for one would change the other."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    model: nn.Module = UntraceableAlias().eval()
    _randomize_bn(model, 1)
    with torch.no_grad():
        ref = model(x)
        folded, folds = fold_batchnorm(model)
        assert [(f.layer, f.bn, f.via) for f in folds] == [("stem", "body.1", "sequential")]
        assert isinstance(folded.body[1], nn.Identity) and folded.stem is folded.body[0]
        _assert_close(folded(x), ref)
        q, rep = squant_rs.quantize_model(model, 8, return_report=True)
        flags = {r.name: r.folded for r in rep.layers}
        assert flags["stem"] and not flags["body.3"]
        assert _rel(q(x), ref) < 0.01
    for shared in ("conv", "bn"):
        model = UntraceableShared(shared).eval()
        _randomize_bn(model, 2)
        with torch.no_grad():
            ref = model(x)
            folded, folds = fold_batchnorm(model)
            assert folds == []
            assert isinstance(folded.a[1], nn.BatchNorm2d)
            assert torch.equal(folded(x), ref)
            for kw in ({}, {"fold_bn": True, "bias_correction": False}):
                q, rep = squant_rs.quantize_model(model, 8, return_report=True, **kw)
                assert not any(r.folded for r in rep.layers)
                assert _rel(q(x), ref) < 0.01
