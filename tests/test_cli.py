"""The `dgmrec-dgl data` commands on real splits and on generated data."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import shared_split
from dgmrec_dgl.cli import main
from dgmrec_dgl.data.masks import MissingMask


def table(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        label, _, value = line.rpartition("  ")
        rows[label.strip()] = value.strip()
    return rows


def test_check_tiktok_prints_the_published_statistics(capsys):
    folder = shared_split("tiktok")
    assert main(["data", "check", str(folder), "--inter", "tiktok.inter"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["users"] == "9,308" and rows["items"] == "6,710"
    assert rows["interactions"] == "68,722" and rows["sparsity"] == "99.89%"


def test_check_baby_with_the_shipped_mask(capsys):
    folder = shared_split("baby")
    assert main(["data", "check", str(folder), "--inter", "baby_del.inter",
                 "--mask", str(folder / "missing_items_0.666.npz")]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["missing text only"] == "1,174"
    assert rows["missing image only"] == "1,176"
    assert rows["missing both (image+text)"] == "2,350"


def test_mask_command_writes_nested_even_masks(tiny_dir, capsys):
    assert main(["data", "mask", str(tiny_dir), "--ratio", "0.25,0.5,0.75,1", "--seed", "7"]) == 0
    paths = [tiny_dir / f"missing_items_{r}.npz" for r in ("0.25", "0.5", "0.75", "1")]
    masks = [MissingMask.load(p, 8) for p in paths]
    for low, high in zip(masks, masks[1:]):
        for m in ("image", "text"):
            assert not (low.missing(m) & ~high.missing(m)).any()
    assert masks[-1].counts() == {"t": 2, "v": 2, "all": 4}
    assert "wrote" in capsys.readouterr().out


def test_mask_command_needs_modalities_without_features(tmp_path, tiny_dir, capsys):
    for f in ("image_feat.npy", "text_feat.npy"):
        (tiny_dir / f).unlink()
    assert main(["data", "mask", str(tiny_dir), "--ratio", "0.5"]) == 2
    assert "--modalities" in capsys.readouterr().err
    assert main(["data", "mask", str(tiny_dir), "--ratio", "1/2", "--modalities", "image,text,audio"]) == 0


def test_bad_ratio_is_an_argument_error(tiny_dir):
    with pytest.raises(SystemExit) as exc:
        main(["data", "mask", str(tiny_dir), "--ratio", "1.5"])
    assert exc.value.code == 2


def test_console_script_entry_point_runs(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "dgmrec_dgl.cli", "data", "check", str(tiny_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "items" in proc.stdout
    np.testing.assert_equal(proc.stderr, "")
