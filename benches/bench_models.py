"""Whole-model SQuant timing on the paper's five architectures.

The models are pytorchcv 0.0.74's ``resnet18``, ``resnet50``,
``inceptionv3``, ``sqnxt23_w2`` and ``shufflenet_g1_w1`` with random weights
(the architectures, hence the work, of the paper's timing table; no
pretrained weights are downloaded), and its ``mobilenetv2_w1`` (not in the
paper's table: many small depthwise layers). For every model it times, as the median
of ``--repeat`` runs after a warm-up:

* ``rust``: a loop over the model's Conv/Linear weights (torch CPU
  tensors), ``quantize_tensor(w, bits, backend="rust")`` -- integer codes,
  scales and zero points;
* ``rust+deq``: the same plus ``.dequantize()`` (float weights back);
* ``batch``: one ``quantize_tensors(weights, bits)`` call for all of them;
* ``quantize_model``: ``squant_rs.quantize_model(model, wbits=bits,
  backend="rust", recipe="paper")`` -- the whole public API: deep copy of
  the model, SQuant, dequantized weights written back, per-layer report
  (relative error);
* ``squant+``: the same with ``recipe="squant+"``, ``quantize_model``'s
  default (BatchNorm folding and bias correction on top; its ratio to
  ``batch`` is printed too, for information: the goal is the paper's job);
* ``quantize_model / batch``: the whole API against the core alone, one
  ``quantize_tensors`` call (goal <= 2x): the median of ``--repeat`` ratios,
  each of one ``batch`` run and the ``quantize_model`` run right after it
  (interleaved, so that a load change on a shared machine hits both); and
  ``quantize_model / A100`` against the paper's time (goal < 1x);
* ``torch-cpu``: the ``rust`` loop with ``backend="torch"`` on CPU;
* ``cuda``: the ``rust`` loop with ``backend="torch"`` on CUDA tensors
  (synchronised), only when ``torch.cuda.is_available()``;
* ``nearest``: per-channel min/max nearest rounding in plain NumPy (min,
  max, scale, zero point, rint, clip to int8 codes) over the same weights --
  what any per-channel weight quantizer has to do at least;

next to the SQuant authors' A100 times (84 / 188 / 298 / 272 / 121 ms).
Numbers on a shared machine are noisy: compare the columns of one run.

    python benches/bench_models.py [--models resnet18 ...] [--repeat 7] [--bits 4]
                                   [--json results/bench_models.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import squant_rs

from _timing import median_ms, paired_ratio  # benches/ is the script's directory

# name -> (pytorchcv module, input size, paper's A100 SQuant time in ms, paper's layer count)
MODELS: dict[str, tuple[str, int, float | None, int | None]] = {
    "resnet18": ("pytorchcv.models.resnet", 224, 84.0, 21),
    "resnet50": ("pytorchcv.models.resnet", 224, 188.0, 54),
    "inceptionv3": ("pytorchcv.models.inceptionv3", 299, 298.0, 95),
    "sqnxt23_w2": ("pytorchcv.models.squeezenext", 224, 272.0, 112),
    "shufflenet_g1_w1": ("pytorchcv.models.shufflenet", 224, 121.0, 50),
    "mobilenetv2_w1": ("pytorchcv.models.mobilenetv2", 224, None, None),
}


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A pytorchcv model with random (seeded) weights; never pretrained."""
    module, _, _, _ = MODELS[name]
    torch.manual_seed(seed)
    ctor = getattr(importlib.import_module(module), name)
    model: torch.nn.Module = ctor(pretrained=False)
    return model.eval()


def quant_layers(model: torch.nn.Module) -> list[torch.nn.Conv2d | torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def nearest_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel min/max quantizer with nearest rounding: int8 codes
    (same quantizer as SQuant, docs/algorithm.md section 1, without the flips; plain NumPy)."""
    w2 = w.reshape(w.shape[0], -1)
    n = 2 ** (bits - 1)
    mx = w2.max(axis=1, keepdims=True)
    mn = w2.min(axis=1, keepdims=True)
    s = np.float32(2**bits - 1) / np.maximum(mx - mn, np.float32(1e-8))
    z = np.rint(s * mn) + np.float32(n)
    q = np.clip(np.rint(s * w2 - z), -n, n - 1).astype(np.int8)
    out: np.ndarray = q.reshape(w.shape)
    return out


def time_model(
    name: str,
    bits: int,
    repeat: int,
    torch_repeat: int,
    use_cuda: bool,
    skip_torch_cpu: bool,
) -> dict[str, Any]:
    model = build_model(name)
    layers = quant_layers(model)
    weights = [m.weight.detach() for m in layers]
    arrays = [w.numpy() for w in weights]  # zero-copy views
    row: dict[str, Any] = {
        "model": name,
        "layers": len(layers),
        "params": int(sum(w.numel() for w in weights)),
        "paper_a100_ms": MODELS[name][2],
        "paper_layers": MODELS[name][3],
        "runs_ms": {},
    }

    def loop(backend: str, ws: Sequence[torch.Tensor], deq: bool = False) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for w in ws:
                    qt = squant_rs.quantize_tensor(w, bits, backend=backend)
                    if deq:
                        qt.dequantize()

        return run

    def nearest() -> None:
        for a in arrays:
            nearest_codes(a, bits)

    def batch() -> None:
        with torch.inference_mode():
            squant_rs.quantize_tensors(weights, bits)

    def api() -> None:
        squant_rs.quantize_model(model, wbits=bits, backend="rust", recipe="paper")

    def api_plus() -> None:  # the default recipe: BN folding and bias correction too
        squant_rs.quantize_model(model, wbits=bits, backend="rust", recipe="squant+")

    timings: list[tuple[str, Callable[[], None], int, int]] = [
        ("rust", loop("rust", weights), repeat, 1),
        ("rust_deq", loop("rust", weights, deq=True), repeat, 1),
        ("batch", batch, repeat, 1),
        ("quantize_model", api, repeat, 1),
        ("quantize_model_plus", api_plus, repeat, 1),
        ("nearest", nearest, repeat, 1),
    ]
    if not skip_torch_cpu:
        timings.append(("torch_cpu", loop("torch", weights), torch_repeat, 1))
    if use_cuda:
        cuda_ws = [w.cuda() for w in weights]
        inner = loop("torch", cuda_ws)

        def cuda_run() -> None:
            torch.cuda.synchronize()
            inner()
            torch.cuda.synchronize()

        timings.append(("cuda", cuda_run, repeat, 2))
    for key, fn, rep, warm in timings:
        med, runs = median_ms(fn, rep, warm)
        row[f"{key}_ms"] = med
        row["runs_ms"][key] = runs
    ratio, ratios = paired_ratio(api, batch, repeat)
    row["quantize_model_over_batch"] = ratio
    row["quantize_model_over_batch_runs"] = ratios
    ratio, ratios = paired_ratio(api_plus, batch, repeat)
    row["quantize_model_plus_over_batch"] = ratio
    row["quantize_model_plus_over_batch_runs"] = ratios
    return row


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def render_table(rows: Sequence[dict[str, Any]], bits: int, cuda_name: str | None) -> str:
    has_torch = any(r.get("torch_cpu_ms") is not None for r in rows)
    cols = [
        "model",
        "layers",
        "params",
        "rust ms",
        "rust+deq ms",
        "batch ms",
        "quantize_model ms",
        "squant+ ms",
    ]
    if has_torch:
        cols.append("torch-cpu ms")
    if cuda_name:
        cols.append("cuda ms")
    cols += [
        "nearest (numpy) ms",
        "rust / nearest",
        "quantize_model / batch",
        "squant+ / batch",
        "paper A100 ms",
        "rust / A100",
        "quantize_model / A100",
    ]
    if cuda_name:
        cols.append("cuda / A100")
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        cells = [
            r["model"],
            str(r["layers"]),
            f"{r['params'] / 1e6:.2f} M",
            _fmt(r["rust_ms"]),
            _fmt(r["rust_deq_ms"]),
            _fmt(r["batch_ms"]),
            _fmt(r["quantize_model_ms"]),
            _fmt(r["quantize_model_plus_ms"]),
        ]
        if has_torch:
            cells.append(_fmt(r.get("torch_cpu_ms")))
        if cuda_name:
            cells.append(_fmt(r.get("cuda_ms")))
        a100 = r["paper_a100_ms"]
        cells += [
            _fmt(r["nearest_ms"]),
            f"{r['rust_ms'] / r['nearest_ms']:.2f}x",
            f"{r['quantize_model_over_batch']:.2f}x",
            f"{r['quantize_model_plus_over_batch']:.2f}x",
            "—" if a100 is None else f"{a100:.0f}",
            "—" if a100 is None else f"{r['rust_ms'] / a100:.2f}x",
            "—" if a100 is None else f"{r['quantize_model_ms'] / a100:.2f}x",
        ]
        if cuda_name:
            cells.append("—" if a100 is None else f"{r['cuda_ms'] / a100:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Whole-model SQuant timing (pytorchcv models).")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per column (median)")
    ap.add_argument(
        "--torch-repeat",
        type=int,
        default=None,
        help="timed runs of the torch-cpu column (default: --repeat)",
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--no-torch-cpu", action="store_true", help="skip the torch-cpu column")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads and SQUANT_NUM_THREADS (default: all CPUs)",
    )
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.torch_repeat is None:
        args.torch_repeat = args.repeat

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["SQUANT_NUM_THREADS"] = str(args.threads)
    use_cuda = torch.cuda.is_available()
    cuda_name = torch.cuda.get_device_name(0) if use_cuda else None
    t_start = time.perf_counter()
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        row = time_model(
            name, args.bits, args.repeat, args.torch_repeat, use_cuda, args.no_torch_cpu
        )
        rows.append(row)
        ratio = row["quantize_model_over_batch"]
        print(
            f"{name}: {row['layers']} layers, rust {row['rust_ms']:.1f} ms, quantize_model "
            f"{row['quantize_model_ms']:.1f} ms = {ratio:.2f}x quantize_tensors "
            f"(squant+ {row['quantize_model_plus_ms']:.1f} ms = "
            f"{row['quantize_model_plus_over_batch']:.2f}x), "
            f"torch-cpu {_fmt(row.get('torch_cpu_ms'))} ms, "
            f"nearest {row['nearest_ms']:.1f} ms ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    total_s = time.perf_counter() - t_start
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "squant_rs": squant_rs.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "squant_num_threads": os.environ.get("SQUANT_NUM_THREADS"),
        "cuda": cuda_name,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    table = render_table(rows, args.bits, cuda_name)
    header = (
        f"SQuant W{args.bits} weight quantization of whole pytorchcv models (random weights): "
        f"median of {args.repeat} runs after a warm-up (torch-cpu: {args.torch_repeat}), "
        f"{os.cpu_count()} CPU(s)"
        + (f" + {cuda_name}" if cuda_name else "")
        + f", torch {torch.__version__}.\n"
        "'rust' = `quantize_tensor(w, bits, backend=\"rust\")` over every Conv/Linear weight "
        "(codes, scales, zero points); 'rust+deq' adds `.dequantize()`; 'batch' is one "
        "`quantize_tensors` call for all of them; 'quantize_model' is "
        'the whole API with `recipe="paper"` (deep copy, SQuant, write-back, per-layer '
        "report); 'squant+' the same with the default `recipe=\"squant+\"` (BN folding "
        "and bias correction too); 'torch-cpu'"
        + ("/'cuda'" if cuda_name else "")
        + " = the same loop with `backend=\"torch\"`; 'nearest' = per-channel min/max "
        "nearest rounding to int8 codes in plain NumPy; 'paper A100' = the SQuant authors' "
        "GPU times (docs/algorithm.md section 6). rust / X < 1 means faster than X. "
        "'quantize_model / batch' is the median of per-run ratios, each run of 'batch' "
        "followed by one of 'quantize_model'. Goals: "
        "quantize_model / batch <= 2x and quantize_model / A100 < 1x on every model."
    )
    print("\n" + header + "\n\n" + table)
    print(f"\ntotal {total_s:.0f} s")
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(header + "\n\n" + table + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "bits": args.bits,
                    "repeat": args.repeat,
                    "torch_repeat": args.torch_repeat,
                    "environment": env,
                    "total_s": total_s,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
