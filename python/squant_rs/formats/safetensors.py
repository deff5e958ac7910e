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

``checksums`` (written by this version; files without it still load):
a JSON object ``{STORED_NAME: "xxxxxxxx"}``, the CRC32C of every stored
tensor's bytes as 8 hex digits; verified on load (``verify=True``) and by
``squant-rs info --verify``. ``quantizer`` (optional, default
``"asymmetric"``). The full description and the version rules are in
``docs/format.md``.

Files are written atomically (a temporary file in the target directory,
written and synced by the Rust writer, then given the target's permissions
and renamed over it: :func:`~squant_rs.formats.output.staged_output`) under
the rules of :mod:`squant_rs.formats.output` (output never the input,
symlinks followed, permissions kept, special files refused, SIGTERM/SIGHUP
cleaned up): an error or a signal never leaves a partial file behind.

Reading, quantizing from files, packing and writing happen in Rust (crate
``squant-io`` on the ``safetensors`` crate): files are memory-mapped and
processed a block at a time, and a damaged file is reported as
:class:`FormatError`. The numpy API and the CLI need neither torch nor the
``safetensors`` Python package.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .. import _squant_rs as _native
from .._squant_rs import InvalidArgumentError
from ..errors import FormatError
from ..model.layers import (
    ATTENTION_PROJECTIONS,
    ProgressFn,
    check_patterns,
    matches_any,
    plan_layers,
    quantize_layer_weight,
    quantized_relative_error,
    warn_unmatched,
)
from ..model.report import LayerReport, QuantReport
from ..tensor.quantized import _is_torch_tensor
from ..tensor.validate import (
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_mode,
    check_quantizer,
    check_threads,
)
from ..torch.adapter import require_torch
from .output import _cleanup_on_signals, check_output, staged_output

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointResult",
    "FormatError",
    "QuantizedFileInfo",
    "RawTensor",
    "TensorInfo",
    "inspect_quantized",
    "is_sharded",
    "load_quantized",
    "quantize_checkpoint",
    "read_safetensors",
    "save_quantized",
    "verify_quantized",
    "write_safetensors",
]

FORMAT_NAME = "squant-rs"
FORMAT_VERSION = "1"
#: Suffixes of the three tensors that hold one quantized weight.
CODES, SCALE, ZERO_POINT = ":codes", ":scale", ":zero_point"
DEFAULT_INCLUDE: tuple[str, ...] = ("*weight",)

# A quantize_checkpoint still running in a daemon thread when the
# interpreter exits is stopped and its temporary output removed.
atexit.register(_native.io_at_exit)


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
#: The torch dtypes (names without ``torch.``) of FLOAT_DTYPES.
_QUANTIZABLE_TORCH = frozenset({"float64", "float32", "float16", "bfloat16"})

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
        if t.is_quantized:
            raise UnsupportedDtypeError(f"cannot store a quantized tensor ({t.dtype})")
        if t.layout != torch.strided:
            raise UnsupportedDtypeError(f"cannot store a {t.layout} tensor")
        if t.is_meta:
            raise InvalidArgumentError(
                "cannot store a meta tensor (a shape without values): load the weights first"
            )
        name = _dtype_of_torch(t)
        # resolve_neg / resolve_conj: a lazily negated view (torch._neg_view,
        # x.conj().imag) cannot be reinterpreted as bytes as it is.
        host = t.detach().to("cpu").resolve_neg().resolve_conj().contiguous().reshape(-1)
        if sys.byteorder != "little":  # pragma: no cover
            raise UnsupportedDtypeError("big-endian hosts are not supported")
        data = host.view(torch.uint8).numpy()
        return cls(name, tuple(int(d) for d in t.shape), data)

    @classmethod
    def from_any(cls, value: Any, key: str) -> RawTensor:
        if isinstance(value, RawTensor):
            return value
        try:
            if _is_torch_tensor(value):
                return cls.from_torch(value)
            if isinstance(value, (np.ndarray, np.generic)):
                return cls.from_numpy(np.asarray(value))
        except (UnsupportedDtypeError, InvalidArgumentError) as exc:
            raise type(exc)(f"state dict entry {key!r}: {exc}") from None
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


def read_safetensors(
    path: str | os.PathLike[str], *, data: bool = True
) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Read and validate a safetensors file: ``(tensors in header order,
    metadata)``. Every tensor's bytes are copied into memory (a helper for
    small files and tests: the quantize and load paths map the file lazily);
    with ``data=False`` only the header is read and every ``RawTensor.data``
    is empty (dtypes and shapes only).

    Returns:
        The tensors by name and the ``__metadata__`` strings.

    Raises:
        FormatError: anything that is not a well-formed safetensors file.
        OSError: the file cannot be read.
    """
    entries, metadata = _native.io_read_safetensors(os.fspath(path), data)
    tensors = {name: RawTensor(dtype, tuple(shape), data) for name, dtype, shape, data in entries}
    return tensors, dict(metadata)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, RawTensor],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write a plain safetensors file atomically (a temporary file in the
    target directory, then a rename); the header lists the tensors in the
    given order, their data laid out by decreasing item size so every tensor
    is aligned to its item size. No checksums are added.

    Returns:
        The file's size in bytes.

    Raises:
        InvalidArgumentError: a tensor named ``__metadata__`` or twice, or
            too large (a shape numpy could not make, or data past 2^62
            bytes in all).
        OSError: the file cannot be written (nothing is left behind).
    """
    items = [(_utf8_name(key), t.dtype, list(t.shape)) for key, t in tensors.items()]
    values = list(tensors.values())
    meta = [(str(k), str(v)) for k, v in (metadata or {}).items()]

    def data(i: int) -> np.ndarray:  # asked for tensor by tensor during the write
        return np.ascontiguousarray(values[i].data, dtype=np.uint8).reshape(-1)

    with _output(path) as target:
        return int(_native.io_write_safetensors(target, items, meta, data))


#: The extension of every squant-rs file (the CLIs' and the functions'
#: output rule: the format follows the extension).
SQUANT_EXTENSION = ".safetensors"


def check_squant_extension(path: str | os.PathLike[str]) -> None:
    """Refuse a squant-rs output whose extension is not ``.safetensors``
    (any case), in the CLI's words.

    Raises:
        InvalidArgumentError: naming the path and the rule.
    """
    name = os.fspath(path)
    suffix = os.path.splitext(name)[1]
    if suffix.lower() != SQUANT_EXTENSION:
        raise InvalidArgumentError(
            f"output {name}: the output format is chosen by the file extension and "
            f"{suffix or 'no extension'!r} is not one squant-rs writes (use {SQUANT_EXTENSION})"
        )


@contextmanager
def _output(
    path: str | os.PathLike[str], inputs: Sequence[str] = (), *, squant_file: bool = False
) -> Iterator[str]:
    """The output rules of :func:`squant_rs.formats.output.atomic_output` for
    a file the Rust writer writes (atomically itself) through
    :func:`~squant_rs.formats.output.staged_output`: checks ``path``
    (:func:`~squant_rs.formats.output.check_output`) and yields the path the
    writer is to write, a temporary file next to the target; at the end that
    file gets an existing target's permission bits and replaces it (a
    signal or error before then leaves the target untouched). ``squant_file``:
    a squant-rs file, whose path must end in ``.safetensors``
    (:func:`check_squant_extension`, checked after the rules above)."""
    check_output(path, inputs=inputs)  # first, as the other outputs' rules
    if squant_file:
        check_squant_extension(path)
    with staged_output(path, inputs=inputs) as tmp:
        yield tmp


def _utf8_name(key: str) -> str:
    """``key`` if it can be stored (UTF-8 text), else InvalidArgumentError."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"tensor name {key!r} is not valid Unicode text (it cannot be stored as UTF-8)"
        ) from None
    return key


# --------------------------------------------------------------------------
# Export


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(x.detach().cpu().numpy())


def _layer_report(
    name: str,
    weight: Any,
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    quantizer: str = "asymmetric",
) -> tuple[Any, LayerReport]:
    qt, ms = quantize_layer_weight(name, weight, bits, mode, backend, threads, quantizer)
    err = quantized_relative_error(weight, qt, threads)
    shape = tuple(int(d) for d in weight.shape)
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
    return qt, rep


def _describe(value: Any, key: str) -> tuple[str, tuple[int, ...], int]:
    """(safetensors dtype, shape, stored bytes) of a state-dict value,
    without copying it."""
    if isinstance(value, RawTensor):
        return value.dtype, value.shape, value.nbytes
    if _is_torch_tensor(value):
        shape = tuple(int(d) for d in value.shape)
        return _dtype_of_torch(value), shape, int(value.numel()) * int(value.element_size())
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        return _dtype_of_numpy(arr.dtype), tuple(int(d) for d in arr.shape), int(arr.nbytes)
    raise InvalidArgumentError(
        f"state dict entry {key!r} is a {type(value).__name__}, not a tensor or array"
    )


def _float_ndim(value: Any) -> tuple[bool, int, int]:
    """(quantizable float dtype, ndim, numel) of a tensor-like value: the
    float dtypes of :data:`FLOAT_DTYPES` (float64, float32, float16,
    bfloat16), as the Rust CLI selects them; other floats (float8, numpy's
    longdouble) are not quantizable and are kept as they are."""
    if isinstance(value, RawTensor):
        return value.is_float, len(value.shape), value.numel
    if _is_torch_tensor(value):
        is_float = str(value.dtype).removeprefix("torch.") in _QUANTIZABLE_TORCH
        return is_float, int(value.dim()), int(value.numel())
    if isinstance(value, np.ndarray):
        is_float = value.dtype.kind == "f" and value.dtype.itemsize in (2, 4, 8)
        return is_float, value.ndim, int(value.size)
    return False, 0, 0


IncludeSpec = Union[str, Sequence[str], Callable[[str], bool], None]


def select_state_dict(
    state_dict: Mapping[str, Any], include: IncludeSpec = None, skip: Sequence[str] = ()
) -> list[str]:
    """Keys of a plain state dict that :func:`save_quantized` quantizes: every
    float64, float32, float16 or bfloat16 tensor of 2+ dimensions (and at
    least one element; other dtypes, float8 included, are stored as they
    are) whose key matches ``include`` (fnmatch patterns, default
    ``"*weight"``, or a predicate on the key) and matches no ``skip``
    pattern. A skip pattern is
    tried on the key and on its layer name (:func:`layer_name`: the key
    without ``.weight``, or ``attn.in_proj`` for ``attn.in_proj_weight``),
    so ``skip=("fc", "attn.in_proj")`` works for models and state dicts."""
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
        if matches_any(key, skip) or matches_any(layer_name(key), skip):
            continue
        chosen.append(key)
    return chosen


def layer_name(key: str) -> str:
    """The layer name of a state-dict key, as ``quantize_model`` names the
    layer: ``fc.weight`` -> ``fc``, ``attn.in_proj_weight`` ->
    ``attn.in_proj`` (a skip pattern is tried on both the key and this);
    other keys as they are."""
    if key.endswith(".weight"):
        return key[: -len(".weight")]
    # an attention's projection, stored as <attention>.in_proj_weight
    if key.rpartition(".")[2] in ATTENTION_PROJECTIONS:
        return key[: -len("_weight")]
    return key


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
    """Quantize ``selected`` (key -> weight to quantize) and write every
    entry, one tensor at a time, through the Rust writer (codes packed and
    checksummed there; the file is written atomically)."""
    plan: list[tuple[str, str, list[int], int | None, str | None]] = []
    size_before = 0
    for key, value in entries.items():
        try:
            dtype, shape, nbytes = _describe(selected.get(key, value), key)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"state dict entry {key!r}: {exc}") from None
        size_before += nbytes
        if key in selected:
            plan.append((_utf8_name(key), dtype, list(shape), bits, mode))
        else:
            plan.append((_utf8_name(key), dtype, list(shape), None, None))
    with _output(path, squant_file=True) as target:
        writer = _native.QuantizedFileWriter(target, plan, quantizer)
        layers, size_after = _write_all(
            writer, entries, selected, bits, mode, backend, threads, progress, quantizer
        )
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


def _write_all(
    writer: _native.QuantizedFileWriter,
    entries: Mapping[str, Any],
    selected: Mapping[str, Any],
    bits: int,
    mode: str,
    backend: str,
    threads: int | None,
    progress: ProgressFn | None,
    quantizer: str,
) -> tuple[list[LayerReport], int]:
    """Every entry into ``writer``, quantized or as stored; (layers, file size)."""
    layers: list[LayerReport] = []
    total = len(selected)
    try:
        for i, (key, value) in enumerate(entries.items()):
            if key in selected:
                if progress is not None:
                    progress(len(layers), total, key)
                weight = selected[key]
                if isinstance(weight, RawTensor):
                    weight = weight.to_float32()
                qt, rep = _layer_report(key, weight, bits, mode, backend, threads, quantizer)
                writer.write_quantized(
                    i,
                    np.ascontiguousarray(_as_numpy(qt.codes), dtype=np.int8),
                    np.ascontiguousarray(_as_numpy(qt.scale), dtype=np.float32),
                    np.ascontiguousarray(_as_numpy(qt.zero_point), dtype=np.float32),
                )
                layers.append(rep)
            else:
                raw = RawTensor.from_any(value, key)
                writer.write_plain(i, np.ascontiguousarray(raw.data, dtype=np.uint8))
        if progress is not None:
            progress(total, total, "")
        size_after = int(writer.finish())
    except BaseException:
        writer.abort()
        raise
    return layers, size_after


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
    quantize with the same ``skip`` are quantized, as they are in the model
    (no BatchNorm folding, bias correction or weight range search), so
    ``load_quantized(path)`` equals ``quantize_model(model, ...,
    recipe="paper").state_dict()`` bit for bit. Under quantize_model's
    default ``recipe="squant+"`` that holds only for a model without
    BatchNorm: with BatchNorm it folds the BNs into the weights first (so
    the weights, biases and state-dict keys differ). For a state dict
    (torch tensors or numpy arrays), see :func:`select_state_dict` for
    ``include``/``skip``. Everything else is
    stored unchanged. ``quantizer`` (``"asymmetric"`` or ``"symmetric"``, as
    in :func:`quantize_tensor`) is recorded in the file's ``quantizer``
    metadata key (absent: asymmetric). The file is written atomically by
    the Rust writer under the rules of :mod:`squant_rs.formats.output`
    (symlinks followed, permissions kept; a FIFO or device path raises
    :class:`InvalidArgumentError`, as does a path whose extension is not
    ``.safetensors``: ``out.pth`` is refused, as by the CLI)."""
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
        from ..model.pipeline import check_float_model

        check_float_model(model, "save_quantized")
        plan = plan_layers(model, patterns, stacklevel=2)
        layers, skipped, notes = plan.chosen, plan.skipped, plan.notes
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
        modules = [layer_name(k) for k in entries if layer_name(k) != k]
        warn_unmatched(patterns, [*entries, *modules], "tensor", stacklevel=2)
        if not keys and not select_state_dict(entries, include, ()):
            warnings.warn(
                "the state dict has no tensor to quantize (none is a floating tensor of "
                "2+ dimensions matching include)",
                UserWarning,
                stacklevel=2,
            )
        selected = {k: entries[k] for k in keys}
        skipped, notes = [], []
    else:
        raise TypeError(
            "save_quantized expects a torch.nn.Module or a state dict (a mapping of "
            f"names to tensors), got {type(model_or_state_dict).__name__}"
        )
    report = _export(
        entries, selected, path, bits, mode, backend, threads, skipped, progress, wall, quantizer
    )
    report.notes = list(notes)
    return report


# --------------------------------------------------------------------------
# Checkpoint files (Rust all the way: memory-mapped, block by block)


@dataclass(frozen=True)
class CheckpointResult:
    """What :func:`quantize_checkpoint` did."""

    report: QuantReport
    #: Tensors in the input (all shards).
    tensors: int
    #: Bytes of the input file(s) on disk.
    input_size: int
    #: Number of shards (1 for a single file).
    shards: int


def _report_of(
    raw: Any, bits: int, mode: str, wall_start: float, quantizer: str
) -> tuple[QuantReport, int]:
    layers_raw, tensors, size_before, size_after = raw
    layers = [
        LayerReport(
            name=name,
            shape=tuple(shape),
            params=math.prod(shape),
            time_ms=ms,
            rel_error=err,
            k_flips=kf,
            c_flips=cf,
            bits=bits,
            kind="weight",
        )
        for name, shape, ms, err, kf, cf in layers_raw
    ]
    report = QuantReport(
        layers=layers,
        wbits=bits,
        mode=mode,
        wall_ms=(time.perf_counter() - wall_start) * 1e3,
        size_before=int(size_before),
        size_after=int(size_after),
        quantizer=quantizer,
    )
    return report, int(tensors)


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a sharded checkpoint: a directory holding
    ``model.safetensors.index.json`` (the Hugging Face layout) or that index.

    Returns:
        ``True`` for a sharded checkpoint.
    """
    return bool(_native.io_is_sharded(os.fspath(path)))


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    wbits: int = 4,
    mode: str = "squant",
    *,
    include: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    threads: int | None = None,
    progress: ProgressFn | None = None,
    quantizer: str = "asymmetric",
) -> CheckpointResult:
    """Quantize a safetensors checkpoint on disk into a squant-rs file, or a
    sharded checkpoint (see :func:`is_sharded`) into the directory ``dst``
    (one quantized shard per input shard, index rewritten). Everything runs
    in Rust: tensors are memory-mapped and quantized a block of channels at
    a time, so memory stays bounded whatever the checkpoint's size; output
    is written atomically (no partial file or directory on error). Selection
    as :func:`select_state_dict`. ``progress(done, total, name)`` counts
    input bytes. ``quantizer`` as in :func:`save_quantized` (recorded in
    each output file's metadata when symmetric). A run still going in a
    daemon thread when the interpreter exits is stopped there, its
    temporary output removed.

    Returns:
        A :class:`CheckpointResult` (``squant_rs.CheckpointResult``) with
        the per-layer report.

    Raises:
        FormatError: a damaged input file or shard (named in the message).
        InvalidArgumentError: bad options, nothing to quantize, an input
            that is not a regular file (a FIFO, a device, a directory that
            is not a sharded checkpoint) or already a squant-rs file (or a sharded directory of
            squant-rs shards: the first is named), an output directory that
            exists and is not empty, a single-file output whose extension is
            not ``.safetensors``.
        NonFiniteWeightError, WeightRangeError: a weight cannot be quantized.
        OSError: a file cannot be read or written.
    """
    wall = time.perf_counter()
    bits = check_bits(wbits, "wbits")
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    threads = check_threads(threads)
    inc = list(check_patterns(include, "include")) if include is not None else []
    sk = list(check_patterns(skip, "skip"))
    if is_sharded(src):
        with _cleanup_on_signals():
            raw, shards, input_size = _native.io_quantize_sharded(
                os.fspath(src),
                os.fspath(dst),
                bits,
                mode,
                inc,
                sk,
                threads,
                progress,
                quantizer=quantizer,
            )
        report, tensors = _report_of(raw, bits, mode, wall, quantizer)
        return CheckpointResult(report, tensors, int(input_size), int(shards))
    with _output(dst, inputs=[os.fspath(src)], squant_file=True) as target:
        raw = _native.io_quantize_file(
            os.fspath(src), target, bits, mode, inc, sk, threads, progress, quantizer=quantizer
        )
    report, tensors = _report_of(raw, bits, mode, wall, quantizer)
    return CheckpointResult(report, tensors, os.path.getsize(src), 1)


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
    #: Whether every tensor has a CRC32C checksum (files written before
    #: checksums existed have none).
    has_checksums: bool = False
    #: ``"asymmetric"`` (SQuant) or ``"symmetric"``.
    quantizer: str = "asymmetric"
    #: Whether any tensor has a checksum (of a sharded directory: whether
    #: any shard has them; :attr:`has_checksums` says whether all do).
    some_checksums: bool = False

    @property
    def quantized(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.bits is not None]

    @property
    def float32_size(self) -> int:
        return sum(t.float32_bytes for t in self.tensors)


def inspect_quantized(path: str | os.PathLike[str]) -> QuantizedFileInfo:
    """Describe a squant-rs file or sharded directory from its header(s)
    alone (no tensor data is read; no torch needed).

    Returns:
        A :class:`QuantizedFileInfo` (``squant_rs.QuantizedFileInfo``), its
        tensors :class:`TensorInfo` (``squant_rs.TensorInfo``).

    Raises:
        FormatError: anything that is not a valid squant-rs file.
        InvalidArgumentError: a path that is not a regular file (a FIFO, a
            device, a directory that is not a sharded checkpoint).
        OSError: the file cannot be read (missing, no permission).
    """
    version, writer, size, tensors, checksums, quantizer, some = _native.io_inspect(os.fspath(path))
    infos = [
        TensorInfo(
            name, tuple(shape), dtype, bits, mode, stored, quantizer if bits is not None else None
        )
        for name, shape, dtype, bits, mode, stored in tensors
    ]
    return QuantizedFileInfo(
        path=os.fspath(path),
        file_size=int(size),
        format_version=version,
        writer_version=writer,
        tensors=infos,
        has_checksums=bool(checksums),
        quantizer=quantizer,
        some_checksums=bool(some),
    )


def verify_quantized(path: str | os.PathLike[str], *, threads: int | None = None) -> None:
    """Check a squant-rs file (or sharded directory) completely: every
    tensor's checksum, every code, scale and zero point, without keeping
    anything in memory (``squant-rs info --verify``).

    Raises:
        FormatError: anything that is not a valid squant-rs file, or
            naming the first damaged tensor.
        InvalidArgumentError: a path that is not a regular file (a FIFO, a
            device, a directory that is not a sharded checkpoint), or a bad
            ``threads`` (or ``SQUANT_NUM_THREADS``).
        OSError: the file cannot be read (missing, no permission).
    """
    _native.io_verify(os.fspath(path), check_threads(threads))


def load_quantized(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    verify: bool = True,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """Read a squant-rs file (or a sharded directory written by
    :func:`quantize_checkpoint`) back as a float state dict (torch tensors,
    on ``device``, default CPU), ready for ``model.load_state_dict``. The
    quantized weights equal :func:`quantize_model`'s with ``recipe="paper"``
    bit for bit (see :func:`save_quantized`). Tensors
    are memory-mapped and dequantized in Rust one at a time straight into
    their output buffers. With ``verify`` (default) every tensor's CRC32C
    checksum is checked as it is read (files written before checksums
    existed have none and still load). ``threads`` (default:
    ``SQUANT_NUM_THREADS``, else all CPUs) sets how many threads decode
    the tensors; the result is the same for any count.

    Returns:
        The state dict, in file order.

    Raises:
        FormatError: the file is not safetensors, is truncated or corrupt
            (checksum mismatch, invalid codes, scales or zero points that
            dequantize to non-finite values), or has an unsupported format
            version.
        InvalidArgumentError: a path that is not a regular file (a FIFO, a
            device, a directory that is not a sharded checkpoint), or a bad
            ``threads`` (or ``SQUANT_NUM_THREADS``).
        OSError: the file cannot be read (missing, no permission).
        ImportError: torch is not installed.
    """
    threads = check_threads(threads)
    require_torch()
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, data in _native.io_load(os.fspath(path), bool(verify), threads):
        if data.size == 0:  # (torch cannot view an empty byte array as wider items)
            out[name] = torch.empty(shape, dtype=_torch_dtype(dtype))
            continue
        t = torch.from_numpy(data)
        if dtype != "U8":
            t = t.view(_torch_dtype(dtype))
        out[name] = t.reshape(shape)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
