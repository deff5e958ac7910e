"""`quantize_tensors`: many weights in one call.

The results equal ``quantize_tensor`` on each weight; what changes is the
cost. Weights for the Rust core run in one parallel pass (the threads share
the weights and their channels, with no per-call start-up), and weights for
the torch backend (CUDA) are grouped by trailing shape and quantized one
group at a time, which divides the number of kernel launches -- the cost
that dominates on a GPU -- by the number of weights per group. Every SQuant
step is per output channel, so both are exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .. import _squant_rs as _native
from ..errors import SquantError
from .quantized import (
    QuantizedTensor,
    _is_torch_tensor,
    as_float32_array,
    from_native,
)
from .validate import (
    UnsupportedDtypeError,
    check_backend,
    check_bits,
    check_mode,
    check_quantizer,
    check_threads,
    with_weight_index,
)


def quantize_tensors(
    weights: Iterable[Any],
    bits: int = 4,
    mode: str = "squant",
    *,
    backend: str = "auto",
    threads: int | None = None,
    quantizer: str = "asymmetric",
) -> list[QuantizedTensor]:
    """Quantize every weight of ``weights`` with SQuant, in one call.

    Accepts what :func:`quantize_tensor` accepts (numpy arrays and torch
    tensors, mixed shapes, dtypes and devices) with the same ``bits``,
    ``mode``, ``backend``, ``threads`` and ``quantizer``, and returns the list of
    :class:`QuantizedTensor` that ``quantize_tensor`` would return for each,
    in order, bit for bit. Inputs are never modified.

    Returns:
        A list of :class:`QuantizedTensor`, one per weight, in order.

    Raises:
        The exceptions of :func:`quantize_tensor` (``SquantError``
        subclasses, ``UnsupportedDtypeError``, ``TypeError``,
        ``MemoryError``), for the first bad weight (the lowest position
        whose own ``quantize_tensor`` call would raise, whatever the kind of
        error), with the weight's position in front of the message:
        ``"weight 3: ..."``.
    """
    bits = check_bits(bits)
    mode = check_mode(mode)
    quantizer = check_quantizer(quantizer)
    backend = check_backend(backend)
    threads = check_threads(threads)
    ws = list(weights)
    out: list[QuantizedTensor | None] = [None] * len(ws)

    native_idx: list[int] = []
    native_arrays: list[Any] = []
    native_dtypes: list[Any] = []
    native_devices: list[Any] = []  # None: numpy input; else the torch device
    torch_idx: list[int] = []
    torch_ws: list[Any] = []
    # The weights are routed up to the first one that fails its shape, dtype
    # or size check; one call per weight would fail first on a bad value of
    # an earlier weight, so those are still quantized (which checks their
    # values) and the error of the lowest-index bad weight is raised.
    errors: list[tuple[int, Exception]] = []
    for i, w in enumerate(ws):
        try:
            if _is_torch_tensor(w):
                from ..torch.adapter import check_torch_memory, check_torch_weight, host_float32

                check_torch_weight(w)
                w = w.detach()
                if backend == "torch" or (backend == "auto" and w.device.type != "cpu"):
                    torch_idx.append(i)
                    torch_ws.append(w)
                    continue
                check_torch_memory(w, False)
                a32, dtype, device = host_float32(w, bits, quantizer), w.dtype, w.device
            else:
                a32, dtype = as_float32_array(w, bits, quantizer)
                device = None
        except (SquantError, TypeError, UnsupportedDtypeError, MemoryError) as exc:
            errors.append((i, with_weight_index(exc, i)))
            break
        native_idx.append(i)
        native_arrays.append(a32)
        native_dtypes.append(dtype)
        native_devices.append(device)

    if native_arrays:
        try:
            results = _native.quantize_many(native_arrays, bits, mode, threads, quantizer)
        except (SquantError, MemoryError) as exc:
            # quantize_many names the position in its own list: the first bad one
            k = _weight_of(exc)
            if k is None or not 0 <= k < len(native_idx):
                raise
            i = native_idx[k]
            errors.append((i, type(exc)(f"weight {i}: {_WEIGHT.sub('', str(exc), count=1)}")))
        else:
            for i, res, dtype, device in zip(native_idx, results, native_dtypes, native_devices):
                out[i] = from_native(res, bits, mode, dtype, device, quantizer)
    if torch_ws:
        from ..torch.adapter import quantize_torch_tensors

        first = min((i for i, _ in errors), default=len(ws))
        keep = [p for p, i in enumerate(torch_idx) if i < first]
        try:
            qts = quantize_torch_tensors(
                [torch_ws[p] for p in keep], bits, mode, [torch_idx[p] for p in keep], quantizer
            )
        except (SquantError, UnsupportedDtypeError, MemoryError) as exc:
            at = _weight_of(exc)
            if at is None:
                raise
            errors.append((at, exc))
        else:
            for p, qt in zip(keep, qts):
                out[torch_idx[p]] = qt
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return [qt for qt in out if qt is not None]


_WEIGHT = re.compile(r"^weight (\d+): ")


def _weight_of(exc: BaseException) -> int | None:
    """The position that an error of a call over many weights names."""
    m = _WEIGHT.match(str(exc))
    return int(m.group(1)) if m else None
