"""The tar header scanner behind the loaders agrees with ``tarfile`` and reports damage instead of failing."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from data_pipelines.reader import SampleRef, ShardReader, expand_shards, scan_tar, split_member_name

MEMBERS = [
    ("a" * 120 + "/k1.jpg", b"x" * 700),
    ("a" * 120 + "/k1.txt", b"hi"),
    ("dir/k2.json", b"{}"),
    ("k3.0.jpg", b""),
    ("k3.json", b"{}"),
    ("big", b"z" * 5000),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_scanner_matches_tarfile(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as archive:
        archive.addfile(_dir("somedir"))
        for name, data in MEMBERS:
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                name = name[-60:]  # ustar cannot hold long names without a prefix split
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime makes pax headers
            archive.addfile(info, io.BytesIO(data))
    groups, damage = scan_tar(path)
    assert damage == ""
    with tarfile.open(path) as archive:
        expected = sorted((m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isfile())
    found = sorted(
        (f"{key}.{ext}" if ext else key, offset, size)
        for key, members in groups
        for ext, (offset, size) in members.items()
    )
    assert found == expected
    reader = ShardReader([path])
    key, members = groups[-1]
    assert reader.read(SampleRef(0, key, members)) == {"": b"z" * 5000}


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_scanner_reports_damage(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in [("s1.jpg", b"1" * 600), ("s1.txt", b"one"), ("s2.jpg", b"2" * 600), ("s2.txt", b"two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    corrupt = bytearray(data)
    corrupt[512 * 5 + 10] ^= 0xFF  # blocks: s1.jpg header, 2 data, s1.txt header, 1 data, s2.jpg header (5)
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    groups, damage = scan_tar(tmp_path / "corrupt.tar")
    assert [k for k, _ in groups] == ["s1"] and "corrupt tar header" in damage
    (tmp_path / "cut.tar").write_bytes(data[: 512 * 6 + 100])  # inside s2.jpg's data
    groups, damage = scan_tar(tmp_path / "cut.tar")
    assert [k for k, _ in groups] == ["s1"] and "cut off" in damage
    (tmp_path / "nomarker.tar").write_bytes(data[: 512 * 10])  # all members, no end-of-archive blocks
    groups, damage = scan_tar(tmp_path / "nomarker.tar")
    assert [sorted(m) for _, m in groups] == [["jpg", "txt"], ["jpg", "txt"]] and "end-of-archive" in damage
    (tmp_path / "empty.tar").write_bytes(b"")
    assert scan_tar(tmp_path / "empty.tar") == ([], "not a readable tar file (empty file)")


def test_shard_specs(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"d-{i:03d}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "d-{000..002}.tar")) == [tmp_path / f"d-{i:03d}.tar" for i in range(3)]
    assert expand_shards(tmp_path) == expand_shards(str(tmp_path / "*.tar"))
    assert expand_shards([str(tmp_path / "d-001.tar"), str(tmp_path / "d-00*.tar")])[0] == tmp_path / "d-001.tar"
    with pytest.raises(FileNotFoundError, match="d-{003..004}"):
        expand_shards([str(tmp_path / "d-000.tar"), str(tmp_path / "d-{003..004}.tar")])
    with pytest.raises(ValueError, match="empty"):
        expand_shards([])
    assert split_member_name("dir/abc.0.jpg") == ("dir/abc", "0.jpg")
    assert split_member_name("key") == ("key", "")
