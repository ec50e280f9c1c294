"""Atomic file and folder writes (retrofit/atomic.py): complete or absent, never half; an existing
copy survives every failure; the usual permissions; leftovers of a killed write are recognisable."""

from __future__ import annotations

import json
import os
import stat

import pytest

from retrofit.atomic import (
    atomic_directory,
    atomic_file,
    is_temporary,
    remove_leftovers,
    replace_directory,
    write_file_atomic,
    write_json_atomic,
)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_writes_are_whole_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_json_atomic(target, {"a": [1, 2]}, indent=2)
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert mode(target) == 0o666 & ~umask()  # not tempfile's owner-only 0600
    write_file_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    # A writer that fails leaves the previous content and no temporary file.
    with pytest.raises(RuntimeError):
        with atomic_file(target, suffix=".png") as tmp:
            assert tmp.name.startswith(".result.json.tmp-") and tmp.suffix == ".png" and is_temporary(tmp)
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"\x00bytes" and os.listdir(target.parent) == ["result.json"]


def test_folder_writes_replace_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert is_temporary(tmp) and mode(tmp) == 0o777 & ~umask()
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first" and mode(target) == 0o777 & ~umask()
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("second, half written")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_replacing_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path):
    target, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileNotFoundError):  # the new copy vanished: the old one is put back
        replace_directory(new, target)
    assert (target / "old.txt").read_text() == "old"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_directory(new, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_killed_writes_are_removed_by_name(tmp_path):
    for name in (".data.tmp-abcd", ".data.old-1234", ".other.tmp-ef", ".hidden", "data", "plain.tmp-x"):
        (tmp_path / name).mkdir()
    assert remove_leftovers(tmp_path, "data") == [tmp_path / ".data.old-1234", tmp_path / ".data.tmp-abcd"]
    assert remove_leftovers(tmp_path) == [tmp_path / ".other.tmp-ef"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "data", "plain.tmp-x"]
    assert remove_leftovers(tmp_path / "missing") == []
