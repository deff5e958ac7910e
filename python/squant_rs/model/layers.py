"""Which layers ``quantize_model`` quantizes, and the per-layer weight step."""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._squant_rs import InvalidArgumentError, SquantError
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


def relative_error(w: Any, w_hat: Any) -> float:
    """``||w_hat - w|| / ||w||`` (0 when both are 0) for numpy arrays or torch
    tensors. The difference and the norms are float32 (float64 for float64
    input); the reductions are pairwise, accurate far beyond a report's needs."""
    if isinstance(w, np.ndarray):
        dt: Any = np.float64 if w.dtype == np.float64 else np.float32
        a: np.ndarray = np.asarray(w, dtype=dt).ravel()
        b: np.ndarray = np.asarray(w_hat, dtype=dt).ravel()
        num = float(np.linalg.norm(b - a))
        den = float(np.linalg.norm(a))
    else:
        import torch

        tdt = torch.float64 if w.dtype == torch.float64 else torch.float32
        t = w.detach().to(tdt)
        num = float(torch.linalg.vector_norm(w_hat.detach().to(tdt) - t))
        den = float(torch.linalg.vector_norm(t))
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _layer_types() -> tuple[type[Any], ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def select_layers(
    model: nn.Module, skip: Sequence[str]
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The ``(name, module)`` pairs whose weights SQuant quantizes, in module
    order, and the names of the Conv/Linear layers left float.

    A layer is skipped when its module name matches a ``skip`` pattern, when
    it is a ``ConvTranspose`` or when its weight is parametrized."""
    from torch import nn
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    seen: set[int] = set()  # weights tied between layers are quantized once
    types = _layer_types()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            skipped.append(name)
            continue
        if not isinstance(module, types):
            continue
        if matches_any(name, skip):
            skipped.append(name)
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, UninitializedParameter):
            raise InvalidArgumentError(
                f"layer {name!r} is a lazy module that has not been initialized yet: "
                "run one forward pass first"
            )
        if parametrize.is_parametrized(module, "weight") or not isinstance(weight, nn.Parameter):
            skipped.append(name)
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        chosen.append((name, module))
    return chosen, skipped


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
