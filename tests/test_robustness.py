"""Input handling, error reporting, GIL release and threading controls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import squant_rs

from conftest import make_weight, seed_for
from reference import MODES


def _weight(shape=(8, 6, 3, 3), dist="normal", key="w"):
    return make_weight(np.random.default_rng(seed_for("robust", key, shape)), shape, dist)


def _same(a, b) -> None:
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.scale.view(np.uint32), b.scale.view(np.uint32))
    assert np.array_equal(a.zero_point.view(np.uint32), b.zero_point.view(np.uint32))
    assert (a.k_flips, a.c_flips) == (b.k_flips, b.c_flips)


def test_modes_constant():
    assert squant_rs.MODES == ("squant", "squant-e", "squant-k", "squant-c")


def test_defaults_are_4_bit_squant():
    w = _weight()
    qt = squant_rs.quantize_tensor(w)
    assert qt.bits == 4 and qt.mode == "squant"
    _same(qt, squant_rs.quantize_tensor(w, bits=4, mode="squant", threads=None))


# --------------------------------------------------------------------------
# The input is never modified, whatever its layout.


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("mode", MODES)
def test_input_not_modified(dtype, mode):
    w = _weight(key=str(dtype)).astype(dtype)
    before = w.copy()
    qt = squant_rs.quantize_tensor(w, bits=3, mode=mode)
    assert w.tobytes() == before.tobytes()
    assert not np.shares_memory(qt.codes, w)
    qt.dequantize()
    assert w.tobytes() == before.tobytes()


def test_read_only_input():
    w = _weight()
    expected = squant_rs.quantize_tensor(w.copy(), bits=4)
    w.setflags(write=False)
    qt = squant_rs.quantize_tensor(w, bits=4)
    _same(qt, expected)
    assert not w.flags.writeable
    # A read-only view of a broadcast array (zero strides) as well.
    b = np.broadcast_to(w[:, :1], w.shape)
    qb = squant_rs.quantize_tensor(b, bits=4)
    _same(qb, squant_rs.quantize_tensor(np.ascontiguousarray(b), bits=4))


def _strided(w: np.ndarray) -> np.ndarray:
    big = np.zeros((w.shape[0] * 2,) + tuple(d * 3 for d in w.shape[1:]), w.dtype)
    sl = (slice(None, None, 2),) + tuple(slice(1, None, 3) for _ in w.shape[1:])
    big[sl] = w
    return big[sl]


def _transposed_back(w: np.ndarray) -> np.ndarray:
    axes = tuple(reversed(range(w.ndim)))
    return np.ascontiguousarray(w.transpose(axes)).transpose(axes)


def _unaligned(w: np.ndarray) -> np.ndarray:
    buf = np.frombuffer(b"\0" + w.tobytes(), dtype=w.dtype, offset=1)
    return buf.reshape(w.shape)


def _record_field(w: np.ndarray) -> np.ndarray:
    # a field of a packed record array: strides of 1 + itemsize bytes, not
    # whole elements, and unaligned
    rec = np.zeros(w.size, [("pad", "u1"), ("w", w.dtype)])
    rec["w"] = w.reshape(-1)
    field = rec["w"].reshape(w.shape)
    assert not field.flags.aligned or w.dtype.itemsize == 1
    return field


# Arrays equal to ``w`` in a non-contiguous or foreign layout.
LAYOUTS = {
    "fortran": np.asfortranarray,
    "transposed-back": _transposed_back,
    "strided": _strided,
    "negative-stride": lambda w: w[::-1].copy()[::-1],
    "big-endian": lambda w: w.astype(w.dtype.newbyteorder(">")),
    "little-endian": lambda w: w.astype(w.dtype.newbyteorder("<")),
    "unaligned": _unaligned,
    "record-field": _record_field,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("shape", ((8, 6, 3, 3), (9, 13), (4, 5, 7)))
def test_layouts_give_same_result(layout, dtype, shape):
    w = _weight(shape, key="layout").astype(dtype)
    arr = LAYOUTS[layout](w)
    assert np.array_equal(arr, w)
    before = arr.copy()
    for mode in MODES:
        expected = squant_rs.quantize_tensor(w, bits=4, mode=mode)
        qt = squant_rs.quantize_tensor(arr, bits=4, mode=mode)
        _same(qt, expected)
        assert arr.tobytes() == before.tobytes()
        deq = qt.dequantize()
        # w's dtype (a big-endian input may come back in native order).
        assert deq.dtype.newbyteorder("=") == np.dtype(dtype)
        assert deq.shape == shape
        assert np.array_equal(deq, expected.dequantize())


# --------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("shape", ((5, 4), (6, 3, 3), (4, 3, 3, 3), (2, 3, 2, 2, 2)))
def test_dequantize_dtype_shape_and_value(dtype, shape):
    w = _weight(shape, key="deq").astype(dtype)
    for mode in MODES:
        qt = squant_rs.quantize_tensor(w, bits=5, mode=mode)
        deq = qt.dequantize()
        assert isinstance(deq, np.ndarray)
        assert deq.dtype == dtype and deq.shape == w.shape
        bshape = (w.shape[0],) + (1,) * (w.ndim - 1)
        z = qt.zero_point.reshape(bshape)
        s = qt.scale.reshape(bshape)
        want = ((qt.codes.astype(np.float32) + z) / s).astype(dtype)
        assert np.array_equal(deq, want)
        # Within one quantization step of the original weight.
        step = (1.0 / qt.scale.astype(np.float64)).reshape(bshape)
        gap = np.abs(deq.astype(np.float64) - w.astype(np.float64))
        assert np.all(gap <= step * 1.01 + 1e-3 * np.abs(w)), mode


def test_dequantize_all_zero_and_constant_channels():
    w = np.zeros((3, 4, 3), np.float32)
    w[1] = 0.75
    w[2] = -2.5
    for mode in MODES:
        qt = squant_rs.quantize_tensor(w, bits=4, mode=mode)
        assert np.allclose(qt.dequantize(), w, rtol=1e-6, atol=1e-7)
        assert np.all(np.isfinite(qt.scale))


# --------------------------------------------------------------------------
# Bad inputs raise the right Python exception (never a PanicException,
# which derives from BaseException and escapes these pytest.raises).


@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
def test_non_finite_rejected_with_channel(bad, dtype):
    w = _weight((6, 4, 3), key="nan").astype(dtype)
    w[3, 2, 1] = bad
    with pytest.raises(ValueError) as info:
        squant_rs.quantize_tensor(w, bits=4)
    msg = str(info.value)
    assert "NaN" in msg or "infinity" in msg.lower(), msg
    assert "channel 3" in msg, msg


def test_finite_float64_overflowing_float32_is_rejected():
    """1e300 is finite in float64 but infinite once converted to float32."""
    w = _weight((4, 5), key="ovf").astype(np.float64)
    w[2, 1] = 1e300
    with pytest.raises(ValueError, match="channel 2"):
        squant_rs.quantize_tensor(w, bits=4)


@pytest.mark.parametrize(
    "channel",
    (
        [1e30, 1e30, 1e30],  # constant: s = 15 / 1e-8, s * w overflows float32
        [-3e38, 0.0, 3e38],  # mx - mn overflows float32: s would be 0
    ),
    ids=("huge-constant", "range-overflow"),
)
def test_weights_too_large_for_float32_quantizer(channel):
    w = np.zeros((3, 3), np.float32)
    w[1] = channel
    with pytest.raises(ValueError, match="channel 1"):
        squant_rs.quantize_tensor(w, bits=4)


@pytest.mark.parametrize("bits", (-1, 0, 1, 9, 16, 300, 2**40))
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        squant_rs.quantize_tensor(_weight(), bits=bits)


@pytest.mark.parametrize("bits", (4.0, "4", True, False, None, 4.5, [4]))
def test_bits_not_an_integer(bits):
    with pytest.raises(TypeError):
        squant_rs.quantize_tensor(_weight(), bits=bits)


def test_numpy_integer_bits_accepted():
    w = _weight()
    _same(
        squant_rs.quantize_tensor(w, bits=np.int64(4)),
        squant_rs.quantize_tensor(w, bits=4),
    )


@pytest.mark.parametrize("mode", ("squant-x", "", "round", "squant_k", "SQUANT-Q"))
def test_unknown_mode(mode):
    with pytest.raises(ValueError, match="mode"):
        squant_rs.quantize_tensor(_weight(), bits=4, mode=mode)


def test_mode_not_a_string():
    with pytest.raises((TypeError, ValueError)):
        squant_rs.quantize_tensor(_weight(), bits=4, mode=3)


@pytest.mark.parametrize("arr", (np.float32(1.5), np.zeros(()), np.arange(5, dtype=np.float32)))
def test_too_few_dimensions(arr):
    with pytest.raises(ValueError, match="(?i)dimension"):
        squant_rs.quantize_tensor(np.asarray(arr), bits=4)


@pytest.mark.parametrize("shape", ((0, 3), (3, 0), (2, 3, 0), (0, 0, 3, 3), (4, 2, 3, 0)))
def test_empty(shape):
    with pytest.raises(ValueError, match="(?i)empty"):
        squant_rs.quantize_tensor(np.zeros(shape, np.float32), bits=4)


@pytest.mark.parametrize(
    "dtype",
    (
        np.int8,
        np.uint8,
        np.int16,
        np.int32,
        np.int64,
        np.uint64,
        np.bool_,
        np.complex64,
        np.complex128,
        object,
    ),
)
def test_non_float_dtype(dtype):
    w = np.ones((4, 3, 3), dtype=dtype)
    with pytest.raises(TypeError) as info:
        squant_rs.quantize_tensor(w, bits=4)
    assert np.dtype(dtype).name in str(info.value), str(info.value)


@pytest.mark.parametrize("threads", ("2", 2.0, True))
def test_threads_not_an_integer(threads):
    with pytest.raises(TypeError):
        squant_rs.quantize_tensor(_weight(), bits=4, threads=threads)


@pytest.mark.parametrize("threads", (0, -1))
def test_threads_not_positive(threads):
    with pytest.raises(ValueError, match="threads"):
        squant_rs.quantize_tensor(_weight(), bits=4, threads=threads)


# --------------------------------------------------------------------------
# The GIL is released during the computation.


def test_gil_released_during_quantization():
    rng = np.random.default_rng(seed_for("gil"))
    oc = 512
    w = rng.standard_normal((oc, 256, 3, 3), dtype=np.float32)
    # Grow the tensor until one single-threaded call takes >= 60 ms.
    while True:
        t0 = time.perf_counter()
        squant_rs.quantize_tensor(w, bits=4, threads=1)
        duration = time.perf_counter() - t0
        if duration >= 0.06 or w.size >= 32 * 2**20:
            break
        w = np.concatenate([w, w])

    window: dict = {}

    def work():
        window["start"] = time.perf_counter()
        squant_rs.quantize_tensor(w, bits=4, threads=1)
        window["end"] = time.perf_counter()

    ticks = []
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    start, end = window["start"], window["end"]
    quarter = (end - start) / 4
    # Main-thread iterations in the middle half of the call: if the call held
    # the GIL there would be none (the main thread can only run before the
    # call starts or after it returns).
    middle = [t for t in ticks if start + quarter < t < end - quarter]
    assert len(middle) >= 3, (len(middle), end - start)


# --------------------------------------------------------------------------
# SQUANT_NUM_THREADS


def _run_in_subprocess(code: str, env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SQUANT_NUM_THREADS", None)
    if env_value is not None:
        env["SQUANT_NUM_THREADS"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_QUANTIZE_CODE = """
    import hashlib, json
    import numpy as np
    rng = np.random.default_rng(1234)
    w = rng.standard_normal((96, 64, 3, 3)).astype(np.float32)
    out = {}
    try:
        import squant_rs
        qt = squant_rs.quantize_tensor(w, bits=4, mode="squant")
        out["codes"] = hashlib.sha256(qt.codes.tobytes()).hexdigest()
        out["flips"] = [qt.k_flips, qt.c_flips]
    except BaseException as exc:
        out["error"] = type(exc).__name__
        out["is_value_error"] = isinstance(exc, ValueError)
        out["message"] = str(exc)
    print(json.dumps(out))
"""


def _expected_hash() -> dict:
    import hashlib

    rng = np.random.default_rng(1234)
    w = rng.standard_normal((96, 64, 3, 3)).astype(np.float32)
    qt = squant_rs.quantize_tensor(w, bits=4, mode="squant", threads=1)
    return {
        "codes": hashlib.sha256(qt.codes.tobytes()).hexdigest(),
        "flips": [qt.k_flips, qt.c_flips],
    }


@pytest.mark.parametrize("value", ("1", "2", "3", "64", None))
def test_env_num_threads_honoured(value):
    got = _run_in_subprocess(_QUANTIZE_CODE, value)
    assert "error" not in got, got
    assert got == _expected_hash()


@pytest.mark.parametrize("value", ("abc", "0", "-1", "1.5", ""))
def test_env_num_threads_invalid(value):
    got = _run_in_subprocess(_QUANTIZE_CODE, value)
    if value == "" and "error" not in got:
        # An empty variable may reasonably mean "unset".
        assert got == _expected_hash()
        return
    assert got.get("is_value_error"), got
    assert "SQUANT_NUM_THREADS" in got["message"], got


def test_explicit_threads_override_env():
    code = _QUANTIZE_CODE.replace('mode="squant")', 'mode="squant", threads=2)')
    got = _run_in_subprocess(code, "abc")
    assert got == _expected_hash()
