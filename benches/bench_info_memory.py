"""Peak memory of ``squant-rs info`` on a large file: it must read the header
only, not the tensor data.

Writes a squant-rs file of ``--size-mib`` MiB (default 1024: one large
tensor stored unchanged), then runs three child processes and reads each
one's peak resident set size (``ru_maxrss`` from ``os.wait4``):

  * ``import squant_rs.cli`` alone (the baseline: Python + numpy + the extension);
  * ``squant-rs info FILE``;
  * ``read_safetensors(FILE)``, which reads the whole file (for comparison).

Prints each peak and (peak - baseline) / file size, all from this one run.

    python benches/bench_info_memory.py [--size-mib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from squant_rs.formats.safetensors import RawTensor, write_safetensors

META = {"format": "squant-rs", "format_version": "1", "squant_rs_version": "bench"}


def peak_rss(argv: list[str]) -> int:
    """Peak resident set size of a child process, in bytes."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with status {proc.returncode}")
    # Linux reports KiB, macOS bytes.
    return usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where to write the file (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "big.safetensors")
        n = args.size_mib << 20
        # np.zeros is backed by the zero page: this process stays small too.
        blob = RawTensor("U8", (n,), np.zeros(n, np.uint8))
        write_safetensors(path, {"blob": blob}, dict(META, quantized="{}"))
        del blob
        size = os.path.getsize(path)
        py = sys.executable
        runs = {
            "import squant_rs.cli (baseline)": [py, "-c", "import squant_rs.cli"],
            "squant-rs info FILE": [py, "-m", "squant_rs", "info", path],
            "read_safetensors(FILE) (whole file)": [
                py,
                "-c",
                "import sys; from squant_rs.formats.safetensors import read_safetensors; "
                "read_safetensors(sys.argv[1])",
                path,
            ],
        }
        peaks = {label: peak_rss(argv) for label, argv in runs.items()}
    base = peaks["import squant_rs.cli (baseline)"]
    print(f"file size {size / 2**20:.0f} MiB")
    print(f"{'process':<38}{'peak RSS':>12}{'(peak - baseline) / file size':>32}")
    for label, peak in peaks.items():
        print(f"{label:<38}{peak / 2**20:>9.1f} MiB{(peak - base) / size:>32.4f}")


if __name__ == "__main__":
    main()
