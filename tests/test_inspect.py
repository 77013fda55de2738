"""detect.py on new images (--images), on test sets without masks, with a stored calibration,
and over every trained class (--class all), on a tiny synthetic category."""
import csv
import shutil

import numpy as np
import pytest
import torch

import data
import detect
import train
from test_robustness import error_line, run_script

CATEGORY = "synthetic"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DAE trained 2 epochs at 32 px on 12 good images (1 held out for val)."""
    base = tmp_path_factory.mktemp("inspect")
    root, runs = base / "data", base / "runs"
    data.make_synthetic_category(root, CATEGORY, size=32, n_train=12, n_good_test=3, n_defect_test=3)
    train.main(["--model", "dae", "--category", CATEGORY, "--data-root", str(root), "--size", "32",
                "--epochs", "2", "--batch-size", "8", "--runs", str(runs)])
    return base, root, runs


@pytest.fixture
def setup(trained, tmp_path):
    """A private copy of the data and the run, so calibrations and deletions stay in one test."""
    base, root, runs = trained
    shutil.copytree(root, tmp_path / "data")
    shutil.copytree(runs, tmp_path / "runs")
    return tmp_path / "data", tmp_path / "runs", tmp_path / "results"


def detect_main(root, runs, results, *extra):
    return detect.main(["--class", CATEGORY, "--runs", str(runs), "--data-root", str(root),
                        "--results", str(results), *map(str, extra)])


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def calibration_line(capsys):
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("calibration:"))


def test_images_score_exactly_like_the_labelled_run_from_the_stored_calibration(setup, capsys):
    root, runs, results = setup
    labelled = detect_main(root, runs, results, "--no-pictures")
    assert calibration_line(capsys).startswith("calibration: computed on 1 val / 11 train images, stored in")
    shutil.rmtree(root / CATEGORY / "train")  # the stored calibration needs no training image again
    test = root / CATEGORY / "test"
    new = detect_main(root, runs, results, "--images", test / "good", test / "blob_or_scratch")
    assert calibration_line(capsys).startswith("calibration: reused")
    rows = read_rows(results / CATEGORY / "scores.csv")
    inspected = read_rows(f"{new['out']}/scores.csv")
    assert [r["path"] for r in inspected] == [r["path"] for r in rows]
    assert [r["score"] for r in inspected] == [r["score"] for r in rows]
    assert [r["verdict"] == "defect" for r in inspected] == [r["predicted_label"] == "1" for r in rows]
    assert {r["threshold"] for r in inspected} == {f"{labelled['threshold']:.6g}"}
    assert new["images"] == 6 and new["exit_code"] == 0
    assert len(list((results / CATEGORY / "inspect").glob("*/*_viz.png"))) == 6


def test_images_from_a_glob_go_to_a_fresh_folder_each_run(setup, capsys):
    root, runs, results = setup
    pattern = str(root / CATEGORY / "test" / "*" / "*.png")
    first = detect_main(root, runs, results, "--images", pattern, "--no-pictures")
    second = detect_main(root, runs, results, "--images", pattern, "--no-pictures")
    assert first["out"] != second["out"] and first["images"] == second["images"] == 6
    out = capsys.readouterr().out
    assert "calibration: computed" in out and "calibration: reused" in out
    assert f"6 images, {first['flagged']} flagged as defective" in out


def test_changing_the_map_or_a_setting_or_the_checkpoint_never_reuses_the_calibration(setup, capsys):
    root, runs, results = setup
    detect_main(root, runs, results, "--no-pictures", "--map", "ssim")
    assert calibration_line(capsys).startswith("calibration: computed")
    detect_main(root, runs, results, "--no-pictures", "--map", "l2")  # another map: its own
    assert calibration_line(capsys).startswith("calibration: computed")
    detect_main(root, runs, results, "--no-pictures", "--map", "ssim", "--sigma", "2")
    assert calibration_line(capsys).startswith("calibration: recomputed (sigma 3.0 -> 2.0)")
    detect_main(root, runs, results, "--no-pictures", "--map", "ssim", "--sigma", "2", "--close", "0")
    assert calibration_line(capsys).startswith("calibration: recomputed (close 6 -> 0)")
    best = runs / CATEGORY / "dae" / "best.pt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["model_state"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model_state"].items()}
    torch.save(ckpt, best)  # as if trained again
    detect_main(root, runs, results, "--no-pictures", "--map", "ssim", "--sigma", "2", "--close", "0")
    assert calibration_line(capsys).startswith("calibration: recomputed (the checkpoint file changed)")


def test_a_test_set_without_masks_gives_image_metrics_and_null_pixel_metrics(setup, capsys):
    root, runs, results = setup
    shutil.rmtree(root / CATEGORY / "ground_truth")
    metrics = detect_main(root, runs, results)
    assert metrics["pixel_auroc"] is None and metrics["aupro_0.3"] is None
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["f1"] <= 1
    assert "pixel metrics unavailable (null): no ground_truth/ masks for blob_or_scratch" in capsys.readouterr().out
    assert len(list((results / CATEGORY).glob("*_viz.png"))) == 6


def test_a_thin_calibration_is_warned_about_and_counted(setup, capsys):
    root, runs, results = setup
    metrics = detect_main(root, runs, results, "--no-pictures")
    assert metrics["val_images"] == 1 and metrics["expected_good_flagged (k/(val+1))"] == 0.5
    assert ("warning: the threshold rests on 1 val image, so about 50% of good images will be flagged "
            "(1/(n+1)); add good images to train/good, or train with a larger --val-fraction") in capsys.readouterr().out


def test_own_category_with_only_good_images_works_end_to_end(tmp_path):
    good = tmp_path / "data" / "parts" / "train" / "good"
    shutil.copytree(data.make_synthetic_category(tmp_path / "gen", "g", size=32, n_train=12) / "train" / "good", good)
    new = tmp_path / "line"
    shutil.copytree(tmp_path / "gen" / "g" / "test" / "blob_or_scratch", new)
    runs = tmp_path / "runs"
    code, _, stderr = run_script("train.py", "--model", "dae", "--category", "parts", "--data-root",
                                 tmp_path / "data", "--size", "32", "--epochs", "1",
                                 "--runs", runs)
    assert code == 0, stderr
    args = ["--class", "parts", "--runs", runs, "--results", tmp_path / "results", "--images", new]
    code, stdout, stderr = run_script("detect.py", *args)
    assert code == 0, stderr
    assert "4 images," in stdout
    code, stdout, stderr = run_script("detect.py", *args, "--threshold=-1e9", "--fail-on-defect")
    assert code == 3 and "4 images, 4 flagged" in stdout


def test_images_matching_nothing_or_unreadable_is_one_error_line(setup, tmp_path):
    root, runs, results = setup
    base = ["--class", CATEGORY, "--runs", runs, "--data-root", root, "--results", results]
    line = error_line(run_script("detect.py", *base, "--images", tmp_path / "nothing*.png"))
    assert line == f"error: --images '{tmp_path / 'nothing*.png'}' matches no image files " \
                   f"({', '.join(data.IMAGE_EXTENSIONS)})"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    line = error_line(run_script("detect.py", *base, "--images", bad))
    assert line.startswith(f"error: cannot read image '{bad}'")


def test_class_all_writes_a_summary_with_a_mean_row(setup, tmp_path):
    root, runs, results = setup
    shutil.copytree(root / CATEGORY, root / "nomask")  # the same files: the run's split record fits
    shutil.rmtree(root / "nomask" / "ground_truth")
    shutil.copytree(runs / CATEGORY, runs / "nomask")
    out = detect.main(["--class", "all", "--runs", str(runs), "--data-root", str(root),
                       "--results", str(results), "--no-pictures"])
    assert out["exit_code"] == 0 and [r["category"] for r in out["rows"]] == ["nomask", CATEGORY]
    rows = read_rows(results / "summary.csv")
    assert rows[0]["pixel_auroc"] == "" and rows[1]["pixel_auroc"] != ""
    assert float(rows[0]["train_minutes"]) > 0
    table = (results / "summary.md").read_text().splitlines()
    assert table[0] == ("| category | model | image AUROC | pixel AUROC | AUPRO | F1 | good flagged | "
                        "training minutes |")
    assert table[-1].startswith("| mean (2 classes) |") and "(over 1)" in table[-1]


def test_summary_of_one_class_says_class_not_classes(tmp_path):
    row = {"category": "solar_cells", "model": "dae", "image_auroc": 0.66, "pixel_auroc": None,
           "aupro_0.3": None, "f1": 0.2, "good_false_alarm_rate": 0.0, "train_minutes": 3.9}
    detect.write_summary(tmp_path, [row])
    assert (tmp_path / "summary.md").read_text().splitlines()[-1].startswith("| mean (1 class) |  | 0.660 |")


def test_bench_inspect_reports_images_per_second_for_each_model(tmp_path, capsys):
    import bench
    bench.main(["--inspect", "--models", "dae", "vqvae", "--sizes", "32", "--steps", "1", "--warmup", "1",
                "--no-peak", "--device", "cpu", "--data-root", str(tmp_path / "none"),
                "--runs", str(tmp_path / "runs"), "--inspect-images", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| dae") or line.startswith("| vqvae")]
    assert len(rows) == 2 and all("| cpu | untrained | 16 |" in r for r in rows)


def test_a_run_trained_on_turned_parts_also_calibrates_on_turned_val_images(setup, capsys, monkeypatch):
    """Any turn of a good part is a good part to such a run: eight angles of each val image give
    the threshold more good scores than one val image alone."""
    root, runs, results = setup
    monkeypatch.setattr(detect, "ALIKE_CORR", 1.0)  # as parts at any angle: each its own baseline
    ckpt_path = runs / CATEGORY / "dae" / "best.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["config"]["rotate_used"] = True  # as train.py records --rotate on
    torch.save(ckpt, ckpt_path)
    detect_main(root, runs, results, "--no-pictures")
    out = capsys.readouterr().out
    assert "threshold rests on 1 val image, scored at 8 angles and moved 1 px each way: copies" in out
    assert "map ssim+feature+chroma+segment (the model's map for a run that turned its few training images)" in out
    calibration = torch.load(detect.calibration_path(ckpt_path, "ssim+feature+chroma+segment"), weights_only=True)
    # turned val copies find their nearest training parts as unturned images do
    assert "template: on" in out and calibration["template"] is not None
    assert calibration["nearest"] is not None and "3 nearest training images" in out
    settings = calibration["settings"]
    assert settings["val_turns"] == 8 and settings["val_moves"] == 1 and len(calibration["val_scores"]) == 8 * 5
    assert settings["turned_by"] == "bicubic"  # unturned runs have no such setting: theirs stay valid
    assert settings["chroma"] == "distance"  # calibrated with chroma's square before: recomputed
    assert calibration["threshold"] == calibration["val_scores"].max()


def test_turned_copies_hold_each_image_at_every_angle_the_unturned_first():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    turned = detect.turned_copies(images, 4)
    assert turned.shape == (8, 3, 16, 16) and turned.dtype == torch.uint8
    assert torch.equal(turned[:2], images)
    quarter = torch.rot90(images, 1, (2, 3)).int()  # the second pair: a quarter turn, as train.rotate
    assert (turned[2:4].int() - quarter).abs().max() <= 1
    assert detect.turned_copies(images, 1) is images
    assert detect.val_turns({"rotate_used": True}) == detect.CALIBRATION_TURNS and detect.val_turns({}) == 1


def test_turned_copies_are_shown_everywhere_but_the_corners_a_turn_brings_in():
    """Quarter turns show the whole image; an eighth turn fills its four corners from outside the
    picture (a square turned by 45 degrees covers 2 (sqrt 2 - 1) = 83 % of the frame)."""
    shown = detect.shown_in_copies(2, 32, {"val_turns": 8, "val_moves": 0})
    assert shown.shape == (16, 32, 32) and shown.dtype == torch.bool
    assert shown.view(8, 2, 32, 32)[0::2].all()  # angle-major; k = 0, 2, 4, 6: multiples of 90 degrees
    eighth = shown[2]
    assert not eighth[0, 0] and not eighth[-1, -1] and eighth[16, 16] and eighth[0, 16] and eighth[16, 0]
    assert abs(eighth.float().mean().item() - 2 * (2 ** 0.5 - 1)) < 0.03
    moved = detect.shown_in_copies(2, 32, {"val_turns": 8, "val_moves": 1})
    assert moved.shape == (80, 32, 32) and torch.equal(moved[:16], shown)  # copies in val_copies' order
    assert detect.shown_in_copies(3, 32, {"val_turns": 1, "val_moves": 1}).all()  # no turn, nothing filled


def test_a_copy_scores_only_where_it_shows_its_own_image():
    """Whatever a turned copy's filled corners hold, its score comes from the rest of it."""
    shown = detect.shown_in_copies(1, 32, {"val_turns": 8, "val_moves": 0}).numpy()
    maps = np.random.default_rng(0).random((8, 32, 32)).astype(np.float32)
    maps_with_bright_corners = np.where(shown, maps, 100.0)
    scores = detect.copy_scores(maps_with_bright_corners, shown, "max", 0)
    assert scores.max() < 1 and np.array_equal(scores, detect.copy_scores(maps, shown, "max", 0))
    assert np.array_equal(detect.copy_scores(maps, np.ones_like(shown), "topk", 10),
                          detect.image_scores(maps, "topk", 10))


def test_moved_copies_hold_each_image_as_it_is_then_one_step_each_way():
    """A run trained on parts moved by up to `shift` px calibrates on val images moved that far:
    the images themselves first, then moved up, down, left and right, borders reflected."""
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).view(2, 3, 6, 6).to(torch.uint8)
    moved = detect.moved_copies(images, 1)
    assert moved.shape == (10, 3, 6, 6) and moved.dtype == torch.uint8
    assert torch.equal(moved[:2], images)
    pairs = {(moved[k][:, 1:-1, 1:-1] == images[k % 2][:, 1 + dr:5 + dr, 1 + dc:5 + dc]).all().item()
             for k, (dr, dc) in zip(range(2, 10), [(1, 0)] * 2 + [(-1, 0)] * 2 + [(0, 1)] * 2 + [(0, -1)] * 2)}
    assert pairs == {True}  # each copy's inside is the image one pixel off, in the four directions
    assert detect.moved_copies(images, 0) is images
    assert detect.val_moves({"shift": 1}) == 1 and detect.val_moves({}) == 0  # runs from before --shift
