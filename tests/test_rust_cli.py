"""The Rust command line (`squant`, crate squant-cli) against the Python CLI:
byte-identical output files, the same report, messages and exit codes, and
its own signal cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from squant_rs.formats.safetensors import (
    RawTensor,
    inspect_quantized,
    read_safetensors,
    write_safetensors,
)

from conftest import default_signal_handlers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def squant_bin() -> str:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not installed")
    subprocess.run(
        [cargo, "build", "--release", "--quiet", "-p", "squant-cli"],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "release" / ("squant.exe" if os.name == "nt" else "squant")
    assert path.exists(), path
    return str(path)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=300)


def _py(*argv: str) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "squant_rs", *argv)


def _untimed(stdout: str) -> list[str]:
    """The report without its timings (which differ between runs); of the
    per-layer table's total line only its untimed head (layers, W, mode)."""
    return [
        ": ".join(line.split(": ")[:2]) if line.startswith("total:") else line
        for line in stdout.splitlines()
        if not line.startswith("time ") and not (line and line.split()[0].endswith(".weight"))
    ]


def _message(stderr: str) -> str:
    assert stderr.count("\n") == 1, stderr
    return stderr.split(": error: ", 1)[1]


def _checkpoint(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sd = {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": rng.standard_normal((5, 7)).astype(np.float16),
        "head.weight": rng.standard_normal((3, 11)).astype(np.float64),
        "empty.weight": np.zeros((0, 4), np.float32),
        "steps": np.array(3, np.int64),
    }
    write_safetensors(path, {k: RawTensor.from_numpy(v) for k, v in sd.items()})


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--wbits", "3", "--mode", "squant-k"],
        ["--wbits", "2", "--skip", "fc"],
        ["--include", "h*"],
        ["--quantizer", "symmetric"],
        ["--wbits", "8", "--mode", "squant-c", "--quantizer", "symmetric"],
    ],
)
def test_same_file_and_report_as_python(tmp_path, squant_bin: str, options: list[str]) -> None:
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    py_out, rs_out = tmp_path / "py.safetensors", tmp_path / "rs.safetensors"
    p = _py("quantize", str(src), str(py_out), "-v", *options)
    r = _run(squant_bin, "quantize", str(src), str(rs_out), "-v", *options)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert py_out.read_bytes() == rs_out.read_bytes()
    want = "symmetric" if "symmetric" in options else "asymmetric"
    assert inspect_quantized(rs_out).quantizer == want
    assert _untimed(p.stdout.replace(str(py_out), "OUT")) == _untimed(
        r.stdout.replace(str(rs_out), "OUT")
    )
    for verify in ([], ["--verify"]):
        pi = _py("info", str(py_out), *verify)
        ri = _run(squant_bin, "info", str(py_out), *verify)
        assert pi.returncode == ri.returncode == 0
        assert pi.stdout == ri.stdout


@pytest.mark.parametrize("skip", ["attn.in_proj", "attn.in_proj_weight", "*in_proj"])
def test_projection_skip_names_same_as_python(tmp_path, squant_bin: str, skip: str) -> None:
    """A skip pattern is also tried on the layer name quantize_model gives
    an attention's projection (attn.in_proj for attn.in_proj_weight) in
    both CLIs: it matched nothing, with a warning."""
    rng = np.random.default_rng(2)
    sd = {
        "attn.in_proj_weight": rng.standard_normal((12, 4)).astype(np.float32),
        "attn.in_proj_bias": rng.standard_normal(12).astype(np.float32),
        "attn.out_proj.weight": rng.standard_normal((4, 4)).astype(np.float32),
    }
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: RawTensor.from_numpy(v) for k, v in sd.items()})
    py_out, rs_out = tmp_path / "py.safetensors", tmp_path / "rs.safetensors"
    p = _py("quantize", str(src), str(py_out), "--skip", skip)
    r = _run(squant_bin, "quantize", str(src), str(rs_out), "--skip", skip)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert p.stderr == r.stderr == ""
    assert py_out.read_bytes() == rs_out.read_bytes()
    assert [t.name for t in inspect_quantized(rs_out).quantized] == ["attn.out_proj.weight"]


def test_sharded_same_as_python(tmp_path, squant_bin: str) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    rng = np.random.default_rng(1)
    weight_map = {}
    for j in range(2):
        name = f"model-{j + 1:05d}-of-00002.safetensors"
        tensors = {
            f"l{j}.weight": RawTensor.from_numpy(rng.standard_normal((6, 10)).astype(np.float32)),
            f"l{j}.bias": RawTensor.from_numpy(np.ones(6, np.float32)),
        }
        write_safetensors(src / name, tensors)
        weight_map.update({k: name for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    p = _py("quantize", str(src), str(tmp_path / "py"))
    r = _run(squant_bin, "quantize", str(src), str(tmp_path / "rs"))
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert "sharded safetensors, 2 shards" in r.stdout
    names = sorted(os.listdir(tmp_path / "py"))
    assert names == sorted(os.listdir(tmp_path / "rs"))
    for n in names:
        assert (tmp_path / "py" / n).read_bytes() == (tmp_path / "rs" / n).read_bytes(), n
    # the output directory is not overwritten
    r = _run(squant_bin, "quantize", str(src), str(tmp_path / "rs"))
    assert r.returncode == 2 and "not empty" in _message(r.stderr)


def test_sharded_unmatched_patterns_warn_like_a_single_file(tmp_path, squant_bin: str) -> None:
    """A pattern that matches no tensor of any shard gets one warning line in
    both CLIs, as for a single file (neither said anything for a sharded
    checkpoint); a pattern matching in one shard only is no warning. A run
    that fails prints its one error line only."""
    src = tmp_path / "ckpt"
    src.mkdir()
    rng = np.random.default_rng(3)
    weight_map = {}
    for j in range(2):
        name = f"model-{j + 1:05d}-of-00002.safetensors"
        w = RawTensor.from_numpy(rng.standard_normal((6, 10)).astype(np.float32))
        write_safetensors(src / name, {f"l{j}.weight": w})
        weight_map[f"l{j}.weight"] = name
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    options = ["-q", "--include", "*weight", "zz*", "--skip", "l1", "typo*"]
    p = _py("quantize", str(src), str(tmp_path / "py"), *options)
    r = _run(squant_bin, "quantize", str(src), str(tmp_path / "rs"), *options)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert p.stderr.splitlines() == [
        "squant-rs: warning: --include pattern 'zz*' matches no floating tensor of 2+ dimensions",
        "squant-rs: warning: --skip pattern 'typo*' matches no tensor that would be quantized",
    ]
    assert p.stderr.replace("squant-rs: ", "") == r.stderr.replace("squant: ", "")
    for index in (src, src / "model.safetensors.index.json"):
        p = _py("quantize", str(index), str(tmp_path / "py2"), "--include", "nothing*")
        r = _run(squant_bin, "quantize", str(index), str(tmp_path / "rs2"), "--include", "nothing*")
        assert p.returncode == r.returncode == 2
        assert p.stderr.count("\n") == 1 and "no tensor to quantize" in p.stderr, p.stderr
        assert p.stderr.replace("squant-rs: ", "") == r.stderr.replace("squant: ", "")


def test_same_usage_errors_as_python(tmp_path, squant_bin: str) -> None:
    """Bad command lines: one line, status 2 and the same words from both
    CLIs (argparse's wording; the Rust CLI's clap errors were worded and
    folded its own way, and without arguments it printed its whole help);
    integers read as Python's int() reads them, long options abbreviated
    as argparse allows."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    out = str(tmp_path / "out.safetensors")
    q = ["quantize", str(src), out]
    cases = [
        [],
        [*q, "--wbits", "abc"],
        [*q, "--wbits", "-1"],
        [*q, "--wbits", "9"],
        [*q, "--wbits", "1_0"],
        [*q, "--threads", "0"],
        [*q, "--threads", "x"],
        [*q, "-v", "-q"],
        [*q, "-q", "-v"],
        [*q, "--mode", "foo"],
        [*q, "--quantizer", "foo"],
        [*q, "--bogus"],
        ["quantize", str(src)],
        ["quantize", str(src), ""],
        ["info", str(src), "-q"],
        ["info", str(src), "--ver"],
        ["info", str(src), "--verbose=1"],
        [*q, "--include"],
        [*q, "--include", "--skip", "x"],
        [*q, "--wbits"],
        [*q, "--mode", "-q"],
        [*q, "--mode", ""],
        [*q, "--bogus=1"],
        [*q, "--mode", "-1"],
        [*q, "--include", "-x"],
        [*q, "--wbits", "99999999999999999999"],
        [*q, "--threads", "-007"],
        ["quantize", "--", str(src), out, "--"],
    ]
    for argv in cases:
        p, r = _py(*argv), _run(squant_bin, *argv)
        assert p.returncode == r.returncode == 2, argv
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("squant-rs: error: "), argv
        # (the program's name aside: in the prefix and the help to see)
        shown = p.stderr.replace("squant-rs: ", "squant: ").replace("'squant-rs ", "'squant ")
        assert shown == r.stderr, argv
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    for name, tool in (("py", _py), ("rs", lambda *a: _run(squant_bin, *a))):
        r = tool("quantize", str(src), str(tmp_path / f"{name}.safetensors"), "--wbit", " 3 ")
        assert r.returncode == 0, r.stderr
        # a repeated option: the last one counts
        r = tool(
            "quantize",
            str(src),
            str(tmp_path / f"{name}2.safetensors"),
            "--wbits",
            "5",
            "--wbits",
            "3",
            "-qq",
        )
        assert r.returncode == 0, r.stderr
    for a, b in (("py", "rs"), ("py", "py2"), ("rs", "rs2")):
        assert (tmp_path / f"{a}.safetensors").read_bytes() == (
            tmp_path / f"{b}.safetensors"
        ).read_bytes()


def test_same_errors_as_python(tmp_path, squant_bin: str) -> None:
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    blob = src.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[:-1])
    text = tmp_path / "t.safetensors"
    text.write_text("hello, this is not a model\n")
    dot = tmp_path / ".safetensors"  # no extension to Path::extension()
    dot.write_text("hello, this is not a model\n")
    out = tmp_path / "out.safetensors"
    cases = [
        ["quantize", str(dot), str(out)],
        ["quantize", str(tmp_path / "missing.safetensors"), str(out)],
        ["quantize", str(cut), str(out)],
        ["quantize", str(text), str(out)],
        ["quantize", str(src), str(out), "--include", "nothing*"],
        ["quantize", str(src), str(tmp_path)],
        ["info", str(src)],
        ["info", str(tmp_path / "missing")],
        ["quantize", str(src), str(src)],
        ["quantize", str(src), str(tmp_path / "out.pth")],
        ["quantize", str(src), str(tmp_path / "nodir" / "o.safetensors")],
        ["quantize", str(tmp_path / "nodir" / "model.safetensors.index.json"), str(out)],
        ["quantize", str(src), str(tmp_path / "new.safetensors") + "/"],
    ]
    for argv in cases:
        p, r = _py(*argv), _run(squant_bin, *argv)
        assert p.returncode == r.returncode == 2, argv
        # one error line, the same, program name aside (an unmatched pattern's
        # warning came before it: warnings are printed only when a run succeeds)
        assert p.stderr.count("\n") == 1, argv
        assert p.stderr.startswith("squant-rs: error: "), argv
        assert p.stderr.replace("squant-rs: ", "") == r.stderr.replace("squant: ", ""), argv
    assert sorted(os.listdir(tmp_path)) == [
        ".safetensors",
        "cut.safetensors",
        "in.safetensors",
        "t.safetensors",
    ]
    r = _run(squant_bin, "quantize", str(src), str(out), "--wbits", "9")
    assert r.returncode == 2 and "bit width must be in 2..8" in _message(r.stderr)
    assert src.read_bytes() == blob


def test_onnx_models_point_to_the_python_cli(tmp_path, squant_bin: str) -> None:
    """The Rust CLI quantizes safetensors files only; an ONNX input or
    output (a name ending in .onnx, in any case, as the Python CLI takes
    it) is refused in one line naming the Python CLI, which quantizes it.
    It said "'.onnx' is not one squant-rs writes (use .safetensors)" (the
    Python CLI writes it), or 'unrecognized input format'."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    for name in ("m.onnx", "M.ONNX", ".onnx"):
        (tmp_path / name).write_bytes(b"\x08\x07")
    said_in = (
        "an ONNX model: this tool reads safetensors files only (use the Python CLI, squant-rs "
        "quantize)"
    )
    said_out = (
        "an ONNX model: this tool writes safetensors files only (use the Python CLI, squant-rs "
        "quantize, on an ONNX input)"
    )
    cases = [
        (["m.onnx", "o.onnx"], f"m.onnx: {said_in}"),
        (["M.ONNX", "o.ONNX"], f"M.ONNX: {said_in}"),
        (["m.onnx", "o.safetensors"], f"m.onnx: {said_in}"),
        ([".onnx", "o.safetensors"], f".onnx: {said_in}"),
        (["in.safetensors", "o.onnx"], f"output o.onnx: {said_out}"),
        (["in.safetensors", "sub/.Onnx"], f"output sub/.Onnx: {said_out}"),
    ]
    for argv, said in cases:
        r = subprocess.run(
            [squant_bin, "quantize", *argv], cwd=tmp_path, capture_output=True, text=True
        )
        assert r.returncode == 2 and _message(r.stderr) == said + "\n", (argv, r.stderr)
    assert sorted(os.listdir(tmp_path)) == [".onnx", "M.ONNX", "in.safetensors", "m.onnx"]


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_removes_the_temporary_file(tmp_path, squant_bin: str, sig: str) -> None:
    """As the Python CLI: the temporary output removed, then SIGINT exits 130
    with 'interrupted', SIGTERM / SIGHUP end the process by that signal
    (it exited 130 with 'interrupted' for those too)."""
    src = tmp_path / "big.safetensors"
    w = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    write_safetensors(src, {f"l{i}.weight": RawTensor.from_numpy(w) for i in range(4)})
    out = tmp_path / "out.safetensors"
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        proc = subprocess.Popen(
            [*argv, "quantize", str(src), str(out), "--threads", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_signal_handlers,
        )
        deadline = time.monotonic() + 60
        while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary file seen"
            time.sleep(0.005)
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=60)
        if sig == "SIGINT":
            assert proc.returncode == 130, (argv, stderr)
            assert stderr.endswith(": error: interrupted\n"), (argv, stderr)
        else:
            assert proc.returncode == -getattr(signal, sig), (argv, stderr)
            assert stderr == "", argv
        assert sorted(os.listdir(tmp_path)) == ["big.safetensors"], argv


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signals_ignored_by_the_parent_stay_ignored(tmp_path, squant_bin: str, sig: str) -> None:
    """As the Python CLI: a signal the parent set to be ignored (`nohup`, a
    background job) does not stop the run (the Rust CLI installed its
    handler over SIG_IGN: `nohup squant quantize ...` died on hangup)."""
    src = tmp_path / "big.safetensors"
    w = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)
    write_safetensors(src, {f"l{i}.weight": RawTensor.from_numpy(w) for i in range(4)})
    signum = getattr(signal, sig)
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        out = tmp_path / "out.safetensors"
        proc = subprocess.Popen(
            [*argv, "quantize", str(src), str(out), "--threads", "1", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN),
        )
        deadline = time.monotonic() + 60
        while not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "no temporary file seen"
            time.sleep(0.005)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (argv, stderr)
        assert out.exists(), argv
        out.unlink()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="head, /dev/full")
def test_closed_stdout_like_python(tmp_path, squant_bin: str) -> None:
    """`squant info -v FILE | head -1`: status 141 and nothing on stderr, as
    the Python CLI (it panicked: 'failed printing to stdout: Broken pipe',
    status 101); a full stdout is one error line and status 2."""
    path = tmp_path / "many.safetensors"
    src = {
        f"layer{i:05d}.a.rather.long.module.name.weight": np.ones((2, 2), np.float32)
        for i in range(3000)
    }
    write_safetensors(
        tmp_path / "in.safetensors", {k: RawTensor.from_numpy(v) for k, v in src.items()}
    )
    r = _run(squant_bin, "quantize", "-q", str(tmp_path / "in.safetensors"), str(path))
    assert r.returncode == 0, r.stderr
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        cli = subprocess.Popen(
            [*argv, "info", "-v", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert cli.stdout is not None and cli.stderr is not None
        head = subprocess.run(["head", "-1"], stdin=cli.stdout, capture_output=True, check=False)
        cli.stdout.close()
        stderr = cli.stderr.read()
        cli.stderr.close()
        assert cli.wait(timeout=120) == 141, (argv, stderr)
        assert stderr == b"", argv
        assert head.stdout.startswith(b"file "), argv
    with open("/dev/full", "w") as full:
        p, r = _both(
            squant_bin, "info", str(path), stdout=full, capture_output=False, stderr=subprocess.PIPE
        )
    _same_message(p, r)
    assert r.returncode == 2 and r.stderr == "squant: error: No space left on device\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE, Linux pipeline")
def test_write_error_before_a_block_read_alone_does_not_hang(tmp_path, squant_bin: str) -> None:
    """A write error (here the file size limit, as a full disk) while plain
    blocks are queued for the writer, with a weight of huge channels next
    (its block read alone, once every input buffer is back): an error and
    no output, not a hang (the queued blocks' buffers were dropped, so the
    reader waited for them forever while the compute side waited for it)."""
    import resource

    rng = np.random.default_rng(0)
    src = tmp_path / "in.safetensors"
    sd = {
        "a.emb": rng.standard_normal(9_500_000).astype(np.float32),
        "b.weight": rng.standard_normal((4, 2_000_000)).astype(np.float32),
    }
    write_safetensors(src, {k: RawTensor.from_numpy(v) for k, v in sd.items()})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for mib in (12, 16, 20, 24):

        def limit(mib: int = mib) -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (mib << 20, mib << 20))

        out = out_dir / "out.safetensors"
        r = subprocess.run(
            [squant_bin, "quantize", "-q", str(src), str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=limit,
        )
        assert r.returncode == 2, (mib, r.stderr)
        assert "File too large" in _message(r.stderr), mib
        assert os.listdir(out_dir) == [], mib


def _both(
    squant_bin: str, *argv: str, cwd: Path | None = None, **kw: object
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """The Python and the Rust CLI on the same arguments."""
    run = {"capture_output": True, "text": True, "timeout": 300, "cwd": cwd, **kw}
    p = subprocess.run([sys.executable, "-m", "squant_rs", *argv], **run)  # type: ignore[call-overload]
    r = subprocess.run([squant_bin, *argv], **run)  # type: ignore[call-overload]
    return p, r


def _same_message(p: subprocess.CompletedProcess[str], r: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == r.returncode, (p.stderr, r.stderr)
    assert p.stderr.replace("squant-rs: ", "") == r.stderr.replace("squant: ", "")


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
def test_symlinked_outputs_like_python(tmp_path, squant_bin: str) -> None:
    """A dangling symlink gets its target created (the link kept); a symlink
    loop is refused (the Rust CLI replaced both with a regular file)."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    for tag in ("py", "rs"):
        (tmp_path / f"link-{tag}.safetensors").symlink_to(f"target-{tag}.safetensors")
    (tmp_path / "loop-a.safetensors").symlink_to("loop-b.safetensors")
    (tmp_path / "loop-b.safetensors").symlink_to("loop-a.safetensors")
    p = _py("quantize", "-q", str(src), str(tmp_path / "link-py.safetensors"))
    r = _run(squant_bin, "quantize", "-q", str(src), str(tmp_path / "link-rs.safetensors"))
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    for tag in ("py", "rs"):
        assert (tmp_path / f"link-{tag}.safetensors").is_symlink()
    assert (tmp_path / "target-py.safetensors").read_bytes() == (
        tmp_path / "target-rs.safetensors"
    ).read_bytes()
    p, r = _both(squant_bin, "quantize", "-q", "in.safetensors", "loop-a.safetensors", cwd=tmp_path)
    _same_message(p, r)
    assert r.returncode == 2
    assert _message(r.stderr) == "Too many levels of symbolic links: loop-a.safetensors\n"
    assert (tmp_path / "loop-a.safetensors").is_symlink()
    assert (tmp_path / "loop-b.safetensors").is_symlink()


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_read_only_output_like_python(tmp_path, squant_bin: str) -> None:
    """One rule in both CLIs, access(W_OK): as root a 0444 file is replaced
    (its mode kept), as another user refused (the Rust CLI went by the mode
    bits alone and refused it as root)."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    for tag in ("py", "rs"):
        out = tmp_path / f"{tag}.safetensors"
        out.write_text("old contents")
        out.chmod(0o444)
    p = _py("quantize", "-q", str(src), str(tmp_path / "py.safetensors"))
    r = _run(squant_bin, "quantize", "-q", str(src), str(tmp_path / "rs.safetensors"))
    assert p.returncode == r.returncode, (p.stderr, r.stderr)
    assert p.stderr.replace("squant-rs: ", "").replace("py.", "X.") == r.stderr.replace(
        "squant: ", ""
    ).replace("rs.", "X.")
    for tag in ("py", "rs"):
        out = tmp_path / f"{tag}.safetensors"
        assert stat_mode(out) == 0o444
        assert (out.read_bytes() == b"old contents") == (r.returncode == 2)
    assert r.returncode == (0 if os.access(tmp_path / "rs.safetensors", os.W_OK) else 2)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_write_error_names_the_output_as_given(tmp_path, squant_bin: str) -> None:
    """A write error names OUT as the user wrote it (Python named the
    absolute path it resolved), through a symlink too."""
    import resource

    w = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)
    write_safetensors(tmp_path / "in.safetensors", {"l0.weight": RawTensor.from_numpy(w)})
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to("sub/real.safetensors")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    for out in ("out.safetensors", "link.safetensors"):
        p, r = _both(
            squant_bin, "quantize", "-q", "in.safetensors", out, cwd=tmp_path, preexec_fn=limit
        )
        _same_message(p, r)
        assert _message(r.stderr) == f"File too large: {out}\n"
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "link.safetensors", "sub"]
    assert os.listdir(tmp_path / "sub") == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_device_inputs_are_refused_like_python(tmp_path, squant_bin: str) -> None:
    """A FIFO or a device as the input: one error line, exit status 2, in
    both CLIs (quantize and info blocked on a FIFO forever)."""
    os.mkfifo(tmp_path / "in.safetensors")
    for argv in (
        ["quantize", "in.safetensors", "out.safetensors"],
        ["info", "in.safetensors"],
        ["info", "--verify", "in.safetensors"],
        ["quantize", os.devnull, "out.safetensors"],
        ["info", os.devnull],
    ):
        p, r = _both(squant_bin, *argv, cwd=tmp_path, timeout=60)
        _same_message(p, r)
        assert r.returncode == 2, argv
        assert "not a regular file" in _message(r.stderr), argv
    assert os.listdir(tmp_path) == ["in.safetensors"]


def test_one_tensor_in_two_shards_like_python(tmp_path, squant_bin: str) -> None:
    """info --verify refuses a sharded directory storing a weight twice."""
    w = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"l0.weight": RawTensor.from_numpy(w)})
    write_safetensors(
        tmp_path / "b.safetensors",
        {"l0.weight": RawTensor.from_numpy(w * 0), "l1.weight": RawTensor.from_numpy(w)},
    )
    q = tmp_path / "q"
    q.mkdir()
    assert (
        _py("quantize", "-q", str(tmp_path / "a.safetensors"), str(q / "s1.safetensors")).returncode
        == 0
    )
    r = _py(
        "quantize",
        "-q",
        str(tmp_path / "b.safetensors"),
        str(q / "s2.safetensors"),
        "--include",
        "l1*",
    )
    assert r.returncode == 0, r.stderr
    parts = (":codes", ":scale", ":zero_point")
    weight_map = {f"l0.weight{p}": "s1.safetensors" for p in parts}
    weight_map |= {f"l1.weight{p}": "s2.safetensors" for p in parts}
    weight_map["l0.weight"] = "s2.safetensors"
    (q / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for verify in ([], ["--verify"]):
        p, r = _both(squant_bin, "info", "q", *verify, cwd=tmp_path)
        _same_message(p, r)
        assert r.returncode == 2 and r.stdout == ""
        assert "tensor 'l0.weight' is stored in two shards" in _message(r.stderr)


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize"],
        ["quantize", "in.safetensors"],
        ["info"],
        ["quantize", "--include", "a*", "in.safetensors", "out.safetensors"],
    ],
)
def test_missing_arguments_named_like_python(tmp_path, squant_bin: str, argv: list[str]) -> None:
    """A usage error names the missing arguments, on one line (the Rust
    CLI cut clap's message after "were not provided:")."""
    p, r = _both(squant_bin, *argv, cwd=tmp_path)
    assert p.returncode == r.returncode == 2
    assert p.stderr.replace("squant-rs", "squant") == r.stderr
    assert "are required: " in _message(r.stderr)


def test_unprintable_names_escaped_like_python(tmp_path, squant_bin: str) -> None:
    """Names with characters str.isprintable rejects (format characters such
    as U+202E RIGHT-TO-LEFT OVERRIDE, private use, unassigned, separators):
    info prints the same escapes in both CLIs (the Rust CLI printed all but
    control characters raw)."""
    names = [
        "rlo\u202efdp.exe.weight",
        "zw\u200bsp.weight",
        "soft\u00adhy.weight",
        "bom\ufeff.weight",
        "pua\ue000.weight",
        "unassigned\u0378.weight",
        "ls\u2028ps\u2029nb\u00a0.weight",
        "esc\x1b[31m.weight",
        "caf\u00e9\u4e2d.weight",
    ]
    sd = {n: RawTensor.from_numpy(np.full((2, 3), i + 1, np.float32)) for i, n in enumerate(names)}
    write_safetensors(tmp_path / "in.safetensors", sd)
    p, r = _both(squant_bin, "quantize", "-v", "in.safetensors", "q.safetensors", cwd=tmp_path)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert _untimed(p.stdout) == _untimed(r.stdout)
    p, r = _both(squant_bin, "info", "q.safetensors", cwd=tmp_path)
    assert p.returncode == r.returncode == 0
    assert p.stdout == r.stdout
    assert "rlo\\u202efdp" in r.stdout and "caf\u00e9\u4e2d.weight" in r.stdout
    assert "\u202e" not in r.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="non-UTF-8 file names")
def test_non_utf8_paths_shown_like_python(tmp_path, squant_bin: str) -> None:
    """Bytes of a path that are not UTF-8 are shown as the Python CLI shows
    them (\\udcff, its surrogate escapes), not as U+FFFD: in reports, in
    messages of either CLI and in OSError from the Rust reader."""
    base = os.fsencode(tmp_path)
    _checkpoint(tmp_path / "in.safetensors")
    os.rename(base + b"/in.safetensors", base + b"/in\xff.safetensors")
    ck = base + b"/ck\xfe"
    os.mkdir(ck)
    index = {"weight_map": {"w": "s0.safetensors"}}
    with open(ck + b"/model.safetensors.index.json", "w") as f:
        json.dump(index, f)

    def both(*argv: bytes) -> tuple[subprocess.CompletedProcess[bytes], ...]:
        run = {"capture_output": True, "timeout": 300, "cwd": base}
        py = [os.fsencode(sys.executable), b"-m", b"squant_rs"]
        return tuple(
            subprocess.run([*cli, *argv], **run)  # type: ignore[call-overload]
            for cli in (py, [os.fsencode(squant_bin)])
        )

    p, r = both(b"quantize", b"in\xff.safetensors", b"out\xfe.safetensors")
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    rows = [[line for line in x.stdout.splitlines() if line.startswith(b"input")] for x in (p, r)]
    assert rows[0] == rows[1] == [b"input                 in\\udcff.safetensors (safetensors)"]
    for argv in (
        [b"quantize", b"missing\xff.safetensors", b"o.safetensors"],
        [b"info", b"missing\xff.safetensors"],
        [b"info", b"ck\xfe"],
    ):
        p, r = both(*argv)
        assert p.returncode == r.returncode == 2, argv
        assert p.stderr.replace(b"squant-rs: ", b"") == r.stderr.replace(b"squant: ", b"")
        assert b"\\udcf" in r.stderr and b"\xef\xbf\xbd" not in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["abc", "0", "4.0", "2000", ""])
def test_bad_thread_environment_like_python(tmp_path, squant_bin: str, value: str) -> None:
    """A bad SQUANT_NUM_THREADS: the same message from both CLIs."""
    _checkpoint(tmp_path / "in.safetensors")
    env = {**os.environ, "SQUANT_NUM_THREADS": value}
    p, r = _both(squant_bin, "quantize", "in.safetensors", "o.safetensors", cwd=tmp_path, env=env)
    assert r.returncode == 2
    _same_message(p, r)
    assert _message(r.stderr).startswith("bad SQUANT_NUM_THREADS environment variable (")
    assert os.listdir(tmp_path) == ["in.safetensors"]
    # Every command that runs threads: the sharded quantize and info --verify
    # (the Python CLI said "SQUANT_NUM_THREADS must be ...", the Rust one
    # ignored the variable and exited 0); --threads N overrides it.
    _sharded_input(tmp_path / "ck")
    clean = {k: v for k, v in env.items() if k != "SQUANT_NUM_THREADS"}
    for src, dst in (("in.safetensors", "q.safetensors"), ("ck", "qck")):
        subprocess.run(
            [squant_bin, "quantize", "-q", src, dst], cwd=tmp_path, env=clean, check=True
        )
    before = sorted(os.listdir(tmp_path))
    for argv in (
        ["quantize", "ck", "out"],
        ["info", "--verify", "q.safetensors"],
        ["info", "--verify", "qck"],
    ):
        p, r = _both(squant_bin, *argv, cwd=tmp_path, env=env)
        assert r.returncode == 2, (argv, r.stderr)
        _same_message(p, r)
        assert _message(r.stderr).startswith("bad SQUANT_NUM_THREADS environment variable ("), argv
        if argv[0] == "info":
            p, r = _both(squant_bin, *argv[:-1], "--threads", "2", argv[-1], cwd=tmp_path, env=env)
            assert p.returncode == r.returncode == 0, (argv, p.stderr, r.stderr)
            assert p.stdout == r.stdout and "verified" in r.stdout
    for cli in ([sys.executable, "-m", "squant_rs"], [squant_bin]):
        run = subprocess.run(
            [*cli, "quantize", "-q", "--threads", "2", "ck", "out"], cwd=tmp_path, env=env
        )
        assert run.returncode == 0
        shutil.rmtree(tmp_path / "out")
    # info without --verify reads only the header: no threads, the variable is not read.
    p, r = _both(squant_bin, "info", "q.safetensors", cwd=tmp_path, env=env)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert sorted(os.listdir(tmp_path)) == before


def _sharded_input(src: Path, rows: int = 6, cols: int = 10) -> None:
    src.mkdir()
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    write_safetensors(src / "s0.safetensors", {"l0.weight": RawTensor.from_numpy(w)})
    index = {"weight_map": {"l0.weight": "s0.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def test_squant_rs_inputs_are_refused_in_the_same_words(tmp_path, squant_bin: str) -> None:
    """A squant-rs output given again as the input, a file or a sharded
    directory (or its index): both CLIs and quantize_checkpoint refuse it in
    the same words, naming the file (of a sharded one, its first shard), and
    write nothing. (Of a sharded one they said 'no tensor to quantize (none
    is a floating tensor ...)' or "tensor name 'empty.weight:codes' ends in
    ':codes', which squant-rs files reserve ..."; quantize_checkpoint said
    the latter of a file too.)"""
    from squant_rs import InvalidArgumentError, __version__, quantize_checkpoint

    _checkpoint(tmp_path / "in.safetensors")
    _sharded_input(tmp_path / "ck")  # nothing left to select once quantized
    big = read_safetensors(tmp_path / "in.safetensors")[0]
    (tmp_path / "ck2").mkdir()  # a 2-D float tensor left unquantized: selected again
    parts = {"a.safetensors": ["conv.weight", "conv.bias"], "b.safetensors": list(big)[2:]}
    for shard, names in parts.items():
        write_safetensors(tmp_path / "ck2" / shard, {n: big[n] for n in names})
    index = {"weight_map": {n: shard for shard, names in parts.items() for n in names}}
    (tmp_path / "ck2" / "model.safetensors.index.json").write_text(json.dumps(index))
    for src, dst in (("in.safetensors", "q.safetensors"), ("ck", "q1"), ("ck2", "q2")):
        r = subprocess.run([squant_bin, "quantize", "-q", src, dst], cwd=tmp_path)
        assert r.returncode == 0
    cases = [
        ("q.safetensors", "again.safetensors", "q.safetensors"),
        ("q1", "again", "q1/s0.safetensors"),
        ("q1/model.safetensors.index.json", "again", "q1/s0.safetensors"),
        ("q2", "again", "q2/a.safetensors"),
    ]
    for src, dst, named in cases:
        said = (
            f"{named} is already a squant-rs file (written by squant-rs {__version__}): "
            "quantize the original float model instead (the info command describes it)"
        )
        p, r = _both(squant_bin, "quantize", "-q", src, dst, cwd=tmp_path)
        _same_message(p, r)
        assert r.returncode == 2 and _message(r.stderr) == said + "\n", (src, r.stderr)
        with pytest.raises(InvalidArgumentError) as exc:
            quantize_checkpoint(tmp_path / src, tmp_path / dst)
        assert str(exc.value) == said.replace(named, str(tmp_path / named)), src
        assert not (tmp_path / dst).exists(), src


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks")
def test_sharded_outputs_refused_up_front_like_python(tmp_path, squant_bin: str) -> None:
    """A symlink to an empty directory, '.' and the current directory by any
    other name as the sharded output: one clear message from both CLIs
    before any work, nothing changed (they failed at the end with 'Not a
    directory' / 'Invalid argument', or replaced the current directory)."""
    _sharded_input(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    (tmp_path / "lnk").symlink_to("empty")
    (tmp_path / "cwd").mkdir()
    for out, cwd, why in (
        ("lnk", tmp_path, "is a symbolic link"),
        # What tab completion gives: "lnk/" follows the link in a plain
        # lstat, so every shard was written before "Not a directory: lnk/".
        ("lnk/", tmp_path, "is a symbolic link"),
        ("lnk//", tmp_path, "is a symbolic link"),
        (".", tmp_path / "cwd", "names the current or a parent directory"),
        ("./", tmp_path / "cwd", "names the current or a parent directory"),
        ("..", tmp_path / "cwd", "names the current or a parent directory"),
        # The current directory by another name: it was renamed over, the
        # caller left in a deleted directory.
        (str(tmp_path / "cwd"), tmp_path / "cwd", "names the current or a parent directory"),
        ("../cwd/", tmp_path / "cwd", "names the current or a parent directory"),
    ):
        p, r = _both(squant_bin, "quantize", "-q", str(tmp_path / "ck"), out, cwd=cwd)
        _same_message(p, r)
        assert r.returncode == 2 and why in _message(r.stderr), out
    assert sorted(os.listdir(tmp_path)) == ["ck", "cwd", "empty", "lnk"]
    assert (tmp_path / "lnk").is_symlink()
    assert os.listdir(tmp_path / "empty") == os.listdir(tmp_path / "cwd") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS")
def test_huge_header_refused_in_bounded_memory(tmp_path, squant_bin: str) -> None:
    """A 40 MB header (the limit is 100 MiB) whose tensor lists 20 M
    dimensions: both CLIs refuse it in one line, the Rust one under a 1 GiB
    address-space limit. The header was parsed into a generic JSON tree
    (2.4 GB) and parsed again, and the Rust CLI aborted under the limit
    ('memory allocation of ... bytes failed', SIGABRT)."""
    import resource

    n = 20_000_000
    header = b'{"a":{"dtype":"U8","shape":[' + b"1," * (n - 1) + b'1],"data_offsets":[0,1]}}'
    header += b" " * (-len(header) % 8)
    src = tmp_path / "dims.safetensors"
    src.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    said = f"{src}: tensor 'a' has {n} dimensions; squant-rs handles at most 64\n"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    out = tmp_path / "out.safetensors"
    for argv in (["info", str(src)], ["quantize", str(src), str(out)]):
        r = subprocess.run(
            [squant_bin, *argv], capture_output=True, text=True, timeout=300, preexec_fn=limit
        )
        assert r.returncode == 2 and _message(r.stderr) == said, (argv, r.stderr[-500:])
        p = _py(*argv)
        assert p.returncode == 2 and _message(p.stderr) == said, argv
    assert sorted(os.listdir(tmp_path)) == ["dims.safetensors"]


def test_oversized_index_refused_like_python(tmp_path, squant_bin: str) -> None:
    """An index over 100 MiB (the header limit) is refused before it is
    read, in the same words by both CLIs (it was read whole: a sparse 1 GiB
    index cost 1 GB)."""
    ck = tmp_path / "ck"
    _sharded_input(ck)
    index = ck / "model.safetensors.index.json"
    os.truncate(index, (100 << 20) + 1)
    said = (
        f"{index}: not a safetensors index ({(100 << 20) + 1} bytes: more than the 100 MiB "
        "an index may have)\n"
    )
    for argv in (["info", str(ck)], ["quantize", str(ck), str(tmp_path / "out")]):
        p, r = _both(squant_bin, *argv)
        _same_message(p, r)
        assert r.returncode == 2 and _message(r.stderr) == said, argv
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_sharded_write_error_names_the_output_shard(tmp_path, squant_bin: str) -> None:
    """A write error in a sharded run names OUT/SHARD, not the temporary
    directory (whose name held the PID, so the CLIs' messages differed)."""
    import resource

    _sharded_input(tmp_path / "ck", 512, 4096)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    p, r = _both(squant_bin, "quantize", "-q", "ck", "out", cwd=tmp_path, preexec_fn=limit)
    _same_message(p, r)
    assert _message(r.stderr) == "File too large: out/s0.safetensors\n"
    assert os.listdir(tmp_path) == ["ck"]


@pytest.mark.parametrize("length", [128, 384, 0x10080])
def test_header_length_starting_with_pickle_byte_is_safetensors(
    tmp_path, squant_bin: str, length: int
) -> None:
    """A safetensors header of 128, 384, ... bytes: the file starts with
    0x80, a pickle's first byte, and both CLIs took it for a torch
    checkpoint (the Rust one refused it, the Python one loaded it with
    torch.load); it is quantized as safetensors, the same file by both."""
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    header = {"fc.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, w.nbytes]}}
    text = json.dumps(header).encode()
    assert len(text) <= length
    src = tmp_path / "in.safetensors"
    src.write_bytes(length.to_bytes(8, "little") + text.ljust(length) + w.tobytes())
    assert src.read_bytes()[:1] == b"\x80"
    py_out, rs_out = tmp_path / "py.safetensors", tmp_path / "rs.safetensors"
    p = _py("quantize", str(src), str(py_out))
    r = _run(squant_bin, "quantize", str(src), str(rs_out))
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert "(torch)" not in p.stdout
    assert py_out.read_bytes() == rs_out.read_bytes()
    assert [(t.name, t.bits) for t in inspect_quantized(py_out).tensors] == [("fc.weight", 4)]


def test_quantized_names_that_clash_refused_like_python(tmp_path, squant_bin: str) -> None:
    """`w` and `w:codes` both quantized (--include '*'): both CLIs wrote the
    same file, which info and load_quantized then rejected; now both refuse
    in the same words before writing anything."""
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    raw = RawTensor.from_numpy(w)
    write_safetensors(tmp_path / "in.safetensors", {"w": raw, "w:codes": raw})
    p, r = _both(
        squant_bin, "quantize", "in.safetensors", "q.safetensors", "--include", "*", cwd=tmp_path
    )
    _same_message(p, r)
    assert r.returncode == 2
    assert _message(r.stderr) == (
        "cannot quantize 'w': the state dict already has a tensor named 'w:codes'\n"
    )
    assert os.listdir(tmp_path) == ["in.safetensors"]
    # `w:codes` alone quantized clashes with nothing: the same file, valid.
    p = _py(
        "quantize",
        str(tmp_path / "in.safetensors"),
        str(tmp_path / "p.safetensors"),
        "--include",
        "w:*",
    )
    r = _run(
        squant_bin,
        "quantize",
        str(tmp_path / "in.safetensors"),
        str(tmp_path / "r.safetensors"),
        "--include",
        "w:*",
    )
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    assert [t.name for t in inspect_quantized(tmp_path / "r.safetensors").quantized] == ["w:codes"]
    p, r = _both(squant_bin, "info", "--verify", "r.safetensors", cwd=tmp_path)
    assert p.returncode == r.returncode == 0 and p.stdout == r.stdout


def test_empty_input_tensor_with_a_huge_shape_refused_like_python(
    tmp_path, squant_bin: str
) -> None:
    """A plain input holding a tensor of shape [0, 2^63] was quantized by
    both CLIs into a file load_quantized could not read (torch TypeError)."""
    w = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    header = {
        "fc.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, w.nbytes]},
        "z.weight": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [w.nbytes, w.nbytes]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "in.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + w.tobytes())
    p, r = _both(squant_bin, "quantize", "in.safetensors", "q.safetensors", cwd=tmp_path)
    _same_message(p, r)
    assert r.returncode == 2
    assert _message(r.stderr) == (
        "in.safetensors: corrupt header: tensor 'z.weight' has a shape too large to load"
        " ([0, 9223372036854775808])\n"
    )
    assert os.listdir(tmp_path) == ["in.safetensors"]


def test_info_verify_without_checksums_like_python(tmp_path, squant_bin: str) -> None:
    """info --verify said "every checksum, code, scale and zero point" of a
    file without checksums (or a sharded directory with a shard without)."""
    _checkpoint(tmp_path / "in.safetensors")
    p = _py("quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "q.safetensors"))
    assert p.returncode == 0, p.stderr
    tensors, meta = read_safetensors(tmp_path / "q.safetensors")
    del meta["checksums"]
    write_safetensors(tmp_path / "old.safetensors", tensors, meta)
    p, r = _both(squant_bin, "info", "--verify", "old.safetensors", cwd=tmp_path)
    assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
    assert p.stdout == r.stdout
    assert (
        "verified              every code, scale and zero point (no checksums in this file)\n"
        in (r.stdout)
    )
    assert "checksum," not in r.stdout
    # A sharded directory, one of its two shards without checksums.
    ck = tmp_path / "ck"
    ck.mkdir()
    w = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float32)
    for j in range(2):
        write_safetensors(ck / f"s{j}.safetensors", {f"l{j}.weight": RawTensor.from_numpy(w)})
    index = {"weight_map": {f"l{j}.weight": f"s{j}.safetensors" for j in range(2)}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    p = _py("quantize", str(ck), str(tmp_path / "qs"))
    assert p.returncode == 0, p.stderr
    # One shard without checksums, then (... and with neither shard's
    # checksums, no checksum was verified) both.
    for shard, said in (
        ("s1.safetensors", "and the checksums of the shards that have them (not all do)\n"),
        ("s0.safetensors", "every code, scale and zero point (no checksums in these shards)\n"),
    ):
        tensors, meta = read_safetensors(tmp_path / "qs" / shard)
        del meta["checksums"]
        os.remove(tmp_path / "qs" / shard)
        write_safetensors(tmp_path / "qs" / shard, tensors, meta)
        p, r = _both(squant_bin, "info", "--verify", "qs", cwd=tmp_path)
        assert p.returncode == r.returncode == 0, (p.stderr, r.stderr)
        assert p.stdout == r.stdout
        assert said in r.stdout
    p, r = _both(squant_bin, "info", "--verify", "q.safetensors", cwd=tmp_path)
    assert p.stdout == r.stdout
    assert "verified              every checksum, code, scale and zero point\n" in r.stdout


# --------------------------------------------------------------------------
# Output safety under faults, signals and mount points (both CLIs: the
# Python CLI writes safetensors and sharded outputs through the same Rust
# code).

#: An LD_PRELOAD shim: FAULT_FSYNC_DIR=errno makes fsync(2) of a directory
#: fail, FAULT_RENAME_DIR=errno rename(2) of a directory, FAULT_RENAME_TO=NAME
#: a rename(2) whose destination ends in "/NAME".
_FAULT_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int rename(const char *a, const char *b) {
    static int (*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "rename");
    const char *e = getenv("FAULT_RENAME_DIR");
    struct stat st;
    if (e && stat(a, &st) == 0 && S_ISDIR(st.st_mode)) { errno = atoi(e); return -1; }
    const char *to = getenv("FAULT_RENAME_TO");
    if (to) {
        size_t n = strlen(b), k = strlen(to);
        if (n > k && b[n - k - 1] == '/' && strcmp(b + n - k, to) == 0) {
            errno = EDQUOT;
            return -1;
        }
    }
    return real(a, b);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    struct stat st;
    const char *e = getenv("FAULT_FSYNC_DIR");
    if (e && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) { errno = atoi(e); return -1; }
    return real(fd);
}
"""


@pytest.fixture(scope="session")
def fault_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shim above, built (Linux with a C compiler only)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not sys.platform.startswith("linux") or cc is None:
        pytest.skip("needs Linux and a C compiler for the LD_PRELOAD fault shim")
    d = tmp_path_factory.mktemp("fault")
    (d / "fault.c").write_text(_FAULT_C)
    r = subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-o", str(d / "fault.so"), str(d / "fault.c"), "-ldl"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot build the fault shim: {r.stderr}")
    return str(d / "fault.so")


def _faulty(lib: str, **faults: str) -> dict[str, str]:
    return {**os.environ, "LD_PRELOAD": lib, **faults}


def test_directory_sync_error_after_the_rename(tmp_path, squant_bin: str, fault_lib: str) -> None:
    """EIO from the sync of the output's directory, after the rename: the
    new file is in place with the replaced file's mode, and the error says
    the output was written (the Rust CLI set the mode after the rename, so
    the file was left 0644, and both CLIs said only 'Input/output error')."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    outs = []
    for name, argv in (("rs", [squant_bin]), ("py", [sys.executable, "-m", "squant_rs"])):
        d = tmp_path / name
        d.mkdir()
        out = d / "out.safetensors"
        out.write_bytes(b"OLD")
        out.chmod(0o600)
        r = subprocess.run(
            [*argv, "quantize", "-q", str(src), str(out)],
            capture_output=True,
            text=True,
            env=_faulty(fault_lib, FAULT_FSYNC_DIR="5"),
        )
        assert r.returncode == 2, (argv, r.stderr)
        assert _message(r.stderr) == (
            "the output was written, but its directory could not be synced to disk "
            f"(Input/output error), so a crash may still undo it: {out}\n"
        ), argv
        assert out.read_bytes() != b"OLD", argv
        assert stat_mode(out) == 0o600, argv
        assert os.listdir(d) == ["out.safetensors"], argv
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert inspect_quantized(tmp_path / "rs" / "out.safetensors").tensors


@pytest.mark.skipif(
    os.name == "nt" or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="changing a file's owner needs root",
)
def test_replaced_file_keeps_owner_and_mode(tmp_path, squant_bin: str) -> None:
    """A replaced output keeps its owner, group and mode with both CLIs (the
    Rust CLI kept only the mode, and set it after the rename)."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        out = tmp_path / "out.safetensors"
        out.write_bytes(b"OLD")
        os.chown(out, 1234, 5678)
        out.chmod(0o640)
        r = subprocess.run([*argv, "quantize", "-q", str(src), str(out)], capture_output=True)
        assert r.returncode == 0, (argv, r.stderr)
        st = out.stat()
        assert (st.st_uid, st.st_gid, stat_mode(out)) == (1234, 5678, 0o640), argv
        assert out.read_bytes() != b"OLD"
        out.unlink()


def _hidden(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("."))


def _many_shards(src: Path, shards: int, rows: int, cols: int) -> None:
    src.mkdir()
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(shards):
        name = f"s{s:03d}.safetensors"
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        write_safetensors(src / name, {f"l{s}.weight": RawTensor.from_numpy(w)})
        weight_map[f"l{s}.weight"] = name
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_sharded_signal_at_any_time_leaves_nothing(tmp_path, squant_bin: str) -> None:
    """SIGINT / SIGTERM at random moments of a sharded run: no temporary
    directory left, the output either absent or complete, and the run ends
    as interrupted or (too late to stop it) as a success. (The signal
    thread removed the temporary directory while the writer thread went on
    creating shards in it: the directory was often left behind.)"""
    import random

    _many_shards(tmp_path / "ck", 40, 64, 1024)
    work = tmp_path / "w"
    work.mkdir()
    argv = [squant_bin, "quantize", "-q", "--threads", "2", str(tmp_path / "ck"), str(work / "o")]
    for _ in range(2):  # the second run timed (warm caches)
        t = time.monotonic()
        assert subprocess.run(argv, capture_output=True).returncode == 0
        full = time.monotonic() - t
        shutil.rmtree(work / "o")
    rng = random.Random(0)
    runs, stop = 0, time.monotonic() + 4
    while runs < 10 or time.monotonic() < stop:
        sig = rng.choice([signal.SIGINT, signal.SIGTERM])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0, full))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        runs += 1
        # (An error the clean-up caused, say a shard removed under the
        # writer, was reported with status 2.)
        assert proc.returncode in (0, 130, -sig), (proc.returncode, err)
        assert _hidden(work) == [], (runs, proc.returncode)
        if (work / "o").exists():
            # Complete: the signal came after the rename.
            assert len(os.listdir(work / "o")) == 41
            shutil.rmtree(work / "o")
        assert os.listdir(work) == []


@pytest.mark.skipif(not os.path.exists("/proc/sys/kernel/ns_last_pid"), reason="Linux PIDs")
def test_sharded_stale_temporary_directory_of_the_same_pid(tmp_path, squant_bin: str) -> None:
    """A temporary directory left by a killed run whose PID the next run
    gets (in a container every run gets the same PIDs): the run succeeds.
    (The name held only the PID: 'File exists: OUT', with OUT absent.)"""
    _sharded_input(tmp_path / "ck")
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        d = tmp_path / ("rs" if argv == [squant_bin] else "py")
        d.mkdir()
        # The old names, for every PID the run may get.
        last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
        for pid in range(last + 1, last + 1500):
            (d / f".out.{pid:08x}.tmp").mkdir()
            (d / f".out.{pid:08x}.tmp" / "s0.safetensors").write_bytes(b"stale")
        before = _hidden(d)
        r = subprocess.run(
            [*argv, "quantize", "-q", str(tmp_path / "ck"), str(d / "out")],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, (argv, r.stderr)
        assert sorted(os.listdir(d / "out")) == ["model.safetensors.index.json", "s0.safetensors"]
        assert _hidden(d) == before


def test_sharded_failed_rename_keeps_the_empty_output_directory(
    tmp_path, squant_bin: str, fault_lib: str
) -> None:
    """The final rename fails (EDQUOT): the user's empty output directory is
    still there, with its mode, and nothing else is left (it was removed
    before the rename). A successful run keeps its mode too."""
    _sharded_input(tmp_path / "ck")
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        out = tmp_path / "out"
        out.mkdir()
        out.chmod(0o750)
        r = subprocess.run(
            [*argv, "quantize", "-q", "ck", "out"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=_faulty(fault_lib, FAULT_RENAME_DIR="122"),
        )
        assert r.returncode == 2 and _message(r.stderr) == "Disk quota exceeded: out\n", argv
        assert sorted(os.listdir(tmp_path)) == ["ck", "out"], argv
        assert os.listdir(out) == [] and stat_mode(out) == 0o750, argv
        r = subprocess.run(
            [*argv, "quantize", "-q", "ck", "out"], capture_output=True, cwd=tmp_path
        )
        assert r.returncode == 0, (argv, r.stderr)
        assert stat_mode(out) == 0o750, argv
        shutil.rmtree(out)


@pytest.fixture(scope="session")
def mount_namespace() -> None:
    """Skips unless mounts can be made in a private mount namespace (root,
    `unshare -m`): they vanish with it."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs Linux, root and unshare")
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip("cannot mount in a private mount namespace")


@pytest.mark.parametrize("how", ["tmpfs", "bind"])
def test_sharded_output_on_a_mount_point(
    tmp_path, squant_bin: str, fault_lib: str, mount_namespace: None, how: str
) -> None:
    """An empty output directory that is a mount point (another file system,
    or a bind mount of the same one: `docker -v host/out:/out`): the output
    is written into it, the same files as elsewhere; a failure while moving
    its files in (the index last) leaves it empty. (Every shard was written
    next to it, then the run failed: 'Device or resource busy: OUT'.)"""
    _sharded_input(tmp_path / "ck")
    ref = subprocess.run([squant_bin, "quantize", "-q", "ck", "ref"], cwd=tmp_path)
    assert ref.returncode == 0
    (tmp_path / "host").mkdir()
    mount = (
        "mount -t tmpfs -o mode=0751 tmpfs out"
        if how == "tmpfs"
        else "mount --bind host out && chmod 0751 out"
    )
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        for d in ("out", "saved", "failed"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)
            (tmp_path / d).mkdir()
        cli = " ".join(f"'{a}'" for a in argv)
        fault = f"LD_PRELOAD={fault_lib} FAULT_RENAME_TO=model.safetensors.index.json"
        script = (
            f"{mount} || exit 99\n"
            f"{fault} {cli} quantize -q ck out 2> failed/err\n"
            "echo $? > failed/rc; ls -A out > failed/ls\n"
            f"{cli} quantize -q ck out || exit $?\n"
            "stat -c %a out > saved/mode; cp -a out/. saved/\n"
        )
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, (argv, r.stderr)
        assert (tmp_path / "failed" / "rc").read_text() == "2\n", argv
        err = (tmp_path / "failed" / "err").read_text()
        assert _message(err) == "Disk quota exceeded: out/model.safetensors.index.json\n", argv
        assert (tmp_path / "failed" / "ls").read_text() == "", argv
        saved = tmp_path / "saved"
        assert (saved / "mode").read_text() == "751\n"
        (saved / "mode").unlink()
        assert sorted(os.listdir(saved)) == sorted(os.listdir(tmp_path / "ref")), argv
        for n in os.listdir(saved):
            assert (saved / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), (argv, n)
        # nothing was written next to it
        assert sorted(os.listdir(tmp_path)) == ["ck", "failed", "host", "out", "ref", "saved"]
        assert os.listdir(tmp_path / "out") == []
        # bind: what was written in the mount point is in the bound directory
        host = sorted(os.listdir(tmp_path / "host"))
        assert host == (sorted(os.listdir(tmp_path / "ref")) if how == "bind" else []), argv
        shutil.rmtree(tmp_path / "host")
        (tmp_path / "host").mkdir()


def test_sharded_output_killed_on_a_mount_point_does_not_block_the_next_run(
    tmp_path, squant_bin: str, mount_namespace: None
) -> None:
    """A run into an empty mount point (built in place) killed by SIGKILL
    leaves its temporary directory inside the output directory: the next run
    removes it and writes the output. (Every later run, with either CLI, was
    refused: 'output directory exists and is not empty: out', nothing
    visible in it.)"""
    _sharded_input(tmp_path / "ck")
    assert subprocess.run([squant_bin, "quantize", "-q", "ck", "ref"], cwd=tmp_path).returncode == 0
    (tmp_path / "host").mkdir()
    kill = (
        "import os, signal, squant_rs; squant_rs.quantize_checkpoint('ck', 'out', 4, "
        "progress=lambda *a: os.kill(os.getpid(), signal.SIGKILL))"
    )
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        (tmp_path / "log").mkdir()
        cli = " ".join(f"'{a}'" for a in argv)
        script = (
            "mount --bind host out || exit 99\n"
            f"'{sys.executable}' -c \"{kill}\"; echo $? > log/rc; ls -A out > log/left\n"
            f"{cli} quantize -q ck out 2> log/err; echo $? > log/rc2\n"
            "ls -A out > log/ls\n"
        )
        (tmp_path / "out").mkdir()
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, (argv, r.stderr)
        log = tmp_path / "log"
        assert (log / "rc").read_text() == f"{128 + signal.SIGKILL}\n"
        left = (log / "left").read_text().split()
        assert len(left) == 1 and left[0].startswith(".out."), left  # the killed run's
        assert (log / "err").read_text() == "", argv
        assert (log / "rc2").read_text() == "0\n", argv
        assert (log / "ls").read_text().split() == sorted(os.listdir(tmp_path / "ref")), argv
        for n in os.listdir(tmp_path / "ref"):
            ref = (tmp_path / "ref" / n).read_bytes()
            assert (tmp_path / "host" / n).read_bytes() == ref, (argv, n)
        for d in ("host", "out", "log"):
            shutil.rmtree(tmp_path / d)
        (tmp_path / "host").mkdir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock(2) on a directory")
def test_sharded_output_directory_is_locked_while_checked(tmp_path, squant_bin: str) -> None:
    """A run checks an existing output directory and makes its temporary
    directory under an exclusive lock on the output directory, so two runs
    started at the same instant into one mount point cannot both find it
    empty (the reviewer saw both succeed, the second replacing the first's
    files, in 3 of 300 tries): while another process holds that lock the
    run waits, creating nothing, and goes on once it is released."""
    import fcntl
    import time

    _sharded_input(tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        run = subprocess.Popen([squant_bin, "quantize", "-q", "ck", "out"], cwd=tmp_path)
        time.sleep(0.5)
        assert run.poll() is None
        assert sorted(os.listdir(tmp_path)) == ["ck", "out"] and os.listdir(out) == []
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert run.wait(timeout=60) == 0
    finally:
        os.close(fd)
    assert "model.safetensors.index.json" in os.listdir(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock(2) on a directory")
def test_sharded_temporary_directory_inside_the_output(tmp_path, squant_bin: str) -> None:
    """The output directory holds only the temporary directory of a run
    that was killed while building it in place (say a mount point, seen
    here without the mount): it is removed and the output written. One
    that another run holds (locked) is named; anything else in the
    directory still makes it 'not empty', and nothing is removed. (Both
    CLIs said 'output directory exists and is not empty' for each.)"""
    import fcntl

    _sharded_input(tmp_path / "ck")
    out = tmp_path / "out"
    left = out / ".out.0123456789ab.tmp"
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        left.mkdir(parents=True)
        (left / "s0.safetensors").write_bytes(b"partial")
        r = subprocess.run(
            [*argv, "quantize", "-q", "ck", "out"], capture_output=True, text=True, cwd=tmp_path
        )
        assert r.returncode == 0, (argv, r.stderr)
        assert sorted(os.listdir(out)) == ["model.safetensors.index.json", "s0.safetensors"]
        shutil.rmtree(out)
        left.mkdir(parents=True)
        fd = os.open(left, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # this process is the other run
            r = subprocess.run(
                [*argv, "quantize", "-q", "ck", "out"],
                capture_output=True,
                text=True,
                cwd=tmp_path,
            )
        finally:
            os.close(fd)
        assert r.returncode == 2, (argv, r.stderr)
        assert _message(r.stderr) == (
            "output directory is being written by another run (its temporary directory "
            ".out.0123456789ab.tmp is in use): out\n"
        ), argv
        assert os.listdir(out) == [left.name]
        (out / "notes.txt").write_text("mine")
        r = subprocess.run(
            [*argv, "quantize", "-q", "ck", "out"], capture_output=True, text=True, cwd=tmp_path
        )
        assert r.returncode == 2, (argv, r.stderr)
        assert _message(r.stderr) == "output directory exists and is not empty: out\n", argv
        assert sorted(os.listdir(out)) == [left.name, "notes.txt"]
        shutil.rmtree(out)


@pytest.mark.skipif(
    os.name == "nt"
    or not hasattr(os, "geteuid")
    or os.geteuid() != 0
    or not shutil.which("setpriv"),
    reason="dropping CAP_DAC_OVERRIDE needs root and setpriv",
)
def test_sharded_output_directory_in_a_directory_that_is_not_writable(
    tmp_path, squant_bin: str
) -> None:
    """An existing empty output directory the user may write in, inside a
    directory they may not write in (root without CAP_DAC_OVERRIDE: the
    permission bits apply): the output is built in place, as on a mount
    point; a missing one cannot be made, and that is said. (Both CLIs failed
    with 'Permission denied: OUT', though OUT was writable: the temporary
    directory is made in its parent.)"""
    _sharded_input(tmp_path / "ck")
    assert subprocess.run([squant_bin, "quantize", "-q", "ck", "ref"], cwd=tmp_path).returncode == 0
    caps = "-dac_override,-dac_read_search"
    drop = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]

    def quantize(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*drop, *argv, "quantize", "-q", "ck", "ro/out"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    ro, out = tmp_path / "ro", tmp_path / "ro" / "out"
    ro.mkdir()
    try:
        for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
            out.mkdir()
            out.chmod(0o750)
            ro.chmod(0o555)
            r = quantize(argv)
            assert r.returncode == 0, (argv, r.stderr)
            assert os.listdir(ro) == ["out"] and stat_mode(out) == 0o750, argv
            assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref")), argv
            for n in os.listdir(out):
                assert (out / n).read_bytes() == (tmp_path / "ref" / n).read_bytes(), (argv, n)
            ro.chmod(0o755)
            shutil.rmtree(out)
            ro.chmod(0o555)
            r = quantize(argv)
            assert r.returncode == 2, (argv, r.stderr)
            assert _message(r.stderr) == "Permission denied: ro/out\n", argv
            assert os.listdir(ro) == [], argv
            ro.chmod(0o755)
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(
    os.name == "nt"
    or not hasattr(os, "geteuid")
    or os.geteuid() != 0
    or not shutil.which("setpriv"),
    reason="dropping CAP_FSETID needs root and setpriv",
)
@pytest.mark.parametrize("mode", [0o4755, 0o2775, 0o6755])
def test_replaced_file_keeps_set_id_bits_without_cap_fsetid(
    tmp_path, squant_bin: str, mode: int
) -> None:
    """A writer without CAP_FSETID (any user but root) clears a file's
    set-user-ID / set-group-ID bits when it writes to it: the Rust CLI set
    the mode before writing the temporary file and left 755 / 775; both
    CLIs keep the replaced file's mode."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    drop = ["setpriv", "--inh-caps=-fsetid", "--bounding-set=-fsetid"]
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        out = tmp_path / "out.safetensors"
        out.write_bytes(b"OLD")
        out.chmod(mode)
        r = subprocess.run(
            [*drop, *argv, "quantize", "-q", str(src), str(out)], capture_output=True
        )
        assert r.returncode == 0, (argv, r.stderr)
        assert out.stat().st_mode & 0o7777 == mode, argv
        assert out.read_bytes() != b"OLD"
        out.unlink()


def test_long_output_names_like_python(tmp_path, squant_bin: str) -> None:
    """An output whose name is legal (252 bytes) but whose temporary name
    would not be: the Python CLI shortened its temporary name and wrote the
    file, the Rust CLI failed with 'File name too long' naming the output;
    both write it now, the same bytes, and a sharded output directory too."""
    src = tmp_path / "in.safetensors"
    _checkpoint(src)
    outs = []
    for tag, argv in (("p", [sys.executable, "-m", "squant_rs"]), ("r", [squant_bin])):
        out = tmp_path / (tag * 240 + ".safetensors")
        r = _run(*argv, "quantize", "-q", str(src), str(out))
        assert r.returncode == 0, (argv, r.stderr)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    ck = tmp_path / "ck"
    ck.mkdir()
    write_safetensors(
        ck / "s0.safetensors",
        {"l.weight": RawTensor.from_numpy(np.ones((4, 8), np.float32))},
    )
    (ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"l.weight": "s0.safetensors"}})
    )
    for tag, argv in (("q", [sys.executable, "-m", "squant_rs"]), ("s", [squant_bin])):
        out = tmp_path / (tag * 250)
        r = _run(*argv, "quantize", "-q", str(ck), str(out))
        assert r.returncode == 0, (argv, r.stderr)
        assert sorted(os.listdir(out)) == ["model.safetensors.index.json", "s0.safetensors"]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def _file_size_limit() -> None:
    """``preexec_fn``: a 50 KiB file-size limit with SIGXFSZ's default
    action (what a shell's ``ulimit -f 50`` gives; Python itself starts
    with SIGXFSZ ignored, and children inherit that)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 1024, resource.RLIM_INFINITY))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file-size limit")
def test_file_size_limit_is_an_error_that_leaves_nothing(tmp_path, squant_bin: str) -> None:
    """Past `ulimit -f`, both CLIs report 'File too large' (status 2) and
    leave no partial or temporary file. (The Rust CLI was killed by SIGXFSZ,
    status 153, and left a partial .tmp file or temporary directory.)"""
    src = tmp_path / "in.safetensors"
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    write_safetensors(src, {"l.weight": RawTensor.from_numpy(w)})
    _sharded_input(tmp_path / "ck", rows=256, cols=1024)
    before = sorted(os.listdir(tmp_path))
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        for inp, out in (("in.safetensors", "q.safetensors"), ("ck", "qdir")):
            r = subprocess.run(
                [*argv, "quantize", "-q", inp, out],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                preexec_fn=_file_size_limit,
            )
            assert r.returncode == 2, (argv, inp, r.returncode, r.stderr)
            assert _message(r.stderr).startswith("File too large: "), (argv, r.stderr)
            assert sorted(os.listdir(tmp_path)) == before, (argv, inp)


def test_sharded_output_that_is_a_file_is_named_so(tmp_path, squant_bin: str) -> None:
    """A regular file given as the output directory of a sharded input is
    refused as not a directory (it was called 'not empty'), untouched."""
    _sharded_input(tmp_path / "ck")
    (tmp_path / "outfile").write_bytes(b"mine")
    for argv in ([squant_bin], [sys.executable, "-m", "squant_rs"]):
        r = subprocess.run(
            [*argv, "quantize", "-q", "ck", "outfile"], capture_output=True, text=True, cwd=tmp_path
        )
        assert r.returncode == 2, (argv, r.stderr)
        assert _message(r.stderr) == (
            "output directory exists and is not a directory: outfile\n"
        ), argv
        assert (tmp_path / "outfile").read_bytes() == b"mine"
