"""A sixth model is one class and one registry line: train.py and detect.py run it unchanged."""
import csv
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import detect
import models
import train


class TinyAE(models.AutoEncoder):
    """Two stride-2 convolutions each way, trained in three stages (more than any of the five):
    everything, then the decoder alone, then the encoder alone."""

    stages = ("autoencoder", "decoder", "encoder")
    # 3 steps per pass on the fixture (22 train images, batch 8), 6 passes (18 steps) per epoch
    # (train.MIN_EPOCH_STEPS): 3, 2 and 1 epochs
    recipe = dict(models.AutoEncoder.recipe, steps=54, lr=3e-3, decoder_steps=36, encoder_steps=18)

    def __init__(self, image_size=64, width=8, **objective):
        super().__init__(**objective)
        self.config.update(image_size=image_size, width=width)
        self.code_shape = (width, image_size // 4, image_size // 4)
        self.encoder = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(width, width, 4, 2, 1))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(width, width, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(width, 3, 4, 2, 1), nn.Sigmoid())

    def stage_parameters(self, stage):
        return list(self.parameters() if stage == "autoencoder" else getattr(self, stage).parameters())

    def base_loss(self, x, target, stage="autoencoder"):
        recon = self.reconstruct(x)
        mse = F.mse_loss(recon, target)
        return mse, {"mse": mse.detach()}, recon

    def reconstruct(self, x):
        return self.decoder(self.encoder(x))

    def features(self, x):
        return self.encoder[:2](x)

    def sample(self, n, generator=None):
        return self.decoder(models.noise((n, *self.code_shape), generator, self.decoder[0].weight.device))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", TinyAE)  # the one registry line


def test_a_registered_model_trains_in_its_stages_and_detects(tiny, rgb_root, tmp_path):
    runs = tmp_path / "runs"
    train.main(["--model", "tiny", "--class", "synthetic", "--data-root", str(rgb_root),
                "--runs", str(runs), "--size", "32", "--batch-size", "8", "--encoder-lr", "1e-4"])
    folder = runs / "synthetic" / "tiny"
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("autoencoder", "0"), ("autoencoder", "1"), ("autoencoder", "2"),
        ("decoder", "0"), ("decoder", "1"), ("encoder", "0")]
    assert "train_ssim" in rows[0]  # the objective's SSIM term, from the base class
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert (ckpt["model_name"], ckpt["stage_index"], ckpt["config"]["encoder_lr"]) == ("tiny", 2, 1e-4)
    assert ckpt["model_args"] == {**TinyAE().config, "image_size": 32}

    metrics = detect.main(["--category", "synthetic", "--runs", str(runs),
                           "--results", str(tmp_path / "results"), "--data-root", str(rgb_root)])
    assert (metrics["model"], metrics["map"]) == ("tiny", "ssim")  # found without --model
    assert json.loads((tmp_path / "results" / "synthetic" / "metrics.json").read_text())["model"] == "tiny"
    assert len(list((tmp_path / "results" / "synthetic").glob("synthetic_*_viz.png"))) == 8
