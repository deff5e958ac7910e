"""The opset and limits of the ONNX support, its error, and the lazy onnx
import."""

from __future__ import annotations

import importlib
from typing import Any

from ..safetensors import FormatError

#: Opset of every written model (int4 DequantizeLinear needs 21).
OPSET = 21
#: Lowest opset the version converter takes reliably.
MIN_OPSET = 7
#: Above this many bytes of tensor data the model is written with external data.
EXTERNAL_ABOVE = 2**31 - 2**26
#: Ops of an already quantized graph.
QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
    }
)
#: Calibration batch for inputs with a symbolic batch dimension.
CALIBRATION_BATCH = 8


class OnnxFormatError(FormatError):
    """An ONNX input squant-rs cannot quantize: not ONNX, truncated or
    corrupt, an unsupported opset, already quantized, or nothing to
    quantize."""


#: How to get the packages of the ONNX support.
ONNX_INSTALL_HINT = "pip install 'squant-rs[onnx]'"


def _require(module: str, what: str) -> Any:
    """Import ``module`` or explain how to get the package that is missing
    (the one named by the ImportError: onnx itself imports ml_dtypes)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).partition(".")[0]
        raise ImportError(f"{what} needs {missing}: {ONNX_INSTALL_HINT}", name=missing) from exc


def require_onnx() -> Any:
    """Import onnx or explain how to get it."""
    return _require("onnx", "ONNX support")


def require_onnx_packages(*, int4: bool, runtime: bool) -> None:
    """Import, before any work, what the ONNX path will need: onnx,
    ml_dtypes for ``int4`` codes (2-4 bit weights) and, with ``runtime``,
    onnxruntime (the calibration run). Raises ImportError naming the missing
    package and how to install it."""
    require_onnx()
    if int4:
        _require("ml_dtypes", "writing int4 weights (2-4 bits)")
    if runtime:
        _require("onnxruntime", "calibrating activation ranges")
