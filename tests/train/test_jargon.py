"""The second-domain corpus: splitting by lexicon entry and reading a .deb without Debian tools."""

import gzip
import io
import tarfile

import pytest

from moeq.train.jargon import MEMBER, _ar_members, split_entries


def test_entries_are_split_by_index() -> None:
    text = "front matter, dropped\n\n" + "".join(f"   :word{i}: n.\n\n   meaning {i}\n\n" for i in range(40))
    splits = split_entries(text)
    assert "front matter" not in "".join(splits.values())
    assert splits["test"].count(":word") == 2 and ":word0:" in splits["test"] and ":word20:" in splits["test"]
    assert splits["calibration"].count(":word") == 2 and ":word21:" in splits["calibration"]
    assert splits["train"].count(":word") == 36


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + (b"\n" if len(data) % 2 else b"")
    return out


def test_deb_members_are_read() -> None:
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as archive:
        text = gzip.compress(b"   :hack: n.\n\n   a quick job\n")
        info = tarfile.TarInfo(MEMBER)
        info.size = len(text)
        archive.addfile(info, io.BytesIO(text))
    members = _ar_members(_ar({"debian-binary": b"2.0\n", "data.tar.xz": payload.getvalue()}))
    assert members["debian-binary"] == b"2.0\n"
    with tarfile.open(fileobj=io.BytesIO(members["data.tar.xz"])) as archive:
        assert b"a quick job" in gzip.decompress(archive.extractfile(MEMBER).read())
    with pytest.raises(ValueError, match="not an ar archive"):
        _ar_members(b"PK\x03\x04")
