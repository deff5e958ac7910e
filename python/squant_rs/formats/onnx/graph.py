"""The layers of a graph: the Conv / Gemm / MatMul nodes whose weights get
quantized (:func:`_find_layers`), and the walk over a graph's subgraphs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...model.layers import matches_any
from .common import require_onnx

if TYPE_CHECKING:
    from ...tensor.quantized import QuantizedTensor


@dataclass
class _Layer:
    """One Conv/Gemm/MatMul node whose weight is a float32 initializer."""

    name: str
    node: Any  # onnx.NodeProto
    weight: str  # the initializer, looked up through Identity nodes
    axis: int  # output-channel axis of the weight as stored
    op: str
    act: tuple[int, float, float] | None = None  # (bits, x_min, x_max) of the input


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


def _find_layers(
    model: Any, skip: Sequence[str], matched: set[str] | None = None
) -> tuple[list[_Layer], list[str]]:
    """The quantizable layers in graph order and the names of those left
    float. A weight read through Identity nodes counts as the initializer
    they copy. ``matched`` collects the skip patterns that matched a layer."""
    onnx = require_onnx()
    graph = model.graph
    inits = _initializers(graph)
    layers: list[_Layer] = []
    skipped: list[str] = []
    axes: dict[str, int] = {}
    conflict: set[str] = set()
    producers = {o: n for n in graph.node for o in n.output}
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.name or f"{node.op_type}_{i}"
        read = node.input[1]
        w = inits.get(_identity_source(producers, inits, read))
        if w is None or w.data_type != onnx.TensorProto.FLOAT:
            continue
        ndim = len(w.dims)
        if node.op_type == "Conv":
            if ndim < 3:
                continue
            axis = 0
        else:
            if ndim != 2:
                continue
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if node.op_type == "Gemm" and trans_b else 1
        names = {name, w.name, read, _module_of(w.name), _module_of(read)}
        hits = [p for p in skip if any(matches_any(n, (p,)) for n in names)]
        if hits:
            if matched is not None:
                matched.update(hits)
            skipped.append(name)
            continue
        if axes.setdefault(w.name, axis) != axis:
            conflict.add(w.name)
        layers.append(_Layer(name, node, w.name, axis, node.op_type))
    if conflict:
        # A weight read along different output-channel axes stays float.
        skipped += [layer.name for layer in layers if layer.weight in conflict]
        layers = [layer for layer in layers if layer.weight not in conflict]
    return layers, skipped


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


def _graph_tensors(graph: Any) -> Any:
    """The initializers of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    for g in _graphs(graph):
        yield from g.initializer
