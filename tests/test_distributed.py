"""torchrun with 2 CPU processes (gloo): DDP + DistributedSampler, rank 0 alone writes outputs,
and the result matches the single-process run up to floating-point noise.

The equivalence run uses the VQ-VAE with a gradient-learned codebook (--no-ema) and no synthetic
anomalies: no BatchNorm (whose statistics are per process on CPU; SyncBatchNorm needs CUDA), no
dead-code restarts and no random draws, so the global batch of 2 x 4 images must give the same
update as one batch of 8.
"""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"checkpoint.pt", "best.pt", "metrics.csv", "recon.png", "samples.png"}
COMMON = ["--category", "synthetic", "--size", "32", "--batch-size", "8"]
# per-batch statistics that are not means over images: a mean of per-process values differs
NONLINEAR = {"train_perplexity", "train_codes_used"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU even where a GPU exists
    return e


def launch(args, out, processes):
    """Start train.py alone or under torchrun (--standalone picks a free port itself)."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
    cmd = runner + ["train.py", *args, *COMMON, "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out\n{stdout}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr[-3000:]}"
    return stdout


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def vqvae_runs(rgb_root, tmp_path_factory):
    """The same VQ-VAE run with 2 processes (A) and with 1 (B), started side by side."""
    base = tmp_path_factory.mktemp("ddp")
    # no synthetic anomalies: they are drawn per process (seed + rank), so 2 x 4 images get other
    # corruptions than 1 x 8 (same distribution, other draws); the SSIM term stays on. float32:
    # bf16 rounds a batch of 4 differently from a batch of 8, beyond any useful tolerance
    args = ["--model", "vqvae", "--no-ema", "--anomaly-fraction", "0", "--no-bf16", "--data-root", str(rgb_root),
            "--epochs", "2", "--prior-epochs", "1"]
    procs = {"A": launch(args, base / "A", 2), "B": launch(args, base / "B", 1)}
    try:
        stdout = {name: finish(proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():  # a failed run must not leave the other one running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return base / "A", base / "B", stdout


def test_only_rank_zero_writes(vqvae_runs):
    a, b, stdout = vqvae_runs
    assert "2 process(es)" in stdout["A"] and "1 process(es)" in stdout["B"]
    written = {p.name for p in a.iterdir()}
    assert written == {p.name for p in b.iterdir()} and OUTPUTS <= written
    # every log line once: rank 1 prints (and so writes) nothing
    for line in ("autoencoder epoch 1/2", "autoencoder epoch 2/2", "prior epoch 1/1", "done:"):
        assert stdout["A"].count(line) == 1, stdout["A"]


def test_weights_match_single_process(vqvae_runs):
    a, b, _ = vqvae_runs
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert (ca["stage"], ca["epoch"], ca["step"]) == (cb["stage"], cb["epoch"], cb["step"])
    assert ca["model_state"].keys() == cb["model_state"].keys()
    for name, ta in ca["model_state"].items():
        torch.testing.assert_close(ta, cb["model_state"][name], atol=1e-5, rtol=1e-4, msg=name)
    # the optimizer moments too: same steps over the same global batches
    for sa, sb in zip(ca["optimizer_state"]["state"].values(), cb["optimizer_state"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], atol=1e-6, rtol=1e-4)


def test_validation_metrics_match(vqvae_runs):
    a, b, _ = vqvae_runs
    ra, rb = read_rows(a / "metrics.csv"), read_rows(b / "metrics.csv")
    def key(r):
        return r["stage_index"], r["stage"], r["epoch"], r["step"]
    # 22 train images: 3 global batches of 8, 8, 6 per epoch, whichever the process count
    assert [key(r) for r in ra] == [key(r) for r in rb] == [
        ("0", "autoencoder", "0", "3"), ("0", "autoencoder", "1", "6"), ("1", "prior", "0", "3")]
    assert [float(r["lr"]) for r in ra] == [float(r["lr"]) for r in rb]
    for x, y in zip(ra, rb):
        for col in ("val_loss", "val_mse"):
            assert math.isclose(float(x[col]), float(y[col]), rel_tol=1e-4, abs_tol=1e-5), col


def test_logged_training_terms_cover_every_process(vqvae_runs):
    """train_* columns are means over the global batch, not over rank 0's half of it."""
    a, b, _ = vqvae_runs
    ra, rb = read_rows(a / "metrics.csv"), read_rows(b / "metrics.csv")
    assert set(ra[0]) == set(rb[0])
    for x, y in zip(ra, rb):
        for col in x:
            if col.startswith("train_") and col not in NONLINEAR and x[col] != "":
                assert math.isclose(float(x[col]), float(y[col]), rel_tol=1e-4, abs_tol=1e-5), \
                    f"{col}: 2 processes {x[col]} vs 1 process {y[col]}"


def test_batchnorm_model_runs_under_torchrun(rgb_root, tmp_path):
    """BatchNorm (per-process statistics, rank 0's buffers broadcast) trains end to end."""
    from models import load_model

    stdout = finish(launch(["--model", "dae", "--data-root", str(rgb_root), "--epochs", "1"], tmp_path / "dae", 2))
    assert stdout.count("done:") == 1 and "2 process(es)" in stdout
    assert OUTPUTS <= {p.name for p in (tmp_path / "dae").iterdir()}
    assert [row["stage"] for row in read_rows(tmp_path / "dae" / "metrics.csv")] == ["autoencoder"]
    model, ckpt = load_model(tmp_path / "dae" / "checkpoint.pt")
    assert ckpt["step"] == 3  # 22 images, 11 per process, batches of 4: 3 steps
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
