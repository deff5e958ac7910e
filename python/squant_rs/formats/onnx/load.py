"""Loading and checking: a private copy of the input model with its external
data (:func:`_load`), checked and converted to opset 21 (:func:`_prepare`)."""

from __future__ import annotations

import os
from typing import Any

from ..._squant_rs import InvalidArgumentError
from ..output import check_regular_input
from .common import EXTERNAL_ABOVE, MIN_OPSET, OPSET, QUANT_OPS, OnnxFormatError, require_onnx
from .graph import _all_tensors, _graphs, _sparse_names


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
        _refuse_unloaded(model_or_path)
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
        # Every tensor: onnx's load_external_data_for_model leaves sparse
        # ones (initializers and attributes) external.
        helper = onnx.external_data_helper
        for t in _all_tensors(model):
            if helper.uses_external_data(t):
                helper.load_external_data_for_tensor(t, os.path.dirname(path))
    except Exception as exc:
        raise OnnxFormatError(
            f"{path}: cannot read its external data ({type(exc).__name__}: {exc})"
        ) from None
    return model, path, data_files


def _external_files(model: Any, base: str) -> list[str]:
    """The external data files the tensors of ``model`` name (absolute):
    initializers, sparse initializers and node attributes (a Constant's
    ``value``), in every graph."""
    files: dict[str, None] = {}
    for t in _external_tensors(model):
        for entry in t.external_data:
            if entry.key == "location" and entry.value:
                files[os.path.normpath(os.path.join(base, entry.value))] = None
    return list(files)


def _external_tensors(model: Any) -> list[Any]:
    """The tensors of ``model`` whose data is in an external file."""
    from onnx import TensorProto

    return [
        t
        for t in _all_tensors(model)
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL
    ]


def _refuse_unloaded(model: Any) -> None:
    """Refuse an in-memory model whose tensors still reference external
    data files (``onnx.load(..., load_external_data=False)``): where those
    files are is not known (they are relative to the model's file)."""
    external = _external_tensors(model)
    if not external:
        return
    t = external[0]
    location = next((e.value for e in t.external_data if e.key == "location"), "")
    raise InvalidArgumentError(
        f"the model references external data that is not loaded ({len(external)} "
        f"tensor{'s' if len(external) > 1 else ''}, e.g. {t.name!r} in {location!r}): pass "
        "the .onnx file's path, or load it with onnx.load(path, load_external_data=True)"
    )


def _prepare(model: Any, where: str) -> Any:
    """Checked, at opset 21 (converted up or down to it), refusing quantized
    graphs and ops or types opset 21 does not have. A model whose
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
    if not _over_2gb(model):
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise OnnxFormatError(f"{where}: invalid ONNX model ({msg})") from None
    if opset != OPSET:
        # (down from a newer opset too: the output is opset 21, which every
        # runtime with int4 QDQ runs; an op or type opset 21 lacks is refused)
        # The converter serializes the model, which protobuf refuses at 2 GB:
        # a model that large is converted without its tensor data.
        # The converter knows no sparse initializers: it fails on the main
        # graph's ("Input ... is undefined"), which are graph inputs
        # meanwhile, and drops those of If / Loop / Scan bodies.
        inner = sorted(n for g in list(_graphs(model.graph))[1:] for n in _sparse_names(g))
        if inner:
            raise OnnxFormatError(
                f"{where}: cannot convert opset {opset} to {OPSET}: onnx's version converter "
                "drops the sparse initializers of If / Loop / Scan bodies "
                f"({', '.join(map(repr, inner[:3]))}{', ...' if len(inner) > 3 else ''}); "
                f"store them dense, or convert the model to opset {OPSET} first"
            )
        detached = _detach_data(model) if _over_2gb(model) else {}
        hidden = _hide_sparse(model)
        # The converter drops model-local functions: they are inlined first.
        if model.functions:
            model = _inline_functions(model, f"{where}: cannot convert opset {opset} to {OPSET}: ")
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # "/project/onnx/version_converter/...h:23: adapt: Assertion `false`
            # failed: No Previous Version of X exists": the reason only
            msg = msg.rpartition("` failed: ")[2] or msg
            raise OnnxFormatError(
                f"{where}: cannot convert opset {opset} to {OPSET} ({msg})"
            ) from None
        _restore_sparse(model, hidden)
        _attach_data(model, detached)
    model.ir_version = _ir_version(model)
    return model


def _ir_version(model: Any) -> int:
    """The IR version of the output (at opset 21): the one onnx's
    ``VERSION_TABLE`` pairs with its opsets, 10 (which int4 / int16
    initializers need too, and which every runtime with opset 21 reads),
    lower or higher than ``model``'s (an input above opset 21, or made by a
    newer onnx); ``model``'s own where it is higher and the model stores
    what IR version 10 lacks (:func:`_newer_than_ir10`)."""
    from onnx import helper

    paired = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(paired, model.ir_version) if _newer_than_ir10(model) else paired


def _newer_than_ir10(model: Any) -> bool:
    """Whether ``model`` stores what IR version 10 lacks: a data type after
    INT4 (FLOAT4E2M1 of IR 11 and later ones) in a tensor or a declared
    type, anywhere, or a multi-device configuration (IR 11)."""
    from google.protobuf.message import Message
    from onnx import TensorProto, TypeProto

    stack = [model]
    while stack:
        msg = stack.pop()
        if isinstance(msg, TensorProto):  # (its data is not walked)
            if msg.data_type > TensorProto.INT4:
                return True
            continue
        if isinstance(msg, (TypeProto.Tensor, TypeProto.SparseTensor)):
            if msg.elem_type > TensorProto.INT4:
                return True
        elif type(msg).__name__ in ("DeviceConfigurationProto", "NodeDeviceConfigurationProto"):
            return True
        for field, value in msg.ListFields():
            if field.message_type is not None:
                stack.extend([value] if isinstance(value, Message) else value)
    return False


def _inline_functions(model: Any, refusal: str) -> Any:
    """``model`` with every call of its model-local functions replaced by
    their bodies (onnx's inliner, the bodies converted to the model's
    opset), for onnx's version converter, which drops ``model.functions``
    (its output then calls functions it lacks). Raises
    :class:`OnnxFormatError` starting with ``refusal`` where they cannot
    be inlined (the checker, skipped over 2 GB, refuses most such models
    before)."""
    import onnx.inliner

    try:
        return onnx.inliner.inline_local_functions(model, convert_version=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = msg.rpartition("` failed: ")[2] or msg
        names = sorted({f.name for f in model.functions})
        raise OnnxFormatError(
            f"{refusal}its model-local functions ({', '.join(map(repr, names[:3]))}"
            f"{', ...' if len(names) > 3 else ''}), which onnx's version converter drops, "
            f"cannot be inlined ({msg})"
        ) from None


def _hide_sparse(model: Any) -> tuple[list[Any], set[str]]:
    """Move the main graph's sparse initializers out of ``model`` for the
    version converter, each declared as a graph input (unless it is one
    already); returns them and the inputs added, for :func:`_restore_sparse`."""
    from onnx import helper

    graph = model.graph
    sparse = list(graph.sparse_initializer)
    inputs = {i.name for i in graph.input}
    added: set[str] = set()
    for sp in sparse:
        name = sp.values.name
        if name not in inputs:
            graph.input.append(
                helper.make_tensor_value_info(name, sp.values.data_type, list(sp.dims))
            )
            added.add(name)
    del graph.sparse_initializer[:]
    return sparse, added


def _restore_sparse(model: Any, hidden: tuple[list[Any], set[str]]) -> None:
    """Put back what :func:`_hide_sparse` moved out of the (converted) model."""
    sparse, added = hidden
    if not sparse:
        return
    graph = model.graph
    keep = [i for i in graph.input if i.name not in added]
    del graph.input[:]
    graph.input.extend(keep)
    graph.sparse_initializer.extend(sparse)


def _tensor_bytes(model: Any) -> int:
    """The bytes of tensor data ``model`` holds: every tensor of every graph
    (:func:`_all_tensors`: initializers, sparse ones, Constant nodes'
    values, in If / Loop / Scan bodies too), whatever field holds it."""
    return sum(
        len(t.raw_data)
        + 4 * (len(t.float_data) + len(t.int32_data))
        + 8 * (len(t.int64_data) + len(t.double_data) + len(t.uint64_data))
        + sum(len(b) for b in t.string_data)
        for t in _all_tensors(model)
    )


def _over_2gb(model: Any) -> bool:
    """Whether ``model``'s tensors take more than protobuf serializes in one
    message (:data:`EXTERNAL_ABOVE`, less room for the rest): it is then
    checked, converted and written without its tensor data."""
    return _tensor_bytes(model) >= EXTERNAL_ABOVE


#: ``location`` of the tensors :func:`_detach_data` moved out of a model.
_DETACHED = "squant-rs-detached:"


def _detach_data(model: Any) -> dict[str, bytes]:
    """Move the raw data of every tensor (:func:`_all_tensors`: Constant
    nodes' values and subgraphs' too) out of ``model``, leaving an
    external-data reference to a name no file has; returns the data by that
    name for :func:`_attach_data`."""
    from onnx import TensorProto

    out: dict[str, bytes] = {}
    for t in _all_tensors(model):
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
    tensors and their external-data references as they are)."""
    from onnx import TensorProto

    if not detached:
        return
    for t in _all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        key = next((e.value for e in t.external_data if e.key == "location"), "")
        if key in detached:  # (twice where an inlined function is called twice)
            t.raw_data = detached[key]
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
