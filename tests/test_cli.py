"""The squant-rs command line: quantize, info, demo, and every bad input."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import squant_rs
from squant_rs.cli import Progress, main

torch = pytest.importorskip("torch")
nn = torch.nn
safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 4)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net()


@pytest.fixture()
def model() -> nn.Module:
    return _net()


@pytest.fixture()
def st_file(tmp_path, model) -> str:
    path = tmp_path / "in.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_same_weights(path: str, expected: dict[str, torch.Tensor]) -> None:
    loaded = squant_rs.load_quantized(path)
    assert loaded.keys() == expected.keys()  # (safetensors' own writer sorts names)
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


# --------------------------------------------------------------------------
# success paths


def test_quantize_safetensors(tmp_path, capsys, model, st_file) -> None:
    out = str(tmp_path / "out.safetensors")
    rc, stdout, stderr = _run(capsys, "quantize", st_file, out, "--wbits", "3")
    assert rc == 0, stderr
    assert stderr == ""  # no progress bar off a terminal
    _assert_same_weights(out, squant_rs.quantize_model(model, wbits=3, recipe="paper").state_dict())
    assert "layers quantized      3 of" in stdout
    assert "size after" in stdout and "mean relative error" in stdout
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out.safetensors"]


def test_quantize_options(tmp_path, capsys, model, st_file) -> None:
    out = str(tmp_path / "out.safetensors")
    rc, stdout, _ = _run(
        capsys,
        "quantize",
        st_file,
        out,
        "--skip",
        "fc",
        "--mode",
        "squant-e",
        "--threads",
        "1",
        "-v",
    )
    assert rc == 0
    _assert_same_weights(
        out,
        squant_rs.quantize_model(model, mode="squant-e", skip="fc", recipe="paper").state_dict(),
    )
    assert "dw.weight" in stdout and "total:" in stdout  # -v: per-layer table
    rc, _, _ = _run(capsys, "quantize", st_file, out, "--include", "conv.*", "dw.*", "--skip", "dw")
    assert rc == 0
    info = squant_rs.formats.safetensors.inspect_quantized(out)
    assert [t.name for t in info.quantized] == ["conv.weight"]
    rc, stdout, stderr = _run(capsys, "quantize", st_file, out, "-q")
    assert rc == 0 and stdout == "" and stderr == ""


@pytest.mark.parametrize("wrap", [False, True])
def test_quantize_torch_checkpoint(tmp_path, capsys, model, wrap: bool) -> None:
    src = tmp_path / "ckpt.pth"
    sd = model.state_dict()
    torch.save({"state_dict": sd, "epoch": 3, "arch": "net"} if wrap else sd, src)
    out = str(tmp_path / "out.safetensors")
    rc, _, stderr = _run(capsys, "quantize", str(src), out)
    assert rc == 0, stderr
    _assert_same_weights(out, squant_rs.quantize_model(model, recipe="paper").state_dict())


def test_info(tmp_path, capsys, st_file) -> None:
    out = str(tmp_path / "out.safetensors")
    assert _run(capsys, "quantize", st_file, out)[0] == 0
    rc, stdout, stderr = _run(capsys, "info", out)
    assert rc == 0, stderr
    assert "squant-rs version 1" in stdout
    assert "3 quantized" in stdout and "bits / mode           4 / squant" in stdout
    assert "conv.weight" in stdout and "bn.running_mean" in stdout and "8x3x3x3" in stdout
    assert "as float32" in stdout


def test_demo(tmp_path, capsys) -> None:
    out = str(tmp_path / "demo.safetensors")
    rc, stdout, stderr = _run(capsys, "demo", "--depth", "18", "--threads", "2", "--out", out)
    assert rc == 0, stderr
    assert "ResNet-18 weight shapes (21 layers, 11,678,912 parameters)" in stdout
    assert "W4 squant, Rust backend, 2 thread(s)" in stdout
    for label in ("time (squant)", "flips (K / C)", "rel. weight error", "nearest (squant-e)"):
        assert label in stdout
    assert f"wrote {out}" in stdout
    info = squant_rs.formats.safetensors.inspect_quantized(out)
    assert len(info.quantized) == 21


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = Progress(stream)
    for i in range(3):
        bar(i, 3, f"layer{i}")
    bar(3, 3, "")
    bar.close()
    text = stream.getvalue()
    assert "\r[" in text and "0/3 layer0" in text and "3/3" in text and "#" * 24 in text
    assert text.endswith("\r")
    quiet = io.StringIO()
    Progress(quiet)(1, 2, "x")
    assert quiet.getvalue() == ""


def test_help_and_version(capsys) -> None:
    rc, stdout, _ = _run(capsys, "--help")
    assert rc == 0 and "quantize" in stdout and "demo" in stdout
    rc, stdout, _ = _run(capsys, "--version")
    assert rc == 0 and squant_rs.__version__ in stdout


# --------------------------------------------------------------------------
# bad input: exit 2, one line on stderr, no output file


class NotAllowed:
    """Pickled into a checkpoint: weights_only loading must refuse it."""


def _make_bad_input(tmp_path, kind: str, good: str) -> str:
    path = tmp_path / f"bad-{kind}"
    good_bytes = Path(good).read_bytes()
    if kind == "missing":
        return str(tmp_path / "does-not-exist.safetensors")
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a model\n")
    elif kind == "truncated_safetensors":
        path.write_bytes(good_bytes[: len(good_bytes) // 2])
    elif kind == "corrupt_header":
        path.write_bytes(good_bytes[:8] + b"{" + b"\xff" * 20 + good_bytes[29:])
    elif kind == "truncated_pt":
        torch.save(_net().state_dict(), path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "pickle_object":
        torch.save({"w": torch.zeros(2, 2), "obj": NotAllowed()}, path)
    elif kind == "pt_not_state_dict":
        torch.save([torch.zeros(2, 2)], path)
    elif kind == "pt_nested":
        torch.save({"model": _net().state_dict(), "epoch": 3}, path)
    elif kind == "no_weights":
        safetensors_torch.save_file({"bias": torch.zeros(3)}, str(path))
    else:  # pragma: no cover
        raise AssertionError(kind)
    return str(path)


BAD_INPUTS = [
    ("missing", "input file not found"),
    ("directory", "directory"),
    ("empty", "unrecognized input format"),
    ("text", "unrecognized input format"),
    ("truncated_safetensors", "truncated"),
    ("corrupt_header", "not valid JSON"),
    ("truncated_pt", "cannot load torch checkpoint"),
    ("pickle_object", "cannot load torch checkpoint"),
    ("pt_not_state_dict", "not a state dict"),
    ("pt_nested", "not a tensor"),
    ("no_weights", "no tensor to quantize"),
]


def _assert_one_error_line(stderr: str, match: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("squant-rs: error: "), stderr
    assert match in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("kind", "match"), BAD_INPUTS)
def test_bad_input(tmp_path, capsys, st_file, kind: str, match: str) -> None:
    src = _make_bad_input(tmp_path, kind, st_file)
    out = tmp_path / "out" / "result.safetensors"
    out.parent.mkdir()
    rc, stdout, stderr = _run(capsys, "quantize", src, str(out))
    assert rc == 2
    _assert_one_error_line(stderr, match)
    assert os.listdir(out.parent) == []  # no OUT, no temporary file


def test_failed_run_keeps_existing_output(tmp_path, capsys, st_file) -> None:
    out = tmp_path / "result.safetensors"
    out.write_bytes(b"old")
    bad = _make_bad_input(tmp_path, "truncated_safetensors", st_file)
    rc, _, stderr = _run(capsys, "quantize", bad, str(out))
    assert rc == 2
    _assert_one_error_line(stderr, "truncated")
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["quantize", "{in}", "{out}", "--wbits", "9"], "bit width must be in 2..8"),
        (["quantize", "{in}", "{out}", "--wbits", "four"], "invalid bit width"),
        (["quantize", "{in}", "{out}", "--mode", "fast"], "invalid choice: 'fast'"),
        (["quantize", "{in}", "{out}", "--threads", "0"], "positive integer"),
        (["quantize", "{in}", "{out}", "--frobnicate"], "unrecognized arguments"),
        (["quantize", "{in}"], "required: OUT"),
        (["quantize", "{in}", "{out}", "-v", "-q"], "not allowed with"),
        ([], "required: COMMAND"),
        (["explode"], "invalid choice: 'explode'"),
        (["demo", "--depth", "20"], "invalid choice"),
        (["quantize", "{in}", "{tmp}/no/such/dir/out.safetensors"], "No such file or directory"),
        (["quantize", "{in}", "{tmp}"], "output is a directory"),
        (["info", "{in}"], "not a squant-rs file"),
        (["info", "{tmp}/missing"], "file not found"),
    ],
)
def test_bad_options(tmp_path, capsys, st_file, argv: list[str], match: str) -> None:
    out = tmp_path / "result.safetensors"
    args = [a.format(**{"in": st_file, "out": out, "tmp": tmp_path}) for a in argv]
    rc, _, stderr = _run(capsys, *args)
    assert rc == 2
    _assert_one_error_line(stderr, match)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


# --------------------------------------------------------------------------
# real processes


def _subprocess(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_torchscript_input_is_one_error_line(tmp_path) -> None:
    """A TorchScript archive as the input: one error line (torch.load's
    UserWarning about the archive, and its source line, came first)."""
    torch = pytest.importorskip("torch")
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 3)), tmp_path / "ts.pth")
    out = tmp_path / "o.safetensors"
    p = _subprocess(
        sys.executable, "-m", "squant_rs", "quantize", str(tmp_path / "ts.pth"), str(out)
    )
    assert p.returncode == 2
    _assert_one_error_line(p.stderr, "it is a TorchScript archive (torch.jit.save)")
    assert not out.exists()


def test_subprocess_exit_codes(tmp_path, st_file) -> None:
    out = tmp_path / "o.safetensors"
    p = _subprocess(sys.executable, "-m", "squant_rs", "quantize", str(tmp_path / "nope"), str(out))
    assert p.returncode == 2
    _assert_one_error_line(p.stderr, "input file not found")
    p = _subprocess(
        sys.executable, "-m", "squant_rs.cli", "quantize", st_file, str(out), "--wbits", "1"
    )
    assert p.returncode == 2
    _assert_one_error_line(p.stderr, "bit width")
    assert not out.exists()
    script = shutil.which("squant-rs")
    if script is not None:  # the console script of the installed package
        p = _subprocess(script, "info", st_file)
        assert p.returncode == 2
        _assert_one_error_line(p.stderr, "not a squant-rs file")


NO_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any "import torch" now fails
    import numpy as np
    import squant_rs
    from squant_rs.cli import main
    assert main(["demo", "--depth", "18"]) == 0
    rng = np.random.default_rng(0)
    sd = {{"a.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
           "a.bias": np.zeros(8, np.float32)}}
    from squant_rs.formats.safetensors import RawTensor, write_safetensors
    write_safetensors("{src}", {{k: RawTensor.from_numpy(v)
                                           for k, v in sd.items()}})
    assert main(["quantize", "{src}", "{dst}"]) == 0
    assert main(["info", "{dst}"]) == 0
    assert main(["quantize", "{pt}", "{dst2}"]) == 2
    try:
        squant_rs.load_quantized("{dst}")
    except ImportError as exc:
        assert "pip install 'squant-rs[torch]'" in str(exc)
        assert "pip install '.[torch]'" in str(exc)
    else:
        raise AssertionError("load_quantized worked without torch")
    """
)


def test_numpy_only_cli(tmp_path) -> None:
    pt = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(2, 2)}, pt)
    code = NO_TORCH.format(
        src=tmp_path / "in.safetensors",
        dst=tmp_path / "out.safetensors",
        dst2=tmp_path / "out2.safetensors",
        pt=pt,
    )
    p = _subprocess(sys.executable, "-c", code)
    assert p.returncode == 0, p.stderr
    assert "ResNet-18 weight shapes" in p.stdout
    assert "needs PyTorch: pip install 'squant-rs[torch]'" in p.stderr
    assert "from a source checkout: pip install '.[torch]'" in p.stderr
    assert "squant-rs version 1" in p.stdout
    # the file written without torch is read back with torch
    loaded = squant_rs.load_quantized(tmp_path / "out.safetensors")
    assert loaded["a.weight"].shape == (8, 4, 3, 3)
    assert not np.any(loaded["a.bias"].numpy())
