#!/usr/bin/env bash
# One prepared run for a session lent the GPU machine (Python 3.12, torch with
# CUDA, no Rust, no network). Prepare here first:
#   bash benches/gpu_check.sh --prepare      # abi3 wheel + offline test wheels into wheels/
# then run on the device (carry wheels/):
#   bash benches/gpu_check.sh                # writes results under $OUT (or results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    rm -rf wheels && mkdir -p wheels
    maturin build --release --out wheels
    # Test dependencies for an offline Python 3.12 machine.
    python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d wheels numpy pytest hypothesis
    ls -la wheels
    exit 0
fi
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps --force-reinstall wheels/squant_rs-*abi3*.whl
for pkg in numpy pytest hypothesis; do
    python3 -c "import $pkg" 2>/dev/null || \
        python3 -m pip install --quiet --no-index --find-links wheels "$pkg"
done
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
lscpu > "$OUT/lscpu.txt" 2>&1 || true
python3 -c "import torch, squant_rs; print(torch.__version__, torch.cuda.is_available(), squant_rs.__file__)" \
    | tee "$OUT/env.txt"
# CUDA parity tests (they skip without a GPU), against the installed wheel;
# bounded so the benchmark below always runs.
timeout 200 python3 -m pytest -q -p no:cacheprovider tests -k cuda \
    2>&1 | tail -30 | tee "$OUT/pytest_cuda.txt" || true
python3 benches/gpu_check.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.md"
