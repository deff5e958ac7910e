"""Checkpoints of any size: a synthetic Llama-7B-like sharded checkpoint
(bf16; per decoder layer q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008; embedding and LM head 32000x4096; Hugging Face layout, shards of
``--shard-gb`` GB with ``model.safetensors.index.json``) quantized by both
command lines in subprocesses. Printed, all measured in this one run:

* ``cat``: reading the shards (``cat shards > /dev/null``), the floor, from
  the page cache ("warm") and after evicting the shards from it with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` ("cold"; the eviction is checked
  by timing: a cold read no slower than a warm one is reported);
* wall time of ``squant quantize DIR OUT`` (Rust CLI) and ``squant-rs
  quantize DIR OUT`` (Python CLI), each warm relative to the warm ``cat``
  and cold (shards evicted first) relative to the cold ``cat`` (goal
  <= 2x), and per parameter;
* the peak resident memory of each (``ru_maxrss`` of the child; goal
  <= 1 GB whatever the checkpoint's size);
* ``squant-rs info`` (header only), ``info --verify`` (every tensor) and
  ``squant info --verify``;
* ``load_quantized`` of one output shard with and without ``verify``.

The warm ratios compare CPU work with reading from memory, the hardest case
for the goal; the cold ones what a first run after a download sees.

    python benches/bench_checkpoint.py [--layers 6] [--shard-gb 1] [--dir DIR] [--keep]
        [--reuse] [--repeat N] [--baseline OLD_SQUANT_BINARY] [--no-python]

``--baseline`` times another build of ``squant`` (e.g. a copy of the binary
before a change) interleaved with this one, on the same checkpoint and
against the same ``cat``; ``--repeat`` repeats the interleaved sequence and
keeps each command's best time (the machine's load changes from run to
run); ``--reuse --keep`` keeps the generated checkpoint in ``--dir`` for
the next run. ``SQUANT_TIMINGS=1`` makes ``squant`` print where its wall
time went (reading, quantizing, writing, completing files) on stderr.

``--layers 6`` is about 1.48 B parameters (2.95 GB in bf16); the default is
the largest layer count that fits the free disk space (input + output + a
margin), at most 6. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def shapes(layers: int) -> list[tuple[str, tuple[int, int]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + f"self_attn.{n}.weight", (HIDDEN, HIDDEN)))
        out.append((p + "mlp.gate_proj.weight", (INTER, HIDDEN)))
        out.append((p + "mlp.up_proj.weight", (INTER, HIDDEN)))
        out.append((p + "mlp.down_proj.weight", (HIDDEN, INTER)))
        out.append((p + "input_layernorm.weight", (HIDDEN,)))  # type: ignore[arg-type]
    out.append(("model.norm.weight", (HIDDEN,)))  # type: ignore[arg-type]
    out.append(("lm_head.weight", (VOCAB, HIDDEN)))
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    return 2 * int(np.prod(shape))


def write_checkpoint(d: Path, layers: int, shard_bytes: int) -> list[Path]:
    """Shards of about shard_bytes (a tensor never straddles two)."""
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes(layers):
        if size and size + nbytes(shape) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes(shape)
    files, weight_map = [], {}
    for j, group in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        header, pos = {}, 0
        for name, shape in group:
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes(shape)],
            }
            pos += nbytes(shape)
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(d / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for k, (_, shape) in enumerate(group):
                left = int(np.prod(shape))
                off = (k * 7919) % pool.size
                while left:
                    n = min(left, pool.size - off)
                    f.write(pool[off : off + n].tobytes())
                    left -= n
                    off = 0
        files.append(d / fname)
    total = sum(nbytes(s) for _, s in shapes(layers))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return files


# A small process forks the measured command: a child forked straight from
# this (large) process would inherit its resident size in ru_maxrss.
_WRAP = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MB, CPU seconds: user + system, all threads)
    of a command."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-S", "-c", _WRAP, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {p.stderr}")
    kib, cpu = p.stderr.strip().splitlines()[-1].split()
    return wall, (int(kib) / 1024 if sys.platform != "darwin" else int(kib) / 2**20), float(cpu)


def evict(files: list[Path]) -> None:
    """Drops the files' pages from the page cache (written back first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: fit the disk, at most 6)"
    )
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse a checkpoint generated in --dir before"
    )
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions (best kept)")
    ap.add_argument(
        "--baseline", default=None, help="another squant binary, timed interleaved with this one"
    )
    ap.add_argument("--no-python", action="store_true", help="skip the Python CLI")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="squant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    layers = args.layers
    if layers is None:
        free = shutil.disk_usage(work).free
        per_layer = sum(nbytes(s) for n, s in shapes(1)) - sum(nbytes(s) for n, s in shapes(0))
        fixed = sum(nbytes(s) for _, s in shapes(0))
        layers = 6
        while layers > 1 and (fixed + layers * per_layer) * 1.5 + (2 << 30) > free:
            layers -= 1
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit("needs cargo (builds the Rust CLI)")
    subprocess.run(
        [cargo, "build", "--release", "--quiet", "-p", "squant-cli"], cwd=ROOT, check=True
    )
    squant = str(ROOT / "target" / "release" / "squant")

    src = work / "ckpt"
    index_path = src / "model.safetensors.index.json"
    files = []
    if args.reuse and index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if set(weight_map) == {n for n, _ in shapes(layers)}:
            files = [src / f for f in sorted(set(weight_map.values()))]
    gen = 0.0
    if not files or not all(f.is_file() for f in files):
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        t0 = time.perf_counter()
        files = write_checkpoint(src, layers, int(args.shard_gb * 1e9))
        gen = time.perf_counter() - t0
    total = sum(f.stat().st_size for f in files)
    params = sum(int(np.prod(s)) for _, s in shapes(layers))
    threads = ["--threads", str(args.threads)] if args.threads else []
    print(
        f"checkpoint: {layers} layers, {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB "
        f"bf16 in {len(files)} shards (generated in {gen:.1f} s), work dir {work}"
    )

    cat_argv = ["cat", *map(str, files)]
    timed(cat_argv)  # the shards in the page cache
    can_evict = hasattr(os, "posix_fadvise")  # Linux; elsewhere warm runs only
    q_rs, q_py = work / "q_rs", work / "q_py"
    commands = [("squant (Rust CLI)", q_rs, [squant, "quantize", str(src), str(q_rs), *threads])]
    if args.baseline:
        q_base = work / "q_base"
        base_argv = [args.baseline, "quantize", str(src), str(q_base), *threads]
        commands.append(("baseline squant", q_base, base_argv))
    if not args.no_python:
        commands.append(
            (
                "squant-rs (Python CLI)",
                q_py,
                [sys.executable, "-m", "squant_rs", "quantize", str(src), str(q_py), *threads],
            )
        )
    # Interleaved: each repetition times cat and every command once, warm
    # then cold, so that a change in the machine's load hits all alike; the
    # best of the repetitions is kept.
    best: dict[tuple[str, bool], tuple[float, float, float]] = {}
    cpus: dict[tuple[str, bool], list[float]] = {}
    cat_rss = 0.0
    for _ in range(args.repeat):
        for cold in (False, True) if can_evict else (False,):
            runs = [("cat", None, cat_argv), *commands]
            for label, out, argv in runs:
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                if cold:
                    evict(files)
                else:
                    timed(cat_argv)  # the shards in the page cache again
                wall, rss, cpu = timed(argv)
                if label == "cat" and not cold:
                    cat_rss = rss
                key = (label, cold)
                best[key] = min(best.get(key, (wall, rss, cpu)), (wall, rss, cpu))
                cpus.setdefault(key, []).append(cpu)
    t_cat = best[("cat", False)][0]
    t_cold = best[("cat", True)][0] if can_evict else float("nan")
    rows = [
        (label, cold, *best[(label, cold)][:2], min(cpus[(label, cold)]))
        for label, _, _ in commands
        for cold in ((False, True) if can_evict else (False,))
    ]
    t_info, rss_info, _ = timed([sys.executable, "-m", "squant_rs", "info", str(work / "q_rs")])
    t_ver, rss_ver, _ = timed(
        [sys.executable, "-m", "squant_rs", "info", "--verify", str(work / "q_rs")]
    )
    t_rver, rss_rver, _ = timed([squant, "info", "--verify", str(work / "q_rs")])
    others = [out for _, out, _ in commands[1:]]
    same = all(
        (q_rs / f.name).read_bytes() == (out / f.name).read_bytes()
        for f in [*files, src / "model.safetensors.index.json"]
        for out in others
    )

    print(f"\n{'step':<34}{'wall s':>8}{'x cat':>8}{'ns/param':>10}{'peak RSS MB':>13}{'CPU s':>8}")
    print(f"{'cat shards > /dev/null (warm)':<34}{t_cat:>8.2f}{1:>8.2f}{'':>10}{cat_rss:>13.0f}")
    print(f"{'cat shards > /dev/null (cold)':<34}{t_cold:>8.2f}{1:>8.2f}")
    for label, cold, wall, rss, cpu in rows:
        ref = t_cold if cold else t_cat
        name = f"{label}, {'cold' if cold else 'warm'}"
        print(
            f"{name:<34}{wall:>8.2f}{wall / ref:>8.2f}{wall / params * 1e9:>10.2f}{rss:>13.0f}"
            f"{cpu:>8.2f}"
        )
    for name, t, rss in (
        ("squant-rs info (header only)", t_info, rss_info),
        ("squant-rs info --verify", t_ver, rss_ver),
        ("squant info --verify (Rust CLI)", t_rver, rss_rver),
    ):
        print(f"{name:<34}{t:>8.2f}{t / t_cat:>8.2f}{'':>10}{rss:>13.0f}")
    print("(x cat: cold runs against the cold read, the rest against the warm one)")
    print(
        "(CPU s: user + system time of the process, all its threads, least of the runs;"
        " kernel work done elsewhere, e.g. writing back page-cache writes, is not in it)"
    )
    if can_evict and t_cold < 1.2 * t_cat:
        print(
            f"note: the cold read ({t_cold:.2f} s) is hardly slower than the warm one "
            f"({t_cat:.2f} s): evicting the shards from the page cache had little effect here"
        )
    print(
        f"\noutputs of {', '.join(label for label, _, _ in commands)} byte-identical: {same}"
        f" (best of {args.repeat} interleaved runs each)"
    )
    print(f"load average (1 min) during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"quantized size: {sum(p.stat().st_size for p in (work / 'q_rs').iterdir()) / 1e9:.2f} GB"
    )

    try:
        import squant_rs

        shard = work / "q_rs" / files[0].name
        best = {}
        for verify in (False, True, False, True):
            t0 = time.perf_counter()
            sd = squant_rs.load_quantized(shard, verify=verify)
            dt = time.perf_counter() - t0
            del sd
            best[verify] = min(best.get(verify, dt), dt)
        print(
            f"load_quantized({files[0].name}): {best[False]:.2f} s without checksums, "
            f"{best[True]:.2f} s with ({(best[True] / best[False] - 1) * 100:+.1f} %)"
        )
    except ImportError:
        print("(torch not installed: load timing skipped)")
    if not args.keep:
        shutil.rmtree(work / "q_rs", ignore_errors=True)
        shutil.rmtree(work / "q_py", ignore_errors=True)
        shutil.rmtree(work / "q_base", ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
