"""The squant-rs file format: packing, save/load round trips, size, bad files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import squant_rs
from squant_rs import FormatError, SquantError
from squant_rs.formats.safetensors import (
    RawTensor,
    inspect_quantized,
    quantize_checkpoint,
    read_safetensors,
    write_safetensors,
)
from squant_rs.tensor.packing import codes_per_byte, pack_codes, packed_size, unpack_codes

torch = pytest.importorskip("torch")
nn = torch.nn


# --------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 17, 1001])
def test_pack_round_trip(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = rng.integers(lo, hi + 1, size=count).astype(np.int8)
    if count >= 2:
        codes[0], codes[-1] = lo, hi  # both extremes
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == packed_size(count, bits) == -(-count // codes_per_byte(bits))
    out = unpack_codes(packed, bits, count)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, codes)


def test_codes_per_byte() -> None:
    assert [codes_per_byte(b) for b in range(2, 9)] == [4, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        # first code in the low bits, offset q + 2^(b-1), zero padding
        (4, [-8, 7, 0], [0xF0, 0x08]),
        (2, [-2, -1, 0, 1, 1], [0 | 1 << 2 | 2 << 4 | 3 << 6, 3]),
        (3, [-4, 3, 0], [0x70, 0x04]),
        (5, [-16, 15], [0, 31]),
        (8, [-128, 127, 0], [0, 255, 128]),
    ],
)
def test_pack_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack_codes(np.array(codes, dtype=np.int8), bits)
    assert packed.tolist() == expected


def test_pack_multidimensional_is_row_major() -> None:
    codes = np.arange(-8, 8, dtype=np.int8).reshape(2, 2, 4)
    np.testing.assert_array_equal(
        unpack_codes(pack_codes(codes, 4), 4, codes.size), codes.reshape(-1)
    )


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(squant_rs.InvalidArgumentError, match="out of range"):
        pack_codes(np.array([8], dtype=np.int8), 4)
    with pytest.raises(squant_rs.InvalidArgumentError, match="integers"):
        pack_codes(np.array([0.5]), 4)


@pytest.mark.parametrize(
    ("codes", "bits"),
    [
        (np.array([65536 + 3], np.int32), 4),  # 3 after an int16 cast
        (np.array([2**40], np.int64), 8),  # 0 after an int16 cast
        (np.array([65535], np.uint16), 8),  # -1 after an int16 cast
        (np.array([0, -(2**31)], np.int32), 2),  # 0 after an int16 cast
    ],
    ids=["int32", "int64", "uint16", "int32-negative"],
)
def test_pack_range_checks_wide_codes_before_narrowing(codes: np.ndarray, bits: int) -> None:
    """Codes beyond int16 were cast first, wrapped into range and packed."""
    lo, hi = int(codes.min()), int(codes.max())
    with pytest.raises(squant_rs.InvalidArgumentError, match=rf"got \[{lo}, {hi}\]$"):
        pack_codes(codes, bits)


def test_pack_wide_dtypes_in_range_equal_int8() -> None:
    codes = np.array([-8, 7, 0, 3, -1], np.int8)
    for dtype in (np.int16, np.int32, np.int64):
        assert np.array_equal(pack_codes(codes.astype(dtype), 4), pack_codes(codes, 4))
    unsigned = np.array([0, 7, 3], np.uint64)
    assert np.array_equal(pack_codes(unsigned, 4), pack_codes(unsigned.astype(np.int8), 4))


def test_unpack_rejects_bad_input() -> None:
    with pytest.raises(squant_rs.InvalidArgumentError, match="expected 2"):
        unpack_codes(np.zeros(3, dtype=np.uint8), 4, 4)
    # a 4-bit lane holding 15 is not a 3-bit code
    with pytest.raises(squant_rs.InvalidArgumentError, match="not 3-bit"):
        unpack_codes(np.array([0x0F], dtype=np.uint8), 3, 2)


# --------------------------------------------------------------------------
# models and state dicts


class Mixed(nn.Module):
    """Every supported layer kind (no forward needed for weight tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c2 = nn.Conv2d(6, 8, 3, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.dw = nn.Conv2d(8, 8, 5, groups=8)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 3))
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(7)
        self.up = nn.ConvTranspose2d(8, 4, 2)
        self.fc = nn.Linear(7, 5)
        self.emb = nn.Embedding(10, 3)


def _mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Mixed()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.num_batches_tracked.fill_(7)
    return m


def _assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_model_round_trip_equals_quantize_model(tmp_path, bits: int) -> None:
    model = _mixed(bits)
    path = tmp_path / "m.safetensors"
    report = squant_rs.save_quantized(model, path, wbits=bits)
    loaded = squant_rs.load_quantized(path)
    expected = squant_rs.quantize_model(model, wbits=bits).state_dict()
    _assert_state_dicts_equal(loaded, expected)
    # into a fresh model: identical weights to quantize_model's
    fresh = Mixed()
    fresh.load_state_dict(loaded)
    _assert_state_dicts_equal(fresh.state_dict(), expected)
    names = [r.name for r in report.layers]
    assert names == [
        "c1.weight",
        "c2.weight",
        "grouped.weight",
        "dw.weight",
        "c3.weight",
        "fc.weight",
    ]
    assert report.skipped == ["up"]  # ConvTranspose stays float
    assert report.size_after == os.path.getsize(path)


@pytest.mark.parametrize("bits", [4, 8])
def test_model_with_batchnorm_round_trip_equals_the_paper_recipe(tmp_path, bits: int) -> None:
    """save_quantized quantizes the weights as they are (it has no recipe):
    for a model whose BatchNorms the default squant+ recipe folds, the file
    equals quantize_model(..., recipe="paper"), not the default (as the
    save_quantized docstring and the README say)."""
    torch.manual_seed(bits)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
    ).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    path = tmp_path / "bn.safetensors"
    squant_rs.save_quantized(model, path, wbits=bits)
    loaded = squant_rs.load_quantized(path)
    paper = squant_rs.quantize_model(model, wbits=bits, recipe="paper").state_dict()
    _assert_state_dicts_equal(loaded, paper)
    default = squant_rs.quantize_model(model, wbits=bits).state_dict()  # squant+
    assert set(loaded) != set(default)  # the folded BN is gone
    assert not torch.equal(loaded["0.weight"], default["0.weight"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_model_round_trip_dtypes(tmp_path, dtype: str) -> None:
    model = _mixed().to(getattr(torch, dtype))
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(model, path, wbits=4)
    loaded = squant_rs.load_quantized(path)
    expected = squant_rs.quantize_model(model, wbits=4, recipe="paper").state_dict()
    _assert_state_dicts_equal(loaded, expected)
    assert loaded["c2.weight"].dtype == getattr(torch, dtype)
    info = {t.name: t for t in inspect_quantized(path).tensors}
    assert (
        info["c2.weight"].dtype == {"float16": "F16", "bfloat16": "BF16", "float64": "F64"}[dtype]
    )


def test_model_skip_matches_quantize_model(tmp_path) -> None:
    model = _mixed()
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(model, path, skip=("c*", "fc"))
    loaded = squant_rs.load_quantized(path)
    expected = squant_rs.quantize_model(model, skip=("c*", "fc")).state_dict()
    _assert_state_dicts_equal(loaded, expected)
    assert torch.equal(loaded["fc.weight"], model.fc.weight)
    assert torch.equal(loaded["c1.weight"], model.c1.weight)
    assert not torch.equal(loaded["dw.weight"], model.dw.weight)
    quantized = {t.name for t in inspect_quantized(path).quantized}
    assert quantized == {"grouped.weight", "dw.weight"}


def test_file_is_standard_safetensors(tmp_path) -> None:
    from safetensors import safe_open

    model = _mixed()
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(model, path, wbits=3, mode="squant-k")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        codes = f.get_tensor("c2.weight:codes")
        bn_var = f.get_tensor("bn.running_var")
    assert meta["format"] == "squant-rs" and meta["format_version"] == "1"
    q = json.loads(meta["quantized"])
    assert q["c2.weight"] == {
        "bits": 3,
        "mode": "squant-k",
        "shape": [8, 6, 3, 3],
        "dtype": "F32",
        "codes_per_byte": 2,
    }
    assert {"c2.weight:codes", "c2.weight:scale", "c2.weight:zero_point"} <= keys
    assert "c2.weight" not in keys and "bn.running_var" in keys
    assert codes.dtype == torch.uint8 and codes.shape == (packed_size(8 * 6 * 9, 3),)
    assert torch.equal(bn_var, model.bn.running_var)
    qt = squant_rs.quantize_tensor(model.c2.weight.detach(), 3, "squant-k")
    np.testing.assert_array_equal(
        unpack_codes(codes.numpy(), 3, qt.codes.numel()), qt.codes.reshape(-1).numpy()
    )


def test_torch_state_dict_default_selection(tmp_path) -> None:
    model = _mixed()
    sd = model.state_dict()
    path = tmp_path / "sd.safetensors"
    report = squant_rs.save_quantized(sd, path)
    # every floating tensor of 2+ dims whose key ends in "weight": the embedding too,
    # and the ConvTranspose weight (no module information in a state dict)
    assert [r.name for r in report.layers] == [
        "c1.weight",
        "c2.weight",
        "grouped.weight",
        "dw.weight",
        "c3.weight",
        "up.weight",
        "fc.weight",
        "emb.weight",
    ]
    loaded = squant_rs.load_quantized(path)
    assert list(loaded) == list(sd)
    for key, value in sd.items():
        if key in {r.name for r in report.layers}:
            want = squant_rs.quantize_tensor(value, 4).dequantize()
        else:
            want = value
        assert torch.equal(loaded[key], want), key


def test_state_dict_include_and_skip(tmp_path) -> None:
    sd = _mixed().state_dict()
    path = tmp_path / "sd.safetensors"
    r = squant_rs.save_quantized(sd, path, include=("c*.weight", "fc.*"), skip=("c2",))
    assert [x.name for x in r.layers] == ["c1.weight", "c3.weight", "fc.weight"]
    r = squant_rs.save_quantized(sd, path, include=lambda k: k.startswith("dw"))
    assert [x.name for x in r.layers] == ["dw.weight"]
    r = squant_rs.save_quantized(sd, path, skip="*")
    assert r.layers == []
    assert squant_rs.load_quantized(path).keys() == sd.keys()


def test_numpy_state_dict(tmp_path) -> None:
    rng = np.random.default_rng(0)
    sd = {
        "a.weight": rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
        "a.bias": rng.standard_normal(5).astype(np.float32),
        "h.weight": rng.standard_normal((4, 9)).astype(np.float16),
        "steps": np.array(3, dtype=np.int64),
    }
    path = tmp_path / "np.safetensors"
    squant_rs.save_quantized(sd, path, wbits=5)
    loaded = squant_rs.load_quantized(path)
    for key in ("a.weight", "h.weight"):
        want = squant_rs.quantize_tensor(sd[key], 5).dequantize()
        assert loaded[key].dtype == torch.from_numpy(want).dtype
        np.testing.assert_array_equal(loaded[key].numpy(), want)
    np.testing.assert_array_equal(loaded["a.bias"].numpy(), sd["a.bias"])
    assert loaded["steps"].shape == () and int(loaded["steps"]) == 3


def test_resnet18_size_ratio(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    model = torchvision.models.resnet18(weights=None)
    fp = tmp_path / "float.safetensors"
    qp = tmp_path / "q4.safetensors"
    save_file(model.state_dict(), str(fp))
    report = squant_rs.save_quantized(model, qp, wbits=4)
    ratio = os.path.getsize(qp) / os.path.getsize(fp)
    assert ratio <= 0.16, ratio
    assert len(report.layers) == 21
    loaded = squant_rs.load_quantized(qp)
    expected = squant_rs.quantize_model(model, wbits=4, recipe="paper").state_dict()
    _assert_state_dicts_equal(loaded, expected)


# --------------------------------------------------------------------------
# atomic writes and argument errors


def _listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_error_leaves_no_partial_file(tmp_path) -> None:
    model = _mixed()
    with torch.no_grad():
        model.dw.weight[3, 0, 1, 1] = float("nan")
    path = tmp_path / "out.safetensors"
    with pytest.raises(squant_rs.NonFiniteWeightError, match="dw.weight"):
        squant_rs.save_quantized(model, path)
    assert _listing(tmp_path) == []
    path.write_bytes(b"previous")
    with pytest.raises(squant_rs.NonFiniteWeightError):
        squant_rs.save_quantized(model, path)
    assert path.read_bytes() == b"previous"
    assert _listing(tmp_path) == ["out.safetensors"]


FILE_TOO_LARGE = """
import os, resource, signal, sys
import torch, squant_rs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
out = os.path.join(sys.argv[1], "out.safetensors")
try:
    squant_rs.save_quantized({"w.weight": torch.randn(256, 256)}, out)
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.filename)
"""


def test_failure_during_write_removes_temp_file(tmp_path) -> None:
    # The Rust writer fails half-way (the file-size limit stands in for a
    # full disk): OSError naming the target, and no temporary file left.
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", FILE_TOO_LARGE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["OSError", "27", str(tmp_path / "out.safetensors")]
    assert _listing(tmp_path) == []


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        squant_rs.save_quantized(_mixed(), tmp_path / "nope" / "out.safetensors")


def test_save_argument_errors(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(squant_rs.InvalidArgumentError, match="wbits"):
        squant_rs.save_quantized(_mixed(), path, wbits=9)
    with pytest.raises(squant_rs.InvalidArgumentError, match="mode"):
        squant_rs.save_quantized(_mixed(), path, mode="nearest")
    with pytest.raises(squant_rs.InvalidArgumentError, match="include"):
        squant_rs.save_quantized(_mixed(), path, include=("*",))
    with pytest.raises(TypeError, match="state dict"):
        squant_rs.save_quantized([1, 2], path)  # type: ignore[arg-type]
    w = torch.randn(3, 4)
    with pytest.raises(squant_rs.InvalidArgumentError, match="already has a tensor"):
        squant_rs.save_quantized({"a.weight": w, "a.weight:scale": w[0]}, path)
    with pytest.raises(squant_rs.InvalidArgumentError, match="not a tensor"):
        squant_rs.save_quantized({"a.weight": w, "note": "hello"}, path)
    assert _listing(tmp_path) == []


# --------------------------------------------------------------------------
# bad files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    squant_rs.save_quantized(_mixed(), path, wbits=3)
    return path.read_bytes()


def _rewrite(tmp_path, good: bytes, edit) -> str:
    """A copy of the good file with its tensors/metadata edited."""
    src = tmp_path / "src.safetensors"
    src.write_bytes(good)
    tensors, meta = read_safetensors(src)
    tensors, meta = edit(dict(tensors), dict(meta))
    out = tmp_path / "bad.safetensors"
    write_safetensors(out, tensors, meta)
    return str(out)


def _header_len(good: bytes) -> int:
    return int.from_bytes(good[:8], "little")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("empty", "too short"),
        ("text", "not a safetensors file"),
        ("cut_header", "truncated"),
        ("cut_data", "truncated"),
        ("one_byte_short", "truncated"),
        ("trailing", "unexpected bytes"),
        ("bad_json", "not valid JSON"),
        ("bad_offsets", "corrupt header"),
        ("bad_dtype", "unsupported dtype"),
    ],
)
def test_damaged_container(tmp_path, good_file: bytes, case: str, match: str) -> None:
    n = _header_len(good_file)
    data = {
        "empty": b"",
        "text": b"this is a text file, not a model\n" * 3,
        "cut_header": good_file[: 8 + n // 2],
        "cut_data": good_file[: 8 + n + 100],
        "one_byte_short": good_file[:-1],
        "trailing": good_file + b"\0\0",
        "bad_json": good_file[:8] + b"[" + good_file[9:],
        "bad_offsets": good_file.replace(b'"data_offsets":[0,', b'"data_offsets":[1,', 1),
        "bad_dtype": good_file.replace(b'"dtype":"F32"', b'"dtype":"X32"', 1),
    }[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match) as info:
        squant_rs.load_quantized(path)
    assert isinstance(info.value, SquantError) and isinstance(info.value, ValueError)
    with pytest.raises(FormatError):
        inspect_quantized(path)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("plain", "not a squant-rs file"),
        ("version", "unsupported squant-rs format version '2'"),
        ("no_version", "unsupported squant-rs format version None"),
        ("meta_json", "not valid JSON"),
        ("meta_bits", "corrupt squant-rs metadata"),
        ("missing_codes", "missing its codes"),
        ("short_codes", "wrong size"),
        ("bad_code_value", "corrupt codes"),
        ("nan_scale", "corrupt scale"),
    ],
)
def test_invalid_squant_file(tmp_path, good_file: bytes, case: str, match: str) -> None:
    def edit(t: dict, m: dict) -> tuple[dict, dict]:
        if case == "plain":
            m = {}
        elif case == "version":
            m["format_version"] = "2"
        elif case == "no_version":
            del m["format_version"]
        elif case == "meta_json":
            m["quantized"] = "{oops"
        elif case == "meta_bits":
            q = json.loads(m["quantized"])
            q["c2.weight"]["bits"] = 12
            m["quantized"] = json.dumps(q)
        elif case == "missing_codes":
            del t["c2.weight:codes"]
        elif case == "short_codes":
            c = t["c2.weight:codes"]
            t["c2.weight:codes"] = RawTensor("U8", (c.shape[0] - 1,), c.data[:-1])
        elif case == "bad_code_value":
            c = t["c2.weight:codes"]
            t["c2.weight:codes"] = RawTensor("U8", c.shape, np.full_like(c.data, 0xFF))
        elif case == "nan_scale":
            s = t["c2.weight:scale"].to_numpy()
            s[0] = np.nan
            t["c2.weight:scale"] = RawTensor.from_numpy(s)
        return t, m

    path = _rewrite(tmp_path, good_file, edit)
    with pytest.raises(FormatError, match=match):
        squant_rs.load_quantized(path)


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        squant_rs.load_quantized(tmp_path / "missing.safetensors")


def test_load_threads(tmp_path, monkeypatch) -> None:
    """load_quantized takes threads= like every other function (it raised
    TypeError): the same tensors for any count; bad values raise, a bad
    SQUANT_NUM_THREADS is read only without threads=."""
    rng = np.random.default_rng(0)
    sd = {f"l{i}.weight": rng.standard_normal((16, 24)).astype(np.float32) for i in range(6)}
    sd["l0.bias"] = rng.standard_normal(16).astype(np.float32)
    path = tmp_path / "q.safetensors"
    squant_rs.save_quantized(sd, path, 4)
    ref = squant_rs.load_quantized(path)
    for threads in (1, 2, 7):
        got = squant_rs.load_quantized(path, threads=threads)
        assert list(got) == list(ref)
        for key, value in ref.items():
            assert torch.equal(got[key], value), (threads, key)
    for bad, exc in (
        (0, squant_rs.InvalidArgumentError),
        (-1, squant_rs.InvalidArgumentError),
        (True, TypeError),
        ("2", TypeError),
        (1.5, TypeError),
    ):
        with pytest.raises(exc, match="threads"):
            squant_rs.load_quantized(path, threads=bad)
    monkeypatch.setenv("SQUANT_NUM_THREADS", "zero")
    with pytest.raises(squant_rs.InvalidArgumentError, match="SQUANT_NUM_THREADS"):
        squant_rs.load_quantized(path)
    assert torch.equal(squant_rs.load_quantized(path, threads=2)["l3.weight"], ref["l3.weight"])


@pytest.mark.parametrize("name", ["y.pth", "y.bin", "noext", "y.safetensors.tmp", ".safetensors"])
def test_output_extension_rule_of_the_functions(tmp_path, name: str) -> None:
    """save_quantized and quantize_checkpoint (single file) refuse an output
    whose extension is not .safetensors, as the README and the CLI say (they
    wrote it): InvalidArgumentError naming the path, nothing written."""
    sd = {"a.weight": np.ones((4, 4), np.float32)}
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {"a.weight": RawTensor.from_numpy(sd["a.weight"])})
    out = tmp_path / name
    rule = "output format is chosen by the file extension"
    with pytest.raises(squant_rs.InvalidArgumentError, match=rule) as err:
        squant_rs.save_quantized(sd, out)
    assert str(out) in str(err.value)
    with pytest.raises(squant_rs.InvalidArgumentError, match=rule):
        quantize_checkpoint(src, out)
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    # Any case of the extension is fine, as in the CLI.
    squant_rs.save_quantized(sd, tmp_path / "ok.SafeTensors")
    quantize_checkpoint(src, tmp_path / "ok2.safetensors")
    assert inspect_quantized(tmp_path / "ok.SafeTensors").tensors[0].bits == 4


def test_raw_tensor_bfloat16_and_scalars() -> None:
    t = torch.randn(3, 5).to(torch.bfloat16)
    raw = RawTensor.from_torch(t)
    assert raw.dtype == "BF16" and raw.nbytes == 30
    np.testing.assert_array_equal(raw.to_float32(), t.float().numpy())
    assert torch.equal(raw.to_torch(), t)
    s = RawTensor.from_torch(torch.tensor(5))
    assert s.shape == () and int(s.to_torch()) == 5


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight  # tied parameter
        self.shared = nn.Linear(6, 6)
        self.seq = nn.Sequential(self.shared, nn.ReLU(), self.shared)  # shared module


def test_tied_and_shared_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tied()
    qmodel, report = squant_rs.quantize_model(model, return_report=True)
    # One module under three names: quantized once, reported under every name.
    assert [r.name for r in report.layers] == ["shared", "seq.0", "seq.2"]
    assert [r.tied_to for r in report.layers] == [None, "shared", "shared"]
    assert report.params == 36 and len(str(report).splitlines()) == 2 + 3 + 3
    # A Linear tied to an Embedding stays float (both), with a note.
    assert report.skipped == ["head"]
    assert report.notes == [
        "head: shares its weight with emb.weight (Embedding), which SQuant does not "
        "quantize; left float"
    ]
    sd = qmodel.state_dict()
    assert torch.equal(sd["head.weight"], model.emb.weight)
    assert torch.equal(sd["emb.weight"], model.emb.weight)
    want = squant_rs.quantize_tensor(model.shared.weight.detach(), 4).dequantize()
    for key in ("shared.weight", "seq.0.weight", "seq.2.weight"):
        assert torch.equal(sd[key], want)
    path = tmp_path / "tied.safetensors"
    squant_rs.save_quantized(model, path)
    _assert_state_dicts_equal(squant_rs.load_quantized(path), sd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_round_trip(tmp_path) -> None:
    model = _mixed().cuda()
    qmodel = squant_rs.quantize_model(model)  # backend "auto": torch on the GPU
    assert qmodel.c2.weight.is_cuda
    path = tmp_path / "m.safetensors"
    squant_rs.save_quantized(model, path)
    loaded = squant_rs.load_quantized(path, device="cuda")
    _assert_state_dicts_equal(loaded, qmodel.state_dict())
    cpu = squant_rs.quantize_model(model.cpu(), backend="rust").state_dict()
    _assert_state_dicts_equal({k: v.cpu() for k, v in loaded.items()}, cpu)
