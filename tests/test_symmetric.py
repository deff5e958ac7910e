"""The symmetric quantizer (zero point 0, narrow signed range): parity of the
Rust fast path with the plain Python oracle and the Rust scalar reference,
the torch backend bit for bit, the section 4 invariants, and the quantizer
threaded through the public API (quantize_tensor(s), quantize_model,
save_quantized, the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import squant_rs
from squant_rs import _squant_rs as native
from squant_rs.torch import backend as tb

from conftest import DISTRIBUTIONS, make_weight, seed_for, x_of
from reference import MODES, code_bounds, nearest_reference, squant_reference

SYM = "symmetric"
ALL_BITS = tuple(range(2, 9))
SHAPES = (
    (16, 24),
    (7, 1),
    (8, 6, 5),
    (12, 8, 3, 3),
    (16, 1, 3, 3),  # depthwise
    (12, 4, 3, 3),  # grouped
    (10, 16, 1, 1),
    (4, 3, 2, 3, 3),
    (3, 2, 7, 7),
)


def sym_grid_weight(rng: np.random.Generator, shape, bits: int) -> np.ndarray:
    """Weights whose symmetric x = s*W lands on exact half steps: per channel
    max|W| = (n - 1) / 4 so s = 4, and W on multiples of 1/8. Ties
    everywhere (.5 errors, equal priorities, sums of exactly k + .5)."""
    n1 = 2 ** (bits - 1) - 1
    oc = shape[0]
    q = rng.integers(-2 * n1, 2 * n1 + 1, size=(oc, int(np.prod(shape[1:]))))
    q[:, 0] = 2 * n1 * np.where(rng.random(oc) < 0.5, -1, 1)  # the extreme
    w = (q.astype(np.float64) / 8.0).reshape(shape).astype(np.float32)
    return w


def assert_parity(w: np.ndarray, bits: int, mode: str) -> None:
    qt = squant_rs.quantize_tensor(w, bits, mode, quantizer=SYM)
    codes, s, z, kc, cc = squant_reference(w, bits, mode, quantizer=SYM)
    assert qt.quantizer == SYM
    assert np.array_equal(qt.codes, codes), (bits, mode)
    assert np.array_equal(qt.scale.view(np.uint32), s.view(np.uint32))
    assert np.array_equal(qt.zero_point, np.zeros_like(s))
    assert (qt.k_flips, qt.c_flips) == (kc, cc)
    # The Rust scalar reference agrees too.
    rc, rs, rz, rk, rcf = native.quantize_reference(w.astype(np.float32), bits, mode, SYM)
    assert np.array_equal(rc, codes) and np.array_equal(rs, s) and (rk, rcf) == (kc, cc)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_shapes_and_distributions(shape):
    rng = np.random.default_rng(seed_for("sym-shape", shape))
    for i, dist in enumerate(DISTRIBUTIONS):
        bits = ALL_BITS[(i + len(shape)) % 7]
        w = make_weight(rng, shape, dist, bits=bits)
        for mode in MODES:
            assert_parity(w, bits, mode)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_parity_all_bits_and_modes_with_ties(bits):
    rng = np.random.default_rng(seed_for("sym-bits", bits))
    stats: dict = {}
    for shape in ((8, 6, 3, 3), (16, 32), (6, 8, 5)):
        w = sym_grid_weight(rng, shape, bits)
        squant_reference(w, bits, "squant", stats=stats, quantizer=SYM)
        for mode in MODES:
            assert_parity(w, bits, mode)
            assert_parity(make_weight(rng, shape, "normal"), bits, mode)
    assert stats["rint_ties"] > 0 and stats.get("half_sums", 0) > 0, stats


@settings(deadline=None, max_examples=40)
@given(
    oc=st.integers(1, 5),
    ic=st.integers(1, 8),
    kernel=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    dist=st.sampled_from(DISTRIBUTIONS),
    bits=st.sampled_from(ALL_BITS),
    seed=st.integers(0, 2**32 - 1),
)
def test_parity_hypothesis(oc, ic, kernel, dist, bits, seed):
    w = make_weight(np.random.default_rng(seed), (oc, ic, *kernel), dist, bits=bits)
    for mode in MODES:
        assert_parity(w, bits, mode)


def test_scale_zero_point_and_range():
    w = np.array([[-0.5, 0.25, 0.1], [0.2, 0.4, 0.3]], dtype=np.float32)
    qt = squant_rs.quantize_tensor(w, 8, "squant-e", quantizer=SYM)
    assert np.array_equal(qt.scale, np.float32([127 / 0.5, 127 / 0.4]))
    assert np.array_equal(qt.zero_point, np.zeros(2, np.float32))
    assert qt.codes[0, 0] == -127 and qt.codes[1, 1] == 127
    assert np.array_equal(qt.codes, nearest_reference(w, 8, SYM))
    # The asymmetric default is unchanged.
    qa = squant_rs.quantize_tensor(w, 8, "squant-e")
    assert qa.quantizer == "asymmetric" and qa.zero_point.any()
    assert "quantizer='symmetric'" in repr(qt)


@pytest.mark.parametrize("bad", ["sym", "", "Symmetric"])
def test_unknown_quantizer(bad):
    w = np.ones((2, 3), np.float32)
    with pytest.raises(squant_rs.InvalidArgumentError, match="unknown quantizer"):
        squant_rs.quantize_tensor(w, quantizer=bad)
    with pytest.raises(squant_rs.InvalidArgumentError, match="unknown quantizer"):
        squant_rs.quantize_tensors([w], quantizer=bad)
    with pytest.raises(squant_rs.InvalidArgumentError, match="unknown quantizer"):
        native.quantize(w, 4, "squant", None, bad)
    with pytest.raises(TypeError):
        squant_rs.quantize_tensor(w, quantizer=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Invariants (docs/algorithm.md section 4 with the narrow range): the symmetric quantizer
# never clamps, so they hold for weights whose largest magnitude maps
# exactly onto +-(n - 1).


def _interior(shape, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n1 = 2 ** (bits - 1) - 1
    oc = shape[0]
    u = rng.uniform(-n1, n1, size=(oc, int(np.prod(shape[1:]))))
    if rng.random() < 0.3:
        u = np.round(u * 4) / 4  # exact ties
    u[:, 0] = n1 * np.where(rng.random(oc) < 0.5, -1, 1)
    p = int(rng.integers(-3, 4))
    # s = n1 / (n1 * 2^-p) = 2^p exactly, x = s * w = u exactly.
    return (u.astype(np.float32) * np.float32(2.0**-p)).reshape(shape)


@st.composite
def shapes(draw, min_kernel: int = 1):
    oc, ic = draw(st.integers(1, 5)), draw(st.integers(2, 8))
    kernel = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    if int(np.prod(kernel)) < min_kernel:
        kernel = [*kernel, min_kernel]
    return (oc, ic, *kernel)


@settings(deadline=None, max_examples=40)
@given(shape=shapes(min_kernel=2), bits=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_invariants(shape, bits, seed):
    w = _interior(shape, bits, seed)
    tmin, tmax = code_bounds(bits, SYM)
    q = {m: squant_rs.quantize_tensor(w, bits, m, quantizer=SYM) for m in MODES}
    for m, qt in q.items():
        x = x_of(w, qt.scale, qt.zero_point).astype(np.float64)
        err = qt.codes.reshape(x.shape).astype(np.float64) - x
        assert qt.codes.min() >= tmin and qt.codes.max() <= tmax
        assert np.all(np.abs(err) < 1.0)
        if m == "squant-k":
            assert np.all(np.abs(err.sum(axis=2)) <= 0.5 + 1e-4)
        if m in ("squant-c", "squant"):
            assert np.all(np.abs(err.sum(axis=(1, 2))) <= 0.5 + 1e-4)
    diff = q["squant"].codes.astype(np.int16) - q["squant-k"].codes
    assert np.all(np.count_nonzero(diff.reshape(shape[0], shape[1], -1), axis=2) <= 1)
    one = squant_rs.quantize_tensor(w, bits, "squant", quantizer=SYM, threads=1)
    assert np.array_equal(one.codes, q["squant"].codes)


# --------------------------------------------------------------------------
# Both backends identical.


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-strategy", "dense-strategy"])
@pytest.mark.parametrize("shape", [(16, 24), (12, 10, 3, 3), (16, 1, 3, 3), (4, 3, 3, 3, 3)])
def test_torch_backend_identical(shape, on_cpu):
    rng = np.random.default_rng(seed_for("sym-torch", shape))
    for dist in DISTRIBUTIONS:
        for bits in (2, 4, 8):
            w = make_weight(rng, shape, dist, bits=bits)
            for mode in MODES:
                a = squant_rs.quantize_tensor(w, bits, mode, quantizer=SYM)
                codes, s, z, kc, cc = tb._quantize(
                    torch.from_numpy(w), bits, mode, on_cpu=on_cpu, quantizer=SYM
                )
                assert np.array_equal(codes.numpy(), a.codes), (dist, bits, mode)
                assert np.array_equal(s.numpy(), a.scale)
                assert not z.any()
                assert (kc, cc) == (a.k_flips, a.c_flips)


def test_torch_tensors_batch_and_errors():
    rng = np.random.default_rng(3)
    ws = [torch.from_numpy(make_weight(rng, (8, 4, 3, 3), "normal")) for _ in range(3)]
    ws.append(torch.from_numpy(make_weight(rng, (6, 5), "outliers")))
    rust = squant_rs.quantize_tensors(ws, 4, quantizer=SYM)
    tor = squant_rs.quantize_tensors(ws, 4, quantizer=SYM, backend="torch")
    for a, b in zip(rust, tor):
        assert a.quantizer == b.quantizer == SYM
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    bad = ws[0].clone()
    bad[2, 0, 0, 0] = float("nan")
    for backend in ("rust", "torch"):
        with pytest.raises(squant_rs.NonFiniteWeightError, match="output channel 2"):
            squant_rs.quantize_tensor(bad, 4, quantizer=SYM, backend=backend)
    huge = torch.full((2, 3), 3e38)
    huge[1, 0] = -3e38
    for backend in ("rust", "torch"):  # symmetric handles a huge range
        qt = squant_rs.quantize_tensor(huge, 4, quantizer=SYM, backend=backend)
        want = torch.tensor([[7, 7, 7], [-7, 7, 7]], dtype=torch.int8)
        assert torch.equal(qt.codes, want)


# --------------------------------------------------------------------------
# The public API around it.


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 5)
    )


def test_quantize_model_and_save_quantized(tmp_path):
    net = _net()
    qm, rep = squant_rs.quantize_model(net, 4, quantizer=SYM, recipe="paper", return_report=True)
    assert rep.quantizer == SYM and "symmetric" in rep.summary()
    for layer, (name, mod) in zip(rep.layers, [("0", qm[0]), ("3", qm[3])]):
        qt = layer.qtensor
        assert layer.name == name and qt is not None and qt.quantizer == SYM
        assert torch.equal(mod.weight.detach(), qt.dequantize())
        w = dict(net.named_modules())[name].weight.detach()
        ref = squant_rs.quantize_tensor(w, 4, quantizer=SYM)
        assert torch.equal(qt.codes, ref.codes)
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(net, path, 4, quantizer=SYM)
    loaded = squant_rs.load_quantized(path)
    for k, v in qm.state_dict().items():
        assert torch.equal(loaded[k], v), k
    from squant_rs.formats.safetensors import inspect_quantized, read_safetensors

    assert read_safetensors(path)[1]["quantizer"] == SYM
    assert inspect_quantized(path).quantizer == SYM
    assert {t.quantizer for t in inspect_quantized(path).quantized} == {SYM}
    # Files without the key are asymmetric.
    plain = tmp_path / "a.safetensors"
    squant_rs.save_quantized(net, plain, 4)
    meta = read_safetensors(plain)[1]
    assert "quantizer" not in meta and all(
        "quantizer" not in m for m in json.loads(meta["quantized"]).values()
    )
    assert {t.quantizer for t in inspect_quantized(plain).quantized} == {"asymmetric"}


def test_cli_quantizer(tmp_path, capsys):
    from safetensors.numpy import save_file

    from squant_rs.cli import main
    from squant_rs.formats.safetensors import inspect_quantized

    src = tmp_path / "in.safetensors"
    save_file({"a.weight": make_weight(np.random.default_rng(0), (8, 4, 3, 3), "normal")}, src)
    out = tmp_path / "out.safetensors"
    assert main(["quantize", str(src), str(out), "--quantizer", "symmetric", "-q"]) == 0
    assert [t.quantizer for t in inspect_quantized(out).quantized] == [SYM]
    assert main(["quantize", str(src), str(out), "--quantizer", "sym"]) == 2
    assert "quantizer" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["safetensors", "sharded", "torch"])
def test_quantizer_on_every_cli_route(tmp_path, route):
    """--quantizer reaches the file on the Rust checkpoint path (single file
    and sharded) and on the torch path; loading dequantizes with zero point 0."""
    from safetensors.numpy import save_file

    from squant_rs.cli import main
    from squant_rs.formats.safetensors import inspect_quantized

    w = make_weight(np.random.default_rng(1), (6, 4, 3, 3), "normal")
    src = tmp_path / "in"
    if route == "sharded":
        src.mkdir()
        save_file({"a.weight": w}, src / "model-00001-of-00001.safetensors")
        index = {"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        out = tmp_path / "out"
        files = [out / "model-00001-of-00001.safetensors"]
    elif route == "torch":
        src = tmp_path / "in.pt"
        torch.save({"a.weight": torch.from_numpy(w)}, src)
        out = tmp_path / "out.safetensors"
        files = [out]
    else:
        src = tmp_path / "in.safetensors"
        save_file({"a.weight": w}, src)
        out = tmp_path / "out.safetensors"
        files = [out]
    assert main(["quantize", str(src), str(out), "--quantizer", "symmetric", "-q"]) == 0
    ref = squant_rs.quantize_tensor(w, 4, quantizer=SYM)
    for f in files:
        assert inspect_quantized(f).quantizer == SYM
        got = squant_rs.load_quantized(f)["a.weight"]
        assert np.array_equal(np.asarray(got), ref.dequantize())
