"""Activation ranges without torch: the sigma rule on one U[0,1) batch in ORT."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..._squant_rs import InvalidArgumentError
from ...model.activations import (
    SHAPE_SPELLING,
    _check_input_shape,
    activation_range,
    pass_shape,
    shape_spelling,
)
from ..output import scratch_file
from .common import CALIBRATION_BATCH
from .load import _over_2gb
from .output import _move_out, _moved_tensors

#: A calibration shape as quantize_onnx takes it: one shape, or shapes by input name.
InputShapes = tuple[int, ...] | dict[str, tuple[int, ...]]


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Error messages name ``--input-shape`` (the CLI's option) instead of
    ``input_shape=`` while the body runs (:data:`SHAPE_SPELLING`)."""
    with shape_spelling("cli"):
        yield


def check_input_shapes(input_shape: object) -> InputShapes | None:
    """quantize_onnx's ``input_shape``: None, a sequence of positive
    integers (:func:`quantize_model`'s check) or a non-empty mapping of input
    names to such sequences. TypeError or InvalidArgumentError otherwise."""
    if input_shape is None:
        return None
    if not isinstance(input_shape, Mapping):
        return _check_input_shape(input_shape)
    if not input_shape:
        raise InvalidArgumentError("input_shape must name at least one input, got {}")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in input_shape.items():
        if not isinstance(name, str):
            raise TypeError(f"input_shape keys must be input names (str), got {name!r}")
        try:
            out[name] = _check_input_shape(shape)
        except (TypeError, InvalidArgumentError) as exc:
            raise type(exc)(f"input_shape[{name!r}]: {exc}") from None
    return out


def _declared(v: Any) -> list[int | str] | None:
    """The shape of graph input ``v``: a size per fixed dimension, the name
    (``""`` if none) of each symbolic one; None where the model has none."""
    tt = v.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param
        for d in tt.shape.dim
    ]


def _declared_text(dims: list[int | str] | None) -> str:
    if dims is None:
        return "no shape in the model"
    return "shape [" + ", ".join(str(d) if d != "" else "?" for d in dims) + "]"


def _shape_text(dims: Sequence[str]) -> str:
    """One shape as the caller writes it: ``(8, 16)`` or ``8,16``."""
    if SHAPE_SPELLING.get() == "cli":
        return ",".join(dims)
    one = len(dims) == 1 and dims[0].isdigit()
    return "(" + ", ".join(dims) + ("," if one else "") + ")"


def _shape_arg(shapes: dict[str, list[str]], several: bool) -> str:
    """The argument that passes ``shapes``: ``input_shape=(8, 16)`` /
    ``input_shape={'x': (8, 16), ...}`` or ``--input-shape 8,16`` /
    ``--input-shape x=8,16 ...`` (by name where the model has ``several``
    inputs)."""
    cli = SHAPE_SPELLING.get() == "cli"
    if not several:
        (dims,) = shapes.values()
        return ("--input-shape " if cli else "input_shape=") + _shape_text(dims)
    if cli:
        return "--input-shape " + " ".join(
            f"{shlex.quote(name)}={_shape_text(dims)}" for name, dims in shapes.items()
        )
    return (
        "input_shape={"
        + ", ".join(f"{name!r}: {_shape_text(dims)}" for name, dims in shapes.items())
        + "}"
    )


def _option() -> str:
    """The calibration shape's argument, as the caller passes it."""
    spelling = SHAPE_SPELLING.get()
    return {"cli": "--input-shape", "example": "example_input"}.get(spelling, "input_shape=")


def _given_shapes(
    inputs: list[Any], declared: dict[str, list[int | str] | None], input_shape: InputShapes | None
) -> dict[str, tuple[int, ...]]:
    """The inputs ``input_shape`` gives a shape, by name: a mapping names
    them; one shape is the single input's, or with several inputs that of
    every input of its rank whose fixed dimensions it matches."""
    names = [v.name for v in inputs]
    if input_shape is None:
        return {}
    if not inputs:
        raise InvalidArgumentError(f"{_option().rstrip('=')} given, but the model has no input")
    if isinstance(input_shape, dict):
        unknown = [n for n in input_shape if n not in names]
        if unknown:
            raise InvalidArgumentError(
                f"{_option().rstrip('=')} names {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not an input of the model (its "
                f"inputs: {', '.join(map(repr, names))})"
            )
        return dict(input_shape)
    if len(inputs) == 1:
        return {names[0]: input_shape}

    def fits(dims: list[int | str] | None) -> bool:
        return (
            dims is not None
            and len(dims) == len(input_shape)
            and all(isinstance(d, str) or d == g for d, g in zip(dims, input_shape))
        )

    given = {v.name: input_shape for v in inputs if fits(declared[v.name])}
    if not given:
        listed = ", ".join(f"{v.name!r} ({_declared_text(declared[v.name])})" for v in inputs)
        example = _shape_arg(
            {v.name: _resolve(declared[v.name], {}, CALIBRATION_BATCH)[1] for v in inputs},
            several=True,
        )
        raise InvalidArgumentError(
            f"{_option().rstrip('=')} {_shape_text([str(d) for d in input_shape])} fits none "
            f"of the inputs (rank and fixed dimensions): {listed}; pass a shape per input, "
            f"e.g. {example}"
        )
    return given


def _resolve(
    dims: list[int | str] | None, bound: dict[str, int], batch: int
) -> tuple[list[int] | None, list[str]]:
    """An input's calibration shape from its declared one (None where a
    dimension is unknown) and its template for messages (``<K>`` for an
    unknown dimension named K): fixed sizes, symbolic dimensions named like
    one of a given input take its size, a symbolic first one ``batch``."""
    if dims is None:
        return None, ["<dims>"]
    out: list[int] | None = []
    template: list[str] = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            size: int | None = d
        elif d in bound:
            size = bound[d]
        elif i == 0:
            size = batch
        else:
            size = None
        template.append(str(size) if size is not None else f"<{d or f'dim {i}'}>")
        if size is None or out is None:
            out = None
        else:
            out.append(size)
    return out, template


def _input_feeds(model: Any, seed: int, input_shape: InputShapes | None) -> dict[str, Any]:
    """One U[0,1) batch per graph input: the shapes ``input_shape`` gives
    (:func:`_given_shapes`), the others' from the model (:func:`_resolve`:
    the batch of the first given shape, else 8, for a symbolic first
    dimension); InvalidArgumentError naming what to pass where a dimension
    stays unknown."""
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    for v in inputs:
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise InvalidArgumentError(
                f"input {v.name!r} is not float32: cannot calibrate on U[0,1) noise"
            )
    declared = {v.name: _declared(v) for v in inputs}
    given = _given_shapes(inputs, declared, input_shape)
    bound: dict[str, int] = {}
    for name, shape in given.items():
        dims = declared[name]
        if dims is not None and len(dims) == len(shape):
            for d, size in zip(dims, shape):
                if isinstance(d, str) and d:
                    bound.setdefault(d, size)
    batch = next(iter(given.values()))[0] if given else CALIBRATION_BATCH
    shapes: dict[str, tuple[int, ...]] = {}
    templates: dict[str, list[str]] = {}
    missing: list[str] = []
    for v in inputs:
        if v.name in given:
            shapes[v.name] = given[v.name]
            templates[v.name] = [str(d) for d in given[v.name]]
            continue
        dims = declared[v.name]
        resolved, templates[v.name] = _resolve(dims, bound, batch)
        if resolved is None:
            missing.append(v.name)
            continue
        shapes[v.name] = tuple(resolved)
        first = dims[0] if dims else ""
        if isinstance(first, str) and first:
            bound.setdefault(first, resolved[0])  # the batch, for the inputs after
    if missing:
        several = len(inputs) > 1
        listed = " and ".join(f"{n!r} ({_declared_text(declared[n])})" for n in missing)
        shown = templates if several else {missing[0]: templates[missing[0]]}
        holes = list(dict.fromkeys(d for n in missing for d in templates[n] if d.startswith("<")))
        raise InvalidArgumentError(
            f"the model gives no size for a dimension (other than the batch) of input"
            f"{'s' if len(missing) > 1 else ''} {listed}: pass the calibration batch's "
            f"shape{'s' if several else ''}, e.g. {_shape_arg(shown, several)} with "
            f"{', '.join(holes)} replaced by {'its size' if len(holes) == 1 else 'sizes'}"
        )
    # A negative seed counts modulo 2**64, as torch.Generator.manual_seed counts it.
    rng = np.random.default_rng(seed % 2**64)
    feeds: dict[str, Any] = {}
    for v in inputs:
        shape = shapes[v.name]
        try:
            feeds[v.name] = rng.random(shape, dtype=np.float32)
        except (MemoryError, ValueError) as exc:  # numpy's "array is too big"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidArgumentError(
                f"input {v.name!r}: the U[0,1) calibration batch of shape {shape} "
                f"cannot be made ({type(exc).__name__}: {msg})"
            ) from None
    return feeds


def _observe(model: Any, tensors: list[str], feeds: dict[str, Any], threads: int) -> list[Any]:
    """The values of ``tensors`` for one run of the float model in ORT."""
    import onnxruntime as ort
    from onnx import helper

    probe = type(model)()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in outputs:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
            outputs.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    # Removed on SIGTERM / SIGHUP too; a full $TMPDIR is named as such.
    with scratch_file("probe.onnx", "the calibration model") as path:
        import onnx

        # Over 2 GB, the tensors write_model moves out (Constant values too).
        moved = _moved_tensors(probe) if _over_2gb(probe) else []
        if moved:
            with open(path + ".data", "wb") as data:
                _move_out(moved, os.path.basename(path) + ".data", data)
        onnx.save_model(probe, path)
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            values = sess.run(tensors, feeds)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            shapes = ", ".join(f"{k!r} {tuple(v.shape)}" for k, v in feeds.items())
            raise InvalidArgumentError(
                f"calibration run on U[0,1) input ({shapes}) failed in onnxruntime: "
                f"{pass_shape(len(feeds) > 1)} ({msg})"
            ) from None
    return list(values)


def sigma_range(a: np.ndarray, bits: int, s_sigma: float) -> tuple[float, float]:
    """docs/algorithm.md section 5's range of one calibration tensor (numpy; unbiased std)."""
    a32 = np.asarray(a, dtype=np.float32).ravel()
    signed = bool((a32 < 0).any())
    part = a32 if signed else a32[a32 > 0]
    sigma = float(part.std(ddof=1, dtype=np.float64)) if part.size > 1 else 0.0
    a_max = float(a32.max()) if a32.size else 0.0
    a_min = float(a32.min()) if a32.size else 0.0
    if not (math.isfinite(sigma) and math.isfinite(a_max) and math.isfinite(a_min)):
        raise InvalidArgumentError("calibration activation is not finite (NaN or infinity)")
    return activation_range(signed, sigma, a_max, bits, s_sigma, a_min)
