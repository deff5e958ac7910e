"""Checkpoint I/O through the Rust crate squant-io: round trips of every
state dict save_quantized accepts, checksums, strict metadata, non-finite
dequantization, sharded checkpoints, info --verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import squant_rs
from squant_rs import FormatError
from squant_rs.cli import main
from squant_rs.formats.safetensors import (
    RawTensor,
    inspect_quantized,
    quantize_checkpoint,
    read_safetensors,
    verify_quantized,
    write_safetensors,
)

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _data_start(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def _expected(sd: dict[str, object], quantized: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        out[k] = squant_rs.quantize_tensor(t, 4).dequantize() if k in quantized else t
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------
# every state dict save_quantized accepts round-trips (issue 9 item 5)

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]
_DTYPES += [torch.bool, torch.int8, torch.int32]


@st.composite
def _state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__"),
            min_size=0,
            max_size=5,
            unique=True,
        )
    )
    sd = {}
    for i, name in enumerate(names):
        key = name + (".weight" if draw(st.booleans()) else "")
        if key in sd or key == "__metadata__":
            continue
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(_DTYPES))
        gen = torch.Generator().manual_seed(i)
        t = (torch.randn(shape, generator=gen) * 3).to(dtype)
        sd[key] = t
    return sd


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=_state_dicts())
def test_every_accepted_state_dict_round_trips(tmp_path_factory, sd) -> None:
    path = tmp_path_factory.mktemp("prop") / "p.safetensors"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no tensor to quantize"
            report = squant_rs.save_quantized(sd, path)
    except squant_rs.InvalidArgumentError as exc:
        # Only names that cannot be stored are refused.
        assert "reserve" in str(exc) or "UTF-8" in str(exc), exc
        assert not path.exists()
        return
    quantized = {r.name for r in report.layers}
    _assert_equal(squant_rs.load_quantized(path), _expected(sd, quantized))
    verify_quantized(path)


def test_zero_element_tensors_round_trip(tmp_path) -> None:
    sd = {
        "fc.weight": torch.randn(4, 8),
        "empty": torch.zeros(0),
        "e.weight": torch.zeros(0, 5),
        "s": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    path = tmp_path / "e.safetensors"
    report = squant_rs.save_quantized(sd, path)
    assert [r.name for r in report.layers] == ["fc.weight"]
    _assert_equal(squant_rs.load_quantized(path), _expected(sd, {"fc.weight"}))


def test_names_that_cannot_be_stored(tmp_path) -> None:
    path = tmp_path / "n.safetensors"
    w = torch.randn(3, 4)
    with pytest.raises(squant_rs.InvalidArgumentError, match="UTF-8"):
        squant_rs.save_quantized({"a.weight": w, "bad\ud800": torch.zeros(2)}, path)
    with pytest.raises(squant_rs.InvalidArgumentError, match="reserve"):
        squant_rs.save_quantized({"a.weight": w, "x:codes": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# checksums (issue 9 item 7)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    sd = {
        "a.weight": torch.randn(6, 5, 3, 3),
        "a.bias": torch.randn(6),
        "b.weight": torch.randn(7, 9).half(),
        "steps": torch.tensor(3),
    }
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    squant_rs.save_quantized(sd, path, wbits=3)
    return path.read_bytes()


def test_checksums_are_stored(tmp_path, good: bytes) -> None:
    path = tmp_path / "g.safetensors"
    path.write_bytes(good)
    tensors, meta = read_safetensors(path)
    table = json.loads(meta["checksums"])
    assert set(table) == set(tensors)
    assert all(len(v) == 8 for v in table.values())
    assert inspect_quantized(path).has_checksums


def test_data_byte_flips_are_detected(tmp_path, good: bytes) -> None:
    start = _data_start(good)
    rng = np.random.default_rng(0)
    positions = rng.choice(np.arange(start, len(good)), size=120, replace=False)
    path = tmp_path / "flip.safetensors"
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(bad))
        with pytest.raises(FormatError):
            squant_rs.load_quantized(path)
        with pytest.raises(FormatError):
            verify_quantized(path)
    # and verify=False trusts the data (codes/scales still checked)
    path.write_bytes(good)
    squant_rs.load_quantized(path, verify=False)


def test_files_without_checksums_still_load(tmp_path, good: bytes) -> None:
    src = tmp_path / "g.safetensors"
    src.write_bytes(good)
    want = squant_rs.load_quantized(src)
    tensors, meta = read_safetensors(src)
    del meta["checksums"]  # as written before checksums existed
    old = tmp_path / "old.safetensors"
    write_safetensors(old, tensors, meta)
    _assert_equal(squant_rs.load_quantized(old), want)
    assert not inspect_quantized(old).has_checksums
    verify_quantized(old)


# --------------------------------------------------------------------------
# strict metadata (issue 9 item 8) and non-finite dequantization (item 4)


def _edited(tmp_path, good: bytes, edit) -> str:
    src = tmp_path / "src.safetensors"
    src.write_bytes(good)
    tensors, meta = read_safetensors(src)
    tensors, meta = edit(dict(tensors), dict(meta))
    out = tmp_path / "bad.safetensors"
    write_safetensors(out, tensors, meta)
    return str(out)


def _q(meta: dict, **change: object) -> dict:
    q = json.loads(meta["quantized"])
    q["a.weight"].update(change)
    meta["quantized"] = json.dumps(q)
    return meta


def _rename_plain(t: dict, m: dict, new: str) -> tuple[dict, dict]:
    t[new] = t.pop("a.bias")
    cs = json.loads(m["checksums"])
    cs[new] = cs.pop("a.bias")
    m["checksums"] = json.dumps(cs)
    return t, m


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown_mode", "unknown mode 'nearest'"),
        ("codes_per_byte", "codes_per_byte 4 does not match 3 bits"),
        ("no_table", "no 'quantized' table"),
        ("dup_in_table", "duplicate key"),
        ("shadow", "stored both quantized and unchanged"),
        ("orphan_part", "named like a part of a quantized weight"),
        ("quantizer", "unknown quantizer 'fancy'"),
        ("checksum_table", "checksum table"),
        ("tiny_scale", "not finite in F32"),
        ("f16_range", "not finite in BF16"),
    ],
)
def test_strict_metadata(tmp_path, good: bytes, case: str, match: str) -> None:
    def edit(t: dict, m: dict) -> tuple[dict, dict]:
        if case == "unknown_mode":
            m = _q(m, mode="nearest")
        elif case == "codes_per_byte":
            m = _q(m, codes_per_byte=4)
        elif case == "no_table":
            del m["quantized"]
        elif case == "dup_in_table":
            m["quantized"] = m["quantized"][:-1] + ',"a.weight":{}}'
        elif case == "shadow":
            t, m = _rename_plain(t, m, "a.weight")
        elif case == "orphan_part":
            t, m = _rename_plain(t, m, "z.weight:scale")
        elif case == "quantizer":
            m["quantizer"] = "fancy"
        elif case == "checksum_table":
            cs = json.loads(m["checksums"])
            del cs["a.bias"]
            m["checksums"] = json.dumps(cs)
        elif case == "tiny_scale":
            s = t["a.weight:scale"].to_numpy()
            s[2] = 1e-45  # (q + z) / s overflows float32 (issue 9 item 4)
            t["a.weight:scale"] = RawTensor.from_numpy(s)
            del m["checksums"]
        elif case == "f16_range":
            m = _q(m, dtype="BF16")
            s = t["a.weight:scale"].to_numpy()
            s[1] = 1e-38
            t["a.weight:scale"] = RawTensor.from_numpy(s)
            del m["checksums"]
        return t, m

    path = _edited(tmp_path, good, edit)
    with pytest.raises(FormatError, match=match):
        squant_rs.load_quantized(path)
    if case not in ("tiny_scale", "f16_range"):
        with pytest.raises(FormatError, match=match):
            inspect_quantized(path)


def test_duplicate_keys_in_the_header(tmp_path, good: bytes) -> None:
    n = _data_start(good) - 8
    header = good[8 : 8 + n].decode().rstrip()
    assert header.endswith("}")
    first = header[1 : header.index(',"a.weight:codes"')]
    dup = ("{" + first + "," + header[1:]).encode()
    dup += b" " * (-len(dup) % 8)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(dup).to_bytes(8, "little") + dup + good[8 + n :])
    with pytest.raises(FormatError, match="duplicate key"):
        squant_rs.load_quantized(path)


def test_symmetric_quantizer_files(tmp_path) -> None:
    from squant_rs._squant_rs import QuantizedFileWriter

    def write(path, zp: float) -> None:
        w = QuantizedFileWriter(
            str(path), [("w", "F32", [2, 3], 4, "squant-e")], quantizer="symmetric"
        )
        w.write_quantized(
            0,
            np.array([[-7, 0, 7], [1, 2, 3]], np.int8),
            np.array([7.0, 1.0], np.float32),
            np.array([zp, 0.0], np.float32),
        )
        w.finish()

    path = tmp_path / "sym.safetensors"
    write(path, 0.0)
    assert inspect_quantized(path).quantizer == "symmetric"
    got = squant_rs.load_quantized(path)["w"]
    assert torch.equal(got, torch.tensor([[-1.0, 0.0, 1.0], [1.0, 2.0, 3.0]]))
    # The writer refuses a zero point the reader would reject ...
    with pytest.raises(squant_rs.InvalidArgumentError, match="zero point"):
        write(tmp_path / "bad.safetensors", 1.0)
    assert not (tmp_path / "bad.safetensors").exists()
    # ... and the reader rejects it in a file made otherwise.
    tensors, meta = read_safetensors(path)
    zp = np.frombuffer(tensors["w:zero_point"].data, np.float32).copy()
    zp[0] = 1.0
    tensors["w:zero_point"] = RawTensor.from_numpy(zp)
    del meta["checksums"]
    write_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(FormatError, match="corrupt scale or zero point"):
        squant_rs.load_quantized(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------
# the writers refuse what the reader rejects (rust-bugs items 2, 3, 5, 6, 8)


@pytest.mark.parametrize("suffix", [":codes", ":scale", ":zero_point"])
def test_quantized_weight_named_like_a_part_of_another(tmp_path, suffix: str) -> None:
    """`a` and `a:codes` both quantized: `a:codes` would be stored as a
    weight and as the codes of `a`; the file was written and then rejected
    by load_quantized ("stored both quantized and unchanged")."""
    path = tmp_path / "c.safetensors"
    w = torch.randn(4, 8)
    for sd in ({"a": w, "a" + suffix: w}, {"a" + suffix: w, "a": w}):
        with pytest.raises(
            squant_rs.InvalidArgumentError,
            match=f"cannot quantize 'a': the state dict already has a tensor named 'a{suffix}'",
        ):
            squant_rs.save_quantized(sd, path, 4, include="*")
        assert os.listdir(tmp_path) == []
    # Only the suffixed one quantized: its parts clash with nothing.
    squant_rs.save_quantized({"a": w, "a" + suffix: w}, path, 4, include="a:*")
    got = squant_rs.load_quantized(path)
    assert torch.equal(got["a"], w)
    assert [t.name for t in inspect_quantized(path).quantized] == ["a" + suffix]


def _with_tensor(tmp_path, good: bytes, entry: dict) -> Path:
    """`good` with one more (empty) tensor `z`, its checksum listed."""
    n = int.from_bytes(good[:8], "little")
    header, data = json.loads(good[8 : 8 + n]), good[8 + n :]
    header["z"] = {**entry, "data_offsets": [len(data), len(data)]}
    table = json.loads(header["__metadata__"]["checksums"])
    table["z"] = "00000000"
    header["__metadata__"]["checksums"] = json.dumps(table)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "z.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize(
    "dtype, shape",
    [
        ("F32", [0, 2**63]),
        ("F32", [0, 2**64 - 1]),
        ("F32", [0, 2**61]),
        ("U8", [0, 2**33, 2**33]),
        ("F64", [2**31, 2**31, 0]),
    ],
)
def test_empty_tensor_with_a_huge_shape_is_corrupt(
    tmp_path, good: bytes, dtype: str, shape: list[int]
) -> None:
    """A tensor of no element whose shape no numpy or torch tensor can have
    passed every check and crashed load_quantized in torch (TypeError,
    RuntimeError "Stride calculation overflowed")."""
    path = _with_tensor(tmp_path, good, {"dtype": dtype, "shape": shape})
    match = "tensor 'z' has a shape too large to load"
    readers = [
        inspect_quantized,
        verify_quantized,
        squant_rs.load_quantized,
        read_safetensors,
        lambda p: quantize_checkpoint(p, tmp_path / "out.safetensors"),
    ]
    for read in readers:
        with pytest.raises(FormatError, match=match):
            read(path)
    assert sorted(os.listdir(tmp_path)) == ["z.safetensors"]


@pytest.mark.parametrize("dtype, shape", [("F32", [0, 2**60]), ("U8", [2**31, 2**31, 0])])
def test_empty_tensor_with_a_large_shape_loads(
    tmp_path, good: bytes, dtype: str, shape: list[int]
) -> None:
    """The limit is numpy's: the largest such shapes still load."""
    path = _with_tensor(tmp_path, good, {"dtype": dtype, "shape": shape})
    verify_quantized(path)
    z = squant_rs.load_quantized(path)["z"]
    assert list(z.shape) == shape and z.numel() == 0


def _writer_case(path, case: str) -> None:
    from squant_rs._squant_rs import QuantizedFileWriter

    f32 = np.float32
    codes, scale, zp = np.zeros(15, np.int8), np.ones(3, f32), np.zeros(3, f32)
    shape, quantizer, dtype = [3, 5], "asymmetric", "F32"
    if case == "huge shape":
        shape = [1, 2**32, 2**32]
    elif case == "symmetric -8":
        quantizer, codes = "symmetric", np.full(15, -8, np.int8)
    elif case == "16 codes":
        codes = np.arange(16, dtype=np.int8) - 8
    elif case == "14 codes":
        codes = np.zeros(14, np.int8)
    elif case == "code 8":
        codes = np.full(15, 8, np.int8)
    elif case.startswith("scale "):
        scale[1] = float(case.split()[1])
    elif case.startswith("zero point "):
        zp[2] = float(case.split()[2])
    elif case == "symmetric zero point":
        quantizer, zp[0] = "symmetric", 0.5
    elif case == "2 scales":
        scale = scale[:2]
    elif case == "not finite":
        codes, scale[1] = np.full(15, 7, np.int8), 1e-45
    elif case == "not finite bf16":
        dtype, codes, scale[1] = "BF16", np.full(15, 7, np.int8), 1e-45
    w = QuantizedFileWriter(str(path), [("w", dtype, shape, 4, "squant")], quantizer)
    w.write_quantized(0, codes, scale, zp)
    w.finish()


@pytest.mark.parametrize(
    "case, match",
    [
        ("huge shape", "cannot quantize 'w': shape is too large"),
        ("symmetric -8", r"codes out of range for 4 bits \(symmetric quantizer\)"),
        ("16 codes", "16 codes given for its 15 elements"),
        ("14 codes", "14 codes given for its 15 elements"),
        ("code 8", "codes out of range for 4 bits"),
        ("scale -1", "invalid scale or zero point for 'w' \\(output channel 1"),
        ("scale 0", "invalid scale or zero point"),
        ("scale nan", "invalid scale or zero point"),
        ("scale inf", "invalid scale or zero point"),
        ("zero point nan", "invalid scale or zero point for 'w' \\(output channel 2"),
        ("zero point -inf", "invalid scale or zero point"),
        ("symmetric zero point", "0 with the symmetric quantizer"),
        ("2 scales", "2 scales and 3 zero points given, expected 3 of each"),
        ("not finite", "output channel 1 dequantizes to values that are not finite in F32"),
        ("not finite bf16", "not finite in BF16"),
    ],
)
def test_quantized_file_writer_refuses_what_load_rejects(tmp_path, case: str, match: str) -> None:
    """The native writer wrote files load_quantized rejects (a shape whose
    element count wrapped around, symmetric code -8, bad scales or zero
    points, values that dequantize to infinity) and took 16 codes for 15
    elements; each is refused and nothing is left behind."""
    with pytest.raises(squant_rs.InvalidArgumentError, match=match):
        _writer_case(tmp_path / "w.safetensors", case)
    assert os.listdir(tmp_path) == []


def test_quantized_file_writer_accepts_valid_tensors(tmp_path) -> None:
    path = tmp_path / "ok.safetensors"
    _writer_case(path, "valid")
    assert squant_rs.load_quantized(path)["w"].shape == (3, 5)


@pytest.mark.parametrize("elems", [2**61, 2**60])
def test_safetensors_writer_refuses_data_past_the_file_size_limit(tmp_path, elems: int) -> None:
    """Four float32 tensors of 2^60 or 2^61 elements: the data offsets
    overflowed (OSError EINVAL from the write); now a clear error before
    any file exists."""
    from squant_rs._squant_rs import io_write_safetensors

    path = tmp_path / "big.safetensors"
    tensors = [(k, "F32", [elems]) for k in "abcd"]
    with pytest.raises(squant_rs.InvalidArgumentError, match="tensor 'a' is too large"):
        io_write_safetensors(str(path), tensors, [], lambda i: np.zeros(8, np.uint8))
    raw = {k: RawTensor("F32", (elems,), np.zeros(8, np.uint8)) for k in "abcd"}
    with pytest.raises(squant_rs.InvalidArgumentError, match="is too large"):
        write_safetensors(path, raw)
    empty = {"z": RawTensor("F32", (0, 2**63), np.zeros(0, np.uint8))}
    with pytest.raises(squant_rs.InvalidArgumentError, match="tensor 'z' is too large"):
        write_safetensors(path, empty)
    assert os.listdir(tmp_path) == []


def test_native_quantize_file_refuses_to_replace_its_input(tmp_path) -> None:
    """io_quantize_file(S, S) replaced the input with its output (the public
    functions and the CLIs check first; the native function did not)."""
    from squant_rs._squant_rs import io_quantize_file

    src = tmp_path / "in.safetensors"
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    write_safetensors(src, {"fc.weight": RawTensor.from_numpy(w)})
    blob = src.read_bytes()
    (tmp_path / "link.safetensors").symlink_to("in.safetensors")
    os.link(src, tmp_path / "hard.safetensors")
    for dst in ("in.safetensors", "link.safetensors", "hard.safetensors"):
        with pytest.raises(
            squant_rs.InvalidArgumentError,
            match="is the same file as the input .*: refusing to overwrite the input",
        ):
            io_quantize_file(str(src), str(tmp_path / dst), 4, "squant", ["*"], [])
        assert src.read_bytes() == blob
    assert sorted(os.listdir(tmp_path)) == [
        "hard.safetensors",
        "in.safetensors",
        "link.safetensors",
    ]
    io_quantize_file(str(src), str(tmp_path / "q.safetensors"), 4, "squant", ["*"], [])
    assert squant_rs.load_quantized(tmp_path / "q.safetensors")["fc.weight"].shape == (4, 8)


# --------------------------------------------------------------------------
# sharded checkpoints (issue 12 item 2) and info --verify


def _sharded(tmp_path, sd: dict[str, torch.Tensor], per_shard: int) -> str:
    d = tmp_path / "ckpt"
    d.mkdir()
    keys = list(sd)
    groups = [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for j, group in enumerate(groups):
        name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors_torch.save_file({k: sd[k].contiguous() for k in group}, str(d / name))
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d)


def _llama_like(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {"embed.weight": torch.randn(40, 16).to(torch.bfloat16)}
    for i in range(3):
        sd[f"layers.{i}.q.weight"] = torch.randn(16, 16).to(torch.bfloat16)
        sd[f"layers.{i}.up.weight"] = torch.randn(24, 16).to(torch.bfloat16)
        sd[f"layers.{i}.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    return sd


def test_sharded_in_sharded_out_equals_unsharded(tmp_path, capsys) -> None:
    sd = _llama_like()
    src = _sharded(tmp_path, sd, per_shard=4)
    out = tmp_path / "q"
    assert main(["quantize", src, str(out), "--wbits", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "sharded safetensors, 3 shards" in stdout
    files = sorted(os.listdir(out))
    assert files == sorted(os.listdir(src))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["layers.0.q.weight:codes"] == "model-00001-of-00003.safetensors"
    single_in = tmp_path / "single.safetensors"
    safetensors_torch.save_file(sd, str(single_in))
    single_out = tmp_path / "single_q.safetensors"
    result = quantize_checkpoint(single_in, single_out, 3)
    assert len(result.report.layers) == 7
    _assert_equal(
        dict(sorted(squant_rs.load_quantized(out).items())),
        dict(sorted(squant_rs.load_quantized(single_out).items())),
    )
    assert main(["info", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_corrupt_shard_is_named_and_leaves_no_output(tmp_path, capsys) -> None:
    src = _sharded(tmp_path, _llama_like(), per_shard=4)
    shard = Path(src) / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    out = tmp_path / "q"
    assert main(["quantize", src, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model-00002-of-00003.safetensors" in err
    assert "truncated" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_info_verify_says_when_there_are_no_checksums(tmp_path, capsys, good: bytes) -> None:
    """On a file without checksums (files written before them) info
    --verify claimed "every checksum, code, scale and zero point"."""
    src = tmp_path / "g.safetensors"
    src.write_bytes(good)
    assert main(["info", str(src), "--verify"]) == 0
    assert "verified              every checksum, code, scale and zero point\n" in (
        capsys.readouterr().out
    )
    tensors, meta = read_safetensors(src)
    del meta["checksums"]
    old = tmp_path / "old.safetensors"
    write_safetensors(old, tensors, meta)
    assert main(["info", str(old), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksum," not in out
    assert (
        "verified              every code, scale and zero point (no checksums in this file)\n"
    ) in out


def test_info_verify_reports_damage(tmp_path, capsys, good: bytes) -> None:
    path = tmp_path / "g.safetensors"
    bad = bytearray(good)
    bad[-5] ^= 0x40
    path.write_bytes(bytes(bad))
    assert main(["info", str(path)]) == 0  # the header alone looks fine
    capsys.readouterr()
    assert main(["info", str(path), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err or "corrupt" in err


def test_one_tensor_in_two_shards_is_refused(tmp_path, capsys) -> None:
    """A sharded squant-rs directory holding the same weight twice (plain in
    one shard, quantized in another: the index's keys differ) is refused by
    inspect, verify, load and info, naming the tensor and both shards
    (info listed it twice, load kept one)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"l0.weight": RawTensor.from_numpy(w)})
    both = {"l0.weight": np.zeros((6, 10), np.float32), "l1.weight": w}
    write_safetensors(
        tmp_path / "b.safetensors", {k: RawTensor.from_numpy(v) for k, v in both.items()}
    )
    q = tmp_path / "q"
    q.mkdir()
    quantize_checkpoint(tmp_path / "a.safetensors", q / "s1.safetensors")
    quantize_checkpoint(tmp_path / "b.safetensors", q / "s2.safetensors", include=["l1*"])
    parts = (":codes", ":scale", ":zero_point")
    weight_map = {f"l0.weight{p}": "s1.safetensors" for p in parts}
    weight_map |= {f"l1.weight{p}": "s2.safetensors" for p in parts}
    weight_map["l0.weight"] = "s2.safetensors"
    index = {"metadata": {"format": "squant-rs"}, "weight_map": weight_map}
    (q / "model.safetensors.index.json").write_text(json.dumps(index))
    match = "tensor 'l0.weight' is stored in two shards, 's1.safetensors' and 's2.safetensors'"
    for read in (inspect_quantized, verify_quantized, squant_rs.load_quantized):
        with pytest.raises(FormatError, match=match):
            read(q)
    assert main(["info", "--verify", str(q)]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_input_is_refused_by_the_api(tmp_path) -> None:
    """A FIFO given as a file to read is refused at once (every reader
    blocked on it forever); so is a character device."""
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    readers = [
        inspect_quantized,
        verify_quantized,
        squant_rs.load_quantized,
        read_safetensors,
        lambda p: quantize_checkpoint(p, out),
    ]
    for path, kind in ((fifo, "a FIFO"), (Path(os.devnull), "a character device")):
        for read in readers:
            with pytest.raises(squant_rs.InvalidArgumentError, match=f"is {kind}, not a regular"):
                read(path)
    sharded = tmp_path / "ck"
    sharded.mkdir()
    os.mkfifo(sharded / "model.safetensors.index.json")
    with pytest.raises(squant_rs.InvalidArgumentError, match="is a FIFO, not a regular"):
        quantize_checkpoint(sharded / "model.safetensors.index.json", tmp_path / "outdir")
    assert sorted(os.listdir(tmp_path)) == ["ck", "in.safetensors"]


_ONNX_READ = """
import sys
import numpy as np
import onnx
import squant_rs
from onnx import TensorProto, helper, numpy_helper

if sys.argv[1] == "make":  # a MatMul model with its weight in an external data file
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, sys.argv[2], save_as_external_data=True, location="w.data", size_threshold=0)
else:
    try:
        squant_rs.quantize_onnx(sys.argv[2], sys.argv[3])
    except squant_rs.InvalidArgumentError as exc:
        print(exc)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_or_device_onnx_input_is_refused(tmp_path) -> None:
    """README: a FIFO or a device is refused before it is read, not waited
    on. An ONNX input (or its external data file) that is a FIFO blocked
    quantize_onnx and `squant-rs quantize` forever, and a link to a device
    was read as a model (/dev/zero without end). In subprocesses, as a hang
    would block the test run."""
    pytest.importorskip("onnx")
    script = tmp_path / "read_onnx.py"
    script.write_text(_ONNX_READ)
    os.mkfifo(tmp_path / "fifo.onnx")
    (tmp_path / "null.onnx").symlink_to(os.devnull)
    ext = tmp_path / "ext"
    ext.mkdir()
    subprocess.run([sys.executable, script, "make", ext / "m.onnx"], check=True, timeout=300)
    (ext / "w.data").unlink()
    os.mkfifo(ext / "w.data")
    cases = [
        (tmp_path / "fifo.onnx", "a FIFO"),
        (tmp_path / "null.onnx", "a character device"),
        (ext / "m.onnx", "a FIFO"),
    ]
    for src, kind in cases:
        shown = ext / "w.data" if src.parent == ext else src
        want = f"input {shown} is {kind}, not a regular file: squant-rs reads regular files only"
        out = tmp_path / "out.onnx"
        api = subprocess.run(
            [sys.executable, script, "api", src, out], capture_output=True, text=True, timeout=60
        )
        assert api.returncode == 0 and api.stdout == want + "\n", (src, api.stderr)
        cli = subprocess.run(
            [sys.executable, "-m", "squant_rs", "quantize", src, out],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 2 and cli.stderr == f"squant-rs: error: {want}\n", src
        assert not out.exists()


def test_float8_tensors_are_kept_as_they_are(tmp_path, capsys) -> None:
    """Only float64/32/16 and bfloat16 tensors are quantizable: a float8
    weight is not selected (it was, and save_quantized then refused it as
    "not a floating tensor"), and is stored unchanged, the same way by
    save_quantized, quantize_checkpoint and the CLI."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    g = torch.Generator().manual_seed(8)
    sd = {
        "a.weight": torch.randn(4, 6, generator=g),
        "f8.weight": torch.randn(4, 6, generator=g).to(torch.float8_e4m3fn),
        "f8b.weight": torch.randn(3, 2, 2, generator=g).to(torch.float8_e5m2),
        "h.weight": torch.randn(5, 3, generator=g).half(),
    }
    assert squant_rs.select_state_dict(sd) == ["a.weight", "h.weight"]
    assert squant_rs.select_state_dict({"l": np.ones((2, 2), np.longdouble)}, "*") == (
        ["l"] if np.dtype(np.longdouble).itemsize == 8 else []
    )
    before = {k: v.clone() for k, v in sd.items()}
    saved = tmp_path / "saved.safetensors"
    report = squant_rs.save_quantized(sd, saved)
    assert [layer.name for layer in report.layers] == ["a.weight", "h.weight"]
    for k, v in sd.items():
        assert torch.equal(v.view(torch.uint8), before[k].view(torch.uint8))
    loaded = squant_rs.load_quantized(saved)
    for k in ("f8.weight", "f8b.weight"):
        assert loaded[k].dtype == sd[k].dtype
        assert torch.equal(loaded[k].view(torch.uint8), sd[k].view(torch.uint8))

    src = tmp_path / "src.safetensors"
    write_safetensors(src, {k: RawTensor.from_torch(v) for k, v in sd.items()})
    ckpt = tmp_path / "ckpt.safetensors"
    quantize_checkpoint(src, ckpt)
    cli = tmp_path / "cli.safetensors"
    assert main(["quantize", str(src), str(cli)]) == 0
    capsys.readouterr()
    want = [(t.name, t.dtype, t.bits) for t in inspect_quantized(saved).tensors]
    assert ("f8.weight", "F8_E4M3", None) in want
    for path in (ckpt, cli):
        assert [(t.name, t.dtype, t.bits) for t in inspect_quantized(path).tensors] == want
        assert path.read_bytes() == saved.read_bytes()


def _eight_weights() -> dict[str, RawTensor]:
    """Eight 1024x1024 float32 weights ``l0.weight`` ... (32 MB: a run that
    outlasts the main thread of the tests' exit scripts)."""
    rng = np.random.default_rng(0)
    return {
        f"l{s}.weight": RawTensor.from_numpy(rng.standard_normal((1024, 1024)).astype(np.float32))
        for s in range(8)
    }


def _python(
    code: str, *args: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with ``args`` (``sys.argv[1:]``)
    in ``cwd``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


_DAEMON_RUN = """
import os, sys, threading, time, squant_rs
started = threading.Event()
def progress(*args):
    started.set()
    time.sleep(0.05)  # the run outlives the main thread
def work():
    squant_rs.quantize_checkpoint(
        sys.argv[1], sys.argv[2], 4, threads=1, progress=progress if sys.argv[3] else None
    )
threading.Thread(target=work, daemon=True).start()
if sys.argv[3]:
    started.wait()
else:
    while not os.listdir("."):  # until its temporary output appears
        time.sleep(0.001)
print("main exits")
"""


@pytest.mark.parametrize("callback", [True, False])
@pytest.mark.parametrize("sharded", [True, False])
def test_run_in_a_daemon_thread_at_exit(tmp_path, sharded: bool, callback: bool) -> None:
    """quantize_checkpoint still running in a daemon thread when the
    interpreter exits: the run is stopped, its temporary output removed,
    and the process ends normally and quietly. (The temporary directory or
    file was left behind, and without a progress callback the next block's
    signal check panicked: 'The Python interpreter is not initialized'.)"""

    src = tmp_path / "ck"
    src.mkdir()
    tensors = _eight_weights()
    weight_map = {}
    for s, (name, t) in enumerate(tensors.items()):
        write_safetensors(src / f"s{s}.safetensors", {name: t})
        weight_map[name] = f"s{s}.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if not sharded:
        write_safetensors(tmp_path / "in.safetensors", tensors)
    args = [str(src), "out"] if sharded else [str(tmp_path / "in.safetensors"), "out.safetensors"]
    work = tmp_path / "work"
    work.mkdir()
    for _ in range(3):
        r = _python(_DAEMON_RUN, *args, "1" if callback else "", cwd=work)
        assert (r.returncode, r.stdout, r.stderr) == (0, "main exits\n", "")
        assert os.listdir(work) == []


_DAEMON_SAVE = """
import os, sys, threading, time, numpy as np, squant_rs
rng = np.random.default_rng(0)
weights = [rng.standard_normal((2048, 2048), dtype=np.float32) for _ in range(8)]
started = threading.Event()
def work():
    started.set()
    if sys.argv[1] == "save":
        squant_rs.save_quantized({f"l{i}.weight": w for i, w in enumerate(weights)},
                                 "out.safetensors", 4)
    else:
        squant_rs.quantize_tensors(weights, 4)
threading.Thread(target=work, daemon=True).start()
started.wait()
if sys.argv[1] == "save":
    while not os.listdir("."):  # until its temporary output appears
        time.sleep(0.001)
print("main exits")
"""


@pytest.mark.parametrize("call", ["save", "tensors"])
def test_native_call_in_a_daemon_thread_at_exit(tmp_path, call: str) -> None:
    """save_quantized (or quantize_tensors) still running in a daemon thread
    when the interpreter exits: the process ends normally and quietly, with
    no temporary file left. (The thread re-took the GIL when its native call
    returned, CPython ended it with pthread_exit through the extension's
    frames, and the process aborted: 'FATAL: exception not rethrown', exit
    status 134, the temporary file left behind.)"""

    work = tmp_path / "work"
    work.mkdir()
    for _ in range(3):
        r = _python(_DAEMON_SAVE, call, cwd=work)
        assert (r.returncode, r.stdout, r.stderr) == (0, "main exits\n", "")
        assert os.listdir(work) == []


_LATE_THREADS = """
import atexit, sys, threading
import numpy as np
rng = np.random.default_rng(0)
weights = [rng.standard_normal((1024, 1024), dtype=np.float32) for _ in range(4)]
worker = None
def late():  # registered before squant_rs's own exit hook: runs after it
    if sys.argv[1] == "thread":  # an ordinary thread started at exit
        out = []
        t = threading.Thread(target=lambda: out.append(squant_rs.quantize_tensors(weights, 4)))
        t.start()
        t.join()
        print("late thread:", len(out[0]))
    else:  # drains a daemon worker still quantizing
        worker.join()
        print("worker joined")
atexit.register(late)
import squant_rs
if sys.argv[1] == "daemon":
    started = threading.Event()
    def work():
        started.set()
        squant_rs.quantize_tensors(weights, 4, threads=1)
        print("worker done", flush=True)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    started.wait()
print("main exits", flush=True)
"""


@pytest.mark.parametrize("case", ["thread", "daemon"])
def test_threads_an_atexit_handler_waits_for_finish(tmp_path, case: str) -> None:
    """After squant_rs's exit hook, an ordinary thread that a later atexit
    handler starts and joins, and a daemon worker a later atexit handler
    joins, both finish their native calls (the first version of the exit
    handling parked them for good: the process hung)."""

    r = _python(_LATE_THREADS, case, cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    if case == "thread":
        assert r.stdout == "main exits\nlate thread: 4\n"
    else:  # (the worker may finish before the main thread prints)
        lines = r.stdout.splitlines()
        assert sorted(lines[:2]) == ["main exits", "worker done"] and lines[2:] == ["worker joined"]


_LATE_RUN = """
import atexit, os, sys, threading, time
def late():  # registered before squant_rs's own exit hook: runs after it
    try:
        squant_rs.quantize_checkpoint(sys.argv[1], "late.safetensors", 4)
    except squant_rs.InvalidArgumentError as exc:
        print("refused:", exc)
atexit.register(late)
import squant_rs
started = threading.Event()
def progress(*args):
    started.set()
    time.sleep(0.05)  # the run outlives the main thread
threading.Thread(
    target=lambda: squant_rs.quantize_checkpoint(
        sys.argv[1], "out.safetensors", 4, threads=1, progress=progress
    ),
    daemon=True,
).start()
started.wait()
print("main exits")
"""


def test_run_started_after_the_exit_clean_up_is_refused(tmp_path) -> None:
    """A daemon thread's run stopped at exit, then another run started by a
    later atexit handler (in the exiting main thread): it is refused with a
    message saying why. (Its stopped run parked the main thread, and the
    process hung, SIGTERM included.)"""

    tensors = _eight_weights()
    write_safetensors(tmp_path / "in.safetensors", tensors)
    work = tmp_path / "work"
    work.mkdir()
    r = _python(_LATE_RUN, str(tmp_path / "in.safetensors"), cwd=work, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("main exits\nrefused: the interpreter is exiting"), r.stdout
    assert os.listdir(work) == []


_FORKED_RUN = """
import os, sys, threading, time, squant_rs
started = threading.Event()
result = {}
def progress(*args):
    started.set()
    time.sleep(0.02)
def work():
    try:
        result["ok"] = squant_rs.quantize_checkpoint(sys.argv[1], "parent.safetensors", 4,
                                                      threads=1, progress=progress)
    except Exception as exc:
        result["error"] = repr(exc)
t = threading.Thread(target=work)
t.start()
started.wait()
pid = os.fork()
if pid == 0:  # the child quantizes something of its own and exits normally
    squant_rs.quantize_checkpoint(sys.argv[2], "child.safetensors", 4)
    sys.exit(0)
os.waitpid(pid, 0)
t.join()
print(sorted(result), sorted(os.listdir(".")))
"""


def test_forked_child_leaves_the_parents_run_alone(tmp_path) -> None:
    """A child forked while its parent quantizes, which runs and finishes a
    quantization of its own: its exit hook removed the parent's temporary
    output (inherited in its list of files in progress), and the parent's
    run failed with a bare FileNotFoundError."""

    big = _eight_weights()
    write_safetensors(tmp_path / "big.safetensors", big)
    write_safetensors(tmp_path / "small.safetensors", {"l.weight": big["l0.weight"]})
    work = tmp_path / "work"
    work.mkdir()
    r = _python(
        _FORKED_RUN, *(str(tmp_path / f"{n}.safetensors") for n in ("big", "small")), cwd=work
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "['ok'] ['child.safetensors', 'parent.safetensors']\n", r.stdout


def test_run_in_a_daemon_thread_at_exit_beside_torch(tmp_path) -> None:
    """As test_run_in_a_daemon_thread_at_exit, with torch imported (its
    finalizers make the interpreter's shutdown slower): the exit hook now
    waits until the stopped run is out of its progress callback, which was
    still in Python when the interpreter was finalized (SIGABRT, 'FATAL:
    exception not rethrown')."""

    pytest.importorskip("torch")
    tensors = _eight_weights()
    write_safetensors(tmp_path / "in.safetensors", tensors)
    work = tmp_path / "work"
    work.mkdir()
    for _ in range(3):
        r = _python(
            "import torch\n" + _DAEMON_RUN,
            str(tmp_path / "in.safetensors"),
            "out.safetensors",
            "1",
            cwd=work,
        )
        assert (r.returncode, r.stdout, r.stderr) == (0, "main exits\n", "")
        assert os.listdir(work) == []
