"""quantize_onnx: ONNX in, QDQ ONNX out (numpy + onnx + onnxruntime; torch is
never imported)."""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..._squant_rs import InvalidArgumentError, SquantError
from ...model.activations import SHAPE_SPELLING, _check_s_sigma, check_seed, default_s_sigma
from ...model.layers import check_patterns, relative_error
from ...model.report import LayerReport, QuantReport
from ...tensor.batch import quantize_tensors
from ...tensor.validate import check_bits, check_mode, check_quantizer, check_threads
from .common import OnnxFormatError, require_onnx_packages
from .graph import _find_layers, _initializers, _Layer, _Weight
from .load import _load, _prepare, _tensor_bytes
from .output import _check_output, write_model
from .plan import (
    _SAME_QPARAMS,
    _capped,
    _clip_max,
    _const_value,
    _constants,
    _fold_pads,
    _integer_plan,
    _resolve_plan,
)
from .ranges import _input_feeds, _observe, check_input_shapes, sigma_range
from .rewrite import _rewrite, bias_note


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
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    integer_kernels: bool = False,
    quantize_input: bool | tuple[float, float] = False,
    external_data: bool | None = None,
) -> QuantReport:
    """Quantize the Conv / Gemm / MatMul weights of an ONNX model with SQuant
    and write a QDQ ONNX model (opset 21) to ``out_path``. Needs numpy, onnx
    and (with ``abits``) onnxruntime; torch is never imported. The weights
    are the float32 initializers these nodes of the main graph read as their
    weight (second) input, 2-D for Gemm and MatMul (directly, or through
    Identity nodes or Slice / Transpose nodes: the whole initializer,
    quantized along the axis the Transposes make the layer's output-channel
    axis, its DequantizeLinear read by the node that read it; a Conv weight
    through a Transpose stays float, with a note); a layer whose constant
    operand is something else (a Constant node's, a sparse initializer or a
    computed weight, a first operand, another rank or dtype, a node inside
    an If / Loop / Scan body) stays float and is listed in the report's
    ``skipped``, with the reason in its ``notes``; so is a ConvTranspose.

    ``model_or_path``: an ``onnx.ModelProto`` with its tensors' data (not
    one loaded with ``load_external_data=False``) or the path of an
    ``.onnx`` file (external data next to it is read). Models at another
    opset (7 and up) are converted to 21 with ``onnx.version_converter``,
    newer ones down (one using an op or type opset 21 lacks is refused,
    naming it). ``wbits``, ``mode`` and
    ``quantizer`` are as in :func:`quantize_tensor`; ``skip``: fnmatch
    patterns tried on node names and weight names (one that matches no
    quantizable layer gets a ``UserWarning``, as in :func:`quantize_model`). With ``abits`` the
    inputs of the quantized layers get static per-tensor Q/DQ pairs whose
    ranges come from the sigma rule (``s_sigma``, default by ``abits``) on
    one ``U[0,1)`` batch per model input run through onnxruntime (``seed``:
    an integer in ``[-2**63, 2**64 - 1]`` as for :func:`quantize_model`,
    seeding numpy's generator, a negative one modulo ``2**64``); the first
    layer's input stays float and the last layer's is 8-bit. The batch's
    shape (``input_shape``): a sequence of positive integers, the shape of
    the model's input (with several inputs: of every input of that rank
    whose fixed dimensions it matches; it must fit one), or a dict of input
    names to shapes. Inputs it does not give take the model's shape: a
    symbolic dimension named like one of a given input takes that size, a
    symbolic first (batch) dimension the first given shape's batch (else
    8); any other symbolic dimension must be given (the error says how). With
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
    range of the model's normalized inputs); the first layer must read the
    model's input directly or through ops that keep its values (Reshape,
    Transpose, a reflect or edge Pad, a constant Pad inside the range,
    ...). Activations are uint8 (signed
    ranges with zero point 128). The output is one file unless its tensors
    exceed 2 GB (then ``<out>.data`` too, with the tensors of 1 KiB or
    more; ``external_data`` forces either);
    it is written atomically, and the input is never modified.

    Returns:
        The per-layer :class:`QuantReport` (``size_before``/``size_after``:
        tensor bytes of the input and bytes written).

    Raises:
        OnnxFormatError: not an ONNX model, truncated or corrupt, unsupported
            opset (or one onnx cannot convert to 21), already quantized, no
            quantizable layer.
        InvalidArgumentError: bad arguments (checked before any work, as in
            :func:`quantize_model`: e.g. an ``input_shape`` with a dimension
            below 1), an output path (or, with external data, its ``.data``
            file) that is the input or one of the external data files the
            input reads (of any tensor), an ``onnx.ModelProto`` whose
            tensors reference external data not loaded, ``quantize_input``
            where the first layer reads something other than the model's
            input (``(x - mean) / std`` computed in the graph; the message
            names the layer and what it reads), ``skip`` patterns that
            exclude every quantizable layer (the message names them and
            the layers), an output path that names a directory.
        TypeError: an argument of the wrong type (``input_shape`` not a
            sequence of integers, ...).
        ImportError: onnx (at 2-4 bits ml_dtypes; with ``abits``,
            onnxruntime) is missing: checked before any work.
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
    shape = check_input_shapes(input_shape)
    seed = check_seed(seed)
    require_onnx_packages(int4=wbits <= 4, runtime=abits is not None)
    model, in_path, data_files = _load(model_or_path)
    out = _check_output(out_path, in_path, data_files, external_data)
    where = in_path or "model"
    size_before = _tensor_bytes(model)
    model = _prepare(model, where)
    if integer_kernels:
        _fold_pads(model)
    matched: set[str] = set()
    notes: list[str] = []
    excluded: list[str] = []
    layers, skipped = _find_layers(model, patterns, matched, notes, excluded)
    for p in patterns:
        if p not in matched:
            warnings.warn(
                f"skip pattern {p!r} matches no quantizable Conv/Gemm/MatMul layer",
                UserWarning,
                stacklevel=2,
            )
    if not layers:
        left = f"; {'; '.join(notes[:3])}{'; ...' if len(notes) > 3 else ''}" if notes else ""
        if excluded:
            _refuse_all_skipped(where, [p for p in patterns if p in matched], excluded, left)
        raise OnnxFormatError(
            f"{where}: no quantizable layer (Conv/Gemm/MatMul with a float32 initializer "
            f"weight){left}"
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
        feeds = _input_feeds(model, seed, shape)
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
    notes += [
        bias_note(layer.name, kind) for layer, kind in _rewrite(model, list(weights.values()), plan)
    ]
    size_after = write_model(model, out, external_data, in_path, data_files)
    return QuantReport(
        layers=reports,
        wbits=wbits,
        mode=mode,
        abits=abits,
        wall_ms=(time.perf_counter() - wall) * 1e3,
        skipped=skipped,
        notes=notes,
        size_before=size_before,
        size_after=size_after,
        quantizer=quantizer,
    )


def _refuse_all_skipped(where: str, patterns: list[str], excluded: list[str], left: str) -> None:
    """Raise the error for ``skip`` patterns that leave no layer to quantize
    (``excluded``: the layers they matched; ``left``: the notes on the
    layers left float for other reasons)."""
    option = "--skip" if SHAPE_SPELLING.get() == "cli" else "skip"
    many = len(patterns) > 1
    shown = ", ".join(map(repr, excluded[:5])) + (", ..." if len(excluded) > 5 else "")
    raise InvalidArgumentError(
        f"{where}: the {option} pattern{'s' if many else ''} "
        f"{', '.join(map(repr, patterns))} exclude{'' if many else 's'} every quantizable "
        f"layer ({len(excluded)}: {shown}): nothing is left to quantize{left}"
    )


def _weight_label(layers: list[_Layer], weight: str) -> str:
    """``initializer 'w' (node 'a', ...)`` for error messages."""
    nodes = ", ".join(repr(ly.name) for ly in layers if ly.weight == weight)
    return f"initializer {weight!r} (weight of node {nodes})"


def _s_sigma(s_sigma: float | None, abits: int | None) -> float | None:
    """``s_sigma`` checked as :func:`quantize_model` checks it (a positive
    number float32 holds: the ranges are computed in float32), else the
    default for ``abits``."""
    mult = _check_s_sigma(s_sigma)
    if mult is not None:
        return mult
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
        try:
            lo, hi = float(quantize_input[0]), float(quantize_input[1])
        except OverflowError:  # an int beyond float64 (10**400): not finite
            lo = hi = math.inf
            shown = "a number too large for a float"
        else:
            shown = str(quantize_input)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi and lo < hi):
            raise InvalidArgumentError(
                f"quantize_input range must be finite with lo <= 0 <= hi and lo < hi, got {shown}"
            )
        if abits is None:
            raise InvalidArgumentError("quantize_input needs abits (quantized activations)")
        return lo, hi
    raise TypeError(f"quantize_input must be a bool or a (lo, hi) pair, got {quantize_input!r}")


#: Ops whose output holds values of their first input only (reshaped,
#: reordered, cropped, repeated, a max of them): the model input's range
#: covers it. A Pad also adds its constant (reflect / edge / wrap modes do
#: not), which must be inside the range.
_KEEP_VALUES = _SAME_QPARAMS | {"Identity", "Slice", "Expand", "Tile"}


def _first_input(
    model: Any,
    layers: list[_Layer],
    abits: int,
    mult: float,
    feeds: dict[str, Any],
    input_range: bool | tuple[float, float],
    labels: Mapping[int, str] | None = None,
) -> None:
    """With ``quantize_input``: a range (8 bits if the layer is also the
    last) for the layers without one (the first layer) whose input is a
    graph input, directly or through ops that keep its values
    (:data:`_KEEP_VALUES`: a Pad with reflect / edge / wrap mode, or a
    constant inside the range), from the sigma rule on that input's
    calibration batch or the given ``(lo, hi)``.

    Raises:
        InvalidArgumentError: no layer without a range reads a graph input
            that way (e.g. ``(x - mean) / std`` computed in the graph): the
            message names the first of them (``labels``: its name by
            ``id``, else the node's) and what it reads.
    """
    if input_range is False:
        return
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = _constants(model)
    refused: tuple[_Layer, str, bool] | None = None  # (layer, why, its input padded)
    applied = False
    for i, layer in enumerate(layers):
        if layer.act is not None:
            continue
        src, pads, what = _input_source(model, producers, consts, layer.node.input[0], feeds)
        if src is not None:
            bits = 8 if i == len(layers) - 1 else abits
            lo, hi = (
                input_range
                if isinstance(input_range, tuple)
                else sigma_range(feeds[src], bits, mult)
            )
            outside = [v for v in pads if not lo <= v <= hi]
            if not outside:
                layer.act = (bits, lo, hi)
                applied = True
                continue
            why = f"{what}: its padding {outside[0]:g} is outside the range [{lo:g}, {hi:g}]"
            if not isinstance(input_range, tuple):
                why += " (from the sigma rule on the calibration batch)"
        else:
            names = ", ".join(repr(n) for n in feeds)
            why = (
                f"{what}, not the model's input ({names}) or a Pad / Reshape / Transpose / "
                "... of it, so the input's range does not apply there"
            )
        if refused is None:
            refused = (layer, why, src is not None)
    if applied or refused is None:
        return
    layer, why, padded = refused
    label = (labels or {}).get(id(layer), repr(layer.name))
    cli = SHAPE_SPELLING.get() == "cli"
    option = "--quantize-input" if cli else "quantize_input"
    if padded:
        given = "--quantize-input=LO,HI" if cli else "quantize_input=(lo, hi)"
        advice = f"pass {given} with a range that holds it, or leave {option} off"
    else:
        advice = (
            f"leave {option} off (that input stays float), or compute what the layer reads "
            "outside the model (e.g. normalize the input before it)"
        )
    raise InvalidArgumentError(f"{option}: the first layer {label} reads {why}; {advice}")


def _input_source(
    model: Any,
    producers: dict[str, Any],
    consts: dict[str, Any],
    tensor: str,
    feeds: Mapping[str, Any],
) -> tuple[str | None, list[float], str]:
    """The graph input whose values ``tensor`` holds (through
    :data:`_KEEP_VALUES` ops; None if none), the constants the Pads on the
    way add, and what ``tensor`` is, in words (for errors)."""
    from onnx import helper

    t, chain, pads = tensor, [], []
    while t not in feeds:
        p = producers.get(t)
        if p is None or p.op_type not in _KEEP_VALUES or not p.input or not p.input[0]:
            break
        if p.op_type == "Pad":
            attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
            mode = attrs.get("mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode == "constant":
                value = (
                    _const_value(model, consts, p.input[2])
                    if len(p.input) > 2 and p.input[2]
                    else np.zeros(1)
                )
                if value is None or value.size != 1:
                    break  # a constant computed at run time
                pads.append(float(value.reshape(())))
            elif mode not in ("reflect", "edge", "wrap"):  # pragma: no cover - other modes
                break
        chain.append(p.op_type)
        t = p.input[0]
    p = producers.get(t)
    if t in feeds:
        made = "the model's input"
    else:
        made = f"the output of a {p.op_type} node" if p is not None else "a constant"
    what = (
        f"{t!r} ({made})"
        if not chain
        else f"{tensor!r} (a {' of a '.join(chain)} of {t!r}, {made})"
    )
    return (t if t in feeds else None), pads, what


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
