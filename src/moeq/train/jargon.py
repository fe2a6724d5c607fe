"""A second text domain: the Jargon File 4.4.7 (public domain), from Debian's ``jargon-text`` package.

The default model is trained on Shakespeare; fine-tuning it on hacker slang gives a model whose
routers changed in a fine-tune, as in the Switch experiments of arXiv 2604.06515, so the true
router-norm change Λ exists (PAPERS.md §1). The package is fetched from the Debian archive (a
package registry this project may use), its SHA-256 checked, and the text read from the ``.deb``
in Python (an ``ar`` archive holding ``data.tar.xz``): no Debian tools are needed.

Splits are by lexicon entry (``:headword:`` paragraphs): entry ``i`` goes to test when
``i % 20 == 0``, to calibration when ``i % 20 == 1``, else to train; the front matter is dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import urllib.request
from pathlib import Path

__all__ = ["JARGON_URL", "fetch_jargon", "split_entries"]

JARGON_URL = "http://deb.debian.org/debian/pool/main/j/jargon-text/jargon-text_4.4.7-4.1_all.deb"
JARGON_SHA256 = "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"
MEMBER = "./usr/share/doc/jargon-text/jargon.txt.gz"
ENTRY = re.compile(r"^ {3}:[^:\n]+:", re.MULTILINE)


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the container of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb file starts with '!<arch>')")
    members, offset = {}, 8
    while offset + 60 <= len(data):
        header = data[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
    return members


def _download(cache: Path) -> bytes:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / JARGON_URL.rsplit("/", 1)[1]
    if not path.is_file():
        with urllib.request.urlopen(JARGON_URL, timeout=120) as response:
            path.write_bytes(response.read())
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != JARGON_SHA256:
        path.unlink()
        raise ValueError(f"{JARGON_URL} did not match its pinned SHA-256; the download was removed, try again")
    return data


def split_entries(text: str) -> dict[str, str]:
    """Train / calibration / test text from the Jargon File, split by lexicon entry."""
    starts = [m.start() for m in ENTRY.finditer(text)]
    entries = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)])]
    splits: dict[str, list[str]] = {"train": [], "calibration": [], "test": []}
    for i, entry in enumerate(entries):
        splits["test" if i % 20 == 0 else "calibration" if i % 20 == 1 else "train"].append(entry)
    return {name: "\n\n".join(parts) + "\n" for name, parts in splits.items()}


def fetch_jargon(cache: str | Path = Path("data/cache")) -> dict[str, str]:
    """The Jargon File's splits, downloading the Debian package into ``cache`` once."""
    members = _ar_members(_download(Path(cache)))
    tarball = next((members[n] for n in members if n.startswith("data.tar")), None)
    if tarball is None:
        raise ValueError("the jargon-text package has no data.tar member")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        text = gzip.decompress(archive.extractfile(MEMBER).read()).decode("utf-8")
    return split_entries(text)
