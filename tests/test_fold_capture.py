"""model.capture: the recipe's cheap graph capture records what torch.fx
records (the same nodes, arguments and users, so the same BN pairs, input
statistics and execution order), and falls back to torch.fx where it cannot."""

from __future__ import annotations

import math
import operator
import sys
from pathlib import Path
from typing import Any

import pytest

from squant_rs.model import capture as cap
from squant_rs.model import fold
from squant_rs.model.recipe import analyze, execution_order

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

sys.path.insert(0, str(Path(__file__).parent))
from mobilenet_v2 import random_mobilenet_v2  # noqa: E402


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


class ResBlock(nn.Module):
    """ResNet's basic block: functional ReLU, in-place residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return F.relu(out)


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Zoo(nn.Module):
    """Depthwise, SE gate, concat, channel shuffle (size() unpacking), a
    parameter read in forward (layer scale), functional relu6/hardtanh with
    positional and keyword bounds, an assert on a shape, a conv feeding two
    users, a Linear head after view(size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), _bn(8)
        self.block = ResBlock(8)
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), _bn(8)
        self.se = SE(8)
        self.left, self.bn_l = nn.Conv2d(8, 8, 1, bias=False), _bn(8)
        self.right, self.bn_r = nn.Conv2d(8, 8, 1, bias=False), _bn(8)
        self.scale = nn.Parameter(torch.full((1, 16, 1, 1), 0.5))
        self.two, self.bn_two = nn.Conv2d(16, 16, 1), _bn(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = self.block(x)
        x = F.hardtanh(self.bn_dw(self.dw(x)), 0.0, 4.0)
        x = self.se(x)
        y = torch.cat(
            [F.hardtanh(self.bn_l(self.left(x)), min_val=-1.0), self.bn_r(self.right(x))], 1
        )
        b, c, h, w = y.size()
        torch._assert(y.dim() == 4, f"expected 4 dims, got {y.shape}")
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = self.scale * y
        z = self.two(y)
        y = F.relu(self.bn_two(z) + z)
        y = self.drop(self.pool(y))
        return self.fc(y.view(y.size(0), -1))


class Defaults(nn.Module):
    """A forward with a default argument: the capture leaves it to torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _bn(4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bn(self.conv(x)) * scale


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _bn(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(x))
        return self.conv(x)


def _rows(graph: Any, model: nn.Module, fx: bool) -> list[tuple[Any, ...]]:
    """The nodes as comparable rows: torch.fx's get_attr nodes of tensors
    that are no parameter (the capture keeps those tensors themselves) count
    as tensors; a string holding a value's repr is a placeholder."""
    params = {n for n, _ in model.named_parameters()}
    nodes = [n for n in graph.nodes if not (fx and n.op == "get_attr" and n.target not in params)]
    index = {n: i for i, n in enumerate(nodes)}

    def arg(a: Any) -> Any:
        if isinstance(a, (tuple, list)):
            return ("tuple" if type(a) is tuple else "list", tuple(arg(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, arg(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", arg(a.start), arg(a.stop), arg(a.step))
        if hasattr(a, "op"):
            return ("node", index[a]) if a in index else "tensor"
        if isinstance(a, torch.Tensor):
            return "tensor"
        if isinstance(a, str) and ("Proxy(" in a):
            return "repr"
        return repr(a)

    rows = []
    for n in nodes:
        t = "input" if n.op == "placeholder" else n.target
        users = tuple(sorted(index[u] for u in n.users if u in index))
        rows.append((n.op, t, arg(n.args), arg(n.kwargs), users))
    return rows


def _stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if v is None else (v.mu.tobytes(), v.sigma.tobytes(), v.lo, v.hi, v.source)
        for k, v in stats.items()
    }


def _check_same(model: nn.Module) -> int:
    model.eval()
    fx_graph = fold.trace_fx(model)
    assert fx_graph is not None
    graph = cap.capture(model)
    assert _rows(graph, model, False) == _rows(fx_graph, model, True)
    modules = dict(model.named_modules())
    assert fold._fx_pairs(model, graph, modules) == fold._fx_pairs(model, fx_graph, modules)
    s_cap, s_fx = analyze(model, graph, modules), analyze(model, fx_graph, modules)
    assert _stats(s_cap) == _stats(s_fx)
    assert execution_order(graph, list(s_cap)) == execution_order(fx_graph, list(s_fx))
    return len(graph.nodes)


def test_capture_matches_fx_on_the_zoo() -> None:
    torch.manual_seed(0)
    zoo = Zoo()
    assert _check_same(zoo) > 40
    stats = analyze(zoo, cap.capture(zoo), dict(zoo.named_modules()))
    # what the walk reads: functional hardtanh bounds through a pooling, a
    # BN + relu, the BN pairs (not a conv with two users); a product is unknown
    se = stats["se.fc1"]
    assert se is not None and (se.lo, se.hi, se.source) == (0.0, 4.0, "bn+hardtanh")
    assert stats["block.conv2"] is not None and stats["block.conv2"].hi == math.inf
    assert stats["left"] is None and stats["fc"] is None
    pairs = fold._fx_pairs(zoo, cap.capture(zoo), dict(zoo.named_modules()))
    assert ("stem", "bn0") in pairs and ("two", "bn_two") not in pairs


def test_capture_matches_fx_on_mobilenet_v2() -> None:
    model = random_mobilenet_v2(0)
    assert _check_same(model) > 150
    order = execution_order(cap.capture(model), [n for n, _ in model.named_modules()])
    assert order[0] == "features.0.0" and order[-1] == "classifier.1"


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "efficientnet_b0", "swin_t"]
)
def test_capture_matches_fx_on_torchvision(name: str) -> None:
    try:
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None)
    except Exception as exc:  # no torchvision, or one built for another torch
        pytest.skip(f"torchvision: {type(exc).__name__}")
    _check_same(model)


def test_trace_falls_back_to_fx() -> None:
    model = Defaults().eval()
    with pytest.raises(cap.CaptureError):
        cap.capture(model)
    graph = fold.trace(model)
    assert graph is not None and not isinstance(graph, cap.Graph)
    assert fold._fx_pairs(model, graph, dict(model.named_modules())) == [("conv", "bn")]
    assert isinstance(fold.trace(random_mobilenet_v2(0)), cap.Graph)


def test_untraceable_model_gives_no_graph_and_restores_torch() -> None:
    from torch.fx import _symbolic_trace as st

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    model = Untraceable().eval()
    with pytest.raises(cap.CaptureError):
        cap.capture(model)
    assert fold.trace(model) is None and fold.trace_fx(model) is None
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert not st._get_is_fx_tracing()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():  # the model still runs normally
        assert model(x).shape == (1, 4, 4, 4)


def test_capture_records_operators_like_fx() -> None:
    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.register_buffer("ref", torch.zeros(1, 2, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y = (2 * y - y[:, :1]) / (y.mean(dim=1, keepdim=True) + 1)
            return y + y.new_zeros(self.ref.shape)  # a torch.Size argument

    model = Ops()
    graph = cap.capture(model)
    targets = [n.target for n in graph.nodes]
    assert targets[:3] == ["x", "conv", operator.mul]
    assert operator.getitem in targets and "mean" in targets and operator.truediv in targets
    _check_same(model)
    conv = graph.nodes[1]
    assert [u.target for u in conv.users] == [operator.mul, operator.getitem, "mean"]
