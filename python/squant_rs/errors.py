"""The exceptions squant-rs raises, defined once, in Python.

The native module raises these very classes (it imports them from here), so
they are ordinary Python exceptions: they pickle by reference to their
public home ``squant_rs`` (``__module__ == "squant_rs"``), which lets them
cross process boundaries (``multiprocessing``, ``ProcessPoolExecutor``), and
tracebacks show ``squant_rs.InvalidArgumentError``.

Hierarchy::

    ValueError
      SquantError                 bad values (weights, arguments, files)
        NonFiniteWeightError      NaN or infinity in a weight
        WeightRangeError          values too large for the float32 quantizer
        InvalidArgumentError      an argument or setting out of range
        FormatError               a file that is not a valid squant-rs file
    TypeError
      UnsupportedDtypeError       a weight dtype or layout that is not supported

This module imports nothing from the package, so it is safe to import first.
"""

__all__ = [
    "FormatError",
    "InvalidArgumentError",
    "NonFiniteWeightError",
    "SquantError",
    "UnsupportedDtypeError",
    "WeightRangeError",
]


class SquantError(ValueError):
    """Base class of squant-rs errors about values (a ValueError)."""


class NonFiniteWeightError(SquantError):
    """The weight holds NaN or infinity; the message names the output channel."""


class WeightRangeError(SquantError):
    """A channel's values are too large for the float32 quantizer, or its
    dequantized values would not be finite in the output dtype; the message
    names the output channel."""


class InvalidArgumentError(SquantError):
    """An argument (bits, mode, shape, threads, ...) or setting
    (``SQUANT_NUM_THREADS``) is out of range."""


class FormatError(SquantError):
    """The file is not a valid squant-rs file (not safetensors, truncated,
    corrupt, or an unsupported format version)."""


class UnsupportedDtypeError(TypeError):
    """The weight's dtype (or layout) is not a supported floating type."""


# Public home: pickling finds the classes as ``squant_rs.<name>``.
for _cls in (
    SquantError,
    NonFiniteWeightError,
    WeightRangeError,
    InvalidArgumentError,
    FormatError,
    UnsupportedDtypeError,
):
    _cls.__module__ = "squant_rs"
del _cls
