"""Output: the quantized model written atomically (:func:`write_model`), one
file or with external data, never over the input model or its data files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..._squant_rs import InvalidArgumentError
from ..output import atomic_output, atomic_outputs, check_output
from .graph import _all_tensors
from .load import _over_2gb


def write_model(
    model: Any,
    path: str,
    external_data: bool | None = None,
    in_path: str | None = None,
    data_files: Sequence[str] = (),
) -> int:
    """Write ``model`` to ``path`` atomically through :func:`atomic_output`:
    one file below 2 GB of tensors (all of them: :func:`_over_2gb`), else
    the model plus ``<path>.data`` (:func:`_moved_tensors`: its tensors of
    1 KiB or more; ``external_data`` forces either), both
    under the same output rules (symlinks followed, permissions kept,
    never the input model ``in_path`` or one of its ``data_files``) and
    both written and synced before either replaces its target (:func:`atomic_outputs`: the
    data first, the model right after, with signals held and the directory
    locked; a failed rename puts the old file back). The tensors written to
    ``<path>.data`` are moved out of ``model`` (the caller's private
    copy). Returns the bytes written."""
    name = os.fspath(path)
    inputs = _input_files(in_path, data_files)
    external = _over_2gb(model) if external_data is None else external_data
    moved = _moved_tensors(model) if external else []
    if not moved:
        data = model.SerializeToString()
        with atomic_output(name, inputs=inputs) as out:
            out.write(data)
        return len(data)
    data_path = name + ".data"
    location = os.path.basename(name) + ".data"
    _refuse_inputs([name, data_path], in_path, data_files)
    check_output(name, inputs=inputs)  # the model's errors before its data file's
    # Both files are written and synced before either is renamed; then the
    # .data file replaces its target first and the model right after (a
    # reader, or a crash, between the two renames finds the old model with
    # the new data: see atomic_outputs).
    with atomic_outputs([data_path, name], inputs=inputs) as (data_out, out):
        offset = _move_out(moved, location, data_out)
        proto = model.SerializeToString()
        out.write(proto)
    return offset + len(proto)


def _move_out(tensors: Sequence[Any], location: str, out: BinaryIO) -> int:
    """Write the data of ``tensors`` (:func:`_moved_tensors`) to ``out``,
    one after the other, each replaced in its model by a reference to
    ``location`` at its offset. Returns the bytes written."""
    from onnx import TensorProto

    offset = 0
    for t in tensors:
        raw = t.raw_data
        out.write(raw)
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        entry = t.external_data.add()
        entry.key, entry.value = "length", str(len(raw))
        offset += len(raw)
        t.ClearField("raw_data")
    return offset


def _moved_tensors(model: Any) -> list[Any]:
    """The tensors :func:`write_model` moves to the ``.data`` file: those
    of 1 KiB or more (onnx.save_model's ``size_threshold``), initializers
    and node attributes' tensors (a Constant's value, ``convert_attribute``)
    in every graph (If / Loop / Scan bodies, model-local functions), with
    ``external_data=True`` as over 2 GB. Smaller ones stay in the model:
    the shapes and axes Reshape / Unsqueeze / Slice read (initializers, or
    Constants as torch's exporter makes them) and If conditions, which
    onnxruntime needs in the model itself ("Cannot parse data from
    external tensors"). Sparse tensors stay in the model: onnx's checker
    cannot read external ones, and onnx.save_model keeps them in the model
    too."""
    return [t for t in _all_tensors(model, sparse=False) if len(t.raw_data) >= 1024]


def _check_output(
    out_path: Any,
    in_path: str | None,
    data_files: Sequence[str] = (),
    external_data: bool | None = None,
) -> str:
    """The output path, refused when it names a directory (one that exists,
    or a path ending with ``/``) or when it (or, with
    ``external_data=True``, its ``.data`` file) is the input model or one
    of its external data files."""
    if not isinstance(out_path, (str, os.PathLike)):
        raise TypeError(f"out_path must be a path, got {type(out_path).__name__}")
    out = os.fspath(out_path)
    if os.path.isdir(out):
        raise InvalidArgumentError(f"output is a directory: {out}")
    if os.path.basename(out) in ("", ".", ".."):  # "out/": not a file name
        raise InvalidArgumentError(f"output {out} names a directory, not a file: give a file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"output directory does not exist: {parent}")
    if in_path is not None and os.path.realpath(out) == os.path.realpath(in_path):
        raise InvalidArgumentError(f"output path equals the input path: {out}")
    _refuse_inputs([out, out + ".data"] if external_data else [out], in_path, data_files)
    inputs = _input_files(in_path, data_files)
    check_output(out, inputs=inputs)
    if external_data:
        check_output(out + ".data", inputs=[*inputs, out])
    return out


def _input_files(in_path: str | None, data_files: Sequence[str]) -> list[str]:
    return ([in_path] if in_path is not None else []) + list(data_files)


def _refuse_inputs(outputs: Sequence[str], in_path: str | None, data_files: Sequence[str]) -> None:
    """Refuse an output file that is the input model or one of the external
    data files it reads (device and inode compared, so links are caught)."""
    if in_path is None:
        return
    named = [(in_path, f"the input {in_path}")]
    named += [(f, f"the external data file {f} of the input {in_path}") for f in data_files]
    for out in outputs:
        for src, what in named:
            try:
                same = os.path.samefile(out, src)
            except OSError:  # one of them does not exist (yet)
                same = False
            if same:
                raise InvalidArgumentError(
                    f"output {out} is the same file as {what}: refusing to overwrite the input"
                )
