"""The ``squant-rs`` command line.

::

    squant-rs demo [--depth 50] [--wbits 4] [--mode squant] [--threads N] [--out FILE]
    squant-rs quantize IN OUT [--wbits 4] [--mode squant] [--quantizer asymmetric]
                              [--include PATTERN ...] [--skip PATTERN ...]
                              [--threads N] [-v | -q]
    squant-rs quantize IN.onnx OUT.onnx [--wbits 4] [--abits 8] [--quantizer symmetric]
                              [--integer-kernels] [--quantize-input [LO,HI]] [--skip PATTERN ...]
                              [--input-shape [NAME=]8,3,224,224 ...]
    squant-rs export MODULE:FACTORY OUT.onnx [--weights STATE_DICT.pth]
                              [--input-shape 1,3,224,224] [--batch-dim N|none]
                              [--wbits 4] [--abits 8]
                              [--quantizer symmetric] [--recipe paper|squant+]
                              [--integer-kernels] [--quantize-input [LO,HI]] [--skip PATTERN ...]
    squant-rs info FILE [-v] [--verify [--threads N]]
    squant-rs --version

``demo`` needs numpy only. ``quantize`` reads a ``.safetensors`` file (numpy
only) or a torch checkpoint (``.pt``/``.pth``, loaded with
``torch.load(weights_only=True)``; needs torch) and writes a squant-rs file;
an ``.onnx`` model becomes a QDQ ``.onnx`` model (numpy + onnx, no torch).
Without module information it quantizes every floating tensor of 2+
dimensions whose name ends in ``weight``; ``--include``/``--skip`` take
fnmatch patterns (a skip pattern also matches the layer name: ``fc`` for
``fc.weight``, ``attn.in_proj`` for ``attn.in_proj_weight``);
a pattern that matches nothing gets one ``squant-rs: warning: ...`` line.
``info`` reads only the file's header (``--verify``: every tensor).
``export`` builds a torch model by calling ``FACTORY()`` from ``MODULE``
(imported by module path, the current directory first on ``sys.path``),
loads ``--weights`` with ``torch.load(weights_only=True)`` and
``load_state_dict(strict=True)``, and writes it as a SQuant-quantized QDQ
``.onnx`` model (:func:`squant_rs.export_onnx`; needs torch and onnx).

Output files: the format follows the extension (:data:`OUTPUT_FORMATS`;
today only ``.safetensors``, anything else is refused). The output must not
be the input (same device and inode); it is written atomically, symlinks
followed, permissions kept, special files (FIFOs, devices, ``/dev/stdout``)
refused -- see :mod:`squant_rs.formats.output`. ``--threads N`` overrides
``SQUANT_NUM_THREADS`` for every step of the command; every command that
runs threads (``demo``, ``quantize``, ``export``, ``info --verify``) refuses
a bad ``SQUANT_NUM_THREADS`` with the same message.

Exit status: 0 on success, 2 on bad input (missing, truncated or corrupt
files, unknown formats, bad options or environment, an output that is the
input) with one ``squant-rs: error: ...`` line on stderr and no output file
left behind, 130 when interrupted (SIGTERM and SIGHUP end the process by
that signal, after removing the temporary file; a signal that comes while
the output is renamed into place acts after the rename, and then says so:
``interrupted (after OUT was written)``), 141 (quietly) when stdout
is a pipe closed early, as in ``squant-rs info -v FILE | head``. Names and
metadata are printed with non-printable characters escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn, TextIO

import numpy as np

from ._shapes import he_weights, resnet_shapes
from ._squant_rs import (
    THREADS_ENV_VAR,
    InvalidArgumentError,
    SquantError,
    __version__,
    io_check_input,
    io_shard_files,
)
from .formats.output import check_output, check_regular_input
from .formats.safetensors import (
    FormatError,
    QuantizedFileInfo,
    RawTensor,
    _export,
    inspect_quantized,
    is_sharded,
    quantize_checkpoint,
    read_safetensors,
    select_state_dict,
    verify_quantized,
)
from .model import format_bytes, format_table
from .model.recipe import RECIPES
from .model.report import QuantReport
from .tensor.batch import quantize_tensors
from .tensor.quantized import quantize_tensor
from .tensor.validate import MAX_THREADS, MODES, QUANTIZERS, UnsupportedDtypeError, check_threads
from .torch.adapter import TORCH_INSTALL_HINT

PROG = "squant-rs"
#: Most dimensions a tensor may have (numpy's limit).
MAX_DIMS = 64
#: Exit status when stdout is a pipe that was closed early (128 + SIGPIPE).
EXIT_BROKEN_PIPE = 141

#: Output file extension (lower case) -> the format written there. The CLI
#: chooses the format by the extension and refuses any other extension; a
#: new writer adds its extension here and a branch in the command.
OUTPUT_FORMATS: dict[str, str] = {".safetensors": "safetensors"}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _UsageError(CliError):
    pass


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help that has a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and default is not None
            and default is not argparse.SUPPRESS
            and not isinstance(default, bool)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid bit width {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bit width must be in 2..8, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive integer {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer up to {MAX_THREADS}, got {value}"
        )
    return value


def printable(text: str, stream: TextIO | None = None) -> str:
    """``text`` safe for a terminal: non-printable characters (control and
    escape sequences, newlines, lone surrogates) as ``\\x1b``, ``\\n``,
    ``\\ud800``...; characters the stream's encoding cannot show as
    backslash escapes too."""
    out = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    encoding = getattr(stream if stream is not None else sys.stdout, "encoding", None) or "utf-8"
    try:
        out.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        try:
            out = out.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:
            out = out.encode("ascii", "backslashreplace").decode("ascii")
    return out


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _is_onnx(path: str) -> bool:
    """Whether ``path``'s name ends in ``.onnx`` (in any case, as
    :func:`output_format` takes the others; a file named ``.onnx`` too,
    which has no extension to ``os.path.splitext``)."""
    return path.lower().endswith(".onnx")


def output_format(path: str) -> str:
    """The format to write at ``path``, chosen by its extension
    (:data:`OUTPUT_FORMATS`). Raises :class:`CliError` for any other."""
    suffix = os.path.splitext(path)[1].lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None:
        known = " or ".join(OUTPUT_FORMATS)
        raise CliError(
            f"output {path}: the output format is chosen by the file extension and "
            f"{suffix or 'no extension'!r} is not one squant-rs writes (use {known})"
        )
    return fmt


@contextlib.contextmanager
def _thread_count(requested: int | None) -> Iterator[int]:
    """The command's thread count: ``--threads``, else ``SQUANT_NUM_THREADS``,
    else all CPUs. A bad environment value is reported as such; while the
    command runs the environment holds the chosen count, so ``--threads``
    overrides it for every native call."""
    if requested is None:
        try:
            threads = check_threads(None)
        except InvalidArgumentError as exc:
            raise CliError(
                f"bad {THREADS_ENV_VAR} environment variable ({_one_line(exc)}): "
                "unset it or pass --threads N"
            ) from None
    else:
        threads = requested
    previous = os.environ.get(THREADS_ENV_VAR)
    os.environ[THREADS_ENV_VAR] = str(threads)
    try:
        yield threads
    finally:
        if previous is None:
            del os.environ[THREADS_ENV_VAR]
        else:
            os.environ[THREADS_ENV_VAR] = previous


def _check_output(dst: str, inputs: Sequence[str] = ()) -> str:
    """Everything about OUT that can be checked before any work: returns its format."""
    if os.path.isdir(dst):
        raise CliError(f"output is a directory: {dst}")
    check_output(dst, inputs=inputs)
    return output_format(dst)


# --------------------------------------------------------------------------
# progress bar


class Progress:
    """A one-line progress bar on ``stream``, drawn only on a terminal."""

    def __init__(self, stream: TextIO, enabled: bool | None = None, unit: str = "") -> None:
        self.stream = stream
        self.unit = unit  # "bytes": done/total are byte counts
        if enabled is None:
            enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 20)).columns
        bar_w = 24
        filled = bar_w * done // total if total else bar_w
        count = f"{done}/{total}"
        if self.unit == "bytes":
            count = f"{format_bytes(done)}/{format_bytes(total)}"
        line = f"[{'#' * filled}{'.' * (bar_w - filled)}] {count} {printable(name, self.stream)}"
        line = line[: max(width - 1, 10)]
        self.stream.write("\r" + line.ljust(max(width - 1, 10)))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            width = shutil.get_terminal_size((80, 20)).columns
            self.stream.write("\r" + " " * max(width - 1, 10) + "\r")
            self.stream.flush()
            self.drawn = False


# --------------------------------------------------------------------------
# input


def _require_torch(what: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CliError(f"{what} needs PyTorch: {TORCH_INSTALL_HINT}") from None
    return torch


def _require_onnx(wbits: int, runtime: bool) -> None:
    """Before any work: the packages the ONNX path needs (onnx; ml_dtypes
    for int4 weights; onnxruntime with ``runtime``), or a CliError naming
    the one that is missing."""
    from .formats.onnx.common import require_onnx_packages

    try:
        require_onnx_packages(int4=wbits <= 4, runtime=runtime)
    except ImportError as exc:
        raise CliError(str(exc)) from None


def _sniff(path: str) -> str:
    """'safetensors', 'torch' or 'unknown', from the first bytes. The
    safetensors test comes first: its 8-byte header length can start with
    the byte 0x80 of a pickle (a header of 128, 384, ... bytes), while
    neither a zip nor a pickle from ``torch.save`` has ``{`` at byte 8."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch"  # zip-based torch.save
    if head[:1] == b"\x80":
        return "torch"  # legacy pickle-based torch.save
    return "unknown"


def _torch_load_reason(exc: BaseException) -> str:
    """A short reason from torch.load's (long, multi-line, ANSI-styled) errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "TorchScript archive" in text:
        return (
            "it is a TorchScript archive (torch.jit.save), which squant-rs does not read: "
            "save the model's state_dict() with torch.save instead"
        )
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"it holds Python objects other than tensors{what}; squant-rs loads checkpoints "
            "with weights_only=True and never unpickles arbitrary objects"
        )
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _torch_state_dict(path: str) -> dict[str, RawTensor]:
    torch = _require_torch("reading torch checkpoints")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise FormatError(
            f"{path}: cannot load torch checkpoint ({_torch_load_reason(exc)})"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(
            f"{path}: the checkpoint is a {type(obj).__name__}, not a state dict "
            "(a dict of tensors, or a dict with a 'state_dict' key)"
        )
    out: dict[str, RawTensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise FormatError(
                f"{path}: checkpoint key {key!r} is a {type(key).__name__}, not a string "
                "(expected a flat state dict, or a dict with a 'state_dict' key)"
            )
        if not isinstance(value, torch.Tensor):
            raise FormatError(
                f"{path}: checkpoint entry {key!r} is a {type(value).__name__}, not a tensor "
                "(expected a flat state dict, or a dict with a 'state_dict' key)"
            )
        if value.is_meta:
            raise FormatError(
                f"{path}: checkpoint entry {key!r} is a meta tensor (a shape without "
                "values): save the checkpoint from a model whose weights are loaded"
            )
        try:
            out[key] = RawTensor.from_torch(value)
        except (RuntimeError, NotImplementedError, UnsupportedDtypeError) as exc:
            raise FormatError(
                f"{path}: cannot read checkpoint entry {key!r} ({_one_line(exc)})"
            ) from None
    return out


def load_input(path: str) -> tuple[dict[str, RawTensor], str]:
    """The tensors of a ``.safetensors`` file or torch checkpoint, and the kind.

    Raises :class:`CliError` for a missing input, a directory or a tensor of
    more than :data:`MAX_DIMS` dimensions, :class:`InvalidArgumentError` for
    a squant-rs file (already quantized) and :class:`FormatError` for
    anything unreadable."""
    if not os.path.exists(path):
        raise CliError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise CliError(f"input is a directory, not a file: {path}")
    check_regular_input(path)  # a FIFO or a device would block the read below, or never end
    kind = _sniff(path)
    if kind == "unknown" and path.endswith(".safetensors"):
        kind = "safetensors"  # let the reader say what is wrong with it
    if kind == "unknown":
        raise FormatError(
            f"{path}: unrecognized input format (expected a .safetensors file or a "
            "torch .pt/.pth checkpoint)"
        )
    if kind == "torch":
        tensors = _torch_state_dict(path)
    else:
        # The header only (data=False): quantize_checkpoint maps the data.
        tensors, _ = read_safetensors(path, data=False)
        # A squant-rs file (already quantized): InvalidArgumentError, in the
        # words of every quantizing path (the Rust CLI's, a sharded input's).
        io_check_input(path)
    for key, t in tensors.items():
        if len(t.shape) > MAX_DIMS:
            raise CliError(
                f"{path}: tensor {key!r} has {len(t.shape)} dimensions; squant-rs handles "
                f"at most {MAX_DIMS}"
            )
    return tensors, kind


def _unmatched_patterns(
    tensors: Mapping[str, RawTensor], include: tuple[str, ...] | None, skip: tuple[str, ...]
) -> list[str]:
    """One warning per ``--include``/``--skip`` pattern that changes nothing."""
    with warnings.catch_warnings():
        # The CLI names unmatched patterns itself, once.
        warnings.simplefilter("ignore", UserWarning)
        candidates = len(select_state_dict(tensors, include, ()))
        notes = [
            f"--include pattern {pat!r} matches no floating tensor of 2+ dimensions"
            for pat in include or ()
            if not select_state_dict(tensors, (pat,), ())
        ]
        notes += [
            f"--skip pattern {pat!r} matches no tensor that would be quantized"
            for pat in skip
            if len(select_state_dict(tensors, include, (pat,))) == candidates
        ]
    return notes


def _shard_tensors(src: str) -> dict[str, RawTensor] | None:
    """The tensors (headers only) of every shard of the sharded checkpoint
    ``src`` (a directory or its index), for :func:`_unmatched_patterns`,
    read once its quantization (which checked the index and the shards) has
    succeeded; ``None`` if they cannot be read again."""
    tensors: dict[str, RawTensor] = {}
    try:
        for path in io_shard_files(src):
            tensors.update(read_safetensors(os.fspath(path), data=False)[0])
    except (OSError, ValueError, SquantError):
        return None  # changed since it was quantized
    return tensors


class _StageClock:
    """Wraps the progress callback of ``_export`` and notes when the last
    weight is done: the boundary between quantizing and writing."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.quantized_at: float | None = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if done >= total and self.quantized_at is None:
            self.quantized_at = time.perf_counter()
        self.progress(done, total, name)


# --------------------------------------------------------------------------
# commands


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Warnings raised while the body runs (the library's user warnings,
    those of the user's model or torch's exporter) become one
    ``squant-rs: warning: ...`` line each (the same text once), printed when
    the body succeeds; after an error only its one error line is printed
    (it names what went wrong; a warning such as "nothing to quantize"
    would only repeat it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("default", category=UserWarning)
        yield
    shown: set[str] = set()
    for w in caught:
        text = _one_line(w.message) if isinstance(w.message, Warning) else str(w.message)
        if text not in shown:
            shown.add(text)
            _message("warning", text)


def _cmd_quantize_onnx(args: argparse.Namespace) -> int:
    """``quantize IN.onnx OUT.onnx``: a QDQ ONNX model (numpy + onnx, no torch)."""
    from .formats.onnx import quantize_onnx
    from .formats.onnx.ranges import cli_spelling

    if not _is_onnx(args.input):
        raise CliError(
            f"output {args.output}: an ONNX model: quantize writes one from an ONNX input only "
            f"({args.input} is not one; squant-rs export makes one from a torch model)"
        )
    if not _is_onnx(args.output):
        raise CliError(f"ONNX input needs an .onnx output (got {args.output})")
    if args.include:
        raise CliError("--include applies to safetensors/torch inputs; use --skip for ONNX")
    input_shape = _onnx_input_shape(args.input_shape)
    if input_shape is not None and args.abits is None:
        raise CliError("--input-shape needs --abits (it is the calibration batch's shape)")
    _check_abits_options(args)
    _require_onnx(args.wbits, runtime=args.abits is not None)
    with _thread_count(args.threads) as threads, _warnings_as_lines(), cli_spelling():
        report = quantize_onnx(
            args.input,
            args.output,
            args.wbits,
            args.abits,
            args.mode,
            quantizer=args.quantizer,
            skip=tuple(args.skip or ()),
            threads=threads,
            input_shape=input_shape,
            integer_kernels=args.integer_kernels,
            quantize_input=args.quantize_input,
        )
    if args.verbose:
        print(_printable_report(report))
    elif not args.quiet:
        print(f"{printable(args.output)}: {report.summary()}")
    return 0


def _check_abits_options(args: argparse.Namespace) -> None:
    """``--integer-kernels`` and ``--quantize-input`` without ``--abits``:
    refused in the options' words (not the Python API's)."""
    given = [
        name
        for name, on in (
            ("--integer-kernels", args.integer_kernels),
            ("--quantize-input", args.quantize_input is not False),
        )
        if on
    ]
    if given and args.abits is None:
        need = "needs" if len(given) == 1 else "need"
        raise CliError(f"{' and '.join(given)} {need} --abits (quantized activations)")


def _input_range(text: str) -> tuple[float, float]:
    """``LO,HI`` of ``--quantize-input``."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi and lo < hi):
        raise argparse.ArgumentTypeError(
            f"expected LO,HI with LO <= 0 <= HI and LO < HI (e.g. -2.2,2.7), got {text!r}"
        )
    return lo, hi


def _input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 1,3,224,224``."""
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims) or math.prod(dims) > 2**31:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 1,3,224,224), got {text!r}"
        )
    return dims


def _batch_dim(text: str) -> int | None:
    """``--batch-dim N`` (a dimension of the input, negative from the end) or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a dimension of the input (an integer, e.g. 0 or 1) or none, got {text!r}"
        ) from None


def _named_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``--input-shape`` of ``quantize``: ``8,3,224,224`` or ``NAME=8,3,224,224``
    (the input's name: everything before the last ``=``)."""
    name, sep, dims = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"expected NAME=SHAPE with an input name, got {text!r}")
    try:
        shape = _input_shape(dims)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected positive integers separated by commas, optionally after an input's "
            f"name and '=' (e.g. 8,3,224,224 or input=8,3,224,224), got {text!r}"
        ) from None
    return (name if sep else None), shape


def _onnx_input_shape(
    given: Sequence[tuple[str | None, tuple[int, ...]]] | None,
) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """quantize_onnx's ``input_shape`` from the ``--input-shape`` values: one
    shape, or one per input named."""
    if not given:
        return None
    named = [(n, d) for n, d in given if n is not None]
    if len(named) != len(given):
        if len(given) > 1:
            raise CliError(
                "--input-shape takes one shape (SHAPE), or one per input (NAME=SHAPE ...)"
            )
        return given[0][1]
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in named:
        if name in out:
            raise CliError(f"--input-shape gives input {name!r} two shapes")
        out[name] = dims
    return out


def _factory_model(spec: str) -> Any:
    """``MODULE:FACTORY`` imported and called: the torch model."""
    import importlib

    torch = _require_torch("export")
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(
            f"bad factory {spec!r}: expected MODULE:FACTORY, e.g. torchvision.models:mobilenet_v2"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise CliError(f"cannot import {module_name!r} ({_one_line(exc)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"{spec} is a {type(obj).__name__}, not a callable factory")
    try:
        model = obj()
    except Exception as exc:
        raise CliError(f"{spec}() failed ({type(exc).__name__}: {_one_line(exc)})") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(model: Any, path: str) -> None:
    """``--weights``: a state dict loaded strictly into ``model``."""
    torch = _require_torch("--weights")
    if not os.path.exists(path):
        raise CliError(f"{path}: file not found")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, not a state dict file")
    check_regular_input(path)  # a FIFO or a device would block torch.load, or never end
    if _sniff(path) != "torch":
        raise CliError(
            f"{path}: not a torch checkpoint (--weights takes a state dict saved with torch.save)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise CliError(
            f"{path}: cannot load torch checkpoint ({_torch_load_reason(exc)})"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CliError(f"{path}: the checkpoint is a {type(obj).__name__}, not a state dict")
    try:
        model.load_state_dict(obj, strict=True)
    except Exception as exc:
        want, have = set(model.state_dict()), {str(k) for k in obj}
        missing, unexpected = sorted(want - have), sorted(have - want)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            why = ", ".join(parts) + " keys"
        else:
            why = _one_line(exc)
        raise CliError(f"{path}: the state dict does not match the model: {why}") from None


def _cmd_export(args: argparse.Namespace) -> int:
    """``export MODULE:FACTORY OUT.onnx``: a torch model as a QDQ ONNX model."""
    out = args.output
    if not _is_onnx(out):
        raise CliError(f"output {out}: export writes an .onnx model (use an .onnx extension)")
    if os.path.isdir(out):
        raise CliError(f"output is a directory: {out}")
    inputs = [args.weights] if args.weights else []
    if args.weights and os.path.exists(out) and os.path.samefile(out, args.weights):
        raise CliError(f"output path equals the input path: {out}")
    check_output(out, inputs=[p for p in inputs if os.path.exists(p)])
    _check_abits_options(args)
    rank = len(args.input_shape)
    if args.batch_dim is not None and not -rank <= args.batch_dim < rank:
        raise CliError(
            f"--batch-dim {args.batch_dim}: --input-shape "
            f"{','.join(map(str, args.input_shape))} has {rank} dimension{'s' if rank > 1 else ''}"
            f" (0..{rank - 1}); pass one of them, or --batch-dim none for static shapes"
        )
    _require_torch("export")
    _require_onnx(args.wbits, runtime=args.abits is not None and args.integer_kernels)
    with _warnings_as_lines():
        report = _export_model(args)
    if args.verbose:
        print(_printable_report(report))
    elif not args.quiet:
        print(f"{printable(out)}: {report.summary()}")
    return 0


def _export_model(args: argparse.Namespace) -> QuantReport:
    """The model of ``export`` built, loaded and exported: its report."""
    torch = _require_torch("export")
    from .formats.onnx import export_onnx
    from .formats.onnx.ranges import cli_spelling

    model = _factory_model(args.factory)
    if args.weights:
        _load_weights(model, args.weights)
    model.eval()
    example = torch.rand(args.input_shape, generator=torch.Generator().manual_seed(0))
    with _thread_count(args.threads) as threads, cli_spelling():
        try:
            report = export_onnx(
                model,
                args.output,
                example,
                args.wbits,
                args.abits,
                args.mode,
                quantizer=args.quantizer,
                recipe=args.recipe,
                skip=tuple(args.skip or ()),
                threads=threads,
                integer_kernels=args.integer_kernels,
                quantize_input=args.quantize_input,
                batch_dim=args.batch_dim,
            )
        except (SquantError, CliError, OSError):
            raise
        except Exception as exc:  # the user's model failed (assert, IndexError, ...)
            shape = ",".join(str(d) for d in args.input_shape)
            raise CliError(
                f"export of {args.factory} on input {shape} failed "
                f"({type(exc).__name__}: {_one_line(exc)})"
            ) from None
    return report


def _cmd_quantize(args: argparse.Namespace) -> int:
    src, dst = args.input, args.output
    if _is_onnx(src) or _is_onnx(dst):
        return _cmd_quantize_onnx(args)
    if (
        args.abits is not None
        or args.integer_kernels
        or args.quantize_input is not False
        or args.input_shape
    ):
        raise CliError(
            "--abits, --integer-kernels, --quantize-input and --input-shape apply to ONNX "
            "models (.onnx)"
        )
    sharded = is_sharded(src)
    if not sharded:
        _check_output(dst, inputs=[src])
    # Warnings (torch's, and the unmatched patterns') only when it succeeds.
    with _warnings_as_lines(), _thread_count(args.threads) as threads:
        start = time.perf_counter()
        if sharded:
            if not os.path.exists(src):  # an index path in a missing directory
                raise CliError(f"input file not found: {src}")
            tensors: dict[str, RawTensor] = {}
            kind = "sharded safetensors"
        else:
            tensors, kind = load_input(src)
        include = tuple(args.include) if args.include else None
        skip = tuple(args.skip or ())
        notes = [] if sharded else _unmatched_patterns(tensors, include, skip)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reported above
            keys = select_state_dict(tensors, include, skip)
        if not keys and not sharded:
            raise CliError(
                f"{src}: no tensor to quantize (none is a floating tensor of 2+ dimensions "
                "matching the include patterns)"
            )
        loaded = time.perf_counter()
        if kind != "torch":
            # safetensors files and sharded directories: Rust end to end,
            # memory-mapped, quantized and written block by block.
            progress = Progress(sys.stderr, unit="bytes")
            try:
                result = quantize_checkpoint(
                    src,
                    dst,
                    args.wbits,
                    args.mode,
                    include=include,
                    skip=skip,
                    threads=threads,
                    progress=progress,
                    quantizer=args.quantizer,
                )
            finally:
                progress.close()
            report, n_tensors = result.report, result.tensors
            if sharded:
                kind = f"sharded safetensors, {result.shards} shards"
                shards = _shard_tensors(src)
                notes = [] if shards is None else _unmatched_patterns(shards, include, skip)
            clock = None
        else:
            progress = Progress(sys.stderr)
            clock = _StageClock(progress)
            try:
                report = _export(
                    tensors,
                    {k: tensors[k] for k in keys},
                    dst,
                    args.wbits,
                    args.mode,
                    "auto",
                    threads,
                    [],
                    clock,
                    loaded,
                    args.quantizer,
                )
            finally:
                progress.close()
            n_tensors = len(tensors)
        written = time.perf_counter()
        for note in notes:
            _message("warning", note)
    if args.quiet:
        return 0
    if args.verbose:
        print(_printable_report(report))
        print()
    assert report.size_after is not None and report.size_before is not None
    if clock is None:
        # Streamed: quantizing and writing interleave, block by block; the
        # quantize share is the per-layer time, the rest reading and writing.
        rest = max((written - loaded) * 1e3 - report.total_ms, 0.0)
        timing = (
            f"load {(loaded - start) * 1e3:.1f} ms, quantize {report.total_ms:.1f} ms "
            f"(SQuant {report.total_ms:.1f} ms), write {rest:.1f} ms"
        )
    else:
        quantized = clock.quantized_at if clock.quantized_at is not None else written
        timing = (
            f"load {(loaded - start) * 1e3:.1f} ms, quantize {(quantized - loaded) * 1e3:.1f} ms "
            f"(SQuant {report.total_ms:.1f} ms), write {(written - quantized) * 1e3:.1f} ms"
        )
    rows = [
        ["input", f"{src} ({kind})"],
        ["output", dst],
        ["layers quantized", f"{len(report.layers)} of {n_tensors} tensors"],
        ["parameters quantized", f"{report.params:,}"],
        ["bits / mode", f"{args.wbits} / {args.mode} ({args.quantizer})"],
        ["time", timing],
        *_size_rows(report.size_before, report.size_after),
        ["mean relative error", f"{report.mean_rel_error:.4f}"],
        ["flips (K / C)", f"{report.k_flips:,} / {report.c_flips:,}"],
    ]
    _print_rows(rows)
    return 0


def _printable_report(report: QuantReport) -> str:
    """The per-layer table with the names escaped (one line per layer)."""
    layers = [dataclasses.replace(layer, name=printable(layer.name)) for layer in report.layers]
    skipped = [printable(name) for name in report.skipped]
    return str(dataclasses.replace(report, layers=layers, skipped=skipped))


def _size_rows(before: int, after: int) -> list[list[str]]:
    """The size rows ``quantize`` and ``info`` share: "before" is the tensor
    data in its original dtypes, "after" the squant-rs file."""
    return [
        ["size before", f"{format_bytes(before)} (tensor data, original dtypes)"],
        ["size after", f"{format_bytes(after)} ({after / max(before, 1):.3f}x)"],
    ]


def _print_rows(rows: Sequence[Sequence[str]], width: int = 22) -> None:
    print("\n".join(f"{label:<{width}}{printable(value)}" for label, value in rows))


#: Item sizes of the dtypes a quantized weight can have had.
_FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _size_before(info: QuantizedFileInfo) -> int:
    """The tensor data of the model before quantization (as ``quantize`` counts it)."""
    return sum(
        t.numel * _FLOAT_ITEMSIZE.get(t.dtype, 4) if t.bits is not None else t.stored_bytes
        for t in info.tensors
    )


def _cmd_info(args: argparse.Namespace) -> int:
    path = args.file
    if not os.path.exists(path):
        raise CliError(f"file not found: {path}")
    if os.path.isdir(path) and not is_sharded(path):
        raise CliError(f"is a directory, not a file: {path}")
    if args.verify:
        # Checked before the file is read, as quantize does: a bad
        # SQUANT_NUM_THREADS in the CLI's words (--threads overrides it).
        with _thread_count(args.threads) as threads:
            info = inspect_quantized(path)  # the header
            verify_quantized(path, threads=threads)  # every tensor: checksums, codes, scales
    else:
        info = inspect_quantized(path)  # the header only: no threads
    q = info.quantized
    f32 = info.float32_size
    bits = sorted({t.bits for t in q if t.bits is not None})
    modes = sorted({t.mode for t in q if t.mode is not None})
    rows = [
        ["file", f"{info.path} ({format_bytes(info.file_size)})"],
        [
            "format",
            f"squant-rs version {info.format_version} (written by squant-rs {info.writer_version})",
        ],
        [
            "tensors",
            f"{len(info.tensors)} ({len(q)} quantized, "
            f"{len(info.tensors) - len(q)} stored unchanged)",
        ],
        ["bits / mode", f"{', '.join(map(str, bits)) or '-'} / {', '.join(modes) or '-'}"],
        ["quantized parameters", f"{sum(t.numel for t in q):,}"],
        *_size_rows(_size_before(info), info.file_size),
        ["as float32", f"{format_bytes(f32)} ({info.file_size / max(f32, 1):.3f}x)"],
    ]
    if args.verify:
        if info.has_checksums:
            verified = "every checksum, code, scale and zero point"
        elif not is_sharded(path):
            verified = "every code, scale and zero point (no checksums in this file)"
        elif not info.some_checksums:
            verified = "every code, scale and zero point (no checksums in these shards)"
        else:
            verified = (
                "every code, scale and zero point, "
                "and the checksums of the shards that have them (not all do)"
            )
        rows.append(["verified", verified])
    # Everything is formatted before anything is printed: no partial output.
    lines = [f"{label:<22}{printable(value)}" for label, value in rows]
    if args.verbose or len(info.tensors) <= 50:
        lines.append("")
        table = [
            [
                printable(t.name),
                "x".join(map(str, t.shape)) or "scalar",
                printable(t.dtype),
                "-" if t.bits is None else str(t.bits),
                printable(t.mode or "-"),
                f"{t.stored_bytes:,}",
                f"{t.stored_bytes / max(t.float32_bytes, 1):.3f}" if t.bits is not None else "-",
            ]
            for t in info.tensors
        ]
        headers = ["tensor", "shape", "dtype", "bits", "mode", "bytes", "ratio"]
        lines += format_table(headers, table, right={5, 6})
    else:
        lines.append(f"\n({len(info.tensors)} tensors; -v lists them)")
    for line in lines:
        print(line)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.out:
        _check_output(args.out)
    with _thread_count(args.threads) as threads:
        return _demo(args, threads)


def _demo(args: argparse.Namespace, threads: int) -> int:
    shapes = resnet_shapes(args.depth)
    weights = he_weights(shapes, seed=args.seed)
    n_params = sum(w.size for w in weights.values())
    print(
        f"squant-rs {__version__} demo: ResNet-{args.depth} weight shapes ({len(shapes)} layers, "
        f"{n_params:,} parameters), He-normal random weights (seed {args.seed})"
    )
    print(f"W{args.wbits} {args.mode}, Rust backend, {threads} thread(s)\n")
    progress = Progress(sys.stderr)
    t_sq = t_e = 0.0
    kf = cf = 0
    sq_err2 = e_err2 = ref2 = 0.0
    k_sum = {"sq": 0.0, "e": 0.0}
    c_sum = {"sq": 0.0, "e": 0.0}
    n_kernels = n_channels = 0
    wall = time.perf_counter()
    try:
        for i, (name, w) in enumerate(weights.items()):
            progress(i, len(weights), name)
            t0 = time.perf_counter()
            qt = quantize_tensor(w, args.wbits, args.mode, threads=threads)
            t_sq += time.perf_counter() - t0
            t0 = time.perf_counter()
            qe = quantize_tensor(w, args.wbits, "squant-e", threads=threads)
            t_e += time.perf_counter() - t0
            kf += qt.k_flips
            cf += qt.c_flips
            w64 = w.astype(np.float64)
            ref2 += float(np.square(w64).sum())
            oc, ic = w.shape[0], w.shape[1]
            # x = s*w - z as the core computes it; the rounding error is codes - x.
            x = qt.scale.reshape((-1,) + (1,) * (w.ndim - 1)) * w
            x = x - qt.zero_point.reshape((-1,) + (1,) * (w.ndim - 1))
            for tag, q in (("sq", qt), ("e", qe)):
                err2 = float(np.square(q.dequantize().astype(np.float64) - w64).sum())
                if tag == "sq":
                    sq_err2 += err2
                else:
                    e_err2 += err2
                e = (q.codes.astype(np.float32) - x).reshape(oc, ic, -1)
                if e.shape[2] > 1:  # kernel level only exists for K > 1
                    k_sum[tag] += float(np.abs(e.sum(axis=2, dtype=np.float64)).sum())
                c_sum[tag] += float(np.abs(e.reshape(oc, -1).sum(axis=1, dtype=np.float64)).sum())
            if w[0, 0].size > 1:
                n_kernels += oc * ic
            n_channels += oc
        progress(len(weights), len(weights), "")
    finally:
        progress.close()
    wall_ms = (time.perf_counter() - wall) * 1e3
    # The same weights in one call (the whole-model path).
    t0 = time.perf_counter()
    quantize_tensors(list(weights.values()), args.wbits, args.mode, threads=threads)
    t_batch = time.perf_counter() - t0
    rel_sq = math.sqrt(sq_err2 / ref2)
    rel_e = math.sqrt(e_err2 / ref2)
    rows = [
        ["layers quantized", f"{len(weights)}"],
        [
            f"time ({args.mode})",
            f"{t_sq * 1e3:.1f} ms (sum over layers; nearest rounding {t_e * 1e3:.1f} ms)",
        ],
        ["time, one batch call", f"{t_batch * 1e3:.1f} ms (quantize_tensors, all layers)"],
        ["flips (K / C)", f"{kf:,} / {cf:,}"],
        ["rel. weight error", f"{rel_sq:.5f} {args.mode}  vs  {rel_e:.5f} nearest (squant-e)"],
        [
            "mean |kernel err sum|",  # over the kernels of layers with K > 1
            f"{k_sum['sq'] / n_kernels:.4f} {args.mode}  vs  {k_sum['e'] / n_kernels:.4f} nearest",
        ],
        [
            "mean |channel err sum|",
            f"{c_sum['sq'] / n_channels:.4f} {args.mode}  vs  "
            f"{c_sum['e'] / n_channels:.4f} nearest",
        ],
    ]
    for label, value in rows:
        print(f"{label:<24}{value}")
    print(
        "\nSQuant trades a slightly larger element-wise error for error sums near zero per"
        "\nkernel and per output channel (errors in units of quantization steps)."
    )
    if args.out:
        raw = {name: RawTensor.from_numpy(w) for name, w in weights.items()}
        report = _export(raw, raw, args.out, args.wbits, args.mode, "auto", threads, [], None, wall)
        assert report.size_after is not None and report.size_before is not None
        print(
            f"\nwrote {args.out}: {format_bytes(report.size_after)} "
            f"({report.size_after / report.size_before:.3f}x of float32)"
        )
    print(f"\ntotal wall time {wall_ms:.0f} ms")
    return 0


# --------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per command)."""
    parser = _Parser(
        prog=PROG,
        description="SQuant data-free weight quantization (Guo et al., ICLR 2022).",
    )
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="quantize built-in ResNet weight shapes (no download, numpy only)",
        description="Quantize He-initialised ResNet weights of the real shapes with the "
        "Rust core and compare SQuant with nearest rounding.",
    )
    demo.add_argument(
        "--depth", type=int, choices=(18, 34, 50, 101, 152), default=50, help="ResNet depth"
    )
    _add_quantizer_options(demo)
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    demo.add_argument(
        "--out", metavar="FILE", help="also write the quantized weights here (.safetensors)"
    )
    demo.set_defaults(func=_cmd_demo)

    q = sub.add_parser(
        "quantize",
        help="quantize a .safetensors file or torch checkpoint into a squant-rs file",
        description="Quantize every floating tensor of 2+ dimensions whose name ends in "
        "'weight' (override with --include/--skip) and write a packed squant-rs "
        "safetensors file. OUT must not be IN; its extension chooses the format "
        f"({', '.join(OUTPUT_FORMATS)}); it is written atomically (symlinks followed, "
        "permissions kept; FIFOs and devices refused).",
    )
    q.add_argument(
        "input", metavar="IN", help=".safetensors file, torch .pt/.pth state dict or .onnx model"
    )
    q.add_argument(
        "output", metavar="OUT", help="squant-rs .safetensors file (or .onnx model) to write"
    )
    _add_quantizer_options(q, quantizer=True)
    q.add_argument(
        "--include",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="quantize tensors whose name matches one of these fnmatch patterns "
        "(default: '*weight')",
    )
    q.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="leave tensors matching these patterns float (tried on the name and on "
        "the name without '.weight')",
    )
    _add_onnx_options(q, "ONNX only: ")
    q.add_argument(
        "--input-shape",
        nargs="+",
        action="extend",
        type=_named_input_shape,
        metavar="[NAME=]SHAPE",
        help="ONNX only: (with --abits) shape of the U[0,1) calibration batch, e.g. 8,3,224,224: "
        "of the model's input (with several inputs: of every input of that rank whose fixed "
        "dimensions it matches), or NAME=SHAPE for each input named (default: the model's "
        "shapes, a symbolic batch dimension as 8)",
    )
    _add_verbosity_options(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser(
        "export",
        help="quantize a torch model (MODULE:FACTORY) and export it as a QDQ .onnx model",
        description="Build a torch model by calling FACTORY() from MODULE (imported by module "
        "path, the current directory first), load --weights into it (torch.load with "
        "weights_only=True, load_state_dict strict), quantize it with SQuant (BatchNorm "
        "folded first) and write a QDQ ONNX model (opset 21) atomically. Needs torch and onnx.",
    )
    e.add_argument(
        "factory",
        metavar="MODULE:FACTORY",
        help="a callable returning the torch.nn.Module, e.g. torchvision.models:mobilenet_v2",
    )
    e.add_argument("output", metavar="OUT", help=".onnx model to write")
    e.add_argument(
        "--weights",
        metavar="STATE_DICT",
        help="torch state dict (.pt/.pth) to load into the model (default: the factory's)",
    )
    e.add_argument(
        "--input-shape",
        type=_input_shape,
        default=(1, 3, 224, 224),
        metavar="N,C,H,W",
        help="shape of the example input (its batch dimension, --batch-dim, is exported as "
        "dynamic; also the calibration batch's shape)",
    )
    e.add_argument(
        "--batch-dim",
        type=_batch_dim,
        default=0,
        metavar="N|none",
        help="the dimension of the input the ONNX model takes at any size, e.g. 1 for a "
        "sequence-first (L,N,E) input; none: static shapes",
    )
    _add_quantizer_options(e, quantizer=True)
    e.add_argument(
        "--recipe",
        choices=RECIPES,
        default=None,
        help="quantize_model's recipe: paper (the paper's steps) or squant+ (BN ranges, bias "
        "correction) (default: quantize_model's default)",
    )
    e.add_argument(
        "--skip",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="leave the layers matching these fnmatch patterns (module names) float",
    )
    _add_onnx_options(e, "")
    _add_verbosity_options(e)
    e.set_defaults(func=_cmd_export)

    info = sub.add_parser(
        "info",
        help="describe a squant-rs file",
        description="Describe a squant-rs file: format version, tensors, bits and modes, "
        "sizes before and after quantization, and (with -v or up to 50 tensors) one row "
        "per tensor. Reads only the file's header.",
    )
    info.add_argument(
        "file", metavar="FILE", help="squant-rs .safetensors file or sharded directory"
    )
    info.add_argument("-v", "--verbose", action="store_true", help="list every tensor")
    info.add_argument(
        "--verify",
        action="store_true",
        help="read every tensor and check its checksum, codes, scales and zero points",
    )
    _add_threads_option(info, "(with --verify) ")
    info.set_defaults(func=_cmd_info)
    return parser


def _add_onnx_options(p: argparse.ArgumentParser, prefix: str) -> None:
    """--abits, --integer-kernels and --quantize-input."""
    p.add_argument(
        "--abits",
        type=_bits,
        default=None,
        help=f"{prefix}activation bits of the quantized layers' inputs (default: float)",
    )
    p.add_argument(
        "--integer-kernels",
        action="store_true",
        help=f"{prefix}(with --abits) one Q/DQ pair on every activation between quantized "
        "ops (layer outputs, residual Adds, pooling), so onnxruntime runs QLinearConv/QGemm/"
        "QLinearAdd (use with --quantizer symmetric)",
    )
    p.add_argument(
        "--quantize-input",
        nargs="?",
        type=_input_range,
        const=True,
        default=False,
        metavar="LO,HI",
        help=f"{prefix}(with --abits) quantize the first layer's input too (the algorithm "
        "keeps it float; that layer must read the model's input, directly or through a "
        "Pad / Reshape / ...): to LO,HI (e.g. the range of the normalized inputs), or "
        "without a value by the sigma rule on the calibration batch",
    )


def _add_verbosity_options(p: argparse.ArgumentParser) -> None:
    """-v / -q of the commands that write a quantized model."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="print the per-layer table")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def _add_threads_option(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """--threads of every command that runs Rust worker threads."""
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        metavar="N",
        help=f"{prefix}Rust worker threads, 1..{MAX_THREADS} (default: ${THREADS_ENV_VAR}, "
        f"else all CPUs; overrides {THREADS_ENV_VAR})",
    )


def _add_quantizer_options(p: argparse.ArgumentParser, quantizer: bool = False) -> None:
    """Options shared by every command that quantizes (``quantizer``: also
    ``--quantizer``)."""
    p.add_argument("--wbits", type=_bits, default=4, help="weight bits, 2..8")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="squant",
        help="squant = E+K+C (the full method), squant-e = nearest rounding, "
        "squant-k / squant-c = kernel / channel level only",
    )
    _add_threads_option(p)
    if quantizer:
        p.add_argument(
            "--quantizer",
            choices=QUANTIZERS,
            default="asymmetric",
            help="asymmetric (the paper's, default) or symmetric (zero point 0, for int8 runtimes)",
        )


def _message(kind: str, text: str) -> None:
    print(f"{PROG}: {kind}: {printable(text, sys.stderr)}", file=sys.stderr)


def _error(message: str) -> None:
    _message("error", message)


def _silence_stdout() -> None:
    """stdout is a closed pipe: point it at devnull so that the flush at
    exit does not complain again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the module doc)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CliError as exc:
        _error(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except KeyboardInterrupt as exc:
        # "(after OUT was written)" when it came while the output was renamed into place
        _error(f"interrupted ({exc})" if exc.args else "interrupted")
        return 130
    except BrokenPipeError:  # `squant-rs info -v FILE | head`: stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (CliError, SquantError, UnsupportedDtypeError, OSError) as exc:
        _error(_one_line(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
