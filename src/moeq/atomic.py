"""Atomic writes: an output appears complete under its final name, or not at all.

Also the rules every writer shares, checked before long work starts: an output never overlaps
an input (the same path, inside it, or holding it), its parent folder must be writable, and only
one moeq process writes a given output at a time (:class:`OutputLock`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

__all__ = [
    "atomic_write_text", "atomic_directory", "ensure_output_free", "OutputExistsError", "OutputLock",
    "OutputBusyError", "OutputNotWritableError", "OutputWriteError", "write_failure", "OverlapsInputError", "publish",
]


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


class OverlapsInputError(ValueError):
    """The output path is an input, lies inside one, or holds one: writing it would change a source."""


class OutputBusyError(RuntimeError):
    """Another live moeq process is writing the same output."""


class OutputWriteError(RuntimeError):
    """Writing an output failed (a full disk, an I/O error); what was finished is said in the message."""


def write_failure(err: Exception) -> str:
    """The cause of a failed write in a few words ("the disk is full", or the system's own)."""
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "the disk is full"
    return getattr(err, "strerror", None) or (text.splitlines()[0] if text.strip() else type(err).__name__)


class OutputNotWritableError(PermissionError):
    """The output's folder cannot be written (permissions, a read-only file system, not a folder)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _refuse_overlap(target: Path, inputs: Iterable[str | Path]) -> None:
    out = Path(os.path.abspath(target)).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.abspath(given)).resolve()
        if out == source:
            why = "is the input"
        elif out.is_relative_to(source):
            why = "lies inside the input"
        elif source.is_relative_to(out):
            why = "holds the input"
        else:
            continue
        raise OverlapsInputError(f"the output {target} {why} {given}; moeq never writes into its inputs: choose an output outside it")


def _writable_parent(target: Path) -> None:
    parent = Path(os.path.abspath(target)).parent
    while not parent.exists():  # the first existing ancestor is where folders will be created
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        with tempfile.TemporaryFile(dir=parent):  # a real write: permissions, read-only mounts, root
            pass
    except OSError as err:
        raise OutputNotWritableError(
            f"cannot write into {parent} ({err.strerror or err}); choose an output location you can write to"
        ) from None


def ensure_output_free(target: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before long work: an existing output path unless ``overwrite``, an output that
    overlaps one of ``inputs``, and an output whose parent folder is not writable."""
    target = Path(target)
    _refuse_overlap(target, inputs)
    if target.exists() and not overwrite:
        kind = "file" if target.is_file() else "folder"
        raise OutputExistsError(f"output {kind} {target} already exists; choose another --out or pass --overwrite")
    _writable_parent(target)


class OutputLock:
    """Held while one process writes ``target``: a second process is refused in one line.

    An advisory ``flock`` on a hidden sibling file ``.<name>.lock`` holding the owner's process id.
    The kernel drops the lock when its process dies, so a lock left by a killed run is stale by
    construction and simply taken over; the file itself is removed on release.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputWriteError(f"cannot create {self.path}: {write_failure(err)}; choose another output location") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(
                    f"another moeq run (process {owner}) is writing {self.target}; wait for it to finish, or stop it and rerun"
                ) from None
            try:  # the file may have been removed by its previous owner between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def publish(work: Path, target: Path) -> None:
    """Rename the finished folder ``work`` to ``target``; an existing ``target`` is swapped out
    only after the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(work, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(work, target)


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was. An existing
    ``target`` is refused unless ``overwrite``; then it is swapped out only after the new folder is
    complete, so a crash never leaves a half-written output. ``inputs`` may not overlap ``target``;
    a second process writing the same ``target`` meanwhile is refused.
    """
    target = Path(target)
    inputs = list(inputs)
    ensure_output_free(target, overwrite, inputs)
    with OutputLock(target):
        ensure_output_free(target, overwrite, inputs)  # again, now that no other run can create it
        try:
            work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        except OSError as err:
            raise OutputWriteError(f"cannot create a folder beside {target}: {write_failure(err)}; choose another output location") from None
        try:
            yield work
            publish(work, target)
        except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
            shutil.rmtree(work, ignore_errors=True)
            kept = f"{target} is as it was" if target.exists() else f"nothing was written to {target}"
            raise OutputWriteError(f"writing {target} failed: {write_failure(err)}; {kept}: fix it and rerun") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
