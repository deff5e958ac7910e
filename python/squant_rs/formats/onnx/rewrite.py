"""The rewrite: each quantized weight as ``DequantizeLinear`` of its codes
(:func:`_weight_encoding`), and the activation Q/DQ pairs and int32 biases,
put into the graph (:func:`_rewrite`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._squant_rs import InvalidArgumentError
from ...model.activations import activation_qparams
from .graph import (
    _WEIGHT_OPS,
    _constant_nodes,
    _graphs,
    _has_subgraph,
    _identity_source,
    _initializers,
    _Layer,
    _sparse_names,
    _subgraph_reads,
    _view_source,
    _Weight,
)

if TYPE_CHECKING:
    from ...tensor.quantized import QuantizedTensor

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


#: The int32 bias codes :func:`_finer` leaves room for: half of int32's
#: range, the rest for the float32 rounding of the bias step and for the
#: integer kernel's accumulator, which adds the products to the bias.
_BIAS_CODES = 2**30


def _finer(
    k: np.ndarray, p: np.float32, values: np.ndarray, lo: int, hi: int, bias: float = 0.0
) -> tuple[np.ndarray, np.float32]:
    """``k * m`` and ``p / m`` (rounded to float32) for the largest integer
    ``m`` (of the few tried) with ``k * m`` in ``[lo, hi]`` (and below
    2^24) and ``(k * m) * (p / m) == values`` exactly in float32; ``(k,
    p)`` itself where no ``m > 1`` fits. Tried: the 8 largest ``m``, then
    the largest power of two, which is exact unless ``p / m`` underflows.
    A finer step ``p`` keeps the int32 bias step ``a_scale * p`` as fine as
    an ordinary channel's (with ``k = +-1`` it is ~127x coarser at int8).
    ``bias``: the channel's largest ``|bias| / a_scale`` over the layers
    reading it with a quantized input (0: none); ``m`` keeps the int32
    bias code ``bias * m / p`` within :data:`_BIAS_CODES`, as a tiny
    weight with a normal bias (a BatchNorm-folded near-dead channel) needs."""
    k_max, k_min = int(k.max(initial=0)), int(k.min(initial=0))
    bounds = [min(hi, _EXACT - 1) // k_max] if k_max > 0 else []
    bounds += [max(lo, 1 - _EXACT) // k_min] if k_min < 0 else []
    if bias > 0 and bounds:
        bounds.append(int(min(_BIAS_CODES * np.float64(p) / bias, _EXACT)))
    if not bounds or min(bounds) < 2:
        return k, p
    top = min(bounds)
    tries = [*range(top, max(top - 8, 1), -1), 1 << (top.bit_length() - 1)]
    want = values.astype(np.float32)
    for m in tries:
        step = np.float32(np.float64(p) / m)
        if step > 0 and np.array_equal((k * m).astype(np.float32) * step, want):
            return k * m, step
    return k, p


def _weight_encoding(
    qt: QuantizedTensor, name: str, bias: np.ndarray | None = None
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
    the codes' type; those integers are then scaled up as far as that type
    holds them (:func:`_finer`: a constant channel as ``+-127`` times
    ``|w| / 127`` at int8 where that is exact), so that the int32 bias step
    ``a_scale * (1/s)`` is as fine as an ordinary channel's (``bias``: per
    channel, :func:`_finer`'s ``bias``, which caps that scaling). ORT then
    computes exactly ``qt.dequantize()``."""
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
                    _, c_lo, c_hi = _CONTAINERS[alt]
                    b_c = 0.0 if bias is None else float(bias[c])
                    k, p = _finer(k, p, values[c], c_lo, c_hi, b_c)
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


#: The largest ``|x - x_zero_point|`` of a uint8 activation code.
_ACC_INPUT = 255

#: Per layer: its weight's steps ``1/s`` per channel, rank, per channel
#: the bound ``_ACC_INPUT * sum |q - zp|`` of the integer kernel's sum of
#: products, which it adds to the int32 bias code, and whether the layer is
#: a Conv whose output only reaches readers that map negatives to 0
#: (:func:`_clamps_negatives`, on the graph before the rewrite).
_WeightSteps = tuple[np.ndarray, int, np.ndarray, bool]


def _rewrite(
    model: Any,
    weights: list[_Weight],
    plan: dict[str, tuple[int, float, float]] | None = None,
) -> list[tuple[_Layer, str]]:
    """Put the quantized weights, activation Q/DQ pairs and int32 biases into
    ``model`` (in place). ``plan``: the integer-kernel form, the range of
    every activation tensor to quantize (:func:`_integer_plan`); without
    it, a Q/DQ pair on each layer input that has a range. Returns the
    layers to note (:func:`bias_note`): whose bias became a float Add
    (:func:`_bias`), or whose near-dead channels were re-rounded."""
    from onnx import helper, numpy_helper

    graph = model.graph
    names = _Names(graph)
    new_inits: list[Any] = []
    new_nodes: list[tuple[Any, Any]] = []  # (node to insert, before this node)
    w_scales: dict[int, _WeightSteps] = {}
    biases: list[str] = []  # float biases replaced by int32 ones (or an Add's)
    notes: list[tuple[_Layer, str]] = []
    inits = _initializers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    # (read before anything is rewritten: Q/DQ pairs added below read the
    # layers' outputs too)
    clamping = {
        ly.node.output[0]
        for wt in weights
        for ly in wt.layers
        if ly.op == "Conv" and _clamps_negatives(graph, inits, ly.node.output[0])
    }
    for wt in weights:
        base = wt.base or wt.name
        oc = int(np.asarray(wt.qt.codes).shape[0]) if np.asarray(wt.qt.codes).ndim else 0
        ratio = np.zeros(oc)  # per channel: the largest |bias| / a_scale
        positive = np.zeros(oc, bool)  # a reader's bias is positive
        for layer in wt.layers:
            act = layer.act if plan is None else plan.get(layer.node.input[0])
            b = _bias_tensor(producers, inits, layer, oc)
            if act is not None and b is not None:
                signed = numpy_helper.to_array(b).astype(np.float64)
                positive |= signed > 0
                ratio = np.maximum(ratio, np.abs(signed) / float(_act_step(*act)))
        codes, step, zp, kind = _weight_encoding(wt.qt, base, ratio)
        flat = (codes.reshape(oc, -1) if codes.size else np.zeros((oc, 0), np.int64)) - zp[:, None]
        acc = _ACC_INPUT * np.abs(flat).sum(axis=1, dtype=np.float64)
        # A channel whose codes are all its zero point dequantizes to 0 at
        # any step: one large enough for its int32 bias code to fit (a dead
        # channel after BatchNorm folding, a tiny step and a normal bias).
        dead = ~flat.any(axis=1) & (ratio > 0)
        if dead.any():
            need = (ratio / _BIAS_CODES).astype(np.float32)
            step = np.where(dead & (need > step), need, step).astype(np.float32)
        # A near-dead channel (a tiny step, a normal bias) whose int32 bias
        # code would still pass _BIAS_CODES, zero point 0: its weights are
        # re-rounded to the coarser step its bias code fits at (they move
        # by at most half that step; for the ones met, ~1e-8). Not where
        # _bias clamps the code exactly instead (a negative bias whose
        # outputs only reach a ReLU / Clip at 0 / unsigned quantizer).
        need = (ratio * (1 + 1e-6) / _BIAS_CODES).astype(np.float32)
        clamps = all(ly.node.output[0] in clamping for ly in wt.layers)
        coarse = (need > step) & ~dead & (zp == 0) & (positive | ~clamps)
        if coarse.any():
            rows = codes.reshape(oc, -1)  # (a view: codes changes with it)
            for c in np.flatnonzero(coarse):
                rows[c] = np.rint(rows[c] * (np.float64(step[c]) / np.float64(need[c])))
                step[c] = need[c]
            flat = rows - zp[:, None]
            acc = _ACC_INPUT * np.abs(flat).sum(axis=1, dtype=np.float64)
            notes += [(ly, "coarse") for ly in wt.layers]
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
        # (a layer reading a view of the weight: the Slice / Transpose
        # reading the initializer reads the DequantizeLinear instead)
        readers = [layer.node if layer.via is None else layer.via for layer in wt.layers]
        new_nodes.append((dq, min(readers, key=lambda node: _index(graph, node))))
        for layer in wt.layers:
            if layer.via is None:
                layer.node.input[1] = out
            else:
                layer.via.input[0] = out
            w_scales[id(layer.node)] = (step, codes.ndim, acc, layer.node.output[0] in clamping)
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
                biases += [b[0]] if b is not None else []
                notes += [(layer, "float")] if b is not None and b[1] else []
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
                    biases += [b[0]] if b is not None else []
                    notes += [(layer, "float")] if b is not None and b[1] else []
        graph.initializer.extend(new_inits)
    replaced = [wt.name for wt in weights] + biases
    _drop_dead_identities(graph, replaced)
    for name in dict.fromkeys(replaced):
        _drop_initializer(graph, name)
    _toposort(graph)
    return list({(id(ly), kind): (ly, kind) for ly, kind in notes}.values())


def bias_note(name: str, kind: str) -> str:
    """The report's note on a layer :func:`_rewrite` listed: ``"float"``,
    its bias made a float Add by :func:`_bias`; ``"coarse"``, near-dead
    channels of its weight re-rounded so that their int32 bias fits."""
    if kind == "coarse":
        return (
            f"{name}: some near-dead channels (a tiny weight step and a normal bias, e.g. "
            "after BatchNorm folding) had an int32 bias code beyond int32; their weights are "
            "re-rounded to the coarser step the code fits at, so they differ from the "
            "quantized model's by at most half that step (their bias and the integer kernel "
            "are kept)"
        )
    return (
        f"{name}: its bias does not fit int32 at the step a_scale * w_scale[c] with "
        "the integer kernel's sum of products (a bias large against its channel's weights, "
        "e.g. a near-dead channel after BatchNorm folding); it is a float Add after the "
        "layer, so "
        "onnxruntime runs the layer as a float kernel on its dequantized input and weight "
        "(no integer kernel)"
    )


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
    onnxruntime's QDQ fusion wants them. A layer left float (a Conv / Gemm
    / MatMul whose weight is a float constant: skipped) keeps reading the
    float tensor: between a DequantizeLinear and a QuantizeLinear,
    onnxruntime would quantize its weight itself (nearest rounding, int8)
    and run it as an integer kernel. Returns the DequantizeLinear output
    and the step ``1/s``, or None when no other node reads the tensor."""

    readers = [n for n in graph.node if tensor in n.input]
    if any(n.op_type in _WEIGHT_OPS for n in readers):
        producers = {o: n for n in graph.node for o in n.output}
        inits = _initializers(graph)
        sparse = _sparse_names(graph)
        readers = [n for n in readers if not _float_layer(n, producers, inits, sparse)]
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


#: float, float16, double, bfloat16
_FLOAT_TYPES = frozenset({1, 10, 11, 16})


def _float_layer(
    node: Any, producers: dict[str, Any], inits: dict[str, Any], sparse: set[str]
) -> bool:
    """Whether ``node`` is a Conv / ConvTranspose / Gemm / MatMul whose
    weight (second input, read through Identity nodes, or a Slice /
    Transpose view) is a float initializer or a float constant, i.e. not
    quantized: a Constant node's value, a sparse initializer (``sparse``:
    their names) or a tensor computed from those and initializers (a Cast
    of a float16 weight, a Reshape), which onnxruntime folds into an
    initializer. A weight computed from a DequantizeLinear is a quantized
    one."""
    if node.op_type not in _WEIGHT_OPS or len(node.input) < 2:
        return False
    w = _identity_source(producers, inits, node.input[1])
    view = None if w in inits else _view_source(producers, inits, w)
    if view is not None:
        w = view[0]
    if w in inits:
        return inits[w].data_type in _FLOAT_TYPES
    return (
        _constant_nodes(
            producers,
            inits.keys() | sparse,
            w,
            256,
            lambda n: n.op_type == "DequantizeLinear" or _has_subgraph(n),
        )
        is not None
    )


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


def _act_step(bits: int, x_min: float, x_max: float) -> np.float32:
    """The step ``1/s`` of an activation's Q/DQ pair (:func:`_qdq_nodes`)."""
    return np.float32(1.0) / np.float32(activation_qparams(x_min, x_max, bits)[0])


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
    step = _act_step(bits, x_min, x_max)
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


def _bias_tensor(producers: dict[str, Any], inits: dict[str, Any], layer: _Layer, n: int) -> Any:
    """The layer's float bias initializer of shape ``(n,)`` (read through
    Identity nodes too), or None (a MatMul, no bias, another shape)."""
    if layer.op == "MatMul" or len(layer.node.input) < 3:
        return None
    b = inits.get(_identity_source(producers, inits, layer.node.input[2]))
    if b is None or len(b.dims) != 1 or b.dims[0] != n:
        return None
    return b


def _clamps_negatives(graph: Any, inits: dict[str, Any], tensor: str) -> bool:
    """Whether every reader of ``tensor`` maps its negative values to 0:
    ``Relu``, ``Clip`` with a constant minimum of 0 or more, a
    ``QuantizeLinear`` to uint8 with zero point 0."""
    from onnx import numpy_helper

    consts = dict(inits)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t

    def value(name: str) -> np.ndarray | None:
        t = consts.get(name)
        return None if t is None else np.asarray(numpy_helper.to_array(t))

    readers = [n for n in graph.node if tensor in n.input]
    if not readers or tensor in {o.name for o in graph.output}:
        return False
    if any(tensor in _subgraph_reads(n) for n in graph.node):
        return False  # (an If / Loop body reads it)
    for n in readers:
        if n.op_type == "Relu":
            continue
        if n.op_type == "Clip" and len(n.input) > 1 and n.input[0] == tensor:
            lo = value(n.input[1])
            if lo is not None and lo.size == 1 and float(lo) >= 0:
                continue
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[0] == tensor:
            zp = value(n.input[2])
            if zp is not None and zp.dtype == np.uint8 and not zp.any():
                continue
        return False
    return True


def _bias(
    graph: Any,
    names: _Names,
    new_inits: list[Any],
    layer: _Layer,
    inits: dict[str, Any],
    a_step: float,
    w_step: _WeightSteps,
) -> tuple[str, bool] | None:
    """The layer's float bias as ``DequantizeLinear(int32, a_step * w_step[c])``
    (a bias read through Identity nodes too). Returns the float bias
    initializer's name and False, or None when the layer has no such bias.
    Where a channel's code plus its accumulator bound does not fit int32
    (onnxruntime's integer kernel adds the products to the bias in int32,
    wrapping), the bias becomes a float Add of the layer's output and the
    layer reads none (returns True): left in the layer with a quantized
    input and weight, onnxruntime would quantize it to int32 itself,
    saturating, and be off by about the output's whole range."""
    from onnx import helper, numpy_helper

    steps, rank, acc, clamped = w_step
    direct = layer.node.input[2:3] and layer.node.input[2] in inits
    producers = {} if direct else {o: n for n in graph.node for o in n.output}
    b = _bias_tensor(producers, inits, layer, steps.size)
    if b is None:
        return None
    bias = numpy_helper.to_array(b).astype(np.float32)
    step = (np.float32(a_step) * steps).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(bias.astype(np.float64) / step.astype(np.float64))
    base = b.name
    room = 2**31 - 1 - acc
    over = ~(np.abs(q) <= room)  # (NaN too)
    if clamped and over.any() and np.all(step > 0) and np.all(bias[over] < 0):
        # Negative biases past int32 on a Conv's channels whose outputs
        # only reach a ReLU / Clip at 0 or an unsigned quantizer at zero
        # point 0: their output, below -room steps plus at most the
        # products' bound (acc < room), is negative either way, hence 0
        # after it; the code clamped to -room gives the same values.
        if np.all(acc[over] < 2**30):
            q = np.where(over, -room, q)
            over[:] = False
    if not (np.all(step > 0) and not over.any()):
        if layer.op == "Gemm":  # Y = alpha * A B + beta * C
            beta = next((a.f for a in layer.node.attribute if a.name == "beta"), 1.0)
            bias = (np.float32(beta) * bias).astype(np.float32)
        else:  # Conv: (N, C, ...) outputs
            bias = bias.reshape((bias.size,) + (1,) * (rank - 2))
        a_name, out = names(base + "_channels"), layer.node.output[0]
        new_inits.append(numpy_helper.from_array(bias, a_name))
        layer.node.output[0] = names(out + "_without_bias")
        del layer.node.input[2]
        node = helper.make_node(
            "Add", [layer.node.output[0], a_name], [out], name=names(base + "_Add")
        )
        graph.node.insert(_index(graph, layer.node) + 1, node)
        return str(b.name), True
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
    return str(b.name), False
