"""evaluate.py end to end on tiny synthetic data, offline.

FID / IS / KID go through the real torch_fidelity.calculate_metrics with an Inception weights
file made here from torch-fidelity's own architecture with random values. Its SHA-256 is not the
official one, so evaluate.py refuses it unless --allow-unofficial-inception is given, and then
writes its numbers only to the *_unofficial columns. Downloads are blocked by pointing the
proxy variables at a closed port, so the tests behave the same with or without a network.
"""
import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

import data
import evaluate
import train
from models import load_model

ROOT = Path(__file__).resolve().parents[1]
N = 10  # samples per model: the least the Inception Score's 10 splits allow
BLOCKED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once


def offline_env(torch_home):
    """Environment with an empty torch hub cache, no weights variables and downloads refused."""
    env = {k: v for k, v in os.environ.items()
           if k not in (evaluate.INCEPTION_ENV, "LPIPS_BACKBONE", "NO_PROXY", "no_proxy")}
    env.update(TORCH_HOME=str(torch_home), HTTPS_PROXY=BLOCKED, HTTP_PROXY=BLOCKED,
               https_proxy=BLOCKED, http_proxy=BLOCKED, OMP_NUM_THREADS="1")
    return env


def random_inception_weights(path):
    """A state_dict with exactly the keys and shapes torch-fidelity expects, random values.

    The extractor downloads its weights in __init__; patching out the download and the load
    leaves PyTorch's initialisation. Kaiming-normal convolutions keep the activations from
    vanishing over ~90 layers, so the metrics are not all zero."""
    torch.manual_seed(0)
    cls = fidelity_inception.FeatureExtractorInceptionV3
    with mock.patch.object(fidelity_inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(cls, "load_state_dict"):
        net = cls("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine, OpenMP's two threads wait on each other and the many small
    operations of sampling and Inception get up to 100x slower; one thread keeps this file fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-image synthetic category, a dae and a vqvae trained 1 epoch at 32 px, random weights."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root, outputs = tmp / "data", tmp / "outputs"
    data.make_synthetic_category(root, "synthetic", size=32, n_train=10, n_good_test=2, n_defect_test=1)
    common = ["--category", "synthetic", "--data-root", str(root), "--size", "32", "--epochs", "1",
              "--batch-size", "8"]
    train.main(["--model", "dae", *common, "--out", str(outputs / "synthetic" / "dae")])
    train.main(["--model", "vqvae", *common, "--prior-epochs", "1",
                "--out", str(outputs / "synthetic" / "vqvae")])
    weights = random_inception_weights(tmp / "random_inception.pth")
    yield {"root": root, "outputs": outputs, "weights": weights}
    weights.unlink()  # 95 MB: do not leave it in pytest's kept temporary folders


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """offline_env() applied to this process (in-process runs) and returned (subprocesses)."""
    env = offline_env(tmp_path / "torch_home")
    for k in set(os.environ) - set(env):
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def fresh_outputs(trained, tmp_path):
    """A private copy of the checkpoints, so each test starts without a summary."""
    out = tmp_path / "outputs"
    shutil.copytree(trained["outputs"], out, ignore=shutil.ignore_patterns("eval", "*.csv", "*.png"))
    return out


def base_args(trained, outputs, *extra):
    return ["--category", "synthetic", "--outputs", str(outputs), "--data-root", str(trained["root"]),
            "--num-samples", str(N), "--batch-size", "8", *extra]


def run_cli(args, env):
    """evaluate.py as a subprocess: numpy's OpenBLAS reads OMP_NUM_THREADS only at start-up, and FID's
    2048 x 2048 eigenvalue problem is several times slower with two threads on two busy cores."""
    result = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def read_summary(outputs):
    with open(outputs / evaluate.SUMMARY_FILE, newline="") as f:
        return list(csv.DictReader(f))


def finite(row, *columns):
    return all(math.isfinite(float(row[c])) for c in columns)


def test_summary_rows_are_reproducible_updated_in_place_and_added(trained, offline, tmp_path):
    outputs = fresh_outputs(trained, tmp_path)
    dae_args = base_args(trained, outputs, "--models", "dae", "--inception-weights", str(trained["weights"]),
                         "--allow-unofficial-inception")
    printed = run_cli(dae_args, offline).stdout
    assert "fid_unofficial" in printed and "note: the lpips column is left empty" in printed
    (dae,) = read_summary(outputs)
    assert (dae["category"], dae["model"], dae["resolution"]) == ("synthetic", "dae", "32")
    assert (dae["num_samples"], dae["reference_images"], dae["kid_subset_size"]) == (str(N), "10", str(N))
    assert dae["checkpoint"] == str(outputs / "synthetic" / "dae" / "best.pt")
    assert finite(dae, *evaluate.UNOFFICIAL, "mse", "ssim") and float(dae["fid_unofficial"]) > 0
    # a random network's numbers never appear under the official names, and LPIPS is offline
    assert all(dae[c] == "" for c in evaluate.GENERATION) and dae["lpips"] == ""
    assert dae["recon_images"] == "3"  # 1 val + 2 test/good
    eval_dir = outputs / "eval" / "synthetic"
    assert len(list((eval_dir / "dae" / "gen").glob("*.png"))) == N
    assert len(list((eval_dir / "reference_32").glob("*.png"))) == 10

    run_cli(dae_args, offline)
    assert read_summary(outputs) == [dae]  # same checkpoint and seed: same numbers, row replaced

    # a second model adds a row; FID's fixed cost (eigenvalues of a 2048 x 2048 matrix) is spared
    evaluate.main(base_args(trained, outputs, "--models", "vqvae", "--no-generation",
                            "--lpips-random-backbone"))
    rows = read_summary(outputs)
    assert [r["model"] for r in rows] == ["dae", "vqvae"] and rows[0]["fid_unofficial"] == dae["fid_unofficial"]
    vqvae = rows[1]
    assert finite(vqvae, "mse", "ssim", "lpips_random") and vqvae["lpips"] == ""
    assert all(vqvae[c] == "" for c in evaluate.GENERATION + evaluate.UNOFFICIAL + ["num_samples"])
    assert not (eval_dir / "vqvae").exists()


def test_offline_without_weights_is_one_line(trained, tmp_path):
    """No weights file, no cache, no network: one 'error:' line saying how to provide them."""
    result = subprocess.run(
        [sys.executable, "evaluate.py", *base_args(trained, trained["outputs"], "--models", "dae")],
        cwd=ROOT, env=offline_env(tmp_path / "torch_home"), capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--inception-weights" in lines[0] and evaluate.INCEPTION_ENV in lines[0]
    assert evaluate.INCEPTION_FILE in lines[0]
    assert not (trained["outputs"] / "eval").exists()  # checked before any sampling


@pytest.mark.parametrize("content, allow, message", [
    ("random", False, "not the official"),  # refused unless explicitly allowed
    ("garbage", True, "cannot be loaded"),  # allowed, but not an InceptionV3 state_dict
])
def test_bad_inception_weights_are_refused(trained, offline, tmp_path, content, allow, message):
    weights = trained["weights"]
    if content == "garbage":
        weights = tmp_path / "garbage.pth"
        weights.write_bytes(b"not a checkpoint")
    extra = ["--inception-weights", str(weights)] + (["--allow-unofficial-inception"] if allow else [])
    with pytest.raises(evaluate.EvaluationError, match=message):
        evaluate.main(base_args(trained, trained["outputs"], *extra))
    assert not (trained["outputs"] / "eval").exists()  # refused before any sampling


def test_finding_checkpoints(trained):
    jobs = evaluate.find_jobs(trained["outputs"], "all", None)
    assert [(c, m, p.name) for c, m, p in jobs] == [("synthetic", "dae", "best.pt"),
                                                    ("synthetic", "vqvae", "best.pt")]
    with pytest.raises(evaluate.EvaluationError, match="no checkpoint for savae.*trained there: dae, vqvae"):
        evaluate.find_jobs(trained["outputs"], "synthetic", ["savae"])


def test_vqvae_without_a_trained_prior_is_not_sampled(trained, tmp_path, capsys):
    """A checkpoint saved before the code-prior stage would sample from a random prior."""
    ckpt = torch.load(trained["outputs"] / "synthetic" / "vqvae" / "best.pt", weights_only=True)
    path = tmp_path / "outputs" / "synthetic" / "vqvae" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({**ckpt, "stage_index": 0, "stage": "autoencoder"}, path)
    args = evaluate.parse_args(base_args(trained, tmp_path / "outputs"))
    row = evaluate.evaluate_model("synthetic", "vqvae", path, args, torch.device("cpu"),
                                  (str(trained["weights"]), False), None)
    assert "untrained" in capsys.readouterr().out
    assert not set(row) & set(evaluate.GENERATION + evaluate.UNOFFICIAL) and math.isfinite(row["mse"])
    assert not (tmp_path / "outputs" / "eval").exists()


def test_samples_are_reproducible_from_the_seed(trained, tmp_path):
    model, _ = load_model(trained["outputs"] / "synthetic" / "vqvae" / "best.pt")

    def pngs(seed, name):
        evaluate.save_samples(model, 3, 2, seed, tmp_path / name, "sample")
        return [p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))]

    first = pngs(0, "a")
    assert len(first) == 3 and pngs(0, "b") == first and pngs(1, "c") != first


def test_summary_rows_replaced_in_place_and_printed_aligned(tmp_path):
    path = tmp_path / evaluate.SUMMARY_FILE
    row = {"category": "bottle", "resolution": 128, "checkpoint": "ckpt.pt", "mse": 0.5}
    evaluate.update_summary(path, {**row, "model": "dae"})
    evaluate.update_summary(path, {**row, "model": "vqvae"})
    rows = evaluate.update_summary(path, {**row, "model": "dae", "mse": 0.25, "isc_mean": 2.0,
                                          "isc_std": 0.1, "lpips_random": 0.3})
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert [(r["model"], r["mse"]) for r in rows] == [("dae", "0.25"), ("vqvae", "0.5")]
    assert set(evaluate.ALWAYS) <= set(header) and "lpips_random" in header
    assert "fid_unofficial" not in header  # optional columns only once a row uses them
    lines = evaluate.format_table(rows).splitlines()
    assert lines[0].split() == ["category", "model", "resolution", "isc", "mse", "lpips_random",
                                "checkpoint"]
    assert "2 ± 0.1" in lines[1] and lines[1].index("ckpt.pt") == lines[2].index("ckpt.pt")


def test_a_zoomed_run_is_evaluated_on_images_cut_to_each_parts_window(trained, offline, small_parts_root, tmp_path):
    """A run that zoomed onto its parts generates windows around a part: FID's reference and the
    reconstructed held-out images are cut the same way, not whole frames."""
    outputs = tmp_path / "outputs"
    train.main(["--model", "dae", "--category", "small_parts", "--data-root", str(small_parts_root), "--size", "32",
                "--epochs", "1", "--batch-size", "8", "--out", str(outputs / "small_parts" / "dae")])
    side = torch.load(outputs / "small_parts" / "dae" / "best.pt", weights_only=False)["config"]["zoom_window"]["side"]
    run_cli(["--category", "small_parts", "--outputs", str(outputs), "--num-samples", str(N), "--batch-size", "8",
             "--inception-weights", str(trained["weights"]), "--allow-unofficial-inception"], offline)
    (row,) = read_summary(outputs)
    assert row["recon_images"] == "6" and finite(row, "mse", "fid_unofficial")  # 2 val + 4 test/good

    def images_in(folder):
        return [np.asarray(Image.open(p).convert("L")) for p in sorted(folder.glob("*.png"))]

    def part_share(folder):  # the share of pixels showing the bright part (the table is dark)
        return sum(float((image > 100).mean()) for image in images_in(folder)) / 24

    reference = outputs / "eval" / "small_parts" / f"reference_32_zoom{side:g}"
    assert len(images_in(reference)) == 24
    whole = evaluate.ensure_reference(small_parts_root, "small_parts", 32, tmp_path / "whole")
    assert whole == 24 and part_share(reference) > 4 * part_share(tmp_path / "whole")
