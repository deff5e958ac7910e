"""Safe output files: every writer of the package goes through
:func:`atomic_output`.

The rules, the same for the CLI and the Python API:

- **Atomic.** The data goes to a temporary file (``.NAME.<random>.tmp``) in
  the target's directory, is flushed to disk, then renamed over the target
  with ``os.replace``. An error, ``Ctrl-C`` (SIGINT), SIGTERM or SIGHUP
  during the write removes the temporary file and leaves an existing target
  untouched: there is never a partial output file. (SIGTERM and SIGHUP are
  caught only while their disposition is the default one, i.e. when they
  would kill the process, and only in the main thread; the process then
  still dies from the same signal, after the clean-up.)
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
  bits (and, where allowed, its owner and group); a read-only file that the
  user could not write to is refused with ``PermissionError``. A new file
  gets ``0o666`` minus the umask, as with ``open``. Replacing a file that
  has other hard links gives this name a new file; the other names keep
  the old contents.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import BinaryIO, Union

from .._squant_rs import InvalidArgumentError

__all__ = ["atomic_output", "check_output"]

PathLike = Union[str, "os.PathLike[str]"]

#: Signals that kill a process by default and that a write cleans up after.
_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
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


def check_output(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> str:
    """Check that ``path`` may be written by :func:`atomic_output`.

    Returns the path that will really be replaced (``path`` with symlinks
    resolved). Raises :class:`~squant_rs.InvalidArgumentError` when ``path``
    is the same file as one of ``inputs`` (device and inode compared) or an
    existing special file (FIFO, device, socket), ``IsADirectoryError`` when
    it is a directory, ``PermissionError`` when it is an existing file the
    user may not write, and ``OSError`` when it cannot be examined (a
    symlink loop, for example)."""
    name = os.fspath(path)
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
def atomic_output(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: yields a binary file to write into.

    On normal exit of the ``with`` block the data is flushed to disk and
    the temporary file replaces the target (symlinks followed, permission
    bits of an existing target kept). On any exception, and on SIGTERM or
    SIGHUP, the temporary file is removed and the target is untouched.
    ``inputs``: files the output must not be (see :func:`check_output`).

    Raises what :func:`check_output` raises, and ``OSError`` when the
    temporary file cannot be created, written or renamed (naming
    ``path``, never the temporary file)."""
    name = os.fspath(path)
    target = check_output(name, inputs=inputs)
    try:
        old: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        old = None
    directory, base = os.path.split(target)
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    with _cleanup_on_signals():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(tmp, flags, 0o666)
        except OSError as exc:
            # Name the file the user asked for, not the temporary one.
            raise type(exc)(exc.errno, exc.strerror, name) from None
        try:
            with os.fdopen(fd, "wb") as f:
                if old is not None:
                    _copy_permissions(f.fileno(), tmp, old)
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _sync_directory(directory)


def _copy_permissions(fd: int, tmp: str, old: os.stat_result) -> None:
    if hasattr(os, "fchown"):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:
            pass  # not root: the file gets this user's owner (and group)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))
    else:  # pragma: no cover - Windows
        os.chmod(tmp, stat.S_IMODE(old.st_mode))


def _sync_directory(directory: str) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
