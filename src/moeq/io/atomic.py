"""Atomic writes: an output appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_directory", "ensure_output_free", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """The output path exists and overwriting was not asked for."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
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


def ensure_output_free(target: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless ``overwrite`` (checked early, before long work)."""
    if Path(target).exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; choose another --out or pass --overwrite")


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    On any error the temporary folder is removed and ``target`` is left as it was. An existing
    ``target`` is refused unless ``overwrite``; then it is swapped out only after the new folder is
    complete, so a crash never leaves a half-written output.
    """
    target = Path(target)
    ensure_output_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield work
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(work, target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
