"""Exact BatchNorm folding into the Conv/Linear layer that produces its input.

For a BatchNorm (eval mode, running statistics) fed only by a Conv1d/2d/3d
(grouped and depthwise included) or Linear layer, per output channel ``c``::

    k_c  = gamma_c / sqrt(var_c + eps)
    W'_c = k_c * W_c                     (every weight of output channel c)
    b'_c = beta_c + (b_c - mu_c) * k_c   (b_c = 0 where the layer has no bias)

so ``BN(layer(x)) == layer'(x)`` exactly (up to float rounding). The BN is
replaced by ``nn.Identity`` in place, so the layer keeps its module name and
``state_dict`` key (``<layer>.weight``, plus ``<layer>.bias``).

Each :class:`BatchNormFold` keeps the BN's ``beta`` and ``|gamma|`` per
channel: the mean and the standard deviation of the folded layer's output
under the usual assumption that the BN normalizes it (used by the
``squant+`` recipe for bias correction and activation ranges, see
``docs/recipe.md``).

The graph is read with ``torch.fx`` symbolic tracing (Conv, Linear and
BatchNorm modules, subclasses included, are kept as leaves). Where tracing
fails, consecutive ``(layer, BatchNorm)`` children of ``nn.Sequential``
containers are folded instead; :attr:`BatchNormFold.via` says which.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._squant_rs import scale_channels

if TYPE_CHECKING:
    import torch.fx
    from torch import nn

    from .capture import Graph as CapturedGraph


@dataclass(frozen=True)
class BatchNormFold:
    """One BatchNorm folded into its producer."""

    #: Module name of the Conv/Linear layer that absorbed the BN.
    layer: str
    #: Module name of the BN (now ``nn.Identity``).
    bn: str
    #: ``beta`` per output channel: the folded layer's output mean (float64).
    mean: np.ndarray
    #: ``|gamma|`` per output channel: the folded layer's output std (float64).
    std: np.ndarray
    #: ``"fx"`` (found in the traced graph) or ``"sequential"`` (fallback).
    via: str = "fx"


@functools.cache
def _producer_types() -> tuple[type[Any], ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@functools.cache
def _bn_types() -> tuple[type[Any], ...]:
    from torch import nn

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@functools.cache
def leaf_types() -> tuple[type[Any], ...]:
    """Module types kept as single nodes when tracing (subclasses included)."""
    from torch import nn

    return (
        *_producer_types(),
        *_bn_types(),
        nn.modules.conv._ConvTransposeNd,
        nn.ReLU,
        nn.ReLU6,
        nn.Hardtanh,
        nn.Identity,
    )


def trace(
    model: nn.Module, modules: dict[str, nn.Module] | None = None
) -> torch.fx.Graph | CapturedGraph | None:
    """The graph of ``model`` with Conv/Linear/BN/activation modules
    (subclasses included) as leaves: the nodes of the ``torch.fx`` symbolic
    trace, recorded by the cheaper :func:`~squant_rs.model.capture.capture`
    where it can mirror ``torch.fx`` (else by ``torch.fx``,
    :func:`trace_fx`), or ``None`` where symbolic tracing fails
    (data-dependent control flow and the like). ``modules``: ``model``'s
    ``named_modules()`` as a dict, where the caller has it."""
    from .capture import capture

    try:
        return capture(model, modules)
    except Exception:  # anything the capture does not mirror: torch.fx decides
        return trace_fx(model)


def trace_fx(model: nn.Module) -> torch.fx.Graph | None:
    """The ``torch.fx`` graph of ``model`` with Conv/Linear/BN/activation
    modules (subclasses included) as leaves, or ``None`` where symbolic
    tracing fails."""
    import torch.fx

    leaves = leaf_types()
    atoms = (int, float, bool, str, type(None))

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

        def create_arg(self, a: Any) -> Any:
            # The common arguments (a traced value, a number, a flat tuple
            # of them) without the generic pytree walk; the same nodes.
            t = type(a)
            if t is torch.fx.Proxy:
                return a.node
            if t in atoms:
                return a
            return super().create_arg(a)

    try:
        return _Tracer().trace(model)
    except Exception:  # any tracing failure: the caller falls back
        return None


def _foldable_bn(bn: nn.Module, producer: nn.Module) -> bool:
    """Whether ``bn`` (eval semantics from running statistics) can be folded
    into ``producer`` channel by channel."""
    from torch import nn

    if not isinstance(bn, _bn_types()) or not isinstance(producer, _producer_types()):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False  # track_running_stats=False: eval uses batch statistics
    out = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if bn.num_features != out:
        return False
    weight = getattr(producer, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.is_floating_point()


def _shared_weights(modules: Any) -> set[int]:
    """``id``s of the weights that more than one module holds (tied
    parameters): folding one layer's BN into such a weight would change
    the other layers too, so those layers are not folded."""
    owners: dict[int, int] = {}
    shared: set[int] = set()
    for module in modules:
        mid = id(module)
        for param in module._parameters.values():  # parameters(recurse=False)
            if param is not None and owners.setdefault(id(param), mid) != mid:
                shared.add(id(param))
    return shared


def _fx_pairs(
    model: nn.Module, graph: torch.fx.Graph | CapturedGraph, modules: dict[str, nn.Module]
) -> list[tuple[str, str]]:
    """``(layer, bn)`` names where the layer's only user is the BN, both
    modules are called exactly once in the graph and the layer's weight is
    its own (not tied to another module's). ``modules``: ``model``'s
    ``named_modules()``."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    shared: set[int] | None = None
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        bn_name, layer_name = str(node.target), str(src.target)
        if calls[bn_name] != 1 or calls[layer_name] != 1:
            continue
        layer = modules[layer_name]
        if not _foldable_bn(modules[bn_name], layer):
            continue
        if shared is None:
            shared = _shared_weights(modules.values())
        if id(layer.weight) not in shared:
            pairs.append((layer_name, bn_name))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, bn)`` names of consecutive children of ``nn.Sequential``s
    (a layer whose weight is tied to another module's excepted)."""
    from torch import nn

    shared = _shared_weights(model.modules())
    pairs: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module.named_children())
        for (n0, m0), (n1, m1) in zip(children, children[1:]):
            if _foldable_bn(m1, m0) and id(m0.weight) not in shared:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n0, prefix + n1))
    return pairs


def _vector(t: Any, n: int, default: float) -> np.ndarray:
    if t is None:
        return np.full(n, default)
    import torch

    d = t.detach()
    if d.device.type == "cpu" and d.dtype in (torch.float32, torch.float64):
        return np.asarray(d.numpy(), dtype=np.float64)  # exact, no torch op
    return np.asarray(d.cpu().double().numpy(), dtype=np.float64)


def _numpy_view(t: Any) -> np.ndarray | None:
    """A numpy view of a CPU float32/float64 tensor, else ``None``."""
    import torch

    d = t.detach()
    if d.device.type != "cpu" or d.dtype not in (torch.float32, torch.float64):
        return None
    out: np.ndarray = d.numpy()
    return out


def _vectors(tensors: list[Any], sizes: list[int], defaults: list[float]) -> np.ndarray:
    """The float64 values of ``tensors`` one after the other (``None``:
    its ``defaults`` entry repeated to its size). CPU tensors of one float dtype are
    joined by one ``torch.cat`` (a per-tensor conversion costs ~10 us;
    the same values: widening to float64 is exact)."""
    import torch

    if not tensors:
        return np.zeros(0)
    if all(t is None for t in tensors):
        return np.repeat(np.asarray(defaults, dtype=np.float64), sizes)
    first = tensors[0]
    if first is not None and first.device.type == "cpu":
        dtype = first.dtype
        if dtype in (torch.float32, torch.float64) and all(
            t is not None and t.dtype == dtype and t.device == first.device for t in tensors
        ):
            with torch.no_grad():
                joined = torch.cat(tensors) if len(tensors) > 1 else first.detach()
            return np.asarray(joined.numpy(), dtype=np.float64)
    return np.concatenate([_vector(t, n, d) for t, n, d in zip(tensors, sizes, defaults)])


def _fold_all(
    layers: list[Any], bns: list[Any], sources: list[Any], threads: int | None = None
) -> list[np.ndarray]:
    """Fold each ``bns[i]`` into ``layers[i]`` in place (:func:`_fold_one`
    of every pair; the per-channel arithmetic of all of them in one pass,
    each value the same as alone). Returns ``beta`` and ``|gamma|`` of each
    pair, in pair order (``[beta_0, |gamma_0|, beta_1, ...]``)."""
    import torch
    from torch import nn

    sizes = [int(bn.num_features) for bn in bns]
    c = sum(sizes)
    # mean, var, gamma, beta of every BN, joined (one torch.cat) where they can be
    mu, var, gamma, beta = np.split(
        _vectors(
            [bn.running_mean for bn in bns]
            + [bn.running_var for bn in bns]
            + [bn.weight for bn in bns]
            + [bn.bias for bn in bns],
            sizes * 4,
            [0.0] * len(bns) + [1.0] * len(bns) + [1.0] * len(bns) + [0.0] * len(bns),
        ),
        [c, 2 * c, 3 * c],
    )
    eps = np.repeat(np.array([float(bn.eps) for bn in bns], dtype=np.float64), sizes)
    k_all = gamma / np.sqrt(var + eps)
    biases = [layer.bias for layer in layers]
    new_all = beta + (_vectors(biases, sizes, [0.0] * len(bns)) - mu) * k_all
    abs_gamma = np.abs(gamma)
    out: list[np.ndarray] = []
    # CPU float32 weights written from another buffer: one native pass
    native: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    start = 0
    with torch.no_grad():
        for layer, n, bias, source in zip(layers, sizes, biases, sources):
            cut = slice(start, start + n)
            start += n
            k, new_bias = k_all[cut], new_all[cut]
            weight = layer.weight
            shape = (n,) + (1,) * (weight.dim() - 1)
            src = weight if source is None else source
            # One multiply per weight in its own dtype (native or numpy on CPU
            # float32/64: the same correctly rounded products as torch, without
            # torch's thread pool); k and the bias in float64.
            dst_np, src_np = _numpy_view(weight), _numpy_view(src)
            if dst_np is not None and src_np is not None and dst_np.flags.writeable:
                k_w = k.astype(dst_np.dtype)
                if (
                    dst_np.dtype == np.float32 == src_np.dtype
                    and dst_np.flags.c_contiguous
                    and src_np.flags.c_contiguous
                    and not np.may_share_memory(dst_np, src_np)
                ):
                    native.append((src_np, k_w, dst_np))  # all at once below
                else:
                    np.multiply(src_np, k_w.reshape(shape), out=dst_np)
            else:
                kt = torch.from_numpy(k).to(device=weight.device, dtype=weight.dtype)
                torch.mul(src.detach(), kt.reshape(shape), out=weight.data)
            if bias is not None:
                host = _numpy_view(bias)
                if host is not None and host.flags.writeable:
                    host[...] = new_bias  # rounded once to the bias dtype, as torch's copy_
                else:
                    bias.copy_(torch.from_numpy(new_bias).to(bias.dtype))
            else:
                if dst_np is not None:  # CPU float32/64: numpy's rounding is torch's
                    t = torch.from_numpy(new_bias.astype(dst_np.dtype))
                else:
                    t = torch.from_numpy(new_bias).to(device=weight.device, dtype=weight.dtype)
                layer.bias = nn.Parameter(t, requires_grad=weight.requires_grad)
            out += [beta[cut], abs_gamma[cut]]
    if native:
        srcs, ks, dsts = zip(*native)
        try:
            scale_channels(list(srcs), list(ks), list(dsts), threads)
        except Exception:  # e.g. numpy views the native module may not borrow: numpy
            for src_np, k_w, dst_np in native:
                np.multiply(src_np, k_w.reshape((-1,) + (1,) * (src_np.ndim - 1)), out=dst_np)
    return out


def _fold_one(layer: Any, bn: Any, source: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``bn`` into ``layer`` in place; ``(beta, |gamma|)`` as float64.
    With ``source`` (a tensor of the weight's shape, dtype and device), the
    layer's weight is overwritten with ``k * source`` instead of scaled by
    ``k`` (its values are not read), ``k = gamma / sqrt(var + eps)``."""
    beta, abs_gamma = _fold_all([layer], [bn], [source])
    return beta, abs_gamma


def _set_submodule(
    model: nn.Module, name: str, module: nn.Module, modules: dict[str, nn.Module] | None = None
) -> None:
    parent_name, _, child = name.rpartition(".")
    if modules is not None and parent_name in modules:
        parent = modules[parent_name]
    else:
        parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fold_batchnorm(
    model: nn.Module, *, inplace: bool = False
) -> tuple[nn.Module, list[BatchNormFold]]:
    """Fold every BatchNorm that follows a Conv/Linear layer into it.

    A BN is folded when its producer is a Conv1d/2d/3d or Linear module
    (subclasses included) whose output feeds only that BN, both are called
    once, the BN has running statistics and as many features as the layer
    has output channels. Other BNs are left alone. The folded BNs are
    replaced by ``nn.Identity``; layers without a bias get one.

    Returns:
        ``(model, folds)``: the folded model (``model`` itself with
        ``inplace=True``, else a deep copy) and one :class:`BatchNormFold`
        per folded BN, in graph order.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    return target, fold_batchnorm_graph(target, trace(target))


def fold_batchnorm_graph(
    model: nn.Module,
    graph: torch.fx.Graph | CapturedGraph | None,
    sources: dict[int, Any] | None = None,
    modules: dict[str, nn.Module] | None = None,
    threads: int | None = None,
) -> list[BatchNormFold]:
    """:func:`fold_batchnorm` in place on ``model`` with its traced ``graph``
    (``None``: the ``nn.Sequential`` fallback). ``sources`` maps the ``id``
    of a layer weight whose values are not set yet (a copy that was never
    cloned) to the tensor holding them: a folded layer's weight is then
    written from it. ``modules``: ``model.named_modules()`` as a dict, where
    the caller has it. ``threads``: for the weights' products (``None``: as
    the native module decides). Returns the folds."""
    from torch import nn

    if modules is None:
        modules = dict(model.named_modules())
    if graph is not None:
        pairs, via = _fx_pairs(model, graph, modules), "fx"
    else:
        pairs, via = _sequential_pairs(model), "sequential"
    layers = [modules[layer_name] for layer_name, _ in pairs]
    srcs = [sources.get(id(layer.weight)) if sources else None for layer in layers]
    values = _fold_all(layers, [modules[bn_name] for _, bn_name in pairs], srcs, threads)
    folds: list[BatchNormFold] = []
    for i, (layer_name, bn_name) in enumerate(pairs):
        _set_submodule(model, bn_name, nn.Identity(), modules)
        folds.append(BatchNormFold(layer_name, bn_name, values[2 * i], values[2 * i + 1], via))
    return folds
