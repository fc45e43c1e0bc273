"""Atomic writes: the file appears whole or not at all, with the mode a plain ``open`` would give."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dgmrec_dgl.io_utils import atomic_folder, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.md", "x\n")
    atomic_write_bytes(tmp_path / "b.png", b"\x89PNG")
    atomic_write_json(tmp_path / "c.json", {"k": 1})
    for name in ("a.md", "b.png", "c.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": 1}
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_folder_appears_whole_and_replaces_only_what_it_is_told(tmp_path, umask_022):
    with atomic_folder(tmp_path / "new") as tmp:
        (Path(tmp) / "a").write_text("1")
        assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["a"]
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o755
    (tmp_path / "new" / "old").mkdir()
    (tmp_path / "new" / "keep").write_text("k")
    with atomic_folder(tmp_path / "new", replace=["old", "a"]) as tmp:
        (Path(tmp) / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["b", "keep"]
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "new", replace=["b", "keep"]) as tmp:
            (Path(tmp) / "c").write_text("3")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["b", "keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
