"""Bad input: `dgmrec-dgl data check` exits 2 with one line naming the file, the field and the fix."""

import numpy as np
import pytest

from conftest import tiny_rows, write_inter
from dgmrec_dgl.cli import main


def run_check(capsys, folder, *extra):
    code = main(["data", "check", str(folder), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if not line.startswith("warning:")]


def assert_one_line_error(code, lines, file_part, field):
    assert code == 2
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and file_part in line and f": {field}:" in line and "; fix: " in line


def test_valid_folder_passes(tiny_dir, capsys):
    assert main(["data", "check", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "users" in out and "image 16, text 4" in out


@pytest.mark.parametrize("header, field", [
    ("userID\titem_id\tx_label", "itemID"),
    ("user\titemID\tx_label", "userID"),
    ("userID\titemID\tlabel", "x_label"),
])
def test_missing_or_renamed_column(tiny_dir, capsys, header, field):
    write_inter(tiny_dir / "tiny.inter", tiny_rows(), header=header)
    assert_one_line_error(*run_check(capsys, tiny_dir), "tiny.inter", field)


@pytest.mark.parametrize("bad, field", [("abc", "userID"), ("1.5", "userID"), ("-3", "userID")])
def test_non_integer_or_negative_user_id(tiny_dir, capsys, bad, field):
    rows = tiny_rows()
    rows[3] = (bad, rows[3][1], rows[3][2])
    write_inter(tiny_dir / "tiny.inter", rows)
    assert_one_line_error(*run_check(capsys, tiny_dir), "tiny.inter", field)


def test_negative_item_id(tiny_dir, capsys):
    rows = tiny_rows()
    rows[0] = (rows[0][0], -1, 0)
    write_inter(tiny_dir / "tiny.inter", rows)
    assert_one_line_error(*run_check(capsys, tiny_dir), "tiny.inter", "itemID")


def test_label_outside_0_1_2(tiny_dir, capsys):
    rows = tiny_rows()
    rows[5] = (rows[5][0], rows[5][1], 3)
    write_inter(tiny_dir / "tiny.inter", rows)
    assert_one_line_error(*run_check(capsys, tiny_dir), "tiny.inter", "x_label")


def test_empty_train_split(tiny_dir, capsys):
    rows = [(u, i, 1 if lab == 0 else lab) for u, i, lab in tiny_rows()]
    write_inter(tiny_dir / "tiny.inter", rows)
    code, lines = run_check(capsys, tiny_dir)
    assert_one_line_error(code, lines, "tiny.inter", "x_label")
    assert "train split is empty" in lines[0]


def test_feature_rows_differ_from_item_count(tiny_dir, capsys):
    np.save(tiny_dir / "text_feat.npy", np.ones((5, 4), np.float32))
    assert_one_line_error(*run_check(capsys, tiny_dir), "text_feat.npy", "text features")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_features(tiny_dir, capsys, value):
    feats = np.ones((8, 16), np.float32)
    feats[6, 2] = value
    np.save(tiny_dir / "image_feat.npy", feats)
    code, lines = run_check(capsys, tiny_dir)
    assert_one_line_error(code, lines, "image_feat.npy", "image features")
    assert "row 6" in lines[0]


def test_truncated_npy(tiny_dir, capsys):
    path = tiny_dir / "image_feat.npy"
    path.write_bytes(path.read_bytes()[:200])
    assert_one_line_error(*run_check(capsys, tiny_dir), "image_feat.npy", "image features")


def test_unreadable_npy(tiny_dir, capsys):
    (tiny_dir / "text_feat.npy").write_text("this is not numpy")
    assert_one_line_error(*run_check(capsys, tiny_dir), "text_feat.npy", "text features")


def test_pickled_feature_file_is_refused(tiny_dir, capsys):
    np.save(tiny_dir / "text_feat.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, lines = run_check(capsys, tiny_dir)
    assert_one_line_error(code, lines, "text_feat.npy", "text features")
    assert "holds pickled Python objects" in lines[0]      # (the tmp folder's name holds "pickled" too)


def test_mask_id_out_of_range(tiny_dir, capsys):
    np.savez(tiny_dir / "mask.npz", t=np.array([1, 2]), v=np.array([3]), all=np.array([8]))
    code, lines = run_check(capsys, tiny_dir, "--mask", str(tiny_dir / "mask.npz"))
    assert_one_line_error(code, lines, "mask.npz", "key 'all'")
    assert "item id 8" in lines[0]


def test_pickled_mask_needs_the_flag(tiny_dir, capsys):
    groups = {"t": np.array([1, 2]), "v": np.array([3]), "all": np.array([4])}
    np.save(tiny_dir / "mask.npy", groups, allow_pickle=True)
    code, lines = run_check(capsys, tiny_dir, "--mask", str(tiny_dir / "mask.npy"))
    assert_one_line_error(code, lines, "mask.npy", "file")
    assert "--allow-pickle" in lines[0]
    # with the flag it loads, and says that unpickling is unsafe
    assert main(["data", "check", str(tiny_dir), "--mask", str(tiny_dir / "mask.npy"), "--allow-pickle"]) == 0
    captured = capsys.readouterr()
    assert "missing text only" in captured.out and "warning:" in captured.err


def test_mask_with_unknown_key(tiny_dir, capsys):
    np.savez(tiny_dir / "mask.npz", tx=np.array([1]))
    assert_one_line_error(*run_check(capsys, tiny_dir, "--mask", str(tiny_dir / "mask.npz")), "mask.npz", "key 'tx'")


def test_mask_item_under_two_keys(tiny_dir, capsys):
    np.savez(tiny_dir / "mask.npz", t=np.array([1, 2]), v=np.array([2]))
    code, lines = run_check(capsys, tiny_dir, "--mask", str(tiny_dir / "mask.npz"))
    assert_one_line_error(code, lines, "mask.npz", "keys")
    assert "item 2" in lines[0]


def test_missing_folder_and_missing_inter(tmp_path, capsys):
    assert_one_line_error(*run_check(capsys, tmp_path / "nope"), "nope", "folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_check(capsys, tmp_path / "empty"), "empty", "inter")


def test_duplicates_are_dropped_with_a_warning(tiny_dir, capsys):
    rows = tiny_rows()
    write_inter(tiny_dir / "tiny.inter", rows + rows[:3])
    assert main(["data", "check", str(tiny_dir)]) == 0
    captured = capsys.readouterr()
    assert "dropped 3 duplicate" in captured.err
    table = dict(line.split(None, 1)[::1] for line in captured.out.splitlines() if line.startswith("interactions"))
    assert table["interactions"].strip() == f"{len(rows)}"


def test_pickle_never_executed_without_flag(tiny_dir):
    """A malicious pickle is refused before anything is unpickled."""
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    path = tiny_dir / "evil.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array(fh, np.array([Boom()], dtype=object), allow_pickle=True)
    assert main(["data", "check", str(tiny_dir), "--mask", str(path)]) == 2
