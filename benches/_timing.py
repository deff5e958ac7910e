"""The timing loop shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` in milliseconds over ``repeat`` runs after
    ``warmup`` untimed ones, and every run's time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def paired_ratio(
    num: Callable[[], Any], den: Callable[[], Any], repeat: int
) -> tuple[float, list[float]]:
    """Median of ``repeat`` ratios ``time(num) / time(den)``, each from one
    ``den`` run and the ``num`` run right after it (after one warm-up of
    each), and every ratio. Pairs measured back to back share the machine's
    state of the moment, which a ratio of medians timed apart does not."""
    num()
    den()
    ratios = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        den()
        t1 = time.perf_counter()
        num()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios), ratios
