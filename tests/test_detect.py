"""detect.py: metric definitions against brute force and hand-computed cases, and an end-to-end run."""
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT, unevenly_lit
import data
import detect
import losses
import models


def pairwise_auroc(scores, labels):
    """The definition: P(positive scores higher than negative), a tie counting one half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40)
       .filter(lambda xs: any(y for _, y in xs) and not all(y for _, y in xs)))
def test_auroc_matches_pairwise_definition_with_ties(pairs):
    scores, labels = zip(*pairs)  # scores from 0..5: many ties
    assert detect.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels))


def test_roc_curve_runs_from_origin_to_one_and_its_area_is_auroc():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 4, 60), rng.random(60) < 0.4
    fpr, tpr = detect.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(detect.auroc(scores, labels))


def test_aupro_is_one_for_a_perfect_map_and_low_for_an_inverted_one():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:8, 0:2] = True
    assert detect.aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert detect.aupro(1.0 - masks, masks) == pytest.approx(0.0)


def test_aupro_hand_computed_two_regions():
    """Two regions of 2 pixels in a 1 x 10 image (6 normal pixels).

    Threshold 3: region A fully found, B half -> PRO 0.75 at FPR 0.
    Threshold 2: one normal pixel -> FPR 1/6, PRO still 0.75.
    Threshold 1: B complete and 2 more normal pixels -> FPR 3/6 = 0.5, PRO 1.
    Curve to FPR 0.3: (0, 0) -> (0, 0.75) -> (1/6, 0.75) -> (0.5, 1) interpolated at 0.3:
    PRO(0.3) = 0.75 + 0.25 * (0.3 - 1/6) / (0.5 - 1/6) = 0.85.
    Area = 1/6 * 0.75 + (0.3 - 1/6) * (0.75 + 0.85) / 2; divided by 0.3.
    """
    mask = np.array([[1, 1, 0, 0, 0, 1, 1, 0, 0, 0]], bool)[None]
    amap = np.array([[3, 3, 2, 1, 1, 3, 1, 0, 0, 0]], float)[None]
    area = (1 / 6) * 0.75 + (0.3 - 1 / 6) * (0.75 + 0.85) / 2
    assert detect.aupro(amap, mask) == pytest.approx(area / 0.3)


def test_regions_are_per_connected_component_not_per_image():
    """A tiny region counts as much as a big one: finding only the big one gives PRO 0.5."""
    mask = np.zeros((1, 10, 10), bool)
    mask[0, :5, :5] = True  # 25 pixels
    mask[0, 8, 8] = True  # 1 pixel
    amap = mask.astype(float)
    amap[0, 8, 8] = -1.0  # the small region scores below every normal pixel
    # PRO is 0.5 at FPR 0 and stays 0.5 until FPR 1: the normalised area up to 0.3 is 0.5
    assert detect.aupro(amap, mask) == pytest.approx(0.5)


def test_f1_and_false_alarms_at_a_threshold():
    f1, false_alarms = detect.f1_and_false_alarms([0.1, 0.5, 0.9, 0.2], [0, 0, 1, 1], 0.3)
    # predicted positive: 0.5 (false positive), 0.9 (true positive); 0.2 is a miss
    assert f1 == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert false_alarms == pytest.approx(0.5)


def test_scores_are_never_normalised_per_image():
    """A good image with faint uniform noise must score low, not be stretched to full scale."""
    faint = np.full((1, 16, 16), 0.01)
    strong = np.zeros((1, 16, 16))
    strong[0, 4:8, 4:8] = 1.0
    scores = detect.image_scores(detect.smooth(np.concatenate([faint, strong]), 1.0), "max", 10)
    assert scores[0] < 0.05 < scores[1]


def test_closing_joins_marks_on_one_defect_and_reaches_no_further():
    """Two marks 4 px apart (the edges of one large defect) join across the gap with radius 3;
    nothing outside the pair's extent rises, and a lone mark keeps its size."""
    maps = np.zeros((2, 24, 24), np.float32)
    maps[0, 8:16, 4:8] = 1.0
    maps[0, 8:16, 12:16] = 1.0
    maps[1, 8:12, 8:12] = 1.0
    closed = detect.close_gaps(maps, 3)
    assert (closed[0, 9:15, 4:16] == 1.0).all()  # the gap between the marks is filled (the
    outside = np.ones((24, 24), bool)                # disc rounds its corners off)
    outside[8:16, 4:16] = False
    assert (closed[0][outside] == 0).all()  # and no pixel beyond the pair rises
    assert (closed[1] == maps[1]).all()
    assert detect.close_gaps(maps, 0) is maps


def test_filling_raises_what_marks_enclose_to_their_lowest_rim_and_nothing_open():
    """A ring of marks (a wrong whole part marked along its outline) is filled inside, up to the
    ring's lowest mark; a ring open to the border is a bay, not a hole, and stays as it is."""
    ring = np.zeros((16, 16), np.float32)
    ring[3:13, 3:13] = 2.0
    ring[3:5, 8] = 1.5  # the lowest pass through the rim
    ring[5:11, 5:11] = 0.0  # the inside, 0 like the outside
    filled = detect.fill_holes(ring)
    assert (filled[5:11, 5:11] == 1.5).all()
    assert (filled[:3] == 0).all() and (filled[:, :3] == 0).all()  # the outside stays
    bay = ring.copy()
    bay[3:5, 7:9] = 0.0
    bay[0:3, 7:9] = 0.0  # a channel from the inside to the border
    assert (detect.fill_holes(bay) == bay).all()
    ring[0, 0] = np.nan  # left for the finiteness check to report, not looped over forever
    assert detect.fill_holes(ring) is ring


def test_each_model_brings_its_own_map_closing_and_smoothing_unless_told_otherwise():
    from models import MODELS
    args = detect.parse_args(["--class", "x"])
    detect.map_settings(args, MODELS["dae"])
    assert (args.map, args.close, args.sigma) == (MODELS["dae"].default_map, 6, 3.0)
    args = detect.parse_args(["--class", "x"])
    detect.map_settings(args, MODELS["beta_vae"])
    assert (args.close, args.sigma) == (0, 4.0)
    args = detect.parse_args(["--class", "x", "--close", "0", "--sigma", "2"])
    detect.map_settings(args, MODELS["dae"])
    assert (args.close, args.sigma) == (0, 2.0)


def test_a_run_that_turned_its_few_images_gets_the_models_turned_map_unless_told_otherwise():
    """The DAE's feature map pays only where training turned a few images; a model without a
    turned map keeps its default, and --map always wins."""
    def map_of(name, turned, *given):
        args = detect.parse_args(["--class", "x", *given])
        detect.map_settings(args, models.MODELS[name], turned=turned)
        return args.map
    assert map_of("dae", False) == models.DAE.default_map and "feature" not in map_of("dae", False)
    assert map_of("dae", True) == models.DAE.turned_map and "feature" in map_of("dae", True)
    assert map_of("savae", True) == models.SAVAE.default_map
    assert map_of("dae", True, "--map", "ssim") == "ssim"


def test_baseline_removes_the_error_every_good_image_has_at_the_same_place():
    """Good images all err along one edge; once the train mean map is subtracted, a fainter
    defect elsewhere is what stands out."""
    train = np.zeros((4, 16, 16))
    train[:, 0, :] = 1.0
    test = train[:1].copy()
    test[0, 8, 8] = 0.5
    out = detect.subtract_baseline({"ssim": test}, {"ssim": train.mean(0)})["ssim"][0]
    assert np.unravel_index(out.argmax(), out.shape) == (8, 8)


def test_ssim_far_below_its_baseline_counts_as_anomalous_and_other_maps_do_not():
    """A surface that errs much less than good parts do there (its texture is gone) is as unusual
    for ssim as one that errs much more; a segmenter probability below its mean is no evidence."""
    train = np.full((4, 8, 8), 0.3)
    test = train[:1].copy()
    test[0, 2, 2], test[0, 5, 5] = 0.0, 0.5
    out = detect.subtract_baseline({"ssim": test, "segment": test}, {"ssim": train.mean(0), "segment": train.mean(0)})
    assert out["ssim"][0, 2, 2] == pytest.approx(0.3) and out["ssim"][0, 5, 5] == pytest.approx(0.2)
    assert out["segment"][0, 2, 2] == pytest.approx(-0.3) and out["segment"][0, 5, 5] == pytest.approx(0.2)


@pytest.fixture(scope="module")
def trained_dae(rgb_root, tmp_path_factory):
    """A DAE trained 10 epochs (30 steps, about a second) on the synthetic category at 32 px."""
    out = tmp_path_factory.mktemp("outputs")
    subprocess.run([sys.executable, "train.py", "--model", "dae", "--category", "synthetic",
                    "--data-root", str(rgb_root), "--size", "32", "--epochs", "10",
                    "--batch-size", "8",
                    "--out", str(out / "synthetic" / "dae")], cwd=ROOT, check=True, capture_output=True)
    return out


def test_detect_end_to_end_finds_the_synthetic_defects_and_writes_everything(trained_dae, tmp_path):
    results = tmp_path / "results"
    r = subprocess.run([sys.executable, "detect.py", "--class", "synthetic", "--outputs", str(trained_dae),
                        "--results", str(results), "--save-maps", "--map", "ssim+l2"],
                       cwd=ROOT, check=True, capture_output=True, text=True)
    assert r.stdout.count("background: ") == 1  # the decision is printed, plain or not
    assert r.stdout.count("template: on") == 1  # a DAE run
    assert r.stdout.count("baseline: the mean map of") == 1  # all or the nearest: decided and printed
    out = results / "synthetic"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro_0.3", "f1", "good_false_alarm_rate"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # well above chance (AUROC 0.5, AUPRO about 0.15) on the painted blobs and scratches; this
    # run measured 1.000 / 0.985 / 0.942
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.9 and metrics["aupro_0.3"] >= 0.7
    assert metrics["threshold_rule"] == "max of val image scores" and metrics["baseline"] == "train"
    assert metrics["threshold_set_by"].endswith(".png")
    rows = (out / "scores.csv").read_text().strip().splitlines()
    assert rows[0] == "path,defect_type,label,score,predicted_label" and len(rows) == 1 + 8
    maps = np.load(out / "maps.npz")
    assert maps["maps"].shape == maps["masks"].shape == (8, 32, 32)
    pictures = sorted(out.glob("synthetic_*_viz.png"))
    assert len(pictures) == 8
    width, height = Image.open(pictures[0]).size
    assert width > 4 * height  # six panels side by side
    assert (out / "roc.png").is_file() and (out / "failures.png").is_file()


def test_a_checkpoint_replaced_while_it_is_read_is_refused(trained_dae, tmp_path, monkeypatch):
    """train.py may replace best.pt while detect.py loads it: a calibration stored under the new
    file's hash but made with the old weights would be reused for the new ones."""
    outputs = tmp_path / "outputs"
    shutil.copytree(trained_dae, outputs)
    best = outputs / "synthetic" / "dae" / "best.pt"
    load = detect.checks.load_checkpoint

    def load_then_replace(path, *args, **kwargs):
        model, ckpt = load(path, *args, **kwargs)
        torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, best)  # the next epoch's file lands
        return model, ckpt
    monkeypatch.setattr(detect.checks, "load_checkpoint", load_then_replace)
    with pytest.raises(detect.DetectError, match="changed while it was read"):
        detect.load_run(detect.parse_args(["--class", "synthetic", "--outputs", str(outputs)]))


def test_a_checkpoint_without_its_training_record_or_of_another_class_is_one_line(trained_dae, tmp_path):
    """A bare checkpoint (model name, arguments and weights only) has no split or settings to
    score with; a checkpoint of one class run with --class of another would otherwise report its
    val images as changed."""
    best = torch.load(trained_dae / "synthetic" / "dae" / "best.pt", weights_only=True)
    bare = tmp_path / "bare.pt"
    torch.save({k: best[k] for k in ("model_name", "model_args", "model_state")}, bare)
    data.make_synthetic_category(tmp_path, "other", size=32, seed=5)
    for argv, message in ([["--class", "synthetic", "--checkpoint", str(bare)], "holds no record of its training"],
                          [["--class", "other", "--checkpoint", str(trained_dae / "synthetic" / "dae" / "best.pt"),
                            "--data-root", str(tmp_path)], "was trained on 'synthetic', not 'other'"]):
        r = subprocess.run([sys.executable, "detect.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr and message in r.stderr, r.stderr


def test_a_map_named_twice_is_one_map(trained_dae):
    args = detect.parse_args(["--class", "synthetic", "--outputs", str(trained_dae), "--map", "ssim+l2+ssim"])
    assert detect.load_run(args).names == ["ssim", "l2"] and args.map == "ssim+l2"


def test_a_passed_image_shows_no_predicted_mask_even_where_a_few_pixels_pass_the_threshold():
    """With --score topk an image's score can stay under the threshold while its peak does not:
    the picture must not mark a defect the verdict does not."""
    amap = np.zeros((8, 8))
    amap[2, 3] = 5.0
    assert not detect.predicted_mask(amap, score=0.5, threshold=1.0).any()
    assert detect.predicted_mask(amap, score=5.0, threshold=1.0).sum() == 1


def test_detect_without_a_trained_model_says_how_to_train_one(tmp_path):
    r = subprocess.run([sys.executable, "detect.py", "--class", "bottle", "--outputs", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "python train.py --model" in r.stderr


def test_detect_with_mc_dropout_gives_the_same_numbers_twice(rgb_root, tmp_path):
    out = tmp_path / "outputs"
    subprocess.run([sys.executable, "train.py", "--model", "savae", "--category", "synthetic",
                    "--data-root", str(rgb_root), "--size", "32", "--epochs", "1", "--prior-epochs", "1",
                    "--batch-size", "8", "--out", str(out / "synthetic" / "savae")],
                   cwd=ROOT, check=True, capture_output=True)
    runs = []
    for i in range(2):
        results = tmp_path / f"results{i}"
        subprocess.run([sys.executable, "detect.py", "--class", "synthetic", "--outputs", str(out),
                        "--results", str(results), "--no-pictures", "--map", "variance_weighted+epistemic"],
                       cwd=ROOT, check=True, capture_output=True)
        runs.append((results / "synthetic" / "scores.csv").read_text())
    assert runs[0] == runs[1]


def test_the_val_image_that_sets_the_threshold_is_named_with_the_next_one():
    """Copy c shows val image c % n: the name is that of the image whose copies score highest."""
    calibration = {"val_files": ["a.png", "b.png", "c.png"],  # two copies of each, images in order
                   "val_scores": np.array([1.0, 2.0, 0.5, 1.5, 6.0, 0.7])}
    assert list(detect.val_image_scores(calibration)) == [1.5, 6.0, 0.7]
    assert detect.threshold_source(calibration) == "threshold 6, set by val image b.png (the next, a.png, scores 1.5)"
    one = {"val_files": ["a.png"], "val_scores": np.array([1.0, 3.0])}
    assert detect.threshold_source(one) == "threshold 3, set by val image a.png"


def test_with_many_val_images_the_threshold_is_the_kth_highest_so_one_unusual_image_does_not_set_it():
    """A new good image beats the k-th highest of n val scores with chance k / (n + 1): the rank
    is the largest k keeping that within THRESHOLD_SHARE, and 1 (the highest) for small sets."""
    assert [detect.threshold_rank(n) for n in (1, 22, 98, 99, 113, 149, 1000)] == [1, 1, 1, 2, 2, 3, 20]
    scores = np.arange(113, dtype=float)
    scores[7] = 500.0  # one unusual good image
    many = {"val_files": [f"{i:03d}.png" for i in range(113)], "val_scores": np.concatenate([scores, scores - 1])}
    assert detect.threshold_image(many) == 112
    assert detect.threshold_source(many) == ("threshold 112, set by val image 112.png, the 2nd highest of 113 "
                                             "(about 2% of good images flagged; the highest, 007.png, scores 500)")
    assert detect.threshold_rule(113) == "2nd highest of 113 val image scores"
    assert detect.threshold_rule(22) == "max of val image scores"
    few = {"val_files": ["a.png", "b.png"], "val_scores": np.array([1.0, 6.0])}
    assert detect.threshold_image(few) == 1


def test_combine_leaves_out_a_map_that_is_constant_on_the_val_images():
    """On a grey category the chroma map is zero everywhere: standardising it would divide by 0."""
    rng = np.random.default_rng(0)
    ssim_val, ssim_test = rng.random((3, 8, 8)), rng.random((2, 8, 8))
    raw_val = {"ssim": ssim_val, "chroma": np.zeros((3, 8, 8))}
    raw_test = {"ssim": ssim_test, "chroma": np.zeros((2, 8, 8))}
    stats = detect.map_statistics(raw_val)
    np.testing.assert_array_equal(detect.combine(raw_test, stats, ["ssim", "chroma"]), ssim_test)
    with_l2 = detect.map_statistics({**raw_val, "l2": 2 * ssim_val})
    both = detect.combine({**raw_test, "l2": 2 * ssim_test}, with_l2, ["ssim", "chroma", "l2"])
    expected = (ssim_test - ssim_val.mean()) / ssim_val.std()
    np.testing.assert_allclose(both, expected)


def test_combine_keeps_a_map_whose_val_statistics_are_not_finite_so_the_error_is_seen():
    """A map with a NaN is no constant map: left out, the NaN would pass unseen."""
    ssim = np.random.default_rng(0).random((3, 8, 8))
    poisoned = ssim.copy()
    poisoned[0, 0, 0] = np.nan
    stats = detect.map_statistics({"ssim": ssim, "l2": poisoned})
    assert np.isnan(detect.combine({"ssim": ssim, "l2": poisoned}, stats, ["ssim", "l2"])).all()


def test_a_calibration_keeps_the_val_maps_statistics_not_the_maps():
    """Its size must not grow with the val images and their copies."""
    val = {"ssim": np.arange(12.0).reshape(3, 2, 2)}
    assert detect.map_statistics(val) == {"ssim": (5.5, float(np.arange(12.0).std()))}


def test_what_changed_names_settings_added_and_settings_dropped():
    """A recomputed calibration says why, also when a setting exists on one side only (a run
    calibrated before turned copies became bicubic has no 'turned_by')."""
    stored = {"sigma": 4.0, "val_turns": 8}
    assert detect.what_changed(stored, {"sigma": 4.0, "val_turns": 8, "turned_by": "bicubic"}) == "turned_by None -> bicubic"
    assert detect.what_changed(stored, {"sigma": 2.0}) == "sigma 4.0 -> 2.0, val_turns 8 -> None"
    assert detect.what_changed(stored, dict(stored)) == ""


def test_a_stored_calibration_from_before_the_statistics_is_computed_again(tmp_path):
    """Older calibrations kept the val maps themselves: reading one must not fail later."""
    path = tmp_path / "best_ssim.pt"
    torch.save({"settings": {}, "val_maps": {"ssim": torch.zeros(2, 4, 4)}}, path)
    assert detect.read_calibration(path) is None
    torch.save({"settings": {}, "map_stats": {"ssim": (0.0, 1.0)}}, path)
    assert detect.read_calibration(path)["map_stats"] == {"ssim": (0.0, 1.0)}


def test_the_error_maps_colour_scale_puts_the_threshold_mid_bar_whatever_else_is_scored():
    """Pictures of one calibration stay comparable across runs: one strongly marked image among
    those scored must not turn every other map dark blue."""
    calm, with_a_strong_mark = np.ones((4, 8, 8)), np.ones((4, 8, 8))
    with_a_strong_mark[0] = 80.0
    assert detect.colour_scale(calm, 3.5) == detect.colour_scale(with_a_strong_mark, 3.5) == 7.0
    assert detect.colour_scale(with_a_strong_mark, -1.0) == 80.0  # no positive threshold: the maps decide


def frame_images(inside, border, size=16):
    """uint8 (N, 3, size, size) images: `inside` colour within, `border` colour on the outer 3 px."""
    x = torch.tensor(border, dtype=torch.uint8).view(1, 3, 1, 1).repeat(len(inside), 1, size, size)
    x[:, :, 3:-3, 3:-3] = torch.tensor(inside, dtype=torch.uint8).view(-1, 3, 1, 1)
    return x


def test_a_plain_border_is_a_background_and_a_busy_one_is_not():
    """A dark table under every part is plain, though a part reaches the edge. A texture to the
    edges is not, so the map will count everywhere."""
    plain = frame_images([[200, 180, 90]] * 4, [22, 22, 29])
    plain[0, :, 0, :4] = 255  # a few border pixels of a part that reaches the edge
    is_plain, share = data.plain_background(plain)
    assert is_plain and data.PLAIN_SHARE <= share < 1
    busy = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    is_plain, share = data.plain_background(busy)
    assert not is_plain and share < 0.2


def test_the_part_is_where_the_image_or_its_reconstruction_is_not_the_background():
    """A part in the image counts, and so does a piece that only its reconstruction draws (a piece
    missing from the image): both grown by PART_GROW px; faint noise on the table does not, and
    neither does a speck of dust away from the part."""
    table = [22, 22, 29]
    image = frame_images([table], table, 24)
    recon = image.clone()
    image[0, :, 4:8, 4:8] = 200  # a part in the image
    recon[0, :, 4:8, 4:12] = 200  # the reconstruction draws it with a piece the image lacks
    image[0, :, 1, 20] += 5  # noise well within the tolerance
    image[0, :, 18:20, 18:20] = 120  # dust
    part = detect.part_pixels(image, recon)[0]
    g = detect.PART_GROW
    assert part[4 - g:8 + g, 6].all() and part[6, 4 - g:12 + g].all()
    assert not part[4 - g - 1, 6] and not part[1, 20] and not part[0, 0] and not part[18:20, 18:20].any()


def test_on_a_table_lit_unevenly_only_the_part_counts():
    """The table's light changes by 40 levels between its centre and its corners: held against
    each image's own table, the dark corners show table, and the part (grown) alone counts."""
    images = unevenly_lit(3)
    g = detect.PART_GROW
    for part in detect.part_pixels(images, images.clone()):
        assert 12 * 12 < part.sum() <= (12 + 2 * g) ** 2
        assert not part[0, 0] and not part[-1, -1] and not part[0, -1] and not part[-1, 0]


def test_outside_the_part_the_map_is_held_at_its_floor_and_the_part_keeps_its_marks():
    maps = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    part = np.zeros((2, 4, 4), bool)
    part[:, 1:3, 1:3] = True
    held = detect.hold_background(maps, part)
    assert (held[part] == maps[part]).all()
    assert (held[0][~part[0]] == 0).all() and (held[1][~part[1]] == 16).all()


def settings_of(model_class, *argv):
    """The calibration settings of a run of that model class, detect.py given argv."""
    run = SimpleNamespace(ckpt_path=__file__, ckpt_sha256="0" * 64, root=".", cfg={}, names=["ssim"],
                          model=model_class)
    return detect.calibration_settings(detect.parse_args(["--class", "x", *argv]), run)


def test_the_background_rule_is_part_of_a_calibrations_settings():
    """Changing it (or turning it off) must recompute a stored calibration, not reuse one made
    with the other rule."""
    auto, off = settings_of(models.ARSAVAE), settings_of(models.ARSAVAE, "--background", "off")
    assert auto["background"].startswith("each image's smooth table within") and off["background"] == "off"


def test_a_models_maps_revision_is_part_of_a_calibrations_settings_once_raised():
    """Maps that change for the same weights (the VQ-VAE's) recompute a stored calibration; the
    models whose maps never changed keep theirs."""
    assert settings_of(models.VQVAE)["maps_revision"] == models.VQVAE.maps_revision > 0
    assert "maps_revision" not in settings_of(models.DAE)


def test_a_calibration_of_the_lpips_map_records_which_weights_made_it():
    """The same --lpips-backbone path (or $LPIPS_BACKBONE) may hold other weights later."""
    run = SimpleNamespace(ckpt_path=__file__, ckpt_sha256="0" * 64, root=".", cfg={}, names=["ssim", "lpips"],
                          model=models.DAE, perceptual=SimpleNamespace(source="alexnet.pth (sha256 7be5be79aa)"))
    settings = detect.calibration_settings(detect.parse_args(["--class", "x"]), run)
    assert settings["lpips_backbone"] == "alexnet.pth (sha256 7be5be79aa)"
    assert settings_of(models.DAE)["lpips_backbone"] is None
    assert losses.load_lpips(random_backbone=True).source == "random"


def test_a_calibration_of_maps_that_depend_on_the_batch_records_the_batch_size():
    """MC-dropout masks are drawn per batch: the SAVAE's maps of an image change a little with
    --batch-size, so a calibration made at another batch size is recomputed; the DAE's are not."""
    assert settings_of(models.SAVAE, "--batch-size", "4")["batch_size"] == 4
    assert "batch_size" not in settings_of(models.DAE, "--batch-size", "4")


def grey_uint8(levels):
    """uint8 images (N, 3, H, W) with the same grey level in every channel."""
    return torch.from_numpy(np.clip(np.round(levels * 255), 0, 255).astype(np.uint8))[:, None].repeat(1, 3, 1, 1)


def test_the_template_marks_a_region_gone_dark_more_than_grain_of_the_same_size():
    """Training images: a grey level with grain. A test image whose region is darker by as much
    as the grain's own amplitude stands out there; an image with new grain of that amplitude
    does not, because the difference is smoothed (4 px at 128 px) before its size is taken."""
    rng = np.random.default_rng(0)
    train = grey_uint8(0.5 + 0.05 * rng.standard_normal((20, 128, 128)))
    template = detect.template_statistics(train)
    assert template["grey"].shape == (20, 128, 128) and template["std"].shape == (128, 128)
    dark = 0.5 + 0.05 * rng.standard_normal((1, 128, 128))
    dark[:, 32:80, 32:80] -= 0.05
    grainy = 0.5 + 0.05 * rng.standard_normal((1, 128, 128))
    maps = detect.template_map(grey_uint8(np.concatenate([dark, grainy])), template)
    assert maps.shape == (2, 128, 128)
    assert maps[0, 40:72, 40:72].min() > maps[1].max()
    assert maps[0, 40:72, 40:72].min() > 3 * np.median(maps[0])


def test_the_template_compares_an_image_with_the_training_images_of_its_own_kind():
    """Two kinds of training image, dark on the left or on the right (a part turned half round,
    a second kind of cell). A good image of either kind is its nearest training images' like, so
    its template map stays low; against the mean of all the training images half of it would
    stand out. A training image is compared without itself (skip_self): its own kind's others."""
    rng = np.random.default_rng(0)
    left = np.where(np.arange(64) < 32, 0.2, 0.8) + 0.02 * rng.standard_normal((10, 64, 64))
    right = left[:, :, ::-1] + 0.02 * rng.standard_normal((10, 64, 64))
    train = grey_uint8(np.concatenate([left, right]))
    template = detect.template_statistics(train)
    good = grey_uint8(np.concatenate([left[:1], right[:1]]) + 0.02 * rng.standard_normal((2, 64, 64)))
    maps = detect.template_map(good, template)
    spread = template["std"] + detect.TEMPLATE_FLOOR
    whole_mean = np.abs(detect.grey_levels(good) - detect.grey_levels(train).mean(0)) / spread
    assert maps.max() < 0.1 * np.median(whole_mean)
    nearest = detect.nearest_training_images(detect.grey_levels(train), detect.grey_levels(train), skip_self=True)
    assert nearest.shape == (20, detect.TEMPLATE_NEIGHBOURS)
    assert all(i not in row and ((row < 10) == (i < 10)).all() for i, row in enumerate(nearest))
    assert detect.template_map(train, template, skip_self=True).max() < 0.1 * np.median(whole_mean)
    one = detect.grey_levels(train[:1])  # a single training image is its own template, not none
    assert detect.nearest_training_images(one, one, skip_self=True).tolist() == [[0]]


def test_where_images_are_of_two_kinds_each_loses_the_error_of_its_own_kind():
    """Smooth and grainy training images (mono and poly solar cells): the model errs little on
    the first kind and much on the second. With the nearest baseline each image loses its own
    kind's mean error, not the mean of both, so a good image of either kind is left near zero;
    maps it does not hold (the template) keep the mean of all."""
    rng = np.random.default_rng(0)
    smooth = 0.3 + 0.01 * rng.standard_normal((10, 64, 64))
    grainy = 0.7 + 0.1 * rng.standard_normal((10, 64, 64))
    train = grey_uint8(np.concatenate([smooth, grainy]))
    train_raw = {"ssim": np.concatenate([np.full((10, 64, 64), 0.1), np.full((10, 64, 64), 0.5)]).astype(np.float32),
                 "template": rng.random((20, 64, 64)).astype(np.float32)}
    mean_of_all = {n: m.mean(0) for n, m in train_raw.items()}
    nearest = detect.nearest_baseline(train_raw, ["ssim"], detect.grey_levels(train))
    assert nearest["maps"]["ssim"].shape == (20, 32, 32) and nearest["maps"]["ssim"].dtype == np.float16
    good = grey_uint8(np.concatenate([smooth[:1], grainy[:1]]) + 0.01 * rng.standard_normal((2, 64, 64)))
    own = detect.baseline_for(good, {"baseline": mean_of_all, "nearest": nearest})
    assert np.allclose(own["ssim"][0], 0.1, atol=1e-3) and np.allclose(own["ssim"][1], 0.5, atol=1e-3)
    assert own["template"] is mean_of_all["template"]
    assert detect.baseline_for(good, {"baseline": mean_of_all, "nearest": None}) is mean_of_all
    line = detect.baseline_line({"baseline": mean_of_all, "nearest": nearest, "alike": 0.5})
    assert "3 nearest" in line and "do not lie alike" in line


def test_the_models_whose_detection_gained_by_the_template_ask_for_it():
    """Four models reproduce a region gone dark as it is and gain by the template; AR-SAVAE loses
    AUPRO by it and must not inherit SAVAE's choice (models.AutoEncoder.default_template)."""
    from models import MODELS
    auto = detect.parse_args(["--class", "x"])
    asking = {name for name, cls in MODELS.items() if detect.uses_template(SimpleNamespace(model=cls, cfg={}), auto)}
    assert asking == {"dae", "beta_vae", "savae", "vqvae"}


def test_the_template_joins_the_maps_of_a_model_that_asks_for_it_unless_turned_off():
    run = SimpleNamespace(model=SimpleNamespace(default_template=True), cfg={})
    turned = SimpleNamespace(model=SimpleNamespace(default_template=True), cfg={"rotate_used": True})
    other = SimpleNamespace(model=SimpleNamespace(default_template=False), cfg={})
    auto, off = detect.parse_args(["--class", "x"]), detect.parse_args(["--class", "x", "--template", "off"])
    assert detect.uses_template(run, auto) and detect.uses_template(turned, auto)
    assert not detect.uses_template(run, off)
    assert not detect.uses_template(other, auto)
    raw = {"ssim": np.zeros((2, 8, 8), np.float32)}
    assert detect.with_template(raw, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), None) is raw
    template = {"grey": np.full((1, 8, 8), 51, np.uint8), "std": np.zeros((8, 8), np.float32)}
    both = detect.with_template(raw, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), template)
    assert list(both) == ["ssim", "template"] and np.allclose(both["template"], 0.2 / detect.TEMPLATE_FLOOR)


def test_a_zoomed_run_is_scored_on_the_window_around_each_part_test_and_new_images_alike(small_parts_root, tmp_path):
    """train.py zooms onto the small parts; detect.py cuts every image and mask the same way,
    says so, and scores a new image as the same test image."""
    runs = tmp_path / "runs"
    subprocess.run([sys.executable, "train.py", "--model", "dae", "--category", "small_parts", "--data-root",
                    str(small_parts_root), "--size", "32", "--epochs", "3", "--batch-size", "8",
                    "--out", str(runs / "small_parts" / "dae")], cwd=ROOT, check=True, capture_output=True)
    results = tmp_path / "results"
    common = ["--class", "small_parts", "--runs", str(runs), "--results", str(results), "--no-pictures"]
    r = subprocess.run([sys.executable, "detect.py", *common, "--save-maps"],
                       cwd=ROOT, check=True, capture_output=True, text=True)
    assert "window around each image's part" in r.stdout.splitlines()[0]
    maps = np.load(results / "small_parts" / "maps.npz")
    assert maps["maps"].shape == maps["masks"].shape == (8, 32, 32)
    assert maps["masks"][4:].sum(axis=(1, 2)).min() >= 8  # a 4 px spot of 96 px, zoomed: not 1 or 2 px
    new = small_parts_root / "small_parts" / "test" / "spot" / "000.png"
    subprocess.run([sys.executable, "detect.py", *common, "--images", str(new)], cwd=ROOT, check=True,
                   capture_output=True)
    inspected = next((results / "small_parts" / "inspect").iterdir()) / "scores.csv"
    score = float(inspected.read_text().splitlines()[1].split(",")[1])
    tested = [row.split(",") for row in (results / "small_parts" / "scores.csv").read_text().splitlines()[1:]]
    assert score == pytest.approx(next(float(row[3]) for row in tested if row[0] == str(new)), rel=1e-4)
