"""Activation ranges without torch: the sigma rule on one U[0,1) batch in ORT."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._squant_rs import InvalidArgumentError
from ...model.activations import activation_range
from ..output import scratch_file
from .common import CALIBRATION_BATCH, EXTERNAL_ABOVE
from .load import _tensor_bytes


def _input_feeds(model: Any, seed: int, input_shape: Sequence[int] | None) -> dict[str, Any]:
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for v in inputs:
        tt = v.type.tensor_type
        if tt.elem_type != TensorProto.FLOAT:
            raise InvalidArgumentError(
                f"input {v.name!r} is not float32: cannot calibrate on U[0,1) noise"
            )
        dims: list[int] = []
        if input_shape is not None and len(inputs) == 1:
            dims = [int(d) for d in input_shape]
        else:
            for i, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                elif i == 0:
                    dims.append(CALIBRATION_BATCH)
                else:
                    raise InvalidArgumentError(
                        f"input {v.name!r} has a symbolic dimension {i}: give input_shape="
                    )
        feeds[v.name] = rng.random(tuple(dims), dtype=np.float32)
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

        onnx.save_model(probe, path, save_as_external_data=_tensor_bytes(probe) >= EXTERNAL_ABOVE)
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            values = sess.run(tensors, feeds)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidArgumentError(
                f"calibration run on U[0,1) input failed in onnxruntime ({msg}); "
                "give input_shape= matching the model's input"
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
