"""The one atomic writer: crash leaves the old content, temp names never collide, bytes and renames fsynced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from segvlm import atomic


class _Crash(Exception):
    pass


def test_crash_mid_write_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "mask.png"
    target.write_bytes(b"old")

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"ne")  # half of the new content, then the writer dies
        raise _Crash

    with pytest.raises(_Crash):
        atomic.write_atomic(target, half_write)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_crash_before_first_write_creates_no_final_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(_Crash), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise _Crash
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_success_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    atomic.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_temp_names_never_collide_and_carry_the_mark(tmp_path: Path) -> None:
    target = tmp_path / "x.tar"
    names = {atomic.temp_path(target).name for _ in range(1000)}
    assert len(names) == 1000
    for name in names:
        assert name.startswith(f"x.tar{atomic.TMP_MARK}{os.getpid()}-")


def test_two_open_writers_do_not_share_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic.atomic_path(target) as first, atomic.atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    # the inner block published first; the outer one then replaced it whole
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_fsyncs_the_file_then_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(mode)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    target = tmp_path / "m.json"
    atomic.write_bytes_atomic(target, b"{}")
    assert len(synced) == 2
    (file_path, file_is_dir), (dir_path, dir_is_dir) = synced
    assert Path(file_path).name.startswith(f"m.json{atomic.TMP_MARK}") and not file_is_dir
    assert Path(dir_path) == tmp_path and dir_is_dir


def test_publish_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights").write_bytes(b"old")
    (final / "stale").write_bytes(b"only in the old one")
    new = tmp_path / ".ckpt.tmp-new"
    new.mkdir()
    (new / "weights").write_bytes(b"new")
    atomic.publish_dir(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert (final / "weights").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # old copy and temp gone
