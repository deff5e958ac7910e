"""`quantize_tensor` and `QuantizedTensor`: the numpy path (Rust core) and
the dispatch to the torch adapter."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _squant_rs as _native
from ..errors import InvalidArgumentError, SquantError
from .validate import (
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_memory,
    check_mode,
    check_quantizer,
    check_shape,
    check_threads,
    dtype_max,
    grid_error,
    physical_memory,
    value_error,
)

#: Weights that need a float32 conversion (float16, bfloat16) are converted
#: and quantized (and dequantized) in blocks of whole output channels of
#: about this many elements, so that no full-size float32 copy exists: every
#: SQuant step is per output channel, so the results are the same.
BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A SQuant-quantized weight.

    Convention (the SQuant release's): per output channel ``o``,
    ``codes = rne(scale[o] * w - zero_point[o])`` refined by CASE flips, and
    ``w_hat = (codes + zero_point[o]) / scale[o]``. With
    ``quantizer="symmetric"`` the zero point is 0 and the codes lie in
    ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``. ``scale`` is in levels per
    unit, i.e. the inverse of the step size that torch calls "scale"; the
    step and torch-style zero point are available as :attr:`step` and
    :attr:`torch_zero_point`.

    ``codes``, ``scale`` and ``zero_point`` are numpy arrays for numpy input
    and torch tensors on the input's device for torch input.
    """

    codes: Any
    scale: Any
    zero_point: Any
    bits: int
    mode: str
    dtype: Any
    k_flips: int
    c_flips: int
    #: Whether the grid was already checked finite in ``dtype`` (set by the
    #: quantize functions; a hand-made instance is checked on dequantize).
    grid_checked: bool = field(default=False, repr=False)
    quantizer: str = "asymmetric"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def step(self) -> Any:
        """Step size ``1 / scale`` per output channel (torch's "scale")."""
        return 1.0 / self.scale

    @property
    def torch_zero_point(self) -> Any:
        """``-zero_point``: with :attr:`step`, ``w_hat ~= (codes - zp) * step``."""
        return -self.zero_point

    def dequantize(self, threads: int | None = None) -> Any:
        """The dequantized weight ``(codes + zero_point[o]) / scale[o]``,
        computed in float32 and returned in the input's shape, dtype (and
        device).

        ``threads`` sets the Rust thread count as in :func:`quantize_tensor`
        (given, ``SQUANT_NUM_THREADS`` is not read). For float16 and bfloat16
        the values are computed a block of channels at a time, so the only
        buffer beyond the output is one block of float32 values.

        Returns:
            A numpy array for numpy codes, else a torch tensor on the codes'
            device.

        Raises:
            WeightRangeError: some dequantized value would not be finite in
                the output dtype (only for a hand-made instance; the quantize
                functions refuse such weights up front).
            InvalidArgumentError: ``threads`` (or ``SQUANT_NUM_THREADS``) is
                out of range; for a hand-made instance, ``bits`` is not in
                2..8, ``scale``/``zero_point`` are not of shape ``(OC,)`` or
                on the codes' device, the codes are a meta tensor, or some
                code lies outside ``[-2^(bits-1), 2^(bits-1) - 1]``.
            TypeError: for a hand-made instance, a field of the wrong type:
                ``codes`` must be an int8 numpy array or torch tensor of 2+
                dimensions, ``scale`` and ``zero_point`` float32 of the same
                kind (and device), ``dtype`` a float dtype of that kind
                (:class:`UnsupportedDtypeError`, a ``TypeError``, names it).
        """
        threads = check_threads(threads)
        if not self.grid_checked:
            check_hand_made(self)
        if isinstance(self.codes, np.ndarray):
            return dequantize_array(self.codes, self.scale, self.zero_point, self.dtype, threads)
        from ..torch.adapter import dequantize_torch

        return dequantize_torch(self, threads)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, bits={self.bits}, mode={self.mode!r}, "
            f"quantizer={self.quantizer!r}, dtype={self.dtype}, "
            f"k_flips={self.k_flips}, c_flips={self.c_flips})"
        )


def _is_torch_tensor(w: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(w, torch.Tensor)


def _check_not_torch_object(w: object) -> None:
    """Refuse a torch object that is not a tensor (its class is in torch's
    own modules), e.g. a module passed instead of its weight, by name:
    numpy would make an object array of it (or, for ``torch.Size``, an
    integer one)."""
    module = type(w).__module__
    if module != "torch" and not module.startswith("torch."):
        return
    name = f"{module}.{type(w).__qualname__}"
    torch = sys.modules.get("torch")
    if torch is None:
        raise TypeError(f"got a torch object ({name}) but torch is not importable")
    if isinstance(w, torch.nn.Module):
        has_weight = isinstance(getattr(w, "weight", None), torch.Tensor)
        name = f"a {type(w).__name__} module: " + (
            "pass its .weight" if has_weight else "pass a layer's .weight, or use quantize_model()"
        )
    raise UnsupportedDtypeError(f"weight must be a numpy array or torch tensor, got {name}")


def validated_array(w: object) -> np.ndarray:
    """``w`` as a numpy array of a supported dtype and shape (no copy)."""
    _check_not_torch_object(w)
    try:
        a = np.asarray(w)
    except ValueError as exc:  # e.g. a nested list deeper than numpy's 64 dimensions
        raise UnsupportedDtypeError(f"weight is not a numeric array ({exc})") from None
    if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
        raise UnsupportedDtypeError(
            f"weight dtype {a.dtype} is not supported: expected float16, float32 or float64"
        )
    check_shape(a.shape)
    check_memory(a.size, 1, physical_memory(), "this machine")
    return a


def to_float32(a: np.ndarray, bits: int | None = None, quantizer: str = "asymmetric") -> np.ndarray:
    """A float32 view (or copy, when the dtype or byte order differs) of a
    validated array; float64 values beyond float32's range are a
    :class:`WeightRangeError`, whatever the path (no numpy warning).

    With such a value the error is the one the rule of
    :mod:`squant_rs.tensor.validate` gives: a NaN or infinity, or (given
    ``bits`` and ``quantizer``) a float32 range overflow, in a lower output
    channel is raised instead. Without ``bits`` the range of the lower
    channels is not checked."""
    if a.dtype == np.float32 and a.dtype.isnative:
        return a
    with np.errstate(over="ignore"):
        a32 = np.asarray(a, dtype=np.float32)
    if a.dtype.itemsize == 8:
        _check_float32_range(a, a32, bits, quantizer)
    return a32


def as_float32_array(
    w: object, bits: int | None = None, quantizer: str = "asymmetric"
) -> tuple[np.ndarray, np.dtype]:
    """Validated float32 view of a numpy-like weight (copies only when the
    dtype or byte order differs), with the original dtype in native order;
    ``bits`` and ``quantizer`` as in :func:`to_float32`."""
    a = validated_array(w)
    return to_float32(a, bits, quantizer), a.dtype.newbyteorder("=")


def _check_float32_range(a: np.ndarray, a32: np.ndarray, bits: int | None, quantizer: str) -> None:
    """float64 values beyond float32's range: a clear error, not "NaN", for
    the lowest output channel with any bad value (that channel's error)."""
    big = np.isinf(a32) & np.isfinite(a)
    if not big.any():
        return  # the Rust core checks the rest, in the same order
    oc = int(a.shape[0])
    big_rows = big.reshape(oc, -1).any(axis=1)
    last = int(np.argmax(big_rows))  # the first channel with such a value
    if bits is not None and last > 0:
        # The channels before it hold no such value: the core's own error
        # for the first bad one among them (NaN or infinity, range), if any.
        _native.quantize(a32[:last].reshape(last, -1), bits, "squant-e", 1, quantizer)
    bad = ~np.isfinite(a[: last + 1].reshape(last + 1, -1))
    problem = bad.any(axis=1)
    problem[last] = True
    o = int(np.argmax(problem))  # row `last` is a problem: some o <= last is
    index = int(np.argmax(bad[o])) if bad[o].any() else None
    raise value_error(o, index, bool(big_rows[o]))


def check_fields(qt: QuantizedTensor) -> None:
    """The fields of a hand-made :class:`QuantizedTensor` that
    :meth:`~QuantizedTensor.dequantize` reads: a clear error naming the
    field, instead of a failure (or silently wrong output) inside it."""
    check_bits(qt.bits, "QuantizedTensor.bits")
    codes = qt.codes
    int8: Any
    f32: Any
    if isinstance(codes, np.ndarray):
        kind, int8, f32 = "numpy array", np.dtype(np.int8), np.dtype(np.float32)
        same_kind: Callable[[Any], bool] = lambda a: isinstance(a, np.ndarray)  # noqa: E731
        where: Callable[[Any], str] = lambda a: ""  # noqa: E731
        try:
            dtype_ok = np.dtype(qt.dtype) in (np.float16, np.float32, np.float64)
        except TypeError:
            dtype_ok = False
        dtypes = "numpy float16, float32 or float64"
    elif _is_torch_tensor(codes):
        import torch

        kind, int8, f32 = "torch tensor", torch.int8, torch.float32
        same_kind = lambda a: isinstance(a, torch.Tensor)  # noqa: E731
        where = lambda a: str(a.device)  # noqa: E731
        dtype_ok = qt.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        dtypes = "torch float16, bfloat16, float32 or float64"
    else:
        raise TypeError(
            "QuantizedTensor.codes must be a numpy array or a torch tensor, got "
            f"{type(codes).__name__}"
        )
    if codes.dtype != int8:
        raise TypeError(f"QuantizedTensor.codes must be int8, got {codes.dtype}")
    if codes.ndim < 2:
        raise InvalidArgumentError(
            f"QuantizedTensor.codes must have 2+ dimensions (OC, IC, *kernel), got shape "
            f"{tuple(codes.shape)}"
        )
    oc = int(codes.shape[0])
    for name in ("scale", "zero_point"):
        v = getattr(qt, name)
        if not same_kind(v):
            raise TypeError(
                f"QuantizedTensor.{name} must be a {kind} like codes, got {type(v).__name__}"
            )
        if v.dtype != f32:
            raise TypeError(f"QuantizedTensor.{name} must be float32, got {v.dtype}")
        if tuple(v.shape) != (oc,):
            raise InvalidArgumentError(
                f"QuantizedTensor.{name} must have shape ({oc},) (one value per output "
                f"channel), got {tuple(v.shape)}"
            )
        if where(v) != where(codes):
            raise InvalidArgumentError(
                f"QuantizedTensor.{name} is on {where(v)} but codes are on {where(codes)}"
            )
    if where(codes) == "meta":
        raise InvalidArgumentError(
            "QuantizedTensor.codes is a meta tensor: it has no values to dequantize"
        )
    if kind == "torch tensor":
        import torch

        for name in ("codes", "scale", "zero_point"):
            layout = getattr(qt, name).layout
            if layout != torch.strided:
                raise InvalidArgumentError(
                    f"QuantizedTensor.{name} must be a dense (strided) tensor, got layout {layout}"
                )
    if not dtype_ok:
        raise UnsupportedDtypeError(
            f"QuantizedTensor.dtype must be {dtypes} (the output dtype), got {qt.dtype!r}"
        )


def check_hand_made(qt: QuantizedTensor) -> None:
    """Every check :meth:`~QuantizedTensor.dequantize` makes of an instance
    that the quantize functions did not make (``grid_checked`` false): its
    fields (:func:`check_fields`), its codes (:func:`check_codes`, O(size)),
    then its grid in its output dtype (:func:`check_grid`, or its torch twin
    for torch fields, O(OC))."""
    check_fields(qt)
    check_codes(qt.codes, qt.bits)
    if isinstance(qt.codes, np.ndarray):
        check_grid(qt.scale, qt.zero_point, qt.bits, qt.dtype)
    else:
        from ..torch.adapter import check_grid_torch

        # A hand-made instance's scale may require grad: the values are the same.
        check_grid_torch(qt.scale.detach(), qt.zero_point.detach(), qt.bits, qt.dtype)


def check_codes(codes: Any, bits: int) -> None:
    """Raise :class:`InvalidArgumentError` where ``codes`` (checked by
    :func:`check_fields`) leave ``bits``' range ``[-2^(bits-1),
    2^(bits-1) - 1]``, the one :func:`check_grid` bounds and the packed
    format stores: for the first output channel with such a code, its
    range. Beyond it the dequantized values are past the grid's ends (a
    float16 one clamped silently, a float32 one infinite). O(size)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    oc = int(codes.shape[0])
    if isinstance(codes, np.ndarray):
        if codes.size == 0:
            return
        rows = codes.reshape(oc, -1)
        mins, maxs = rows.min(axis=1), rows.max(axis=1)
    else:
        if codes.numel() == 0:
            return
        rows = codes.reshape(oc, -1)
        mins, maxs = (v.cpu().numpy() for v in rows.aminmax(dim=1))
    bad = (mins < lo) | (maxs > hi)
    if bad.any():
        o = int(np.argmax(bad))
        raise InvalidArgumentError(
            f"QuantizedTensor.codes must lie in [{lo}, {hi}] at bits={bits}: output channel "
            f"{o} holds codes in [{int(mins[o])}, {int(maxs[o])}]"
        )


def check_grid(scale: Any, zero_point: Any, bits: int, dtype: Any) -> None:
    """Raise :class:`WeightRangeError` for the first output channel whose
    dequantized values cannot be finite in ``dtype``: its grid ends
    ``(tmin + z) / s`` and ``(tmax + z) / s`` (float32; every dequantized
    value lies between them) are not finite, or, for float16 and bfloat16,
    lie more than one step ``1 / s`` beyond the dtype's largest value. O(OC).

    The quantize functions never produce such a channel: the core refuses a
    grid that is not finite in float32, and a grid end lies at most half a
    step beyond the weight's own range (the zero point is rounded), so for a
    weight that is finite in its dtype the overshoot is within one step and
    :meth:`QuantizedTensor.dequantize` clamps it to the dtype's largest value.
    """
    fmax = dtype_max(dtype)
    s = np.asarray(scale, dtype=np.float32)
    z = np.asarray(zero_point, dtype=np.float32)
    n = np.float32(1 << (bits - 1))
    with np.errstate(all="ignore"):
        reach = np.maximum(np.abs((z - n) / s), np.abs((z + (n - np.float32(1))) / s))
        ok = np.isfinite(reach) & (s > 0)
        if fmax != math.inf:
            ok &= reach - np.float32(1) / s <= fmax
    if not ok.all():
        o = int(np.argmin(ok))
        raise grid_error(
            o, dtype, float(reach[o]), float(s.reshape(-1)[o]), float(z.reshape(-1)[o])
        )


_CHANNEL = re.compile(r"output channel (\d+)")


def shift_channel(exc: SquantError, offset: int) -> SquantError:
    """``exc`` for a block of channels starting at ``offset``: the channel
    its message names, counted in the whole weight."""
    msg = _CHANNEL.sub(lambda m: f"output channel {int(m.group(1)) + offset}", str(exc), count=1)
    return type(exc)(msg)


Native = tuple[Any, Any, Any, int, int]


def quantize_blocks(
    shape: tuple[int, ...],
    block: Callable[[int, int], np.ndarray],
    bits: int,
    mode: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> Native:
    """The native ``quantize`` of a weight given as float32 blocks of whole
    output channels (``block(c0, c1)``: channels ``c0..c1``), converted one
    block at a time: the outputs equal one call on the whole weight."""
    oc = shape[0]
    per = max(1, BLOCK_ELEMENTS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    if per >= oc:
        res: Native = _native.quantize(block(0, oc), bits, mode, threads, quantizer)
        return res
    codes = np.empty(shape, dtype=np.int8)
    scale = np.empty(oc, dtype=np.float32)
    zp = np.empty(oc, dtype=np.float32)
    k_flips = c_flips = 0
    for c0 in range(0, oc, per):
        c1 = min(oc, c0 + per)
        try:
            q, s, z, kf, cf = _native.quantize(block(c0, c1), bits, mode, threads, quantizer)
        except SquantError as exc:
            raise shift_channel(exc, c0) from None
        codes[c0:c1] = q
        scale[c0:c1] = s
        zp[c0:c1] = z
        k_flips += int(kf)
        c_flips += int(cf)
    return codes, scale, zp, k_flips, c_flips


def dequantize_array(codes: Any, scale: Any, zero_point: Any, dtype: Any, threads: int) -> Any:
    """Native dequantization of numpy codes into a numpy array of ``dtype``
    (float32 directly; other dtypes a block of channels at a time)."""
    out_dtype = np.dtype(dtype)
    if out_dtype == np.float32:
        return _native.dequantize(codes, scale, zero_point, threads)
    out = np.empty(codes.shape, dtype=out_dtype)
    fmax = dtype_max(dtype)
    oc = int(codes.shape[0])
    per = max(1, BLOCK_ELEMENTS // max(1, int(codes.size) // max(1, oc)))
    for c0 in range(0, oc, per):
        c1 = min(oc, c0 + per)
        block = _native.dequantize(codes[c0:c1], scale[c0:c1], zero_point[c0:c1], threads)
        if fmax != math.inf:
            # A grid end can lie up to a step beyond the dtype's largest
            # value (see check_grid): clamp it instead of overflowing to inf.
            np.clip(block, -fmax, fmax, out=block)
        out[c0:c1] = block
    return out


def quantize_tensor(
    w: Any,
    bits: int = 4,
    mode: str = "squant",
    *,
    backend: str = "auto",
    threads: int | None = None,
    quantizer: str = "asymmetric",
) -> QuantizedTensor:
    """Quantize one weight of shape ``(OC, IC, *kernel)`` with SQuant.

    ``w`` is a numpy array (float16/32/64) or a torch tensor (float16,
    bfloat16, float32, float64, any device). ``bits`` in 2..8; ``mode`` one of
    ``"squant"`` (E+K+C), ``"squant-e"``, ``"squant-k"``, ``"squant-c"``.
    ``quantizer``: ``"asymmetric"`` (the paper's min/max quantizer) or
    ``"symmetric"`` (zero point 0, narrow signed range: what int8 runtimes
    fuse into integer kernels).
    ``backend`` applies to torch input: ``"auto"`` (CUDA -> torch, CPU ->
    Rust), ``"rust"`` or ``"torch"``. ``threads`` sets the Rust thread count
    (default: ``SQUANT_NUM_THREADS`` or all CPUs; given, the environment is
    not read). The input is never modified.

    Returns:
        A :class:`QuantizedTensor`: int8 ``codes`` of ``w``'s shape, per
        output channel ``scale`` and ``zero_point`` (float32), the flip
        counts, and ``dequantize()``. numpy arrays for numpy input, torch
        tensors on ``w``'s device for torch input.

    Raises:
        NonFiniteWeightError: ``w`` holds NaN or infinity (the message names
            the output channel and element).
        WeightRangeError: a channel's values are too large for the float32
            quantizer (float64 beyond float32's range included), or its
            dequantized values would not be finite in ``w``'s dtype.
        InvalidArgumentError: ``bits``, ``mode``, ``backend``, ``threads`` or
            ``SQUANT_NUM_THREADS`` out of range; ``w`` has fewer than 2 or
            more than 64 dimensions, no element, or a channel of more than
            ``2^32 - 1`` elements; ``w`` is a meta tensor.
        UnsupportedDtypeError: ``w``'s dtype is not a supported float type
            or its layout is not dense, or ``w`` is a torch object that is
            not a tensor, e.g. a module instead of its ``.weight`` (a
            ``TypeError``).
        TypeError: an argument of the wrong type.
        MemoryError: ``w`` (e.g. a broadcast view) claims more elements than
            the device's memory could quantize; raised before any work.
    """
    bits = check_bits(bits)
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    backend = check_backend(backend)
    threads = check_threads(threads)
    if _is_torch_tensor(w):
        from ..torch.adapter import quantize_torch_tensor

        return quantize_torch_tensor(w, bits, mode, backend, threads, quantizer)
    a = validated_array(w)
    dtype = a.dtype.newbyteorder("=")
    if a.dtype.itemsize == 2:
        # float16: converted a block at a time (no full float32 copy).
        res = quantize_blocks(
            a.shape,
            lambda c0, c1: np.asarray(a[c0:c1], dtype=np.float32),
            bits,
            mode,
            threads,
            quantizer,
        )
    else:
        res = _native.quantize(to_float32(a, bits, quantizer), bits, mode, threads, quantizer)
    return from_native(res, bits, mode, dtype, quantizer=quantizer)


def from_native(
    res: tuple[Any, Any, Any, int, int],
    bits: int,
    mode: str,
    dtype: Any,
    device: Any = None,
    quantizer: str = "asymmetric",
) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from the native ``quantize`` tuple: numpy
    arrays, or torch tensors on ``device`` when one is given. The caller has
    checked the grid for ``dtype`` (the core does for float32/float64)."""
    codes, scale, zp, kf, cf = res
    if device is not None:
        import torch

        codes = torch.from_numpy(codes)
        scale = torch.from_numpy(scale)
        zp = torch.from_numpy(zp)
        if getattr(device, "type", device) != "cpu":
            codes, scale, zp = codes.to(device), scale.to(device), zp.to(device)
    return QuantizedTensor(
        codes, scale, zp, bits, mode, dtype, int(kf), int(cf), True, quantizer=quantizer
    )
