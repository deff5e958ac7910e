"""Safe output files: every writer of the package goes through
:func:`atomic_output` (or, for a file the Rust writer writes,
:func:`staged_output`).

The rules, the same for the CLI and the Python API:

- **Atomic.** The data goes to a temporary file (``.NAME.<random>.tmp``) in
  the target's directory, is flushed to disk, given the target's owner and
  permission bits, then renamed over the target with ``os.replace`` and the
  directory synced. An error, ``Ctrl-C`` (SIGINT), SIGTERM or SIGHUP
  before the rename removes the temporary file and leaves an existing
  target untouched: there is never a partial output file. (SIGTERM and
  SIGHUP are caught only while their disposition is the default one, i.e.
  when they would kill the process, and only in the main thread; the
  process then still dies from the same signal, after the clean-up.) The
  rename and the directory sync are not interrupted: a signal that comes
  then acts once they are done, on a complete output (Ctrl-C raises
  ``KeyboardInterrupt("after NAME was written")``). An error after the
  rename (an I/O error syncing the directory) says that the new file is in
  place.
- **Several files, staged together.** :func:`atomic_outputs` writes files
  that belong together (an ONNX model and its ``.data`` file): every
  temporary file is written and synced before the first rename, the renames
  follow one another with nothing in between (signals held, and under an
  exclusive ``flock`` on the directory, so two runs writing the same
  outputs at once cannot interleave their renames: the last run's files
  win, as a pair), and a failed rename puts back the files already
  replaced (kept through a hard link until the end) before the error is
  raised. What cannot be avoided without swapping a whole directory: a
  reader that opens the files while the renames happen (microseconds) may
  see one new file and one old one, and a crash of the machine between the
  renames leaves them so.
- **Errors name the output.** An ``OSError`` from creating, writing,
  syncing or renaming the temporary file names the path the caller gave,
  never the temporary file.
- **Never the input.** :func:`check_output` refuses an output that is the
  same file as one of the inputs, compared by device and inode (so
  ``./a``, an absolute path, a hard link or a symlink to the input are all
  caught).
- **Symlinks are followed.** Writing to a symlink replaces the file it
  points to and keeps the link (a dangling link gets its target created).
- **Regular files only.** An existing output that is not a regular file (a
  FIFO, a character or block device such as ``/dev/null`` or
  ``/dev/stdout``, a socket) is refused: streaming to it could not be
  atomic. Write to a file and copy it instead.
- **Permissions are kept.** Replacing an existing file keeps its permission
  bits (and, where allowed, its owner and group), set on the temporary file
  before it is renamed; a read-only file that the user could not write to
  is refused with ``PermissionError``. A new file gets ``0o666`` minus the
  umask, as with ``open``. Replacing a file that has other hard links
  gives this name a new file; the other names keep the old contents.

:func:`scratch_file` gives the package's temporary files under ``$TMPDIR``
(the float model ``export_onnx`` exports, ``quantize_onnx``'s calibration
probe) the same clean-up on SIGTERM and SIGHUP.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Any, BinaryIO, Union

from .._squant_rs import InvalidArgumentError

__all__ = ["atomic_output", "atomic_outputs", "check_output", "scratch_file", "staged_output"]

PathLike = Union[str, "os.PathLike[str]"]

#: Signals that kill a process by default and that a write cleans up after.
_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)

#: Signals held while outputs are renamed into place.
_HELD: tuple[signal.Signals, ...] = (signal.SIGINT, *_SIGNALS)

#: The longest file name most file systems take (bytes).
_NAME_MAX = 255

#: Errors of ``link`` that mean "no hard links here" (not a failing disk).
_NO_LINKS = frozenset(
    getattr(errno, name)
    for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK", "EXDEV", "EACCES")
    if hasattr(errno, name)
)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_input(path: str) -> None:
    """Refuse an existing input that is not a regular file (a FIFO or a
    device would block the read, or never end) with
    :class:`~squant_rs.InvalidArgumentError`, before anything opens it
    (symlinks followed); the message is the one the Rust readers give. A
    directory, or a path that cannot be looked up (missing, a symlink loop,
    a name too long, a file used as a directory), passes: the caller's
    open says what is wrong, in its words."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise InvalidArgumentError(
            f"input {path} is {_kind(mode)}, not a regular file: squant-rs reads regular files only"
        )


def check_output(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> str:
    """Check that ``path`` may be written by :func:`atomic_output`.

    Returns the path that will really be replaced (``path`` with symlinks
    resolved). Raises :class:`~squant_rs.InvalidArgumentError` when ``path``
    is the same file as one of ``inputs`` (device and inode compared) or an
    existing special file (FIFO, device, socket), ``IsADirectoryError`` when
    it is a directory, ``PermissionError`` when it is an existing file the
    user may not write, and ``OSError`` when it cannot be examined (a
    symlink loop, for example), ``TypeError`` when it is not a ``str`` or
    ``os.PathLike[str]`` (bytes paths are not taken, as on the read side)."""
    name = os.fspath(path)
    if not isinstance(name, str):
        raise TypeError(f"output path must be a str or os.PathLike[str], got {path!r}")
    target = os.path.realpath(name)
    try:
        st = os.stat(name)  # follows symlinks
    except FileNotFoundError:
        # Nothing there yet (or a dangling symlink): its directory must exist.
        if not os.path.isdir(os.path.dirname(target)):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name) from None
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), name)
    for src in inputs:
        try:
            sst = os.stat(src)
        except FileNotFoundError:
            continue
        if (sst.st_dev, sst.st_ino) == (st.st_dev, st.st_ino):
            raise InvalidArgumentError(
                f"output {name} is the same file as the input {os.fspath(src)}: "
                "refusing to overwrite the input"
            )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(
            f"output {name} is {_kind(st.st_mode)}; squant-rs writes regular files only "
            "(atomically, through a temporary file): write to a file and copy it"
        )
    if not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    return target


# --------------------------------------------------------------------------
# Signals


class _Signalled(BaseException):
    """Raised by the temporary signal handler to unwind the write."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signum)


@contextmanager
def _cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception while the body runs, so that
    ``finally``/``except`` clauses clean up; then die from the signal."""
    installed: dict[signal.Signals, signal.Handlers] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)
                installed[sig] = signal.SIG_DFL
    try:
        yield
    except _Signalled as exc:
        for sig, previous in installed.items():
            signal.signal(sig, previous)
        installed.clear()
        # The default action: the process ends, killed by this signal.
        signal.raise_signal(exc.signum)
        raise  # pragma: no cover - the signal above ends the process
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


@contextmanager
def _signals_held(done: str = "") -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the body runs (it renames
    outputs into place: stopping half-way would leave them replaced but
    reported as not written, or a pair of files half replaced), then let
    each signal that came act through the handler it had: Ctrl-C raises
    ``KeyboardInterrupt(done)`` when the body completed, SIGTERM / SIGHUP
    clean up (:func:`_cleanup_on_signals`) or kill, a program's own handler
    runs. Only in the main thread (the only one Python signal handlers run
    in); a signal that is ignored, or handled outside Python, is left
    alone."""
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    held: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _HELD:
            previous = signal.getsignal(sig)
            if previous is None or previous == signal.SIG_IGN:
                continue
            signal.signal(sig, hold)
            held[sig] = previous
    completed = False
    try:
        yield
        completed = True
    finally:
        for held_sig, previous in held.items():
            signal.signal(held_sig, previous)
        for signum in dict.fromkeys(caught):
            try:
                signal.raise_signal(signum)
            except KeyboardInterrupt as exc:
                if completed and done and not exc.args:
                    raise KeyboardInterrupt(done) from None
                raise


# --------------------------------------------------------------------------
# Staging


def _named(exc: OSError, name: str, note: str = "") -> OSError:
    """``exc`` naming ``name`` (the output as the caller gave it) instead of
    a temporary file or no file; ``note`` is added to the reason."""
    if exc.errno is None:
        return exc
    reason = exc.strerror or os.strerror(exc.errno)
    return type(exc)(exc.errno, f"{reason} ({note})" if note else reason, name)


def _temp_path(target: str, room: int = 0) -> str:
    """``.NAME.<random>.tmp`` next to ``target``; NAME is shortened when the
    temporary name (plus ``room`` bytes that a writer adds to it) would be
    longer than a file name may be."""
    directory, base = os.path.split(target)
    tag = uuid.uuid4().hex[:12]
    raw = os.fsencode(base)
    keep = _NAME_MAX - room - len(f"..{tag}.tmp")
    if len(raw) > keep:
        base = os.fsdecode(raw[: max(keep, 1)])
    return os.path.join(directory, f".{base}.{tag}.tmp")


def _copy_permissions(tmp: str, old: os.stat_result, fd: int | None = None) -> None:
    """The old target's owner (where allowed) and permission bits, on ``tmp``."""
    if hasattr(os, "fchown"):
        try:
            if fd is not None:
                os.fchown(fd, old.st_uid, old.st_gid)
            else:
                os.chown(tmp, old.st_uid, old.st_gid)
        except OSError:
            pass  # not root: the file gets this user's owner (and group)
    if fd is not None and hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
    else:
        os.chmod(tmp, stat.S_IMODE(old.st_mode))


class _OutputFile(io.BufferedWriter):
    """The temporary file of an output: a failed write or flush names the
    output (``OSError.filename``)."""

    def __init__(self, raw: io.FileIO, output: str) -> None:
        super().__init__(raw)
        self._output = output

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            raise _named(exc, self._output) from None

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            raise _named(exc, self._output) from None


class _Staged:
    """One output on its way: the target (checked, symlinks resolved) and
    its temporary file in the target's directory."""

    def __init__(self, path: PathLike, inputs: Iterable[PathLike], room: int = 0) -> None:
        self.name = os.fspath(path)
        self.target = check_output(self.name, inputs=inputs)
        try:
            self.old: os.stat_result | None = os.stat(self.target)
        except FileNotFoundError:
            self.old = None
        self.directory = os.path.dirname(self.target)
        self.tmp = _temp_path(self.target, room)
        self.renamed = False

    def create(self) -> _OutputFile:
        """Create the temporary file (the old target's permissions on it)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.tmp, flags, 0o666)
        except OSError as exc:
            # Name the file the user asked for, not the temporary one.
            raise _named(exc, self.name) from None
        try:
            if self.old is not None:
                _copy_permissions(self.tmp, self.old, fd)
            return _OutputFile(io.FileIO(fd, "wb"), self.name)
        except BaseException as exc:
            os.close(fd)
            self.discard()
            if isinstance(exc, OSError):
                raise _named(exc, self.name) from None
            raise

    def adopt(self) -> None:
        """The temporary file was written by someone else (the Rust writer,
        which syncs it): give it the old target's permissions (synced too)."""
        if self.old is None:
            return
        try:
            fd = os.open(self.tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                _copy_permissions(self.tmp, self.old, fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _named(exc, self.name) from None

    def sync(self, f: BinaryIO) -> None:
        """Flush, sync and close the temporary file; the old target's
        permission bits are set once more after the writes (a write by a
        process without CAP_FSETID clears set-user-ID and set-group-ID)."""
        try:
            f.flush()
            if self.old is not None:
                _copy_permissions(self.tmp, self.old, f.fileno())
            os.fsync(f.fileno())
            f.close()
        except OSError as exc:
            raise _named(exc, self.name) from None

    def keep_old(self) -> str | None:
        """Keep the target's current file reachable (a hard link under a
        temporary name) so that it can be put back: the link, ``""`` when
        there is no such file, ``None`` when it cannot be kept (no hard links
        on this file system)."""
        keep = _temp_path(self.target)
        try:
            os.link(self.target, keep)
        except FileNotFoundError:
            return ""
        except OSError as exc:
            if exc.errno in _NO_LINKS:
                return None
            raise _named(exc, self.name) from None
        return keep

    def replace(self) -> None:
        try:
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise _named(exc, self.name) from None
        self.renamed = True

    def discard(self) -> None:
        if not self.renamed:
            _remove(self.tmp)


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _sync_directory(directory: str, name: str, done: str) -> None:
    """Make the renames into ``directory`` durable (POSIX; a no-op where
    directories cannot be opened or synced). An I/O error is raised naming
    ``name`` and saying ``done`` (what is in place already)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno == errno.EIO:
            # In the Rust writer's words (squant-io's unsynced_reason).
            reason = exc.strerror or os.strerror(exc.errno)
            raise OSError(
                exc.errno, f"{done} ({reason}), so a crash may still undo it", name
            ) from None
    finally:
        os.close(dfd)


@contextmanager
def _directory_locks(directories: Sequence[str]) -> Iterator[None]:
    """Exclusive ``flock`` locks on ``directories`` (sorted: no deadlock
    between two writers), held by writers of several files while they
    rename them. Best effort: where a directory cannot be opened or locked
    (no ``fcntl``, NFS) the renames run unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fds: list[int] = []
    try:
        for directory in sorted(directories):
            try:
                fd = os.open(directory, os.O_RDONLY)
            except OSError:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock


def _commit(staged: Sequence[_Staged]) -> None:
    """Rename the synced temporary files over their targets, in order, with
    signals held (and, for several files, their directories locked); a
    failed rename puts back the files replaced before it. Then sync the
    directories."""
    names = " and ".join(s.name for s in staged)
    done = (
        "the output was written, but its directory could not be synced to disk"
        if len(staged) == 1
        else "the outputs were written, but their directory could not be synced to disk"
    )
    directories = sorted({s.directory for s in staged})
    with ExitStack() as stack:
        if len(staged) > 1:
            stack.enter_context(_directory_locks(directories))
        written = "was written" if len(staged) == 1 else "were written"
        stack.enter_context(_signals_held(f"after {names} {written}"))
        replaced: list[tuple[_Staged, str | None]] = []
        try:
            for i, s in enumerate(staged):
                keep = s.keep_old() if i < len(staged) - 1 else ""
                try:
                    s.replace()
                except BaseException:
                    if keep:
                        _remove(keep)
                    raise
                replaced.append((s, keep))
        except BaseException as exc:
            stuck = _put_back(replaced)
            if stuck and isinstance(exc, OSError):
                raise type(exc)(
                    exc.errno,
                    f"{exc.strerror} ({' and '.join(stuck)} already replaced and could not "
                    "be put back: the output files do not belong together)",
                    exc.filename,
                ) from None
            raise
        for _, keep in replaced:
            if keep:
                _remove(keep)
        for directory in directories:
            first = next(s.name for s in staged if s.directory == directory)
            _sync_directory(directory, first, done)


def _put_back(replaced: list[tuple[_Staged, str | None]]) -> list[str]:
    """Undo the renames of ``replaced`` (newest first): each kept old file
    goes back, a target that did not exist is removed. Returns the names
    that could not be put back."""
    stuck: list[str] = []
    for s, keep in reversed(replaced):
        try:
            if keep:
                os.replace(keep, s.target)
            elif keep == "":
                os.unlink(s.target)
            else:
                stuck.append(s.name)
        except OSError:
            stuck.append(s.name)
    return stuck


# --------------------------------------------------------------------------
# Writers


@contextmanager
def atomic_outputs(
    paths: Sequence[PathLike], *, inputs: Iterable[PathLike] = ()
) -> Iterator[list[BinaryIO]]:
    """Write the files ``paths`` atomically and together: yields one binary
    file to write into for each.

    On normal exit of the ``with`` block every file is flushed and synced,
    then each temporary file replaces its target in the order of ``paths``
    (symlinks followed, permission bits of an existing target kept; the
    renames with signals held and the directories locked, a failed rename
    undone: see the module doc). On any exception, and on SIGTERM or SIGHUP
    before the renames, the temporary files are removed and the targets are
    untouched. ``inputs``: files the outputs must not be (see
    :func:`check_output`); no output may be one of the outputs before it.

    Raises what :func:`check_output` raises, and ``OSError`` when a
    temporary file cannot be created, written, synced or renamed (naming
    the output, never the temporary file), or when the directory cannot be
    synced after the renames (saying that the new files are in place)."""
    names = [os.fspath(p) for p in paths]
    known = list(inputs)
    staged = [_Staged(n, [*known, *names[:i]]) for i, n in enumerate(names)]
    with _cleanup_on_signals():
        files: list[BinaryIO] = []
        try:
            for s in staged:
                files.append(s.create())
            yield files
            for s, f in zip(staged, files):
                s.sync(f)
            _commit(staged)
        except BaseException:
            for f in files:
                try:
                    f.close()
                except OSError:
                    pass
            for s in staged:
                s.discard()
            raise


@contextmanager
def atomic_output(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yields a binary file to write into.

    On normal exit of the ``with`` block the data is flushed to disk and
    the temporary file, given the permission bits of an existing target
    (symlinks followed), replaces the target. On any exception, and on
    SIGTERM or SIGHUP before the rename, the temporary file is removed and
    the target is untouched; a signal during the rename acts after it.
    ``inputs``: files the output must not be (see :func:`check_output`).

    Raises what :func:`check_output` raises, and ``OSError`` when the
    temporary file cannot be created, written, synced or renamed (naming
    ``path``, never the temporary file), or when the directory cannot be
    synced after the rename (saying that the new file is in place)."""
    with atomic_outputs([path], inputs=inputs) as files:
        yield files[0]


#: Bytes a writer adds to the name of the file :func:`staged_output` gives
#: it: the Rust writer writes ``.NAME.<12 hex digits>.tmp`` and renames it.
_WRITER_ROOM = 18


@contextmanager
def staged_output(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Iterator[str]:
    """The rules of :func:`atomic_output` for a file that a writer creates
    itself (the Rust writer, which writes its own temporary file, syncs it
    and renames it to the path it is given): yields the temporary path to
    write. On normal exit the permission bits of an existing target are set
    on that file, which then replaces the target as in :func:`atomic_output`
    (a signal that arrives while the writer finishes leaves the target
    untouched); on an exception or SIGTERM/SIGHUP it is removed. An
    ``OSError`` naming the temporary path is raised naming ``path``."""
    staged = _Staged(path, inputs, _WRITER_ROOM)
    with _cleanup_on_signals():
        try:
            yield staged.tmp
            staged.adopt()
            _commit([staged])
        except OSError as exc:
            staged.discard()
            if exc.filename == staged.tmp:
                raise _named(exc, staged.name) from None
            raise
        except BaseException:
            staged.discard()
            raise


@contextmanager
def scratch_file(name: str, what: str) -> Iterator[str]:
    """The path of a scratch file ``name`` in a new private directory under
    ``$TMPDIR`` (:class:`tempfile.TemporaryDirectory`), removed with all it
    holds at the end, on an exception and on SIGTERM/SIGHUP (see
    :func:`_cleanup_on_signals`). An ``OSError`` of the body that names no
    file (a write that failed: a full ``$TMPDIR``) is raised naming the
    scratch file, saying that it is ``what``, a temporary file."""
    with _cleanup_on_signals(), tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        try:
            yield path
        except OSError as exc:
            if exc.filename is not None or exc.errno is None:
                raise
            raise _named(exc, path, f"writing {what}, a temporary file under $TMPDIR") from None
