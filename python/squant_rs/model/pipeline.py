"""``quantize_model``: the whole-model walk (weights, then optional activation quantizers)."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, overload

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
    _calibrate,
    _check_input_shape,
    _check_s_sigma,
    default_s_sigma,
)
from .fold import fold_batchnorm
from .layers import check_patterns, plan_layers, quantize_layer_weight, relative_error
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
    fold_bn: bool = ...,
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
    fold_bn: bool = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, QuantReport]: ...


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
    fold_bn: bool = False,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, QuantReport]:
    """A SQuant-quantized deep copy of ``model`` (the original is untouched).

    Every Conv1d/2d/3d and Linear weight (module names matching a ``skip``
    fnmatch pattern excepted, e.g. ``skip=("conv1", "fc")``) is replaced
    by its ``wbits``-bit SQuant dequantized value, same dtype and device.
    ``mode``, ``backend``, ``threads`` and ``quantizer`` are as in
    :func:`quantize_tensor`.
    ``ConvTranspose`` layers, parametrized weights and weights without
    elements (``Linear(0, 4)``) stay float.

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
    ``seed`` seeds the calibration noise.

    With ``fold_bn=True`` every BatchNorm that follows a Conv/Linear layer
    is folded into it first (:func:`~squant_rs.model.fold.fold_batchnorm`:
    the BN becomes ``nn.Identity``, the layer gets the folded weight and
    bias), so the quantized weights are the ones an exported graph uses.

    The per-layer :class:`QuantReport` is attached as ``qmodel.squant_report``
    and, with ``return_report=True``, returned as ``(qmodel, report)``.

    Returns:
        The quantized copy, or ``(qmodel, report)`` with ``return_report=True``.

    Raises:
        InvalidArgumentError: an argument out of range; the model cannot be
            deep-copied (e.g. the old ``torch.nn.utils.weight_norm``); a lazy
            layer is not initialized; the calibration forward pass fails.
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
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    require_torch()
    import torch
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be a bool, got {fold_bn!r}")

    qmodel = _deepcopy(model)
    if fold_bn:
        fold_batchnorm(qmodel, inplace=True)
    plan = plan_layers(qmodel, patterns, stacklevel=2)
    # Activation quantizers go on every distinct module with a quantized
    # weight, tied ones included (a module under two names gets one).
    layers = list(plan.chosen)
    seen = {id(module) for _, module in layers}
    for name, _, module in plan.tied:
        if id(module) not in seen:
            seen.add(id(module))
            layers.append((name, module))

    quantizers: dict[str, ActivationQuantizer] = {}
    if abits is not None:
        mult = sigma_mult if sigma_mult is not None else default_s_sigma(abits)
        quantizers = {name: ActivationQuantizer(name, abits, mult) for name, _ in layers}
        if calibration == "float":
            _calibrate(qmodel, layers, quantizers, shape, int(seed), apply=False)

    by_name: dict[str, LayerReport] = {}
    for name, module in plan.chosen:
        weight = module.weight
        qt, ms = quantize_layer_weight(
            name, weight.detach(), wbits, mode, backend, threads, quantizer
        )
        w_hat = qt.dequantize(threads)
        err = relative_error(weight, w_hat)
        with torch.no_grad():
            weight.copy_(w_hat)
        del w_hat
        by_name[name] = LayerReport(
            name=name,
            shape=tuple(weight.shape),
            params=weight.numel(),
            time_ms=ms,
            rel_error=err,
            k_flips=qt.k_flips,
            c_flips=qt.c_flips,
            bits=wbits,
            kind=type(module).__name__,
            qtensor=qt,
        )
    for name, owner, module in plan.tied:
        by_name[name] = dataclasses.replace(
            by_name[owner], name=name, time_ms=0.0, kind=type(module).__name__, tied_to=owner
        )
    # Rows in module order (a tied layer's row where the layer is).
    order = {name: i for i, (name, _) in enumerate(qmodel.named_modules(remove_duplicate=False))}
    reports = sorted(by_name.values(), key=lambda r: order[r.name])

    if abits is not None:
        if calibration == "quantized":
            _calibrate(qmodel, layers, quantizers, shape, int(seed), apply=True)
        for name, module in layers:
            q = quantizers[name]
            module.register_forward_pre_hook(q)
            if q.calibrated and q.enabled:
                assert q.x_min is not None and q.x_max is not None
                by_name[name].act_range = (q.x_min, q.x_max)
                by_name[name].act_bits = q.bits

    report = QuantReport(
        layers=reports,
        wbits=wbits,
        mode=mode,
        abits=abits,
        wall_ms=(time.perf_counter() - wall) * 1e3,
        skipped=plan.skipped,
        notes=plan.notes,
        quantizer=quantizer,
    )
    # Plain attribute (nn.Module.__setattr__ is typed for tensors/modules only).
    qmodel.__dict__["squant_report"] = report
    if return_report:
        return qmodel, report
    return qmodel


def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, or a clear error for a model that torch
    cannot copy (e.g. the old ``torch.nn.utils.weight_norm``, whose weight
    is a computed tensor, or a module holding a lock or an open file)."""
    try:
        return copy.deepcopy(model)
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
            f"quantize_model works on a deep copy, but this model cannot be deep-copied "
            f"({type(exc).__name__}: {first}){hint}"
        ) from exc


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """The :class:`ActivationQuantizer` hooks of a quantized model, by layer name."""
    out: dict[str, ActivationQuantizer] = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ActivationQuantizer):
                out[name] = hook
    return out
