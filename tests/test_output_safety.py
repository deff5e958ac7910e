"""What a failure or a signal at each step of writing an output leaves
behind (``squant_rs.formats.output``): an ONNX model and its ``.data``
file replaced together or not at all, the Rust writer's files given their
permissions before the rename, errors after the rename said to be so,
errors naming the file, temporary files under ``$TMPDIR`` removed on
SIGTERM / SIGHUP."""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import squant_rs
from squant_rs import _squant_rs as native
from squant_rs.cli import main
from squant_rs.formats.output import atomic_output
from squant_rs.formats.safetensors import (
    RawTensor,
    inspect_quantized,
    quantize_checkpoint,
    write_safetensors,
)

from conftest import default_signal_handlers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and signals")


def _model(width: int = 64) -> onnx.ModelProto:
    """Two Gemms; at the default width w0 quantized to 4 bits is 2 KiB, so
    external data (tensors of 1 KiB or more) has a .data file."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(0, 0.3, (width, width)).astype(np.float32)
    w1 = rng.normal(0, 0.3, (4, width)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w1"], ["y"], transB=1),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


# --------------------------------------------------------------------------
# 1. an ONNX model with external data: both files or neither


def _run(path: Path) -> np.ndarray:
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _pair(path: Path) -> tuple[bytes, bytes]:
    return path.read_bytes(), Path(f"{path}.data").read_bytes()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")


@pytest.fixture()
def pairs(tmp_path):
    """An earlier W8 pair at out/q.onnx (+ .data) and, elsewhere, the W4
    pair a new run writes."""
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    squant_rs.quantize_onnx(_model(), out, 8, external_data=True)
    new = tmp_path / "new" / "q.onnx"
    new.parent.mkdir()
    squant_rs.quantize_onnx(_model(), new, 4, external_data=True)
    assert _pair(out) != _pair(new)
    return out, _pair(out), _run(out), _pair(new)


STEPS = [
    "fsync data",
    "fsync model",
    "link",
    "rename data",
    "rename model",
    "sync directory",
]


@needs_proc
@pytest.mark.parametrize("step", STEPS)
def test_external_pair_failure_at_any_step(pairs, monkeypatch, step: str) -> None:
    """A failure at any step of writing the pair leaves the earlier pair as
    it was (loadable, no temporary file), or, when the directory cannot be
    synced after both renames, the new pair, saying so."""
    out, old, old_result, new = pairs
    data = f"{out}.data"
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link
    fired = []

    def fail(code: int) -> OSError:
        fired.append(step)
        return OSError(code, os.strerror(code))

    def fsync(fd: int) -> None:
        where = _fd_path(fd)
        name = os.path.basename(where)
        if step == "fsync data" and name.startswith(".q.onnx.data."):
            raise fail(errno.ENOSPC)
        if step == "fsync model" and name.startswith(".q.onnx.") and ".data." not in name:
            raise fail(errno.ENOSPC)
        if step == "sync directory" and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise fail(errno.EIO)
        real_fsync(fd)

    def replace(src, dst) -> None:
        if step == "rename data" and os.fspath(dst) == data:
            raise fail(errno.ENOSPC)
        if step == "rename model" and os.fspath(dst) == str(out):
            raise fail(errno.ENOSPC)
        real_replace(src, dst)

    def link(src, dst, **kw) -> None:
        if step == "link":
            raise fail(errno.ENOSPC)
        real_link(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    with pytest.raises(OSError) as err:
        squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
    monkeypatch.undo()
    assert fired, f"{step} never happened"
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]
    if step == "sync directory":
        assert _pair(out) == new
        _run(out)
        assert err.value.errno == errno.EIO
        assert err.value.strerror == UNSYNCED.replace(
            "the output was written, but its", "the outputs were written, but their"
        )
    else:
        assert _pair(out) == old
        np.testing.assert_array_equal(_run(out), old_result)
        assert err.value.errno == errno.ENOSPC
    assert err.value.filename in (str(out), data), err.value


@needs_proc
def test_external_pair_failed_rename_without_an_earlier_pair(tmp_path, monkeypatch) -> None:
    """The .data file already renamed is removed again when the model's
    rename fails and there was no earlier output."""
    out = tmp_path / "q.onnx"
    real_replace = os.replace

    def replace(src, dst) -> None:
        if os.fspath(dst) == str(out):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="quota") as err:
        squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
    assert err.value.filename == str(out)
    assert os.listdir(tmp_path) == []


def test_signal_between_the_renames_waits_for_both(pairs, monkeypatch) -> None:
    """Ctrl-C while the pair is renamed into place acts after both renames:
    the new pair, complete, and KeyboardInterrupt saying it was written."""
    out, _, _, new = pairs
    real_replace = os.replace

    def replace(src, dst) -> None:
        real_replace(src, dst)
        if os.fspath(dst) == f"{out}.data":
            signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the first rename

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt) as err:
        squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
    monkeypatch.undo()
    assert _pair(out) == new
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]
    _run(out)
    assert str(err.value) == f"after {out}.data and {out} were written"


def test_two_writers_of_one_pair_do_not_interleave(pairs) -> None:
    """The renames of a pair happen under an exclusive flock on the
    directory: a run that finds it locked waits (its files staged), and the
    pair on disk always belongs together."""
    fcntl = pytest.importorskip("fcntl")
    out, old, _, new = pairs
    fd = os.open(out.parent, os.O_RDONLY)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        t = threading.Thread(target=write)
        t.start()
        deadline = time.monotonic() + 60
        while len(os.listdir(out.parent)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # both temporary files
        time.sleep(0.5)
        assert t.is_alive() and _pair(out) == old  # waiting for the lock
    finally:
        os.close(fd)  # unlocks
    t.join(60)
    assert not errors and _pair(out) == new
    assert sorted(os.listdir(out.parent)) == ["q.onnx", "q.onnx.data"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a tmpfs")
def test_full_disk_keeps_the_earlier_pair(tmp_path) -> None:
    """A real ENOSPC (a small tmpfs): room for the .data file only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = tmp_path / "ref.onnx"
    squant_rs.quantize_onnx(_model(), ref, 4, external_data=True)
    need = os.path.getsize(f"{ref}.data")
    pages = -(-need // 4096) * 4096

    def fill(free: int) -> None:
        st = os.statvfs(mnt)
        (mnt / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))

    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "q.onnx"
        # (a) no earlier output: nothing is left
        fill(pages)
        with pytest.raises(OSError) as err:
            squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
        assert os.listdir(mnt) == ["filler"]
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)
        # (b) an earlier pair, its .data file held open (a server using it)
        (mnt / "filler").unlink()
        squant_rs.quantize_onnx(_model(), out, 8, external_data=True)
        old = _pair(out)
        with open(f"{out}.data", "rb"):
            fill(pages)
            with pytest.raises(OSError) as err:
                squant_rs.quantize_onnx(_model(), out, 4, external_data=True)
        assert err.value.errno == errno.ENOSPC
        assert _pair(out) == old and sorted(os.listdir(mnt)) == ["filler", "q.onnx", "q.onnx.data"]
        (mnt / "filler").unlink()
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        sess.run(None, {"x": np.ones((1, 64), np.float32)})
        del sess  # it maps the .data file
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])  # detached now, freed when unused


# --------------------------------------------------------------------------
# 2. the Rust writer's files: permissions before the rename


def _state() -> dict[str, np.ndarray]:
    return {"fc.weight": np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)}


class _SignalAfterFinish:
    """QuantizedFileWriter whose finish() is followed by Ctrl-C (a signal
    that came while the Rust writer synced and renamed the file)."""

    real = native.QuantizedFileWriter

    def __init__(self, *args) -> None:
        self.w = self.real(*args)

    def __getattr__(self, name: str):
        return getattr(self.w, name)

    def finish(self) -> int:
        size = self.w.finish()
        signal.raise_signal(signal.SIGINT)
        return size


def _signal_after(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        return result

    return call


WRITERS = ["write_safetensors", "save_quantized", "quantize_checkpoint", "cli"]


def _write(how: str, out: Path, src: Path) -> None:
    if how == "write_safetensors":
        write_safetensors(out, {k: RawTensor.from_numpy(v) for k, v in _state().items()})
    elif how == "save_quantized":
        squant_rs.save_quantized(_state(), out)
    elif how == "quantize_checkpoint":
        quantize_checkpoint(src, out)
    else:
        rc = main(["quantize", "-q", str(src), str(out)])
        if rc == 130:
            raise KeyboardInterrupt
        assert rc == 0


@pytest.fixture()
def st_input(tmp_path) -> Path:
    src = tmp_path / "in" / "in.safetensors"
    src.parent.mkdir()
    write_safetensors(src, {k: RawTensor.from_numpy(v) for k, v in _state().items()})
    return src


@pytest.mark.parametrize("how", WRITERS)
def test_signal_as_the_rust_writer_finishes_leaves_the_output(
    tmp_path, monkeypatch, st_input, how: str
) -> None:
    """Ctrl-C during the Rust writer's sync and rename (raised when it
    returns): the existing output is untouched, permission bits and all,
    and no temporary file is left."""
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"old")
    out.chmod(0o600)
    monkeypatch.setattr(native, "QuantizedFileWriter", _SignalAfterFinish)
    for fn in ("io_write_safetensors", "io_quantize_file"):
        monkeypatch.setattr(native, fn, _signal_after(getattr(native, fn)))
    with pytest.raises(KeyboardInterrupt):
        _write(how, out, st_input)
    monkeypatch.undo()
    assert out.read_bytes() == b"old" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(out.parent) == ["o.safetensors"]


#: The reason of an I/O error syncing the directory after the rename, as
#: the Rust writer words it too.
UNSYNCED = (
    "the output was written, but its directory could not be synced to disk "
    "(Input/output error), so a crash may still undo it"
)


@pytest.mark.parametrize("how", [*WRITERS, "onnx"])
def test_error_after_the_rename_says_the_output_is_in_place(
    tmp_path, monkeypatch, capsys, st_input, how: str
) -> None:
    """An I/O error syncing the directory after the rename is raised,
    saying that the new file is in place, which has the old permission
    bits."""
    name = "o.onnx" if how == "onnx" else "o.safetensors"
    out = tmp_path / "out" / name
    out.parent.mkdir()
    out.write_bytes(b"old")
    out.chmod(0o600)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if how == "cli":
        assert main(["quantize", "-q", str(st_input), str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"squant-rs: error: {UNSYNCED}: {out}\n"
    else:
        with pytest.raises(OSError) as exc:
            if how == "onnx":
                squant_rs.quantize_onnx(_model(), out, 4)
            else:
                _write(how, out, st_input)
        assert exc.value.errno == errno.EIO and exc.value.filename == str(out)
        assert exc.value.strerror == UNSYNCED
    monkeypatch.undo()
    assert out.read_bytes() != b"old" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert os.listdir(out.parent) == [name]


def test_signal_during_the_rename_acts_after_it(tmp_path, monkeypatch) -> None:
    """Ctrl-C while the output is renamed into place: the output is
    complete, with its permission bits, and KeyboardInterrupt says so."""
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o640)
    real_replace = os.replace

    def replace(src, dst) -> None:
        real_replace(src, dst)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt, match=f"after {out} was written"):
        squant_rs.save_quantized(_state(), out)
    monkeypatch.undo()
    assert inspect_quantized(out).quantized
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and os.listdir(tmp_path) == [out.name]


# --------------------------------------------------------------------------
# 3. temporary files under $TMPDIR and signals

SCRATCH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import onnx, onnxruntime, squant_rs
    from onnx import TensorProto, helper, numpy_helper

    def stall(*args, **kwargs):
        print("ready", flush=True)
        time.sleep(60)

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    if sys.argv[2] == "export":
        import torch
        onnx.load = stall  # reads the exported float model back
        squant_rs.export_onnx(torch.nn.Linear(4, 4), sys.argv[1], torch.rand(1, 4))
    else:
        onnxruntime.InferenceSession = stall  # runs the calibration model
        squant_rs.quantize_onnx(model, sys.argv[1], 8, abits=8)
    """
)


def _directories(tmpdir: Path) -> list[Path]:
    """The directories in ``tmpdir`` (onnxruntime leaves a file there)."""
    return [p for p in tmpdir.iterdir() if p.is_dir()]


@pytest.mark.parametrize(
    ("what", "sig"),
    [("export", "SIGTERM"), ("export", "SIGHUP"), ("calibration", "SIGTERM")],
)
def test_signal_removes_the_temporary_directory(tmp_path, what: str, sig: str) -> None:
    """SIGTERM / SIGHUP while export_onnx's float model or quantize_onnx's
    calibration model is in $TMPDIR: the process ends by the signal and
    leaves nothing there."""
    if what == "export":
        pytest.importorskip("torch")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "q.onnx"
    env = dict(os.environ, TMPDIR=str(tmpdir))
    p = subprocess.Popen(
        [sys.executable, "-c", SCRATCH_SCRIPT, str(out), what],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_signal_handlers,
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr
        (scratch,) = _directories(tmpdir)
        assert os.listdir(scratch)  # the temporary model
        p.send_signal(getattr(signal, sig))
        _, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == -getattr(signal, sig), stderr
    assert _directories(tmpdir) == [] and not out.exists()


# --------------------------------------------------------------------------
# 4. errors name the file


def test_atomic_output_errors_name_the_output(tmp_path, monkeypatch) -> None:
    """A failed sync or rename of the temporary file names the output."""
    target = tmp_path / "a.bin"
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def replace(src, dst) -> None:
        real_replace(src, tmp_path / "missing" / "x")  # ENOENT naming both paths

    for name, fake in (("fsync", fsync), ("replace", replace)):
        monkeypatch.setattr(os, name, fake)
        with pytest.raises(OSError) as err, atomic_output(target) as f:
            f.write(b"data")
        monkeypatch.undo()
        assert err.value.filename == str(target) and err.value.filename2 is None, err.value
        assert os.listdir(tmp_path) == []
    assert (real_fsync, real_replace) == (os.fsync, os.replace)


FSIZE_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np
    import squant_rs
    from onnx import TensorProto, helper, numpy_helper
    warnings.simplefilter("ignore")
    w = numpy_helper.from_array(np.ones((128, 64), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    try:
        if sys.argv[2] == "export":
            import torch
            squant_rs.export_onnx(torch.nn.Linear(64, 128), sys.argv[1], torch.rand(1, 64))
        else:
            squant_rs.quantize_onnx(model, sys.argv[1], 8, external_data=sys.argv[2] == "pair")
    except OSError as exc:
        print(exc.errno, exc.filename, exc.strerror, sep="|")
    """
)


def _fsize_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("case", ["one file", "pair", "export"])
def test_write_errors_name_the_file(tmp_path, case: str) -> None:
    """A write that fails (the file-size limit stands in for a full disk)
    names the output; export_onnx's temporary float model under $TMPDIR is
    named as such."""
    if case == "export":
        pytest.importorskip("torch")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "q.onnx"
    p = subprocess.run(
        [sys.executable, "-B", "-c", FSIZE_SCRIPT, str(out), case],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TMPDIR=str(tmpdir)),
        preexec_fn=_fsize_limit,
    )
    assert p.returncode == 0, p.stderr
    code, filename, reason = p.stdout.strip().split("|")
    assert int(code) == errno.EFBIG, p.stdout
    if case == "export":
        assert filename.startswith(str(tmpdir)) and filename.endswith("float.onnx")
        assert "temporary file under $TMPDIR" in reason
    else:
        assert filename == str(out) + (".data" if case == "pair" else "")
    assert os.listdir(tmp_path) == ["tmpdir"] and _directories(tmpdir) == []


def test_cli_write_error_names_the_file(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    m = _model(128)
    onnx.save(m, str(src))
    out = tmp_path / "q.onnx"
    p = subprocess.run(
        [sys.executable, "-B", "-m", "squant_rs", "quantize", "-q", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_fsize_limit,
    )
    assert p.returncode == 2
    assert p.stderr == f"squant-rs: error: File too large: {out}\n"
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not __import__("shutil").which("setpriv"),
    reason="dropping CAP_FSETID needs root and setpriv",
)
@pytest.mark.parametrize("mode", [0o4755, 0o2775])
def test_atomic_output_keeps_set_id_bits_without_cap_fsetid(tmp_path, mode: int) -> None:
    """A writer without CAP_FSETID (any user but root) clears a file's
    set-user-ID / set-group-ID bits when it writes to it: atomic_output set
    the mode before the writes and left 755 / 775."""
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")
    out.chmod(mode)
    code = (
        "import sys\n"
        "from squant_rs.formats.output import atomic_output\n"
        "with atomic_output(sys.argv[1]) as f:\n"
        "    f.write(b'new' * 1000)\n"
    )
    drop = ["setpriv", "--inh-caps=-fsetid", "--bounding-set=-fsetid"]
    r = subprocess.run([*drop, sys.executable, "-c", code, str(out)], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == b"new" * 1000
    assert out.stat().st_mode & 0o7777 == mode
