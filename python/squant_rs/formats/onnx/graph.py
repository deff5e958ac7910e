"""The layers of a graph: the Conv / Gemm / MatMul nodes whose weights get
quantized (:func:`_find_layers`), and the walk over a graph's subgraphs."""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...model.layers import matches_any
from .common import require_onnx

if TYPE_CHECKING:
    from ...tensor.quantized import QuantizedTensor


#: Ops with a weight operand: ConvTranspose's stays float (another layout).
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Ops a layer may read its weight initializer through (besides Identity):
#: they keep its rank and compute nothing from its values, so the whole
#: initializer is quantized and they read its DequantizeLinear (torch's
#: exporter slices a cross-attention's packed ``in_proj_weight`` at run
#: time, where the batch is dynamic, and transposes the slices).
_VIEW_OPS = frozenset({"Slice", "Transpose"})


@dataclass
class _Layer:
    """One Conv/Gemm/MatMul node whose weight is a float32 initializer."""

    name: str
    node: Any  # onnx.NodeProto
    weight: str  # the initializer, looked up through Identity nodes
    axis: int  # output-channel axis of the weight as stored
    op: str
    act: tuple[int, float, float] | None = None  # (bits, x_min, x_max) of the input
    # The Slice / Transpose node that reads the initializer (its first
    # input) where the layer reads a view of it (:data:`_VIEW_OPS`); None:
    # the layer reads it as its weight input.
    via: Any = None


@dataclass
class _Weight:
    """One quantized initializer (shared by every layer in ``layers``)."""

    name: str  # the float initializer it replaces
    axis: int
    qt: QuantizedTensor  # in (OC, ...) layout: the transpose when axis == 1
    layers: list[_Layer] = field(default_factory=list)
    base: str = ""  # prefix of the new tensors' names (default: ``name``)


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _identity_source(producers: dict[str, Any], inits: dict[str, Any], tensor: str) -> str:
    """The tensor ``tensor`` is a copy of through a chain of Identity nodes
    (torch's exporter reads a shared or equal-valued weight through one),
    or ``tensor`` itself."""
    seen: set[str] = set()
    while tensor not in inits and tensor not in seen:
        seen.add(tensor)
        p = producers.get(tensor)
        if p is None or p.op_type != "Identity" or not p.input:
            break
        tensor = p.input[0]
    return tensor


def _view_source(
    producers: dict[str, Any], inits: dict[str, Any], tensor: str
) -> tuple[str, Any, list[list[int] | None]] | None:
    """Where ``tensor`` is a view of an initializer: computed from it by
    Slice / Transpose nodes (:data:`_VIEW_OPS`, Identity nodes between
    them), ``(initializer, the node reading it, the Transposes' perms from
    ``tensor`` back)``; else None (also for a perm that is no permutation
    of the initializer's axes). The Slices' starts and ends may be
    anything, computed at run time included."""
    perms: list[list[int] | None] = []
    reader = None
    seen: set[str] = set()
    while True:
        tensor = _identity_source(producers, inits, tensor)
        if tensor in inits:
            axes = list(range(len(inits[tensor].dims)))
            if reader is None or any(p is not None and sorted(p) != axes for p in perms):
                return None
            return tensor, reader, perms
        p = producers.get(tensor)
        if tensor in seen or p is None or p.op_type not in _VIEW_OPS or not p.input:
            return None
        seen.add(tensor)
        if p.op_type == "Transpose":
            perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
            perms.append(perm)
        reader, tensor = p, p.input[0]


def _viewed_axis(axis: int, perms: list[list[int] | None], ndim: int) -> int:
    """The initializer's axis that is ``axis`` of its view through the
    Transposes of ``perms`` (:func:`_view_source`; ``ndim`` axes)."""
    for perm in perms:
        axis = (ndim - 1 - axis) if perm is None else perm[axis]
    return axis


def _find_layers(
    model: Any,
    skip: Sequence[str],
    matched: set[str] | None = None,
    notes: list[str] | None = None,
    excluded: list[str] | None = None,
) -> tuple[list[_Layer], list[str]]:
    """The quantizable layers in graph order and the names of those left
    float: skipped ones, and Conv / Gemm / MatMul nodes whose constant
    operand is not a weight SQuant quantizes (``notes`` gets the reason of
    each: a weight that is no float32 initializer of the main graph (a
    sparse one included), of the wrong rank, or the first operand; a node
    inside an If / Loop / Scan body; a weight read along two output-channel
    axes; a ConvTranspose with a constant weight). A weight read
    through Identity nodes counts as the initializer they copy; one read
    through Slice / Transpose nodes (:func:`_view_source`) as the whole
    initializer, along the axis the Transposes make its output-channel
    axis.
    ``matched`` collects the skip patterns that matched a layer, and
    ``excluded`` the names of the layers they matched."""
    onnx = require_onnx()
    graph = model.graph
    inits = _initializers(graph)
    layers: list[_Layer] = []
    skipped: list[str] = []
    why: list[str] = []
    axes: dict[str, int] = {}
    conflict: set[str] = set()
    producers = {o: n for n in graph.node for o in n.output}
    # Constants for the walks back from an operand: sparse initializers too.
    constants = set(inits) | _sparse_names(graph)

    def left_float(name: str, reason: str) -> None:
        skipped.append(name)
        why.append(f"{name}: {reason}; left float")

    for i, node in enumerate(graph.node):
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.name or f"{node.op_type}_{i}"
        read = node.input[1]
        source = _identity_source(producers, inits, read)
        if node.op_type == "ConvTranspose":
            if _is_constant(producers, constants, source):
                left_float(
                    name,
                    "a ConvTranspose (another weight layout): only Conv / Gemm / MatMul weights "
                    "are quantized",
                )
            continue
        w = inits.get(source)
        view = None if w is not None else _view_source(producers, inits, source)
        if view is not None:
            w = inits[view[0]]
        if w is None:
            reason = _not_an_initializer(node, source, producers, constants)
            if reason is not None:
                left_float(name, reason)
            continue
        if w.data_type != onnx.TensorProto.FLOAT:
            kind = onnx.TensorProto.DataType.Name(w.data_type).lower()
            left_float(name, f"its weight {w.name!r} is {kind}: only float32 weights are quantized")
            continue
        ndim = len(w.dims)
        if node.op_type == "Conv":
            if ndim < 3:
                left_float(name, f"its weight {w.name!r} has {ndim} dimensions (a Conv's has 3+)")
                continue
            if view is not None and view[2]:
                # (SQuant's kernels and channels are those of the layout the
                # Conv reads; a 2-D weight's are the same either way)
                left_float(
                    name,
                    f"its weight {w.name!r} reaches it through a Transpose: Conv weights are "
                    "quantized in their own layout only",
                )
                continue
            axis = 0
        else:
            if ndim != 2:
                left_float(
                    name,
                    f"its weight {w.name!r} has {ndim} dimensions: {node.op_type} weights are "
                    "quantized when 2-D",
                )
                continue
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if node.op_type == "Gemm" and trans_b else 1
        if view is not None:
            axis = _viewed_axis(axis, view[2], ndim)
        names = {name, w.name, read, _module_of(w.name), _module_of(read)}
        hits = [p for p in skip if any(matches_any(n, (p,)) for n in names)]
        if hits:
            if matched is not None:
                matched.update(hits)
            if excluded is not None:
                excluded.append(name)
            skipped.append(name)
            continue
        if axes.setdefault(w.name, axis) != axis:
            conflict.add(w.name)
        via = None if view is None else view[1]
        layers.append(_Layer(name, node, w.name, axis, node.op_type, via=via))
    if conflict:
        # A weight read along different output-channel axes stays float.
        for layer in layers:
            if layer.weight in conflict:
                left_float(
                    layer.name,
                    f"its weight {layer.weight!r} is read along different output-channel axes "
                    "(as a Conv / Gemm(transB=1) and a MatMul / Gemm(transB=0) weight)",
                )
        layers = [layer for layer in layers if layer.weight not in conflict]
    subgraphs = list(_graphs(graph))[1:]
    consts = _graph_constants(model) if subgraphs else set()
    for g in subgraphs:
        for i, node in enumerate(g.node):
            if node.op_type in _WEIGHT_OPS and any(t in consts for t in node.input[:2]):
                left_float(
                    node.name or f"{g.name}/{node.op_type}_{i}",
                    f"it is inside a subgraph ({g.name!r}, an If / Loop / Scan body): only the "
                    "main graph's layers are quantized",
                )
    if notes is not None:
        notes.extend(why)
    return layers, skipped


def _not_an_initializer(
    node: Any, source: str, producers: dict[str, Any], inits: Container[str]
) -> str | None:
    """Why ``node``'s weight operand ``source`` (no initializer) stays
    float, or None where the node has no constant operand (two activations
    multiplied, a Conv with a computed weight). ``inits``: the names of the
    initializers, sparse ones included."""
    if source in inits:
        return (
            f"its weight {source!r} is a sparse initializer: only dense initializers are quantized"
        )
    producer = producers.get(source)
    if producer is not None and producer.op_type == "Constant":
        return (
            f"its weight comes from a Constant node ({source!r}): only initializers are quantized"
        )
    if producer is not None and _is_constant(producers, inits, source):
        return (
            f"its weight {source!r} is computed from initializers by a {producer.op_type} node: "
            "only initializers are quantized"
        )
    if node.op_type in ("MatMul", "Gemm") and _is_constant(producers, inits, node.input[0]):
        return (
            "its constant operand is the first input (A); only the second (B) is quantized "
            "as a weight"
        )
    return None


def _constant_nodes(
    producers: dict[str, Any],
    inits: Container[str],
    tensor: str,
    limit: int,
    refuse: Callable[[Any], bool],
) -> list[Any] | None:
    """The nodes that compute ``tensor`` (in the order the walk back from it
    meets them) where it depends on initializers and node outputs only;
    None where the walk meets a graph input, a node ``refuse`` refuses, or
    more than ``limit`` nodes."""
    nodes: list[Any] = []
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if not t or t in seen or t in inits:
            continue
        seen.add(t)
        n = producers.get(t)
        if n is None or len(nodes) > limit or refuse(n):
            return None
        if n not in nodes:
            nodes.append(n)
        stack.extend(n.input)
    return nodes


def _is_constant(producers: dict[str, Any], inits: Container[str], tensor: str) -> bool:
    """Whether ``tensor`` depends on initializers (the names in ``inits``)
    and Constant nodes only (not through a node with a subgraph; at most
    256 nodes)."""
    return _constant_nodes(producers, inits, tensor, 256, _has_subgraph) is not None


def _has_subgraph(node: Any) -> bool:
    """Whether ``node`` has a subgraph (an If / Loop / Scan)."""
    return any(a.HasField("g") or a.graphs for a in node.attribute)


def _graph_constants(model: Any) -> set[str]:
    """The initializers and Constant-node outputs of every graph of ``model``."""
    out: set[str] = set()
    for g in _graphs(model.graph):
        out.update(t.name for t in g.initializer)
        out.update(_sparse_names(g))
        out.update(o for n in g.node if n.op_type == "Constant" for o in n.output)
    return out


def _module_of(weight: str) -> str:
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


def _graphs(graph: Any) -> Any:
    """``graph`` and its subgraphs (If / Loop / Scan bodies), recursively."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _subgraph_reads(node: Any) -> set[str]:
    """The tensors the subgraphs of ``node`` read (outer-scope ones among them)."""
    out: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for sub in _graphs(g):
                for n in sub.node:
                    out.update(n.input)
                out.update(o.name for o in sub.output)
    return out


def _all_tensors(model: Any, sparse: bool = True) -> Any:
    """Every TensorProto ``model`` holds, in every graph (If / Loop / Scan
    bodies and model-local functions' included): initializers, the values
    and indices of sparse initializers, and node attributes' tensors
    (a Constant's ``value``, sparse ones too); with ``sparse=False`` none
    of a sparse tensor's."""
    graphs = list(_graphs(model.graph))
    node_lists = [g.node for g in graphs]
    for f in model.functions:
        node_lists.append(f.node)
        for node in f.node:
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graphs.extend(_graphs(g))
                    node_lists.extend(sub.node for sub in _graphs(g))
    for g in graphs:
        yield from g.initializer
        for sp in g.sparse_initializer if sparse else ():
            yield sp.values
            yield sp.indices
    for nodes in node_lists:
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if not sparse:
                    continue
                for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(
                    a.sparse_tensors
                ):
                    yield sp.values
                    yield sp.indices


def _sparse_names(graph: Any) -> set[str]:
    """The names of ``graph``'s sparse initializers."""
    return {sp.values.name for sp in graph.sparse_initializer}
