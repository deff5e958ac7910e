"""Issue-2 benchmark: SQuant on the 54 Conv/Linear weights of ResNet-50.

Prints, all measured in this one run (ratios, because shared machines are
noisy):
  * full 4-bit SQuant time -- one ``quantize_tensor`` call per weight, and
    one ``quantize_tensors`` call for all 54 ("batch") -- relative to plain
    NumPy nearest rounding with the same per-channel quantizer (goal <= 0.33x);
  * relative to ``np.copyto`` of the same weights, the memory-bandwidth
    floor (goal <= 2.5x per weight, <= 2.0x batch);
  * 54 ``quantize_tensor`` calls relative to one ``quantize_tensors`` call
    (goal <= 1.2x: a call per weight costs little beyond the work);
  * ``load_quantized`` of a 4-bit ResNet-50 file relative to reading the
    file's bytes (goal <= 2x; needs torch and safetensors);
  * speed-up over a straightforward per-kernel Python loop implementing
    docs/algorithm.md, on one 256x256x3x3 layer (goal >= 1000x).

    python benches/bench_core.py [--repeat 7] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable

import numpy as np

import squant_rs
from squant_rs._shapes import he_weights, resnet_shapes

from _timing import median_ms, paired_ratio  # benches/ is the script's directory


def nearest_numpy(w: np.ndarray, bits: int = 4) -> np.ndarray:
    """Per-channel min/max quantizer with nearest rounding, plain NumPy."""
    w2 = w.reshape(w.shape[0], -1)
    mx = w2.max(axis=1)
    mn = w2.min(axis=1)
    n = 2 ** (bits - 1)
    s = np.float32(2**bits - 1) / np.maximum(mx - mn, np.float32(1e-8))
    z = np.rint(s * mn) + np.float32(n)
    q = np.rint(s[:, None] * w2 - z[:, None])
    return np.clip(q, -n, n - 1).astype(np.int8).reshape(w.shape)


def python_loop_squant(w: np.ndarray, bits: int = 4) -> np.ndarray:
    """docs/algorithm.md sections 1-4 (mode "squant") with a plain Python loop over kernels
    and channels; numpy only inside one kernel. The "straightforward" port."""
    oc, ic = w.shape[:2]
    k = int(np.prod(w.shape[2:]))
    w3 = w.reshape(oc, ic, k).astype(np.float32)
    n = 2 ** (bits - 1)
    tmin, tmax = -n, n - 1
    out = np.empty((oc, ic, k), dtype=np.int8)

    def step(e, r, table, order_up, order_dn, pri_up, pri_dn, idx):
        total = int(np.rint(e[idx].astype(np.float64) * 2.0**40).astype(np.int64).sum())
        s = total * 2.0**-40
        up = s < 0
        a = np.float32(abs(s))
        t = int(np.rint(a))
        over = t >= a
        order = order_up if up else order_dn
        val, err = table[0 if up else 1]
        flip = idx[order[:t]]
        r[flip] = val[flip]
        e[flip] = err[flip]
        if over:
            c = idx[order[t - 1] if t > 0 else order[-1]]
            (pri_dn if up else pri_up)[c] = abs(e[c])
        elif t < len(idx):
            c = idx[order[t]]
            (pri_up if up else pri_dn)[c] = abs(e[c])

    for o in range(oc):
        wc = w3[o].reshape(-1)
        s = np.float32(2**bits - 1) / max(np.float32(wc.max() - wc.min()), np.float32(1e-8))
        z = np.rint(s * wc.min()) + np.float32(n)
        x = s * wc - z
        r = np.rint(x)
        e = r - x
        upc = (e < 0) & (x < tmax)
        dnc = (e > 0) & (x > tmin)
        table = (
            (np.where(upc, r + 1, r), np.where(upc, e + 1, 0).astype(np.float32)),
            (np.where(dnc, r - 1, r), np.where(dnc, e - 1, 0).astype(np.float32)),
        )
        pri_up = np.where(upc, np.abs(e), 0).astype(np.float32)
        pri_dn = np.where(dnc, e, 0).astype(np.float32)
        orders = []
        for i in range(ic):
            idx = np.arange(i * k, (i + 1) * k)
            orders.append(
                (np.argsort(-pri_up[idx], kind="stable"), np.argsort(-pri_dn[idx], kind="stable"))
            )
        pri_up[:] = 0
        pri_dn[:] = 0
        for i in range(ic):
            idx = np.arange(i * k, (i + 1) * k)
            step(e, r, table, orders[i][0], orders[i][1], pri_up, pri_dn, idx)
        idx = np.arange(ic * k)
        order_up = np.argsort(-pri_up, kind="stable")
        order_dn = np.argsort(-pri_dn, kind="stable")
        step(e, r, table, order_up, order_dn, pri_up, pri_dn, idx)
        out[o] = np.clip(r, tmin, tmax).astype(np.int8).reshape(ic, k)
    return out.reshape(w.shape)


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_load_quantized(
    weights: list[np.ndarray], bits: int, repeat: int
) -> tuple[float, float, float]:
    """Seconds of ``load_quantized`` of a file of ``weights``, of reading the
    same file's bytes, and of writing the loaded state dict's bytes once into
    fresh memory (``np.empty`` + ``fill``: the floor of any loader that
    returns new tensors). Interleaved rounds, medians after one warm-up
    round; ``(nan, nan, nan)`` without torch or safetensors."""
    try:
        import safetensors  # noqa: F401
        import torch
    except ImportError:
        return float("nan"), float("nan"), float("nan")
    sd = {f"layer{i}.weight": torch.from_numpy(w) for i, w in enumerate(weights)}
    sizes = [w.nbytes for w in weights]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet50.safetensors")
        squant_rs.save_quantized(sd, path, bits)

        def read_bytes() -> None:
            with open(path, "rb") as f:
                f.read()

        def fill_outputs() -> list[np.ndarray]:
            out = [np.empty(n, np.uint8) for n in sizes]
            for a in out:
                a.fill(1)
            return out

        fns = [lambda: squant_rs.load_quantized(path), read_bytes, fill_outputs]
        times: list[list[float]] = [[] for _ in fns]
        for r in range(repeat + 1):
            for fn, ts in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                if r:
                    ts.append(time.perf_counter() - t0)
    t_load, t_read, t_fill = (float(np.median(ts)) for ts in times)
    return t_load, t_read, t_fill


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``fn`` after one warm-up run."""
    return median_ms(fn, repeat)[0] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    args = ap.parse_args()

    shapes = resnet_shapes(50)
    weights = list(he_weights(shapes, seed=0).values())
    nparams = sum(w.size for w in weights)
    dst = [np.empty_like(w) for w in weights]
    threads = squant_rs._squant_rs.resolve_threads(args.threads)
    b = args.bits

    def per_weight() -> None:
        for w in weights:
            squant_rs.quantize_tensor(w, b, threads=threads)

    def batch() -> None:
        squant_rs.quantize_tensors(weights, b, threads=threads)

    t_squant = timeit(per_weight, args.repeat)
    t_batch = timeit(batch, args.repeat)
    # The per-weight / batch ratio from interleaved runs (a load change on a
    # shared machine hits both): the median of per-run ratios.
    per_over_batch, _ = paired_ratio(per_weight, batch, args.repeat)
    t_e = timeit(
        lambda: [squant_rs.quantize_tensor(w, b, "squant-e", threads=threads) for w in weights],
        args.repeat,
    )
    t_near = timeit(lambda: [nearest_numpy(w, b) for w in weights], args.repeat)
    t_copy = timeit(lambda: [np.copyto(d, w) for d, w in zip(dst, weights)], args.repeat)

    t_torch = None
    try:
        import torch
    except ImportError:  # the torch extra is optional
        torch = None
    if torch is not None:
        tensors = [torch.from_numpy(w) for w in weights]
        t_torch = timeit(
            lambda: [squant_rs.quantize_tensor(t, b, backend="torch") for t in tensors],
            max(3, args.repeat // 2),
        )

    layer = he_weights([("l", (256, 256, 3, 3))], seed=1)["l"]
    t_layer = timeit(lambda: squant_rs.quantize_tensor(layer, b, threads=threads), args.repeat)
    t0 = time.perf_counter()
    slow = python_loop_squant(layer, b)
    t_loop = time.perf_counter() - t0
    same = bool(np.array_equal(slow, squant_rs.quantize_tensor(layer, b).codes))
    t_load, t_read, t_fill = time_load_quantized(weights, b, args.repeat)
    build = squant_rs._squant_rs.simd_build()

    res = {
        "params": int(nparams),
        "layers": len(weights),
        "threads": threads,
        "cpus": os.cpu_count(),
        "squant_ms": t_squant * 1e3,
        "squant_batch_ms": t_batch * 1e3,
        "squant_e_ms": t_e * 1e3,
        "numpy_nearest_ms": t_near * 1e3,
        "copyto_ms": t_copy * 1e3,
        "ratio_vs_nearest": t_squant / t_near,
        "ratio_vs_copyto": t_squant / t_copy,
        "batch_ratio_vs_nearest": t_batch / t_near,
        "batch_ratio_vs_copyto": t_batch / t_copy,
        "layer_256x256x3x3_ms": t_layer * 1e3,
        "python_loop_s": t_loop,
        "speedup_vs_python_loop": t_loop / t_layer,
        "python_loop_codes_identical": same,
        "per_weight_over_batch": per_over_batch,
        "cpu_model": cpu_model(),
        "simd_build": build,
        "load_quantized_ms": t_load * 1e3,
        "read_file_ms": t_read * 1e3,
        "load_over_read": t_load / t_read,
        "fill_outputs_ms": t_fill * 1e3,
        "load_over_fill": t_load / t_fill,
        "torch_cpu_ms": None if t_torch is None else t_torch * 1e3,
        "torch_cpu_over_rust": None if t_torch is None else t_torch / t_squant,
    }
    print(
        f"ResNet-50 weights: {len(weights)} layers, {nparams / 1e6:.1f} M params, "
        f"{b}-bit, {threads} thread(s), median of {args.repeat}"
    )
    print(f"CPU: {cpu_model()}, {os.cpu_count()} CPU(s); core build: {build}")
    rows = [
        ("SQuant (E+K+C), quantize_tensor per weight", f"{t_squant * 1e3:.1f} ms", "1", ""),
        (
            "SQuant (E+K+C), one quantize_tensors call",
            f"{t_batch * 1e3:.1f} ms",
            f"per weight / batch = {per_over_batch:.2f}x (interleaved)",
            "<= 1.2x",
        ),
        ("SQuant-E only, squant-rs", f"{t_e * 1e3:.1f} ms", f"{t_e / t_squant:.2f}", ""),
        (
            "NumPy nearest rounding",
            f"{t_near * 1e3:.1f} ms",
            f"squant/nearest = {t_squant / t_near:.2f}x (batch {t_batch / t_near:.2f}x)",
            "<= 0.33x",
        ),
        (
            "np.copyto (bandwidth floor)",
            f"{t_copy * 1e3:.1f} ms",
            f"squant/copyto = {t_squant / t_copy:.2f}x (batch {t_batch / t_copy:.2f}x)",
            "<= 2.5x (batch <= 2.0x)",
        ),
        (
            "Python per-kernel loop, 256x256x3x3",
            f"{t_loop * 1e3:.0f} ms",
            f"speed-up = {t_loop / t_layer:.0f}x",
            ">= 1000x",
        ),
        ("squant-rs, same layer", f"{t_layer * 1e3:.2f} ms", f"codes identical: {same}", ""),
    ]
    if not np.isnan(t_load):
        rows.append(
            (
                f"load_quantized of the {b}-bit file vs reading its bytes",
                f"{t_load * 1e3:.1f} ms vs {t_read * 1e3:.1f} ms",
                f"load/read = {t_load / t_read:.2f}x",
                "<= 2x",
            )
        )
        rows.append(
            (
                "  floor: writing the loaded bytes once into fresh memory",
                f"{t_fill * 1e3:.1f} ms",
                f"load/floor = {t_load / t_fill:.2f}x, floor/read = {t_fill / t_read:.1f}x",
                "",
            )
        )
    if t_torch is not None:
        rows.append(
            (
                "torch backend on CPU, same 54 weights",
                f"{t_torch * 1e3:.1f} ms",
                f"torch/rust = {t_torch / t_squant:.2f}x",
                "<= 10x",
            )
        )
    print("| measurement | time | ratio | goal |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("paper: ResNet-50 in 188 ms on an A100 GPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
