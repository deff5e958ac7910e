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
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
try:  # reset the peak to the current resident size (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
if sys.argv[1] == "quantize":
    sio.quantize_checkpoint(sys.argv[2], sys.argv[3], 4, threads=2)
elif sys.argv[1] == "info":
    sio.inspect_quantized(sys.argv[2])
else:
    sio.verify_quantized(sys.argv[2], threads=2)
peak = max(status("VmHWM"), before)
assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, peak)  # KiB
"""


def _peak_mib(*argv: str) -> tuple[float, float]:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr
    before, after = (int(x) for x in p.stdout.split())
    return before / 1024, after / 1024


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
