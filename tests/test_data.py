"""data.py: splits, labels, masks, the channel convention and every bad-input error."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, long_part, mottled, unevenly_lit
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


def test_the_parts_span_leaves_out_a_speck_and_is_the_whole_image_without_a_part():
    part = np.zeros((100, 100), bool)
    part[20:40, 50:90] = True  # 20 rows, 40 columns
    part[95, 2] = True  # a speck of dust far away
    cy, cx, height, width = data.part_span(part)
    assert abs(cy - 0.30) < 0.02 and abs(cx - 0.70) < 0.02 and abs(height - 0.2) < 0.02 and abs(width - 0.4) < 0.02
    assert data.part_span(np.zeros((8, 8), bool)) == (0.5, 0.5, 1.0, 1.0)


def test_specks_of_noise_on_a_plain_table_are_not_taken_for_the_part():
    """3 % of the table's pixels 30 levels off (the border rule lets 5 % through): the part's box
    stays the part's; without the median each speck would count and the box fill the frame."""
    table = np.full((64, 64, 3), 200, np.uint8)
    table[20:30, 10:20] = 60  # the part
    specks = np.random.default_rng(0).random((64, 64)) < 0.03
    table[specks & (table[..., 0] == 200)] = 170
    cy, cx, height, width = data.part_span(data.away_from(table, [200, 200, 200]))
    assert abs(cy - 25 / 64) < 0.02 and abs(cx - 15 / 64) < 0.02 and height < 0.2 and width < 0.2


def test_a_zoomed_image_and_its_mask_are_cut_to_the_same_window_around_the_part(small_parts_root):
    """The window follows the part wherever it lies, past the image's edge if need be (filled with
    more of the table), and the mask is cut with it: the marked pixels are the dark spot's, and
    there are many more of them than when the whole frame is resized."""
    whole = data.load_split(small_parts_root, "small_parts", "test", 32)
    zoomed = data.load_split(small_parts_root, "small_parts", "test", 32, zoom={"side": 0.3})
    assert zoomed.images.shape == whole.images.shape and zoomed.masks.shape == whole.masks.shape
    for image, mask in zip(zoomed.images, zoomed.masks):
        part = data.away_from(image.permute(1, 2, 0).numpy(), [24, 24, 24])
        cy, cx, _, _ = data.part_span(part)
        assert abs(cy - 0.5) < 0.1 and abs(cx - 0.5) < 0.1  # the part in the window's middle
        if mask.any():
            assert image[:, mask[0].bool()].float().mean() < image[:, torch.from_numpy(part)].float().mean() / 2
    assert zoomed.masks[4:].sum() > 5 * whole.masks[4:].sum()
    corner = Image.new("RGB", (40, 40), (24, 24, 24))
    corner.paste((200, 200, 200), (0, 0, 8, 8))  # a part at the image's corner
    where, table = data.part_box(corner, {"side": 0.5}, 40)
    assert where.box == (-6, -6, 14, 14) and not where.side  # centred on the part, past the edges
    window = np.asarray(data.cut_window(corner, where, table))
    assert (window[:6] == 24).all() and (window[:, :6] == 24).all() and (window[6:14, 6:14] == 200).all()


def test_a_long_parts_axis_points_from_its_heavy_end_and_a_turned_window_lays_it_left_to_right():
    """A screw-like part at 35 degrees: part_axis finds its angle, centre and length; its turned
    window shows it across the middle, head on the left, and its mask turns with it."""
    part = long_part(128, np.radians(35), (70, 60))
    cy, cx, length, width, angle = data.part_axis(part)
    assert abs(np.degrees(angle) - 35) < 2 and abs(cy - 70) < 1.5 and abs(cx - 60) < 1.5
    assert abs(length - 60) < 3 and abs(width - 12) < 3
    assert abs(np.degrees(data.part_axis(long_part(128, np.radians(215), (70, 60)))[4]) % 360 - 215) < 2
    im = Image.fromarray(np.where(part, 60, 200).astype(np.uint8)).convert("RGB")
    window, table = data.part_box(im, {"side": 0.6, "turn": True}, 128)
    turned = np.asarray(data.cut_window(im, window, table))[..., 0] < 130
    assert turned.shape == (77, 77) and abs(data.part_axis(turned)[4]) < np.radians(3)
    columns = turned.sum(0)  # the part's height in each column: the head is the tall end
    ys, xs = np.nonzero(turned)
    assert abs(ys.mean() - 38.5) < 2 and xs.min() > 2 and xs.max() < 74
    assert columns[xs.min():xs.min() + 8].mean() > 2 * columns[xs.max() - 8:xs.max() + 1].mean()
    mask = Image.fromarray(part.astype(np.uint8))  # the mask of the whole part, cut the same way
    cut = np.asarray(data.cut_window(mask, window, resample=Image.NEAREST))
    assert set(np.unique(cut)) <= {0, 1} and (cut.astype(bool) ^ turned).sum() < 0.1 * turned.sum()  # edges alone


def test_a_turned_windows_image_and_mask_show_each_part_left_to_right_with_the_defect_where_it_was(tmp_path):
    """Screw-like parts at any angle, each with its tip half masked: in every turned window the
    part lies left to right, head first, and the mask covers the right half of what it shows."""
    rng = np.random.default_rng(0)
    folder, truth = tmp_path / "screws/test/tip", tmp_path / "screws/ground_truth/tip"
    folder.mkdir(parents=True), truth.mkdir(parents=True)
    for i, degrees in enumerate((10, 100, 200, 290)):
        angle, centre = np.radians(degrees), rng.uniform(45, 83, 2)
        part = long_part(128, angle, centre)
        tip = part & ~long_part(128, angle, centre - 15 * np.array([np.sin(angle), np.cos(angle)]), length=30)
        Image.fromarray(np.where(part, 60, 200).astype(np.uint8)).save(folder / f"{i:03d}.png")
        Image.fromarray(tip.astype(np.uint8) * 255).save(truth / f"{i:03d}_mask.png")
    test = data.load_split(tmp_path, "screws", "test", 64, zoom={"side": 0.6, "turn": True})
    for image, mask in zip(test.images, test.masks):
        part = image[0].numpy() < 130
        ys, xs = np.nonzero(part)
        assert abs(np.degrees(data.part_axis(part)[4])) < 5 and abs(ys.mean() - 32) < 2
        marked = np.nonzero(mask[0].numpy())[1]
        assert len(marked) > 50 and abs(marked.min() - (xs.min() + xs.max()) / 2) < 3
        assert part[mask[0].bool().numpy()].mean() > 0.9


def test_a_part_on_a_mottled_table_is_found_where_it_lies():
    """Blotches of 3 grey levels still make a plain border, but their darkest and brightest spots
    lie beyond 16/255 all over the frame: the part's box is the part's only because each image's
    own blotchiness raises its tolerance."""
    images = mottled()
    assert data.plain_background(images)[0]
    parts, _ = data.parts_of(images)
    for image, part, table in zip(images, parts, data.tables_of(images)):
        dark = (image[0] < 120).nonzero().float().mean(0) / 128  # the square's centre
        cy, cx, height, width = data.part_span(part)
        assert abs(cy - dark[0]) < 0.02 and abs(cx - dark[1]) < 0.02 and height < 0.15 and width < 0.15
        at_plain_tolerance = data.away_from(image.permute(1, 2, 0).numpy(), table.permute(1, 2, 0).numpy())
        assert data.part_span(at_plain_tolerance)[2] > 0.5


def test_dust_on_the_table_is_not_taken_for_the_part():
    """A thin part (3 x 30 px) and a speck of dust (3 x 3 px) far from it: the speck is a tenth of
    what lies away from the table, too much for the box's percentiles to leave out, but it is a
    piece of its own, so the part's box stays the part's. A piece beside the part belongs to it."""
    image = np.full((128, 128, 3), 180, np.uint8)
    image[40:43, 20:50] = 60  # the part
    image[110:113, 110:113] = 90  # dust
    images = torch.from_numpy(image).permute(2, 0, 1)[None]
    everything = data.away_from(image, [180, 180, 180])
    assert data.part_span(everything)[3] > 0.5  # the box over part and dust
    cy, cx, height, width = data.part_span(data.parts_of(images)[0][0])
    assert abs(cy - 41.5 / 128) < 0.02 and abs(cx - 35 / 128) < 0.02 and width < 0.3
    image[45:48, 52:56] = 60  # a second piece of the part, 2 px below the first
    away = data.away_from(image, [180, 180, 180])
    assert away[45:48, 52:56].any() and (data.main_part(away) == away)[:100].all()


def test_a_table_lit_unevenly_is_plain_and_each_images_part_is_found_on_it():
    """The table's colour changes by 40 levels across the border; each image's fitted table
    follows it, so the border is plain, the part alone is away from the table, and a window
    past the edge continues the table without a seam."""
    images = unevenly_lit()
    plain, share = data.plain_background(images)
    assert plain and share > 0.99
    one_colour = images[..., :2, :].float()  # the top edge alone already spans more than the tolerance
    assert one_colour.amax() - one_colour.amin() > data.PLAIN_TOLERANCE * 255
    tables = data.tables_of(images)
    for image, table in zip(images, tables):
        part = data.away_from(image.permute(1, 2, 0).numpy(), table.permute(1, 2, 0).numpy())
        assert 12 * 12 - 4 <= part.sum() <= 12 * 12  # the 3 x 3 median rounds off the square's 4 corners
        assert data.part_span(part)[2] < 0.2
    im = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    where, table = data.part_box(im, {"side": 0.8}, 64)
    window = np.asarray(data.cut_window(im, where, table), np.float32)
    left, top = -where.box[0], -where.box[1]
    assert left > 0 or top > 0  # the window reaches past an edge
    seam = window[top:top + 64, left] - window[top:top + 64, left - 1] if left > 0 else \
        window[top, left:left + 64] - window[top - 1, left:left + 64]
    assert np.abs(seam).max() <= 3


def test_a_part_at_the_edge_does_not_pull_the_fitted_table():
    """A part covering a sixth of an image's border is left out of the fit: the table's pixels
    lie on the fitted table, the part's far off it."""
    images = torch.full((1, 3, 32, 32), 22, dtype=torch.uint8)
    images[0, :, :12, :12] = 230  # 44 of the 240 border pixels
    tables, off = data.table_fit(images)
    assert (off <= 1).sum() == 240 - 44 and (off > 200).sum() == 44
    assert torch.allclose(tables[0, :, 0], torch.full((3,), 22.0, dtype=torch.float64), atol=0.5)
