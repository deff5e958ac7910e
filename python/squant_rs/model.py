"""Model-level SQuant: quantize every Conv/Linear weight of a torch model, and
optionally add the paper's data-free activation quantizers (SPEC section 5).

This module imports torch lazily, so ``import squant_rs`` works without it.

Weights
    Every ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (grouped and depthwise
    included) and ``nn.Linear`` weight of a deep copy of the model is replaced
    by its SQuant-dequantized value, in place, with the same dtype and device.
    The copy's ``state_dict()`` holds ordinary float tensors under the
    original names. ``ConvTranspose`` layers (a different weight layout) and
    parametrized weights are left float and listed in ``report.skipped``.

Activations (``abits=...``)
    A per-tensor :class:`ActivationQuantizer` is registered as a forward
    pre-hook on every quantized layer and fake-quantizes the layer's first
    positional input. Ranges are fixed once, before inference, from one
    batch of ``U[0, 1)`` noise of ``input_shape`` drawn with
    ``torch.rand(input_shape, generator=torch.Generator().manual_seed(seed))``
    (then moved to the model's device and floating dtype), with the sigma
    rule of SPEC section 5. The first quantized layer to run keeps a float
    input, the last to run gets 8 bits; "first" and "last" are in execution
    order of that pass. A layer that runs more than once is calibrated on
    its first call; a layer that never runs during calibration keeps a float
    input (its report row shows no activation range).

    ``calibration="float"`` (default) measures the statistics on the float
    model, so every layer's range is independent of the weight bit width
    and of the quantizers upstream. ``calibration="quantized"`` reproduces
    the release instead: weights are quantized first and, in one pass, each
    layer's range is fixed on its first call and applied at once, so the
    layers downstream see quantized activations.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from ._squant_rs import InvalidArgumentError, SquantError
from ._tensor import quantize_tensor
from ._torch_adapter import require_torch
from ._validate import (
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_mode,
    check_threads,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_INPUT_SHAPE",
    "ActivationQuantizer",
    "LayerReport",
    "QuantReport",
    "activation_qparams",
    "activation_range",
    "default_s_sigma",
    "quantize_model",
]

#: Calibration batch used when ``input_shape`` is not given: 8 images of
#: 3x224x224. The release used 256; 8 keeps a CPU run around a second for
#: ResNet-18 while the sigma estimates stay stable (they pool every
#: activation element of the batch).
DEFAULT_INPUT_SHAPE: tuple[int, ...] = (8, 3, 224, 224)

#: ``s_sigma`` of the release's run scripts, by activation bit width.
S_SIGMA_TABLE: dict[int, float] = {4: 12.0, 6: 14.0, 8: 25.0}

CALIBRATIONS: tuple[str, ...] = ("float", "quantized")

#: Progress callback: ``(done, total, name)``.
ProgressFn = Callable[[int, int, str], None]


def default_s_sigma(bits: int) -> float:
    """The release's ``s_sigma`` for ``bits`` (12, 14, 25 at 4, 6, 8 bits),
    interpolated linearly in between (13 at 5 bits, 19.5 at 7) and clamped
    outside (12 at 2 and 3 bits)."""
    bits = check_bits(bits, "abits")
    points = sorted(S_SIGMA_TABLE.items())
    if bits <= points[0][0]:
        return points[0][1]
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if bits <= b1:
            return s0 + (s1 - s0) * (bits - b0) / (b1 - b0)
    return points[-1][1]


# --------------------------------------------------------------------------
# Reports


@dataclass
class LayerReport:
    """One quantized weight: what it was and what quantizing it did."""

    name: str
    shape: tuple[int, ...]
    params: int
    time_ms: float
    #: ``||w_hat - w|| / ||w||`` (L2, computed in float64).
    rel_error: float
    k_flips: int
    c_flips: int
    bits: int
    kind: str = ""
    #: Activation bits of the layer's input (``None``: float input).
    act_bits: int | None = None
    #: Activation range ``(x_min, x_max)`` fixed by calibration.
    act_range: tuple[float, float] | None = None


@dataclass
class QuantReport:
    """Per-layer report of :func:`quantize_model` or :func:`save_quantized`.

    ``print(report)`` shows a table. ``total_ms`` is the sum of the per-layer
    quantization times, ``wall_ms`` the wall time of the whole call (copy,
    calibration, file writing included)."""

    layers: list[LayerReport]
    wbits: int
    mode: str
    abits: int | None = None
    wall_ms: float = 0.0
    #: Conv/Linear layers (or tensors) left float, by name.
    skipped: list[str] = field(default_factory=list)
    #: Bytes of the input tensors (as stored) and of the written file, for exports.
    size_before: int | None = None
    size_after: int | None = None

    @property
    def total_ms(self) -> float:
        return sum(layer.time_ms for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def mean_rel_error(self) -> float:
        if not self.layers:
            return 0.0
        return sum(layer.rel_error for layer in self.layers) / len(self.layers)

    @property
    def k_flips(self) -> int:
        return sum(layer.k_flips for layer in self.layers)

    @property
    def c_flips(self) -> int:
        return sum(layer.c_flips for layer in self.layers)

    def summary(self) -> str:
        """One line: layers, parameters, time, mean error (and sizes)."""
        text = (
            f"{len(self.layers)} layers, {self.params:,} parameters, W{self.wbits}"
            + (f"A{self.abits}" if self.abits is not None else "")
            + f" {self.mode}: {self.total_ms:.1f} ms (wall {self.wall_ms:.1f} ms), "
            f"mean relative error {self.mean_rel_error:.4f}"
        )
        if self.size_before is not None and self.size_after is not None:
            ratio = self.size_after / self.size_before if self.size_before else float("nan")
            text += (
                f", size {format_bytes(self.size_before)} -> "
                f"{format_bytes(self.size_after)} ({ratio:.3f}x)"
            )
        return text

    def __str__(self) -> str:
        headers = ["layer", "shape", "params", "time ms", "rel err", "K flips", "C flips"]
        with_act = self.abits is not None
        if with_act:
            headers += ["act", "act range"]
        rows: list[list[str]] = []
        for r in self.layers:
            row = [
                r.name or "(model)",
                "x".join(str(d) for d in r.shape),
                f"{r.params:,}",
                f"{r.time_ms:.2f}",
                f"{r.rel_error:.4f}",
                f"{r.k_flips:,}",
                f"{r.c_flips:,}",
            ]
            if with_act:
                row.append("float" if r.act_bits is None else f"{r.act_bits} bit")
                row.append(
                    "-" if r.act_range is None else f"[{r.act_range[0]:.4g}, {r.act_range[1]:.4g}]"
                )
            rows.append(row)
        lines = format_table(headers, rows, right=set(range(2, 7)))
        lines.append(f"total: {self.summary()}")
        if self.skipped:
            lines.append(f"left float: {', '.join(self.skipped)}")
        return "\n".join(lines)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]
) -> list[str]:
    """Plain-text table lines (columns in ``right`` right-aligned)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    out += [fmt(row) for row in rows]
    return out


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# --------------------------------------------------------------------------
# Shared helpers (also used by io.py)


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
) -> tuple[Any, float]:
    """``quantize_tensor`` on one named weight, timed (ms); errors name the layer."""
    start = time.perf_counter()
    try:
        qt = quantize_tensor(weight, bits, mode, backend=backend, threads=threads)
    except (SquantError, UnsupportedDtypeError) as exc:
        raise type(exc)(f"{name or 'weight'}: {exc}") from exc
    return qt, (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------
# Activation quantization (SPEC section 5)


def activation_range(
    signed: bool, sigma: float, a_max: float, bits: int, s_sigma: float
) -> tuple[float, float]:
    """``(x_min, x_max)`` of SPEC section 5 from the calibration statistics
    (float32 arithmetic, as the release): ``alpha = s_sigma * sigma``
    (``/ 1.25`` when signed), ``alpha = min(alpha, a_max)`` below 6 bits;
    ``[-alpha, alpha]`` when signed, else ``[0, alpha]``."""
    f32 = np.float32
    alpha = f32(s_sigma) * f32(sigma)
    if signed:
        alpha = alpha / f32(1.25)
    if bits < 6:
        alpha = min(alpha, f32(a_max))
    x_min = -alpha if signed else f32(0.0)
    return float(x_min), float(alpha)


def activation_qparams(x_min: float, x_max: float, bits: int) -> tuple[float, float, int, int]:
    """``(s, z, qmin, qmax)`` of the affine scheme of SPEC section 5 (float32):
    ``s = (2^b - 1) / max(x_max - x_min, 1e-8)``, ``z = rne(s * x_min)``
    (``+ 2^(b-1)`` when signed, i.e. ``x_min < 0``)."""
    f32 = np.float32
    signed = x_min < 0
    s = f32(2**bits - 1) / max(f32(x_max) - f32(x_min), f32(1e-8))
    z = np.rint(s * f32(x_min)) + f32(2 ** (bits - 1) if signed else 0)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return float(s), float(z), qmin, qmax


class ActivationQuantizer:
    """Forward pre-hook that fake-quantizes a layer's first positional input
    per tensor: ``q = clamp(rne(s * a - z), qmin, qmax)``, ``a_hat = (q + z) / s``,
    computed in float32 and cast back to the input's dtype.

    Holds only plain Python numbers, so models carrying it pickle and deep
    copy. ``enabled`` is ``False`` for the first layer (float input);
    uncalibrated quantizers pass their input through."""

    def __init__(self, name: str, bits: int, s_sigma: float) -> None:
        self.name = name
        self.bits = bits
        self.s_sigma = float(s_sigma)
        self.enabled = True
        self.signed = False
        self.sigma: float | None = None
        self.a_max: float | None = None
        self.x_min: float | None = None
        self.x_max: float | None = None
        self.scale: float | None = None
        self.zero_point: float | None = None
        self.qmin = 0
        self.qmax = 0

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def observe(self, a: torch.Tensor) -> None:
        """Record the statistics of one calibration input and fix the range."""
        import torch

        a32 = a.detach().to(torch.float32)
        signed = bool((a32 < 0).any())
        if signed:
            sigma = a32.std() if a32.numel() > 1 else a32.new_zeros(())
        else:
            pos = a32[a32 > 0]
            sigma = pos.std() if pos.numel() > 1 else a32.new_zeros(())
        a_max = float(a32.max())
        sigma_f = float(sigma)
        if not (math.isfinite(sigma_f) and math.isfinite(a_max)):
            raise InvalidArgumentError(
                f"layer {self.name!r}: calibration input is not finite (NaN or infinity)"
            )
        self.signed, self.sigma, self.a_max = signed, sigma_f, a_max
        self._update()

    def set_bits(self, bits: int) -> None:
        self.bits = bits
        if self.sigma is not None:
            self._update()

    def _update(self) -> None:
        assert self.sigma is not None and self.a_max is not None
        self.x_min, self.x_max = activation_range(
            self.signed, self.sigma, self.a_max, self.bits, self.s_sigma
        )
        self.scale, self.zero_point, self.qmin, self.qmax = activation_qparams(
            self.x_min, self.x_max, self.bits
        )

    def quantize(self, a: torch.Tensor) -> torch.Tensor:
        import torch

        if self.scale is None or self.zero_point is None:
            return a
        s, z = self.scale, self.zero_point
        a32 = a.to(torch.float32)
        q = torch.round(a32 * s - z).clamp_(self.qmin, self.qmax)
        return ((q + z) / s).to(a.dtype)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not (self.enabled and self.calibrated and args):
            return None
        x = args[0]
        if not (hasattr(x, "is_floating_point") and x.is_floating_point()):
            return None
        return (self.quantize(x), *args[1:])

    def __repr__(self) -> str:
        state = (
            "float input"
            if not self.enabled
            else f"range=[{self.x_min:.4g}, {self.x_max:.4g}]"
            if self.calibrated
            else "uncalibrated"
        )
        return f"ActivationQuantizer({self.name!r}, bits={self.bits}, {state})"


class _Observer:
    """Temporary calibration hook: records the first input of its layer and,
    with ``apply``, quantizes it at once (the release's one-pass scheme)."""

    def __init__(
        self, quantizer: ActivationQuantizer, order: list[ActivationQuantizer], apply: bool
    ) -> None:
        self.quantizer = quantizer
        self.order = order
        self.apply = apply

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        q = self.quantizer
        if q.sigma is None and args:
            x = args[0]
            if hasattr(x, "is_floating_point") and x.is_floating_point():
                q.observe(x)
                if not self.order:
                    q.enabled = False
                self.order.append(q)
        return q(module, args) if self.apply else None


def _model_device_dtype(model: nn.Module) -> tuple[Any, Any]:
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _calibrate(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    quantizers: dict[str, ActivationQuantizer],
    input_shape: tuple[int, ...],
    seed: int,
    apply: bool,
) -> None:
    import torch

    order: list[ActivationQuantizer] = []
    handles = [
        module.register_forward_pre_hook(_Observer(quantizers[name], order, apply))
        for name, module in layers
    ]
    modes = [(m, m.training) for m in model.modules()]
    device, dtype = _model_device_dtype(model)
    try:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(input_shape, generator=gen).to(device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except SquantError:
                raise
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise InvalidArgumentError(
                    f"calibration forward pass on a U[0,1) batch of shape {input_shape} "
                    f"failed ({type(exc).__name__}: {msg}); pass input_shape= matching "
                    "the model's input"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if order:
        order[-1].set_bits(8)


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(f"input_shape must be a sequence of positive integers, got {input_shape!r}")
    dims = tuple(input_shape)
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) > 0 for d in dims
    ):
        raise InvalidArgumentError(
            f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def _check_s_sigma(s_sigma: object) -> float | None:
    if s_sigma is None:
        return None
    if isinstance(s_sigma, bool) or not isinstance(s_sigma, numbers.Real):
        raise TypeError(f"s_sigma must be a positive number or None, got {s_sigma!r}")
    value = float(s_sigma)
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgumentError(f"s_sigma must be a positive finite number, got {value}")
    return value


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
    skip: str | Sequence[str] = ...,
    input_shape: Sequence[int] = ...,
    s_sigma: float | None = ...,
    calibration: str = ...,
    seed: int = ...,
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
    skip: str | Sequence[str] = ...,
    input_shape: Sequence[int] = ...,
    s_sigma: float | None = ...,
    calibration: str = ...,
    seed: int = ...,
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
    skip: str | Sequence[str] = (),
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    s_sigma: float | None = None,
    calibration: str = "float",
    seed: int = 0,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, QuantReport]:
    """A SQuant-quantized deep copy of ``model`` (the original is untouched).

    Every Conv1d/2d/3d and Linear weight (module names matching a ``skip``
    fnmatch pattern excepted, e.g. ``skip=("fc", "layer4.*")``) is replaced
    by its ``wbits``-bit SQuant dequantized value, same dtype and device.
    ``mode``, ``backend`` and ``threads`` are as in :func:`quantize_tensor`.

    With ``abits`` (2..8), activation quantizers are added as forward
    pre-hooks and calibrated on one ``U[0,1)`` batch of ``input_shape``
    (default :data:`DEFAULT_INPUT_SHAPE`, an ImageNet-sized batch of 8;
    give e.g. ``(8, 784)`` for an MLP). ``s_sigma`` defaults to
    :func:`default_s_sigma` of ``abits`` and is used for every activation
    quantizer, the 8-bit last layer included, as in the release.
    ``calibration`` is ``"float"`` or ``"quantized"`` (see the module doc);
    ``seed`` seeds the calibration noise.

    The per-layer :class:`QuantReport` is attached as ``qmodel.squant_report``
    and, with ``return_report=True``, returned as ``(qmodel, report)``.
    """
    wall = time.perf_counter()
    wbits = check_bits(wbits, "wbits")
    if abits is not None:
        abits = check_bits(abits, "abits")
    mode = check_mode(mode)
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

    qmodel = copy.deepcopy(model)
    layers, skipped = select_layers(qmodel, patterns)

    quantizers: dict[str, ActivationQuantizer] = {}
    if abits is not None:
        mult = sigma_mult if sigma_mult is not None else default_s_sigma(abits)
        quantizers = {name: ActivationQuantizer(name, abits, mult) for name, _ in layers}
        if calibration == "float":
            _calibrate(qmodel, layers, quantizers, shape, int(seed), apply=False)

    reports: list[LayerReport] = []
    for name, module in layers:
        weight = module.weight
        qt, ms = quantize_layer_weight(name, weight.detach(), wbits, mode, backend, threads)
        w_hat = qt.dequantize()
        err = relative_error(weight, w_hat)
        with torch.no_grad():
            weight.copy_(w_hat)
        reports.append(
            LayerReport(
                name=name,
                shape=tuple(weight.shape),
                params=weight.numel(),
                time_ms=ms,
                rel_error=err,
                k_flips=qt.k_flips,
                c_flips=qt.c_flips,
                bits=wbits,
                kind=type(module).__name__,
            )
        )

    if abits is not None:
        if calibration == "quantized":
            _calibrate(qmodel, layers, quantizers, shape, int(seed), apply=True)
        for (name, module), rep in zip(layers, reports):
            q = quantizers[name]
            module.register_forward_pre_hook(q)
            if q.calibrated and q.enabled:
                assert q.x_min is not None and q.x_max is not None
                rep.act_range = (q.x_min, q.x_max)
                rep.act_bits = q.bits

    report = QuantReport(
        layers=reports,
        wbits=wbits,
        mode=mode,
        abits=abits,
        wall_ms=(time.perf_counter() - wall) * 1e3,
        skipped=skipped,
    )
    # Plain attribute (nn.Module.__setattr__ is typed for tensors/modules only).
    qmodel.__dict__["squant_report"] = report
    if return_report:
        return qmodel, report
    return qmodel


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """The :class:`ActivationQuantizer` hooks of a quantized model, by layer name."""
    out: dict[str, ActivationQuantizer] = {}
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ActivationQuantizer):
                out[name] = hook
    return out
