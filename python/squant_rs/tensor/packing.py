"""Bit packing of integer codes for the squant-rs file format (vectorized numpy).

Codes of ``b`` bits live in ``[-2^(b-1), 2^(b-1) - 1]``. They are stored
offset to unsigned, ``u = q + 2^(b-1)`` in ``[0, 2^b - 1]``, and packed in
row-major element order, the first code of a byte in its lowest bits:

=========  ==============  =========================================
bits       codes per byte  byte ``k`` holds
=========  ==============  =========================================
2          4               ``u[4k] | u[4k+1] << 2 | u[4k+2] << 4 | u[4k+3] << 6``
3, 4       2               ``u[2k] | u[2k+1] << 4``
5 .. 8     1               ``u[k]``
=========  ==============  =========================================

The last byte is padded with zero codes when the element count is not a
multiple of the codes per byte; the unpacker ignores the padding.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from .validate import check_bits


def codes_per_byte(bits: int) -> int:
    """How many ``bits``-bit codes one byte holds (4, 2 or 1)."""
    bits = check_bits(bits)
    if bits == 2:
        return 4
    if bits <= 4:
        return 2
    return 1


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` packed codes of ``bits`` bits."""
    per = codes_per_byte(bits)
    return -(-int(count) // per)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integer ``codes`` (any shape, read in C order) into a 1-D
    ``uint8`` array of :func:`packed_size` bytes."""
    per = codes_per_byte(bits)
    offset = 1 << (bits - 1)
    flat = np.asarray(codes).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise InvalidArgumentError(f"codes must be integers, got dtype {flat.dtype}")
    # Range-checked in the codes' own dtype: a cast first would wrap values
    # beyond int16 (65539 -> 3) into range.
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < -offset or hi > offset - 1:
            raise InvalidArgumentError(
                f"codes out of range for {bits} bits: expected values in "
                f"[{-offset}, {offset - 1}], got [{lo}, {hi}]"
            )
    unsigned = (flat.astype(np.int16) + np.int16(offset)).astype(np.uint8)
    if per == 1:
        return unsigned
    pad = (-unsigned.size) % per
    if pad:
        unsigned = np.concatenate([unsigned, np.zeros(pad, dtype=np.uint8)])
    width = 8 // per
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(width)).astype(np.uint8)
    lanes = unsigned.reshape(-1, per) << shifts
    packed: np.ndarray = np.bitwise_or.reduce(lanes, axis=1).astype(np.uint8, copy=False)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` signed codes as 1-D ``int8``.

    Raises :class:`InvalidArgumentError` when ``packed`` has the wrong size or
    holds a value that no ``bits``-bit code packs to (only possible for
    3-bit codes, stored in 4-bit lanes).
    """
    per = codes_per_byte(bits)
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    expected = packed_size(count, bits)
    if data.size != expected:
        raise InvalidArgumentError(
            f"packed codes have {data.size} bytes, expected {expected} for "
            f"{count} codes of {bits} bits"
        )
    if per == 1:
        unsigned = data
    else:
        width = 8 // per
        shifts = (np.arange(per, dtype=np.uint8) * np.uint8(width)).astype(np.uint8)
        mask = np.uint8((1 << width) - 1)
        unsigned = ((data[:, None] >> shifts) & mask).reshape(-1)[:count]
    if unsigned.size and int(unsigned.max()) > (1 << bits) - 1:
        raise InvalidArgumentError(f"packed codes hold values that are not {bits}-bit codes")
    offset = np.int16(1 << (bits - 1))
    return (unsigned.astype(np.int16) - offset).astype(np.int8)
