"""pytest-benchmark benchmarks of the Python API: ``quantize_tensor`` on a few
layer shapes, Rust core vs the vectorized torch backend (CPU), numpy and
torch inputs.

Off by default -- benchmarks are not tests. pyproject's ``testpaths`` is
``tests/``, so this file is never collected by a plain ``pytest``; and even
when named explicitly it skips unless ``SQUANT_BENCH=1`` is set::

    SQUANT_BENCH=1 pytest benches/test_bench_api.py --benchmark-only
    SQUANT_BENCH=1 pytest benches/test_bench_api.py --benchmark-only \\
        --benchmark-group-by=param:shape --benchmark-columns=median,iqr,rounds

Needs ``pip install 'squant-rs[bench]'`` (pytest-benchmark, torch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import squant_rs

pytestmark = pytest.mark.skipif(
    not os.environ.get("SQUANT_BENCH"),
    reason="benchmarks are off by default: set SQUANT_BENCH=1 (and pass --benchmark-only)",
)

torch = pytest.importorskip("torch") if os.environ.get("SQUANT_BENCH") else None

# (label, shape): typical layers of the paper's networks
SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("conv3x3_64", (64, 64, 3, 3)),
    ("conv3x3_256", (256, 256, 3, 3)),
    ("conv3x3_512", (512, 512, 3, 3)),
    ("conv1x1_2048x512", (2048, 512, 1, 1)),
    ("depthwise_960", (960, 1, 3, 3)),
    ("linear_1000x2048", (1000, 2048)),
]
IDS = [label for label, _ in SHAPES]


def _he_weight(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[1:]))
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return np.ascontiguousarray(w)


@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=IDS)
def test_numpy_rust(benchmark: Any, shape: tuple[int, ...]) -> None:
    w = _he_weight(shape)
    qt = benchmark(squant_rs.quantize_tensor, w, 4)
    assert qt.codes.shape == shape


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=IDS)
def test_torch_cpu(benchmark: Any, shape: tuple[int, ...], backend: str) -> None:
    assert torch is not None
    w = torch.from_numpy(_he_weight(shape))
    benchmark.group = f"{shape}"
    qt = benchmark(squant_rs.quantize_tensor, w, 4, backend=backend)
    assert tuple(qt.codes.shape) == shape


@pytest.mark.parametrize("mode", ["squant-e", "squant-k", "squant-c", "squant"])
def test_modes_rust(benchmark: Any, mode: str) -> None:
    w = _he_weight((256, 256, 3, 3))
    qt = benchmark(squant_rs.quantize_tensor, w, 4, mode)
    assert qt.mode == mode


@pytest.mark.parametrize("shape", [s for _, s in SHAPES], ids=IDS)
def test_torch_cuda(benchmark: Any, shape: tuple[int, ...]) -> None:
    assert torch is not None
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = torch.from_numpy(_he_weight(shape)).cuda()

    def run() -> Any:
        qt = squant_rs.quantize_tensor(w, 4, backend="torch")
        torch.cuda.synchronize()
        return qt

    run()
    qt = benchmark(run)
    assert tuple(qt.codes.shape) == shape
