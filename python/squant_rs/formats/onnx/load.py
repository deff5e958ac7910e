"""Loading and checking: a private copy of the input model with its external
data (:func:`_load`), checked and converted to opset 21 (:func:`_prepare`)."""

from __future__ import annotations

import os
from typing import Any

from ..output import check_regular_input
from .common import EXTERNAL_ABOVE, MIN_OPSET, OPSET, QUANT_OPS, OnnxFormatError, require_onnx
from .graph import _graph_tensors


def _default_opset(model: Any) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def _load(model_or_path: Any) -> tuple[Any, str | None, list[str]]:
    """A private copy of the model (external data loaded), its path and the
    external data files it reads (absolute paths)."""
    onnx = require_onnx()
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model, None, []
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}"
        )
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise OnnxFormatError(f"{path}: file not found")
    if os.path.isdir(path):
        raise OnnxFormatError(f"{path}: is a directory, not an ONNX file")
    check_regular_input(path)  # a FIFO or a device: refused, not waited on
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxFormatError(
            f"{path}: not an ONNX model or truncated ({type(exc).__name__})"
        ) from None
    if model.ir_version < 3 or not model.HasField("graph") or not model.graph.node:
        raise OnnxFormatError(f"{path}: not an ONNX model (no graph or no IR version)")
    data_files = _external_files(model, os.path.dirname(os.path.abspath(path)))
    for data_file in data_files:
        check_regular_input(data_file)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(path))
    except Exception as exc:
        raise OnnxFormatError(
            f"{path}: cannot read its external data ({type(exc).__name__}: {exc})"
        ) from None
    return model, path, data_files


def _external_files(model: Any, base: str) -> list[str]:
    """The external data files the initializers of ``model`` name (absolute)."""
    from onnx import TensorProto

    files: dict[str, None] = {}
    for t in _graph_tensors(model.graph):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location" and entry.value:
                    files[os.path.normpath(os.path.join(base, entry.value))] = None
    return list(files)


def _prepare(model: Any, where: str) -> Any:
    """Checked, at opset 21, refusing quantized graphs. A model whose
    tensors exceed 2 GB is converted without its tensor data (protobuf
    serializes no more), which goes back afterwards."""
    onnx = require_onnx()
    opset = _default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise OnnxFormatError(
            f"{where}: unsupported opset {opset} (supported: {MIN_OPSET}..{newest} of the "
            "default domain)"
        )
    quantized = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    if quantized:
        raise OnnxFormatError(
            f"{where}: the graph is already quantized ({', '.join(quantized)} nodes)"
        )
    if _tensor_bytes(model) < EXTERNAL_ABOVE:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise OnnxFormatError(f"{where}: invalid ONNX model ({msg})") from None
    if opset < OPSET:
        # The converter serializes the model, which protobuf refuses at 2 GB:
        # a model that large is converted without its tensor data.
        detached = _detach_data(model) if _tensor_bytes(model) >= EXTERNAL_ABOVE else {}
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxFormatError(
                f"{where}: cannot convert opset {opset} to {OPSET} ({msg})"
            ) from None
        _attach_data(model, detached)
    # int4 / int16 initializers need IR version 10 (opset 21's).
    model.ir_version = max(model.ir_version, 10)
    return model


def _tensor_bytes(model: Any) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)


#: ``location`` of the tensors :func:`_detach_data` moved out of a model.
_DETACHED = "squant-rs-detached:"


def _detach_data(model: Any) -> dict[str, bytes]:
    """Move the raw data of every initializer (subgraphs' too) out of
    ``model``, leaving an external-data reference to a name no file has;
    returns the data by that name for :func:`_attach_data`."""
    from onnx import TensorProto

    out: dict[str, bytes] = {}
    for t in _graph_tensors(model.graph):
        if not t.raw_data:
            continue
        key = f"{_DETACHED}{len(out)}"
        out[key] = t.raw_data
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", key
    return out


def _attach_data(model: Any, detached: dict[str, bytes]) -> None:
    """Put back the data :func:`_detach_data` moved out (the converter keeps
    initializers and their external-data references as they are)."""
    from onnx import TensorProto

    if not detached:
        return
    for t in _graph_tensors(model.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        key = next((e.value for e in t.external_data if e.key == "location"), "")
        if key in detached:
            t.raw_data = detached.pop(key)
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
