"""tools/elpv_layout.py: ELPV's labelled cells become a category in the MVTec layout."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import data  # noqa: E402
import elpv_layout  # noqa: E402

LABELS = [("images/cell0001.png", "1.0", "mono"), ("images/cell0002.png", "0.0", "poly"),
          ("images/cell0003.png", "0.3333333333333333", "mono"), ("images/cell0004.png", "0.0", "mono"),
          ("images/cell0005.png", "0.0", "poly"), ("images/cell0006.png", "1.0", "poly"),
          ("images/cell0007.png", "0.0", "mono"), ("images/cell0008.png", "0.0", "poly"),
          ("images/cell0009.png", "0.6666666666666666", "poly")]


def fake_elpv(root):
    (root / "images").mkdir(parents=True)
    for i, (image, _, _) in enumerate(LABELS):
        Image.fromarray(np.full((32, 32), 20 * i, np.uint8)).save(root / image)
    (root / "labels.csv").write_text("".join(f"{a}  {b}  {c}\n" for a, b, c in LABELS))


def test_good_cells_split_every_fourth_to_test_defective_by_type_uncertain_left_out(tmp_path):
    fake_elpv(tmp_path / "elpv")
    elpv_layout.main(["--elpv", str(tmp_path / "elpv"), "--data-root", str(tmp_path / "mvtec")])
    cat = tmp_path / "mvtec" / "solar_cells"
    files = sorted(str(p.relative_to(cat)) for p in cat.rglob("*.png"))
    assert files == ["test/defective_mono/cell0001.png", "test/defective_poly/cell0006.png",
                     "test/good/poly_cell0002.png", "test/good/poly_cell0008.png",
                     "train/good/mono_cell0004.png", "train/good/mono_cell0007.png", "train/good/poly_cell0005.png"]
    # the copies are the images themselves, and the project reads them as a grey category
    assert np.array_equal(np.asarray(Image.open(cat / "test/good/poly_cell0008.png")), np.full((32, 32), 140, np.uint8))
    test = data.load_split(tmp_path / "mvtec", "solar_cells", "test", 32)
    assert sorted(set(test.defect_types)) == ["defective_mono", "defective_poly", "good"] and test.unmasked


def test_a_broken_labels_line_or_a_missing_image_is_one_error_line_and_nothing_written(tmp_path):
    fake_elpv(tmp_path / "elpv")
    labels = tmp_path / "elpv" / "labels.csv"
    labels.write_text(labels.read_text() + "images/cell0010.png  mono\n")
    with pytest.raises(SystemExit, match=r"line 10 is not 'image probability type'"):
        elpv_layout.main(["--elpv", str(tmp_path / "elpv"), "--data-root", str(tmp_path / "mvtec")])
    fake_elpv(tmp_path / "other")
    (tmp_path / "other" / "images" / "cell0004.png").unlink()
    with pytest.raises(SystemExit, match=r"1 images named in labels.csv are missing, e\.g\. .*cell0004\.png"):
        elpv_layout.main(["--elpv", str(tmp_path / "other"), "--data-root", str(tmp_path / "mvtec")])
    assert not (tmp_path / "mvtec").exists()
