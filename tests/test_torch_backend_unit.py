"""Unit tests of the vectorized torch backend (``squant_rs.torch.backend``).

The oracle below is a plain, slow, loop-over-groups transcription of
docs/algorithm.md sections 1-4 (with the fixed-point CASE sum), written
independently of the backend.  Both backend strategies (the CPU one and the
sync-light one meant for CUDA) run on CPU against it; on a machine with CUDA
the CUDA entry point is checked too.  ``tests/reference.py`` (another
oracle) is cross-checked when it is importable.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from squant_rs.torch import backend as tb  # noqa: E402

MODES = ("squant", "squant-e", "squant-k", "squant-c")
F32 = np.float32


# --------------------------------------------------------------------------
# Oracle (docs/algorithm.md, line by line)
# --------------------------------------------------------------------------


def _frac_bits(length: int, total_bits: int = 62) -> int:
    return min(40, total_bits - (length - 1).bit_length())


def _group_sum(e: np.ndarray, total_bits: int) -> float:
    frac = _frac_bits(e.size, total_bits)
    terms = np.rint(e.astype(np.float64) * 2.0**frac).astype(np.int64)
    total = int(sum(int(v) for v in terms))  # exact (Python int)
    return float(np.float64(total) * np.float64(2.0**-frac))


def _order(priority: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Positions by priority descending, lower position first on ties."""
    return positions[np.argsort(-priority[positions], kind="stable")]


class _Tables:
    def __init__(self, x: np.ndarray, tmin: int, tmax: int) -> None:
        self.r = np.rint(x).astype(F32)
        self.e = (self.r - x).astype(F32)
        r, e = self.r, self.e
        up = (e < 0) & (x < F32(tmax))
        down = (e > 0) & (x > F32(tmin))
        one = F32(1)
        self.value = {"up": np.where(up, r + one, r), "down": np.where(down, r - one, r)}
        self.error = {
            "up": np.where(up, e + one, F32(0)).astype(F32),
            "down": np.where(down, e - one, F32(0)).astype(F32),
        }
        self.pri = {
            "up": np.where(up, np.abs(e), F32(0)).astype(F32),
            "down": np.where(down, e, F32(0)).astype(F32),
        }


def _case(
    tb_: _Tables,
    group: np.ndarray,
    orders: dict[str, np.ndarray],
    total_bits: int,
    stats: dict[str, int],
) -> int:
    size = group.size
    s = _group_sum(tb_.e[group], total_bits)
    d = "up" if s < 0 else "down"
    opp = "down" if d == "up" else "up"
    a = F32(abs(s))
    t_f = np.rint(a)
    over = bool(t_f >= a)
    t = min(int(t_f), size)
    order = orders[d]
    if s == 0:
        stats["zero_sums"] += 1
    if a - np.floor(a) == F32(0.5):
        stats["half_sums"] += 1
    if 0 < t < size and tb_.pri[d][order[t - 1]] == tb_.pri[d][order[t]]:
        stats["boundary_ties"] += 1
    changed = 0
    for j in order[:t]:
        changed += int(tb_.value[d][j] != tb_.r[j])
        tb_.r[j] = tb_.value[d][j]
        tb_.e[j] = tb_.error[d][j]
    if over:
        c = order[t - 1] if t > 0 else order[-1]
        tb_.pri[opp][c] = np.abs(tb_.e[c])
    elif t < size:
        c = order[t]
        tb_.pri[d][c] = np.abs(tb_.e[c])
    return changed


def oracle(
    w: np.ndarray, bits: int, mode: str, total_bits: int = 62, stats: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    if stats is None:
        stats = {}
    for key in ("zero_sums", "half_sums", "boundary_ties", "rint_ties"):
        stats.setdefault(key, 0)
    w32 = np.asarray(w, dtype=F32)
    oc, ic = w32.shape[:2]
    k = int(np.prod(w32.shape[2:])) if w32.ndim > 2 else 1
    n = 2 ** (bits - 1)
    tmin, tmax = -n, n - 1
    w2 = w32.reshape(oc, ic * k)
    mx, mn = w2.max(axis=1), w2.min(axis=1)
    s = (F32(2**bits - 1) / np.maximum(mx - mn, F32(1e-8))).astype(F32)
    z = (np.rint(s * mn) + F32(n)).astype(F32)
    x = ((s[:, None] * w2).astype(F32) - z[:, None]).astype(F32).reshape(-1)
    stats["rint_ties"] += int(np.count_nonzero(np.abs(x - np.floor(x) - 0.5) == 0))
    tab = _Tables(x, tmin, tmax)
    k_changed = c_changed = 0
    if k > 1 and mode in ("squant-k", "squant"):
        groups = [np.arange(g * k, (g + 1) * k) for g in range(oc * ic)]
        orders = [{d: _order(tab.pri[d], g) for d in ("up", "down")} for g in groups]
        tab.pri["up"][:] = 0
        tab.pri["down"][:] = 0
        for g, o in zip(groups, orders):
            k_changed += _case(tab, g, o, total_bits, stats)
    if mode in ("squant-c", "squant"):
        width = ic * k
        for ch in range(oc):
            channel = np.arange(ch * width, (ch + 1) * width)
            ch_orders = {d: _order(tab.pri[d], channel) for d in ("up", "down")}
            c_changed += _case(tab, channel, ch_orders, total_bits, stats)
    codes = np.clip(tab.r, tmin, tmax).astype(np.int8).reshape(w32.shape)
    return codes, s, z, k_changed, c_changed


# --------------------------------------------------------------------------
# Tensor generators
# --------------------------------------------------------------------------

SHAPES = (
    (8, 12),  # Linear
    (5, 4, 3),  # conv1d
    (6, 5, 3, 3),
    (7, 1, 3, 3),  # depthwise
    (9, 6, 1, 1),
    (3, 2, 3, 3, 3),  # conv3d
    (1, 7, 5),  # OC = 1
    (6, 1, 2),  # IC = 1
    (4, 3, 7, 7),
    (5, 11, 2, 3),
    (3, 13),
    (2, 40, 3, 3),  # long channels: many carries
)
DISTS = ("normal", "student_t", "pruned", "constant", "tiny", "grid", "grid_coarse", "uniform")


def make_weight(rng: np.random.Generator, shape: tuple[int, ...], dist: str) -> np.ndarray:
    if dist == "normal":
        w = rng.standard_normal(shape)
    elif dist == "student_t":
        w = rng.standard_t(2.0, shape)
    elif dist == "pruned":
        w = rng.standard_normal(shape) * (rng.random(shape) < 0.4)
    elif dist == "constant":
        w = rng.standard_normal(shape)
        w[: max(1, shape[0] // 2)] = 0.37  # some channels constant
        if shape[0] > 2:
            w[-1] = 0.0
    elif dist == "tiny":
        w = rng.standard_normal(shape) * 1e-30
    elif dist == "grid":
        # Values on a fine binary grid: exact .5 roundings, equal priorities.
        w = rng.integers(-16, 17, shape) / 16.0
    elif dist == "grid_coarse":
        w = rng.integers(-3, 4, shape) / 4.0
    elif dist == "uniform":
        w = rng.uniform(-1, 1, shape)
    else:  # pragma: no cover
        raise ValueError(dist)
    return np.asarray(w, dtype=np.float32) * F32(0.05)


def _run(
    w: Any, bits: int, mode: str, on_cpu: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    codes, s, z, kc, cc = tb._quantize(w, bits, mode, on_cpu=on_cpu)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and codes.device == w.device
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    assert s.shape == (w.shape[0],) and z.shape == (w.shape[0],)
    assert isinstance(kc, int) and isinstance(cc, int)
    return codes.cpu().numpy(), s.cpu().numpy(), z.cpu().numpy(), kc, cc


def _assert_same(got: tuple[Any, ...], want: tuple[Any, ...], ctx: str) -> None:
    assert np.array_equal(got[0], want[0]), f"codes differ ({ctx}): {(got[0] != want[0]).sum()}"
    assert np.array_equal(got[1], want[1]), f"scale differs ({ctx})"
    assert np.array_equal(got[2], want[2]), f"zero point differs ({ctx})"
    assert got[3:] == want[3:], f"changed counts {got[3:]} != {want[3:]} ({ctx})"


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-path", "cuda-path"])
@pytest.mark.parametrize("dist", DISTS)
def test_matches_oracle(dist: str, on_cpu: bool) -> None:
    rng = np.random.default_rng(DISTS.index(dist))
    stats: dict[str, int] = {}
    for i, shape in enumerate(SHAPES):
        w = make_weight(rng, shape, dist)
        bits = 2 + (i + DISTS.index(dist)) % 7
        for mode in MODES:
            want = oracle(w, bits, mode, stats=stats)
            got = _run(torch.from_numpy(w), bits, mode, on_cpu)
            _assert_same(got, want, f"{dist} {shape} b{bits} {mode}")
    if dist.startswith("grid"):
        # The grid tensors must really exercise the tie rules.
        assert stats["rint_ties"] > 0
        assert stats["boundary_ties"] > 0
        assert stats["zero_sums"] > 0
        assert stats["half_sums"] > 0


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-path", "cuda-path"])
def test_all_bits_and_modes(on_cpu: bool) -> None:
    rng = np.random.default_rng(7)
    for bits in range(2, 9):
        for shape in ((6, 5, 3, 3), (5, 9), (4, 1, 3, 3)):
            for dist in ("normal", "grid"):
                w = make_weight(rng, shape, dist)
                for mode in MODES:
                    want = oracle(w, bits, mode)
                    got = _run(torch.from_numpy(w), bits, mode, on_cpu)
                    _assert_same(got, want, f"{dist} {shape} b{bits} {mode}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "float32"])
def test_dtypes(dtype: str) -> None:
    rng = np.random.default_rng(11)
    tdtype = getattr(torch, dtype)
    for shape in ((6, 4, 3, 3), (7, 10)):
        w = torch.from_numpy(make_weight(rng, shape, "normal")).to(tdtype)
        w32 = w.to(torch.float32).numpy()
        for mode in MODES:
            want = oracle(w32, 4, mode)
            for on_cpu in (True, False):
                _assert_same(_run(w, 4, mode, on_cpu), want, f"{dtype} {shape} {mode}")
    # float64 is rounded to float32 first (not truncated).
    w64 = torch.from_numpy(rng.standard_normal((4, 5, 3)))
    want = oracle(w64.numpy().astype(np.float32), 3, "squant")
    _assert_same(_run(w64, 3, "squant", True), want, "float64 rounding")


def test_many_random_tensors() -> None:
    """A broad random sweep (both strategies)."""
    rng = np.random.default_rng(2024)
    for trial in range(60):
        nd = int(rng.integers(2, 5))
        shape = [int(rng.integers(1, 9)), int(rng.integers(1, 9))]
        shape += [int(rng.integers(1, 5)) for _ in range(nd - 2)]
        dist = DISTS[trial % len(DISTS)]
        w = make_weight(rng, tuple(shape), dist)
        bits = int(rng.integers(2, 9))
        for mode in MODES:
            want = oracle(w, bits, mode)
            for on_cpu in (True, False):
                got = _run(torch.from_numpy(w), bits, mode, on_cpu)
                _assert_same(got, want, f"trial {trial} {dist} {shape} b{bits} {mode}")


def test_deep_ranks_and_larger_layers() -> None:
    """Kernels needing several flips (deep ranks), long channels, big K."""
    rng = np.random.default_rng(5)
    cases = (
        ((16, 24, 3, 3), "normal", 2),
        ((8, 6, 5, 5), "uniform", 3),
        ((4, 3, 9, 9), "normal", 5),  # K = 81 > 64: keys + topk on CPU too
        ((12, 64), "grid", 4),
        ((6, 300), "student_t", 6),
    )
    for shape, dist, bits in cases:
        w = make_weight(rng, shape, dist)
        for mode in MODES:
            want = oracle(w, bits, mode)
            for on_cpu in (True, False):
                _assert_same(_run(torch.from_numpy(w), bits, mode, on_cpu), want, f"{shape} {mode}")


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 32])
def test_channel_tournament(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """CPU channel level with element priorities (chunk tournament): grid
    data makes ties between and inside chunks; odd chunk lengths leave a
    padded tail chunk; chunk 0 is the default (sqrt of the length)."""
    monkeypatch.setattr(tb, "_CHUNK", chunk)
    monkeypatch.setattr(tb, "_TOURNAMENT", True)
    rng = np.random.default_rng(100 + chunk)
    for shape, dist in (
        ((6, 200), "grid"),
        ((5, 130), "grid_coarse"),
        ((4, 40, 3, 3), "grid"),
        ((7, 301), "normal"),
        ((3, 64, 1, 1), "pruned"),
    ):
        w = make_weight(rng, shape, dist)
        for bits in (2, 4, 8):
            for mode in ("squant-c", "squant"):
                want = oracle(w, bits, mode)
                got = _run(torch.from_numpy(w), bits, mode, True)
                _assert_same(got, want, f"chunk {chunk} {shape} {dist} b{bits} {mode}")


def test_reduced_fraction_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel and kernel F differ (channels above 2^22 elements in real
    use): emulate it with a smaller fixed-point budget on both sides."""
    monkeypatch.setattr(tb, "_FIXED_TOTAL_BITS", 48)
    rng = np.random.default_rng(9)
    for shape in ((5, 300, 3, 3), (4, 700), (3, 130, 2, 2)):
        assert tb._frac_bits(math.prod(shape[1:])) < 40
        if len(shape) > 2:
            assert tb._frac_bits(math.prod(shape[2:])) == 40
        w = make_weight(rng, shape, "normal")
        for mode in MODES:
            want = oracle(w, 4, mode, total_bits=48)
            for on_cpu in (True, False):
                _assert_same(_run(torch.from_numpy(w), 4, mode, on_cpu), want, f"{shape} {mode}")


def test_non_contiguous_input() -> None:
    rng = np.random.default_rng(3)
    base = torch.from_numpy(make_weight(rng, (5, 6, 3, 3), "normal"))
    w = base.permute(1, 0, 2, 3)  # (6, 5, 3, 3), non-contiguous
    want = oracle(w.contiguous().numpy(), 4, "squant")
    _assert_same(_run(w, 4, "squant", True), want, "permuted")
    _assert_same(_run(w, 4, "squant", False), want, "permuted")


def test_public_entry_point_and_input_untouched() -> None:
    rng = np.random.default_rng(4)
    w = torch.from_numpy(make_weight(rng, (6, 5, 3, 3), "normal"))
    before = w.clone()
    codes, s, z, kc, cc = tb.quantize_torch(w, 4, "squant")
    assert torch.equal(w, before)
    want = oracle(w.numpy(), 4, "squant")
    _assert_same((codes.numpy(), s.numpy(), z.numpy(), kc, cc), want, "public")
    assert kc > 0 and cc > 0


def test_thread_count_does_not_matter() -> None:
    rng = np.random.default_rng(6)
    w = torch.from_numpy(make_weight(rng, (32, 16, 3, 3), "normal"))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tb.quantize_torch(w, 4, "squant")
        torch.set_num_threads(max(2, old))
        many = tb.quantize_torch(w, 4, "squant")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and one[3:] == many[3:]


def _channel_totals_after_k(w: np.ndarray, bits: int) -> list[int]:
    """Oracle: exact fixed-point channel totals of the errors after level K."""
    w32 = np.asarray(w, dtype=F32)
    oc, ic = w32.shape[:2]
    k = int(np.prod(w32.shape[2:]))
    n = 2 ** (bits - 1)
    w2 = w32.reshape(oc, ic * k)
    mx, mn = w2.max(axis=1), w2.min(axis=1)
    s = (F32(2**bits - 1) / np.maximum(mx - mn, F32(1e-8))).astype(F32)
    z = (np.rint(s * mn) + F32(n)).astype(F32)
    x = ((s[:, None] * w2).astype(F32) - z[:, None]).astype(F32).reshape(-1)
    tab = _Tables(x, -n, n - 1)
    groups = [np.arange(g * k, (g + 1) * k) for g in range(oc * ic)]
    orders = [{d: _order(tab.pri[d], g) for d in ("up", "down")} for g in groups]
    stats = {"zero_sums": 0, "half_sums": 0, "boundary_ties": 0}
    for g, o in zip(groups, orders):
        _case(tab, g, o, 62, stats)
    frac = _frac_bits(ic * k)
    terms = np.rint(tab.e.astype(np.float64) * 2.0**frac).astype(np.int64).reshape(oc, -1)
    return [int(sum(int(v) for v in row)) for row in terms]


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-path", "cuda-path"])
def test_channel_totals_after_kernel_level_are_exact(on_cpu: bool) -> None:
    """The incremental channel totals (kernel totals + changes of the flipped
    terms) equal the totals recomputed from the errors after level K, to the
    last fixed-point unit (a float32 slip would not change any code here)."""
    rng = np.random.default_rng(21)
    for shape in ((6, 20, 3, 3), (4, 9, 5), (3, 30, 2, 2)):
        w = make_weight(rng, shape, "normal")
        for bits in (3, 4, 8):
            x_t = torch.from_numpy(w.reshape(shape[0], -1))
            n = 2 ** (bits - 1)
            s = torch.full((shape[0],), float(2**bits - 1))
            s.div_((x_t.amax(1) - x_t.amin(1)).clamp_min_(1e-8))
            z = torch.round(s * x_t.amin(1)).add_(float(n))
            x = (s.unsqueeze(1) * x_t).sub_(z.unsqueeze(1))
            r = torch.round(x)
            e = r - x
            cls = tb._SparseLevels if on_cpu else tb._DenseLevels
            levels = cls(x, r, e, -n, n - 1)
            k = math.prod(shape[2:])
            levels.kernel_level(shape[1], k, True)
            assert levels.carry is not None
            assert levels.carry.total.tolist() == _channel_totals_after_k(w, bits)


def _reference_module() -> Any:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_squant_reference_for_torch", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cross_check_reference_py() -> None:
    ref = _reference_module()
    if ref is None or not hasattr(ref, "squant_reference"):
        pytest.skip("tests/reference.py not available")
    rng = np.random.default_rng(8)
    for i, shape in enumerate(SHAPES[:8]):
        for dist in ("normal", "grid"):
            w = make_weight(rng, shape, dist)
            bits = 2 + i % 7
            for mode in MODES:
                want = ref.squant_reference(w, bits, mode)
                want = (np.asarray(want[0]), np.asarray(want[1]), np.asarray(want[2]), *want[3:])
                _assert_same(_run(torch.from_numpy(w), bits, mode, True), want, f"ref {shape}")


def test_matches_native_core_on_larger_tensors() -> None:
    """Layer-sized tensors (too big for the loop oracle) against the Rust core."""
    native = pytest.importorskip("squant_rs._squant_rs")
    rng = np.random.default_rng(13)
    shapes = ((64, 48, 3, 3), (256, 64, 1, 1), (100, 512), (96, 1, 3, 3), (16, 3, 7, 7))
    for i, shape in enumerate(shapes):
        for dist in ("normal", "grid", "student_t"):
            w = make_weight(rng, shape, dist)
            bits = 2 + (i + len(dist)) % 7
            for mode in MODES:
                ref = native.quantize(w, bits, mode, 1)
                want = (ref[0], ref[1], ref[2], int(ref[3]), int(ref[4]))
                for on_cpu in (True, False):
                    got = _run(torch.from_numpy(w), bits, mode, on_cpu)
                    _assert_same(got, want, f"native {shape} {dist} b{bits} {mode}")


def _clamped_min_weight(
    rng: np.random.Generator, shape: tuple[int, ...], bits: int, share: float = 0.85
) -> np.ndarray:
    """Channels whose minimum repeats: with ``s * mn = -(n - 0.7)`` those
    elements land at ``x = tmin - 0.3`` (error +0.3, no candidate), so the
    kernel level flips non-candidates, zeroes their errors and leaves
    zero-priority carries: the channel level then flips more positions
    than there are positive carries (the fill, in position order)."""
    n = 2 ** (bits - 1)
    mx = -1.0 + (2**bits - 1) / (n - 0.7)
    w = rng.uniform(-1.0, mx, shape)
    w[rng.random(shape) < share] = -1.0
    flat = w.reshape(shape[0], -1)
    flat[:, 0] = mx
    flat[:, -1] = -1.0
    return np.asarray(w, dtype=F32)


def _biased_weight(rng: np.random.Generator, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """``s = 1`` and ``z = n`` exactly; every other element sits at an
    integer + 0.3, so every error is -0.3 and the sums (so ``t``) are large."""
    top = 2**bits - 1
    w = rng.integers(0, top, shape) + 0.3
    flat = w.reshape(shape[0], -1)
    flat[:, 0], flat[:, -1] = 0.0, float(top)
    return np.asarray(w, dtype=F32)


def _t_and_positive_carries(w: np.ndarray, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: the channel level's ``t`` and number of positive carries
    in its direction after the dense kernel level."""
    oc, ic = w.shape[:2]
    k = math.prod(w.shape[2:])
    n = 2 ** (bits - 1)
    w2 = torch.from_numpy(w.reshape(oc, -1))
    s = torch.full((oc,), float(2**bits - 1)).div_((w2.amax(1) - w2.amin(1)).clamp_min_(1e-8))
    z = torch.round(s * w2.amin(1)).add_(float(n))
    x = (s.unsqueeze(1) * w2).sub_(z.unsqueeze(1))
    r = torch.round(x)
    levels = tb._DenseLevels(x, r, r - x, -n, n - 1)
    levels.kernel_level(ic, k, True)
    carry = levels.carry
    assert carry is not None
    up, t = tb._decide_channel(carry.total, tb._frac_bits(ic * k))
    in_dir = carry.up.view(oc, ic) == up.unsqueeze(1)
    n_pos = ((carry.pri.view(oc, ic) > 0) & in_dir).sum(1)
    return t, n_pos


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-path", "cuda-path"])
def test_channel_level_fill_beyond_positive_carries(on_cpu: bool) -> None:
    """After the kernel level, channels with t > (positive carries): the
    dense strategy's running count over the non-carry positions, and the
    sparse one's fill, against the oracle and the Rust core; large t
    without K too (biased errors), all bit widths."""
    native = pytest.importorskip("squant_rs._squant_rs")
    rng = np.random.default_rng(31)
    shapes = ((6, 5, 3, 3), (5, 1, 3, 3), (4, 16, 2, 2), (3, 4, 5), (7, 9), (6, 12, 1, 1))
    beyond = 0
    for bits in range(2, 9):
        for shape in shapes:
            for make in (_clamped_min_weight, _biased_weight):
                w = make(rng, shape, bits)
                if len(shape) > 2 and math.prod(shape[2:]) > 1:
                    t, n_pos = _t_and_positive_carries(w, bits)
                    beyond += int((t > n_pos).sum())
                for mode in MODES:
                    want = oracle(w, bits, mode)
                    got = _run(torch.from_numpy(w), bits, mode, on_cpu)
                    _assert_same(got, want, f"{make.__name__} {shape} b{bits} {mode}")
                    ref = native.quantize(w, bits, mode, 1)
                    _assert_same(got, (*ref[:3], int(ref[3]), int(ref[4])), f"native {shape}")
    assert beyond > 40  # the case this test is about really happens


@pytest.mark.parametrize("route", ["float32", "float64-total", "int64-t"])
def test_dense_decide_routes(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """The dense strategy's shortcuts in docs/algorithm.md section 3 (int64 total -> float32
    directly, t kept as float32) and the exact routes it takes for long
    groups (through float64; int64 t) give the same codes."""
    if route == "float64-total":
        monkeypatch.setattr(tb, "_EXACT_TOTAL_LIMIT", 0)
    elif route == "int64-t":
        monkeypatch.setattr(tb, "_FLOAT_T_LIMIT", 0)
    native = pytest.importorskip("squant_rs._squant_rs")
    rng = np.random.default_rng(37)
    for shape, dist in (
        ((6, 5, 3, 3), "grid"),
        ((4, 8, 3, 3), "normal"),
        ((5, 3, 2, 2), "grid_coarse"),
        ((7, 40), "student_t"),
        ((2, 8200), "normal"),  # 8200 * 2^40 >= 2^53: float64 route in any case
    ):
        w = make_weight(rng, shape, dist)
        for bits in (2, 4, 8):
            for mode in MODES:
                ref = native.quantize(w, bits, mode, 1)
                got = _run(torch.from_numpy(w), bits, mode, False)
                _assert_same(got, (*ref[:3], int(ref[3]), int(ref[4])), f"{route} {shape} {mode}")


def test_dense_strategy_survives_non_finite_weights() -> None:
    """Without a check the dense strategy runs to the end on NaN and
    infinities (its gathers stay in range: on CUDA an out-of-range index
    would be a device-side assert), and flags the channels."""
    rng = np.random.default_rng(17)
    for shape in ((6, 5, 3, 3), (4, 1, 3, 3), (5, 8), (3, 4, 9, 9)):
        for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
            w = torch.from_numpy(make_weight(rng, shape, "normal"))
            w.view(shape[0], -1)[1, 2] = bad
            w.view(shape[0], -1)[-1, :] = bad
            before = w.clone()
            calls: list[int] = []
            flagged = functools.partial(calls.append, 1)
            for mode in MODES:
                for bits in (2, 4, 8):
                    codes, s, z, kc, cc = tb._quantize(w, bits, mode, on_cpu=False, check=flagged)
                    assert codes.shape == w.shape and isinstance(kc, int) and isinstance(cc, int)
            assert len(calls) == len(MODES) * 3  # flagged every time
            assert torch.equal(w.view(torch.int32), before.view(torch.int32))  # untouched


def test_check_false_alarm_keeps_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flagged channel whose exact check passes (check returns): the
    results are the ones computed, for both strategies."""
    monkeypatch.setattr(tb, "_suspect_channels", lambda s, mx, z: torch.ones((), dtype=torch.int64))
    rng = np.random.default_rng(19)
    w = make_weight(rng, (6, 5, 3, 3), "normal")
    for on_cpu in (True, False):
        calls: list[int] = []
        flagged = functools.partial(calls.append, 1)
        for mode in MODES:
            got = tb._quantize(torch.from_numpy(w), 4, mode, on_cpu=on_cpu, check=flagged)
            got_np = (got[0].numpy(), got[1].numpy(), got[2].numpy(), got[3], got[4])
            _assert_same(got_np, oracle(w, 4, mode), f"false alarm {on_cpu} {mode}")
        assert len(calls) == len(MODES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_host_sync_per_layer() -> None:
    """The public CUDA path syncs with the host once per weight (the flip
    counts and the suspect-channel count, read together)."""
    import warnings

    import squant_rs

    rng = np.random.default_rng(23)
    for shape in ((64, 32, 3, 3), (128, 64, 1, 1), (100, 300), (32, 1, 3, 3)):
        w = torch.from_numpy(make_weight(rng, shape, "normal")).cuda()
        for mode in MODES:
            squant_rs.quantize_tensor(w, 4, mode)  # warm-up (lazy init may sync)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    squant_rs.quantize_tensor(w, 4, mode)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [x for x in seen if "called a synchronizing" in str(x.message)]
            assert len(syncs) == 1, (shape, mode, [str(x.message) for x in syncs])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_oracle() -> None:
    rng = np.random.default_rng(12)
    for i, shape in enumerate(SHAPES):
        for dist in ("normal", "grid", "pruned", "constant"):
            w = make_weight(rng, shape, dist)
            bits = 2 + i % 7
            for mode in MODES:
                want = oracle(w, bits, mode)
                wc = torch.from_numpy(w).cuda()
                codes, s, z, kc, cc = tb.quantize_torch(wc, bits, mode)
                assert codes.is_cuda
                got = (codes.cpu().numpy(), s.cpu().numpy(), z.cpu().numpy(), kc, cc)
                _assert_same(got, want, f"cuda {dist} {shape} b{bits} {mode}")
                # the CPU-strategy code also runs on CUDA
                _assert_same(_run(wc, bits, mode, True), want, f"cuda cpu-path {shape}")
