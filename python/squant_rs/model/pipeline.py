"""``quantize_model``: the whole-model walk (weights, then optional activation quantizers)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

from ..errors import InvalidArgumentError
from ..tensor.validate import (
    check_backend,
    check_bits,
    check_mode,
    check_quantizer,
    check_threads,
)
from ..torch.adapter import require_torch
from .activations import (
    CALIBRATIONS,
    DEFAULT_INPUT_SHAPE,
    ActivationQuantizer,
    AttentionInputQuantizer,
    _calibrate,
    _check_input_shape,
    _check_s_sigma,
    check_seed,
    default_s_sigma,
)
from .layers import (
    AttentionProjection,
    LayerPlan,
    check_not_shared,
    check_patterns,
    copy_model,
    plan_layers,
    quantize_into,
    with_gc_paused,
)
from .recipe import (
    apply_bias_correction,
    bn_activation_ranges,
    clip_weight_items,
    compute_bias_shifts,
    finish_activation_order,
    finish_clip_items,
    fused_shift_vectors,
    prepare,
    prepare_bias_correction,
    resolve_recipe,
    weight_range_for,
)
from .report import LayerReport, QuantReport

if TYPE_CHECKING:
    from torch import nn


# --------------------------------------------------------------------------
# quantize_model


@overload
def quantize_model(
    model: nn.Module,
    wbits: int = ...,
    abits: int | None = ...,
    mode: str = ...,
    *,
    backend: str = ...,
    threads: int | None = ...,
    quantizer: str = ...,
    skip: str | Sequence[str] = ...,
    input_shape: Sequence[int] = ...,
    s_sigma: float | None = ...,
    calibration: str = ...,
    seed: int = ...,
    recipe: str = ...,
    fold_bn: bool | None = ...,
    bias_correction: bool | None = ...,
    act_ranges: str | None = ...,
    weight_range: str | None = ...,
    bn_sigmas: float | None = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def quantize_model(
    model: nn.Module,
    wbits: int = ...,
    abits: int | None = ...,
    mode: str = ...,
    *,
    backend: str = ...,
    threads: int | None = ...,
    quantizer: str = ...,
    skip: str | Sequence[str] = ...,
    input_shape: Sequence[int] = ...,
    s_sigma: float | None = ...,
    calibration: str = ...,
    seed: int = ...,
    recipe: str = ...,
    fold_bn: bool | None = ...,
    bias_correction: bool | None = ...,
    act_ranges: str | None = ...,
    weight_range: str | None = ...,
    bn_sigmas: float | None = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, QuantReport]: ...


@with_gc_paused  # (its frame: the warnings below use stacklevel=3)
def quantize_model(
    model: nn.Module,
    wbits: int = 4,
    abits: int | None = None,
    mode: str = "squant",
    *,
    backend: str = "auto",
    threads: int | None = None,
    quantizer: str = "asymmetric",
    skip: str | Sequence[str] = (),
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    s_sigma: float | None = None,
    calibration: str = "float",
    seed: int = 0,
    recipe: str = "squant+",
    fold_bn: bool | None = None,
    bias_correction: bool | None = None,
    act_ranges: str | None = None,
    weight_range: str | None = None,
    bn_sigmas: float | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, QuantReport]:
    """A SQuant-quantized deep copy of ``model`` (the original is untouched).

    Every Conv1d/2d/3d and Linear weight, and every input projection of an
    ``nn.MultiheadAttention`` (``in_proj_weight`` or ``q/k/v_proj_weight``,
    the layers ``<attention>.in_proj`` / ``.q_proj``...; with ``abits``
    ``in_proj``'s quantizer is a pre-hook on the attention that quantizes
    its query, key and value with one range, while the separate
    projections' inputs and ``out_proj``'s, computed inside the attention's
    forward, stay float, noted), module names matching a ``skip``
    fnmatch pattern excepted (e.g. ``skip=("conv1", "fc")``), is replaced
    by its ``wbits``-bit SQuant dequantized value, same dtype and device.
    ``mode``, ``backend``, ``threads`` and ``quantizer`` are as in
    :func:`quantize_tensor`.
    ``ConvTranspose`` layers, parametrized weights, weights without
    elements (``Linear(0, 4)``) and the layers inside a TorchScript
    submodule (``torch.jit.script``/``trace``) stay float; the report
    notes each of them.

    Shared weights: a weight used by several layers (tied parameters) is
    quantized once and reported under every layer's name. A skip of any of
    those layers keeps the shared weight float for all of them, and a
    weight that a Conv/Linear layer shares with another kind of module
    (e.g. a Linear tied to an Embedding) stays float too; the report notes
    both.

    With ``abits`` (2..8), activation quantizers are added as forward
    pre-hooks and calibrated on one ``U[0,1)`` batch of ``input_shape``
    (default ``squant_rs.DEFAULT_INPUT_SHAPE``, an ImageNet-sized batch of
    8; give e.g. ``(8, 784)`` for an MLP). ``s_sigma`` defaults to
    ``squant_rs.default_s_sigma(abits)`` and is used for every activation
    quantizer, the 8-bit last layer included, as in the release.
    ``calibration`` is ``"float"`` or ``"quantized"`` (see the module doc);
    ``seed`` (an integer in ``[-2**63, 2**64 - 1]``, checked whether or
    not a noise pass runs) seeds the calibration noise.

    ``recipe="squant+"`` (the default) adds the data-free steps of
    ``docs/recipe.md`` (:mod:`squant_rs.model.recipe`) to the paper's
    pipeline above; ``recipe="paper"`` is that pipeline alone, bit for bit
    the default before squant+ (it beat the paper's recipe on every
    measured row: README). squant+ reads the graph with ``torch.fx``; where
    a model has no BatchNorm, cannot be traced or has layers without
    statistics in front, those layers get the paper's steps (the report
    says which). Only BatchNorms in eval mode are folded (with their
    running statistics), so the copy computes what the model computes in
    the mode it is in. The switches override the recipe's choice one by
    one (``None``: the recipe's):

    * ``fold_bn``: fold every BatchNorm that follows a Conv layer of its
      dimension into it first, where that is exact
      (:func:`~squant_rs.model.fold.fold_batchnorm` says when: never after
      a Linear, not for subclasses with their own forward, hooked or
      tied layers, nor where the forward reads their tensors directly;
      the BN becomes ``nn.Identity``, which keeps its attributes, the
      layer gets the folded weight and bias), so the quantized weights
      are the ones an exported graph uses;
    * ``bias_correction``: ``b -= (W_q - W) . E[x]`` with ``E[x]`` from the
      BatchNorm statistics in front of the layer;
    * ``act_ranges``: ``"sigma"`` (the paper's rule on noise) or ``"bn"``
      (``mu -+ bn_sigmas * sigma`` of the BatchNorm statistics, clipped by
      the activation; the sigma rule where a layer has none);
    * ``weight_range``: ``"minmax"`` (docs/algorithm.md section 1), ``"bn-mse"``
      (per output channel, the clipping ``r [min, max]``, ``r`` in
      ``1.0, 0.95, ..., 0.5``, whose rounded weights have the least error
      weighted by the input channels' variances from the BatchNorm
      statistics; asymmetric quantizer only) or ``"auto"`` (squant+'s:
      ``"bn-mse"`` at ``wbits <= 4`` with float or 8-bit activations,
      ``"minmax"`` otherwise); ``docs/recipe.md`` step 4.

    Raises:
        TypeError: an argument of the wrong type.
        InvalidArgumentError: an unknown choice or an out-of-range value.

    The per-layer :class:`QuantReport` is attached as ``qmodel.squant_report``
    and, with ``return_report=True``, returned as ``(qmodel, report)``.

    Returns:
        The quantized copy, or ``(qmodel, report)`` with ``return_report=True``.

    Raises:
        InvalidArgumentError: an argument out of range; ``abits`` is given
            and the model already carries activation quantizers (it was
            quantized with ``abits`` before); the model cannot be
            deep-copied (e.g. the old ``torch.nn.utils.weight_norm``), or
            its deep copy shares with it a module, parameter or buffer the
            pass would write (a ``__deepcopy__`` that returns ``self``:
            the message names it; the model is left unchanged); a lazy
            layer is not initialized; a layer weight or a BatchNorm's
            statistics are meta tensors (no values); the calibration forward pass fails
            (the message says to pass a fitting ``input_shape``, or, where
            an ``nn.Embedding`` got the float noise, that the model takes
            integer ids no shape helps with: quantize it weight-only).
        NonFiniteWeightError, WeightRangeError: a weight that cannot be
            quantized (the message names the layer and the channel).
        UnsupportedDtypeError: a weight of an unsupported dtype.
        TypeError: ``model`` is not an ``nn.Module``, or an argument has the
            wrong type.
        ImportError: torch is not installed.

    Warns:
        UserWarning: a ``skip`` pattern matches no Conv/Linear layer, or the
            model has none.
    """
    wall = time.perf_counter()
    wbits = check_bits(wbits, "wbits")
    if abits is not None:
        abits = check_bits(abits, "abits")
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    backend = check_backend(backend)
    threads = check_threads(threads)
    patterns = check_patterns(skip, "skip")
    if calibration not in CALIBRATIONS:
        raise InvalidArgumentError(
            f"unknown calibration {calibration!r}: expected one of {CALIBRATIONS}"
        )
    shape = _check_input_shape(input_shape) if abits is not None else ()
    sigma_mult = _check_s_sigma(s_sigma)
    seed = check_seed(seed)
    if not isinstance(return_report, bool):
        raise TypeError(f"return_report must be a bool, got {return_report!r}")
    require_torch()
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if abits is not None:
        hooked = activation_quantizers(model)
        if hooked:
            names = ", ".join(repr(n) for n in list(hooked)[:3]) + (
                ", ..." if len(hooked) > 3 else ""
            )
            raise InvalidArgumentError(
                f"model already carries squant activation quantizers (on {names}): "
                "quantize the float model instead (a second call would stack a second "
                "quantizer on each layer's input)"
            )

    config = resolve_recipe(
        recipe,
        fold_bn=fold_bn,
        bias_correction=bias_correction,
        act_ranges=act_ranges,
        weight_range=weight_range,
        bn_sigmas=bn_sigmas,
    )

    # Weights are quantized from the caller's model straight into a copy
    # that never cloned them. The paper's float calibration needs the
    # copy's float weights first: then the copy is a full one, quantized in
    # place. The recipe writes the folded weights of the layers it folds
    # into the copy (they are quantized in place) and quantizes the others
    # from the caller's model.
    # What the copy shares with the caller's model (a module whose
    # __deepcopy__ returns itself): refused where it would be written,
    # before anything is (check_not_shared).
    shared: set[int] = set()
    if config.is_paper and abits is not None and calibration == "float":
        qmodel = _deepcopy(model, shared=shared)
        rplan = prepare(qmodel, config)  # the paper recipe: nothing to analyze
        plan = plan_layers(qmodel, patterns, stacklevel=3)
        _check_not_meta(plan.chosen)
        check_not_shared(shared, _written(qmodel, plan, bias=False, hooks=True))
        sources: list[Any] = [m.weight for _, m in plan.chosen]
    else:
        plan = plan_layers(model, patterns, stacklevel=3)
        # (before the recipe reads any BatchNorm statistics)
        _check_not_meta(plan.chosen)
        sources = [m.weight for _, m in plan.chosen]
        memo: dict[Any, Any] = {}
        qmodel = _deepcopy(model, sources, memo, shared=shared)

        def in_copy(name: str, m: Any) -> Any:
            # The memo knows every module copied (unless a custom
            # __deepcopy__ left it out): no walk down the copy's tree.
            if isinstance(m, AttentionProjection):  # over the attention's copy
                return AttentionProjection(in_copy(name.rpartition(".")[0], m.attention), m.param)
            found = memo.get(id(m))
            return found if type(found) is type(m) else qmodel.get_submodule(name)

        plan = dataclasses.replace(  # the same layers in the copy
            plan,
            chosen=[(name, in_copy(name, m)) for name, m in plan.chosen],
            tied=[(name, owner, in_copy(name, m)) for name, owner, m in plan.tied],
        )
        check_not_shared(
            shared, _written(qmodel, plan, bias=config.bias_correction, hooks=abits is not None)
        )
        unset = {id(m.weight): src for src, (_, m) in zip(sources, plan.chosen)}
        rplan = prepare(qmodel, config, unset, threads, shared)
        # A folded layer's float weight is the one just written into the copy.
        sources = [
            m.weight if id(m) in rplan.folded_modules else src
            for src, (_, m) in zip(sources, plan.chosen)
        ]
    # Activation quantizers go on every distinct module with a quantized
    # weight, tied ones included (a module under two names gets one). An
    # attention's packed input projection (``<attention>.in_proj``) has no
    # forward of its own: its quantizer is a pre-hook on the attention
    # (query, key and value); separate ones (``.q_proj``...) get none.
    layers = [(n, _hooked(m)) for n, m in plan.chosen if _hooked(m) is not None]
    seen = {id(module) for _, module in layers}
    for name, _, module in plan.tied:
        hooked = _hooked(module)
        if hooked is not None and id(hooked) not in seen:
            seen.add(id(hooked))
            layers.append((name, hooked))
    # The traced order names an attention by its module: it runs as its
    # in_proj layer.
    in_proj = {id(m): n for n, m in layers if isinstance(m, nn.MultiheadAttention)}
    if in_proj and rplan.order:
        modules = dict(qmodel.named_modules(remove_duplicate=False))
        rplan.order = [in_proj.get(id(modules.get(n)), n) for n in rplan.order]
    # The attentions of other quantized projections count as layers for the
    # first and last layer rules.
    markers: list[tuple[str, Any]] = []
    for name, module in [*plan.chosen, *((n, m) for n, _, m in plan.tied)]:
        if (
            isinstance(module, AttentionProjection)
            and id(module.attention) not in seen
            and all(module.attention is not a for _, a in markers)
        ):
            markers.append((name.rpartition(".")[0], module.attention))
    rplan.markers = {n for n, _ in markers}

    quantizers: dict[str, ActivationQuantizer] = {}
    run_order: list[str] = []
    need_noise = False
    if abits is not None:
        mult = sigma_mult if sigma_mult is not None else default_s_sigma(abits)
        quantizers = {
            name: (
                AttentionInputQuantizer
                if isinstance(module, nn.MultiheadAttention)
                else ActivationQuantizer
            )(name, abits, mult)
            for name, module in layers
        }
        noise_layers = layers
        if config.act_ranges == "bn":
            noise_layers = bn_activation_ranges(rplan, layers, quantizers, abits)
        # The noise pass, where a layer needs it, runs through every layer:
        # those with BN ranges are applied (calibration="quantized"), not
        # observed, and the first layer to run is known. It also runs where
        # the trace does not know when every layer runs (a layer inside a
        # module the graph calls as one node): the pass's order decides.
        fixed = set(rplan.range_sources)
        need_noise = bool(noise_layers) or (
            config.act_ranges == "bn" and not rplan.order_covers([n for n, _ in layers])
        )
        if calibration == "float" and need_noise and not config.is_paper:
            # The noise pass runs the float model: set the copy's weights.
            _fill_float_weights(plan.chosen, sources)
        if calibration == "float" and need_noise:
            run_order = _calibrate(
                qmodel,
                layers,
                quantizers,
                shape,
                int(seed),
                apply=False,
                fixed=fixed,
                markers=markers,
            )
        if config.act_ranges == "bn" and calibration == "float":
            finish_activation_order(rplan, layers, quantizers, abits, run_order)

    # Bias correction needs the float weights after the pass has replaced
    # them: the caller's, or (folded, quantized in place) the copy's float
    # storage, which the pass swaps out of the parameter.
    w_floats = (
        {name: src.detach() for src, (name, _) in zip(sources, plan.chosen)}
        if config.bias_correction
        else {}
    )
    if config.bias_correction:
        prepare_bias_correction(
            rplan,
            plan.chosen,
            {name: quantizers.get(name) if calibration == "float" else None for name, _ in layers},
        )
    items = [(name, src, module.weight) for src, (name, module) in zip(sources, plan.chosen)]
    ratios: dict[str, float] = {}
    if weight_range_for(config, wbits, abits, quantizer) == "bn-mse":
        items, swaps, ratios = clip_weight_items(rplan, dict(plan.chosen), items, wbits, threads)
    else:
        swaps = []
    dots = None
    if config.bias_correction and backend != "torch":
        # Most layers' shifts computed by the quantization pass itself, as it
        # writes each channel (no second pass over the weights): where the
        # weight quantized is the float weight of the correction (not a
        # clipped copy) and the destination is what the layer will read.
        dots = [
            fused_shift_vectors(
                rplan,
                name,
                module,
                w_floats[name],
                dst,
                quantizers.get(name) if calibration == "float" else None,
            )
            if w is src and dst is _weight(module)
            else None
            for (name, w, dst), src, (_, module) in zip(items, sources, plan.chosen)
        ]
    results = quantize_into(items, wbits, mode, backend, threads, quantizer, dots)
    finish_clip_items(swaps)  # before the shifts: they read the quantized weights
    if config.bias_correction:  # every layer's shift in one pass
        compute_bias_shifts(
            rplan,
            [
                (
                    name,
                    module,
                    w_floats[name],
                    _weight(module).detach(),
                    quantizers.get(name) if calibration == "float" else None,
                )
                for name, module in plan.chosen
            ],
            threads,
            {name: res.dot for (name, _), res in zip(plan.chosen, results) if res.dot is not None},
        )
    by_name: dict[str, LayerReport] = {}
    for (name, module), res in zip(plan.chosen, results):
        weight = _weight(module)
        corrected = config.bias_correction and apply_bias_correction(
            rplan,
            name,
            module,
            w_floats[name],
            weight.detach(),
            quantizers.get(name) if calibration == "float" else None,
        )
        by_name[name] = LayerReport(
            name=name,
            shape=tuple(weight.shape),
            params=weight.numel(),
            time_ms=res.time_ms,
            rel_error=res.rel_error,
            k_flips=res.qtensor.k_flips,
            c_flips=res.qtensor.c_flips,
            bits=wbits,
            kind=_kind(module),
            folded=id(module) in rplan.folded_modules,
            bias_corrected=corrected,
            clip_ratio=ratios.get(name, 1.0),
            qtensor=res.qtensor,
        )
    owners = dict(plan.chosen)
    for name, owner, module in plan.tied:
        # What was done to this module: the owner's row where it is the
        # owner's module under another name; a distinct module sharing the
        # weight keeps its own bias (not corrected) and was not folded.
        same = module is owners[owner]
        row = by_name[owner]
        by_name[name] = dataclasses.replace(
            row,
            name=name,
            time_ms=0.0,
            kind=_kind(module),
            tied_to=owner,
            folded=id(module) in rplan.folded_modules,
            bias_corrected=row.bias_corrected and same,
        )
    # Rows in module order (a tied layer's row where the layer is; without
    # tied layers, plan.chosen's order already is).
    reports = list(by_name.values())
    if plan.tied:
        order = {n: i for i, n in enumerate(plan.names)}
        reports.sort(key=lambda r: order[r.name])

    if abits is not None:
        if calibration == "quantized" and need_noise:
            run_order = _calibrate(
                qmodel,
                layers,
                quantizers,
                shape,
                int(seed),
                apply=True,
                fixed=fixed,
                markers=markers,
            )
        if config.act_ranges == "bn" and calibration == "quantized":
            finish_activation_order(rplan, layers, quantizers, abits, run_order)
        for name, module in layers:
            q = quantizers[name]
            module.register_forward_pre_hook(q, with_kwargs=q.with_kwargs)
        # Each row reports its module's quantizer: a module under a second
        # name (an alias) has the one hook of its first name; a distinct
        # module sharing a weight has its own.
        hook_of = {id(module): name for name, module in layers}
        rows = [(name, module) for name, module in plan.chosen]
        rows += [(name, module) for name, _, module in plan.tied]
        for name, module in rows:
            hooked = _hooked(module)
            if hooked is None:
                plan.notes.append(
                    f"{name}: a separate input projection of nn.MultiheadAttention (its "
                    "key / value sizes differ from the query's); its input (the attention's "
                    "query, key or value) stays float"
                )
                continue
            qname = hook_of[id(hooked)]
            q = quantizers[qname]
            if q.calibrated and q.enabled:
                assert q.x_min is not None and q.x_max is not None
                by_name[name].act_range = (q.x_min, q.x_max)
                by_name[name].act_bits = q.bits
                by_name[name].range_source = rplan.range_sources.get(qname, "sigma")
            elif q.enabled and not q.calibrated:  # (the first layer's is disabled)
                plan.notes.append(
                    f"{name}: no range, its forward never ran with a floating-point "
                    "positional input during calibration (not called: e.g. a Linear whose "
                    "weight another module uses directly, as nn.MultiheadAttention does "
                    "with out_proj; or called with its input as a keyword); its input "
                    "stays float"
                )

    report = QuantReport(
        layers=reports,
        wbits=wbits,
        mode=mode,
        abits=abits,
        wall_ms=(time.perf_counter() - wall) * 1e3,
        skipped=plan.skipped,
        notes=plan.notes,
        quantizer=quantizer,
        recipe=config.name,
    )
    # Plain attribute (nn.Module.__setattr__ is typed for tensors/modules only).
    qmodel.__dict__["squant_report"] = report
    if return_report:
        return qmodel, report
    return qmodel


def _written(
    qmodel: nn.Module, plan: LayerPlan, *, bias: bool, hooks: bool
) -> Iterator[tuple[str, Any]]:
    """What :func:`quantize_model` writes into its copy ``qmodel`` outside
    the BatchNorm folding (:func:`~squant_rs.model.fold.fold_batchnorm_graph`
    checks its own), for :func:`~squant_rs.model.layers.check_not_shared`:
    the copy itself (its report), each quantized layer's weight, its bias
    where ``bias`` (bias correction) and, where ``hooks`` (activation
    quantizers), the module that gets each layer's hook."""
    yield "the model itself", qmodel
    for name, module in plan.chosen:
        yield f"the weight of layer {name!r}", module.weight
        if bias:
            yield f"the bias of layer {name!r}", getattr(module, "bias", None)
    if hooks:
        for name, module in [*plan.chosen, *((n, m) for n, _, m in plan.tied)]:
            hooked = _hooked(module)
            if hooked is not None:
                yield f"layer {name!r} ({type(hooked).__name__}, which gets a hook)", hooked


def _hooked(module: Any) -> Any:
    """The module that carries ``module``'s activation quantizer: itself,
    an attention's for its packed input projection (``in_proj``), or
    ``None`` (separate projections ``q_proj``...: no input of their own to
    quantize)."""
    if not isinstance(module, AttentionProjection):
        return module
    return module.attention if module.param == "in_proj_weight" else None


def _kind(module: Any) -> str:
    """A layer's kind for its report row: its class name (an attention's
    input projection: the attention's)."""
    if isinstance(module, AttentionProjection):
        return type(module.attention).__name__
    return type(module).__name__


def _weight(module: nn.Module) -> Any:
    """``module.weight`` (a tensor; ``nn.Module.__getattr__`` is typed as
    returning a tensor or a module)."""
    return module.weight


def _check_not_meta(chosen: Sequence[tuple[str, Any]]) -> None:
    """Raise the weight check's error for the first layer whose weight is a
    meta tensor (a model built on ``torch.device("meta")`` and never
    loaded), or whose bias is (the recipe's folding and bias correction
    read it), before anything reads the model's values.

    Raises:
        InvalidArgumentError: ``<layer>: weight is a meta tensor: ...``.
    """
    for name, module in chosen:
        if module.weight.is_meta:
            raise InvalidArgumentError(
                f"{name or 'weight'}: weight is a meta tensor: it has no values to quantize"
            )
        bias = getattr(module, "_parameters", {}).get("bias")
        if bias is not None and bias.is_meta:
            raise InvalidArgumentError(
                f"{name or 'layer'}: bias is a meta tensor: it has no values to read"
            )


def _fill_float_weights(chosen: Sequence[tuple[str, nn.Module]], sources: Sequence[Any]) -> None:
    """Copy each float source weight into its layer's (not yet set) weight
    in the copy; weights that are their own source are left as they are."""
    import torch

    with torch.no_grad():
        for (_, module), src in zip(chosen, sources):
            weight: Any = module.weight
            if src is not weight:
                weight.copy_(src)


def _deepcopy(
    model: nn.Module,
    fresh: Sequence[Any] = (),
    memo: dict[Any, Any] | None = None,
    who: str = "quantize_model",
    shared: set[int] | None = None,
) -> nn.Module:
    """``copy.deepcopy(model)`` with the parameters in ``fresh`` left
    uninitialised (:func:`~squant_rs.model.layers.copy_model`, which fills
    ``memo`` and ``shared``), or a clear
    error for a model that torch cannot copy (e.g. the old
    ``torch.nn.utils.weight_norm``, whose weight is a computed tensor, or a
    module holding a lock or an open file); ``who``: the function the
    message names."""
    try:
        return copy_model(model, fresh, memo, shared)
    except Exception as exc:  # deepcopy can fail in many ways; say which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = ""
        if any(
            hasattr(m, "weight_g") and hasattr(m, "weight_v") and not hasattr(m, "parametrizations")
            for m in model.modules()
        ):
            hint = (
                "; the model uses the old torch.nn.utils.weight_norm: apply "
                "torch.nn.utils.remove_weight_norm first, or use "
                "torch.nn.utils.parametrizations.weight_norm"
            )
        raise InvalidArgumentError(
            f"{who} works on a deep copy, but this model cannot be deep-copied "
            f"({type(exc).__name__}: {first}){hint}"
        ) from exc


def check_float_model(model: nn.Module, what: str) -> None:
    """Raise where ``model`` is already quantized: the model
    :func:`quantize_model` returned (its ``squant_report`` attribute), or a
    model carrying squant activation quantizers. ``what`` (e.g.
    ``"save_quantized"``) quantizes float models: its weights would be
    quantized a second time, and activation quantizers (forward pre-hooks)
    are in no file it writes.

    Raises:
        InvalidArgumentError: naming what was found.
    """
    hooked = bool(activation_quantizers(model))
    if "squant_report" in vars(model):
        found = "is the output of quantize_model (its weights are quantized already)"
    elif hooked:
        found = "carries squant activation quantizers (it was quantized with abits)"
    else:
        return
    lost = " and its activation quantizers lost" if hooked else ""
    raise InvalidArgumentError(
        f"model {found}: {what} quantizes a float model, so its weights would be "
        f"quantized a second time{lost}; pass the float model to {what}, or keep the "
        f"quantized one with torch.save"
    )


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """The :class:`ActivationQuantizer` hooks of a quantized model, by layer
    name (an attention's: ``<attention>.in_proj``, the layer it quantizes
    the inputs of)."""
    out: dict[str, ActivationQuantizer] = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, AttentionInputQuantizer):
                out[AttentionProjection(module, "in_proj_weight").layer_name(name)] = hook
            elif isinstance(hook, ActivationQuantizer):
                out[name] = hook
    return out
