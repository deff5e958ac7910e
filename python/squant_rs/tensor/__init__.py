"""The tensor API: quantize one weight (:func:`quantize_tensor`) or many in
one call (:func:`quantize_tensors`). numpy arrays and CPU tensors go to the
Rust core; CUDA tensors (or ``backend="torch"``) to :mod:`squant_rs.torch`.

Imports flow one way: ``validate`` -> ``quantized`` -> ``batch``; the torch
path is imported lazily, only for torch input."""

from .batch import quantize_tensors
from .quantized import QuantizedTensor, quantize_tensor

__all__ = ["QuantizedTensor", "quantize_tensor", "quantize_tensors"]
