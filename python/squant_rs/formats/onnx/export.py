"""export_onnx: a torch model quantized by :func:`quantize_model`, exported
with torch's exporter, its graph's layers matched to the quantized ones
(:func:`_match_layers`) and rewritten. torch is imported inside the
functions only."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._squant_rs import InvalidArgumentError
from ...model.activations import SHAPE_SPELLING, shape_spelling
from ...model.report import LayerReport, QuantReport
from ...tensor.validate import check_bits, check_threads
from ..output import scratch_file
from .common import require_onnx, require_onnx_packages
from .graph import _find_layers, _initializers, _Layer, _Weight
from .load import _prepare, _tensor_bytes
from .output import _check_output, write_model
from .plan import _capped, _clip_max, _constants, _fold_pads
from .quantize import _check_quantize_input, _first_input, _integer_ranges, _s_sigma
from .ranges import _input_feeds
from .rewrite import _rewrite, bias_note

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...tensor.quantized import QuantizedTensor


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
    batch_dim: int | Sequence[int | None] | None = 0,
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

    ``batch_dim`` is the dimension of the inputs the ONNX model takes at
    any size, named ``batch`` (the others keep ``example_input``'s sizes):
    ``0`` (the default) dimension 0 of every input, another integer that
    dimension of every input (``1`` for a sequence-first model's ``(L, N,
    E)``; negative counts from the end), a sequence one entry per input
    (``None`` for an input without a batch, e.g. ``(1, 0)`` for a
    sequence-first input and an ``(N, L)`` padding mask), or ``None``:
    fully static shapes. A 0-d input (a scalar) has no batch: an integer
    ``batch_dim`` leaves it alone.

    Returns:
        The per-layer :class:`QuantReport` (sizes: float weights and bytes
        written).

    Raises:
        InvalidArgumentError: bad arguments (a ``batch_dim`` that an input
            does not have), no layer to quantize, a float16 / float64
            model, a model wrapped in ``nn.DataParallel`` /
            ``DistributedDataParallel`` or ``torch.compile`` (pass
            ``model.module`` / ``model._orig_mod``), a model that cannot be
            deep-copied (in training mode: an eval-mode copy is quantized;
            e.g. the old ``torch.nn.utils.weight_norm``) or whose copy
            shares a training-mode module with it (a ``__deepcopy__`` that
            returns ``self``), ``abits`` with
            several inputs, a quantized weight
            missing from the exported graph, ``quantize_input`` where the
            first layer does not read the model's input (as for
            :func:`quantize_onnx`), a failed calibration run
            (the message says what to pass: an ``example_input`` of the
            shape the model takes, or, for integer ids, which U[0,1) noise
            cannot stand for, ``abits=None``).
        TypeError: an argument of the wrong type (``example_input`` not
            tensors, ``batch_dim`` not an integer, None or a sequence of
            them).
        ImportError: torch or onnx is missing (at 2-4 bits ml_dtypes; with
            ``integer_kernels``, onnxruntime).
    """
    wall = time.perf_counter()
    onnx = require_onnx()
    require_onnx_packages(
        int4=check_bits(wbits, "wbits") <= 4, runtime=abits is not None and bool(integer_kernels)
    )
    import torch

    from ...model.layers import check_not_shared, check_patterns
    from ...model.pipeline import (
        _deepcopy,
        activation_quantizers,
        check_float_model,
        quantize_model,
    )
    from ...model.recipe import RECIPES, _check_choice

    out = _check_output(path, None, (), external_data)
    input_range = _check_quantize_input(quantize_input, abits)
    recipe = _check_choice(recipe, "recipe", RECIPES)  # (None: quantize_model's default)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_input must be a tensor or a tuple of tensors")
    input_names = [f"input{i}" if i else "input" for i in range(len(inputs))]
    dynamic_axes = _dynamic_axes(batch_dim, inputs, input_names)
    if abits is not None and len(inputs) > 1:
        raise InvalidArgumentError(_several_inputs_message(inputs))
    _check_not_wrapped(model)
    check_float_model(model, "export_onnx")
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
        shared: set[int] = set()
        source = _deepcopy(model, who="export_onnx", shared=shared)
        check_not_shared(
            shared,
            (
                (f"module {n!r}" if n else "the model itself", m)
                for n, m in source.named_modules()
                if m.training
            ),
        )
        source.eval()
    # An attention's input projection whose weight no graph layer reads (as
    # an initializer, or a Slice / Transpose view of one: torch's exporter
    # slices a cross-attention's at run time) is quantized again left float
    # (a second pass).
    projections = _attention_projections(source)
    sliced: list[str] = []
    while True:
        with _calibration_spelling(inputs), warnings.catch_warnings():
            if sliced:  # the first pass gave the warnings
                warnings.simplefilter("ignore", UserWarning)
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
        # Which layers the exported (eval-mode) forward runs: one that does
        # not (a training-only auxiliary head) is not in the graph.
        called: set[int] = set()
        watch = [m for m in qmodel.modules() if not isinstance(m, torch.jit.ScriptModule)]
        handles = [m.register_forward_pre_hook(_recorder(called)) for m in watch]
        # Removed on SIGTERM / SIGHUP too; a full $TMPDIR is named as such.
        with scratch_file("float.onnx", "the exported float model") as float_path:
            with warnings.catch_warnings(), contextlib.ExitStack() as hooks:
                for h in handles:  # removed also when the exporter raises
                    hooks.enter_context(h)
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
                    input_names=input_names,
                    dynamic_axes=dynamic_axes,
                )
            graph_model = onnx.load(float_path)
        uncalled = {
            r.name
            for r in report.layers
            if id(_layer_module(qmodel, r.name, projections)) not in called
        }
        graph_model = _prepare(graph_model, "exported model")
        if integer_kernels:
            _fold_pads(graph_model)
        size_before = _tensor_bytes(graph_model)
        layers, _ = _find_layers(graph_model, ())
        inits = _initializers(graph_model.graph)
        why = ""
        bns = [
            n
            for n, m in qmodel.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        if bns and not any(n.op_type == "BatchNormalization" for n in graph_model.graph.node):
            why = (
                f": torch's exporter folded a BatchNorm ({', '.join(bns[:3])}) that quantize_model "
                "did not fold, and the folded weight is not a per-channel multiple of the "
                "quantized one; export the float model with torch.onnx.export and quantize the "
                "file with quantize_onnx"
            )
        try:
            weights, by_layer, unused = _match_layers(
                layers,
                inits,
                report.layers,
                why,
                projections,
                retry=not sliced,
                uncalled=uncalled,
                idle={n for n, m in qmodel.named_modules() if id(m) not in called},
                notes=report.notes,
            )
        except _SlicedProjections as exc:
            sliced = exc.names
            kwargs["skip"] = (*check_patterns(skip, "skip"), *map(_glob_escape, sliced))
            continue
        # Not called and not in the graph: unused only where the model does
        # not read the weight either (else the exporter changed it).
        really = _unused_layers(qmodel, inputs, unused, projections)
        for name in unused:
            if name not in really:
                raise InvalidArgumentError(
                    f"layer {name!r}: its quantized weight is not an initializer of the "
                    f"exported graph{why}"
                )
        break
    if unused:
        report.layers = [r for r in report.layers if r.name not in unused]
        # (what quantize_model noted about their inputs does not apply)
        report.notes = [
            n for n in report.notes if not n.startswith(tuple(f"{u}: " for u in unused))
        ]
        report.notes += [
            f"{name}: not run by the exported (eval-mode) forward (e.g. an auxiliary head "
            "used in training only), so not in the ONNX model"
            for name in unused
        ]
    for name in sliced:
        report.notes.append(
            f"{name}: no Conv / Gemm / MatMul of the exported graph reads this attention's "
            "projection weight as an initializer (directly or through Identity / Slice / "
            "Transpose nodes), so the graph holds no initializer to quantize; left float in "
            "the ONNX model (quantize_model quantizes it)"
        )
    if integer_kernels and abits is None:
        raise InvalidArgumentError("integer_kernels=True needs abits (quantized activations)")
    plan: dict[str, tuple[int, float, float]] | None = None
    if abits is not None and (integer_kernels or input_range is not False):
        with _calibration_spelling(inputs):
            mult = _s_sigma(s_sigma, abits)
            assert mult is not None
            n_threads = check_threads(threads)
            feeds = _input_feeds(graph_model, int(seed), tuple(inputs[0].shape))
            if len(inputs) == 1:
                # quantize_model's calibration batch
                gen = torch.Generator().manual_seed(int(seed))
                feeds["input"] = torch.rand(tuple(inputs[0].shape), generator=gen).numpy()
            # (the quantized layers: one left float is no "first layer")
            ids = {id(ly) for wt in weights for ly in wt.layers}
            labels = {
                id(ly): f"{name!r} (node {ly.name!r})"
                for name, lys in by_layer.items()
                for ly in lys
            }
            quantized = [ly for ly in layers if id(ly) in ids]
            _first_input(graph_model, quantized, abits, mult, feeds, input_range, labels)
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
    noted = {(id(layer), kind) for layer, kind in _rewrite(graph_model, weights, plan)}
    report.notes += [
        bias_note(name, kind)
        for kind in ("coarse", "float")
        for name, lys in by_layer.items()
        if any((id(layer), kind) in noted for layer in lys)
    ]
    report.size_before = size_before
    report.size_after = write_model(graph_model, out, external_data)
    report.wall_ms = (time.perf_counter() - wall) * 1e3
    return report


def _calibration_spelling(
    inputs: tuple[torch.Tensor, ...],
) -> contextlib.AbstractContextManager[None]:
    """Calibration errors (quantize_model's forward pass, the onnxruntime
    run) in export_onnx's words: ``example_input`` sets the shape (the
    CLI's ``--input-shape`` where the command line calls), and an integer
    example input is named as what no shape helps."""
    spelling = "cli" if SHAPE_SPELLING.get() == "cli" else "example"
    integer = next((str(t.dtype) for t in inputs if not t.is_floating_point()), None)
    return shape_spelling(spelling, integer)


def _dynamic_axes(
    batch_dim: object, inputs: tuple[torch.Tensor, ...], names: list[str]
) -> dict[str, dict[int, str]] | None:
    """torch.onnx.export's ``dynamic_axes`` for export_onnx's ``batch_dim``:
    the batch dimension of each input named ``batch``; None (static
    shapes) for ``batch_dim=None``. TypeError for a ``batch_dim`` of the
    wrong type, InvalidArgumentError for one an input does not have."""

    def is_dim(d: object) -> bool:
        return isinstance(d, numbers.Integral) and not isinstance(d, bool)

    if batch_dim is None:
        return None
    if is_dim(batch_dim):
        # A 0-d input (a scalar) has no batch: it stays as it is.
        per_input: list[object] = [batch_dim if t.dim() else None for t in inputs]
    elif isinstance(batch_dim, Sequence) and not isinstance(batch_dim, (str, bytes)):
        per_input = list(batch_dim)
        if len(per_input) != len(inputs):
            raise InvalidArgumentError(
                f"batch_dim gives {len(per_input)} dimension{'s' if len(per_input) != 1 else ''}"
                f" for {len(inputs)} input{'s' if len(inputs) != 1 else ''}: pass one per input "
                "(None for an input without a batch), one integer for every input, or None "
                "for static shapes"
            )
    else:
        per_input = []
    if not per_input or not all(d is None or is_dim(d) for d in per_input):
        raise TypeError(
            "batch_dim must be an integer (the batch dimension of every input), a sequence of "
            f"one integer or None per input, or None (static shapes), got {batch_dim!r}"
        )
    out: dict[str, dict[int, str]] = {}
    for i, (name, t, d) in enumerate(zip(names, inputs, per_input)):
        if d is None:
            continue
        dim = int(d)  # type: ignore[call-overload]
        if not -t.dim() <= dim < t.dim():
            raise InvalidArgumentError(
                f"batch_dim {dim}: input {i} has {t.dim()} dimension{'s' if t.dim() != 1 else ''} "
                f"(shape {tuple(t.shape)}), no dimension {dim} to export as the batch; "
                f"{_batch_dim_advice(inputs, per_input, i)}"
            )
        out[name] = {dim % t.dim(): "batch"}
    return out


def _batch_dim_advice(inputs: tuple[torch.Tensor, ...], per_input: list[object], bad: int) -> str:
    """What to pass instead of a ``batch_dim`` that input ``bad`` does not
    have: one of its dimensions, or one per input (the others as asked,
    ``bad``'s 0, or None for a scalar)."""
    if len(inputs) == 1:
        if not inputs[0].dim():
            return "pass batch_dim=None (a scalar has no batch)"
        return "pass a dimension it has (e.g. batch_dim=0), or batch_dim=None for static shapes"
    dims = [
        ("0" if t.dim() else "None") if i == bad else str(d)
        for i, (t, d) in enumerate(zip(inputs, per_input))
    ]
    return (
        "pass the batch dimension of each input (None for one without), e.g. "
        f"batch_dim=({', '.join(dims)}), or batch_dim=None for static shapes"
    )


def _several_inputs_message(inputs: tuple[torch.Tensor, ...]) -> str:
    """Why export_onnx refuses ``abits`` for a model of several inputs, and
    what works: weight-only, or quantize_onnx where every input is float
    (it refuses a model with any other input)."""
    head = (
        "abits: quantize_model calibrates the activation ranges on one U[0,1) input, "
        f"and this model takes {len(inputs)}; export it weight-only (abits=None)"
    )
    other = next(((i, t) for i, t in enumerate(inputs) if not t.is_floating_point()), None)
    if other is None:
        return (
            f"{head}, or export the float model with torch.onnx.export and use quantize_onnx "
            "(it calibrates every input on U[0,1) noise; they must all be float32)"
        )
    return (
        f"{head}: quantize_onnx, which calibrates several inputs, takes float32 inputs only "
        f"(input {other[0]} is {other[1].dtype})"
    )


def _check_not_wrapped(model: nn.Module) -> None:
    """A model in a wrapper that torch's ONNX exporter does not export
    (``nn.DataParallel`` / ``DistributedDataParallel``, a ``torch.compile``
    ``OptimizedModule``) is refused before any work, naming what to pass
    instead (its layer names would also carry the wrapper's prefix).

    Raises:
        InvalidArgumentError: naming the wrapper and the model inside it.
    """
    import sys

    from torch import nn

    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InvalidArgumentError(
            f"export_onnx cannot export a model wrapped in {type(model).__name__}: torch's "
            "ONNX exporter does not support the wrapper; pass the wrapped model, model.module"
        )
    # torch.compile's wrapper (its module is loaded once torch.compile ran),
    # around the model or one of its submodules
    frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(frame, "OptimizedModule", None)
    if optimized is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, optimized):
            where = "a model" if not name else f"a model whose submodule {name!r} is"
            inner = (
                "model._orig_mod" if not name else f"the model with {name}._orig_mod in its place"
            )
            raise InvalidArgumentError(
                f"export_onnx cannot export {where} wrapped in torch.compile "
                f"({type(m).__name__}): torch's ONNX exporter does not support the wrapper; "
                f"pass {inner}"
            )


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
    from ...model import recipe as rc
    from ...model.fold import _fx_pairs, trace

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


def _scope_match(node_name: str, module: str, absent: Collection[str] = ()) -> int:
    """2: ``node_name`` (``/layers/layers.0/conv/Conv``) is a node of
    ``module``'s scope, 1: of one of its later calls (``/a_1/MatMul``: the
    exporter numbers repeated scopes), 0: neither. A level of ``module``'s
    path whose module is not called itself may be missing from the node's
    scope: the modules named in ``absent`` (e.g. an ``nn.ModuleDict``:
    ``/a/conv/Conv`` is ``blocks.a.conv``'s), and a container of numbered
    children (an ``nn.ModuleList`` iterated in ``forward``, as in
    ``nn.TransformerEncoder``: ``/enc/layers.0/linear1/MatMul`` is
    ``enc.layers.0.linear1``'s)."""
    parts = node_name.split("/")
    if len(parts) < 3 or parts[0]:
        return 0
    scope, want = parts[1:-1], _scope_names(module)
    atoms = module.split(".")
    score = 2
    i = 0
    for k, w in enumerate(want):
        got = scope[i] if i < len(scope) else None
        if got == w:
            i += 1
            continue
        if got is not None and got.startswith(w + "_") and got[len(w) + 1 :].isdigit():
            score = 1
            i += 1
            continue
        if k + 1 < len(want) and (
            want[k + 1].startswith(w + ".") or ".".join(atoms[: k + 1]) in absent
        ):
            continue  # a container level the scope does not have
        return 0
    return score if i == len(scope) else 0


def _same_qt(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return (
        a.bits == b.bits
        and np.array_equal(a.codes, b.codes)
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(a.zero_point, b.zero_point)
    )


def _match_layers(
    layers: list[_Layer],
    inits: dict[str, Any],
    reps: list[LayerReport],
    why: str = "",
    projections: Mapping[str, tuple[str, str]] | None = None,
    retry: bool = False,
    uncalled: Collection[str] = (),
    idle: Collection[str] = (),
    notes: list[str] | None = None,
) -> tuple[list[_Weight], dict[str, list[_Layer]], list[str]]:
    """Which graph layers run which quantized layer of the report.

    A graph layer belongs to a report layer when its weight initializer
    (looked up through Identity nodes: torch's exporter merges equal-valued
    and shared weights into one initializer; the whole initializer where the
    layer reads a Slice / Transpose view of it, as a cross-attention's
    packed projection sliced at run time) equals the report layer's
    dequantized weight; among several such report layers, to the one whose
    module scope the node is in. Graph layers on one initializer share one
    DequantizeLinear when their quantized weights are the same (equal
    values quantize to the same codes), else each quantized weight gets its
    own. The activation range of a graph layer is its report layer's.
    ``idle``: the modules the exported forward never called (no level of
    a node's scope names them, :func:`_scope_match`).

    A graph layer whose weight is a report layer's but whose scope names
    none of them reads that weight outside the layer's forward
    (``F.linear(x, fc.weight)`` in another module, nn.MultiheadAttention's
    ``out_proj``): it reads the layer's quantized weight, but its input
    stays float, as in :func:`quantize_model`'s fake-quant model, whose
    activation quantizer is a pre-hook on the layer (a note in ``notes``
    where the layer's own input is quantized). It is none of the report
    layer's graph layers.

    Returns:
        The quantized weights, the graph layers of each report layer, and
        the report layers named in ``uncalled`` (the exported forward never
        ran them) whose weight the graph does not hold: not in the graph.

    Raises:
        _SlicedProjections: with ``retry``, the attention projections
            (``projections``: by layer name, the attention's name (their
            scope) and parameter, :func:`_attention_projections`) whose
            weight no initializer holds.
        InvalidArgumentError: any other report layer whose weight no
            initializer holds (``why`` appended: what the caller knows of
            the cause).
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
    # Report layers whose weight no initializer holds whole: torch's
    # exporter splits an attention's packed input projection into blocks of
    # rows (query | key and value, or all three) where query is not key.
    # A block of a weight quantized per output channel is the quantized
    # block of those channels.
    # (Equal weights' blocks are merged into one initializer like whole
    # weights: each such report layer takes them all, the scope decides.)
    taken = set().union(*cands) if cands else set()
    for ri in range(len(reps)):
        if qts[ri] is None or cands[ri]:
            continue
        for ly, block in _row_blocks(layers, values, taken, qts[ri]):
            per_layer.setdefault(id(ly), block)
            cands[ri].add(id(ly))

    def scope(i: int) -> str:  # an attention projection runs in its attention's scope
        name = reps[i].name
        return projections[name][0] if projections and name in projections else name

    # Graph layers no report layer's weight matches, in a report layer's
    # scope (any of its calls): torch's exporter folded a BatchNorm into
    # that call that quantize_model left unfolded (a hook, a module with a
    # forward of its own, a weight the forward also reads, an untraceable
    # model, a layer called twice with a BN after each call). Each such
    # call runs the layer's SQuant codes with each channel's scale times
    # that BN's factor.
    matched = set().union(*cands) if cands else set()
    for ri, rp in enumerate(reps):
        if qts[ri] is None:  # pragma: no cover - quantize_model fills it
            continue
        unmatched = [
            ly
            for ly in layers
            if id(ly) not in matched and _scope_match(ly.name, scope(ri), idle) > 0
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
            mine = [sq for ly, sq in scaled if _scope_match(ly.name, scope(ri), idle) == 2]
            qts[ri] = mine[0] if mine else scaled[0][1]
            rp.qtensor = qts[ri]
    missing = [rp.name for ri, rp in enumerate(reps) if rp.qtensor is not None and not cands[ri]]
    unused = [n for n in missing if n in uncalled]
    missing = [n for n in missing if n not in uncalled]
    if retry and missing and projections and set(missing) <= projections.keys():
        raise _SlicedProjections(missing)
    for ri, rp in enumerate(reps):
        if rp.qtensor is not None and not cands[ri] and rp.name not in unused:
            raise InvalidArgumentError(
                f"layer {rp.name!r}: its quantized weight is not an initializer of the "
                f"exported graph{why}"
            )
    owner: dict[int, int] = {}  # id(graph layer) -> report index
    for layer in layers:
        scored = [
            (_scope_match(layer.name, scope(i), idle), -i)
            for i, rep in enumerate(reps)
            if id(layer) in cands[i]
        ]
        scored = [sc for sc in scored if sc[0] > 0]
        if scored:
            owner[id(layer)] = -max(scored)[1]
    direct: set[int] = set()  # graph layers reading a weight outside its layer's forward
    for layer in layers:
        if id(layer) in owner:
            continue
        which = [i for i in range(len(reps)) if id(layer) in cands[i]]
        if not which:
            continue  # a weight quantize_model left float
        first = which[0]
        if any(not _same_qt(qts[i], qts[first]) for i in which[1:]):
            warnings.warn(
                f"node {layer.name!r}: its weight is that of the layers "
                f"{', '.join(repr(reps[i].name) for i in which)}, quantized differently, "
                f"and its scope names none of them; using {reps[first].name!r}'s",
                UserWarning,
                stacklevel=3,
            )
        owner[id(layer)] = first
        direct.add(id(layer))
    weights: list[_Weight] = []
    by_layer: dict[str, list[_Layer]] = {rep.name: [] for rep in reps}
    for layer in layers:
        i = owner.get(id(layer))
        if i is None:
            continue
        rep = reps[i]
        if id(layer) not in direct:
            by_layer[rep.name].append(layer)
            if rep.act_range is not None and rep.act_bits is not None:
                layer.act = (rep.act_bits, *rep.act_range)
        elif rep.act_bits is not None and notes is not None:
            notes.append(
                f"{rep.name}: node {layer.name!r} reads its weight outside its forward (e.g. "
                f"F.linear(x, {rep.name}.weight) in another module): it reads the quantized "
                "weight with a float input, as in quantize_model's fake-quant model, whose "
                f"activation quantizer is {rep.name}'s pre-hook"
            )
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
            "(a hook, a module with a forward of its own, a weight the forward also reads "
            "directly, or a model it cannot trace): "
            "the graph runs their SQuant codes with each channel's scale times the "
            "BatchNorm's factor",
            UserWarning,
            stacklevel=3,
        )
    return weights, by_layer, unused


def _recorder(called: set[int]) -> Callable[..., None]:
    """A forward pre-hook that records the ``id`` of each module called."""

    def hook(module: Any, args: Any) -> None:
        called.add(id(module))

    return hook


def _unused_layers(
    model: nn.Module,
    inputs: tuple[Any, ...],
    names: list[str],
    projections: Mapping[str, tuple[str, str]],
) -> set[str]:
    """Of the layers ``names`` (whose forward the exported, eval-mode
    forward never called), those the model does not use at all: with the
    layer's weight set to NaN the outputs stay finite (one forward pass
    each; a layer whose weight the model reads directly is used). None
    where the outputs are not finite to begin with; the weights are
    restored."""
    import torch

    def finite(out: Any) -> bool:
        if isinstance(out, torch.Tensor):
            return not out.is_floating_point() or bool(torch.isfinite(out).all())
        if isinstance(out, (tuple, list)):
            return all(finite(o) for o in out)
        if isinstance(out, dict):
            return all(finite(o) for o in out.values())
        return True

    out: set[str] = set()
    with torch.no_grad():
        if not names or not finite(model(*inputs)):
            return out
        for name in names:
            module = _layer_module(model, name, projections)
            param = projections[name][1] if name in projections else "weight"
            weight = getattr(module, param)
            saved = weight.detach().clone()
            try:
                weight.fill_(float("nan"))
                if finite(model(*inputs)):
                    out.add(name)
            finally:
                weight.copy_(saved)
    return out


def _layer_module(model: nn.Module, name: str, projections: Mapping[str, tuple[str, str]]) -> Any:
    """The module whose forward runs report layer ``name``: the layer's,
    or an attention projection's attention; ``None`` if there is none."""
    if name in projections:
        name = projections[name][0]
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


class _SlicedProjections(Exception):
    """Attention projections whose weight no layer of the exported graph
    reads as an initializer (:func:`_match_layers`)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def _attention_projections(model: nn.Module) -> dict[str, tuple[str, str]]:
    """The input projections of ``model``'s ``nn.MultiheadAttention``
    modules: the layer name :func:`~squant_rs.model.layers.plan_layers`
    gives each -> ``(the attention's name, the weight's parameter name)``."""
    from ...model.layers import ATTENTION_PROJECTIONS, AttentionProjection

    return {
        AttentionProjection(module, pname).layer_name(name): (name, pname)
        for name, module in model.named_modules(remove_duplicate=False)
        for pname in ATTENTION_PROJECTIONS
        if AttentionProjection.applies(module, pname)
    }


def _glob_escape(name: str) -> str:
    """``name`` as an fnmatch pattern that matches it alone."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _row_blocks(
    layers: list[_Layer],
    values: dict[tuple[str, int], np.ndarray],
    taken: set[int],
    qt: QuantizedTensor,
) -> list[tuple[_Layer, QuantizedTensor]]:
    """The graph layers (not in ``taken``) whose weight is a block of
    consecutive output channels of ``qt``'s dequantized weight, with ``qt``
    cut to that block; none unless the blocks cover every channel of
    ``qt``."""
    from dataclasses import replace

    want = np.asarray(qt.dequantize())
    if want.ndim < 2:
        return []
    first_rows: dict[bytes, list[int]] = {}
    for r in range(int(want.shape[0])):
        first_rows.setdefault((want[r] + np.float32(0.0)).tobytes(), []).append(r)
    found: list[tuple[_Layer, QuantizedTensor]] = []
    covered = np.zeros(int(want.shape[0]), dtype=bool)
    for ly in layers:
        if id(ly) in taken:
            continue
        v = values[(ly.weight, ly.axis)]
        n = int(v.shape[0]) if v.ndim else 0
        if v.shape[1:] != want.shape[1:] or not 0 < n < want.shape[0]:
            continue
        for r in first_rows.get((v[0] + np.float32(0.0)).tobytes(), []):
            if r + n <= want.shape[0] and np.array_equal(want[r : r + n], v):
                block = replace(
                    qt,
                    codes=qt.codes[r : r + n],
                    scale=qt.scale[r : r + n],
                    zero_point=qt.zero_point[r : r + n],
                )
                found.append((ly, block))
                covered[r : r + n] = True
                break
    return found if covered.all() else []


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
