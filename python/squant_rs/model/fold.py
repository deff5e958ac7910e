"""Exact BatchNorm folding into the Conv layer that produces its input.

For a BatchNorm (in eval mode, with running statistics) fed only by a
Conv1d/2d/3d of its own dimension (grouped and depthwise included), per
output channel ``c``::

    k_c  = gamma_c / sqrt(var_c + eps)
    W'_c = k_c * W_c                     (every weight of output channel c)
    b'_c = beta_c + (b_c - mu_c) * k_c   (b_c = 0 where the layer has no bias)

so ``BN(layer(x)) == layer'(x)`` exactly (up to float rounding). The BN is
replaced by ``nn.Identity`` in place, so the layer keeps its module name and
``state_dict`` key (``<layer>.weight``, plus ``<layer>.bias``). That
``nn.Identity`` keeps the BN's attributes (``num_features``, ``eps``, ...)
and its tensors as non-persistent buffers (the same values, not in the
``state_dict``): code that reads them still runs.

Each :class:`BatchNormFold` keeps the BN's ``beta`` and ``|gamma|`` per
channel: the mean and the standard deviation of the folded layer's output
under the usual assumption that the BN normalizes it (used by the
``squant+`` recipe for bias correction and activation ranges, see
``docs/recipe.md``).

What is never folded (the BN stays, the layer keeps its weights):

* a BN after a ``Linear``: the graph carries no shapes, and a BatchNorm
  normalizes dimension 1, which is the Linear's output features only for
  2-D input (``Linear`` on ``(N, L, F)`` followed by ``BatchNorm1d(L)``
  normalizes ``L``); a BN whose dimension is not its Conv's (``Conv2d``
  then ``BatchNorm1d``) likewise;
* a BN in training mode (``bn.training``: it normalizes with the batch's
  statistics, so folding would not be exact in that mode);
* a BN or layer subclass with a ``forward`` (or a Conv's ``_conv_forward``)
  of its own, e.g. timm's ``BatchNormAct2d`` or a weight-standardized or
  LoRA conv: only the stock torch computation is known (a subclass that
  only adds attributes folds);
* a pair with hooks that folding would bypass: any forward, forward-pre or
  backward hook on the BN, a forward or backward hook on the layer (its
  forward pre-hooks see its input, which folding does not change);
* a layer whose weight or bias another module also holds (folding would
  change that module too), or whose weight or bias is parametrized
  (``torch.nn.utils.parametrize``: computed on every read);
* a pair whose tensors the graph reads directly (``get_attr`` nodes, or
  the tensor as an argument: a tied decoder's
  ``F.conv_transpose2d(h, self.enc.weight)`` would read the folded weight,
  a penalty on ``self.bn.weight`` keeps the BN).

A BN reachable under several attribute names is replaced by
``nn.Identity`` under every one of them.

The graph is read with ``torch.fx`` symbolic tracing (Conv, Linear and
BatchNorm modules, subclasses included, are kept as leaves). Where tracing
fails, consecutive ``(Conv, BatchNorm)`` children of ``nn.Sequential``
containers are folded instead; :attr:`BatchNormFold.via` says which (named
as ``named_modules()`` names them; a Conv or BN that the ``nn.Sequential``
containers hold more than once is not folded, as one called twice in the
graph). That fallback assumes the ``nn.Sequential`` runs as a unit (its
forward calls the children one after the other, nothing else reads the
Conv's output or weight): a forward that iterates the children itself and
keeps the Conv's output gets a wrong result from it (what ``torch.onnx``'s
exporter, which folds such pairs too, assumes as well).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._squant_rs import scale_channels
from .layers import check_not_shared, copy_model

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


@functools.cache
def _bn_convs() -> tuple[tuple[type[Any], type[Any]], ...]:
    """Each BatchNorm type and the Conv type it folds into."""
    from torch import nn

    return (
        (nn.BatchNorm1d, nn.Conv1d),
        (nn.BatchNorm2d, nn.Conv2d),
        (nn.BatchNorm3d, nn.Conv3d),
    )


#: Per module type and base types: whether it computes what its torch base does.
_STOCK: dict[tuple[type[Any], tuple[type[Any], ...]], bool] = {}


def is_stock(module: Any, bases: tuple[type[Any], ...]) -> bool:
    """Whether ``module`` is an instance of one of the torch module types
    ``bases`` (the first it is one of) that runs that type's computation:
    its ``forward`` (a Conv's ``_conv_forward`` too) and ``__call__`` are
    the base's own and no instance attribute replaces ``forward``. A
    subclass that only adds attributes or overrides other methods (a BN's
    ``_check_input_dim``) is stock; timm's ``BatchNormAct2d`` or a LoRA
    conv is not."""
    t = type(module)
    key = (t, bases)
    stock = _STOCK.get(key)
    if stock is None:
        from torch import nn

        stock = False
        for base in bases:
            if issubclass(t, base):
                conv = getattr(base, "_conv_forward", None)
                stock = (
                    t.forward is base.forward
                    and t.__call__ is nn.Module.__call__
                    and (conv is None or getattr(t, "_conv_forward", None) is conv)
                )
                break
        _STOCK[key] = stock
    return stock and "forward" not in getattr(module, "__dict__", {})


#: Hook dictionaries of a BN that folding (the BN replaced by ``nn.Identity``) would drop.
_BN_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
#: Hook dictionaries of a layer that would see the BN's output (or its
#: gradient) after folding; its forward pre-hooks see its unchanged input.
_LAYER_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _has_hooks(module: Any, names: tuple[str, ...]) -> bool:
    return any(getattr(module, n, None) for n in names)


def _foldable_bn(bn: nn.Module, producer: nn.Module) -> bool:
    """Whether ``bn`` can be folded into ``producer`` channel by channel,
    exactly in the mode the model is in (see the module doc for what is
    not folded)."""
    from torch import nn

    if not (is_stock(bn, _bn_types()) and is_stock(producer, _producer_types())):
        return False
    # A BN normalizes dimension 1: the Conv's channels where the dimensions
    # match; a Linear's features only for 2-D input, which the graph does
    # not tell.
    if not any(isinstance(bn, b) and isinstance(producer, c) for b, c in _bn_convs()):
        return False
    if bn.training:
        return False  # normalizes with the batch's statistics
    if any(getattr(bn, k) is None for k in ("running_mean", "running_var")):
        return False  # track_running_stats=False: eval uses batch statistics
    if bn.num_features != producer.out_channels:
        return False
    if _has_hooks(bn, _BN_HOOKS) or _has_hooks(producer, _LAYER_HOOKS):
        return False
    # The module's own parameter (a parametrized weight is not one, and is
    # not computed: reading it runs the parametrization).
    weight = producer._parameters.get("weight")
    if not (isinstance(weight, nn.Parameter) and weight.is_floating_point()):
        return False
    bias = producer._parameters.get("bias")
    if weight.is_meta or (bias is not None and bias.is_meta):
        return False  # no values to fold (a chosen layer's are refused by name)
    # Nor a parametrized bias: reading it computes a new tensor, so the
    # folded bias written into it would be lost.
    return not is_parametrized(producer, "bias")


def is_parametrized(module: Any, name: str) -> bool:
    """Whether ``module``'s ``name`` is computed by a
    ``torch.nn.utils.parametrize`` parametrization (reading it gives a new
    tensor on every read: writing into that changes nothing).
    ``parametrize.is_parametrized`` without its ``nn.Module.__getattr__``
    miss on an unparametrized module."""
    found = module._modules.get("parametrizations") if hasattr(module, "_modules") else None
    return found is not None and name in found


def _shared_weights(modules: Any) -> set[int]:
    """``id``s of the parameters that more than one module holds (tied
    parameters): folding one layer's BN into such a weight or bias would
    change the other modules too, so those layers are not folded."""
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
    modules are called exactly once in the graph, :func:`_foldable_bn`
    holds, the layer's weight and bias are its own (not tied to another
    module's) and the graph reads none of the pair's tensors directly
    (:func:`_graph_reads`). ``modules``: ``model``'s ``named_modules()``."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    shared: set[int] | None = None
    reads: set[int] | None = None
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
        layer, bn = modules[layer_name], modules[bn_name]
        if not _foldable_bn(bn, layer):
            continue
        if shared is None:
            shared = _shared_weights(modules.values())
            reads = _graph_reads(model, graph)
        if not _owns_parameters(layer, shared):
            continue
        # Folding writes the layer's weight and bias and removes the BN:
        # a direct read of either's tensors would see the change.
        if reads is None or any(id(t) in reads for t in _tensors(layer, bn)):
            continue
        pairs.append((layer_name, bn_name))
    return pairs


def _tensors(*modules: Any) -> list[Any]:
    """The parameters and buffers of ``modules`` (not recursing)."""
    return [
        t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
    ]


#: Tensor attributes and methods that read no values (a tensor's dtype,
#: shape, ...): a graph node using a weight only through them does not see
#: what folding or bias correction write into it.
_METADATA_ATTRS = frozenset(
    ("dtype", "shape", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse")
)
_METADATA_METHODS = frozenset(
    ("size", "dim", "numel", "nelement", "element_size", "get_device", "is_floating_point")
)


def _reads_metadata(user: Any, node: Any) -> bool:
    """Whether graph node ``user`` reads only metadata of ``node``'s tensor
    (``getattr(t, "dtype")``, ``t.size()``, ...)."""
    import builtins

    args = user.args
    if not args or args[0] is not node:
        return False
    if user.op == "call_function" and user.target is builtins.getattr:
        return len(args) == 2 and args[1] in _METADATA_ATTRS
    return user.op == "call_method" and user.target in _METADATA_METHODS


def _graph_reads(model: nn.Module, graph: torch.fx.Graph | CapturedGraph) -> set[int] | None:
    """``id``s of the tensors ``graph`` reads directly rather than through
    a module call: the targets of its ``get_attr`` nodes (``torch.fx``'s
    parameters, buffers and constants; the capture's parameters read
    through a module attribute) and the tensors among its nodes' arguments
    (the capture keeps a buffer, a constant or a parameter not read
    through an attribute, e.g. from ``parameters()``, as the tensor
    itself); a ``get_attr`` node nothing uses, or used only for metadata
    (``w.dtype``, ``w.shape``, ``w.size()``: :func:`_reads_metadata`), is
    no read. ``None`` where a ``get_attr`` target does not resolve (then
    any tensor may be read: nothing is folded)."""
    from torch import Tensor

    reads: set[int] = set()
    stack: list[Any] = []
    for node in graph.nodes:
        if node.op == "get_attr" and all(_reads_metadata(u, node) for u in node.users):
            continue  # unused, or only its dtype, shape, ... read: no value seen
        if node.op == "get_attr":
            try:
                target = functools.reduce(getattr, str(node.target).split("."), model)
            except AttributeError:
                return None
            reads.add(id(target))
        stack.append(node.args)
        stack.append(node.kwargs)
    while stack:
        a = stack.pop()
        t = type(a)
        if t is tuple or t is list:
            stack.extend(a)
        elif t is dict:
            stack.extend(a.values())
        elif isinstance(a, Tensor):
            reads.add(id(a))
        elif t is slice:
            stack.extend((a.start, a.stop, a.step))
        elif isinstance(a, (tuple, list)):  # torch.Size, a named tuple
            stack.extend(a)
    return reads


def _owns_parameters(layer: Any, shared: set[int]) -> bool:
    """Whether no other module holds ``layer``'s weight or bias."""
    bias = layer._parameters.get("bias")
    return id(layer._parameters["weight"]) not in shared and (
        bias is None or id(bias) not in shared
    )


def _sequential_pairs(modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """``(layer, bn)`` names (``modules``' names: the model's
    ``named_modules()``, where an aliased module has its first name) of
    consecutive children of ``nn.Sequential``s. Excepted: a layer whose
    weight or bias is tied to another module's, and a pair either of whose
    modules the ``nn.Sequential``s hold more than once (in two of them, or
    twice in one: called more than once, as the graph's rule)."""
    from torch import nn

    names = {id(m): name for name, m in modules.items()}
    seqs = [m for m in modules.values() if type(m) is nn.Sequential]
    held: dict[int, int] = {}
    for seq in seqs:
        for child in seq._modules.values():
            if child is not None:
                held[id(child)] = held.get(id(child), 0) + 1
    shared = _shared_weights(modules.values())
    pairs: list[tuple[str, str]] = []
    for seq in seqs:
        children = [m for m in seq._modules.values() if m is not None]
        for m0, m1 in zip(children, children[1:]):
            if (
                held[id(m0)] == 1
                and held[id(m1)] == 1
                and _foldable_bn(m1, m0)
                and _owns_parameters(m0, shared)
            ):
                pairs.append((names[id(m0)], names[id(m1)]))
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


def fold_batchnorm(
    model: nn.Module, *, inplace: bool = False
) -> tuple[nn.Module, list[BatchNormFold]]:
    """Fold every BatchNorm that follows a Conv/Linear layer into it.

    A BN is folded when its producer is a Conv1d/2d/3d of the BN's
    dimension (a stock torch module or a subclass that keeps its forward)
    whose output feeds only that BN, both are called once, the BN is in
    eval mode, has running statistics and as many features as the layer
    has output channels, neither has hooks that folding would bypass,
    the layer's weight and bias are its own and the graph reads neither
    module's tensors directly. Other BNs (a BN after a ``Linear``
    included) are left alone; the module doc lists why. The folded BNs are
    replaced by ``nn.Identity`` (under every name that holds them; it
    keeps the BN's attributes and tensors, not as parameters); layers
    without a bias get one.

    Returns:
        ``(model, folds)``: the folded model (``model`` itself with
        ``inplace=True``, else a deep copy) and one :class:`BatchNormFold`
        per folded BN, in graph order.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        InvalidArgumentError: without ``inplace``, the copy shares with
            ``model`` what a fold would write (a ``__deepcopy__`` that
            returns ``self``); ``model`` is left unchanged.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shared: set[int] = set()
    target = model if inplace else copy_model(model, (), shared=shared)
    return target, fold_batchnorm_graph(target, trace(target), shared=shared)


def fold_batchnorm_graph(
    model: nn.Module,
    graph: torch.fx.Graph | CapturedGraph | None,
    sources: dict[int, Any] | None = None,
    modules: dict[str, nn.Module] | None = None,
    threads: int | None = None,
    shared: set[int] | None = None,
) -> list[BatchNormFold]:
    """:func:`fold_batchnorm` in place on ``model`` with its traced ``graph``
    (``None``: the ``nn.Sequential`` fallback). ``sources`` maps the ``id``
    of a layer weight whose values are not set yet (a copy that was never
    cloned) to the tensor holding them: a folded layer's weight is then
    written from it. ``modules``: ``model.named_modules()`` as a dict, where
    the caller has it. ``threads``: for the weights' products (``None``: as
    the native module decides). ``shared``: what ``model``, a copy, shares
    with the original (:func:`~squant_rs.model.layers.copy_model`): the
    folds are refused, before anything is written, where they would write
    into one of those (a layer's weight or bias, a module holding a BN).
    Returns the folds."""
    if modules is None:
        modules = dict(model.named_modules())
    if graph is not None:
        pairs, via = _fx_pairs(model, graph, modules), "fx"
    else:
        pairs, via = _sequential_pairs(modules), "sequential"
    layers = [modules[layer_name] for layer_name, _ in pairs]
    if shared:
        check_not_shared(shared, _fold_writes(modules, pairs))
    srcs = [sources.get(id(layer.weight)) if sources else None for layer in layers]
    values = _fold_all(layers, [modules[bn_name] for _, bn_name in pairs], srcs, threads)
    folds: list[BatchNormFold] = []
    identities: dict[int, nn.Module] = {}
    for i, (layer_name, bn_name) in enumerate(pairs):
        identities[id(modules[bn_name])] = _stand_in(modules[bn_name])
        folds.append(BatchNormFold(layer_name, bn_name, values[2 * i], values[2 * i + 1], via))
    if identities:
        _replace_everywhere(modules.values(), identities)
    return folds


def _fold_writes(
    modules: dict[str, nn.Module], pairs: list[tuple[str, str]]
) -> Iterator[tuple[str, Any]]:
    """What folding ``pairs`` writes (for
    :func:`~squant_rs.model.layers.check_not_shared`): each layer's weight,
    its bias (or the layer, where it gets one) and every module holding a
    folded BN (:func:`_replace_everywhere`)."""
    for layer_name, _ in pairs:
        layer = modules[layer_name]
        yield f"the weight of layer {layer_name!r}", layer.weight
        bias = getattr(layer, "bias", None)
        if bias is None:
            yield f"layer {layer_name!r} ({type(layer).__name__}, which gets a bias)", layer
        else:
            yield f"the bias of layer {layer_name!r}", bias
    bns = {id(modules[bn_name]) for _, bn_name in pairs}
    for name, parent in modules.items():
        if any(child is not None and id(child) in bns for child in parent._modules.values()):
            what = f"module {name!r}" if name else "the model itself"
            yield f"{what} ({type(parent).__name__}, whose BatchNorm is replaced)", parent


@functools.cache
def _module_fields() -> dict[str, Any]:
    """The instance fields every fresh ``nn.Module`` has (its registries,
    hooks and ``training``), by name, with their initial values
    (``nn.Identity()`` sets no others)."""
    from torch import nn

    return dict(vars(nn.Module()))


def _fresh_module_fields() -> dict[str, Any]:
    """:func:`_module_fields` with each registry (dict, set, list) a new
    empty copy: what a fresh module has, without the ~10 us of
    ``nn.Module.__init__``."""
    return {
        k: (type(v)() if isinstance(v, (dict, set, list)) else v)
        for k, v in _module_fields().items()
    }


def _stand_in(bn: nn.Module) -> nn.Module:
    """The ``nn.Identity`` that replaces the folded ``bn``: it keeps ``bn``'s
    own attributes (``num_features``, ``eps``, ...) and mode, and its
    parameters and buffers as non-persistent buffers (the same values, not
    in the state dict nor among the parameters), so that code reading them
    (not in the graph: a plain attribute, or a forward the fallback folds)
    still runs and reads what it read."""
    from torch import nn

    out = nn.Identity.__new__(nn.Identity)  # nn.Identity() without __init__'s cost:
    vars(out).update(_fresh_module_fields())  # its fields, each registry new
    out.training = bn.training
    internal = _module_fields()
    # Written into the registries directly (what setattr / register_buffer
    # store for these names, without their checks: ~30 us a BN otherwise).
    # Plain attributes only: parameters, buffers and modules live in the
    # registries, not in vars().
    vars(out).update((k, v) for k, v in vars(bn).items() if k not in internal)
    for key, t in (*bn._parameters.items(), *bn._buffers.items()):
        out._buffers[key] = None if t is None else t.detach()
        out._non_persistent_buffers_set.add(key)
    return out


def _replace_everywhere(parents: Any, new: dict[int, nn.Module]) -> None:
    """Replace each module whose ``id`` is a key of ``new`` by its value
    under every attribute name that holds it (an alias ``self.norm =
    self.bn`` included): every ``(parent, name)`` edge of the module tree
    of ``parents`` (the model's distinct modules)."""
    edits = [
        (parent, key, new[id(child)])
        for parent in parents
        for key, child in parent._modules.items()
        if child is not None and id(child) in new
    ]
    for parent, key, module in edits:
        setattr(parent, key, module)
