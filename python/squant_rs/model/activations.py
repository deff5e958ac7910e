"""The paper's data-free activation quantizers (sigma rule on one batch of noise)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Container, Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, SquantError
from ..tensor.validate import (
    check_bits,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


#: Calibration batch used when ``input_shape`` is not given: 8 images of
#: 3x224x224. The release used 256; 8 keeps a CPU run around a second for
#: ResNet-18 while the sigma estimates stay stable (they pool every
#: activation element of the batch).
DEFAULT_INPUT_SHAPE: tuple[int, ...] = (8, 3, 224, 224)

#: ``s_sigma`` of the release's run scripts, by activation bit width.
S_SIGMA_TABLE: dict[int, float] = {4: 12.0, 6: 14.0, 8: 25.0}

CALIBRATIONS: tuple[str, ...] = ("float", "quantized")

#: How calibration errors name where the calibration batch's shape comes
#: from, in the caller's words: ``"api"`` (:func:`quantize_model`,
#: ``quantize_onnx``: ``input_shape=(8, 16)``), ``"example"``
#: (``export_onnx``: its ``example_input``'s shape) or ``"cli"`` (the
#: command line's ``--input-shape 8,16``). Set by :func:`shape_spelling`.
SHAPE_SPELLING: ContextVar[str] = ContextVar("squant_rs_input_shape_spelling", default="api")

#: ``export_onnx``: the dtype of an example input that is not floating
#: point (token ids), which U[0,1) calibration noise cannot stand for.
INTEGER_INPUT: ContextVar[str | None] = ContextVar("squant_rs_integer_input", default=None)


@contextlib.contextmanager
def shape_spelling(spelling: str, integer_input: str | None = None) -> Iterator[None]:
    """Calibration errors name the shape as ``spelling`` says
    (:data:`SHAPE_SPELLING`) while the body runs; ``integer_input`` (the
    dtype of an integer example input) makes them say that no shape helps."""
    token = SHAPE_SPELLING.set(spelling)
    itoken = INTEGER_INPUT.set(integer_input)
    try:
        yield
    finally:
        INTEGER_INPUT.reset(itoken)
        SHAPE_SPELLING.reset(token)


def pass_shape(several: bool = False) -> str:
    """The advice after a failed calibration run: pass a calibration shape
    the model takes, in the caller's words (:data:`SHAPE_SPELLING`)."""
    inputs = "inputs" if several else "input"
    spelling = SHAPE_SPELLING.get()
    if spelling == "cli":
        return f"pass --input-shape matching the model's {inputs}"
    if spelling == "example":
        return f"pass an example_input of the shape the model takes (its {inputs})"
    return f"pass input_shape= matching the model's {inputs}"


def _integer_advice(who: str) -> str:
    """The advice after a failed calibration run where ``who`` (an
    ``nn.Embedding``, the model of an integer example input) takes integer
    ids: U[0,1) noise is float, so no shape helps; quantize weight-only."""
    spelling = SHAPE_SPELLING.get()
    if spelling == "cli":
        return (
            f"{who} takes integer ids, and U[0,1) noise is float, which no --input-shape "
            "changes (the example input export makes is such noise too): export "
            "integer-input models with squant_rs.export_onnx, an integer example_input and "
            "abits=None"
        )
    shape = "example_input shape" if spelling == "example" else "input_shape="
    action = "export" if spelling == "example" else "quantize"
    return (
        f"{who} takes integer ids, and the calibration batch is U[0,1) float noise, which no "
        f"{shape} changes; {action} it weight-only (abits=None)"
    )


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
# Activation quantization (docs/algorithm.md section 5)


def activation_range(
    signed: bool,
    sigma: float,
    a_max: float,
    bits: int,
    s_sigma: float,
    a_min: float | None = None,
) -> tuple[float, float]:
    """``(x_min, x_max)`` of docs/algorithm.md section 5 from the calibration statistics
    (float32 arithmetic, as the release): ``alpha = s_sigma * sigma``
    (``/ 1.25`` when signed), ``alpha = min(alpha, a_max)`` below 6 bits;
    ``[-alpha, alpha]`` when signed, else ``[0, alpha]``.

    Where that cap would make ``alpha <= 0`` (a signed input with
    ``a_max <= 0``, which the release leaves undefined: it inverted the
    range), the cap is ``max(|a_min|, |a_max|)`` instead (``a_min``: the
    smallest value of the calibration input; without it, ``|a_max|``).
    The result may be infinite where ``s_sigma * sigma`` overflows
    float32 (:func:`check_activation_range` refuses it)."""
    f32 = np.float32
    with np.errstate(over="ignore"):
        alpha = f32(s_sigma) * f32(sigma)
        if signed:
            alpha = alpha / f32(1.25)
        if bits < 6:
            capped = min(alpha, f32(a_max))
            if signed and capped <= 0:
                low = abs(f32(a_min)) if a_min is not None else f32(0.0)
                capped = min(alpha, max(low, abs(f32(a_max))))
            alpha = capped
    x_min = -alpha if signed else f32(0.0)
    return float(x_min), float(alpha)


def activation_qparams(x_min: float, x_max: float, bits: int) -> tuple[float, float, int, int]:
    """``(s, z, qmin, qmax)`` of the affine scheme of docs/algorithm.md section 5 (float32):
    ``s = (2^b - 1) / max(x_max - x_min, 1e-8)``, ``z = rne(s * x_min)``
    (``+ 2^(b-1)`` when signed, i.e. ``x_min < 0``). Not finite (or ``s``
    0) where the range does not fit float32 (:func:`check_activation_range`)."""
    f32 = np.float32
    signed = x_min < 0
    with np.errstate(over="ignore", invalid="ignore"):
        s = f32(2**bits - 1) / max(f32(x_max) - f32(x_min), f32(1e-8))
        z = np.rint(s * f32(x_min)) + f32(2 ** (bits - 1) if signed else 0)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    return float(s), float(z), qmin, qmax


def check_activation_range(
    name: str, x_min: float, x_max: float, bits: int, cause: str
) -> tuple[float, float, int, int]:
    """:func:`activation_qparams` of ``[x_min, x_max]``, or an
    :class:`InvalidArgumentError` naming the layer ``name`` and ``cause``
    (e.g. ``"s_sigma=1e+39"``) where the range or its scale is not finite
    in float32 or the scale is 0 (the quantizer would give NaN)."""
    s, z, qmin, qmax = activation_qparams(x_min, x_max, bits)
    f32max = float(np.finfo(np.float32).max)
    fits = all(math.isfinite(v) and abs(v) <= f32max for v in (x_min, x_max, s, z))
    if not (fits and s > 0):
        raise InvalidArgumentError(
            f"layer {name!r}: activation range [{x_min:.6g}, {x_max:.6g}] from {cause} "
            f"does not fit float32 (scale {s:.6g}); use a smaller {cause.split('=')[0]}"
        )
    return s, z, qmin, qmax


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
        #: Smallest calibration value (used only where the input has no
        #: positive value, docs/algorithm.md section 5).
        self.a_min: float | None = None
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
        a_min = float(a32.min())
        sigma_f = float(sigma)
        if not (math.isfinite(sigma_f) and math.isfinite(a_max) and math.isfinite(a_min)):
            raise InvalidArgumentError(
                f"layer {self.name!r}: calibration input is not finite (NaN or infinity)"
            )
        self.signed, self.sigma, self.a_max, self.a_min = signed, sigma_f, a_max, a_min
        self._update()

    def set_bits(self, bits: int) -> None:
        self.bits = bits
        if self.sigma is not None:
            self._update()

    def _update(self) -> None:
        assert self.sigma is not None and self.a_max is not None
        x_min, x_max = activation_range(
            self.signed, self.sigma, self.a_max, self.bits, self.s_sigma, self.a_min
        )
        qparams = check_activation_range(
            self.name, x_min, x_max, self.bits, f"s_sigma={self.s_sigma:g}"
        )
        self.x_min, self.x_max = x_min, x_max
        self.scale, self.zero_point, self.qmin, self.qmax = qparams

    def quantize(self, a: torch.Tensor) -> torch.Tensor:
        import torch

        if self.scale is None or self.zero_point is None:
            return a
        s, z = self.scale, self.zero_point
        a32 = a.to(torch.float32)
        q = torch.round(a32 * s - z).clamp_(self.qmin, self.qmax)
        return ((q + z) / s).to(a.dtype)

    #: Registered with ``register_forward_pre_hook(..., with_kwargs=True)``
    #: (its hooks take and return the keyword arguments too).
    with_kwargs = False

    def calibration_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The tensor whose statistics set the range: the first positional
        input where it is floating point, else ``None``."""
        x: Any = args[0] if args else None
        return x if hasattr(x, "is_floating_point") and x.is_floating_point() else None

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
        return f"{type(self).__name__}({self.name!r}, bits={self.bits}, {state})"


#: ``nn.MultiheadAttention.forward``'s inputs that its input projection reads.
ATTENTION_INPUTS = ("query", "key", "value")


class AttentionInputQuantizer(ActivationQuantizer):
    """The :class:`ActivationQuantizer` of an ``nn.MultiheadAttention``'s
    packed input projection (the layer ``<attention>.in_proj``): a forward
    pre-hook with keyword arguments on the attention that fake-quantizes
    its ``query``, ``key`` and ``value`` (positional or keywords) with one
    per-tensor range, set from the statistics of the distinct ones pooled.
    An input that is the same tensor as an earlier one (self-attention:
    ``key is value is query``) is quantized once and passed as that same
    tensor, so torch's checks for ``query is key`` (the packed projection,
    the fast path) still hold. The attention's ``out_proj`` input is
    computed inside its forward: it stays float."""

    with_kwargs = True

    @staticmethod
    def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """The distinct floating-point tensors among query, key and value."""
        found: list[Any] = []
        for i, key in enumerate(ATTENTION_INPUTS):
            x: Any = args[i] if i < len(args) else kwargs.get(key)
            if (
                hasattr(x, "is_floating_point")
                and x.is_floating_point()
                and all(x is not y for y in found)
            ):
                found.append(x)
        return found

    def calibration_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import torch

        found = self._inputs(args, kwargs)
        if len(found) < 2:
            return found[0] if found else None
        return torch.cat([x.detach().reshape(-1).to(torch.float32) for x in found])

    def __call__(  # type: ignore[override]
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not (self.enabled and self.calibrated):
            return None
        found = self._inputs(args, kwargs)
        if not found:
            return None
        done = [(x, self.quantize(x)) for x in found]

        def swap(x: Any) -> Any:
            return next((q for a, q in done if a is x), x)

        n = min(len(args), len(ATTENTION_INPUTS))
        new_args = (*(swap(a) for a in args[:n]), *args[n:])
        new_kwargs = {k: swap(v) if k in ATTENTION_INPUTS[n:] else v for k, v in kwargs.items()}
        return new_args, new_kwargs


class _Observer:
    """Temporary calibration hook: records the first input of its layer and,
    with ``apply``, quantizes it at once (the release's one-pass scheme).
    A ``fixed`` quantizer already has its range: it is not observed, only
    applied (and counted, so that the first layer to run is known)."""

    def __init__(
        self,
        quantizer: ActivationQuantizer,
        order: list[ActivationQuantizer],
        apply: bool,
        fixed: bool = False,
    ) -> None:
        self.quantizer = quantizer
        self.order = order
        self.apply = apply
        self.fixed = fixed
        self.seen = False

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> Any:
        q = self.quantizer
        if not self.seen and (self.fixed or q.sigma is None):
            x = q.calibration_input(args, kwargs or {})
            if x is not None:
                self.seen = True
                if not self.fixed:
                    q.observe(x)
                if not self.order:
                    q.enabled = False
                self.order.append(q)
        if not self.apply:
            return None
        if isinstance(q, AttentionInputQuantizer):
            return q(module, args, kwargs or {})
        return q(module, args)


class _Marker:
    """Calibration hook of a quantized layer without an input quantizer:
    puts a stand-in quantizer (named like the layer) into the run order the
    first time the layer runs, so that the first / last layer rules count
    it."""

    def __init__(self, name: str, order: list[ActivationQuantizer]) -> None:
        self.quantizer = ActivationQuantizer(name, 8, 1.0)
        self.quantizer.enabled = False
        self.order = order
        self.seen = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.seen:
            self.seen = True
            self.order.append(self.quantizer)


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
    fixed: Container[str] = (),
    markers: Sequence[tuple[str, nn.Module]] = (),
) -> list[str]:
    """One forward pass of ``U[0, 1)`` noise through ``model`` that sets the
    sigma-rule range of every quantizer of ``layers`` but those named in
    ``fixed`` (ranges already set: applied with ``apply``, not observed).
    The first layer to run gets a float input, the last observed one 8 bits.
    ``markers``: ``(name, module)`` of quantized layers without an input
    quantizer (an attention whose separate projections ``q_proj``... are
    quantized): they count as layers that ran for those two rules. A
    quantizer whose ``with_kwargs`` is set (:class:`AttentionInputQuantizer`)
    is observed through a pre-hook that gets the keyword arguments too.

    Returns:
        the names of the quantizers of the layers that ran (and of the
        markers), in the order they first ran.
    """
    import torch

    order: list[ActivationQuantizer] = []
    handles = [
        module.register_forward_pre_hook(
            _Observer(quantizers[name], order, apply, fixed=name in fixed),
            with_kwargs=quantizers[name].with_kwargs,
        )
        for name, module in layers
    ]
    marks = [_Marker(name, order) for name, _ in markers]
    handles += [m.register_forward_pre_hook(mk) for (_, m), mk in zip(markers, marks)]
    fixed_ids = {id(quantizers[name]) for name, _ in layers if name in fixed}
    fixed_ids |= {id(mk.quantizer) for mk in marks}
    # An embedding given the float noise: the model takes integer ids.
    embeddings: list[str] = []
    handles += [
        module.register_forward_pre_hook(_FloatIds(name, embeddings))
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    ]
    modes = [(m, m.training) for m in model.modules()]
    device, dtype = _model_device_dtype(model)
    try:
        gen = torch.Generator().manual_seed(seed)
        try:
            x = torch.rand(input_shape, generator=gen).to(device=device, dtype=dtype)
        except (RuntimeError, MemoryError) as exc:  # e.g. the allocator's "can't allocate"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidArgumentError(
                f"input_shape {input_shape}: the U[0,1) calibration batch of that shape "
                f"cannot be made ({type(exc).__name__}: {msg})"
            ) from exc
        model.eval()
        with torch.no_grad():
            try:
                model(x)
            except SquantError:
                raise
            except Exception as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                example = " (example_input's)" if SHAPE_SPELLING.get() == "example" else ""
                integer = INTEGER_INPUT.get()
                if embeddings:
                    # the cause is known: the torch error adds nothing
                    who = f"nn.Embedding {embeddings[0]!r}" if embeddings[0] else "nn.Embedding"
                    why = ": " + _integer_advice(who)
                elif integer is not None:
                    why = f" ({type(exc).__name__}: {msg}): " + _integer_advice(
                        f"the model (example_input is {integer})"
                    )
                elif isinstance(exc, TypeError) and not _takes_one_input(model):
                    why = (
                        f" ({type(exc).__name__}: {msg}): the model's forward takes more than "
                        "one input and the calibration passes one tensor; quantize it "
                        "weight-only (abits=None), or wrap it in a module whose forward takes "
                        "one tensor"
                    )
                else:
                    why = f" ({type(exc).__name__}: {msg}); {pass_shape()}"
                raise InvalidArgumentError(
                    f"calibration forward pass on a U[0,1) batch of shape {input_shape}"
                    f"{example} failed{why}"
                ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    observed = [q for q in order if id(q) not in fixed_ids]
    if order and observed and order[-1] is observed[-1]:
        order[-1].set_bits(8)
    return [q.name for q in order]


def _takes_one_input(model: nn.Module) -> bool:
    """Whether ``model(x)`` binds to its forward's signature (True where
    the signature cannot be read)."""
    import inspect

    try:
        inspect.signature(model.forward).bind(object())
    except TypeError:
        return False
    except ValueError:  # pragma: no cover - no signature (a builtin)
        return True
    return True


class _FloatIds:
    """Forward pre-hook of an embedding during calibration: notes its name
    where it gets floating-point ids (the U[0,1) noise)."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[0] if args else None
        if getattr(ids, "is_floating_point", lambda: False)():
            self.seen.append(self.name)


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(f"input_shape must be a sequence of positive integers, got {input_shape!r}")
    dims = tuple(input_shape)
    if not dims or not all(
        not isinstance(d, bool) and isinstance(d, numbers.Integral) and int(d) > 0 for d in dims
    ):
        raise InvalidArgumentError(
            f"input_shape must be a non-empty sequence of positive integers, got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def check_seed(seed: object) -> int:
    """``int(seed)``: an integer (not a bool) in ``[-2**63, 2**64 - 1]``,
    the range ``torch.Generator.manual_seed`` takes (negative seeds count
    modulo ``2**64``); TypeError or InvalidArgumentError otherwise, with
    :func:`quantize_model`'s messages (it checks ``seed`` inline)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not -(2**63) <= int(seed) <= 2**64 - 1:
        raise InvalidArgumentError(
            f"seed must be in [-2**63, 2**64 - 1] (torch.Generator's range), got {int(seed)}"
        )
    return int(seed)


def _check_s_sigma(s_sigma: object) -> float | None:
    if s_sigma is None:
        return None
    if isinstance(s_sigma, bool) or not isinstance(s_sigma, numbers.Real):
        raise TypeError(f"s_sigma must be a positive number or None, got {s_sigma!r}")
    return check_positive_f32(s_sigma, "s_sigma")


def check_positive_f32(value: numbers.Real, name: str) -> float:
    """``float(value)``, or an :class:`InvalidArgumentError` unless it is a
    positive finite number that stays positive and finite in float32 (the
    activation ranges are computed in float32)."""
    holds = (
        f"{name} must be a positive number that float32 holds (at most "
        f"{float(np.finfo(np.float32).max):.6g}, not rounding to 0; activation ranges "
        "are computed in float32)"
    )
    try:
        v = float(value)
    except OverflowError as exc:  # an int or a Fraction beyond float64 (10**400)
        sign = "negative " if value < 0 else ""
        raise InvalidArgumentError(f"{holds}, got a {sign}number too large for a float") from exc
    if not (math.isfinite(v) and v > 0):
        raise InvalidArgumentError(f"{name} must be a positive finite number, got {v}")
    with np.errstate(over="ignore", under="ignore"):
        v32 = np.float32(v)
    if not (np.isfinite(v32) and v32 > 0):
        raise InvalidArgumentError(f"{holds}, got {v:g}")
    return v
