"""What the integer-kernel form of the rewrite quantizes: the activation
tensors between quantized ops and the ranges they share
(:func:`_integer_plan`); the constant bounds of Clips that cap those ranges
(:func:`_clip_max`), and the zero Pads folded into Convs first
(:func:`_fold_pads`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import QUANT_OPS
from .graph import _constant_nodes, _Layer, _subgraph_reads

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
    nodes = _constant_nodes(producers, inits, tensor, 64, lambda n: n.op_type in QUANT_OPS)
    if nodes is None:
        return None  # a graph input (or a long chain): not a constant
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
    """Fold each zero ``Pad`` read only by a Conv (no If / Loop / Scan body
    reads it) into the Conv's ``pads`` (exact: the same zeros), as
    onnxruntime's PadFusion does for float graphs; with Q/DQ pairs between
    them that fusion cannot happen any more and the Pad would stay a float
    op between two quantized layers.
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
        if any(pad.output[0] in _subgraph_reads(n) for n in graph.node):
            continue  # an If / Loop / Scan body reads it too
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
