"""The opset and limits of the ONNX support, its error, and the lazy onnx
import."""

from __future__ import annotations

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


def require_onnx() -> Any:
    """Import onnx or explain how to get it."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - exercised without onnx
        raise ImportError("ONNX support needs onnx: pip install 'squant-rs[onnx]'") from exc
    return onnx
