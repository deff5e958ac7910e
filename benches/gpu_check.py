"""GPU check: time 4-bit SQuant of whole ResNet-18/50 weight sets on CUDA.

Uses the vectorized torch backend (``backend="auto"`` routes CUDA tensors to
it), CUDA events, warm-up runs and the median of several runs, two ways:
one ``quantize_tensor`` call per weight, and one ``quantize_tensors`` call
for the whole set (weights sharing a trailing shape quantized together).
The Rust backend on the host CPU is timed in the same run for the ratio.
Goal on an H100: ResNet-50 <= 20 ms (the paper: 188 ms on an A100).

    python benches/gpu_check.py [--repeat 20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import squant_rs
from squant_rs._shapes import he_weights, resnet_shapes

from _timing import median_ms  # benches/ is the script's directory

PAPER_A100_MS = {18: 84.0, 50: 188.0}


def cuda_ms(fn, repeat: int) -> float:
    for _ in range(3):  # warm-up: kernels, allocator, cuBLAS-free but lazy init
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    dev = torch.cuda.get_device_name(0)
    rows = []
    for depth in (18, 50):
        host = [torch.from_numpy(w) for w in he_weights(resnet_shapes(depth)).values()]
        gpu = [w.cuda() for w in host]
        params = sum(w.numel() for w in host)

        def run_gpu(gpu: list[torch.Tensor] = gpu) -> None:
            for w in gpu:
                squant_rs.quantize_tensor(w, args.bits)

        def run_batch(gpu: list[torch.Tensor] = gpu) -> None:
            squant_rs.quantize_tensors(gpu, args.bits)

        def run_rust(host: list[torch.Tensor] = host) -> None:
            for w in host:
                squant_rs.quantize_tensor(w, args.bits, backend="rust")

        # Parity on the whole set before timing: per weight and batched,
        # codes and flip counts against the Rust backend.
        batch = squant_rs.quantize_tensors(gpu, args.bits)
        same = True
        for g, h, b in zip(gpu, host, batch):
            one = squant_rs.quantize_tensor(g, args.bits)
            ref = squant_rs.quantize_tensor(h, args.bits, backend="rust")
            for q in (one, b):
                same &= bool(torch.equal(q.codes.cpu(), ref.codes))
                same &= (q.k_flips, q.c_flips) == (ref.k_flips, ref.c_flips)
        t_gpu = cuda_ms(run_gpu, args.repeat)
        t_batch = cuda_ms(run_batch, args.repeat)
        t_rust = median_ms(run_rust, max(3, args.repeat // 4))[0]
        rows.append(
            {
                "model": f"resnet{depth}",
                "layers": len(host),
                "params": params,
                "cuda_ms": t_gpu,
                "cuda_batch_ms": t_batch,
                "rust_cpu_ms": t_rust,
                "paper_a100_ms": PAPER_A100_MS[depth],
                "codes_identical": same,
            }
        )
    print(f"device: {dev}; torch {torch.__version__}; squant-rs {squant_rs.__version__}")
    print(
        "| model | layers | params | CUDA ms, per weight | CUDA ms, one batch call "
        "| Rust CPU ms | A100 paper ms | same |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} M | {r['cuda_ms']:.2f} | "
            f"{r['cuda_batch_ms']:.2f} | {r['rust_cpu_ms']:.1f} | {r['paper_a100_ms']:.0f} "
            f"| {r['codes_identical']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
