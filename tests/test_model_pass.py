"""The whole-model pass: the native ``quantize_into`` (weights quantized and
dequantized into caller buffers in one parallel run) and the model copy
``quantize_model`` makes without cloning the weights it overwrites."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import squant_rs
from squant_rs import _squant_rs as native
from squant_rs.model.fold import fold_batchnorm
from squant_rs.model.layers import copy_model, dequantize_tensors, quantize_into

from conftest import make_weight, seed_for

torch = pytest.importorskip("torch")
nn = torch.nn

SHAPES = [(64, 32, 3, 3), (10, 7), (3, 5, 1, 1), (33, 8, 5), (200, 4, 1, 1), (1, 1)]


def _weights(key: str) -> list[np.ndarray]:
    rng = np.random.default_rng(seed_for("pass", key))
    return [make_weight(rng, s, "normal") for s in SHAPES]


def _rel_error(w_hat: np.ndarray, w: np.ndarray) -> float:
    a = w.astype(np.float64)
    return float(np.linalg.norm(w_hat.astype(np.float64) - a) / np.linalg.norm(a))


# --------------------------------------------------------------------------
# native quantize_into


@pytest.mark.parametrize("mode", ["squant", "squant-e", "squant-k"])
def test_quantize_into_equals_quantize_and_dequantize(mode: str) -> None:
    ws = _weights(mode)
    outs = [np.full(w.shape, np.nan, np.float32) for w in ws]
    res = native.quantize_into(ws, outs, 3, mode)
    for w, out, r in zip(ws, outs, res):
        qt = squant_rs.quantize_tensor(w, 3, mode)
        codes, scale, zp, kf, cf, err, ms, dot = r
        assert dot is None
        assert codes is not None and np.array_equal(codes, qt.codes)
        assert np.array_equal(scale, qt.scale) and np.array_equal(zp, qt.zero_point)
        assert (kf, cf) == (qt.k_flips, qt.c_flips)
        assert np.array_equal(out, qt.dequantize())
        assert err == pytest.approx(_rel_error(out, w), rel=1e-12)
        assert ms >= 0


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_quantize_into_other_dtypes(dtype: str) -> None:
    tdt = getattr(torch, dtype)
    ws = [torch.from_numpy(w * 1e3).to(tdt) for w in _weights(dtype)]
    ws[0][0] = 65504.0  # the float16 grid ends beyond it: clamped, not inf
    dst = [torch.empty(w.shape, dtype=tdt) for w in ws]
    views = [d.view(torch.int16).numpy() if dtype == "bfloat16" else d.numpy() for d in dst]
    res = native.quantize_into([w.float().numpy() for w in ws], views, 4, "squant")
    for w, d, r in zip(ws, dst, res):
        want = squant_rs.quantize_tensor(w, 4).dequantize()
        assert torch.equal(d, want)
        assert torch.isfinite(d).all()
        exact = _rel_error(want.double().numpy(), w.double().numpy())
        assert r[5] == pytest.approx(exact, rel=1e-12)


def test_quantize_into_results_do_not_depend_on_threads() -> None:
    ws = _weights("threads") + [make_weight(np.random.default_rng(3), (256, 64, 3, 3), "normal")]
    runs = []
    for threads in (1, 2, 3):
        outs = [np.empty_like(w) for w in ws]
        res = native.quantize_into(ws, outs, 4, "squant", threads=threads)
        runs.append((outs, [r[1:6] for r in res]))
    for outs, rows in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outs, runs[0][0]))
        for a, b in zip(rows, runs[0][1]):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            assert a[2:] == b[2:]  # flips and relative error, bit for bit


def test_quantize_into_without_codes() -> None:
    ws = _weights("nocodes")
    outs = [np.empty_like(w) for w in ws]
    res = native.quantize_into(ws, outs, 4, "squant", keep_codes=False)
    for w, out, r in zip(ws, outs, res):
        assert r[0] is None
        assert np.array_equal(out, squant_rs.quantize_tensor(w, 4).dequantize())


@pytest.mark.parametrize("magnitude", [1e20, 1e-20, 3e37])
def test_relative_error_of_huge_and_tiny_weights(magnitude: float) -> None:
    rng = np.random.default_rng(seed_for("magnitude", magnitude))
    w = (rng.standard_normal((16, 8, 3, 3)) * magnitude).astype(np.float32)
    out = np.empty_like(w)
    (r,) = native.quantize_into([w], [out], 4, "squant")
    assert np.isfinite(r[5]) and r[5] > 0
    assert r[5] == pytest.approx(_rel_error(out, w), rel=1e-12)


def test_relative_error_of_a_zero_weight() -> None:
    w = np.zeros((4, 3), np.float32)
    out = np.empty_like(w)
    (r,) = native.quantize_into([w], [out], 4, "squant")
    assert r[5] == 0.0 and not out.any()


def test_quantize_into_errors_name_the_weight() -> None:
    ws = _weights("errors")
    outs = [np.empty_like(w) for w in ws]
    bad = [w.copy() for w in ws]
    bad[3][7, 2, 1] = np.nan
    bad[4][150, 0, 0, 0] = np.inf
    with pytest.raises(squant_rs.NonFiniteWeightError, match=r"^weight 3: .*output channel 7"):
        native.quantize_into(bad, outs, 4, "squant", threads=2)
    bad[1][0, 0] = 3e38
    bad[1][0, 1] = -3e38
    with pytest.raises(squant_rs.WeightRangeError, match=r"^weight 1: output channel 0"):
        native.quantize_into(bad, outs, 4, "squant", threads=2)


def test_quantize_into_rejects_bad_outputs() -> None:
    ws = _weights("outputs")[:2]
    ok = np.empty_like(ws[1])
    with pytest.raises(squant_rs.InvalidArgumentError, match="2 weights but 1 outputs"):
        native.quantize_into(ws, [ok], 4, "squant")
    with pytest.raises(squant_rs.InvalidArgumentError, match=r"weight 0: output has shape"):
        native.quantize_into(ws, [np.empty((64, 32, 9), np.float32), ok], 4, "squant")
    with pytest.raises(TypeError, match=r"weight 0: output must be a numpy array .* int32"):
        native.quantize_into(ws, [np.empty(ws[0].shape, np.int32), ok], 4, "squant")
    fortran = np.empty(ws[0].shape, np.float32, order="F")
    with pytest.raises(squant_rs.InvalidArgumentError, match="C-contiguous"):
        native.quantize_into(ws, [fortran, ok], 4, "squant")
    frozen = np.empty_like(ws[0])
    frozen.flags.writeable = False
    with pytest.raises(squant_rs.InvalidArgumentError, match="writeable"):
        native.quantize_into(ws, [frozen, ok], 4, "squant")
    before = ws[0].copy()
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 0: .*borrowed"):
        native.quantize_into(ws, [ws[0], ok], 4, "squant")
    alias = torch.from_numpy(ws[0]).numpy()  # another array over the same memory
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 0: .*overlaps .*weight 0"):
        native.quantize_into(ws, [alias, ok], 4, "squant")
    n, shape = ws[1].size, ws[1].shape
    shared = torch.empty(2 * n)  # two numpy arrays over overlapping memory
    a, b = shared[:n].view(shape).numpy(), shared[3 : 3 + n].view(shape).numpy()
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 1: .*overlaps .*output 0"):
        native.quantize_into([ws[1], ws[1]], [a, b], 4, "squant")
    assert np.array_equal(ws[0], before)  # inputs never modified


def test_simd_build_names_a_build() -> None:
    assert native.simd_build() in ("avx512", "avx2", "baseline", "neon", "portable")


# --------------------------------------------------------------------------
# the model copy


class _Odd(nn.Module):
    """Attributes a plain deepcopy handles and the fast copy must too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.lin = nn.Linear(6, 6)
        self.lin2 = nn.Linear(6, 6)
        self.lin2.weight = self.lin.weight  # tied
        self.bn = nn.BatchNorm2d(6)
        self.register_buffer("view", self.bn.running_mean[2:4])  # shares storage
        self.notes = {"a": [1, 2], "t": torch.ones(3)}
        self.same_list = self.notes["a"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).mean((2, 3))
        return self.lin2(self.lin(x))


def test_copy_model_is_a_deep_copy_with_fresh_weights() -> None:
    torch.manual_seed(0)
    model = _Odd()
    fresh = [model.conv.weight, model.lin.weight]
    c = copy_model(model, fresh)
    ref = copy.deepcopy(model)
    for (name, p), (_, q) in zip(model.state_dict().items(), c.state_dict().items()):
        assert p.data_ptr() != q.data_ptr(), name
        assert p.shape == q.shape and p.dtype == q.dtype and p.stride() == q.stride()
        if name not in ("conv.weight", "lin.weight", "lin2.weight"):
            assert torch.equal(p, q), name
    assert c.lin2.weight is c.lin.weight and isinstance(c.conv.weight, nn.Parameter)
    assert c.conv.weight.requires_grad
    # storage sharing, containers and aliases as deepcopy makes them
    assert c.view.untyped_storage().data_ptr() == c.bn.running_mean.untyped_storage().data_ptr()
    assert c.notes["a"] is c.same_list and c.notes["a"] == [1, 2]
    assert c.notes["a"] is not model.notes["a"]
    assert torch.equal(c.notes["t"], ref.notes["t"]) and c.notes["t"] is not model.notes["t"]
    c.bn.running_mean.add_(1.0)
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)


def test_quantize_model_writes_every_layout_and_keeps_torch_settings() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 1), nn.Linear(5, 4))
    model[0].to(memory_format=torch.channels_last)  # a non-contiguous destination
    threads = torch.get_num_threads()
    qmodel, report = squant_rs.quantize_model(model, wbits=4, return_report=True)
    assert torch.get_num_threads() == threads
    assert qmodel[0].weight.stride() == model[0].weight.stride()
    for i, r in zip((0, 1, 2), report.layers):
        w = model[i].weight.detach()
        qt = squant_rs.quantize_tensor(w, 4)
        assert torch.equal(qmodel[i].weight, qt.dequantize())
        assert (r.k_flips, r.c_flips) == (qt.k_flips, qt.c_flips)
        want = _rel_error(qt.dequantize().numpy(), w.contiguous().numpy())
        assert r.rel_error == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("bits", [3, 8])
def test_quantize_into_symmetric_equals_quantize_tensor(backend: str, bits: int) -> None:
    ws = [torch.from_numpy(w) for w in _weights(f"sym{bits}")]
    outs = [torch.empty_like(w) for w in ws]
    items = [(f"w{i}", w, o) for i, (w, o) in enumerate(zip(ws, outs))]
    res = quantize_into(items, bits, "squant", backend, 2, "symmetric")
    for w, out, r in zip(ws, outs, res):
        qt = squant_rs.quantize_tensor(w, bits, backend=backend, quantizer="symmetric")
        assert r.qtensor.quantizer == "symmetric"
        assert torch.equal(r.qtensor.codes, qt.codes)
        assert torch.equal(r.qtensor.scale, qt.scale)
        assert torch.equal(r.qtensor.zero_point, torch.zeros_like(qt.zero_point))
        assert torch.equal(r.qtensor.zero_point, qt.zero_point)
        assert (r.qtensor.k_flips, r.qtensor.c_flips) == (qt.k_flips, qt.c_flips)
        assert torch.equal(out, qt.dequantize())
        assert r.rel_error == pytest.approx(
            _rel_error(qt.dequantize().numpy(), w.numpy()), rel=1e-6
        )
    # ... and differs from the asymmetric pass (the quantizer reaches the core).
    asym = quantize_into(items, bits, "squant", backend, 2)
    assert not torch.equal(asym[0].qtensor.codes, res[0].qtensor.codes)
    # quantize_model: the pass's quantized tensors are the report's.
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Linear(5, 4))
    qmodel, report = squant_rs.quantize_model(
        model, bits, backend=backend, quantizer="symmetric", return_report=True
    )
    for i, r in zip((0, 1), report.layers):
        qt = squant_rs.quantize_tensor(
            model[i].weight, bits, backend=backend, quantizer="symmetric"
        )
        assert r.qtensor is not None and r.qtensor.quantizer == "symmetric"
        assert torch.equal(r.qtensor.codes, qt.codes)
        assert torch.equal(qmodel[i].weight, qt.dequantize())


def test_quantize_model_with_tied_weights_and_float_calibration() -> None:
    torch.manual_seed(2)
    model = _Odd()
    for abits in (None, 8):
        qmodel = squant_rs.quantize_model(model, wbits=4, abits=abits, input_shape=(2, 4, 6, 6))
        assert qmodel.lin2.weight is qmodel.lin.weight
        want = squant_rs.quantize_tensor(model.lin.weight, 4).dequantize()
        assert torch.equal(qmodel.lin.weight, want)
        assert torch.equal(model.bn.running_mean, torch.zeros(6))


# --------------------------------------------------------------------------
# dequantizing into buffers


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "bfloat16"])
def test_dequantize_into_and_dequantize_tensors(dtype: str) -> None:
    tdt = getattr(torch, dtype)
    ws = [torch.from_numpy(w * 300).to(tdt) for w in _weights("deq" + dtype)]
    qts = [squant_rs.quantize_tensor(w, 4) for w in ws]
    want = [qt.dequantize() for qt in qts]
    got = dequantize_tensors(qts, threads=2)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
    dst = [torch.empty_like(w) for w in ws]
    views = [d.view(torch.int16).numpy() if dtype == "bfloat16" else d.numpy() for d in dst]
    args = (
        [qt.codes.numpy() for qt in qts],
        [qt.scale.numpy() for qt in qts],
        [qt.zero_point.numpy() for qt in qts],
        views,
    )
    errs = native.dequantize_into(*args, [w.float().numpy() for w in ws])
    assert all(torch.equal(a, b) for a, b in zip(dst, want))
    assert errs is not None
    for e, w, w_hat in zip(errs, ws, want):
        assert e == pytest.approx(_rel_error(w_hat.double().numpy(), w.double().numpy()), rel=1e-12)
    assert native.dequantize_into(*args) is None


def test_dequantize_tensors_of_numpy_results() -> None:
    ws = _weights("deq-numpy")
    qts = squant_rs.quantize_tensors([w.astype(np.float16) for w in ws], 3)
    for t, qt in zip(dequantize_tensors(qts), qts):
        assert t.dtype == torch.float16
        assert np.array_equal(t.numpy(), qt.dequantize())


def test_dequantize_into_rejects_bad_arguments() -> None:
    (w,) = _weights("deq-bad")[:1]
    qt = squant_rs.quantize_tensor(w, 4)
    out = np.empty_like(w)
    with pytest.raises(squant_rs.InvalidArgumentError, match="1 codes arrays but 0 scales"):
        native.dequantize_into([qt.codes], [], [qt.zero_point], [out])
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 0: scale has 3 elements"):
        native.dequantize_into([qt.codes], [qt.scale[:3]], [qt.zero_point], [out])
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 0: output has shape"):
        native.dequantize_into([qt.codes], [qt.scale], [qt.zero_point], [out[:2]])
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight 0: weight has shape"):
        native.dequantize_into([qt.codes], [qt.scale], [qt.zero_point], [out], [w[:2]])


def test_quantize_model_torch_backend_on_cpu_matches_rust() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 6)).to(torch.float16)
    a, ra = squant_rs.quantize_model(model, backend="torch", return_report=True)
    b, rb = squant_rs.quantize_model(model, backend="rust", return_report=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for x, y in zip(ra.layers, rb.layers):
        assert (x.k_flips, x.c_flips, x.rel_error) == (y.k_flips, y.c_flips, y.rel_error)


def test_report_times_add_up_to_at_most_the_wall_time() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(*(nn.Conv2d(128, 128, 3) for _ in range(4)))
    report = squant_rs.quantize_model(model, threads=2).squant_report
    assert all(r.time_ms > 0 for r in report.layers)
    assert report.total_ms <= report.wall_ms


class _OwnCopy(nn.Module):
    """A module whose own ``__deepcopy__`` ignores the memo."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def __deepcopy__(self, memo: dict) -> _OwnCopy:
        new = _OwnCopy()
        new.conv.load_state_dict(self.conv.state_dict())
        return new


def test_quantize_model_with_a_module_that_copies_itself() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(_OwnCopy(), nn.Linear(3, 2))
    qmodel = squant_rs.quantize_model(model, wbits=3)
    for name in ("0.conv", "1"):
        w = model.get_submodule(name).weight
        want = squant_rs.quantize_tensor(w, 3).dequantize()
        assert torch.equal(qmodel.get_submodule(name).weight, want), name


class _Kept(nn.Sequential):
    """A module that ``deepcopy`` shares between copies (its ``__deepcopy__``
    returns itself)."""

    def __deepcopy__(self, memo: dict) -> _Kept:
        return self


class _ShallowConv(nn.Conv2d):
    """A conv whose ``__deepcopy__`` is a shallow copy: a new module holding
    the original's parameter dictionary."""

    def __deepcopy__(self, memo: dict) -> _ShallowConv:
        return copy.copy(self)


class _KeptBN(nn.Module):
    """A BN in a module ``deepcopy`` shares, after a conv it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.post = _Kept(nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.post(self.conv(x))))


def _state(model: nn.Module) -> list[tuple[str, str, object]]:
    """Everything quantize_model could write into ``model``: modules (their
    types, hooks and attributes' keys), parameters and buffers (values)."""
    out: list[tuple[str, str, object]] = []
    for name, m in model.named_modules():
        hooks = (len(m._forward_pre_hooks), len(m._forward_hooks), m.training)
        out.append((name, type(m).__name__, (hooks, sorted(m.__dict__))))
    out += [(n, "tensor", t.detach().clone()) for n, t in model.state_dict().items()]
    return out


def _same(a: list[tuple[str, str, object]], b: list[tuple[str, str, object]]) -> bool:
    return len(a) == len(b) and all(
        x[:2] == y[:2] and (torch.equal(x[2], y[2]) if x[1] == "tensor" else x[2] == y[2])
        for x, y in zip(a, b)
    )


def _kept_block() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        _Kept(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), nn.Conv2d(8, 2, 1)
    ).eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recipe": "paper"}, "the weight of layer '0.0'"),
        ({"recipe": "paper", "abits": 8}, "the weight of layer '0.0'"),  # a full copy first
        ({"recipe": "squant+"}, "the weight of layer '0.0'"),
        ({"recipe": "squant+", "abits": 8}, "the weight of layer '0.0'"),
        # skipped, but the BN is still folded into it
        ({"recipe": "squant+", "skip": "0.0"}, "the weight of layer '0.0'"),
        ({"fold_bn": True, "bias_correction": False, "skip": "0.0"}, "layer '0.0'"),
    ],
)
def test_quantize_model_refuses_to_write_what_its_copy_shares(
    kwargs: dict[str, object], match: str
) -> None:
    """A module whose __deepcopy__ returns itself is the caller's in the
    copy: its weights were overwritten with the quantized ones (and under
    squant+ its BN replaced by Identity); now a clear error before anything
    is written."""
    model = _kept_block()
    before = _state(model)
    with pytest.raises(squant_rs.InvalidArgumentError, match=f"{match} is shared between"):
        squant_rs.quantize_model(model, 4, input_shape=(2, 3, 6, 6), **kwargs)  # type: ignore[call-overload]
    assert _same(_state(model), before)
    assert type(model[0][1]) is nn.BatchNorm2d


def test_quantize_model_refuses_a_copy_sharing_a_parameter() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(_ShallowConv(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    before = _state(model)
    for recipe in ("paper", "squant+"):
        with pytest.raises(squant_rs.InvalidArgumentError, match="weight of layer '0'"):
            squant_rs.quantize_model(model, 4, recipe=recipe)
        assert _same(_state(model), before)


def test_quantize_model_refuses_to_replace_a_bn_in_a_shared_module() -> None:
    """Folding replaces the BN in every module holding it: here one the
    copy shares with the caller's model (the conv itself is copied)."""
    torch.manual_seed(9)
    model = _KeptBN().eval()
    before = _state(model)
    match = r"module 'post' \(_Kept, whose BatchNorm is replaced\) is shared"
    with pytest.raises(squant_rs.InvalidArgumentError, match=match):
        squant_rs.quantize_model(model, 4)
    assert _same(_state(model), before)
    with pytest.raises(squant_rs.InvalidArgumentError, match=match):
        fold_batchnorm(model)
    assert _same(_state(model), before)
    # Nothing written into it without folding: the copy keeps sharing it.
    q = squant_rs.quantize_model(model, 4, recipe="paper")
    assert q.post is model.post and q.conv is not model.conv
    assert _same(_state(model), before)


def test_quantize_model_with_a_shared_module_it_does_not_write() -> None:
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Kept(nn.ReLU()), _Kept(nn.Conv2d(4, 2, 1)))
    before = _state(model)
    q = squant_rs.quantize_model(model, 4, skip="2.0", recipe="paper")
    assert q[1] is model[1] and q[2] is model[2]
    assert not torch.equal(q[0].weight, model[0].weight)
    assert _same(_state(model), before)
    with pytest.raises(squant_rs.InvalidArgumentError, match="weight of layer '2.0'"):
        squant_rs.quantize_model(model, 4, recipe="paper")
    assert _same(_state(model), before)


def test_a_model_whose_deepcopy_returns_itself() -> None:
    model = _Kept(nn.Linear(3, 2))
    before = _state(model)
    for skip in ((), "0"):
        with pytest.raises(squant_rs.InvalidArgumentError, match="the model itself is shared"):
            squant_rs.quantize_model(model, 4, skip=skip, recipe="paper")
    assert "squant_report" not in model.__dict__ and _same(_state(model), before)


def test_copy_model_reports_what_it_shares() -> None:
    model = _kept_block()
    shared: set[int] = set()
    c = copy_model(model, [], shared=shared)
    kept = model[0]
    want = {id(m) for m in kept.modules()}
    want |= {id(t) for t in (*kept.parameters(), *kept.buffers())}
    assert c[0] is kept and shared == want
    plain: set[int] = set()
    copy_model(nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2)), [], shared=plain)
    assert plain == set()


def _double(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    return out * 2


def test_copy_model_keeps_hooks_and_makes_separate_hook_dictionaries() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 1))
    model[2].register_forward_hook(_double)
    c = copy_model(model, [model[0].weight])
    ref = copy.deepcopy(model)
    x = torch.rand(1, 2, 5, 5)
    c[0].weight.data.copy_(model[0].weight)
    assert torch.equal(c(x), ref(x))  # the hook copied and active
    for a, b in zip(model.modules(), c.modules()):
        assert type(a) is type(b) and a is not b
        assert a.__dict__.keys() == b.__dict__.keys()
        assert a._forward_hooks is not b._forward_hooks
    dicts = [id(d) for m in c.modules() for d in m.__dict__.values() if isinstance(d, dict)]
    assert len(dicts) == len(set(dicts))  # no dictionary shared between modules
    c[1].register_forward_hook(_double)  # registering on the copy leaves the model alone
    assert not model[1]._forward_hooks and len(c[2]._forward_hooks) == 1


def test_quantize_model_warnings_point_at_the_caller() -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.warns(UserWarning, match="matches no") as rec:
        squant_rs.quantize_model(model, skip=["nope"])
    assert rec[0].filename == __file__


def test_quantize_model_restores_the_garbage_collector() -> None:
    import gc

    model = nn.Sequential(nn.Linear(3, 4))
    assert gc.isenabled()
    squant_rs.quantize_model(model)
    assert gc.isenabled()
    gc.disable()
    try:
        squant_rs.quantize_model(model)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(squant_rs.InvalidArgumentError):
        squant_rs.quantize_model(model, wbits=9)
    assert gc.isenabled()


def test_copy_model_keeps_a_dictionary_shared_between_modules_shared() -> None:
    model = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.Linear(2, 2))
    model[1]._forward_pre_hooks = model[0]._forward_pre_hooks  # one empty dict, two modules
    c = copy_model(model, [])
    ref = copy.deepcopy(model)
    assert ref[0]._forward_pre_hooks is ref[1]._forward_pre_hooks
    assert c[0]._forward_pre_hooks is c[1]._forward_pre_hooks
    assert c[0]._forward_pre_hooks is not model[0]._forward_pre_hooks
    assert c[0]._forward_hooks is not c[1]._forward_hooks


def test_copy_model_of_a_deeply_nested_model() -> None:
    # Deeper than the native walk goes: the rest is deepcopy's, and the
    # copy is still a deep copy.
    inner: nn.Module = nn.Linear(2, 2)
    for _ in range(150):  # 300 nested values: past the native walk's 200
        inner = nn.Sequential(inner)
    c = copy_model(inner, [])
    a, b = inner, c
    while isinstance(a, nn.Sequential):
        assert isinstance(b, nn.Sequential) and a is not b
        a, b = a[0], b[0]
    assert torch.equal(a.weight, b.weight) and a.weight is not b.weight
