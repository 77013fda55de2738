"""Bad input never loses a run, never gives a silently wrong number, never shows a traceback.

Each test runs a script the way `python <script> ...` does (its `__main__` block, in this process
to spare the interpreter start-up; Ctrl-C in a real subprocess) and asserts the exit code, the
one line it prints and the files that must survive. One tiny DAE (32 px, 1 epoch) trained once
for the module serves every test; tests that break data or checkpoints work on copies.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import checks
import data
import detect
import evaluate
import losses
import train

CATEGORY = "synthetic"


# ----------------------------------------------------------------------------- running scripts

def run_script(script, *args):
    """(exit code, stdout, stderr) of `python script args`, run in this process. An exception the
    script lets through propagates and fails the test: that is the traceback a user would see."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, code = sys.argv, 0
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # warnings go to stderr as in a real run (pytest would otherwise collect them)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):  # what the interpreter does with sys.exit("...")
                    print(e.code, file=sys.stderr)
                    code = 1
                else:
                    code = e.code or 0
    finally:
        sys.argv = saved_argv
    return code, out.getvalue(), err.getvalue()


def lines_of(stderr):
    """Printed lines, without the progress bars (tqdm redraws with '\\r' and clears on close)."""
    return [line.split("\r")[-1].strip() for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def error_line(result):
    """The one `error: ...` line of a failed run (exit 1)."""
    code, _, stderr = result
    lines = lines_of(stderr)
    assert code == 1, (code, stderr[-2000:])
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    return lines[0]


def argparse_line(result, script):
    """argparse's own error line (after its usage lines), exit 2."""
    code, _, stderr = result
    assert code == 2 and "Traceback" not in stderr, stderr
    last = lines_of(stderr)[-1]
    assert last.startswith(f"{script}: error: "), stderr
    return last


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(folder):
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def train_args(root, out, *extra):
    return ["--model", "dae", "--category", CATEGORY, "--data-root", root, "--size", "32",
            "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25",
            "--out", out, *extra]


def detect_args(run, results, *extra, root=None):
    return ["--class", CATEGORY, "--outputs", run.outputs, "--data-root", root or run.root,
            "--results", results, "--no-pictures", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 12-image synthetic category (3 held out for val) and a DAE trained on it, 1 epoch at 32 px."""
    base = tmp_path_factory.mktemp("robust")
    root, outputs = base / "data", base / "outputs"
    data.make_synthetic_category(root, CATEGORY, size=32, n_train=12, n_good_test=2, n_defect_test=2)
    folder = outputs / CATEGORY / "dae"
    code, _, stderr = run_script("train.py", *train_args(root, folder))
    assert code == 0, stderr[-2000:]
    return SimpleNamespace(root=root, outputs=outputs, folder=folder, base=base,
                           ckpt=torch.load(folder / "checkpoint.pt", weights_only=True))


def copy_root(run, tmp_path):
    shutil.copytree(run.root, tmp_path / "data")
    return tmp_path / "data"


def copy_outputs(run, tmp_path):
    shutil.copytree(run.outputs, tmp_path / "outputs")
    return tmp_path / "outputs", tmp_path / "outputs" / CATEGORY / "dae"


# ----------------------------------------------------------------------------- 1. a finished run is kept

def test_rerun_without_resume_refuses_and_keeps_the_finished_run(run, tmp_path):
    outputs, folder = copy_outputs(run, tmp_path)
    before = digests(folder)
    line = error_line(run_script("train.py", *train_args(run.root, folder)))
    assert f"'{folder}' already holds a trained run (checkpoint.pt, best.pt, metrics.csv)" in line
    assert "--resume" in line and "--overwrite" in line
    assert digests(folder) == before


def test_overwrite_replaces_the_old_run_entirely(run, tmp_path):
    outputs, folder = copy_outputs(run, tmp_path)
    old = digests(folder)
    code, _, stderr = run_script("train.py", *train_args(run.root, folder, "--overwrite", "--seed", "1"))
    assert code == 0, stderr
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1
    assert (folder / "metrics.csv").read_text().count("\n") == 2  # header + this run's one epoch
    assert all(digests(folder)[name] != old[name] for name in ("checkpoint.pt", "best.pt"))


def test_resume_and_overwrite_together_are_refused(run, tmp_path):
    outputs, folder = copy_outputs(run, tmp_path)
    before = digests(folder)
    line = error_line(run_script("train.py", *train_args(run.root, folder, "--resume", "--overwrite")))
    assert "pass one of them" in line and digests(folder) == before


# ----------------------------------------------------------------------------- 2. the split is stored

def test_checkpoint_records_the_train_and_val_files_with_sizes_and_hashes(run):
    split = run.ckpt["split"]
    good = run.root / CATEGORY / "train" / "good"
    names = {r["name"] for r in split["train"]} | {r["name"] for r in split["val"]}
    assert len(split["val"]) == 3 and len(split["train"]) == 9 and names == {p.name for p in good.iterdir()}
    for r in split["train"] + split["val"]:
        assert r["bytes"] == (good / r["name"]).stat().st_size and r["sha256"] == digest(good / r["name"])


def spy_on_splits(monkeypatch):
    """Record the files every load_split call is given (detect.py and evaluate.py use data.load_split)."""
    loaded = {}
    real = data.load_split

    def spy(root, category, split, size, *args, files=None, **kw):
        loaded[split] = [p.name for p in files] if files is not None else None
        return real(root, category, split, size, *args, files=files, **kw)
    monkeypatch.setattr(data, "load_split", spy)
    return loaded


def test_detect_and_evaluate_use_the_recorded_val_files_after_train_good_changes(run, tmp_path, monkeypatch):
    root = copy_root(run, tmp_path)
    good = root / CATEGORY / "train" / "good"
    shutil.copy(good / "000.png", good / "100.png")  # one image added after training
    recorded_val = [r["name"] for r in run.ckpt["split"]["val"]]
    recomputed_val = [p.name for p in data.train_val_files(root / CATEGORY, 0.25, 0)[1]]
    assert recomputed_val != recorded_val  # recomputing would calibrate on trained-on images
    loaded = spy_on_splits(monkeypatch)
    metrics = detect.main([str(a) for a in detect_args(run, tmp_path / "results", root=root)])
    assert loaded["val"] == recorded_val and metrics["val_images"] == 3
    assert loaded["train"] == [r["name"] for r in run.ckpt["split"]["train"]]
    evaluate.held_out_normal.cache_clear()
    args = evaluate.parse_args(["--category", CATEGORY, "--outputs", str(run.outputs), "--data-root",
                                str(root), "--no-generation"])
    row = evaluate.evaluate_model(CATEGORY, "dae", run.folder / "best.pt", args, torch.device("cpu"), None, None)
    assert loaded["val"] == recorded_val and row["recon_images"] == 3 + 2  # val + test/good


@pytest.mark.parametrize("tool", ["detect", "evaluate", "resume"])
def test_a_recorded_val_file_that_is_gone_stops_every_tool(run, tmp_path, tool):
    root = copy_root(run, tmp_path)
    gone = run.ckpt["split"]["val"][0]["name"]
    (root / CATEGORY / "train" / "good" / gone).unlink()
    outputs, folder = copy_outputs(run, tmp_path)
    before = digests(folder)
    if tool == "detect":
        result = run_script("detect.py", *detect_args(run, tmp_path / "results", root=root))
    elif tool == "evaluate":
        result = run_script("evaluate.py", "--category", CATEGORY, "--outputs", outputs, "--data-root", root,
                            "--no-generation", "--lpips-random-backbone")
    else:
        result = run_script("train.py", *train_args(root, folder, "--resume", "--epochs", "2"))
    line = error_line(result)
    assert f"of the 3 val images recorded in the checkpoint, 1 missing ({gone})" in line
    assert "restore them, or train a new model" in line
    assert digests(folder) == before and not (tmp_path / "results" / CATEGORY / "metrics.json").exists()


def test_a_changed_val_file_stops_detect(run, tmp_path):
    root = copy_root(run, tmp_path)
    changed = run.ckpt["split"]["val"][1]["name"]
    path = root / CATEGORY / "train" / "good" / changed
    Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(path)
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", root=root)))
    assert f"1 changed ({changed})" in line and "calibrated on exactly these held-out images" in line


@pytest.mark.parametrize("flag, value, was", [
    ("--seed", "1", "0"), ("--val-fraction", "0.5", "0.25"), ("--batch-size", "4", "8"),
    ("--size", "64", "32"), ("--model", "beta_vae", "dae"), ("--latent-dim", "1024", "2048"),
])
def test_resume_with_settings_that_change_data_or_model_is_refused(run, tmp_path, flag, value, was):
    outputs, folder = copy_outputs(run, tmp_path)
    before = digests(folder)
    line = error_line(run_script("train.py", *train_args(run.root, folder, "--resume", flag, value)))
    assert line.startswith(f"error: --resume: {flag} is {value} but the run in '{folder}' used {was}")
    assert "start over with --overwrite" in line and digests(folder) == before


def test_resume_continues_on_the_recorded_split_and_says_what_changes(run, tmp_path):
    root = copy_root(run, tmp_path)
    good = root / CATEGORY / "train" / "good"
    shutil.copy(good / "000.png", good / "100.png")  # not part of the run: never used by it
    outputs, folder = copy_outputs(run, tmp_path)
    code, stdout, stderr = run_script("train.py", *train_args(root, folder, "--resume", "--epochs", "2"))
    assert code == 0, stderr
    assert "note: --resume: --epochs 2 (the run had 1) applies from the resumed epoch on" in stdout
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert ckpt["split"] == run.ckpt["split"] and ckpt["epoch"] == 1


# ----------------------------------------------------------------------------- 3. every image mode

GREY = np.linspace(0, 255, 64).round().astype(np.uint8).reshape(8, 8)
COLOUR = np.stack([GREY, 255 - GREY, GREY // 2], -1)
PALETTE = [(40, 200, 10), (255, 0, 128), (0, 0, 0), (10, 20, 30)]


def image_in_mode(mode):
    """(PIL image in `mode`, the uint8 RGB (8, 8, 3) it shows)."""
    grey3 = np.repeat(GREY[..., None], 3, -1)
    if mode == "L":
        return Image.fromarray(GREY, "L"), grey3
    if mode == "I;16":  # 16-bit: v * 257 spans 0..65535 exactly as v spans 0..255
        return Image.fromarray(GREY.astype(np.uint16) * 257), grey3
    if mode == "RGB":
        return Image.fromarray(COLOUR, "RGB"), COLOUR
    if mode == "RGBA":
        return Image.fromarray(np.dstack([COLOUR, np.full((8, 8), 90, np.uint8)]), "RGBA"), COLOUR
    if mode == "LA":
        return Image.fromarray(np.dstack([GREY, np.full((8, 8), 90, np.uint8)]), "LA"), grey3
    if mode == "P":
        index = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
        im = Image.fromarray(index, "P")
        im.putpalette([c for rgb in PALETTE for c in rgb])
        return im, np.array(PALETTE, np.uint8)[index]
    if mode == "1":
        return Image.fromarray(GREY > 127).convert("1"), np.repeat((GREY > 127)[..., None] * 255, 3, -1).astype(np.uint8)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "LA", "P", "1"])
def test_every_image_mode_decodes_to_the_right_values(tmp_path, mode):
    im, shown = image_in_mode(mode)
    im.save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == mode
    decoded = data.read_image(tmp_path / "x.png", 8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(decoded, shown)  # 16-bit was all 255 (white) before


def test_a_16_bit_category_loads_as_its_8_bit_original(run, tmp_path):
    root = copy_root(run, tmp_path)
    for path in (root / CATEGORY / "train" / "good").glob("*.png"):
        Image.fromarray(np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257).save(path)
    grey = data.load_split(run.root, CATEGORY, "train", 32, val_fraction=0.0).images.float()
    wide = data.load_split(root, CATEGORY, "train", 32, val_fraction=0.0).images.float()
    grey = (0.299 * grey[:, 0] + 0.587 * grey[:, 1] + 0.114 * grey[:, 2])  # PIL's RGB -> L
    assert (wide[:, 0] - grey).abs().max() <= 1.0 and wide.mean() < 200


def test_a_broken_link_in_train_good_is_one_line(run, tmp_path):
    root = copy_root(run, tmp_path)
    (root / CATEGORY / "train" / "good" / "zzz.png").symlink_to(tmp_path / "nowhere.png")
    line = error_line(run_script("train.py", *train_args(root, tmp_path / "out")))
    assert "zzz.png" in line and "cannot read" in line


def test_one_training_image_is_one_line_asking_for_two(run, tmp_path):
    root = copy_root(run, tmp_path)
    for path in sorted((root / CATEGORY / "train" / "good").glob("*.png"))[1:]:
        path.unlink()
    assert "holds one image; at least two are needed" in error_line(
        run_script("train.py", *train_args(root, tmp_path / "out")))


def test_an_image_past_pillows_size_limit_is_a_dataset_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # twice this is a decompression bomb to Pillow
    with pytest.raises(data.DatasetError, match="cannot read image"):
        data.read_image(tmp_path / "big.png", 8)


def test_an_lpips_backbone_file_that_is_not_alexnet_weights_is_one_line(tmp_path):
    """Not a checkpoint, not a state_dict, weights of other shapes: each a one-line LPIPSUnavailable.
    And an AlexNet-shaped file that is not torchvision's (a random one) is refused before use, so
    its numbers never land under the name lpips."""
    perceptual = losses.load_lpips(random_backbone=True)
    for name, content in (("text.pth", b"not a checkpoint"), ("list.pth", [1, 2, 3]),
                          ("vgg.pth", {"features.0.weight": torch.zeros(64, 3, 3, 3)})):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(losses.LPIPSUnavailable, match=name):
            losses.load_backbone(perceptual.net, path)
    random_alexnet = {f"features.{k}": v for k, v in perceptual.net.net.slice1.state_dict().items()}
    torch.save(random_alexnet, tmp_path / "alexnet.pth")
    with pytest.raises(losses.LPIPSUnavailable, match="is not torchvision's AlexNet weights"):
        losses.load_lpips(tmp_path / "alexnet.pth")


def test_lpips_below_its_smallest_size_is_refused_in_one_line():
    losses.require_size(losses.LPIPS_MIN_SIZE)
    with pytest.raises(losses.LPIPSUnavailable, match="at least 31 px"):
        losses.require_size(16)


def test_a_write_that_fails_for_another_reason_than_a_full_disk_does_not_advise_freeing_space(tmp_path):
    def refused(f):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    with pytest.raises(checks.RunError, match="check that its folder can be written") as e:
        checks.write_atomic(tmp_path / "x.csv", refused)
    assert "free disk space" not in str(e.value) and not list(tmp_path.iterdir())


def test_device_cuda_gets_the_current_gpus_index(monkeypatch):
    """torch.cuda.set_device (evaluate.py, for torch-fidelity) refuses a cuda device without an index."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert train.pick_device("cuda") == torch.device("cuda", 0)
    assert train.pick_device("cuda:1") == torch.device("cuda", 1) and train.pick_device("cpu").type == "cpu"


MASK = np.zeros((8, 8), bool)
MASK[2:5, 3:7] = True


@pytest.mark.parametrize("kind", ["L 0/255", "L 0/1", "1", "I;16 0/1", "P", "RGBA", "LA"])
def test_a_mask_reads_non_zero_as_defect_in_every_mode(tmp_path, kind):
    m = MASK.astype(np.uint8)
    im = {"L 0/255": lambda: Image.fromarray(m * 255, "L"),
          "L 0/1": lambda: Image.fromarray(m, "L"),
          "1": lambda: Image.fromarray(MASK).convert("1"),
          "I;16 0/1": lambda: Image.fromarray(m.astype(np.uint16)),
          "P": lambda: palette_mask(m),
          "RGBA": lambda: Image.fromarray(np.dstack([m * 255] * 3 + [np.full_like(m, 255)]), "RGBA"),
          "LA": lambda: Image.fromarray(np.dstack([m, np.full_like(m, 255)]), "LA")}[kind]()
    im.save(tmp_path / "m.png")
    np.testing.assert_array_equal(data.read_mask(tmp_path / "m.png", 8)[0].numpy(), m)


def palette_mask(m):
    im = Image.fromarray(m, "P")
    im.putpalette([0, 0, 0, 255, 255, 0])
    return im


def test_masks_stored_as_0_and_1_give_pixel_metrics(run, tmp_path):
    root = copy_root(run, tmp_path)
    for path in (root / CATEGORY / "ground_truth").rglob("*_mask.png"):
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8), "L").save(path)
    code, stdout, stderr = run_script("detect.py", *detect_args(run, tmp_path / "results", root=root))
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "results" / CATEGORY / "metrics.json").read_text())
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["aupro_0.3"] <= 1  # NaN before


def test_a_mask_of_another_size_than_its_image_is_an_error(run, tmp_path):
    root = copy_root(run, tmp_path)
    mask = next((root / CATEGORY / "ground_truth").rglob("*_mask.png"))
    Image.open(mask).resize((16, 16), Image.NEAREST).save(mask)
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", root=root)))
    assert f"mask '{mask}' is 16x16 but its image" in line and "is 32x32; a mask must have its image's size" in line


def test_macos_appledouble_files_are_skipped_everywhere(run, tmp_path):
    root = copy_root(run, tmp_path)
    cat = root / CATEGORY
    for folder in ("train/good", "test/good", "test/blob_or_scratch", "ground_truth/blob_or_scratch"):
        (cat / folder / "._000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    code, _, stderr = run_script("train.py", *train_args(root, tmp_path / "out"))
    assert code == 0, stderr
    train, val = data.train_val_files(cat, 0.25, 0)
    assert len(train) + len(val) == 12 and not any(p.name.startswith("._") for p in train + val)
    assert len(data.load_split(root, CATEGORY, "test", 32)) == 4


# ----------------------------------------------------------------------------- 4. non-finite and degenerate

def nan_checkpoint(run, path):
    ckpt = torch.load(run.folder / "best.pt", weights_only=True)
    key = next(k for k, v in ckpt["model_state"].items() if v.is_floating_point())
    ckpt["model_state"][key] = torch.full_like(ckpt["model_state"][key], float("nan"))
    torch.save(ckpt, path)
    return key


def test_nan_weights_stop_detect_and_evaluate_with_one_line(run, tmp_path):
    bad = tmp_path / "nan.pt"
    key = nan_checkpoint(run, bad)
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", "--checkpoint", bad)))
    assert line == (f"error: checkpoint '{bad}' holds non-finite (NaN or inf) weights in {key}: the run "
                    "diverged or the file is damaged; retrain")
    assert not (tmp_path / "results" / CATEGORY / "metrics.json").exists()
    outputs, folder = copy_outputs(run, tmp_path)
    nan_checkpoint(run, folder / "best.pt")
    line = error_line(run_script("evaluate.py", "--category", CATEGORY, "--outputs", outputs, "--no-generation"))
    assert "non-finite (NaN or inf) weights" in line and f"'{folder / 'checkpoint.pt'}' beside it is intact" in line
    assert not (outputs / evaluate.SUMMARY_FILE).exists()


def test_non_finite_maps_stop_detect_before_any_result_is_written(run, tmp_path, monkeypatch):
    real = detect.compute_maps

    def poisoned(*args, **kw):
        maps, recons, epistemic = real(*args, **kw)
        return {n: np.where(np.arange(len(m))[:, None, None] == 0, np.nan, m) for n, m in maps.items()}, recons, epistemic
    monkeypatch.setattr(detect, "compute_maps", poisoned)
    # 3 val images, each also scored moved 1 px four ways (the DAE is trained with shift 1): of the
    # 15 maps only the first is poisoned, which is one of the 3 images
    with pytest.raises(checks.RunError, match=r"the val maps of 1 of 3 images are not finite \(NaN or inf\)"):
        detect.main([str(a) for a in detect_args(run, tmp_path / "results", "--baseline", "none",
                                                               "--map", "ssim", "--template", "off")])
    assert list((tmp_path / "results" / CATEGORY).iterdir()) == []


def test_metrics_json_is_strict_json_with_null_for_undefined_numbers(run, tmp_path):
    root = copy_root(run, tmp_path)
    shutil.rmtree(root / CATEGORY / "test" / "blob_or_scratch")  # no defects: AUROC is undefined
    code, stdout, stderr = run_script("detect.py", *detect_args(run, tmp_path / "results", root=root))
    assert code == 0, stderr
    text = (tmp_path / "results" / CATEGORY / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["image_auroc"] is None and metrics["pixel_auroc"] is None and "NaN" not in text
    assert isinstance(metrics["threshold"], float)


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    checks.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.int64(3)})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [None, 1.5], "c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


TRAIN_BASE = ["--model", "dae", "--category", CATEGORY]
DETECT_BASE = ["--class", CATEGORY]
EVALUATE_BASE = ["--category", CATEGORY]


@pytest.mark.parametrize("script, base, flag, value, message", [
    ("train.py", TRAIN_BASE, "--batch-size", "-4", "must be a positive integer, got '-4'"),
    ("train.py", TRAIN_BASE, "--batch-size", "0", "must be a positive integer, got '0'"),
    ("train.py", TRAIN_BASE, "--epochs", "0", "must be a positive integer, got '0'"),
    ("train.py", TRAIN_BASE, "--prior-epochs", "0", "must be a positive integer, got '0'"),
    ("train.py", TRAIN_BASE, "--val-fraction", "0", "must be a fraction strictly between 0 and 1, got '0'"),
    ("train.py", TRAIN_BASE, "--val-fraction", "1", "must be a fraction strictly between 0 and 1, got '1'"),
    ("train.py", TRAIN_BASE, "--val-fraction", "1.5", "must be a fraction strictly between 0 and 1, got '1.5'"),
    ("train.py", TRAIN_BASE, "--size", "0", "must be a positive integer, got '0'"),
    ("train.py", TRAIN_BASE, "--lr", "nan", "must be a finite number > 0, got 'nan'"),
    ("train.py", TRAIN_BASE, "--lr", "0", "must be a finite number > 0, got '0'"),
    ("train.py", TRAIN_BASE, "--seed", "-1", "must be an integer >= 0, got '-1'"),
    ("train.py", TRAIN_BASE, "--anomaly-fraction", "2", "must be a fraction from 0 to 1, got '2'"),
    ("train.py", TRAIN_BASE, "--ssim-weight", "-1", "must be a finite number >= 0, got '-1'"),
    ("train.py", TRAIN_BASE, "--width", "0", "must be a positive integer, got '0'"),
    ("detect.py", DETECT_BASE, "--topk", "0", "must be a positive integer, got '0'"),
    ("detect.py", DETECT_BASE, "--mc-passes", "0", "must be a positive integer, got '0'"),
    ("detect.py", DETECT_BASE, "--batch-size", "0", "must be a positive integer, got '0'"),
    ("detect.py", DETECT_BASE, "--sigma", "-1", "must be a finite number >= 0, got '-1'"),
    ("detect.py", DETECT_BASE, "--threshold", "nan", "must be a finite number, got 'nan'"),
    ("evaluate.py", EVALUATE_BASE, "--batch-size", "0", "must be positive"),
    ("evaluate.py", EVALUATE_BASE, "--num-samples", "0", "must be at least 10"),
    ("evaluate.py", EVALUATE_BASE, "--seed", "-1", "must be an integer >= 0, got '-1'"),
])
def test_bad_numbers_are_refused_at_parse_time(tmp_path, script, base, flag, value, message):
    line = argparse_line(run_script(script, *base, flag, value), script)
    assert flag in line and message in line


@pytest.mark.parametrize("script, base, abbreviation", [
    ("detect.py", DETECT_BASE, "--out"),  # train.py's --out, not detect.py's --outputs
    ("train.py", TRAIN_BASE, "--over"),
    ("evaluate.py", EVALUATE_BASE, "--no-gen"),
])
def test_an_abbreviated_option_is_refused_not_read_as_another(tmp_path, script, base, abbreviation):
    line = argparse_line(run_script(script, *base, abbreviation, str(tmp_path)), script)
    assert f"unrecognized arguments: {abbreviation}" in line


@pytest.mark.parametrize("model, size, message", [
    ("dae", 4, "image size must be 8 * 2^k >= 16 (e.g. 64, 128, 256), got 4"),
    ("dae", 8, "image size must be 8 * 2^k >= 16 (e.g. 64, 128, 256), got 8"),
    ("beta_vae", 48, "image size must be 8 * 2^k >= 16 (e.g. 64, 128, 256), got 48"),
    ("vqvae", 4, "image size must be a multiple of 4 and at least 8, got 4"),
])
def test_a_size_the_model_cannot_take_is_named_before_any_data_is_read(tmp_path, model, size, message):
    result = run_script("train.py", "--model", model, "--category", CATEGORY, "--size", size,
                        "--data-root", tmp_path / "nowhere", "--out", tmp_path / "out")
    line = error_line(result)
    assert line.startswith(f"error: {model} cannot be built with --size {size}") and line.endswith(message)
    assert not (tmp_path / "out").exists()


def test_topk_beyond_the_map_is_refused(run, tmp_path):
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", "--score", "topk",
                                                           "--topk", "5000")))
    assert line == ("error: --topk 5000 is more than the 1024 pixels of a 32 px map, so it would score "
                    "the whole-map mean; pass at most 1024")


# ----------------------------------------------------------------------------- checkpoints

def break_checkpoint(kind, path, run):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        good = (run.folder / "best.pt").read_bytes()
        path.write_bytes(good[:len(good) // 2])
    elif kind == "random pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "foreign state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    return digest(path)


PROBLEMS = {"empty": "is empty (0 bytes)",
            "truncated": "cannot be read: truncated, corrupt or not a PyTorch checkpoint",
            "random pickle": "cannot be read: truncated, corrupt or not a PyTorch checkpoint",
            "foreign state_dict": "is not a train.py checkpoint (it has no model_name, model_args, model_state"}


@pytest.mark.parametrize("kind", list(PROBLEMS))
@pytest.mark.parametrize("tool", ["detect", "evaluate", "resume"])
def test_a_broken_checkpoint_is_one_line_in_every_tool(run, tmp_path, tool, kind):
    outputs, folder = copy_outputs(run, tmp_path)
    if tool == "detect":
        bad = tmp_path / "bad.pt"
        kept = break_checkpoint(kind, bad, run)
        result = run_script("detect.py", *detect_args(run, tmp_path / "results", "--checkpoint", bad))
    elif tool == "evaluate":
        bad = folder / "best.pt"
        (folder / "checkpoint.pt").unlink()
        kept = break_checkpoint(kind, bad, run)
        result = run_script("evaluate.py", "--category", CATEGORY, "--outputs", outputs, "--no-generation")
    else:
        bad = folder / "checkpoint.pt"
        kept = break_checkpoint(kind, bad, run)
        best = digest(folder / "best.pt")
        result = run_script("train.py", *train_args(run.root, folder, "--resume"))
    line = error_line(result)
    assert line.startswith(f"error: checkpoint '{bad}' {PROBLEMS[kind]}")
    assert digest(bad) == kept  # nothing is deleted or rewritten
    if tool == "resume":
        assert digest(folder / "best.pt") == best
        assert line.endswith(f"'{folder / 'best.pt'}' beside it is intact: resume reads checkpoint.pt only: "
                             "start over with --overwrite, or train into another --out")


def test_a_truncated_best_pt_names_the_intact_checkpoint_pt_beside_it(run, tmp_path):
    outputs, folder = copy_outputs(run, tmp_path)
    break_checkpoint("truncated", folder / "best.pt", run)
    results = tmp_path / "results"
    line = error_line(run_script("detect.py", *detect_args(SimpleNamespace(outputs=outputs, root=run.root), results)))
    good = folder / "checkpoint.pt"
    assert line.startswith(f"error: checkpoint '{folder / 'best.pt'}' cannot be read")
    assert line.endswith(f"; '{good}' beside it is intact: pass it with --checkpoint")
    code, _, stderr = run_script("detect.py", *detect_args(SimpleNamespace(outputs=outputs, root=run.root),
                                                           results, "--checkpoint", good))
    assert code == 0 and (results / CATEGORY / "metrics.json").is_file(), stderr


def test_model_given_with_a_checkpoint_of_another_model_is_refused(run, tmp_path):
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", "--model", "vqvae",
                                                           "--checkpoint", run.folder / "best.pt")))
    assert line == (f"error: checkpoint '{run.folder / 'best.pt'}' holds a dae model, not a vqvae: pass a "
                    "vqvae checkpoint, or drop --model to run the dae")
    outputs, folder = copy_outputs(run, tmp_path)
    shutil.copytree(folder, outputs / CATEGORY / "vqvae")
    line = error_line(run_script("evaluate.py", "--category", CATEGORY, "--outputs", outputs, "--models", "vqvae",
                                 "--no-generation"))
    assert "holds a dae model, not a vqvae: it sits in the 'vqvae' folder" in line


def test_weights_that_do_not_fit_the_model_are_one_line_naming_them(run, tmp_path):
    """E.g. a DAE checkpoint written before the DAE had a segmenter."""
    ckpt = torch.load(run.folder / "best.pt", weights_only=True)
    ckpt["model_state"] = {k: v for k, v in ckpt["model_state"].items() if not k.startswith("segmenter.")}
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    line = error_line(run_script("detect.py", *detect_args(run, tmp_path / "results", "--checkpoint", old)))
    assert line.startswith(f"error: the weights in '{old}' do not fit its dae (Missing key(s) in state_dict: "
                           '"segmenter.')
    assert line.endswith("was it written by another version of models.py?")


# ----------------------------------------------------------------------------- output folders, disk, device

def test_results_that_cannot_be_a_folder_are_refused_before_the_work(run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    missing = tmp_path / "no.pt"  # checked after the output folder: the folder error comes first
    line = error_line(run_script("detect.py", *detect_args(run, blocker, "--checkpoint", missing)))
    assert line == f"error: --results '{blocker / CATEGORY}' cannot be written (Not a directory): pass a folder you can write to"
    results = tmp_path / "results"
    (results).mkdir()
    (results / CATEGORY).write_text("x")
    line = error_line(run_script("detect.py", *detect_args(run, results, "--checkpoint", missing)))
    assert line == f"error: --results '{results / CATEGORY}' is a file, not a folder: pass a folder"


def test_an_out_that_is_a_file_is_refused_before_any_data_is_read(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    line = error_line(run_script("train.py", "--model", "dae", "--category", CATEGORY, "--size", "32",
                                 "--data-root", tmp_path / "nowhere", "--out", out))
    assert line == f"error: --out '{out}' is a file, not a folder: pass a folder"
    line = error_line(run_script("train.py", "--model", "dae", "--category", CATEGORY, "--size", "32",
                                 "--data-root", tmp_path / "nowhere", "--out", out / "run"))
    assert line.startswith(f"error: --out '{out / 'run'}' cannot be written (Not a directory)")


def test_a_read_only_results_folder_is_refused(run, tmp_path, monkeypatch):
    """The folder refuses a file as a read-only one does (as root a chmod would not refuse it)."""
    results = tmp_path / "results"
    (results / CATEGORY).mkdir(parents=True)
    make_file = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == results / CATEGORY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return make_file(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    line = error_line(run_script("detect.py", *detect_args(run, results)))
    assert "cannot be written (Permission denied)" in line


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(run, tmp_path, monkeypatch):
    outputs, folder = copy_outputs(run, tmp_path)
    before = digests(folder)
    real_save = torch.save

    def full_disk(obj, f, *args, **kw):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    line = error_line(run_script("train.py", *train_args(run.root, folder, "--resume", "--epochs", "2")))
    # best.pt is written first (the DAE keeps its latest epoch there), so it meets the full disk
    assert line == (f"error: could not write '{folder / 'best.pt'}' (No space left on device); the "
                    "previous 'best.pt' is kept intact: free disk space, then run again (train.py "
                    "continues from the last saved epoch with --resume)")
    after = digests(folder)
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["best.pt"] == before["best.pt"]
    assert not list(folder.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues where it was
    code, _, stderr = run_script("train.py", *train_args(run.root, folder, "--resume", "--epochs", "2"))
    assert code == 0, stderr
    stage_epochs = [r.split(",")[1:3] for r in (folder / "metrics.csv").read_text().splitlines()[1:]]
    assert stage_epochs == [["autoencoder", "0"], ["autoencoder", "1"]]


@pytest.mark.parametrize("script, base", [("train.py", TRAIN_BASE), ("detect.py", DETECT_BASE),
                                          ("evaluate.py", EVALUATE_BASE)])
def test_device_cuda_without_cuda_is_refused_at_parse_time(monkeypatch, script, base):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = argparse_line(run_script(script, *base, "--device", "cuda"), script)
    assert line == (f"{script}: error: argument --device: 'cuda': this machine has no usable CUDA device "
                    "(torch.cuda.is_available() is False); use --device cpu or --device auto")


def test_class_with_a_trailing_slash_is_the_class(run, tmp_path):
    results = tmp_path / "results"
    args = detect_args(run, results)
    args[args.index(CATEGORY)] = CATEGORY + "/"
    code, stdout, stderr = run_script("detect.py", *args)
    assert code == 0, stderr
    assert json.loads((results / CATEGORY / "metrics.json").read_text())["class"] == CATEGORY


def test_ctrl_c_in_detect_is_one_line_exit_130_and_no_metrics(run, tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # detect.py as a user runs it, with the maps of a batch slowed down, so the interrupt lands
    # while it works however fast the machine (a stored calibration makes the real run instant)
    slowed = ("import sys, time, runpy, models\n"
              "maps = models.AutoEncoder.anomaly_maps\n"
              "def slow(self, x, *a, **k):\n"
              "    time.sleep(30 if len(x) > 1 else 0)\n"
              "    return maps(self, x, *a, **k)\n"
              "models.AutoEncoder.anomaly_maps = slow\n"
              "sys.argv = ['detect.py'] + sys.argv[1:]\n"
              "runpy.run_path('detect.py', run_name='__main__')\n")
    # SIGINT as at a terminal: a suite started in the background (`cmd &`) ignores it, and children
    # would inherit that
    proc = subprocess.Popen([sys.executable, "-c", slowed, *map(str, detect_args(run, results))], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()  # printed once the model and the images are loaded, before the maps
    assert "test /" in first, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and lines_of(stderr) == [
        "interrupted: results may be incomplete (metrics.json is never half-written); run detect.py "
        "again for all of them"]
    assert not list((results / CATEGORY).glob("metrics.json*"))
