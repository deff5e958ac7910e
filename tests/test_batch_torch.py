"""`quantize_torch_tensors`: weights batched by trailing shape through the
vectorized torch backend give, weight by weight, exactly what
`quantize_tensor(w, bits, mode, backend="torch")` gives -- codes, scale,
zero point, flip counts, dtype -- on both backend strategies (the CUDA one
forced on CPU here), and the single-weight errors with the weight named."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import squant_rs  # noqa: E402
from squant_rs.torch import adapter as ta  # noqa: E402
from squant_rs.torch import backend as tb  # noqa: E402
from squant_rs.torch.adapter import quantize_torch_tensors  # noqa: E402

from conftest import make_weight, seed_for  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MODES = squant_rs.MODES
# (shape, distribution, dtype): same trailing shapes with different OC,
# Linear, depthwise, conv1d, long kernels (CPU strategy's topk route),
# 5x5 / 7x7 kernels (deep kernel ranks), several dtypes.
CASES = [
    ((8, 4, 3, 3), "normal", torch.float32),
    ((16, 6), "normal", torch.float32),
    ((5, 4, 3, 3), "grid", torch.float32),
    ((10, 1, 3, 3), "outliers", torch.float32),
    ((12, 4, 3, 3), "pruned", torch.float32),
    ((9, 6), "uniform", torch.float32),
    ((6, 3, 5), "normal", torch.float32),
    ((4, 1, 3, 3), "constant_channels", torch.float32),
    ((2, 3, 5), "grid", torch.float32),
    ((7, 4, 3, 3), "normal", torch.float16),
    ((3, 4, 3, 3), "student_t", torch.float16),
    ((5, 4, 3, 3), "offset", torch.float64),
    ((6, 6), "tiny", torch.bfloat16),
    ((4, 6), "zero_channel", torch.bfloat16),
    ((3, 2, 5, 5), "uniform", torch.float32),
    ((5, 2, 5, 5), "grid", torch.float32),
    ((2, 2, 7, 7), "uniform", torch.float32),
    ((3, 2, 80), "normal", torch.float32),
    ((4, 2, 80), "uniform", torch.float32),
    ((1, 4, 3, 3), "normal", torch.float32),
    ((3, 5, 2, 2), "normal", torch.float32),  # alone in its group
    ((40, 300), "normal", torch.float32),  # long channels (tournament)
    ((9, 300), "grid", torch.float32),
]
BITS_MODES = list(itertools.product(range(2, 9), MODES))


def _weights(key: str = "batch-torch", device: str = "cpu") -> list[torch.Tensor]:
    ws = []
    for i, (shape, dist, dtype) in enumerate(CASES):
        rng = np.random.default_rng(seed_for(key, i, shape, dist))
        ws.append(torch.from_numpy(make_weight(rng, shape, dist, bits=2 + i % 7)).to(dtype))
    # A non-contiguous weight (a transposed view) in the (6,) group, and one
    # that requires grad.
    ws.append(torch.from_numpy(make_weight(np.random.default_rng(5), (6, 11), "normal")).t())
    ws.append(
        torch.nn.Parameter(torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1)))
    )
    return [w.to(device) for w in ws]


def _snapshot(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach().clone() for w in ws]


def _assert_unmodified(ws: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    for w, b in zip(ws, before):
        assert torch.equal(
            w.detach().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        )


def _assert_same(got: squant_rs.QuantizedTensor, want: squant_rs.QuantizedTensor, w, ctx) -> None:
    assert got.codes.dtype == torch.int8 and got.codes.shape == w.shape, ctx
    assert got.codes.device == w.device and got.scale.device == w.device, ctx
    assert got.scale.dtype == got.zero_point.dtype == torch.float32, ctx
    assert got.scale.shape == got.zero_point.shape == (w.shape[0],), ctx
    assert torch.equal(got.codes, want.codes), ctx
    assert torch.equal(got.scale.view(torch.int32), want.scale.view(torch.int32)), ctx
    assert torch.equal(got.zero_point.view(torch.int32), want.zero_point.view(torch.int32)), ctx
    assert (got.k_flips, got.c_flips) == (want.k_flips, want.c_flips), ctx
    assert type(got.k_flips) is int and type(got.c_flips) is int, ctx
    assert (
        (got.bits, got.mode, got.dtype)
        == (want.bits, want.mode, want.dtype)
        == (
            want.bits,
            want.mode,
            w.dtype,
        )
    ), ctx


def _check_all(ws: list[torch.Tensor], bits_modes, ctx: str = "") -> None:
    before = _snapshot(ws)
    flips = 0
    for bits, mode in bits_modes:
        # The reference: one call per weight, on the device's own strategy.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tb, "_ON_CPU", None)
            want = [squant_rs.quantize_tensor(w, bits, mode, backend="torch") for w in ws]
        got = quantize_torch_tensors(ws, bits, mode, list(range(len(ws))))
        assert len(got) == len(ws)
        for i, (g, wt, w) in enumerate(zip(got, want, ws)):
            _assert_same(g, wt, w, f"{ctx} weight {i} {tuple(w.shape)} {w.dtype} b{bits} {mode}")
            flips += g.k_flips + g.c_flips
    assert flips > 0  # the counts are exercised
    _assert_unmodified(ws, before)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
def test_matches_one_call_per_weight(monkeypatch: pytest.MonkeyPatch, on_cpu: bool) -> None:
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    _check_all(_weights(), BITS_MODES, f"on_cpu={on_cpu}")


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
@pytest.mark.parametrize("tournament", [True, False])
def test_channel_ranking_routes(
    monkeypatch: pytest.MonkeyPatch, on_cpu: bool, tournament: bool
) -> None:
    """The CPU strategy's two channel rankings (tournament, keys + topk)."""
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    monkeypatch.setattr(tb, "_TOURNAMENT", tournament)
    rng = np.random.default_rng(seed_for("routes", on_cpu, tournament))
    ws = [
        torch.from_numpy(make_weight(rng, (oc, 200), dist))
        for oc, dist in ((6, "normal"), (3, "grid"), (11, "uniform"), (1, "normal"))
    ]
    _check_all(ws, [(b, m) for b in (2, 4, 8) for m in ("squant", "squant-c")])


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
def test_passes_are_cut_by_size(monkeypatch: pytest.MonkeyPatch, on_cpu: bool) -> None:
    """Groups cut into several passes (a weight larger than the limit runs
    alone) give the same results."""
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    monkeypatch.setattr(ta, "_MAX_PASS_ELEMENTS", 300)
    _check_all(_weights("cut"), [(3, "squant"), (4, "squant-k"), (6, "squant-c")])


def test_grouping_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """One backend pass per (device, dtype, trailing shape), in the order
    the groups first appear; a weight alone in its group takes the
    single-weight path."""
    calls: list[tuple[str, object]] = []
    queue = tb.launch

    def spy(w, bits, mode, segments, *, check=None, **kw):
        if segments is None:
            calls.append(("one", tuple(w.shape)))
        else:
            calls.append(("many", (tuple(w.shape), list(segments))))
        return queue(w, bits, mode, segments, check=check, **kw)

    monkeypatch.setattr(tb, "launch", spy)
    f32, f16 = torch.float32, torch.float16
    ws = [
        torch.randn(4, 3, 3, 3),
        torch.randn(5, 7),
        torch.randn(2, 3, 3, 3),
        torch.randn(6, 3, 3, 3).to(f16),
        torch.randn(1, 7),
        torch.randn(3, 3, 3, 3),
        torch.randn(2, 2, 2),
    ]
    got = quantize_torch_tensors(ws, 4, "squant", list(range(len(ws))))
    assert [g.dtype for g in got] == [f32, f32, f32, f16, f32, f32, f32]
    assert calls == [
        ("many", ((9, 3, 3, 3), [4, 2, 3])),
        ("many", ((6, 7), [5, 1])),
        ("one", (6, 3, 3, 3)),
        ("one", (2, 2, 2)),
    ]
    assert quantize_torch_tensors([], 4, "squant", []) == []


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
@pytest.mark.parametrize("mode", MODES)
def test_segment_counts_in_backend(on_cpu: bool, mode: str) -> None:
    """The backend's per-segment flip counts are the per-weight counts."""
    rng = np.random.default_rng(seed_for("segments", on_cpu, mode))
    ws = [torch.from_numpy(make_weight(rng, (oc, 3, 5, 5), "uniform")) for oc in (4, 1, 7)]
    sizes = [w.shape[0] for w in ws]
    codes, s, z, kc, cc = tb._quantize_segments(torch.cat(ws), 3, mode, sizes, on_cpu=on_cpu)
    assert len(kc) == len(cc) == len(ws)
    for w, c, k1, c1 in zip(ws, codes.split(sizes), kc, cc):
        one = tb._quantize(w, 3, mode, on_cpu=on_cpu)
        assert torch.equal(c, one[0])
        assert (k1, c1) == (one[3], one[4])
    with pytest.raises(ValueError):
        tb._quantize_segments(torch.cat(ws), 3, mode, [4, 1], on_cpu=on_cpu)


def test_results_behave_like_single_results() -> None:
    ws = _weights("behave")
    for g, w in zip(quantize_torch_tensors(ws, 4, "squant", list(range(len(ws)))), ws):
        want = squant_rs.quantize_tensor(w, 4, "squant", backend="torch")
        assert g.codes.is_contiguous() and g.scale.is_contiguous()
        deq = g.dequantize()
        assert deq.dtype == w.dtype and deq.shape == w.shape
        assert torch.equal(deq, want.dequantize())
        assert repr(g) == repr(want)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _single_error(w: torch.Tensor, bits: int = 4, mode: str = "squant") -> BaseException:
    with pytest.raises((squant_rs.SquantError, TypeError)) as err:
        squant_rs.quantize_tensor(w, bits, mode, backend="torch")
    return err.value


def _expect(ws, indices, bad: int, mode: str = "squant") -> None:
    """quantize_torch_tensors raises the single-weight error of ws[bad],
    prefixed with its index, and leaves every input alone."""
    want = _single_error(ws[bad], mode=mode)
    before = _snapshot(ws)
    with pytest.raises(type(want)) as got:
        quantize_torch_tensors(ws, 4, mode, indices)
    assert type(got.value) is type(want)
    assert str(got.value) == f"weight {indices[bad]}: {want}"
    _assert_unmodified(ws, before)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
@pytest.mark.parametrize("mode", MODES)
def test_nan_in_third_weight_of_group(
    monkeypatch: pytest.MonkeyPatch, on_cpu: bool, mode: str
) -> None:
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    ws = [torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ws[2][5].view(-1)[2] = float("nan")
    with pytest.raises(squant_rs.NonFiniteWeightError) as got:
        quantize_torch_tensors(ws, 4, mode, [0, 1, 2, 3])
    assert str(got.value) == (
        "weight 2: weight contains NaN or infinity in output channel 5 (element 2 of that channel)"
    )
    assert torch.isnan(ws[2][5, 0, 0, 2])  # untouched
    _expect(ws, [0, 1, 2, 3], 2, mode)
    _expect(ws, [3, 10, 11, 40], 2, mode)  # the caller's indices


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
def test_value_errors(monkeypatch: pytest.MonkeyPatch, on_cpu: bool) -> None:
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    g = torch.Generator().manual_seed(3)

    def good(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    inf16 = good(5, 3, dtype=torch.float16)
    inf16[4, 1] = float("inf")
    big64 = good(4, 3, 3, dtype=torch.float64)
    big64[2, 0, 1] = 1e300  # beyond float32: WeightRangeError
    huge = good(3, 3)
    huge[1] = torch.tensor([-3e38, 3e38, 0.0])  # the quantizer overflows
    nan_bf16 = good(6, 2, 2, dtype=torch.bfloat16)
    nan_bf16[0, 0, 0] = float("nan")
    for bad, ws in (
        (1, [good(2, 3), inf16, good(3, 3), good(7, 3, dtype=torch.float16)]),
        (2, [good(4, 3, 3, dtype=torch.float64), good(2, 3), big64]),
        (0, [huge, good(3, 3), good(1, 3)]),
        (3, [good(2, 2, 2, dtype=torch.bfloat16), good(2, 3), good(3, 3), nan_bf16]),
        (0, [huge]),  # alone in its group
    ):
        _expect(ws, list(range(len(ws))), bad)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
def test_lowest_index_error_wins(monkeypatch: pytest.MonkeyPatch, on_cpu: bool) -> None:
    """Bad weights in two groups: the error is the lowest index's, as with
    one call per weight, even when its group runs later."""
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    g = torch.Generator().manual_seed(4)
    a0, b1, b2, a3 = (torch.randn(*s, generator=g) for s in ((3, 4), (2, 5), (4, 5), (6, 4)))
    b2[3, 1] = float("nan")
    a3[0, 0] = float("inf")
    _expect([a0, b1, b2, a3], [0, 1, 2, 3], 2)
    _expect([a0, b1, b2, a3], [0, 1, 7, 3], 3)  # indices decide, not positions
    # A validation error after a bad value: the value error comes first.
    _expect([a0, b2, torch.ones(3, dtype=torch.int32)], [0, 1, 2], 1)
    # ... and before it: the validation error.
    _expect([torch.ones(3), b2], [0, 1], 0)
    _expect([a0, torch.zeros(0, 4)], [5, 6], 1)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "cuda-strategy"])
def test_false_alarm_keeps_results(monkeypatch: pytest.MonkeyPatch, on_cpu: bool) -> None:
    """A suspect channel that the exact check clears: the batched results
    stand (and equal the single results)."""
    monkeypatch.setattr(tb, "_ON_CPU", on_cpu)
    ws = _weights("alarm")[:8]
    want = [squant_rs.quantize_tensor(w, 4, "squant", backend="torch") for w in ws]
    monkeypatch.setattr(tb, "_suspect_channels", lambda s, mx, z: torch.ones((), dtype=torch.int64))
    got = quantize_torch_tensors(ws, 4, "squant", list(range(len(ws))))
    for i, (a, b, w) in enumerate(zip(got, want, ws)):
        _assert_same(a, b, w, f"weight {i}")


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------


@needs_cuda
def test_cuda_matches_one_call_per_weight() -> None:
    _check_all(_weights("cuda", "cuda"), BITS_MODES[::3], "cuda")


@needs_cuda
def test_cuda_mixed_devices() -> None:
    """CPU and CUDA weights of the same shape form separate groups."""
    ws = _weights("devices")
    mixed = [w.cuda() if i % 2 else w for i, w in enumerate(ws)]
    _check_all(mixed, [(4, "squant"), (2, "squant-k"), (8, "squant-c")], "mixed")


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_nan_in_third_weight_of_group(mode: str) -> None:
    ws = [torch.randn(8, 4, 3, 3, device="cuda") for _ in range(4)]
    ws[2][5].view(-1)[2] = float("nan")
    _expect(ws, [0, 1, 2, 3], 2, mode)
    with pytest.raises(squant_rs.NonFiniteWeightError, match=r"^weight 2: .* output channel 5 "):
        quantize_torch_tensors(ws, 4, mode, [0, 1, 2, 3])


@needs_cuda
def test_cuda_one_host_sync_per_call() -> None:
    """One host sync for the whole call: every pass is queued first, then
    the flip counts and suspect-channel counts of all of them are read
    together (the host keeps launching while the GPU works)."""
    import warnings

    ws = _weights("syncs", "cuda")
    for mode in ("squant", "squant-k", "squant-c"):
        quantize_torch_tensors(ws, 4, mode, list(range(len(ws))))  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                quantize_torch_tensors(ws, 4, mode, list(range(len(ws))))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [x for x in seen if "called a synchronizing" in str(x.message)]
        assert len(syncs) == 1, (mode, [str(x.message) for x in syncs])
