"""Output-file safety (``squant_rs.formats.output``) and the CLI's rough
edges: the output is never the input, special paths, signals, closed
pipes, escaped names, thread settings, help, sizes and timings."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import squant_rs
from squant_rs import InvalidArgumentError
from squant_rs.cli import OUTPUT_FORMATS, Progress, build_parser, main, printable
from squant_rs.formats.output import atomic_output, check_output
from squant_rs.formats.safetensors import RawTensor, write_safetensors

from conftest import default_signal_handlers

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

SQUANT_META = {
    "format": "squant-rs",
    "format_version": "1",
    "squant_rs_version": "0.1.0",
    "quantized": "{}",
}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(stderr: str, match: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("squant-rs: error: ") and match in lines[0], stderr


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "conv.bias": torch.randn(8),
        "fc.weight": torch.randn(4, 8),
        "fc.bias": torch.randn(4),
    }


@pytest.fixture()
def st_file(tmp_path) -> Path:
    path = tmp_path / "in.safetensors"
    safetensors_torch.save_file(_state_dict(), str(path))
    return path


@pytest.fixture()
def pt_file(tmp_path) -> Path:
    path = tmp_path / "in.pth"
    torch.save(_state_dict(), path)
    return path


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _is_squant_file(path: Path) -> bool:
    return len(squant_rs.formats.safetensors.inspect_quantized(path).quantized) == 2


# --------------------------------------------------------------------------
# 1. the output is never the input


def _alias(tmp_path: Path, src: Path, how: str) -> str:
    if how == "same":
        return str(src)
    if how == "dot":
        return os.path.join(".", os.path.relpath(src))
    if how == "absolute":
        return str(src.resolve())
    if how == "hardlink":
        os.link(src, tmp_path / "alias.safetensors")
        return str(tmp_path / "alias.safetensors")
    if how == "symlink":
        os.symlink(src.name, tmp_path / "alias.safetensors")
        return str(tmp_path / "alias.safetensors")
    raise AssertionError(how)  # pragma: no cover


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("how", ["same", "dot", "absolute", "hardlink", "symlink"])
def test_output_that_is_the_input_is_refused(
    tmp_path, capsys, monkeypatch, st_file, pt_file, kind: str, how: str
) -> None:
    monkeypatch.chdir(tmp_path)
    src = st_file if kind == "safetensors" else pt_file
    before = src.read_bytes()
    out = _alias(tmp_path, src, how)
    listing = sorted(os.listdir(tmp_path))
    rc, stdout, stderr = _run(capsys, "quantize", str(src), out)
    assert rc == 2 and stdout == ""
    _one_error_line(stderr, "is the same file as the input")
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file either


# --------------------------------------------------------------------------
# 2. special output paths


def test_symlinked_output_writes_the_target_and_keeps_the_link(
    tmp_path, capsys, umask_022, st_file
) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "model.safetensors"
    target.write_bytes(b"old")
    target.chmod(0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    rc, _, stderr = _run(capsys, "quantize", st_file, link, "-q")
    assert rc == 0, stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _is_squant_file(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(real_dir) == ["model.safetensors"]


def test_dangling_symlink_gets_its_target_created(tmp_path, capsys, st_file) -> None:
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "new.safetensors")
    rc, _, stderr = _run(capsys, "quantize", st_file, link, "-q")
    assert rc == 0, stderr
    assert link.is_symlink() and _is_squant_file(tmp_path / "new.safetensors")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_existing_output_keeps_its_permission_bits(
    tmp_path, capsys, umask_022, st_file, mode: int
) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    out.chmod(mode)
    rc, _, stderr = _run(capsys, "quantize", st_file, out, "-q")
    assert rc == 0, stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode and _is_squant_file(out)
    # A new file gets the usual 0o666 minus the umask.
    rc, _, _ = _run(capsys, "quantize", st_file, tmp_path / "new.safetensors", "-q")
    assert rc == 0 and stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o644


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_device_outputs_are_refused(tmp_path, capsys, st_file) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    rc, _, stderr = _run(capsys, "quantize", st_file, fifo)
    assert rc == 2
    _one_error_line(stderr, "is a FIFO; squant-rs writes regular files only")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # A link to a character device (/dev/null) is refused, link and device untouched.
    link = tmp_path / "null.safetensors"
    link.symlink_to(os.devnull)
    rc, _, stderr = _run(capsys, "quantize", st_file, link)
    assert rc == 2
    _one_error_line(stderr, "is a character device")
    assert link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(os.listdir(tmp_path)) == [
        "in.safetensors",
        "null.safetensors",
        "pipe.safetensors",
    ]
    with pytest.raises(InvalidArgumentError, match="character device"):
        check_output(os.devnull)
    # The Python API goes through the same helper.
    with pytest.raises(InvalidArgumentError, match="FIFO"):
        squant_rs.save_quantized(_state_dict(), fifo)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anything"
)
def test_read_only_output_is_refused(tmp_path, capsys, st_file) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o444)
    rc, _, stderr = _run(capsys, "quantize", st_file, out)
    assert rc == 2
    _one_error_line(stderr, "Permission denied")
    assert out.read_bytes() == b"old"


def test_atomic_output_api(tmp_path) -> None:
    target = tmp_path / "a.bin"
    with atomic_output(target) as f:
        f.write(b"hello")
        assert not target.exists()  # nothing visible before the end
    assert target.read_bytes() == b"hello"
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"hello" and os.listdir(tmp_path) == ["a.bin"]
    with pytest.raises(InvalidArgumentError, match="same file as the input"):
        with atomic_output(target, inputs=[target]):
            raise AssertionError("not reached")  # pragma: no cover
    with pytest.raises(IsADirectoryError):
        check_output(tmp_path)
    with pytest.raises(FileNotFoundError):
        check_output(tmp_path / "missing" / "x.bin")


# --------------------------------------------------------------------------
# 3. signals during the write

SIGNAL_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from squant_rs.formats.output import atomic_output
    if {user_handler}:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
    try:
        with atomic_output(sys.argv[1]) as f:
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("sig", "user_handler", "status"),
    [
        ("SIGTERM", False, -signal.SIGTERM),
        ("SIGHUP", False, -getattr(signal, "SIGHUP", 1)),
        ("SIGINT", False, 130),
        ("SIGTERM", True, 3),  # the program's own handler is kept
    ],
)
def test_signal_during_write_removes_the_temporary_file(
    tmp_path, sig: str, user_handler: bool, status: int
) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    code = SIGNAL_SCRIPT.format(user_handler=user_handler)
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signal_handlers,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "writing\n"
        assert len(os.listdir(tmp_path)) == 2  # the temporary file exists now
        p.send_signal(getattr(signal, sig))
        _, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == status, stderr
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert out.read_bytes() == b"old"


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from squant_rs.formats.safetensors import RawTensor, write_safetensors
    tensors = {"a": RawTensor.from_numpy(np.ones(4, np.float32))}
    def slow(a, *args, **kwargs):  # the writer's per-tensor step: stall in the middle
        print("writing", flush=True)
        time.sleep(60)
    np.ascontiguousarray = slow
    write_safetensors(sys.argv[1], tensors)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_write_safetensors_removes_the_temporary_file(tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "writing\n"
        assert len(os.listdir(tmp_path)) == 1  # the temporary file
        p.terminate()
        p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGTERM
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# 9. one clean line instead of a traceback


def _cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "squant_rs", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kw,
    )


def test_info_with_lone_surrogates_is_clean(tmp_path) -> None:
    # A lone surrogate cannot be UTF-8: no squant-rs writer produces such a
    # name (write_safetensors refuses it), and the Rust reader reports a file
    # whose JSON header escapes one (as Python's json module writes it) in
    # one clean line.
    path = tmp_path / "s.safetensors"
    meta = dict(SQUANT_META, squant_rs_version="0.1\ud800")
    header = {
        "__metadata__": meta,
        "a\ud800b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
    }
    _raw_safetensors(path, header, b"\0" * 12)
    p = _cli("info", str(path))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "not valid Unicode (a lone surrogate)" in p.stderr
    with pytest.raises(squant_rs.InvalidArgumentError, match="UTF-8"):
        write_safetensors(path, {"a\ud800b": RawTensor.from_numpy(np.zeros(3, np.float32))})


def test_weight_of_more_than_64_dims(tmp_path, capsys) -> None:
    src = tmp_path / "big.safetensors"
    header = {"x.weight": {"dtype": "F32", "shape": [2] + [1] * 65, "data_offsets": [0, 8]}}
    _raw_safetensors(src, header, b"\0" * 8)
    rc, _, stderr = _run(capsys, "quantize", src, tmp_path / "o.safetensors")
    assert rc == 2
    _one_error_line(stderr, "'x.weight' has 66 dimensions; squant-rs handles at most 64")


def test_checkpoint_with_a_meta_tensor(tmp_path, capsys) -> None:
    src = tmp_path / "meta.pth"
    torch.save({"w.weight": torch.empty(4, 4, device="meta")}, src)
    rc, _, stderr = _run(capsys, "quantize", src, tmp_path / "o.safetensors")
    assert rc == 2
    _one_error_line(stderr, "'w.weight' is a meta tensor")
    assert sorted(os.listdir(tmp_path)) == ["meta.pth"]


# --------------------------------------------------------------------------
# 10. escaped names and metadata


def test_info_escapes_control_characters(tmp_path, capsys) -> None:
    path = tmp_path / "e.safetensors"
    names = ["title\x1b]0;TITLE\x07", "two\nlines", "bell\x07\tand tab", "plain"]
    meta = dict(SQUANT_META, squant_rs_version="\x1b[31mred")
    write_safetensors(path, {n: RawTensor.from_numpy(np.zeros(2, np.float32)) for n in names}, meta)
    rc, out, err = _run(capsys, "info", path)
    assert rc == 0, err
    assert not any(c in out for c in "\x1b\x07\t\r")
    assert "title\\x1b]0;TITLE\\x07" in out and "two\\nlines" in out and "\\x1b[31mred" in out
    table = out.split("\n\n", 1)[1].splitlines()
    assert len(table) == 2 + len(names)  # header, rule, one line per tensor
    assert printable("ok é\u2028") == "ok é\\u2028"


def test_verbose_quantize_escapes_names(tmp_path, capsys) -> None:
    src = tmp_path / "in.safetensors"
    names = ["evil\x1b[2J\nname.weight", "plain.weight"]
    write_safetensors(src, {n: RawTensor.from_numpy(np.ones((4, 3), np.float32)) for n in names})
    rc, out, err = _run(capsys, "quantize", src, tmp_path / "out.safetensors", "-v")
    assert rc == 0, err
    assert "\x1b" not in out
    rows = [line for line in out.splitlines() if "name.weight" in line]
    assert len(rows) == 1 and "evil\\x1b[2J\\nname.weight" in rows[0]


def test_progress_bar_escapes_names() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    Progress(stream)(0, 1, "evil\x1b]0;TITLE\x07\nname")
    text = stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text
    assert "evil\\x1b]0;TITLE\\x07\\nname" in text


# --------------------------------------------------------------------------
# 12. --threads and SQUANT_NUM_THREADS


def test_threads_option_overrides_a_bad_environment(tmp_path, capsys, monkeypatch, st_file):
    monkeypatch.setenv("SQUANT_NUM_THREADS", "bad")
    out = tmp_path / "out.safetensors"
    rc, _, stderr = _run(capsys, "quantize", st_file, out, "--threads", "2", "-q")
    assert rc == 0, stderr
    assert _is_squant_file(out)
    assert os.environ["SQUANT_NUM_THREADS"] == "bad"  # restored after the command


def test_bad_thread_environment_is_reported_as_such(tmp_path, capsys, monkeypatch, st_file):
    monkeypatch.setenv("SQUANT_NUM_THREADS", "bad")
    rc, _, stderr = _run(capsys, "quantize", st_file, tmp_path / "out.safetensors")
    assert rc == 2
    _one_error_line(stderr, "bad SQUANT_NUM_THREADS environment variable")
    assert "--threads N" in stderr and "weight" not in stderr and "corrupt" not in stderr
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]


def test_bad_thread_environment_in_every_threaded_command(tmp_path, capsys, monkeypatch, st_file):
    """demo, ONNX quantize and info --verify refuse a bad SQUANT_NUM_THREADS
    in the same words as quantize (ONNX quantize and info --verify said
    "SQUANT_NUM_THREADS must be ..."); --threads N overrides it."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "fc.weight")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(model))
    q = tmp_path / "q.safetensors"
    assert _run(capsys, "quantize", "-q", st_file, q)[0] == 0
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setenv("SQUANT_NUM_THREADS", "bad")
    for argv in (
        ["demo", "--depth", "18"],
        ["quantize", model, tmp_path / "out.onnx"],
        ["info", "--verify", q],
    ):
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 2, (argv, stderr)
        _one_error_line(stderr, "bad SQUANT_NUM_THREADS environment variable (")
        assert sorted(os.listdir(tmp_path)) == before
    for argv in (
        ["quantize", "-q", "--threads", "2", model, tmp_path / "out.onnx"],
        ["info", "--verify", "--threads", "2", q],
    ):
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 0, (argv, stderr)
    assert os.environ["SQUANT_NUM_THREADS"] == "bad"  # restored after the commands
    rc, out, _ = _run(capsys, "info", q)  # the header only: no threads
    assert rc == 0 and "verified" not in out


# --------------------------------------------------------------------------
# 13. a closed pipe


@pytest.mark.skipif(shutil.which("head") is None, reason="needs head")
def test_info_into_head_exits_quietly(tmp_path) -> None:
    path = tmp_path / "many.safetensors"
    tensors = {
        f"layer{i:05d}.a.rather.long.module.name.bias": RawTensor.from_numpy(
            np.zeros(1, np.float32)
        )
        for i in range(3000)  # a table far larger than a pipe's buffer
    }
    write_safetensors(path, tensors, SQUANT_META)
    cli = subprocess.Popen(
        [sys.executable, "-m", "squant_rs", "info", "-v", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert cli.stdout is not None and cli.stderr is not None
    head = subprocess.run(["head", "-1"], stdin=cli.stdout, capture_output=True, check=False)
    cli.stdout.close()
    stderr = cli.stderr.read()
    cli.stderr.close()
    assert cli.wait(timeout=120) == 141
    assert stderr == b""
    assert head.stdout.startswith(b"file ")


# --------------------------------------------------------------------------
# 18. patterns that match nothing


def test_unmatched_patterns_warn_once_each(tmp_path, capsys, st_file) -> None:
    out = tmp_path / "out.safetensors"
    argv = ["quantize", st_file, out, "-q", "--skip", "nothing*", "fc"]
    rc, _, stderr = _run(capsys, *argv, "--include", "*weight", "zz*", "*.bias")
    assert rc == 0
    assert stderr.splitlines() == [
        "squant-rs: warning: --include pattern 'zz*' matches no floating tensor of 2+ dimensions",
        "squant-rs: warning: --include pattern '*.bias' matches no floating tensor of 2+ "
        "dimensions",
        "squant-rs: warning: --skip pattern 'nothing*' matches no tensor that would be quantized",
    ]
    rc, _, stderr = _run(capsys, "quantize", st_file, out, "-q", "--skip", "fc")
    assert rc == 0 and stderr == ""


# --------------------------------------------------------------------------
# 19. the extension chooses the format


@pytest.mark.parametrize("name", ["out.pth", "out.pt", "out.bin", "out", "out.safetensors.tmp"])
def test_output_extension_must_match_the_format(tmp_path, capsys, st_file, name: str) -> None:
    rc, _, stderr = _run(capsys, "quantize", st_file, tmp_path / name)
    assert rc == 2
    _one_error_line(stderr, "the output format is chosen by the file extension")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors"]
    rc, _, stderr = _run(capsys, "demo", "--depth", "18", "--out", tmp_path / name)
    assert rc == 2 and "file extension" in stderr


def test_output_extension_table(tmp_path, capsys, st_file) -> None:
    assert OUTPUT_FORMATS[".safetensors"] == "safetensors"
    rc, _, stderr = _run(capsys, "quantize", st_file, tmp_path / "OUT.SAFETENSORS", "-q")
    assert rc == 0, stderr


# --------------------------------------------------------------------------
# 20. help and version


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no sub-commands")  # pragma: no cover


def test_help_shows_choices_and_defaults(capsys) -> None:
    commands = _subparsers(build_parser())
    assert {"demo", "quantize", "info"} <= commands.keys()
    for name, sub in commands.items():
        assert sub.description, f"{name} has no description"
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            assert f"(default: {action.default})" in text, (name, action.option_strings)
            for choice in action.choices or ():
                assert str(choice) in text, (name, choice)
    text = " ".join(commands["quantize"].format_help().split())
    assert "{squant,squant-e,squant-k,squant-c}" in text and "(default: squant)" in text
    assert "(default: $SQUANT_NUM_THREADS, else all CPUs" in text


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_flags(capsys, flag: str) -> None:
    rc, out, _ = _run(capsys, flag)
    assert rc == 0 and out.strip() == f"squant-rs {squant_rs.__version__}"


# --------------------------------------------------------------------------
# 21. summary: timings, sizes, already quantized


def test_summary_splits_the_time(tmp_path, capsys, st_file) -> None:
    rc, out, _ = _run(capsys, "quantize", st_file, tmp_path / "out.safetensors")
    assert rc == 0
    assert re.search(
        r"^time +load [\d.]+ ms, quantize [\d.]+ ms \(SQuant [\d.]+ ms\), write [\d.]+ ms$",
        out,
        re.M,
    ), out


def _row(text: str, label: str) -> str:
    found = re.search(rf"^{label} +(.*)$", text, re.M)
    assert found, text
    return found.group(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_quantize_and_info_report_the_same_sizes(tmp_path, capsys, kind: str, dtype) -> None:
    sd = {k: v.to(dtype) for k, v in _state_dict().items()}
    sd["steps"] = torch.tensor([3], dtype=torch.int64)
    src = tmp_path / f"in.{kind}"
    if kind == "pth":
        torch.save(sd, src)
    else:
        safetensors_torch.save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    rc, q_out, _ = _run(capsys, "quantize", src, out)
    assert rc == 0
    rc, i_out, _ = _run(capsys, "info", out)
    assert rc == 0
    before = sum(v.numel() * v.element_size() for v in sd.values())
    assert _row(q_out, "size before") == _row(i_out, "size before")
    assert _row(q_out, "size before").startswith(squant_rs.model.format_bytes(before) + " ")
    assert _row(q_out, "size after") == _row(i_out, "size after")


def test_requantizing_a_squant_file_is_refused(tmp_path, capsys, st_file) -> None:
    once = tmp_path / "once.safetensors"
    assert _run(capsys, "quantize", st_file, once, "-q")[0] == 0
    rc, _, stderr = _run(capsys, "quantize", once, tmp_path / "twice.safetensors")
    assert rc == 2
    _one_error_line(stderr, f"{once} is already a squant-rs file")
    assert not (tmp_path / "twice.safetensors").exists()


# --------------------------------------------------------------------------
# info reads the header only


def test_info_reads_only_the_header(tmp_path, capsys, monkeypatch, st_file) -> None:
    out = tmp_path / "out.safetensors"
    assert _run(capsys, "quantize", st_file, out, "-q")[0] == 0

    def no_data(*args, **kwargs):
        raise AssertionError("info read the tensor data")

    monkeypatch.setattr(np, "fromfile", no_data)
    monkeypatch.setattr(np, "memmap", no_data)
    rc, stdout, stderr = _run(capsys, "info", out)
    assert rc == 0, stderr
    assert "2 quantized" in stdout
    # A truncated data region is still found, from the file size.
    out.write_bytes(out.read_bytes()[:-1])
    rc, _, stderr = _run(capsys, "info", out)
    assert rc == 2
    _one_error_line(stderr, "truncated file")


# --------------------------------------------------------------------------
# 22. README


def test_readme_names_the_rust_components() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    line = next(p for p in readme.split("\n\n") if "Rust >= 1.89" in p)
    assert "rustfmt" in line and "clippy" in line
