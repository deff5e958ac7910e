"""Peak memory of the tensor API, as a ratio to the weight's size.

    python benches/bench_memory.py [--mib 256] [--case NAME ...]

Every case runs in a fresh Python process: it imports squant_rs (and torch
where the case needs it), warms up on a tiny weight, reads its peak resident
set size (``ru_maxrss``) as the baseline, builds its input a block at a time
(no temporary larger than a block), runs the call once and reads the peak
again. ``peak / weight`` is ``(peak - baseline) / weight bytes``: the input
itself included, like "the call peaks at 1.28x a 1 GiB input". The goal is
at most 1.5x for quantize_tensor (float32 and float16), and at most one
weight-sized buffer beyond input and output for dequantize (``extra``).

Linux (``ru_maxrss`` in KiB; a child's starts at its parent's size, so the
parent stays small and imports nothing heavy). Ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from typing import Any

CHILD = r"""
import json, resource, sys
import numpy as np
case, n_elements, needs_torch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if needs_torch:
    import torch
import squant_rs

def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

IC_K = 256 * 9
oc = max(1, n_elements // IC_K)
shape = (oc, 256, 3, 3)

def weight(dtype):
    w = np.empty(shape, dtype=dtype)
    rng = np.random.default_rng(0)
    for c0 in range(0, oc, 256):
        w[c0 : c0 + 256] = rng.standard_normal(w[c0 : c0 + 256].shape, dtype=np.float32)
    return w

def quantized(dtype):
    codes = np.empty(shape, dtype=np.int8)
    rng = np.random.default_rng(0)
    for c0 in range(0, oc, 256):
        codes[c0 : c0 + 256] = rng.integers(-8, 8, codes[c0 : c0 + 256].shape, dtype=np.int8)
    scale = np.full(oc, 2.0, np.float32)
    zp = np.zeros(oc, np.float32)
    return squant_rs.QuantizedTensor(codes, scale, zp, 4, "squant", np.dtype(dtype), 0, 0)

# Warm up (thread pool, lazy imports) on a tiny weight of the same kind.
small = np.random.default_rng(1).standard_normal((64, 256, 3, 3)).astype(np.float32)
squant_rs.quantize_tensor(small).dequantize()
squant_rs.quantize_tensor(small.astype(np.float16)).dequantize()
if needs_torch:
    squant_rs.quantize_tensor(torch.from_numpy(small).half()).dequantize()
base = peak()

if case == "quantize_tensor float32":
    w = weight(np.float32); out = squant_rs.quantize_tensor(w)
    sizes = (w.nbytes, w.nbytes, out.codes.nbytes)
elif case == "quantize_tensor float16":
    w = weight(np.float16); out = squant_rs.quantize_tensor(w)
    sizes = (w.nbytes, w.nbytes, out.codes.nbytes)
elif case == "quantize_tensor torch float16 (CPU, Rust)":
    w = torch.from_numpy(weight(np.float16)); out = squant_rs.quantize_tensor(w)
    n = w.numel() * w.element_size()
    sizes = (n, n, out.codes.numel())
elif case == "dequantize float32":
    qt = quantized(np.float32); out = qt.dequantize()
    sizes = (out.nbytes, qt.codes.nbytes, out.nbytes)
elif case == "dequantize float16":
    qt = quantized(np.float16); out = qt.dequantize()
    sizes = (out.nbytes, qt.codes.nbytes, out.nbytes)
# Rows for save_quantized, load_quantized and `squant-rs info` belong here:
# build the input, run the call, set sizes = (weight, input, output) bytes.
else:
    raise SystemExit(f"unknown case {case!r}")
delta = peak() - base
print(json.dumps({"delta": delta, "weight": sizes[0], "input": sizes[1], "output": sizes[2]}))
"""

#: name -> (needs torch, goal of peak / weight or None)
CASES: dict[str, tuple[bool, float | None]] = {
    "quantize_tensor float32": (False, 1.5),
    "quantize_tensor float16": (False, 1.5),
    "quantize_tensor torch float16 (CPU, Rust)": (True, 1.5),
    "dequantize float32": (False, None),
    "dequantize float16": (False, None),
}


def run_case(name: str, n_elements: int, needs_torch: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(n_elements), "1" if needs_torch else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="float32 size of the weight, MiB")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these")
    args = parser.parse_args()
    n_elements = args.mib * 2**20 // 4
    # Not imported here: a child's ru_maxrss starts at its parent's size.
    have_torch = importlib.util.find_spec("torch") is not None
    print(f"weight: {n_elements:,} elements ({args.mib} MiB as float32), one process per case\n")
    header = f"{'case':<44}{'weight MiB':>11}{'peak / weight':>15}{'extra':>8}{'goal':>8}"
    print(header)
    print("-" * len(header))
    for name in args.case or list(CASES):
        needs_torch, goal = CASES[name]
        if needs_torch and not have_torch:
            print(f"{name:<44}{'(needs torch)':>11}")
            continue
        r = run_case(name, n_elements, needs_torch)
        ratio = r["delta"] / r["weight"]
        # Beyond the input and the output: temporaries of the call.
        extra = (r["delta"] - r["input"] - r["output"]) / r["weight"]
        goal_text = f"<= {goal}" if goal is not None else "-"
        print(f"{name:<44}{r['weight'] / 2**20:>11.0f}{ratio:>14.2f}x{extra:>7.2f}x{goal_text:>8}")
    print(
        "\npeak / weight: (peak RSS - RSS after imports) / weight bytes, input included."
        "\nextra: the same, less the input and the output (temporaries of the call)."
    )


if __name__ == "__main__":
    main()
