"""squant-rs: SQuant (Guo et al., ICLR 2022) on-the-fly, data-free weight
quantization with a Rust core.

Quick start::

    import numpy as np, squant_rs
    w = np.random.randn(64, 32, 3, 3).astype(np.float32)
    qt = squant_rs.quantize_tensor(w, bits=4)          # mode="squant" (E+K+C)
    qt.codes, qt.scale, qt.zero_point, qt.dequantize()
    qts = squant_rs.quantize_tensors([w, w[:8]], bits=4)   # many in one call
"""

# No ``from __future__ import annotations`` here: it would leave a public
# ``annotations`` name in the package namespace.
from ._squant_rs import __version__
from .errors import (
    FormatError,
    InvalidArgumentError,
    NonFiniteWeightError,
    SquantError,
    UnsupportedDtypeError,
    WeightRangeError,
)
from .formats.onnx import OnnxFormatError, export_onnx, quantize_onnx
from .formats.safetensors import (
    CheckpointResult,
    QuantizedFileInfo,
    TensorInfo,
    inspect_quantized,
    load_quantized,
    quantize_checkpoint,
    save_quantized,
    select_state_dict,
    verify_quantized,
)
from .model import (
    DEFAULT_INPUT_SHAPE,
    ActivationQuantizer,
    LayerReport,
    QuantReport,
    default_s_sigma,
    quantize_model,
)
from .tensor.batch import quantize_tensors
from .tensor.quantized import QuantizedTensor, quantize_tensor
from .tensor.validate import BACKENDS, MODES

__all__ = [
    "BACKENDS",
    "DEFAULT_INPUT_SHAPE",
    "MODES",
    "ActivationQuantizer",
    "CheckpointResult",
    "FormatError",
    "InvalidArgumentError",
    "LayerReport",
    "NonFiniteWeightError",
    "OnnxFormatError",
    "QuantReport",
    "QuantizedFileInfo",
    "QuantizedTensor",
    "SquantError",
    "TensorInfo",
    "UnsupportedDtypeError",
    "WeightRangeError",
    "__version__",
    "default_s_sigma",
    "export_onnx",
    "inspect_quantized",
    "load_quantized",
    "quantize_model",
    "quantize_onnx",
    "quantize_tensor",
    "quantize_tensors",
    "quantize_checkpoint",
    "save_quantized",
    "select_state_dict",
    "verify_quantized",
]
