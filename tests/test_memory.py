"""Bounded memory: quantizing a 256 MiB bfloat16 checkpoint, then `info`
and `info --verify` on the result, each in a fresh subprocess that reports
its own peak resident memory (``VmHWM``, reset after the imports). Not a timing test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

resource = pytest.importorskip("resource")

MIB = 1 << 20
SHAPE = (4096, 4096)  # one bf16 tensor: 32 MiB
COUNT = 8  # 256 MiB of tensor data


def _write_big(path: Path) -> None:
    """A bf16 safetensors file written in slices (the test process never
    holds it whole)."""
    nbytes = SHAPE[0] * SHAPE[1] * 2
    header = {
        f"layers.{i}.weight": {
            "dtype": "BF16",
            "shape": list(SHAPE),
            "data_offsets": [i * nbytes, (i + 1) * nbytes],
        }
        for i in range(COUNT)
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _ in range(COUNT):
            for _ in range(8):
                w = rng.standard_normal(SHAPE[0] * SHAPE[1] // 8, dtype=np.float32)
                f.write((w.view(np.uint32) >> 16).astype(np.uint16).tobytes())


CHILD = """
import resource, sys
import squant_rs.formats.safetensors as sio
from squant_rs import FormatError
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
if sys.argv[1] == "save":  # the input weight exists before the measurement
    import numpy as np
    dtype = np.dtype(sys.argv[3])
    w = np.empty((8192, 4096), dtype)
    for c0 in range(0, 8192, 512):
        w[c0 : c0 + 512] = np.random.default_rng(c0).standard_normal((512, 4096), np.float32)
try:  # reset the peak to the current resident size (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
if sys.argv[1] == "quantize":
    sio.quantize_checkpoint(sys.argv[2], sys.argv[3], 4, threads=2)
elif sys.argv[1] == "save":
    sio.save_quantized({"layer.weight": w}, sys.argv[2], 4, threads=2)
elif sys.argv[1] == "info":
    try:
        sio.inspect_quantized(sys.argv[2])
    except FormatError as exc:  # a crafted header, refused: its message
        print(exc, file=sys.stderr)
else:
    sio.verify_quantized(sys.argv[2], threads=2)
peak = max(status("VmHWM"), before)
assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, peak)  # KiB
"""


def _peak_mib(*argv: str, stderr: list[str] | None = None) -> tuple[float, float]:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    if stderr is not None:
        stderr.append(p.stderr)
    before, after = (int(x) for x in p.stdout.split())
    return before / 1024, after / 1024


def _raw_safetensors(path: Path, header: bytes, data: bytes) -> int:
    """A safetensors file of that header text (padded to 8 bytes) and data;
    the header's size."""
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)
    return len(header)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and ru_maxrss in KiB (Linux)")
def test_quantize_info_verify_memory_is_bounded(tmp_path) -> None:
    src, dst = tmp_path / "big.safetensors", tmp_path / "q.safetensors"
    _write_big(src)
    tensor_mib = SHAPE[0] * SHAPE[1] * 2 / MIB
    base, peak = _peak_mib("quantize", str(src), str(dst))
    # The whole file is 256 MiB: a reader that loaded it (or a float32 copy
    # of it, 512 MiB) would be far above this bound.
    assert peak - base < 2 * tensor_mib + 64, (base, peak)
    base, peak = _peak_mib("info", str(dst))
    assert peak - base < 16, (base, peak)  # the header only
    base, peak = _peak_mib("verify", str(dst))
    assert peak - base < 2 * tensor_mib + 64, (base, peak)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and ru_maxrss in KiB (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_quantized_holds_no_dequantized_copy(tmp_path, dtype: str) -> None:
    """save_quantized of one 8192x4096 weight: beyond the input, the codes
    (one byte per element) and block-sized temporaries, nothing weight-sized
    (the report's relative error is taken a block of channels at a time)."""
    elements = 8192 * 4096
    weight_mib = elements * np.dtype(dtype).itemsize / MIB
    base, peak = _peak_mib("save", str(tmp_path / "w.safetensors"), dtype)
    codes_mib = elements / MIB
    # A dequantized float32 copy of the weight alone would add 128 MiB.
    assert peak - base < codes_mib + 0.25 * weight_mib + 48, (base, peak)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and ru_maxrss in KiB (Linux)")
@pytest.mark.parametrize("case", ["dims", "tensors"])
def test_info_memory_follows_the_header(tmp_path, case: str) -> None:
    """`info` (the header only) of a large header holds a small multiple of
    the header's size: the header was parsed into a generic JSON tree, tens
    of bytes per number (a 40 MB header whose shape lists 20 M dimensions
    took 2.4 GB, and aborted under a memory limit; 100 k small tensors 26
    times the header), then parsed again."""
    path = tmp_path / "h.safetensors"
    if case == "dims":
        n = 20_000_000
        shape = b"1," * (n - 1) + b"1"
        header = b'{"a":{"dtype":"U8","shape":[' + shape + b'],"data_offsets":[0,1]}}'
        size = _raw_safetensors(path, header, b"\0")
    else:
        count = 100_000
        header = json.dumps(
            {
                f"t{i}.weight": {"dtype": "U8", "shape": [2, 2], "data_offsets": [4 * i, 4 * i + 4]}
                for i in range(count)
            }
        ).encode()
        size = _raw_safetensors(path, header, bytes(4 * count))
    messages: list[str] = []
    base, peak = _peak_mib("info", str(path), stderr=messages)
    assert peak - base < 3 * size / MIB + 16, (base, peak, size)
    if case == "dims":  # refused as it is read: at most 64 dimensions
        assert messages == [
            f"{path}: tensor 'a' has {n} dimensions; squant-rs handles at most 64\n"
        ]
    else:
        assert messages == [
            f"{path}: not a squant-rs file (a safetensors file without squant-rs metadata)\n"
        ]
