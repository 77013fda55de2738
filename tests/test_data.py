"""data.py: splits, labels, masks, the channel convention and every bad-input error."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
import data


def test_train_and_val_are_disjoint_cover_train_good_and_are_seeded(rgb_root):
    cat = rgb_root / "synthetic"
    train, val = data.train_val_files(cat, 0.25, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val) == data.image_files(cat / "train" / "good")
    assert len(val) == 6  # 25 % of 24
    assert data.train_val_files(cat, 0.25, seed=0) == (train, val)
    assert data.train_val_files(cat, 0.25, seed=1)[1] != val


def test_splits_load_as_uint8_rgb_of_the_requested_size(rgb_root):
    split = data.load_split(rgb_root, "synthetic", "train", 32, val_fraction=0.25)
    assert split.images.shape == (18, 3, 32, 32) and split.images.dtype == torch.uint8
    assert (split.labels == 0).all() and (split.masks == 0).all()


def test_test_split_has_labels_defect_types_and_binary_masks(rgb_root):
    test = data.load_split(rgb_root, "synthetic", "test", 64)
    assert test.labels.tolist() == [0] * 4 + [1] * 4  # good images first
    assert test.defect_types == ["good"] * 4 + ["blob_or_scratch"] * 4
    assert test.masks.shape == (8, 1, 64, 64)
    assert set(test.masks.unique().tolist()) <= {0, 1}
    assert (test.masks[:4] == 0).all() and (test.masks[4:].flatten(1).sum(1) > 0).all()


def test_masks_line_up_with_the_defects_they_mark(rgb_root):
    """The synthetic defects are pure black or white: inside the mask pixels hit those values."""
    test = data.load_split(rgb_root, "synthetic", "test", 64)
    for image, mask in zip(test.images[4:], test.masks[4:]):
        inside = image[:, mask[0].bool()].float()
        extreme = (inside <= 20) | (inside >= 250)
        assert extreme.float().mean() > 0.9


def test_grayscale_categories_load_with_three_identical_channels(gray_root):
    split = data.load_split(gray_root, "synthetic_gray", "test", 32)
    assert split.images.shape[1] == 3
    assert torch.equal(split.images[:, 0], split.images[:, 1])
    assert torch.equal(split.images[:, 1], split.images[:, 2])


def make_category(tmp_path, name="cat"):
    return data.make_synthetic_category(tmp_path, name, size=16, n_train=4, n_good_test=1, n_defect_test=1)


@pytest.mark.parametrize("breakage, message", [
    ("missing_root", "does not exist"),
    ("missing_category", "categories found: cat"),
    ("category_as_root", "is itself a category folder"),
    ("empty_train", "no images in"),
    ("unreadable_image", "cannot read image"),
    ("missing_mask", "has no mask"),
    ("no_test_folder", r"no test folder .* detect.py --images"),  # a new line's own parts: train/good only
])
def test_bad_input_raises_one_clear_error(tmp_path, breakage, message):
    cat = make_category(tmp_path)
    root, category, split = tmp_path, "cat", "test"
    if breakage == "missing_root":
        root = tmp_path / "nowhere"
    elif breakage == "missing_category":
        category = "bottle"
    elif breakage == "category_as_root":
        root = cat
    elif breakage == "empty_train":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
        split = "train"
    elif breakage == "unreadable_image":
        (cat / "test" / "good" / "000.png").write_bytes(b"not a png")
    elif breakage == "missing_mask":
        next((cat / "ground_truth").rglob("*_mask.png")).unlink()
    elif breakage == "no_test_folder":
        shutil.rmtree(cat / "test")
    with pytest.raises(data.DatasetError, match=message) as err:
        data.load_split(root, category, split, 16)
    assert "\n" not in str(err.value)
    if breakage in ("unreadable_image", "missing_mask"):
        assert "000" in str(err.value)  # names the file


def test_scripts_print_one_error_line_not_a_traceback(tmp_path):
    make_category(tmp_path)
    r = subprocess.run([sys.executable, "train.py", "--model", "dae", "--category", "nope",
                        "--data-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "categories found: cat" in lines[0]
