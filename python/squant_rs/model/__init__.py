"""Model-level SQuant: quantize every Conv/Linear weight of a torch model, and
optionally add the paper's data-free activation quantizers (docs/algorithm.md section 5).

This module imports torch lazily, so ``import squant_rs`` works without it.

Weights
    Every ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (grouped and depthwise
    included) and ``nn.Linear`` weight of a deep copy of the model is replaced
    by its SQuant-dequantized value, in place, with the same dtype and device.
    The copy's ``state_dict()`` holds ordinary float tensors under the
    original names. ``ConvTranspose`` layers (a different weight layout) and
    parametrized weights are left float and listed in ``report.skipped``.

Activations (``abits=...``)
    A per-tensor :class:`ActivationQuantizer` is registered as a forward
    pre-hook on every quantized layer and fake-quantizes the layer's first
    positional input (an ``nn.MultiheadAttention``'s packed input
    projection ``<attention>.in_proj``: a pre-hook on the attention
    quantizes its query, key and value with one range, from the distinct
    ones pooled; ``out_proj``'s input, computed inside the attention's
    forward, stays float). Ranges are fixed once, before inference, from one
    batch of ``U[0, 1)`` noise of ``input_shape`` drawn with
    ``torch.rand(input_shape, generator=torch.Generator().manual_seed(seed))``
    (then moved to the model's device and floating dtype), with the sigma
    rule of docs/algorithm.md section 5. The first quantized layer to run keeps a float
    input, the last to run gets 8 bits; "first" and "last" are in execution
    order of that pass. A layer that runs more than once is calibrated on
    its first call; a layer that never runs during calibration keeps a float
    input (its report row shows no activation range).

    ``calibration="float"`` (default) measures the statistics on the float
    model, so every layer's range is independent of the weight bit width
    and of the quantizers upstream. ``calibration="quantized"`` reproduces
    the release instead: weights are quantized first and, in one pass, each
    layer's range is fixed on its first call and applied at once, so the
    layers downstream see quantized activations.
"""

from .activations import (
    CALIBRATIONS,
    DEFAULT_INPUT_SHAPE,
    S_SIGMA_TABLE,
    ActivationQuantizer,
    activation_qparams,
    activation_range,
    default_s_sigma,
)
from .fold import BatchNormFold, fold_batchnorm
from .layers import check_patterns, matches_any, relative_error, select_layers
from .pipeline import activation_quantizers, quantize_model
from .report import LayerReport, QuantReport, format_bytes, format_table

__all__ = [
    "CALIBRATIONS",
    "DEFAULT_INPUT_SHAPE",
    "S_SIGMA_TABLE",
    "ActivationQuantizer",
    "BatchNormFold",
    "LayerReport",
    "QuantReport",
    "activation_qparams",
    "activation_quantizers",
    "activation_range",
    "check_patterns",
    "default_s_sigma",
    "fold_batchnorm",
    "format_bytes",
    "format_table",
    "matches_any",
    "quantize_model",
    "relative_error",
    "select_layers",
]
