"""Which layers ``quantize_model`` quantizes, and the per-layer weight step."""

from __future__ import annotations

import copy
import fnmatch
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _squant_rs as _native
from .._squant_rs import InvalidArgumentError, SquantError
from ..tensor.quantized import QuantizedTensor, from_native, quantize_tensor
from ..tensor.validate import (
    UnsupportedDtypeError,
)

if TYPE_CHECKING:
    import torch
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
) -> tuple[Any, float]:
    """``quantize_tensor`` on one named weight, timed (ms); errors name the layer."""
    start = time.perf_counter()
    try:
        qt = quantize_tensor(weight, bits, mode, backend=backend, threads=threads)
    except (SquantError, UnsupportedDtypeError) as exc:
        raise type(exc)(f"{name or 'weight'}: {exc}") from exc
    return qt, (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------
# The whole-model pass


def copy_model(model: nn.Module, fresh: Sequence[Any]) -> nn.Module:
    """``copy.deepcopy(model)``, except that every parameter in ``fresh`` is
    not cloned: its copy is a new parameter of the same type, shape, dtype,
    device, strides and ``requires_grad`` whose values are uninitialised
    (for weights about to be overwritten). Parameters tied between modules
    stay tied in the copy.

    Modules whose class copies the ordinary way (no ``__deepcopy__``,
    ``__reduce__``, ``__reduce_ex__``, ``__getstate__`` or slots of its own)
    are rebuilt directly, the way ``deepcopy`` would, without its generic
    dispatch on every attribute; anything else goes through ``deepcopy``
    with the same memo.

    Returns:
        The copy."""
    import torch

    memo: dict[Any, Any] = {}
    with torch.no_grad():
        for p in fresh:
            if id(p) not in memo:
                data = torch.empty_like(p, memory_format=torch.preserve_format)
                memo[id(p)] = type(p)(data, p.requires_grad)
    copied: nn.Module = _Copier(memo).copy(model)
    return copied


#: Values ``deepcopy`` returns as they are.
_ATOMIC: frozenset[type] = frozenset(
    {type(None), int, float, bool, complex, str, bytes, type, range, type(Ellipsis)}
)


class _Copier:
    """``copy.deepcopy`` of a module tree, fast for plain modules, the
    containers of their ``__dict__`` and plain CPU buffers (see
    :func:`copy_model`). Uses and fills ``deepcopy``'s memo, storages
    included, so that whatever it hands to ``deepcopy`` stays consistent."""

    def __init__(self, memo: dict[Any, Any]) -> None:
        import torch
        from torch import nn

        self.memo = memo
        self.plain: dict[type, bool] = {}
        self.module: Any = nn.Module
        self.tensor: Any = torch.Tensor
        self.strided = torch.strided

    def _is_plain(self, cls: Any) -> bool:
        ok = self.plain.get(cls)
        if ok is None:
            import copyreg

            ok = (
                getattr(cls, "__deepcopy__", None) is None
                and cls.__reduce_ex__ is object.__reduce_ex__
                and cls.__reduce__ is object.__reduce__
                and cls.__getstate__ is self.module.__getstate__
                and not copyreg._slotnames(cls)  # type: ignore[attr-defined]
                and cls not in copyreg.dispatch_table
            )
            self.plain[cls] = ok
        return ok

    def _buffer(self, t: Any) -> Any:
        """A plain, dense, contiguous CPU tensor that owns all of its storage:
        cloned, its storage recorded as ``Tensor.__deepcopy__`` does; else
        ``None``."""
        if (
            t.requires_grad
            or t.layout != self.strided
            or t.device.type != "cpu"
            or t.is_quantized
            or t.is_conj()
            or t.is_neg()
            or t.storage_offset() != 0
            or not t.is_contiguous()
            or t.__dict__
        ):
            return None
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size():
            return None
        seen = self.memo.setdefault("torch", {})
        if storage._cdata in seen:  # shared with another tensor: deepcopy's way
            return None
        new = t.clone()
        seen[storage._cdata] = new.untyped_storage()
        self.memo[id(t)] = new
        return new

    def copy(self, obj: Any) -> Any:
        cls: Any = type(obj)
        if cls in _ATOMIC:
            return obj
        memo = self.memo
        y = memo.get(id(obj), memo)
        if y is not memo:
            return y
        if cls is dict or cls is OrderedDict:
            d: Any = cls()
            memo[id(obj)] = d
            for k, v in obj.items():
                d[k if type(k) is str else self.copy(k)] = v if type(v) in _ATOMIC else self.copy(v)
            return d
        if cls is tuple:
            if all(type(v) in _ATOMIC for v in obj):
                return obj
            t = tuple(self.copy(v) for v in obj)
            if all(a is b for a, b in zip(t, obj)):
                return obj
            memo[id(obj)] = t
            return t
        if cls is set and all(type(v) in _ATOMIC for v in obj):
            c = set(obj)
            memo[id(obj)] = c
            return c
        if cls is self.tensor:
            new = self._buffer(obj)
            if new is not None:
                return new
        elif isinstance(obj, self.module) and self._is_plain(cls):
            m = cls.__new__(cls)
            memo[id(obj)] = m
            # The state dict is a fresh temporary: copied without a memo entry.
            new = {}
            for k, v in obj.__getstate__().items():
                vt = type(v)
                if vt in _ATOMIC:
                    new[k] = v
                elif (vt is OrderedDict or vt is dict) and not v and id(v) not in memo:
                    # Hook dicts, mostly: the common case, inline.
                    memo[id(v)] = new[k] = vt()
                elif vt is tuple and all(type(x) in _ATOMIC for x in v):
                    new[k] = v  # kernel sizes, strides...: deepcopy keeps them
                else:
                    new[k] = self.copy(v)
            m.__setstate__(new)
            return m
        return copy.deepcopy(obj, memo)


@dataclass(frozen=True, eq=False)
class LayerResult:
    """What quantizing one weight into its destination gave."""

    qtensor: QuantizedTensor
    #: ``||w_hat - w|| / ||w||`` of the values written.
    rel_error: float
    #: Time spent on this weight (ms); for the Rust pass, its share of the
    #: pass's wall time, in proportion to the time the pass's threads spent
    #: on it.
    time_ms: float


_WEIGHT_INDEX = re.compile(r"weight (\d+): (.*)", re.S)


class _Destinations:
    """Writeable numpy views of CPU destination tensors for the native
    passes (bfloat16 as its int16 bit patterns); a destination that is not
    C-contiguous (e.g. channels-last) gets a temporary array, copied into it
    by :meth:`finish`."""

    def __init__(self) -> None:
        self.back: list[tuple[Any, np.ndarray]] = []

    def view(self, t: Any) -> np.ndarray:
        import torch

        d = t.detach()
        if d.dtype == torch.bfloat16:
            d = d.view(torch.int16)
        out: np.ndarray = d.numpy()
        if not out.flags.c_contiguous:
            out = np.empty(out.shape, out.dtype)
            self.back.append((t, out))
        return out

    def finish(self) -> None:
        import torch

        with torch.no_grad():
            for dst, tmp in self.back:
                src = torch.from_numpy(tmp)
                if dst.dtype == torch.bfloat16:
                    src = src.view(torch.bfloat16)
                dst.copy_(src)
        self.back.clear()


def dequantize_tensors(
    qts: Sequence[QuantizedTensor], threads: int | None = None
) -> list[torch.Tensor]:
    """``[qt.dequantize() for qt in qts]`` for quantized tensors whose codes,
    scale and zero point are CPU torch tensors or numpy arrays, as CPU torch
    tensors of each one's dtype, in one parallel native pass: the values are
    written straight into the new tensors (no float32 intermediate, no torch
    op whose speed depends on torch's thread count). Bit-identical to
    ``dequantize()``.

    Returns:
        One tensor per quantized tensor, in order.

    Raises:
        SquantError: a malformed quantized tensor (named ``"weight {i}: ..."``).
    """
    import torch

    from ..torch.adapter import _float_dtypes

    dests = _Destinations()
    outs: list[torch.Tensor] = []
    views: list[np.ndarray] = []
    for qt in qts:
        dtype = qt.dtype
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, np.dtype(dtype).name)
        if dtype not in _float_dtypes(torch):
            raise UnsupportedDtypeError(f"cannot dequantize to {qt.dtype}")
        t = torch.empty(qt.shape, dtype=dtype)
        outs.append(t)
        views.append(dests.view(t))
    _native.dequantize_into(
        [_host(qt.codes) for qt in qts],
        [_host(qt.scale) for qt in qts],
        [_host(qt.zero_point) for qt in qts],
        views,
        None,
        threads,
    )
    dests.finish()
    return outs


def _host(a: Any) -> np.ndarray:
    """A numpy array of a numpy array or CPU tensor (no copy when possible)."""
    if isinstance(a, np.ndarray):
        return a
    out: np.ndarray = a.detach().numpy()
    return out


def quantize_into(
    items: Sequence[tuple[str, Any, Any]],
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
) -> list[LayerResult]:
    """Quantize every ``(name, weight, destination)`` and write the weight's
    dequantized value into ``destination`` (a tensor of the weight's shape,
    dtype and device, fully overwritten). When ``destination`` is the
    weight itself, the values are written into a new tensor that then
    becomes the weight's ``.data``.

    Weights for the Rust core (``backend="rust"``, or ``"auto"`` on the CPU)
    run in one parallel native pass that writes the destinations directly
    and computes the relative errors (float64 sums) on the way. The others
    take :func:`quantize_tensor` one at a time; those on the CPU are then
    dequantized into their destinations, errors included, in one native
    pass too. ``bits``, ``mode``, ``backend`` and ``threads`` must be
    valid. Every result equals ``quantize_tensor(weight, bits, mode,
    backend=backend)`` and its ``dequantize()``, bit for bit.

    Returns:
        One :class:`LayerResult` per item, in order.

    Raises:
        SquantError, UnsupportedDtypeError: for the first weight in order
            that cannot be quantized, the message starting with its name.
    """
    import torch

    from ..torch.adapter import check_torch_weight, to_numpy_f32

    items = list(items)
    in_place: list[tuple[Any, Any]] = []
    for i, (name, w, dst) in enumerate(items):
        if dst is w:
            fresh = torch.empty_like(w, memory_format=torch.preserve_format)
            in_place.append((w, fresh))
            items[i] = (name, w, fresh)
    native: list[int] = []
    for i, (name, w, dst) in enumerate(items):
        try:
            check_torch_weight(w)
        except (SquantError, UnsupportedDtypeError) as exc:
            raise type(exc)(f"{name or 'weight'}: {exc}") from exc
        on_cpu = w.device.type == "cpu" and dst.device.type == "cpu"
        if on_cpu and backend != "torch":
            native.append(i)
    out: list[LayerResult | None] = [None] * len(items)
    failure: tuple[int, Exception] | None = None
    dests = _Destinations()
    if native:
        arrays = [to_numpy_f32(items[i][1]) for i in native]
        outs = [dests.view(items[i][2]) for i in native]
        start = time.perf_counter()
        try:
            res = _native.quantize_into(arrays, outs, bits, mode, True, threads)
        except SquantError as exc:
            m = _WEIGHT_INDEX.match(str(exc))
            if m is None:  # pragma: no cover - every per-weight error is indexed
                raise
            i = native[int(m.group(1))]
            failure = (i, type(exc)(f"{items[i][0] or 'weight'}: {m.group(2)}"))
        else:
            # The pass's wall time, shared between the layers in proportion
            # to the time its threads spent on each (so the rows add up to
            # the time the pass took, whatever the thread count).
            wall = (time.perf_counter() - start) * 1e3
            spent = sum(r[6] for r in res)
            share = wall / spent if spent > 0 else 0.0
            for i, (codes, scale, zp, kf, cf, err, ms) in zip(native, res):
                w = items[i][1]
                qt = from_native((codes, scale, zp, kf, cf), bits, mode, w.dtype, w.device)
                out[i] = LayerResult(qt, err, ms * share)
            dests.finish()
    done = set(native)
    later: list[tuple[int, QuantizedTensor, float]] = []  # CPU results to dequantize
    for i, (name, w, dst) in enumerate(items):
        if failure is not None and i >= failure[0]:
            # The pass failed here: raise unless an earlier weight fails.
            raise failure[1]
        if i in done:
            continue
        qt, ms = quantize_layer_weight(name, w.detach(), bits, mode, backend, threads)
        if qt.codes.device.type == "cpu" and dst.device.type == "cpu":
            later.append((i, qt, ms))
            continue
        w_hat = qt.dequantize()
        err = relative_error(w, w_hat)
        with torch.no_grad():
            dst.copy_(w_hat)
        out[i] = LayerResult(qt, err, ms)
    if later:
        errs = _native.dequantize_into(
            [qt.codes.numpy() for _, qt, _ in later],
            [qt.scale.numpy() for _, qt, _ in later],
            [qt.zero_point.numpy() for _, qt, _ in later],
            [dests.view(items[i][2]) for i, _, _ in later],
            [to_numpy_f32(items[i][1]) for i, _, _ in later],
            threads,
        )
        assert errs is not None
        dests.finish()
        for (i, qt, ms), err in zip(later, errs):
            out[i] = LayerResult(qt, err, ms)
    with torch.no_grad():
        for w, fresh in in_place:
            w.data = fresh
    return [r for r in out if r is not None]
