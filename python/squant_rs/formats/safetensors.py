"""The squant-rs file format: SQuant codes packed into a safetensors file.

Layout (format version ``"1"``)
-------------------------------
A standard safetensors file (little-endian; readable by the ``safetensors``
library). For every quantized weight ``NAME`` of original shape ``(OC, ...)``:

``NAME:codes``
    ``U8``, 1-D: the integer codes in row-major order, offset to unsigned
    (``q + 2^(b-1)``) and packed four per byte at 2 bits, two per byte at 3
    and 4 bits, one per byte at 5-8 bits, first code in the low bits, last
    byte zero-padded (see ``squant_rs.tensor.packing``).
``NAME:scale``, ``NAME:zero_point``
    ``F32``, ``(OC,)``: the per-channel ``s`` (levels per unit) and ``z``;
    the weight is ``(codes + z[o]) / s[o]`` computed in float32, then cast to
    the original dtype.

Every other tensor (biases, norms, running statistics, skipped and 1-D
weights) is stored unchanged under its own name. ``__metadata__`` holds

``format``: ``"squant-rs"``; ``format_version``: ``"1"``;
``squant_rs_version``: the writer's version; ``quantized``: a JSON object
``{NAME: {"bits": b, "mode": m, "shape": [...], "dtype": "F32",
"codes_per_byte": k}}`` in state-dict order (``dtype`` is the original
dtype as a safetensors dtype name: ``F32``, ``F16``, ``BF16`` or ``F64``).

Files are written atomically by :func:`squant_rs.formats.output.atomic_output`
(a temporary file in the target directory, then ``os.replace``; symlinks
followed, permissions kept, special files refused): an error or a signal
never leaves a partial file behind.

This module reads and writes safetensors itself (numpy only), so the numpy
API and the CLI work without torch and without the ``safetensors`` package,
and a damaged file is reported as :class:`FormatError` rather than as a
library traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np

from .. import _squant_rs as _native
from .._squant_rs import InvalidArgumentError, __version__
from ..errors import FormatError
from ..model.layers import (
    ProgressFn,
    check_patterns,
    matches_any,
    quantize_layer_weight,
    relative_error,
    select_layers,
    warn_unmatched,
)
from ..model.report import LayerReport, QuantReport
from ..tensor.packing import codes_per_byte, pack_codes, packed_size, unpack_codes
from ..tensor.quantized import _is_torch_tensor
from ..tensor.validate import (
    QUANTIZERS,
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_mode,
    check_quantizer,
    check_threads,
)
from ..torch.adapter import cast_dequantized, require_torch
from .output import atomic_output

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FormatError",
    "QuantizedFileInfo",
    "RawTensor",
    "TensorInfo",
    "inspect_quantized",
    "load_quantized",
    "read_safetensors",
    "save_quantized",
    "write_safetensors",
]

FORMAT_NAME = "squant-rs"
FORMAT_VERSION = "1"
#: Suffixes of the three tensors that hold one quantized weight.
CODES, SCALE, ZERO_POINT = ":codes", ":scale", ":zero_point"
DEFAULT_INCLUDE: tuple[str, ...] = ("*weight",)

_MAX_HEADER = 100 * 1024 * 1024  # as the safetensors library


# --------------------------------------------------------------------------
# dtypes

#: safetensors dtype name -> (item size, numpy dtype or None when numpy has none)
_DTYPES: dict[str, tuple[int, str | None]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<f2"),
    "BF16": (2, None),
    "F8_E4M3": (1, None),
    "F8_E5M2": (1, None),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U64": (8, "<u8"),
    "U32": (4, "<u4"),
    "U16": (2, "<u2"),
    "U8": (1, "u1"),
    "BOOL": (1, "?"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

_TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def _torch_dtype(name: str) -> Any:
    torch = require_torch()
    return getattr(torch, _TORCH_NAMES[name])


def _dtype_of_torch(t: torch.Tensor) -> str:
    torch = require_torch()
    for name, attr in _TORCH_NAMES.items():
        if getattr(torch, attr, None) == t.dtype:
            return name
    raise UnsupportedDtypeError(f"tensor dtype {t.dtype} cannot be stored in safetensors")


def _dtype_of_numpy(dtype: np.dtype[Any]) -> str:
    for name, (_, np_name) in _DTYPES.items():
        if np_name is not None and np.dtype(np_name) == dtype.newbyteorder("<"):
            return name
    raise UnsupportedDtypeError(f"array dtype {dtype} cannot be stored in safetensors")


# --------------------------------------------------------------------------
# Raw tensors and the safetensors container


@dataclass(frozen=True, eq=False)
class RawTensor:
    """One tensor as stored: safetensors dtype name, shape and its
    little-endian C-order bytes (1-D ``uint8``)."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @classmethod
    def from_numpy(cls, a: np.ndarray) -> RawTensor:
        arr = np.asarray(a)
        name = _dtype_of_numpy(arr.dtype)
        le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return cls(name, tuple(int(d) for d in arr.shape), le.reshape(-1).view(np.uint8))

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> RawTensor:
        torch = require_torch()
        if t.layout != torch.strided or t.is_quantized:
            raise UnsupportedDtypeError(f"cannot store a {t.layout} / quantized tensor")
        name = _dtype_of_torch(t)
        host = t.detach().to("cpu").contiguous().reshape(-1)
        if sys.byteorder != "little":  # pragma: no cover
            raise UnsupportedDtypeError("big-endian hosts are not supported")
        data = host.view(torch.uint8).numpy()
        return cls(name, tuple(int(d) for d in t.shape), data)

    @classmethod
    def from_any(cls, value: Any, key: str) -> RawTensor:
        if isinstance(value, RawTensor):
            return value
        if _is_torch_tensor(value):
            return cls.from_torch(value)
        if isinstance(value, (np.ndarray, np.generic)):
            return cls.from_numpy(np.asarray(value))
        raise InvalidArgumentError(
            f"state dict entry {key!r} is a {type(value).__name__}, not a tensor or array"
        )

    def _typed(self, np_name: str) -> np.ndarray:
        # ``data`` may sit at any offset of a file buffer: view, then copy
        # only when unaligned.
        arr = self.data.view(np_name)
        return np.require(arr, requirements=["A", "C"]).reshape(self.shape)

    def to_float32(self) -> np.ndarray:
        """The values as an aligned float32 array (exact for every float dtype)."""
        if self.dtype == "BF16":
            bits = self._typed("<u2").astype(np.uint32) << np.uint32(16)
            return bits.view(np.float32)
        if self.dtype not in FLOAT_DTYPES:
            raise UnsupportedDtypeError(f"{self.dtype} is not a floating dtype")
        np_name = _DTYPES[self.dtype][1]
        assert np_name is not None
        return np.asarray(self._typed(np_name), dtype=np.float32)

    def to_numpy(self) -> np.ndarray:
        np_name = _DTYPES[self.dtype][1]
        if np_name is None:
            raise UnsupportedDtypeError(f"numpy has no {self.dtype} dtype: use torch")
        return self._typed(np_name).astype(np_name, copy=True)

    def to_torch(self) -> torch.Tensor:
        require_torch()
        import torch

        buf = torch.from_numpy(self.data.copy())
        if self.dtype != "U8":
            buf = buf.view(_torch_dtype(self.dtype))
        return buf.reshape(self.shape)


def _fail(path: str | os.PathLike[str], what: str) -> FormatError:
    return FormatError(f"{os.fspath(path)}: {what}")


@dataclass(frozen=True)
class _Entry:
    """One tensor as the header describes it: dtype, shape and byte span
    in the data region."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(
    f: IO[bytes], path: str | os.PathLike[str]
) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """Read and validate the header of the safetensors file open as ``f``:
    ``(entries in header order, metadata, size of the data region)``. Reads
    only the 8-byte length and the JSON header (the data region is checked
    against the file size, not read)."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise _fail(path, f"not a safetensors file ({size} bytes, too short for a header)")
    n = int.from_bytes(head, "little")
    if n < 2 or n > _MAX_HEADER:
        raise _fail(path, "not a safetensors file (no valid header length)")
    if 8 + n > size:
        raise _fail(
            path,
            f"truncated or not a safetensors file (header of {n} bytes, file has {size} bytes)",
        )
    raw_header = f.read(n)
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(path, "not a safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "corrupt header (__metadata__ must map strings to strings)")

    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise _fail(path, f"corrupt header entry for {key!r}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _fail(path, f"tensor {key!r} has an unsupported dtype {dtype!r}")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise _fail(path, f"corrupt header entry for {key!r}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _DTYPES[dtype][0]:
            raise _fail(path, f"corrupt header: tensor {key!r} size does not match its shape")
        entries[key] = _Entry(dtype, tuple(shape), begin, end)

    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            key = next(k for k, v in entries.items() if v is e)
            raise _fail(path, f"corrupt header: data of {key!r} overlaps or leaves a gap")
        pos = e.end
    data_size = size - 8 - n
    if data_size < pos:
        raise _fail(
            path,
            f"truncated file ({data_size} of {pos} bytes of tensor data present)",
        )
    if data_size > pos:
        raise _fail(
            path, f"corrupt file ({data_size - pos} unexpected bytes after the tensor data)"
        )
    return entries, dict(metadata), pos


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Read and validate a safetensors file: ``(tensors in header order,
    metadata)``. Raises :class:`FormatError` for anything that is not a
    well-formed safetensors file (and ``OSError`` when it cannot be read)."""
    with open(path, "rb") as f:
        entries, metadata, data_size = _read_header(f, path)
        data = np.fromfile(f, dtype=np.uint8, count=data_size)
    if data.size != data_size:  # the file shrank while being read
        raise _fail(
            path, f"truncated file ({data.size} of {data_size} bytes of tensor data present)"
        )
    tensors = {k: RawTensor(e.dtype, e.shape, data[e.begin : e.end]) for k, e in entries.items()}
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, RawTensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a safetensors file atomically; returns its size in bytes.

    The header lists the tensors in the given order; their data is laid out
    by decreasing item size so every tensor is aligned to its item size."""
    layout = sorted(tensors, key=lambda k: -_DTYPES[tensors[k].dtype][0])
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for key in layout:
        offsets[key] = (pos, pos + tensors[key].nbytes)
        pos += tensors[key].nbytes
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for key, t in tensors.items():
        if key == "__metadata__":
            raise InvalidArgumentError("'__metadata__' cannot be a tensor name")
        header[key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(offsets[key])}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    def write(f: IO[bytes]) -> None:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for key in layout:
            f.write(np.ascontiguousarray(tensors[key].data).data)

    with atomic_output(path) as f:
        write(f)
    return 8 + len(blob) + pos


# --------------------------------------------------------------------------
# Export


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(x.detach().cpu().numpy())


def _quantized_entries(
    name: str,
    weight: Any,
    dtype: str,
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> tuple[dict[str, RawTensor], dict[str, Any], LayerReport]:
    qt, ms = quantize_layer_weight(name, weight, bits, mode, backend, threads, quantizer)
    err = relative_error(weight, qt.dequantize(threads))
    codes = np.ascontiguousarray(_as_numpy(qt.codes))
    scale = np.ascontiguousarray(_as_numpy(qt.scale), dtype=np.float32)
    zp = np.ascontiguousarray(_as_numpy(qt.zero_point), dtype=np.float32)
    shape = tuple(int(d) for d in weight.shape)
    entries = {
        name + CODES: RawTensor("U8", (packed_size(codes.size, bits),), pack_codes(codes, bits)),
        name + SCALE: RawTensor.from_numpy(scale),
        name + ZERO_POINT: RawTensor.from_numpy(zp),
    }
    meta = {
        "bits": bits,
        "mode": mode,
        "shape": list(shape),
        "dtype": dtype,
        "codes_per_byte": codes_per_byte(bits),
    }
    if quantizer != "asymmetric":  # absent: asymmetric (files of earlier versions)
        meta["quantizer"] = quantizer
    rep = LayerReport(
        name=name,
        shape=shape,
        params=math.prod(shape),
        time_ms=ms,
        rel_error=err,
        k_flips=qt.k_flips,
        c_flips=qt.c_flips,
        bits=bits,
        kind="weight",
    )
    return entries, meta, rep


def _float_ndim(value: Any) -> tuple[bool, int, int]:
    """(is floating, ndim, numel) of a tensor-like value."""
    if isinstance(value, RawTensor):
        return value.is_float, len(value.shape), value.numel
    if _is_torch_tensor(value):
        return bool(value.is_floating_point()), int(value.dim()), int(value.numel())
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "f", value.ndim, int(value.size)
    return False, 0, 0


IncludeSpec = Union[str, Sequence[str], Callable[[str], bool], None]


def select_state_dict(
    state_dict: Mapping[str, Any], include: IncludeSpec = None, skip: Sequence[str] = ()
) -> list[str]:
    """Keys of a plain state dict that :func:`save_quantized` quantizes: every
    floating tensor of 2+ dimensions (and at least one element) whose key
    matches ``include`` (fnmatch patterns, default ``"*weight"``, or a
    predicate on the key) and matches no ``skip`` pattern. A skip pattern is
    tried on the key and on the key without its ``.weight`` suffix (the
    module name), so ``skip=("fc",)`` works for models and state dicts."""
    if callable(include):
        pred: Callable[[str], bool] = include
    else:
        pats = check_patterns(include, "include") if include is not None else DEFAULT_INCLUDE

        def pred(key: str) -> bool:
            return matches_any(key, pats)

    chosen = []
    for key, value in state_dict.items():
        is_float, ndim, numel = _float_ndim(value)
        if not (is_float and ndim >= 2 and numel > 0 and pred(key)):
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else key
        if matches_any(key, skip) or matches_any(module, skip):
            continue
        chosen.append(key)
    return chosen


def _export(
    entries: Mapping[str, Any],
    selected: Mapping[str, Any],
    path: str | os.PathLike[str],
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    skipped: list[str],
    progress: ProgressFn | None,
    wall_start: float,
    quantizer: str = "asymmetric",
) -> QuantReport:
    """Quantize ``selected`` (key -> weight to quantize) and write every entry."""
    out: dict[str, RawTensor] = {}
    qmeta: dict[str, Any] = {}
    layers: list[LayerReport] = []
    size_before = 0
    total = len(selected)
    for key, value in entries.items():
        if key in selected:
            if progress is not None:
                progress(len(layers), total, key)
            weight = selected[key]
            if isinstance(weight, RawTensor):
                dtype = weight.dtype
                size_before += weight.nbytes
                weight = weight.to_float32()
            elif _is_torch_tensor(weight):
                dtype = _dtype_of_torch(weight)
                size_before += weight.numel() * weight.element_size()
            else:
                dtype = _dtype_of_numpy(np.asarray(weight).dtype)
                size_before += np.asarray(weight).nbytes
            parts, meta, rep = _quantized_entries(
                key, weight, dtype, bits, mode, backend, threads, quantizer
            )
            for part in parts:
                if part in entries:
                    raise InvalidArgumentError(
                        f"cannot quantize {key!r}: the state dict already has a tensor "
                        f"named {part!r}"
                    )
            out.update(parts)
            qmeta[key] = meta
            layers.append(rep)
        else:
            raw = RawTensor.from_any(value, key)
            size_before += raw.nbytes
            out[key] = raw
    if progress is not None:
        progress(total, total, "")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "squant_rs_version": __version__,
        "quantized": json.dumps(qmeta, separators=(",", ":")),
    }
    size_after = write_safetensors(path, out, metadata)
    return QuantReport(
        layers=layers,
        wbits=bits,
        mode=mode,
        wall_ms=(time.perf_counter() - wall_start) * 1e3,
        skipped=skipped,
        size_before=size_before,
        size_after=size_after,
        quantizer=quantizer,
    )


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def save_quantized(
    model_or_state_dict: nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    wbits: int = 4,
    mode: str = "squant",
    *,
    skip: str | Sequence[str] = (),
    include: IncludeSpec = None,
    backend: str = "auto",
    threads: int | None = None,
    progress: ProgressFn | None = None,
    quantizer: str = "asymmetric",
) -> QuantReport:
    """Quantize a (float) model or state dict with SQuant and write a packed
    squant-rs safetensors file (format: see the module doc). Returns the
    per-layer :class:`QuantReport` with the sizes before and after.

    For an ``nn.Module``, exactly the weights :func:`quantize_model` would
    quantize with the same ``skip`` are quantized, with the same codes, so
    ``load_quantized(path)`` equals ``quantize_model(model, ...).state_dict()``
    bit for bit. For a state dict (torch tensors or numpy arrays), see
    :func:`select_state_dict` for ``include``/``skip``. Everything else is
    stored unchanged. ``quantizer`` (``"asymmetric"`` or ``"symmetric"``, as
    in :func:`quantize_tensor`) is recorded per tensor in the file's
    metadata; files without it are asymmetric. The file is written
    atomically by :func:`squant_rs.formats.output.atomic_output` (symlinks
    followed, permissions kept; a FIFO or device path raises
    :class:`InvalidArgumentError`)."""
    wall = time.perf_counter()
    bits = check_bits(wbits, "wbits")
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    backend = check_backend(backend)
    threads = check_threads(threads)
    patterns = check_patterns(skip, "skip")

    if _is_module(model_or_state_dict):
        if include is not None:
            raise InvalidArgumentError(
                "include applies to state dicts; for a model use skip= (module name patterns)"
            )
        model: nn.Module = model_or_state_dict  # type: ignore[assignment]
        layers, skipped = select_layers(model, patterns)
        chosen = {id(module.weight) for _, module in layers}
        # Every state-dict entry holding a chosen weight: shared modules and
        # tied parameters appear under several names.
        variables = model.state_dict(keep_vars=True)
        entries = {k: v.detach() if _is_torch_tensor(v) else v for k, v in variables.items()}
        selected: dict[str, Any] = {k: entries[k] for k, v in variables.items() if id(v) in chosen}
    elif isinstance(model_or_state_dict, Mapping):
        entries = dict(model_or_state_dict)
        for key in entries:
            if not isinstance(key, str):
                raise InvalidArgumentError(f"state dict keys must be strings, got {key!r}")
        keys = select_state_dict(entries, include, patterns)
        modules = [k[: -len(".weight")] for k in entries if k.endswith(".weight")]
        warn_unmatched(patterns, [*entries, *modules], "tensor", stacklevel=2)
        if not keys and not select_state_dict(entries, include, ()):
            warnings.warn(
                "the state dict has no tensor to quantize (none is a floating tensor of "
                "2+ dimensions matching include)",
                UserWarning,
                stacklevel=2,
            )
        selected = {k: entries[k] for k in keys}
        skipped = []
    else:
        raise TypeError(
            "save_quantized expects a torch.nn.Module or a state dict (a mapping of "
            f"names to tensors), got {type(model_or_state_dict).__name__}"
        )
    return _export(
        entries, selected, path, bits, mode, backend, threads, skipped, progress, wall, quantizer
    )


# --------------------------------------------------------------------------
# Import


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor of a squant-rs file."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    #: ``None`` for tensors stored unchanged.
    bits: int | None
    mode: str | None
    #: Bytes stored in the file (codes + scale + zero point when quantized).
    stored_bytes: int
    #: ``"asymmetric"`` or ``"symmetric"`` for quantized tensors.
    quantizer: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def float32_bytes(self) -> int:
        """Size of the same tensor as float32 (floating tensors), else as stored."""
        if self.bits is not None or self.dtype in FLOAT_DTYPES:
            return 4 * self.numel
        return self.stored_bytes


@dataclass(frozen=True)
class QuantizedFileInfo:
    """What :func:`inspect_quantized` finds in a squant-rs file."""

    path: str
    file_size: int
    format_version: str
    writer_version: str
    tensors: list[TensorInfo]

    @property
    def quantized(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.bits is not None]

    @property
    def float32_size(self) -> int:
        return sum(t.float32_bytes for t in self.tensors)


@dataclass(frozen=True)
class _QEntry:
    bits: int
    mode: str
    shape: tuple[int, ...]
    dtype: str
    quantizer: str = "asymmetric"


def _parse_metadata(
    path: str | os.PathLike[str],
    tensors: Mapping[str, RawTensor | _Entry],
    metadata: Mapping[str, str],
) -> dict[str, _QEntry]:
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(path, "not a squant-rs file (a safetensors file without squant-rs metadata)")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            path,
            f"unsupported squant-rs format version {version!r} "
            f"(this squant-rs {__version__} reads version {FORMAT_VERSION})",
        )
    try:
        table = json.loads(metadata.get("quantized", "{}"))
    except (ValueError, RecursionError):
        raise _fail(path, "corrupt squant-rs metadata (not valid JSON)") from None
    if not isinstance(table, dict):
        raise _fail(path, "corrupt squant-rs metadata (not a JSON object)")
    out: dict[str, _QEntry] = {}
    for name, info in table.items():
        try:
            bits, mode = info["bits"], info["mode"]
            shape, dtype = tuple(info["shape"]), info["dtype"]
            quantizer = info.get("quantizer", "asymmetric")  # older files: asymmetric
            ok = (
                quantizer in QUANTIZERS
                and type(bits) is int
                and 2 <= bits <= 8
                and isinstance(mode, str)
                and len(shape) >= 2
                and all(type(d) is int and d > 0 for d in shape)
                and dtype in FLOAT_DTYPES
            )
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise _fail(path, f"corrupt squant-rs metadata for {name!r}")
        entry = _QEntry(bits, mode, shape, dtype, quantizer)
        codes = tensors.get(name + CODES)
        scale = tensors.get(name + SCALE)
        zp = tensors.get(name + ZERO_POINT)
        if codes is None or scale is None or zp is None:
            raise _fail(
                path, f"quantized tensor {name!r} is missing its codes, scale or zero point"
            )
        oc = shape[0]
        if (
            codes.dtype != "U8"
            or codes.shape != (packed_size(math.prod(shape), bits),)
            or scale.dtype != "F32"
            or scale.shape != (oc,)
            or zp.dtype != "F32"
            or zp.shape != (oc,)
        ):
            raise _fail(
                path, f"quantized tensor {name!r} has codes, scale or zero point of the wrong size"
            )
        out[name] = entry
    return out


def inspect_quantized(path: str | os.PathLike[str]) -> QuantizedFileInfo:
    """Describe a squant-rs file (no torch needed). Reads only the header,
    not the tensor data. Raises :class:`FormatError` for anything that is
    not a valid squant-rs file."""
    with open(path, "rb") as f:
        tensors, metadata, _ = _read_header(f, path)
    table = _parse_metadata(path, tensors, metadata)
    infos: list[TensorInfo] = []
    parts = {n + suffix for n in table for suffix in (CODES, SCALE, ZERO_POINT)}
    for key, raw in tensors.items():
        if key.endswith(CODES) and key[: -len(CODES)] in table:
            name = key[: -len(CODES)]
            q = table[name]
            stored = raw.nbytes + tensors[name + SCALE].nbytes + tensors[name + ZERO_POINT].nbytes
            infos.append(TensorInfo(name, q.shape, q.dtype, q.bits, q.mode, stored, q.quantizer))
        elif key not in parts:
            infos.append(TensorInfo(key, raw.shape, raw.dtype, None, None, raw.nbytes))
    return QuantizedFileInfo(
        path=os.fspath(path),
        file_size=os.path.getsize(path),
        format_version=metadata.get("format_version", ""),
        writer_version=metadata.get("squant_rs_version", "unknown"),
        tensors=infos,
    )


def _dequantize(
    path: str | os.PathLike[str], name: str, q: _QEntry, tensors: Mapping[str, RawTensor]
) -> torch.Tensor:
    require_torch()
    import torch

    try:
        codes = unpack_codes(tensors[name + CODES].data, q.bits, math.prod(q.shape))
    except InvalidArgumentError as exc:
        raise _fail(path, f"corrupt codes for {name!r} ({exc})") from None
    scale = tensors[name + SCALE].to_numpy()
    zp = tensors[name + ZERO_POINT].to_numpy()
    if not (np.isfinite(scale).all() and (scale > 0).all() and np.isfinite(zp).all()):
        raise _fail(path, f"corrupt scale or zero point for {name!r}")
    # A bad SQUANT_NUM_THREADS is reported as itself, not as a corrupt file.
    threads = check_threads(None)
    # The Rust loop behind QuantizedTensor.dequantize: bit-exact with it.
    try:
        w = _native.dequantize(
            codes.reshape(q.shape),
            np.ascontiguousarray(scale, dtype=np.float32),
            np.ascontiguousarray(zp, dtype=np.float32),
            threads,
        )
    except InvalidArgumentError as exc:
        raise _fail(path, f"corrupt scale or zero point for {name!r} ({exc})") from None
    return cast_dequantized(torch.from_numpy(w), _torch_dtype(q.dtype))


def load_quantized(
    path: str | os.PathLike[str], *, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Read a squant-rs file back as a float state dict (torch tensors, on
    ``device``, default CPU), ready for ``model.load_state_dict``. The
    quantized weights equal :func:`quantize_model`'s bit for bit.

    Raises :class:`FormatError` when the file is not safetensors, is
    truncated or corrupt, or has an unsupported format version."""
    require_torch()
    tensors, metadata = read_safetensors(path)
    table = _parse_metadata(path, tensors, metadata)
    parts = {n + suffix for n in table for suffix in (CODES, SCALE, ZERO_POINT)}
    out: dict[str, torch.Tensor] = {}
    for key, raw in tensors.items():
        if key.endswith(CODES) and key[: -len(CODES)] in table:
            name = key[: -len(CODES)]
            out[name] = _dequantize(path, name, table[name], tensors)
        elif key not in parts:
            out[key] = raw.to_torch()
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
