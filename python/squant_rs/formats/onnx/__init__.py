"""Quantized ONNX (QDQ) out of ONNX files (:func:`quantize_onnx`, numpy +
onnx + onnxruntime, no torch) and out of torch models (:func:`export_onnx`).

Both share one graph rewrite:

* every float32 initializer a Conv / Gemm / MatMul node of the main graph
  reads as its weight (second) input, 2-D for Gemm and MatMul, is replaced by
  ``DequantizeLinear(codes, 1/s, -z, axis=<output-channel axis>)``: codes
  ``int4`` at 2-4 bits and ``int8`` at 5-8 bits (opset 21); the zero point
  ``-z`` in the code type where every channel's fits, else in the next
  container that holds it exactly (int8, int16, int32), codes with it; a
  channel whose zero point would need a wider type than an exact integer
  form of its values (constant channels) takes that form, zero point 0,
  its codes as large as the type holds (a fine int32 bias step,
  :func:`_weight_encoding`). The
  output-channel axis is 0 for Conv and Gemm with ``transB=1`` and 1 for
  Gemm with ``transB=0`` and MatMul. ONNX computes ``(q - zp) * (1/s)``
  where squant-rs computes ``(q + z) / s``: the dequantized weights agree
  within one float32 ulp.
* with ``abits``: a per-tensor ``QuantizeLinear``/``DequantizeLinear`` pair
  on the input of every quantized layer but the first (docs/algorithm.md section 5: the
  first layer's input stays float, the last layer's is 8-bit; below 8 bits
  a ``Clip`` to the b-bit range comes first), and the layer's bias as
  ``DequantizeLinear(int32, a_scale * w_scale[c])`` so that onnxruntime's
  own ``WeightBiasQuantization`` has nothing left to re-quantize (a bias
  with a code beyond int32: a float ``Add`` after the layer instead, and a
  note; that layer gets no integer kernel).
  Activations are uint8 (signed ranges with zero point ``128 - z``).
* with ``integer_kernels``: one ``QuantizeLinear`` right after the producer
  of every activation tensor between quantized ops (layer outputs, residual
  Add inputs and outputs, pooling / Flatten paths) and one
  ``DequantizeLinear`` for its readers, the placement onnxruntime's QDQ
  fusion turns into QLinearConv / QGemm / QLinearAdd.

onnx and onnxruntime are imported lazily (``pip install 'squant-rs[onnx]'``).
"""

from .common import OPSET, OnnxFormatError
from .export import export_onnx
from .quantize import quantize_onnx
from .rewrite import code_container as code_container

__all__ = ["OPSET", "OnnxFormatError", "export_onnx", "quantize_onnx"]
