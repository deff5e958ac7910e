"""squant-rs: SQuant (Guo et al., ICLR 2022) on-the-fly, data-free weight
quantization with a Rust core.

Quick start::

    import numpy as np, squant_rs
    w = np.random.randn(64, 32, 3, 3).astype(np.float32)
    qt = squant_rs.quantize_tensor(w, bits=4)          # mode="squant" (E+K+C)
    qt.codes, qt.scale, qt.zero_point, qt.dequantize()
    qts = squant_rs.quantize_tensors([w, w[:8]], bits=4)   # many in one call
"""

from __future__ import annotations

from ._squant_rs import (
    InvalidArgumentError,
    NonFiniteWeightError,
    SquantError,
    WeightRangeError,
    __version__,
)
from .formats.onnx import OnnxFormatError, export_onnx, quantize_onnx
from .formats.safetensors import FormatError, load_quantized, save_quantized
from .model import ActivationQuantizer, LayerReport, QuantReport, quantize_model
from .tensor.batch import quantize_tensors
from .tensor.quantized import QuantizedTensor, quantize_tensor
from .tensor.validate import BACKENDS, MODES, UnsupportedDtypeError

__all__ = [
    "BACKENDS",
    "MODES",
    "ActivationQuantizer",
    "FormatError",
    "InvalidArgumentError",
    "LayerReport",
    "NonFiniteWeightError",
    "OnnxFormatError",
    "QuantReport",
    "QuantizedTensor",
    "SquantError",
    "UnsupportedDtypeError",
    "WeightRangeError",
    "__version__",
    "export_onnx",
    "load_quantized",
    "quantize_model",
    "quantize_onnx",
    "quantize_tensor",
    "quantize_tensors",
    "save_quantized",
]
