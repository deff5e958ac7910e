"""Which layers ``quantize_model`` quantizes, and the per-layer weight step."""

from __future__ import annotations

import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, SquantError
from ..tensor.quantized import quantize_tensor
from ..tensor.validate import (
    UnsupportedDtypeError,
)

if TYPE_CHECKING:
    from torch import nn

#: Progress callback: ``(done, total, name)``.
ProgressFn = Callable[[int, int, str], None]


# --------------------------------------------------------------------------
# Shared helpers (also used by formats.safetensors)


def check_patterns(patterns: object, name: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of fnmatch patterns (a bare string is one)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, Sequence) and not hasattr(patterns, "__iter__"):
        raise TypeError(f"{name} must be a pattern string or a sequence of them")
    out = tuple(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{name} patterns must be strings, got {p!r}")
    return out


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the (case-sensitive) fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


#: Elements per chunk of the float64 sums in :func:`relative_error`.
_NORM_CHUNK = 1 << 20

#: Below this norm the float32 sums may have lost squares to underflow.
_NORM_TINY = 1e-18


def relative_error(w: Any, w_hat: Any) -> float:
    """``||w_hat - w|| / ||w||`` (0 when both are 0) for numpy arrays or torch
    tensors. The norms are taken in float32 (float64 for float64 input);
    where a float32 sum of squares overflows or may underflow (weights near
    ``1e20`` or ``1e-20``), they are summed again in float64, a chunk at a
    time, so the result is finite for any finite weights."""
    num, den = _norms(w, w_hat, exact=False)
    if not (math.isfinite(num) and math.isfinite(den)) or den < _NORM_TINY:
        num, den = _norms(w, w_hat, exact=True)
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _norms(w: Any, w_hat: Any, exact: bool) -> tuple[float, float]:
    """``(||w_hat - w||, ||w||)``: fast (BLAS, the input's precision), or
    ``exact`` (squares summed in float64, a chunk at a time)."""
    if isinstance(w, np.ndarray):
        a = np.asarray(w).reshape(-1)
        b = np.asarray(w_hat).reshape(-1)
        if not exact:
            dt: Any = np.float64 if a.dtype == np.float64 else np.float32
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                a = a.astype(dt, copy=False)
                return float(np.linalg.norm(b.astype(dt, copy=False) - a)), float(np.linalg.norm(a))
        num_sq = den_sq = 0.0
        for i in range(0, a.size, _NORM_CHUNK):
            a64 = a[i : i + _NORM_CHUNK].astype(np.float64)
            d64 = b[i : i + _NORM_CHUNK].astype(np.float64) - a64
            num_sq += float(np.dot(d64, d64))
            den_sq += float(np.dot(a64, a64))
        return math.sqrt(num_sq), math.sqrt(den_sq)
    import torch

    ta = w.detach().reshape(-1)
    tb = w_hat.detach().reshape(-1)
    if not exact:
        tdt = torch.float64 if ta.dtype == torch.float64 else torch.float32
        t32 = ta.to(tdt)
        num_t = torch.linalg.vector_norm(tb.to(tdt) - t32)
        return float(num_t), float(torch.linalg.vector_norm(t32))
    num = torch.zeros((), dtype=torch.float64, device=ta.device)
    den = torch.zeros((), dtype=torch.float64, device=ta.device)
    step = _NORM_CHUNK if ta.device.type == "cpu" else 16 * _NORM_CHUNK
    for i in range(0, ta.numel(), step):
        c64 = ta[i : i + step].to(torch.float64)
        d64 = tb[i : i + step].to(torch.float64) - c64
        num += torch.dot(d64, d64)
        den += torch.dot(c64, c64)
    return math.sqrt(float(num)), math.sqrt(float(den))


def _layer_types() -> tuple[type[Any], ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def warn_unmatched(
    patterns: Sequence[str], names: Sequence[str], what: str, stacklevel: int
) -> None:
    """A ``UserWarning`` for every pattern that matches none of ``names``
    (a typo in a skip pattern would otherwise quantize what it meant to keep)."""
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            warnings.warn(
                f"skip pattern {p!r} matches no {what}", UserWarning, stacklevel=stacklevel + 1
            )


@dataclass
class LayerPlan:
    """What :func:`plan_layers` decided for a model's Conv/Linear layers."""

    #: ``(name, module)`` per distinct weight to quantize, in module order.
    chosen: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: ``(name, owner, module)``: layer ``name`` shares the weight of chosen
    #: layer ``owner``.
    tied: list[tuple[str, str, nn.Module]] = field(default_factory=list)
    #: Conv/Linear layers (and ConvTranspose) left float, by name.
    skipped: list[str] = field(default_factory=list)
    #: Why a layer was left float, where the reason is not a skip pattern.
    notes: list[str] = field(default_factory=list)


def plan_layers(model: nn.Module, skip: Sequence[str], stacklevel: int = 2) -> LayerPlan:
    """Which Conv1d/2d/3d and Linear weights SQuant quantizes.

    A layer is left float when its module name matches a ``skip`` pattern,
    when it is a ``ConvTranspose``, when its weight is parametrized or not a
    plain ``nn.Parameter``, or when its weight has no element (e.g.
    ``Linear(0, 4)``; noted in the report).

    Shared weights: a weight used by several layers (tied parameters, or one
    module reachable under several names) is quantized once and reported
    under every name. If any of its layers is left float (a skip pattern
    included), all of them stay float, and a weight also used by a module
    that is not a Conv/Linear layer, e.g. a Linear tied to an Embedding,
    stays float too (quantizing it would change that module silently); both
    cases are noted in the report.

    Warns (``UserWarning``) for a skip pattern that matches no layer and for
    a model without any Conv/Linear layer.
    """
    from torch import nn
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    plan = LayerPlan()
    types = _layer_types()
    layer_names: list[str] = []
    groups: dict[int, list[tuple[str, nn.Module]]] = {}  # weight id -> candidate layers
    float_ids: dict[int, str] = {}  # weight id -> a layer that keeps it float
    modules = list(model.named_modules(remove_duplicate=False))
    for name, module in modules:
        is_transpose = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if not (is_transpose or isinstance(module, types)):
            continue
        layer_names.append(name)
        weight = getattr(module, "weight", None)
        if is_transpose or matches_any(name, skip):
            plan.skipped.append(name)
            if weight is not None:
                float_ids.setdefault(id(weight), name)
            continue
        if isinstance(weight, UninitializedParameter):
            raise InvalidArgumentError(
                f"layer {name!r} is a lazy module that has not been initialized yet: "
                "run one forward pass first"
            )
        if parametrize.is_parametrized(module, "weight") or not isinstance(weight, nn.Parameter):
            plan.skipped.append(name)
            continue
        if weight.numel() == 0:
            plan.skipped.append(name)
            plan.notes.append(
                f"{name}: weight of shape {tuple(weight.shape)} has no element, left as is"
            )
            continue
        groups.setdefault(id(weight), []).append((name, module))

    # Uses of a candidate weight outside the Conv/Linear layers' own weights.
    foreign: dict[int, str] = {}
    for mname, module in modules:
        own = isinstance(module, types) and not isinstance(module, nn.modules.conv._ConvTransposeNd)
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in groups and not (own and pname == "weight"):
                label = f"{mname}.{pname}" if mname else pname
                foreign.setdefault(id(param), f"{label} ({type(module).__name__})")

    for wid, members in groups.items():
        names = [n for n, _ in members]
        reason = None
        if wid in float_ids:
            reason = f"shares its weight with {float_ids[wid]!r}, which is left float"
        elif wid in foreign:
            reason = f"shares its weight with {foreign[wid]}, which SQuant does not quantize"
        if reason is not None:
            for n in names:
                plan.skipped.append(n)
                plan.notes.append(f"{n or '(model)'}: {reason}; left float")
            continue
        owner, module = members[0]
        plan.chosen.append((owner, module))
        plan.tied += [(n, owner, m) for n, m in members[1:]]

    order = {n: i for i, n in enumerate(layer_names)}
    plan.chosen.sort(key=lambda item: order[item[0]])
    plan.skipped.sort(key=order.__getitem__)
    if not layer_names:
        warnings.warn(
            f"the model ({type(model).__name__}) has no Conv1d/2d/3d or Linear layer: "
            "nothing to quantize",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    warn_unmatched(skip, layer_names, "Conv/Linear layer", stacklevel + 1)
    return plan


def select_layers(
    model: nn.Module, skip: Sequence[str]
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The ``(name, module)`` pairs whose weights SQuant quantizes (one per
    distinct weight), in module order, and the names of the Conv/Linear
    layers left float: :func:`plan_layers` in short (same warnings)."""
    plan = plan_layers(model, skip, stacklevel=3)
    return plan.chosen, plan.skipped


def quantize_layer_weight(
    name: str,
    weight: Any,
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> tuple[Any, float]:
    """``quantize_tensor`` on one named weight, timed (ms); errors name the layer."""
    start = time.perf_counter()
    try:
        qt = quantize_tensor(
            weight, bits, mode, backend=backend, threads=threads, quantizer=quantizer
        )
    except (SquantError, UnsupportedDtypeError) as exc:
        raise type(exc)(f"{name or 'weight'}: {exc}") from exc
    return qt, (time.perf_counter() - start) * 1e3
