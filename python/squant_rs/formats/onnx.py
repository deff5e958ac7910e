"""Quantized ONNX (QDQ) out of ONNX files (:func:`quantize_onnx`, numpy +
onnx + onnxruntime, no torch) and out of torch models (:func:`export_onnx`).

Both share one graph rewrite:

* every Conv / Gemm / MatMul weight that is an initializer is replaced by
  ``DequantizeLinear(codes, 1/s, -z, axis=<output-channel axis>)``: codes
  ``int4`` at 2-4 bits and ``int8`` at 5-8 bits (opset 21); the zero point
  ``-z`` in the code type where every channel's fits, else in the next
  container that holds it exactly (int8, int16, int32), codes with it; a
  channel whose zero point would need a wider type than an exact integer
  form of its values (constant channels) takes that form, zero point 0
  (:func:`_weight_encoding`). The
  output-channel axis is 0 for Conv and Gemm with ``transB=1`` and 1 for
  Gemm with ``transB=0`` and MatMul. ONNX computes ``(q - zp) * (1/s)``
  where squant-rs computes ``(q + z) / s``: the dequantized weights agree
  within one float32 ulp.
* with ``abits``: a per-tensor ``QuantizeLinear``/``DequantizeLinear`` pair
  on the input of every quantized layer but the first (docs/algorithm.md section 5: the
  first layer's input stays float, the last layer's is 8-bit; below 8 bits
  a ``Clip`` to the b-bit range comes first), and the layer's bias as
  ``DequantizeLinear(int32, a_scale * w_scale[c])`` so that onnxruntime's
  own ``WeightBiasQuantization`` has nothing left to re-quantize.
  Activations are uint8 (signed ranges with zero point ``128 - z``).
* with ``integer_kernels``: one ``QuantizeLinear`` right after the producer
  of every activation tensor between quantized ops (layer outputs, residual
  Add inputs and outputs, pooling / Flatten paths) and one
  ``DequantizeLinear`` for its readers, the placement onnxruntime's QDQ
  fusion turns into QLinearConv / QGemm / QLinearAdd.

onnx and onnxruntime are imported lazily (``pip install 'squant-rs[onnx]'``).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._squant_rs import InvalidArgumentError, SquantError
from ..model.activations import activation_qparams, activation_range, default_s_sigma
from ..model.layers import check_patterns, matches_any, relative_error
from ..model.report import LayerReport, QuantReport
from ..tensor.batch import quantize_tensors
from ..tensor.validate import check_bits, check_mode, check_quantizer, check_threads
from .output import atomic_output, check_output
from .safetensors import FormatError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..tensor.quantized import QuantizedTensor

__all__ = ["OPSET", "OnnxFormatError", "export_onnx", "quantize_onnx"]

#: Opset of every written model (int4 DequantizeLinear needs 21).
OPSET = 21
#: Lowest opset the version converter takes reliably.
MIN_OPSET = 7
#: Above this many bytes of tensor data the model is written with external data.
EXTERNAL_ABOVE = 2**31 - 2**26
#: Ops of an already quantized graph.
QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
    }
)
#: Calibration batch for inputs with a symbolic batch dimension.
CALIBRATION_BATCH = 8


class OnnxFormatError(FormatError):
    """An ONNX input squant-rs cannot quantize: not ONNX, truncated or
    corrupt, an unsupported opset, already quantized, or nothing to
    quantize."""


def require_onnx() -> Any:
    """Import onnx or explain how to get it."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - exercised without onnx
        raise ImportError("ONNX support needs onnx: pip install 'squant-rs[onnx]'") from exc
    return onnx


# --------------------------------------------------------------------------
# The layers of a graph


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


# --------------------------------------------------------------------------
# Loading and checking


def _default_opset(model: Any) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _load(model_or_path: Any) -> tuple[Any, str | None, list[str]]:
    """A private copy of the model (external data loaded), its path and the
    external data files it reads (absolute paths)."""
    onnx = require_onnx()
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, None, []
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}"
        )
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise OnnxFormatError(f"{path}: file not found")
    if os.path.isdir(path):
        raise OnnxFormatError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxFormatError(
            f"{path}: not an ONNX model or truncated ({type(exc).__name__})"
        ) from None
    if model.ir_version < 3 or not model.HasField("graph") or not model.graph.node:
        raise OnnxFormatError(f"{path}: not an ONNX model (no graph or no IR version)")
    data_files = _external_files(model, os.path.dirname(os.path.abspath(path)))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(path))
    except Exception as exc:
        raise OnnxFormatError(
            f"{path}: cannot read its external data ({type(exc).__name__}: {exc})"
        ) from None
    return model, path, data_files


def _graph_tensors(graph: Any) -> Any:
    """The initializers of ``graph`` and of its subgraphs (If / Loop / Scan bodies)."""
    for g in _graphs(graph):
        yield from g.initializer


def _external_files(model: Any, base: str) -> list[str]:
    """The external data files the initializers of ``model`` name (absolute)."""
    from onnx import TensorProto

    files: dict[str, None] = {}
    for t in _graph_tensors(model.graph):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location" and entry.value:
                    files[os.path.normpath(os.path.join(base, entry.value))] = None
    return list(files)


def _prepare(model: Any, where: str) -> Any:
    """Checked, at opset 21, refusing quantized graphs."""
    onnx = require_onnx()
    opset = _default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise OnnxFormatError(
            f"{where}: unsupported opset {opset} (supported: {MIN_OPSET}..{newest} of the "
            "default domain)"
        )
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    if quantized:
        raise OnnxFormatError(
            f"{where}: the graph is already quantized ({', '.join(quantized)} nodes)"
        )
    if _tensor_bytes(model) < EXTERNAL_ABOVE:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise OnnxFormatError(f"{where}: invalid ONNX model ({msg})") from None
    if opset < OPSET:
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxFormatError(
                f"{where}: cannot convert opset {opset} to {OPSET} ({msg})"
            ) from None
    # int4 / int16 initializers need IR version 10 (opset 21's).
    model.ir_version = max(model.ir_version, 10)
    return model


def _tensor_bytes(model: Any) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)


# --------------------------------------------------------------------------
# The rewrite


_CONTAINERS: tuple[tuple[str, int, int], ...] = (
    ("INT4", -8, 7),
    ("INT8", -128, 127),
    ("INT16", -(2**15), 2**15 - 1),
    ("INT32", -(2**31), 2**31 - 1),
)


def code_container(bits: int, zero_point: np.ndarray) -> str:
    """The ONNX type of a weight's codes and zero point: int4 at 2-4 bits,
    int8 at 5-8, or the next type that holds every ``zero_point`` exactly."""
    start = 0 if bits <= 4 else 1
    for name, lo, hi in _CONTAINERS[start:]:
        if zero_point.size == 0 or (zero_point.min() >= lo and zero_point.max() <= hi):
            return name
    raise InvalidArgumentError("zero point beyond int32")  # pragma: no cover - |z| < 2^24


#: ``q - zp`` is exact in float32 below this magnitude (ORT converts it).
_EXACT = 2**24


def _container_index(lo: np.ndarray, hi: np.ndarray, start: int) -> np.ndarray:
    """Per channel: the index in :data:`_CONTAINERS` (from ``start``) of the
    smallest type holding ``[lo, hi]``; ``len(_CONTAINERS)`` for none."""
    need = np.full(lo.shape, len(_CONTAINERS), dtype=np.int64)
    for i in reversed(range(start, len(_CONTAINERS))):
        _, c_lo, c_hi = _CONTAINERS[i]
        need[(lo >= c_lo) & (hi <= c_hi)] = i
    return need


def _exact_channel(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Integers ``k`` and a step ``p > 0`` with ``k * p == values`` exactly
    in float32, ``|k| < 2^24``: ``k`` in {-1, 0, 1} and ``p`` the one
    magnitude when the nonzero values share it (a constant channel), else
    ``p`` the largest power of two dividing every value."""
    v = values.astype(np.float64)
    nz = np.abs(v[v != 0])
    if nz.size == 0:
        return np.zeros(v.shape, np.int64), np.float32(1.0)
    if np.all(nz == nz[0]):
        return np.sign(v).astype(np.int64), np.float32(nz[0])
    mant, exp = np.frexp(nz)  # nz = mant * 2^exp, 0.5 <= mant < 1, 24 bits at most
    m = np.ldexp(mant, 24).astype(np.int64)
    low = np.log2(m & -m).astype(np.int64)  # trailing zero bits of each mantissa
    p = int((exp.astype(np.int64) - 24 + low).min())
    return np.ldexp(v, -p).astype(np.int64), np.float32(np.ldexp(1.0, p))


def _weight_encoding(
    qt: QuantizedTensor, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The DequantizeLinear form of a quantized weight (``(OC, ...)``
    layout): ``(codes, step, zero_point, type)``, per channel ``codes``,
    ``1/s`` and ``-z``, in the smallest type (int4 at 2-4 bits, int8 at 5-8,
    else int16 / int32) holding every channel's codes and zero point.

    A channel whose zero point would need a type wider than its codes'
    (with ``(q - zp)`` not exact in float32 above 2^24) and can be written
    exactly in a narrower one is written as :func:`_exact_channel`'s
    integers with zero point 0: a constant channel (``Linear(1, N)``, where
    the range floor of the asymmetric quantizer gives zero points near
    ``w * (2^b - 1) * 1e8``) as ``+-1`` times its value, so the layer keeps
    the codes' type. ORT then computes exactly ``qt.dequantize()``."""
    codes = np.asarray(qt.codes).astype(np.int64)
    oc = int(codes.shape[0]) if codes.ndim else 0
    flat = codes.reshape(oc, -1)
    zp = -np.asarray(qt.zero_point, dtype=np.float64).reshape(-1)
    step = (np.float32(1.0) / np.asarray(qt.scale, dtype=np.float32)).astype(np.float32)
    step = step.reshape(-1)
    start = 0 if qt.bits <= 4 else 1
    if flat.size == 0:
        zp_int = zp.astype(np.int64)
        need = _container_index(zp, zp, start)
    else:
        lo = np.minimum(flat.min(axis=1), zp)
        hi = np.maximum(flat.max(axis=1), zp)
        need = _container_index(lo, hi, start)
        need[np.abs(flat - zp[:, None]).max(axis=1) >= _EXACT] = len(_CONTAINERS)
        zp_int = np.where(need < len(_CONTAINERS), zp, 0).astype(np.int64)
        wide = np.flatnonzero(need > start)
        if wide.size:
            values = np.asarray(qt.dequantize(), dtype=np.float32).reshape(oc, -1)
            for c in wide:
                k, p = _exact_channel(values[c])
                alt = int(
                    _container_index(
                        np.array([min(k.min(), 0)]), np.array([max(k.max(), 0)]), start
                    )[0]
                )
                if alt < need[c]:
                    flat[c], zp_int[c], step[c], need[c] = k, 0, p, alt
    top = int(need.max()) if need.size else start
    if top >= len(_CONTAINERS):  # pragma: no cover - _exact_channel's |k| < 2^24 fits int32
        raise InvalidArgumentError(f"weight {name!r}: its zero points do not fit int32")
    return flat.reshape(codes.shape), step, zp_int, _CONTAINERS[top][0]


def _int_tensor(name: str, values: np.ndarray, kind: str) -> Any:
    from onnx import numpy_helper

    if kind == "INT4":
        import ml_dtypes

        return numpy_helper.from_array(values.astype(ml_dtypes.int4), name)
    dtype = {"INT8": np.int8, "INT16": np.int16, "INT32": np.int32}[kind]
    return numpy_helper.from_array(values.astype(dtype), name)


class _Names:
    """Fresh tensor / node names that collide with nothing in the graph."""

    def __init__(self, graph: Any) -> None:
        self.used: set[str] = set()
        for g in _graphs(graph):  # subgraph names too: they may shadow nothing
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                self.used.add(n.name)
            for v in (*g.input, *g.output, *g.initializer, *g.value_info):
                self.used.add(v.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


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


def _consumers(graph: Any, tensor: str) -> int:
    """How many times ``tensor`` is read: node inputs and graph outputs of
    ``graph`` and of its subgraphs (which may read outer-scope tensors)."""
    n = 0
    for g in _graphs(graph):
        n += sum(list(node.input).count(tensor) for node in g.node)
        n += sum(o.name == tensor for o in g.output)
    return int(n)


def _drop_dead_identities(graph: Any, roots: Sequence[str]) -> None:
    """Remove the Identity nodes copying one of ``roots`` (directly or
    through other such nodes) whose outputs nothing reads any more: the
    copies of a weight whose readers now read its DequantizeLinear."""
    reads: dict[str, int] = {}
    for g in _graphs(graph):
        for n in g.node:
            for t in n.input:
                reads[t] = reads.get(t, 0) + 1
        for o in g.output:
            reads[o.name] = reads.get(o.name, 0) + 1
    copies = set(roots)
    chain = []
    for n in graph.node:  # graph order: a copy's copy comes after it
        if n.op_type == "Identity" and n.input and n.input[0] in copies:
            copies.update(n.output)
            chain.append(n)
    for n in reversed(chain):
        if not any(reads.get(o, 0) for o in n.output):
            reads[n.input[0]] -= 1
            graph.node.remove(n)


def _toposort(graph: Any) -> None:
    """Sort ``graph.node`` topologically, keeping the present order wherever
    it already is one (reads from subgraphs count as inputs)."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        reads = set(n.input) | _subgraph_reads(n)
        d = {producer[t] for t in reads if t in producer and producer[t] != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):  # pragma: no cover - a cycle: leave it to the checker
        return
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _drop_initializer(graph: Any, name: str) -> None:
    """Remove an initializer nothing reads any more (and its graph input)."""
    if _consumers(graph, name):
        return
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            del graph.initializer[i]
            break
    for i, v in enumerate(graph.input):
        if v.name == name:
            del graph.input[i]
            break


def _rewrite(
    model: Any,
    weights: list[_Weight],
    plan: dict[str, tuple[int, float, float]] | None = None,
) -> None:
    """Put the quantized weights, activation Q/DQ pairs and int32 biases into
    ``model`` (in place). ``plan``: the integer-kernel form, the range of
    every activation tensor to quantize (:func:`_integer_plan`); without
    it, a Q/DQ pair on each layer input that has a range."""
    from onnx import helper, numpy_helper

    graph = model.graph
    names = _Names(graph)
    new_inits: list[Any] = []
    new_nodes: list[tuple[Any, Any]] = []  # (node to insert, before this node)
    w_scales: dict[int, np.ndarray] = {}
    biases: list[str] = []  # float biases replaced by int32 ones
    for wt in weights:
        base = wt.base or wt.name
        codes, step, zp, kind = _weight_encoding(wt.qt, base)
        if wt.axis == 1:
            codes = codes.T
        c_name, s_name, z_name = (
            names(base + "_quantized"),
            names(base + "_scale"),
            names(base + "_zero_point"),
        )
        out = names(base + "_dequantized")
        new_inits += [
            _int_tensor(c_name, codes, kind),
            numpy_helper.from_array(step, s_name),
            _int_tensor(z_name, zp, kind),
        ]
        dq = helper.make_node(
            "DequantizeLinear",
            [c_name, s_name, z_name],
            [out],
            name=names(base + "_DQ"),
            axis=wt.axis,
        )
        first = min(wt.layers, key=lambda layer: _index(graph, layer.node))
        new_nodes.append((dq, first.node))
        for layer in wt.layers:
            layer.node.input[1] = out
            w_scales[id(layer.node)] = step
    inits = _initializers(graph)
    if plan is None:
        # A Q/DQ pair on each layer input (shared by layers reading the same
        # tensor with the same range), then the int32 biases.
        acts: dict[tuple[str, int, float, float], tuple[str, float]] = {}
        for wt in weights:
            for layer in wt.layers:
                if layer.act is None:
                    continue
                bits, x_min, x_max = layer.act
                src = layer.node.input[0]
                key = (src, bits, x_min, x_max)
                if key not in acts:
                    acts[key] = _act_qdq(graph, names, new_inits, new_nodes, layer, key)
                out, a_step = acts[key]
                layer.node.input[0] = out
                b = _bias(graph, names, new_inits, layer, inits, a_step, w_scales[id(layer.node)])
                biases += [b] if b is not None else []
        graph.initializer.extend(new_inits)
        for node, before in new_nodes:
            graph.node.insert(_index(graph, before), node)
    else:
        graph.initializer.extend(new_inits)
        for node, before in new_nodes:
            graph.node.insert(_index(graph, before), node)
        new_inits = []
        steps: dict[str, float] = {}  # DequantizeLinear output -> step
        for tensor, (bits, x_min, x_max) in plan.items():
            done = _tensor_qdq(graph, names, new_inits, tensor, bits, x_min, x_max)
            if done is not None:
                steps[done[0]] = done[1]
        for wt in weights:
            for layer in wt.layers:
                in_step = steps.get(layer.node.input[0])
                if in_step is not None:
                    step_w = w_scales[id(layer.node)]
                    b = _bias(graph, names, new_inits, layer, inits, in_step, step_w)
                    biases += [b] if b is not None else []
        graph.initializer.extend(new_inits)
    replaced = [wt.name for wt in weights] + biases
    _drop_dead_identities(graph, replaced)
    for name in dict.fromkeys(replaced):
        _drop_initializer(graph, name)
    _toposort(graph)


def _tensor_qdq(
    graph: Any,
    names: _Names,
    new_inits: list[Any],
    tensor: str,
    bits: int,
    x_min: float,
    x_max: float,
) -> tuple[str, float] | None:
    """One QuantizeLinear right after ``tensor``'s producer (a Clip first
    below 8 bits) and one DequantizeLinear that every reader of ``tensor``
    reads instead (graph outputs keep the float tensor), the way
    onnxruntime's QDQ fusion wants them. Returns the DequantizeLinear output
    and the step ``1/s``, or None when nothing reads the tensor."""

    readers = [n for n in graph.node if tensor in n.input]
    if not readers:
        return None
    nodes, dq, step = _qdq_nodes(names, new_inits, tensor, bits, x_min, x_max, "_QClip")
    for n in readers:
        for i, name in enumerate(n.input):
            if name == tensor:
                n.input[i] = dq
    at = next((i + 1 for i, n in enumerate(graph.node) if tensor in n.output), 0)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    return dq, step


#: Ops whose quantized form keeps the input's scale and zero point
#: (onnxruntime drops their Q/DQ pairs and runs them on int8).
_SAME_QPARAMS = frozenset(
    {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Pad"}
)
#: Ops onnxruntime runs on int8 with their own output range.
_QUANTIZED_OPS = frozenset({"Add", "GlobalAveragePool", "AveragePool"})


def _integer_plan(
    model: Any, layers: list[_Layer]
) -> tuple[dict[str, tuple[int, float, float] | None], dict[str, str]]:
    """The activation tensors of the integer-kernel form: every quantized
    layer's input (its own range) and output (after a Relu / Clip that
    alone reads it); the inputs and output of an Add whose inputs are all
    quantized (QLinearAdd), pooling outputs of quantized inputs, and
    Flatten / Reshape / ... paths between them (one range on both sides).

    Returns:
        ``(ranges, same)``: ``ranges`` maps each tensor to its known range
        or None (to be calibrated); ``same`` maps a tensor to the one whose
        range it shares.
    """
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    ranges: dict[str, tuple[int, float, float] | None] = {}
    for layer in layers:
        if layer.act is not None:
            ranges.setdefault(layer.node.input[0], layer.act)
    kernel_outputs = _kernel_outputs(model, layers)
    same: dict[str, str] = {}

    def known(t: str) -> bool:
        return t in ranges or t in same

    # A layer output that reaches the next layer only through a Pad /
    # Reshape / ... takes that layer's input range (one Q/DQ pair on each
    # side of the op, with the same parameters, lets onnxruntime run it on
    # int8).
    outs = set(kernel_outputs)
    readers: dict[str, int] = {}
    for n in graph.node:
        for t in set(n.input):
            readers[t] = readers.get(t, 0) + 1

    def shares_back(n: Any, x: str) -> bool:
        """Whether ``x``, the input of value-keeping op ``n``, may take the
        range of ``n``'s output: a MaxPool's output range is narrower than
        its input's, exact for the pool itself (the max of clipped values is
        the clipped max) but not for another reader of ``x``."""
        return n.op_type != "MaxPool" or readers.get(x, 0) == 1

    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if n.op_type in _SAME_QPARAMS and n.input and n.output:
                x, y = n.input[0], n.output[0]
                if known(y) and not known(x) and x in outs and shares_back(n, x):
                    same[x] = y
                    changed = True
    for t in kernel_outputs:
        if not known(t):
            ranges[t] = None

    def add(t: str) -> None:
        """A new quantized tensor: the range of the Flatten / ... output it
        becomes if that has one (the classifier's input), else calibrated."""
        for r in graph.node:
            if r.op_type in _SAME_QPARAMS and r.input and r.input[0] == t and known(r.output[0]):
                same[t] = r.output[0]
                return
        ranges[t] = None

    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if not n.input or not n.output:
                continue
            x, y = n.input[0], n.output[0]
            if n.op_type in _SAME_QPARAMS:
                if known(x) and not known(y):
                    same[y] = x
                    changed = True
                elif known(y) and not known(x) and shares_back(n, x):
                    p = producers.get(x)
                    if p is not None and p.op_type in _QUANTIZED_OPS and known(p.input[0]):
                        same[x] = y
                        changed = True
            elif n.op_type in ("GlobalAveragePool", "AveragePool"):
                if known(x) and not known(y):
                    add(y)
                    changed = True
            elif n.op_type == "Add" and len(n.input) == 2:
                if all(known(i) for i in n.input) and not known(y):
                    add(y)
                    changed = True
    return ranges, same


def _resolve_plan(
    ranges: dict[str, tuple[int, float, float] | None], same: dict[str, str]
) -> dict[str, tuple[int, float, float]]:
    """Every tensor's range, the shared ones from the tensor they follow."""
    out = {t: r for t, r in ranges.items() if r is not None}
    pending = dict(same)
    while pending:
        done = [t for t, src in pending.items() if src in out]
        if not done:
            break  # pragma: no cover - a cycle of shared ranges without a source
        for t in done:
            out[t] = out[pending.pop(t)]
    return out


def _kernel_outputs(model: Any, layers: list[_Layer]) -> list[str]:
    """Tensors quantized for integer kernels: each layer's output, or the
    output of the Relu / Clip that alone reads it (onnxruntime then drops
    the activation into the QuantizeLinear)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    out: list[str] = []
    for layer in layers:
        t = layer.node.output[0]
        readers = [n for n in graph.node if t in n.input]
        if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and t not in outputs:
            t = readers[0].output[0]
        out.append(t)
    return list(dict.fromkeys(out))


def _constants(model: Any) -> dict[str, Any]:
    """Initializers and Constant-node outputs by name (TensorProtos)."""
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    return consts


def _const_value(model: Any, consts: dict[str, Any], tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` when it depends on constants only (e.g. the
    Slice / Transpose / Cast chain torch's exporter writes for ``F.pad``'s
    pads), computed with onnx's reference evaluator; else None."""
    from onnx import helper, numpy_helper

    if tensor in consts:
        return np.asarray(numpy_helper.to_array(consts[tensor]))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    nodes: list[Any] = []
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if not t or t in seen or t in inits:
            continue
        seen.add(t)
        n = producers.get(t)
        if n is None or len(nodes) > 64 or n.op_type in QUANT_OPS:
            return None  # a graph input (or a long chain): not a constant
        if n not in nodes:
            nodes.append(n)
        stack.extend(n.input)
    order = [n for n in graph.node if n in nodes]
    used = {i for n in order for i in n.input}
    try:
        from onnx.reference import ReferenceEvaluator

        sub = helper.make_graph(
            order,
            "const",
            [],
            [helper.make_empty_tensor_value_info(tensor)],
            [t for t in graph.initializer if t.name in used],
        )
        m = helper.make_model(sub, opset_imports=model.opset_import)
        values: list[Any] = list(ReferenceEvaluator(m).run(None, {}))
    except Exception:
        return None
    return np.asarray(values[0])


def _fold_pads(model: Any) -> int:
    """Fold each zero ``Pad`` read only by a Conv into the Conv's ``pads``
    (exact: the same zeros), as onnxruntime's PadFusion does for float
    graphs; with Q/DQ pairs between them that fusion cannot happen any more
    and the Pad would stay a float op between two quantized layers.
    Returns how many were folded."""
    from onnx import helper

    graph = model.graph
    consts = _constants(model)
    outputs = {o.name for o in graph.output}
    folded = 0
    for pad in list(graph.node):
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.output[0] in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        if attrs.get("mode", b"constant") not in (b"constant", "constant"):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # explicit axes
        pads = _const_value(model, consts, pad.input[1])
        if pads is None:
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = _const_value(model, consts, pad.input[2])
            if value is None or np.any(value != 0):
                continue
        readers = [n for n in graph.node if pad.output[0] in n.input]
        if len(readers) != 1 or readers[0].op_type != "Conv":
            continue
        conv = readers[0]
        if list(conv.input).count(pad.output[0]) != 1 or conv.input[0] != pad.output[0]:
            continue
        cattrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if cattrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        p = pads.astype(np.int64).ravel()
        rank = p.size // 2
        spatial = rank - 2
        if spatial < 1 or p.size != 2 * rank or np.any(p < 0):
            continue
        if p[0] or p[1] or p[rank] or p[rank + 1]:
            continue  # padding of the batch or channel axis
        old = [int(v) for v in cattrs.get("pads", [0] * (2 * spatial))]
        if len(old) != 2 * spatial:
            continue
        new = [old[i] + int(p[2 + i]) for i in range(spatial)]
        new += [old[spatial + i] + int(p[rank + 2 + i]) for i in range(spatial)]
        for i, a in enumerate(conv.attribute):
            if a.name == "pads":
                del conv.attribute[i]
                break
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    return folded


def _clip_max(model: Any) -> dict[str, float]:
    """Upper bounds of Clip outputs whose max is a constant (ReLU6: 6) ..."""
    from onnx import numpy_helper

    consts = _constants(model)
    out: dict[str, float] = {}
    for n in model.graph.node:
        if n.op_type == "Clip" and len(n.input) >= 3 and n.input[2] in consts:
            v = numpy_helper.to_array(consts[n.input[2]])
            if v.size == 1 and np.isfinite(v).all():
                out[n.output[0]] = float(v.reshape(()))
    # ... and of what a Reshape / Pad (with zeros) / ... makes of them.
    for n in model.graph.node:
        if n.op_type in _SAME_QPARAMS and n.input and n.input[0] in out:
            if n.op_type == "Pad" and len(n.input) > 2 and n.input[2]:
                value = consts.get(n.input[2])
                if value is None or np.any(numpy_helper.to_array(value) != 0):
                    continue
            out[n.output[0]] = out[n.input[0]]
    return out


def _capped(act: tuple[int, float, float], bound: float | None) -> tuple[int, float, float]:
    """An unsigned range no wider than the Clip before it: the values never
    exceed the bound, and a range inside it lets onnxruntime drop the Clip."""
    bits, lo, hi = act
    if bound is None or lo < 0 or not 0 < bound < hi:
        return act
    return bits, lo, bound


def _index(graph: Any, node: Any) -> int:
    for i, n in enumerate(graph.node):
        if n is node:
            return i
    raise ValueError("node not in graph")  # pragma: no cover


def _act_zero_point(z: float, signed: bool) -> int:
    """The uint8 zero point of an activation: ``-z``, plus 128 for signed
    ranges (their codes -128..127 become 0..255; the values are the same).
    One activation type everywhere lets onnxruntime fuse every layer (its
    QLinearConv wants the output in the input's type), and uint8 is the
    one whose QDQ fusion covers residual Adds too (onnxruntime 1.32 leaves
    an int8 Add, and the Convs around it, unfused on x86)."""
    return int(-z) + (128 if signed else 0)


def _act_qdq(
    graph: Any,
    names: _Names,
    new_inits: list[Any],
    new_nodes: list[tuple[Any, Any]],
    layer: _Layer,
    key: tuple[str, int, float, float],
) -> tuple[str, float]:
    """A Q/DQ pair (Clip first below 8 bits) for one activation; returns the
    dequantized tensor's name and the activation step ``1/s``."""

    src, bits, x_min, x_max = key
    nodes, dq, step = _qdq_nodes(names, new_inits, src, bits, x_min, x_max, "_Clip")
    new_nodes += [(node, layer.node) for node in nodes]
    return dq, step


def _qdq_nodes(
    names: _Names,
    new_inits: list[Any],
    src: str,
    bits: int,
    x_min: float,
    x_max: float,
    clip_suffix: str,
) -> tuple[list[Any], str, float]:
    """The nodes of one activation's Q/DQ pair on ``src`` -- a Clip first
    below 8 bits (its node named ``base + clip_suffix``), QuantizeLinear,
    DequantizeLinear -- with their initializers appended to ``new_inits``;
    returns the nodes, the dequantized tensor's name and the step ``1/s``."""
    from onnx import helper, numpy_helper

    s, z, qmin, qmax = activation_qparams(x_min, x_max, bits)
    step = np.float32(1.0) / np.float32(s)
    signed = x_min < 0
    base = src.replace(":", "_")
    s_name, z_name = names(f"{base}_a{bits}_scale"), names(f"{base}_a{bits}_zero_point")
    new_inits += [
        numpy_helper.from_array(np.array(step, dtype=np.float32), s_name),
        numpy_helper.from_array(np.array(_act_zero_point(z, signed), dtype=np.uint8), z_name),
    ]
    q, dq = names(f"{base}_a{bits}_quantized"), names(f"{base}_a{bits}_dequantized")
    nodes = []
    x = src
    if (qmin, qmax) != ((-128, 127) if signed else (0, 255)):
        lo, hi = names(f"{base}_a{bits}_lo"), names(f"{base}_a{bits}_hi")
        new_inits += [
            numpy_helper.from_array(np.array((qmin + z) * step, dtype=np.float32), lo),
            numpy_helper.from_array(np.array((qmax + z) * step, dtype=np.float32), hi),
        ]
        x = names(f"{base}_a{bits}_clipped")
        nodes.append(helper.make_node("Clip", [src, lo, hi], [x], name=names(base + clip_suffix)))
    nodes.append(
        helper.make_node("QuantizeLinear", [x, s_name, z_name], [q], name=names(base + "_Q"))
    )
    nodes.append(
        helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=names(base + "_DQ"))
    )
    return nodes, dq, float(step)


def _bias(
    graph: Any,
    names: _Names,
    new_inits: list[Any],
    layer: _Layer,
    inits: dict[str, Any],
    a_step: float,
    w_step: np.ndarray,
) -> str | None:
    """The layer's float bias as ``DequantizeLinear(int32, a_step * w_step[c])``
    (a bias read through Identity nodes too); returns the float bias
    initializer's name, or None when the bias stays as it is."""
    from onnx import helper, numpy_helper

    if layer.op == "MatMul" or len(layer.node.input) < 3:
        return None
    read = layer.node.input[2]
    if read not in inits:
        read = _identity_source({o: n for n in graph.node for o in n.output}, inits, read)
    b = inits.get(read)
    if b is None or len(b.dims) != 1 or b.dims[0] != w_step.size:
        return None
    bias = numpy_helper.to_array(b).astype(np.float32)
    step = (np.float32(a_step) * w_step).astype(np.float32)
    q = np.rint(bias.astype(np.float64) / step.astype(np.float64))
    if not (np.all(step > 0) and np.all(np.abs(q) < 2**31 - 1)):
        return None
    base = b.name
    c_name, s_name = names(base + "_quantized"), names(base + "_scale")
    out = names(base + "_dequantized")
    new_inits += [
        numpy_helper.from_array(q.astype(np.int32), c_name),
        numpy_helper.from_array(step, s_name),
    ]
    node = helper.make_node(
        "DequantizeLinear", [c_name, s_name], [out], name=names(base + "_DQ"), axis=0
    )
    graph.node.insert(_index(graph, layer.node), node)
    layer.node.input[2] = out
    return str(b.name)


# --------------------------------------------------------------------------
# Activation ranges without torch: the sigma rule on one U[0,1) batch in ORT


def _input_feeds(model: Any, seed: int, input_shape: Sequence[int] | None) -> dict[str, Any]:
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for v in inputs:
        tt = v.type.tensor_type
        if tt.elem_type != TensorProto.FLOAT:
            raise InvalidArgumentError(
                f"input {v.name!r} is not float32: cannot calibrate on U[0,1) noise"
            )
        dims: list[int] = []
        if input_shape is not None and len(inputs) == 1:
            dims = [int(d) for d in input_shape]
        else:
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                elif i == 0:
                    dims.append(CALIBRATION_BATCH)
                else:
                    raise InvalidArgumentError(
                        f"input {v.name!r} has a symbolic dimension {i}: give input_shape="
                    )
        feeds[v.name] = rng.random(tuple(dims), dtype=np.float32)
    return feeds


def _observe(model: Any, tensors: list[str], feeds: dict[str, Any], threads: int) -> list[Any]:
    """The values of ``tensors`` for one run of the float model in ORT."""
    import onnxruntime as ort
    from onnx import helper

    probe = type(model)()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
            outputs.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.onnx")
        import onnx

        onnx.save_model(probe, path, save_as_external_data=_tensor_bytes(probe) >= EXTERNAL_ABOVE)
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            values = sess.run(tensors, feeds)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidArgumentError(
                f"calibration run on U[0,1) input failed in onnxruntime ({msg}); "
                "give input_shape= matching the model's input"
            ) from None
    return list(values)


def sigma_range(a: np.ndarray, bits: int, s_sigma: float) -> tuple[float, float]:
    """docs/algorithm.md section 5's range of one calibration tensor (numpy; unbiased std)."""
    a32 = np.asarray(a, dtype=np.float32).ravel()
    signed = bool((a32 < 0).any())
    part = a32 if signed else a32[a32 > 0]
    sigma = float(part.std(ddof=1, dtype=np.float64)) if part.size > 1 else 0.0
    a_max = float(a32.max()) if a32.size else 0.0
    a_min = float(a32.min()) if a32.size else 0.0
    if not (math.isfinite(sigma) and math.isfinite(a_max) and math.isfinite(a_min)):
        raise InvalidArgumentError("calibration activation is not finite (NaN or infinity)")
    return activation_range(signed, sigma, a_max, bits, s_sigma, a_min)


# --------------------------------------------------------------------------
# Output


def write_model(
    model: Any,
    path: str,
    external_data: bool | None = None,
    in_path: str | None = None,
    data_files: Sequence[str] = (),
) -> int:
    """Write ``model`` to ``path`` atomically through :func:`atomic_output`:
    one file below 2 GB, else the model plus ``<path>.data`` (its tensors of
    1 KiB or more; every tensor with ``external_data=True``), both under the
    same output rules (symlinks followed, permissions kept, never the input
    model ``in_path`` or one of its ``data_files``) and both staged before
    either replaces its target (the data first). The tensors written to
    ``<path>.data`` are moved out of ``model`` (the caller's private
    copy). Returns the bytes written."""
    from onnx import TensorProto

    name = os.fspath(path)
    inputs = _input_files(in_path, data_files)
    external = _tensor_bytes(model) >= EXTERNAL_ABOVE if external_data is None else external_data
    threshold = 0 if external_data else 1024
    moved = (
        [t for t in _graph_tensors(model.graph) if len(t.raw_data) >= max(threshold, 1)]
        if external
        else []
    )
    if not moved:
        data = model.SerializeToString()
        with atomic_output(name, inputs=inputs) as out:
            out.write(data)
        return len(data)
    data_path = name + ".data"
    location = os.path.basename(name) + ".data"
    _refuse_inputs([name, data_path], in_path, data_files)
    with atomic_output(name, inputs=inputs) as out:
        with atomic_output(data_path, inputs=[*inputs, name]) as data_out:
            offset = 0
            for t in moved:
                raw = t.raw_data
                data_out.write(raw)
                del t.external_data[:]
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset)):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, str(value)
                entry = t.external_data.add()
                entry.key, entry.value = "length", str(len(raw))
                offset += len(raw)
                t.ClearField("raw_data")
            proto = model.SerializeToString()
            out.write(proto)
    return offset + len(proto)


def _check_output(
    out_path: Any,
    in_path: str | None,
    data_files: Sequence[str] = (),
    external_data: bool | None = None,
) -> str:
    """The output path, refused when it (or, with ``external_data=True``,
    its ``.data`` file) is the input model or one of its external data
    files."""
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path must be a path, got {type(out_path).__name__}")
    out = os.fspath(out_path)
    if os.path.isdir(out):
        raise InvalidArgumentError(f"output is a directory: {out}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"output directory does not exist: {parent}")
    if in_path is not None and os.path.realpath(out) == os.path.realpath(in_path):
        raise InvalidArgumentError(f"output path equals the input path: {out}")
    _refuse_inputs([out, out + ".data"] if external_data else [out], in_path, data_files)
    inputs = _input_files(in_path, data_files)
    check_output(out, inputs=inputs)
    if external_data:
        check_output(out + ".data", inputs=[*inputs, out])
    return out


def _input_files(in_path: str | None, data_files: Sequence[str]) -> list[str]:
    return ([in_path] if in_path is not None else []) + list(data_files)


def _refuse_inputs(outputs: Sequence[str], in_path: str | None, data_files: Sequence[str]) -> None:
    """Refuse an output file that is the input model or one of the external
    data files it reads (device and inode compared, so links are caught)."""
    if in_path is None:
        return
    named = [(in_path, f"the input {in_path}")]
    named += [(f, f"the external data file {f} of the input {in_path}") for f in data_files]
    for out in outputs:
        for src, what in named:
            try:
                same = os.path.samefile(out, src)
            except OSError:  # one of them does not exist (yet)
                same = False
            if same:
                raise InvalidArgumentError(
                    f"output {out} is the same file as {what}: refusing to overwrite the input"
                )


# --------------------------------------------------------------------------
# quantize_onnx


def quantize_onnx(
    model_or_path: Any,
    out_path: str | os.PathLike[str],
    wbits: int = 4,
    abits: int | None = None,
    mode: str = "squant",
    *,
    quantizer: str = "asymmetric",
    skip: str | Sequence[str] = (),
    threads: int | None = None,
    s_sigma: float | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    integer_kernels: bool = False,
    quantize_input: bool | tuple[float, float] = False,
    external_data: bool | None = None,
) -> QuantReport:
    """Quantize the Conv / Gemm / MatMul weights of an ONNX model with SQuant
    and write a QDQ ONNX model (opset 21) to ``out_path``. Needs numpy, onnx
    and (with ``abits``) onnxruntime; torch is never imported.

    ``model_or_path``: an ``onnx.ModelProto`` or the path of an ``.onnx``
    file (external data next to it is read). Models below opset 21 are
    converted with ``onnx.version_converter``. ``wbits``, ``mode`` and
    ``quantizer`` are as in :func:`quantize_tensor`; ``skip``: fnmatch
    patterns tried on node names and weight names (one that matches no
    quantizable layer gets a ``UserWarning``, as in :func:`quantize_model`). With ``abits`` the
    inputs of the quantized layers get static per-tensor Q/DQ pairs whose
    ranges come from the sigma rule (``s_sigma``, default by ``abits``) on
    one ``U[0,1)`` batch (``input_shape``, default: the model's input with
    a symbolic batch of 8; ``seed``) run through onnxruntime; the first
    layer's input stays float and the last layer's is 8-bit. With
    ``integer_kernels=True`` (needs ``abits``) every activation tensor
    between quantized ops gets one QuantizeLinear after its producer and one
    DequantizeLinear for its readers: the layers' outputs (after a Relu /
    Clip that alone reads them), the inputs and output of residual Adds,
    pooling and Flatten / Reshape paths (those share their input's range);
    ranges of tensors that are no layer's input come from the same sigma
    rule (``abits``), and ranges after a Clip are capped at its maximum
    (ReLU6: 6). onnxruntime then runs every layer with a quantized input as
    QLinearConv / QGemm and the Adds as QLinearAdd (use
    ``quantizer="symmetric"``); that adds one rounding per layer and Add
    output (and the capped ranges) to what
    :func:`quantize_model`'s fake-quant model computes.
    ``quantize_input`` (needs ``abits``): also quantize the first layer's
    input (the algorithm keeps it float): ``True`` takes the sigma rule on
    the calibration batch, a ``(lo, hi)`` pair is used as given (e.g. the
    range of the model's normalized inputs). Activations are uint8 (signed
    ranges with zero point 128). The output is one file unless its tensors
    exceed 2 GB (then ``<out>.data`` too; ``external_data`` forces either);
    it is written atomically, and the input is never modified.

    Returns:
        The per-layer :class:`QuantReport` (``size_before``/``size_after``:
        tensor bytes of the input and bytes written).

    Raises:
        OnnxFormatError: not an ONNX model, truncated or corrupt, unsupported
            opset, already quantized, no quantizable layer.
        InvalidArgumentError: bad arguments, an output path (or, with external
            data, its ``.data`` file) that is the input or one of the
            external data files the input reads.
        ImportError: onnx (or, with ``abits``, onnxruntime) is missing.
    """
    wall = time.perf_counter()
    wbits = check_bits(wbits, "wbits")
    if abits is not None:
        abits = check_bits(abits, "abits")
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    n_threads = check_threads(threads)
    patterns = check_patterns(skip, "skip")
    mult = _s_sigma(s_sigma, abits)
    model, in_path, data_files = _load(model_or_path)
    out = _check_output(out_path, in_path, data_files, external_data)
    where = in_path or "model"
    size_before = _tensor_bytes(model)
    model = _prepare(model, where)
    if integer_kernels:
        _fold_pads(model)
    matched: set[str] = set()
    layers, skipped = _find_layers(model, patterns, matched)
    for p in patterns:
        if p not in matched:
            warnings.warn(
                f"skip pattern {p!r} matches no quantizable Conv/Gemm/MatMul layer",
                UserWarning,
                stacklevel=2,
            )
    if not layers:
        raise OnnxFormatError(
            f"{where}: no quantizable layer (Conv/Gemm/MatMul with a float32 initializer weight)"
        )
    inits = _initializers(model.graph)
    from onnx import numpy_helper

    order: list[str] = []
    arrays: list[np.ndarray] = []
    axes: dict[str, int] = {}
    for layer in layers:
        if layer.weight not in axes:
            a = numpy_helper.to_array(inits[layer.weight]).astype(np.float32, copy=False)
            if a.size == 0:
                raise InvalidArgumentError(
                    f"{_weight_label(layers, layer.weight)}: weight tensor is empty "
                    f"(shape {tuple(a.shape)})"
                )
            arrays.append(np.ascontiguousarray(a.T) if layer.axis == 1 else a)
            order.append(layer.weight)
            axes[layer.weight] = layer.axis
    start = time.perf_counter()
    try:
        qts = quantize_tensors(arrays, wbits, mode, threads=n_threads, quantizer=quantizer)
    except SquantError as exc:
        # "weight {i}: ..." (an index into arrays): name the initializer instead.
        m = re.match(r"weight (\d+): ", str(exc))
        if m is None or int(m.group(1)) >= len(order):
            raise
        label = _weight_label(layers, order[int(m.group(1))])
        raise type(exc)(f"{label}: {str(exc)[m.end() :]}") from None
    ms = (time.perf_counter() - start) * 1e3
    weights = {name: _Weight(name, axes[name], qt) for name, qt in zip(order, qts)}
    for layer in layers:
        weights[layer.weight].layers.append(layer)
    if integer_kernels and abits is None:
        raise InvalidArgumentError("integer_kernels=True needs abits (quantized activations)")
    input_range = _check_quantize_input(quantize_input, abits)
    plan: dict[str, tuple[int, float, float]] | None = None
    if abits is not None:
        assert mult is not None
        feeds = _input_feeds(model, int(seed), input_shape)
        probes = [layer.node.input[0] for layer in layers]
        values = _observe(model, probes, feeds, n_threads)
        for i, (layer, a) in enumerate(zip(layers, values)):
            if i == 0:
                continue  # the first layer's input stays float (unless quantize_input)
            bits = 8 if i == len(layers) - 1 else abits
            layer.act = (bits, *sigma_range(a, bits, mult))
        _first_input(model, layers, abits, mult, feeds, input_range)
        bounds = _clip_max(model)
        for layer in layers:
            if layer.act is not None:
                layer.act = _capped(layer.act, bounds.get(layer.node.input[0]))
        if integer_kernels:
            plan = _integer_ranges(model, layers, abits, mult, feeds, n_threads, {})
    reports = _layer_reports(layers, weights, arrays, order, ms)
    _rewrite(model, list(weights.values()), plan)
    size_after = write_model(model, out, external_data, in_path, data_files)
    return QuantReport(
        layers=reports,
        wbits=wbits,
        mode=mode,
        abits=abits,
        wall_ms=(time.perf_counter() - wall) * 1e3,
        skipped=skipped,
        size_before=size_before,
        size_after=size_after,
        quantizer=quantizer,
    )


def _weight_label(layers: list[_Layer], weight: str) -> str:
    """``initializer 'w' (node 'a', ...)`` for error messages."""
    nodes = ", ".join(repr(ly.name) for ly in layers if ly.weight == weight)
    return f"initializer {weight!r} (weight of node {nodes})"


def _s_sigma(s_sigma: float | None, abits: int | None) -> float | None:
    if s_sigma is not None:
        if isinstance(s_sigma, bool) or not isinstance(s_sigma, (int, float)):
            raise TypeError(f"s_sigma must be a number, got {s_sigma!r}")
        if not (math.isfinite(s_sigma) and s_sigma > 0):
            raise InvalidArgumentError(f"s_sigma must be a positive number, got {s_sigma}")
        return float(s_sigma)
    return default_s_sigma(abits) if abits is not None else None


def _check_quantize_input(
    quantize_input: bool | tuple[float, float], abits: int | None
) -> bool | tuple[float, float]:
    """``quantize_input``: False, True, or an explicit ``(lo, hi)`` range."""
    if isinstance(quantize_input, bool):
        if quantize_input and abits is None:
            raise InvalidArgumentError("quantize_input needs abits (quantized activations)")
        return quantize_input
    if (
        isinstance(quantize_input, (tuple, list))
        and len(quantize_input) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in quantize_input)
    ):
        lo, hi = float(quantize_input[0]), float(quantize_input[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi and lo < hi):
            raise InvalidArgumentError(
                "quantize_input range must be finite with lo <= 0 <= hi and lo < hi, "
                f"got {quantize_input}"
            )
        if abits is None:
            raise InvalidArgumentError("quantize_input needs abits (quantized activations)")
        return lo, hi
    raise TypeError(f"quantize_input must be a bool or a (lo, hi) pair, got {quantize_input!r}")


def _first_input(
    model: Any,
    layers: list[_Layer],
    abits: int,
    mult: float,
    feeds: dict[str, Any],
    input_range: bool | tuple[float, float],
) -> None:
    """With ``quantize_input``: a range (8 bits if the layer is also the
    last) for the layers reading a graph input, from the sigma rule on the
    calibration batch or the given ``(lo, hi)``."""
    if input_range is False:
        return
    for i, layer in enumerate(layers):
        src = layer.node.input[0]
        if layer.act is not None or src not in feeds:
            continue
        bits = 8 if i == len(layers) - 1 else abits
        if isinstance(input_range, tuple):
            layer.act = (bits, *input_range)
        else:
            layer.act = (bits, *sigma_range(feeds[src], bits, mult))


def _integer_ranges(
    model: Any,
    layers: list[_Layer],
    abits: int,
    mult: float,
    feeds: dict[str, Any],
    threads: int,
    known: dict[str, tuple[float, float]],
) -> dict[str, tuple[int, float, float]]:
    """The ranges of :func:`_integer_plan`'s tensors: the layers' own, those
    in ``known`` (BN statistics), else the sigma rule (``abits``) on the
    calibration batch run through onnxruntime; capped at a ReLU6's 6."""
    ranges, same = _integer_plan(model, layers)
    todo = [t for t, r in ranges.items() if r is None and t not in known]
    values = _observe(model, todo, feeds, threads) if todo else []
    for t, a in zip(todo, values):
        ranges[t] = (abits, *sigma_range(a, abits, mult))
    bounds = _clip_max(model)
    full: dict[str, tuple[int, float, float] | None] = {}
    for t, r in ranges.items():
        r = r if r is not None else (abits, *known[t])
        full[t] = _capped(r, bounds.get(t))
    return _resolve_plan(full, same)


def _layer_reports(
    layers: list[_Layer],
    weights: dict[str, _Weight],
    arrays: list[np.ndarray],
    order: list[str],
    ms: float,
) -> list[LayerReport]:
    by_name = dict(zip(order, arrays))
    out: list[LayerReport] = []
    seen: set[str] = set()
    total = sum(a.size for a in arrays) or 1
    for layer in layers:
        wt = weights[layer.weight]
        first = layer.weight not in seen
        seen.add(layer.weight)
        w = by_name[layer.weight]
        act = layer.act
        out.append(
            LayerReport(
                name=layer.name,
                shape=tuple(int(d) for d in w.shape),
                params=int(w.size) if first else 0,
                time_ms=ms * w.size / total if first else 0.0,
                rel_error=relative_error(w, wt.qt.dequantize()),
                k_flips=wt.qt.k_flips if first else 0,
                c_flips=wt.qt.c_flips if first else 0,
                bits=wt.qt.bits,
                kind=layer.op,
                act_bits=None if act is None else act[0],
                act_range=None if act is None else (act[1], act[2]),
                qtensor=wt.qt,
            )
        )
    return out


# --------------------------------------------------------------------------
# export_onnx


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    wbits: int = 4,
    abits: int | None = None,
    mode: str = "squant",
    *,
    quantizer: str = "asymmetric",
    recipe: str | None = None,
    skip: str | Sequence[str] = (),
    backend: str = "auto",
    threads: int | None = None,
    s_sigma: float | None = None,
    seed: int = 0,
    integer_kernels: bool = False,
    quantize_input: bool | tuple[float, float] = False,
    external_data: bool | None = None,
) -> QuantReport:
    """Quantize a torch model with SQuant and export it as a QDQ ONNX model.

    BatchNorm layers are folded into the Conv before them first
    (``quantize_model(..., fold_bn=True)``, where folding is exact:
    ``docs/recipe.md``; a BN after a Linear stays a ``BatchNormalization``
    node), so the quantized weights are the ones the exported graph uses
    (the graph runs in eval mode: a model in training mode is quantized
    from an eval-mode copy; its own modes stay). The model is exported with
    ``torch.onnx.export`` (TorchScript exporter) on ``example_input``;
    each quantized weight becomes ``DequantizeLinear`` of its SQuant codes
    and, with ``abits``, the layer inputs get the Q/DQ pairs of the ranges
    :func:`quantize_model` calibrated (on one ``U[0,1)`` batch of
    ``example_input``'s shape), biases int32 (see the module doc).
    ``wbits``, ``abits``, ``mode``, ``quantizer``, ``skip``, ``backend``,
    ``threads``, ``s_sigma`` and ``seed`` are :func:`quantize_model`'s;
    ``recipe`` is passed on to it where it has that option (``None``:
    :func:`quantize_model`'s default, ``"squant+"``);
    ``integer_kernels`` and ``quantize_input`` are :func:`quantize_onnx`'s:
    the ranges of tensors that are no layer's input come, under a recipe
    with BN activation ranges (``"squant+"``), from the BatchNorm folded
    into the layer that produces them (``mu -+ n sigma`` of ``beta``,
    ``|gamma|``, clipped by its ReLU / ReLU6), else from the sigma rule on
    :func:`quantize_model`'s calibration batch run through onnxruntime.
    The model is not modified.

    Returns:
        The per-layer :class:`QuantReport` (sizes: float weights and bytes
        written).

    Raises:
        InvalidArgumentError: bad arguments, no layer to quantize, a float16
            / float64 model, ``abits`` with several inputs, a quantized
            weight missing from the exported graph.
        ImportError: torch or onnx is missing.
    """
    wall = time.perf_counter()
    onnx = require_onnx()
    import torch

    from ..model.pipeline import activation_quantizers, quantize_model

    out = _check_output(path, None, (), external_data)
    input_range = _check_quantize_input(quantize_input, abits)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a tuple of tensors")
    if abits is not None and len(inputs) > 1:
        raise InvalidArgumentError(
            f"abits: quantize_model calibrates the activation ranges on one U[0,1) input, "
            f"and this model takes {len(inputs)}; export it weight-only (abits=None), or "
            "export it to ONNX and use quantize_onnx (it calibrates every float32 input)"
        )
    _check_float32(model, inputs)
    kwargs: dict[str, Any] = {
        "quantizer": quantizer,
        "skip": skip,
        "backend": backend,
        "threads": threads,
        "s_sigma": s_sigma,
        "seed": seed,
        "input_shape": tuple(inputs[0].shape),
        "return_report": True,
    }
    params = inspect.signature(quantize_model).parameters
    if "fold_bn" in params:
        kwargs["fold_bn"] = True
    if recipe is not None:
        if "recipe" not in params:
            raise InvalidArgumentError("recipe= needs a quantize_model with recipes")
        kwargs["recipe"] = recipe
    source = model
    if any(m.training for m in model.modules()):
        # The graph is exported in eval mode, where torch's exporter folds
        # every BatchNorm: quantize (and fold) what that graph runs, from an
        # eval-mode copy (quantize_model folds eval-mode BNs only; the
        # caller's model keeps its modes).
        source = copy.deepcopy(model).eval()
    qmodel, report = quantize_model(source, wbits, abits, mode, **kwargs)
    assert isinstance(report, QuantReport)
    if not report.layers:
        raise InvalidArgumentError(
            f"the model ({type(model).__name__}) has no layer to quantize (no Conv1d/2d/3d "
            "or Linear layer, or all of them skipped): nothing to export"
        )
    for hook in activation_quantizers(qmodel).values():
        hook.enabled = False  # the graph gets Q/DQ nodes instead
    qmodel.eval()
    with tempfile.TemporaryDirectory() as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        with warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call;
            # it is the one that keeps the parameter names (<layer>.weight).
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # F.pad's pads: a strided Slice torch cannot fold (onnxruntime can).
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(
                qmodel,
                inputs,
                float_path,
                dynamo=False,
                opset_version=17,
                do_constant_folding=True,
                input_names=[f"input{i}" if i else "input" for i in range(len(inputs))],
                dynamic_axes={"input": {0: "batch"}},
            )
        graph_model = onnx.load(float_path)
    graph_model = _prepare(graph_model, "exported model")
    if integer_kernels:
        _fold_pads(graph_model)
    size_before = _tensor_bytes(graph_model)
    layers, _ = _find_layers(graph_model, ())
    inits = _initializers(graph_model.graph)
    why = ""
    bns = [
        n for n, m in qmodel.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if bns and not any(n.op_type == "BatchNormalization" for n in graph_model.graph.node):
        why = (
            f": torch's exporter folded a BatchNorm ({', '.join(bns[:3])}) that quantize_model "
            "did not fold, and the folded weight is not a per-channel multiple of the "
            "quantized one; export the float model with torch.onnx.export and quantize the "
            "file with quantize_onnx"
        )
    weights, by_layer = _match_layers(layers, inits, report.layers, why)
    if integer_kernels and abits is None:
        raise InvalidArgumentError("integer_kernels=True needs abits (quantized activations)")
    plan: dict[str, tuple[int, float, float]] | None = None
    if abits is not None and (integer_kernels or input_range is not False):
        mult = _s_sigma(s_sigma, abits)
        assert mult is not None
        n_threads = check_threads(threads)
        feeds = _input_feeds(graph_model, int(seed), tuple(inputs[0].shape))
        if len(inputs) == 1:
            # quantize_model's calibration batch
            gen = torch.Generator().manual_seed(int(seed))
            feeds["input"] = torch.rand(tuple(inputs[0].shape), generator=gen).numpy()
        _first_input(graph_model, layers, abits, mult, feeds, input_range)
        for rep in report.layers:
            first = by_layer.get(rep.name, [])
            if rep.act_bits is None and first and first[0].act is not None:
                rep.act_bits, lo, hi = first[0].act
                rep.act_range = (lo, hi)
                rep.range_source = "given" if isinstance(input_range, tuple) else "sigma"
        bounds = _clip_max(graph_model)
        for layer in layers:
            if layer.act is not None:
                layer.act = _capped(layer.act, bounds.get(layer.node.input[0]))
        if integer_kernels:
            known = _bn_output_ranges(source, graph_model, report, by_layer, abits)
            plan = _integer_ranges(graph_model, layers, abits, mult, feeds, n_threads, known)
    _rewrite(graph_model, weights, plan)
    report.size_before = size_before
    report.size_after = write_model(graph_model, out, external_data)
    report.wall_ms = (time.perf_counter() - wall) * 1e3
    return report


def _check_float32(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """The exported graph must hold the float32 weights quantize_model
    dequantizes: a float16 / float64 model (or input) is refused."""
    import torch

    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise InvalidArgumentError(
                f"export_onnx needs a float32 model: {name} is {t.dtype} "
                "(convert a copy with .float() and pass a float32 example_input)"
            )
    for i, t in enumerate(inputs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise InvalidArgumentError(
                f"export_onnx needs float32 example inputs: input {i} is {t.dtype}"
            )


def _bn_output_ranges(
    model: nn.Module,
    graph_model: Any,
    report: QuantReport,
    by_layer: dict[str, list[_Layer]],
    abits: int,
) -> dict[str, tuple[float, float]]:
    """Under a recipe with BN activation ranges (squant+): the ranges of the
    integer-kernel layer outputs from the BatchNorm folded into each layer
    (``mu -+ n sigma`` of ``beta``, ``|gamma|``, clipped by a Relu / Clip
    that alone reads it), by ONNX tensor name. Empty for the paper recipe."""
    from ..model import recipe as rc
    from ..model.fold import _fx_pairs, trace

    try:
        config = rc.resolve_recipe(report.recipe)
    except Exception:  # pragma: no cover - a recipe name this module does not know
        return {}
    if config.act_ranges != "bn":
        return {}
    graph = trace(model)
    if graph is None:
        return {}
    bns = dict(_fx_pairs(model, graph, dict(model.named_modules())))
    clips = _clip_bounds(graph_model)
    outputs = {o.name for o in graph_model.graph.output}
    out: dict[str, tuple[float, float]] = {}
    for name, onnx_layers in by_layer.items():
        bn = bns.get(name)
        stats = rc._bn_stats(model.get_submodule(bn)) if bn is not None else None
        if stats is None:
            continue
        for layer in onnx_layers:
            t = layer.node.output[0]
            readers = [n for n in graph_model.graph.node if t in n.input]
            st = stats
            if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and t not in outputs:
                t = readers[0].output[0]
                lo, hi = clips.get(t, (-math.inf, math.inf))
                st = stats.clipped(lo, hi, readers[0].op_type.lower())
            out[t] = rc.bn_range(st, abits, config.bn_sigmas)
    return out


def _clip_bounds(model: Any) -> dict[str, tuple[float, float]]:
    """``(lo, hi)`` of every Relu and of Clips with constant bounds."""
    from onnx import numpy_helper

    consts = _constants(model)
    out: dict[str, tuple[float, float]] = {}
    for n in model.graph.node:
        if n.op_type == "Relu":
            out[n.output[0]] = (0.0, math.inf)
        elif n.op_type == "Clip":
            b = [-math.inf, math.inf]
            for k in (1, 2):
                if len(n.input) > k and n.input[k] in consts:
                    v = numpy_helper.to_array(consts[n.input[k]])
                    if v.size == 1 and np.isfinite(v).all():
                        b[k - 1] = float(v.reshape(()))
            out[n.output[0]] = (b[0], b[1])
    return out


def _as_numpy_qt(qt: QuantizedTensor) -> QuantizedTensor:
    """The same quantized tensor with numpy arrays (torch input gives tensors)."""
    from dataclasses import replace

    def np_of(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    return replace(
        qt,
        codes=np_of(qt.codes),
        scale=np_of(qt.scale),
        zero_point=np_of(qt.zero_point),
        dtype=np.float32,
    )


def _scope_names(module: str) -> list[str]:
    """The scope names torch's TorchScript exporter gives the nodes of module
    ``module`` (``layers.0.conv`` -> ``layers``, ``layers.0``, ``conv``: each
    module's name from its last non-numeric atom on)."""
    atoms = module.split(".")
    out = []
    for i in range(1, len(atoms) + 1):
        j = i - 1
        while j > 0 and atoms[j].isnumeric():
            j -= 1
        out.append(".".join(atoms[j:i]))
    return out


def _scope_match(node_name: str, module: str) -> int:
    """2: ``node_name`` (``/layers/layers.0/conv/Conv``) is a node of
    ``module``'s scope, 1: of one of its later calls (``/a_1/MatMul``: the
    exporter numbers repeated scopes), 0: neither."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0]:
        return 0
    scope, want = parts[1:-1], _scope_names(module)
    if len(scope) != len(want):
        return 0
    score = 2
    for got, w in zip(scope, want):
        if got != w:
            if not (got.startswith(w + "_") and got[len(w) + 1 :].isdigit()):
                return 0
            score = 1
    return score


def _same_qt(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (
        a.bits == b.bits
        and np.array_equal(a.codes, b.codes)
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(a.zero_point, b.zero_point)
    )


def _match_layers(
    layers: list[_Layer], inits: dict[str, Any], reps: list[LayerReport], why: str = ""
) -> tuple[list[_Weight], dict[str, list[_Layer]]]:
    """Which graph layers run which quantized layer of the report.

    A graph layer belongs to a report layer when its weight initializer
    (looked up through Identity nodes: torch's exporter merges equal-valued
    and shared weights into one initializer) equals the report layer's
    dequantized weight; among several such report layers, to the one whose
    module scope the node is in. Graph layers on one initializer share one
    DequantizeLinear when their quantized weights are the same (equal
    values quantize to the same codes), else each quantized weight gets its
    own. The activation range of a graph layer is its report layer's.

    Returns:
        The quantized weights, and the graph layers of each report layer.

    Raises:
        InvalidArgumentError: a report layer whose weight no initializer
            holds (``why`` appended: what the caller knows of the cause).
    """
    from onnx import numpy_helper

    def digest(a: np.ndarray) -> tuple[tuple[int, ...], int]:
        return a.shape, hash((a + np.float32(0.0)).tobytes())  # -0.0 as 0.0

    values: dict[tuple[str, int], np.ndarray] = {}
    by_digest: dict[tuple[tuple[int, ...], int], list[_Layer]] = {}
    for layer in layers:
        key = (layer.weight, layer.axis)
        if key not in values:
            a = numpy_helper.to_array(inits[layer.weight])
            values[key] = a.T if layer.axis == 1 else a
        by_digest.setdefault(digest(values[key]), []).append(layer)

    qts: list[QuantizedTensor] = []
    cands: list[set[int]] = []  # ids of the graph layers holding each report layer's weight
    folded_here: list[str] = []  # layers with a BN only torch's exporter folded
    per_layer: dict[int, QuantizedTensor] = {}  # such graph layers' own quantized weights
    for rep in reps:
        if rep.qtensor is None:  # pragma: no cover - quantize_model fills it
            qts.append(None)  # type: ignore[arg-type]
            cands.append(set())
            continue
        qt = _as_numpy_qt(rep.qtensor)
        want = np.asarray(qt.dequantize())
        found = {
            id(ly)
            for ly in by_digest.get(digest(want), [])
            if np.array_equal(values[(ly.weight, ly.axis)], want)
        }
        qts.append(qt)
        cands.append(found)
    # Graph layers no report layer's weight matches, in a report layer's
    # scope (any of its calls): torch's exporter folded a BatchNorm into
    # that call that quantize_model left unfolded (a hook, a module with a
    # forward of its own, an untraceable model, a layer called twice with a
    # BN after each call). Each such call runs the layer's SQuant codes with
    # each channel's scale times that BN's factor.
    matched = set().union(*cands) if cands else set()
    for ri, rp in enumerate(reps):
        if qts[ri] is None:  # pragma: no cover - quantize_model fills it
            continue
        unmatched = [
            ly for ly in layers if id(ly) not in matched and _scope_match(ly.name, rp.name) > 0
        ]
        if not unmatched:
            continue
        want = np.asarray(qts[ri].dequantize())
        scaled: list[tuple[_Layer, QuantizedTensor]] = []
        for ly in unmatched:
            sq = _scaled_codes(values[(ly.weight, ly.axis)], qts[ri], want)
            if sq is not None:
                scaled.append((ly, sq))
        if not scaled:
            continue
        for ly, sq in scaled:
            per_layer[id(ly)] = sq
            cands[ri].add(id(ly))
            matched.add(id(ly))
        folded_here.append(rp.name)
        rp.folded = True
        if all(id(ly) in per_layer for ly in layers if id(ly) in cands[ri]):
            # Every call of the layer runs a folded weight: report its own
            # scope's (else the first call's).
            mine = [sq for ly, sq in scaled if _scope_match(ly.name, rp.name) == 2]
            qts[ri] = mine[0] if mine else scaled[0][1]
            rp.qtensor = qts[ri]
    for ri, rp in enumerate(reps):
        if rp.qtensor is not None and not cands[ri]:
            raise InvalidArgumentError(
                f"layer {rp.name!r}: its quantized weight is not an initializer of the "
                f"exported graph{why}"
            )
    owner: dict[int, int] = {}  # id(graph layer) -> report index
    for layer in layers:
        scored = [
            (_scope_match(layer.name, rep.name), -i)
            for i, rep in enumerate(reps)
            if id(layer) in cands[i]
        ]
        scored = [sc for sc in scored if sc[0] > 0]
        if scored:
            owner[id(layer)] = -max(scored)[1]
    for layer in layers:
        if id(layer) in owner:
            continue
        which = [i for i in range(len(reps)) if id(layer) in cands[i]]
        if not which:
            continue  # a weight quantize_model left float
        first = which[0]
        setting = (reps[first].act_bits, reps[first].act_range)
        if any(
            not _same_qt(qts[i], qts[first]) or (reps[i].act_bits, reps[i].act_range) != setting
            for i in which[1:]
        ):
            warnings.warn(
                f"node {layer.name!r}: its weight is that of the layers "
                f"{', '.join(repr(reps[i].name) for i in which)}, quantized or calibrated "
                f"differently, and its scope names none of them; using {reps[first].name!r}'s",
                UserWarning,
                stacklevel=3,
            )
        owner[id(layer)] = first
    weights: list[_Weight] = []
    by_layer: dict[str, list[_Layer]] = {rep.name: [] for rep in reps}
    for layer in layers:
        i = owner.get(id(layer))
        if i is None:
            continue
        rep = reps[i]
        by_layer[rep.name].append(layer)
        if rep.act_range is not None and rep.act_bits is not None:
            layer.act = (rep.act_bits, *rep.act_range)
        q = per_layer.get(id(layer), qts[i])
        wt = next((w for w in weights if w.name == layer.weight and _same_qt(w.qt, q)), None)
        if wt is None:
            shared = any(w.name == layer.weight for w in weights)
            # (a weight the exporter folded has a generated name: the layer's)
            own = shared or rep.name in folded_here
            base = f"{rep.name}.weight" if own else layer.weight
            wt = _Weight(layer.weight, layer.axis, q, base=base)
            weights.append(wt)
        wt.layers.append(layer)
    if folded_here:
        warnings.warn(
            "torch's exporter folded a BatchNorm into "
            f"{', '.join(repr(n) for n in folded_here)}, which quantize_model left unfolded "
            "(a hook, a module with a forward of its own, or a model it cannot trace): "
            "the graph runs their SQuant codes with each channel's scale times the "
            "BatchNorm's factor",
            UserWarning,
            stacklevel=3,
        )
    return weights, by_layer


def _scaled_codes(g: np.ndarray, qt: QuantizedTensor, want: np.ndarray) -> QuantizedTensor | None:
    """``qt`` re-expressed to dequantize to ``g`` where ``g`` is ``k_c``
    times its dequantized weight ``want`` in every output channel ``c``
    (within float32 rounding: a BatchNorm folded into it by torch's
    exporter): each channel's scale divided by ``|k_c|``; for ``k_c < 0``
    the codes ``-1 - c`` and zero point ``1 - z`` (``-(c + z)`` without
    leaving the code range), or ``-c`` where the zero point is 0 (the
    symmetric quantizer's narrow range stays); a channel with ``k_c = 0``
    (a zero gamma) codes and zero point 0. ``None`` where ``g`` is no such
    multiple."""
    from dataclasses import replace

    if g.shape != want.shape:
        return None
    oc = int(want.shape[0]) if want.ndim else 0
    w = want.reshape(oc, -1).astype(np.float64)
    g64 = g.reshape(oc, -1).astype(np.float64)
    rows = np.arange(oc)
    at = np.abs(w).argmax(axis=1)
    pivot = w[rows, at]
    k = np.where(pivot != 0, g64[rows, at] / np.where(pivot != 0, pivot, 1.0), 1.0)
    if not np.isfinite(k).all():
        return None
    tol = 4 * np.finfo(np.float32).eps * np.abs(g64).max(axis=1, initial=0.0) + 1e-30
    if (np.abs(g64 - k[:, None] * w) > tol[:, None]).any():
        return None
    codes = np.asarray(qt.codes).astype(np.int32).reshape(oc, -1)
    zp = np.asarray(qt.zero_point, dtype=np.float32).reshape(-1).copy()
    scale = np.asarray(qt.scale, dtype=np.float64).reshape(-1).copy()
    for c in np.flatnonzero(k < 0):
        if zp[c] == 0:
            codes[c] = -codes[c]
        else:
            codes[c] = -1 - codes[c]
            zp[c] = np.float32(1.0) - zp[c]
    zero = k == 0
    codes[zero] = 0
    zp[zero] = 0.0
    scale = np.where(zero, scale, scale / np.where(zero, 1.0, np.abs(k)))
    if codes.size and (codes.min() < -128 or codes.max() > 127):  # pragma: no cover
        return None
    new = replace(
        qt,
        codes=codes.astype(np.int8).reshape(np.asarray(qt.codes).shape),
        scale=scale.astype(np.float32),
        zero_point=zp,
    )
    got = np.asarray(new.dequantize(), dtype=np.float64).reshape(oc, -1)
    if (np.abs(got - g64) > tol[:, None]).any():
        return None
    return new
