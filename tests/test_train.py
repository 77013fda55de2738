"""train.py end to end: every model trains, writes its outputs, resumes exactly, fails clearly."""
import csv
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, long_part
import models
import train

OUTPUTS = {"checkpoint.pt", "best.pt", "metrics.csv", "recon.png", "samples.png"}
FAST = ["--size", "32", "--batch-size", "8", "--prior-epochs", "1"]


def run_train(root, category, out, *extra, env=None, check=True):
    cmd = [sys.executable, "train.py", "--category", category, "--data-root", str(root),
           "--out", str(out), *FAST, *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_model_trains_end_to_end_and_writes_its_outputs(rgb_root, tmp_path, name):
    extra = ["--lpips-random-backbone"] if name == "ar_savae" else []
    run_train(rgb_root, "synthetic", tmp_path, "--model", name, "--epochs", "1", *extra)
    assert OUTPUTS <= {p.name for p in tmp_path.iterdir()}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("model_name", "model_args", "model_state", "optimizer_state", "stage_index",
                "epoch", "step", "best_val", "config"):
        assert key in ckpt
    stages = models.MODELS[name].stages
    assert [r["stage"] for r in rows(tmp_path)] == list(stages)  # one row per epoch per stage
    assert ckpt["stage_index"] == len(stages) - 1
    model, _ = models.load_model(tmp_path / "best.pt")
    assert model.sample(2).shape == (2, 3, 32, 32)


def test_random_lpips_backbone_is_named_as_such_in_every_output(rgb_root, tmp_path):
    run_train(rgb_root, "synthetic", tmp_path, "--model", "ar_savae", "--epochs", "1",
              "--lpips-random-backbone")
    header = rows(tmp_path)[0].keys()
    assert "train_lpips_random" in header and "train_lpips" not in header
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert config["lpips_backbone_kind"] == "lpips_random"


def test_lpips_without_weights_stops_with_one_line_saying_how_to_provide_them(rgb_root, tmp_path):
    blocked = "http://127.0.0.1:9"  # the discard port: downloads fail at once, online or not
    env = {k: v for k, v in os.environ.items() if k not in ("LPIPS_BACKBONE", "NO_PROXY", "no_proxy")}
    env.update(TORCH_HOME=str(tmp_path / "torch_home"), HTTPS_PROXY=blocked, HTTP_PROXY=blocked,
               https_proxy=blocked, http_proxy=blocked)  # no cached AlexNet, and no download
    r = run_train(rgb_root, "synthetic", tmp_path / "out", "--model", "ar_savae", "--epochs", "1",
                  env=env, check=False)
    assert r.returncode == 1, r.stdout[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--lpips-backbone" in lines[0] and "Traceback" not in r.stderr


def kill_after_first_epoch(root, category, out, *extra):
    """Start a run and kill it (SIGKILL, no clean-up) once its first epoch is checkpointed."""
    cmd = [sys.executable, "train.py", "--category", category, "--data-root", str(root),
           "--out", str(out), *FAST, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    for line in proc.stdout:  # the epoch line is printed after its checkpoint is written
        if " epoch 1/" in line:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode != 0, "the run finished before it could be interrupted"


@pytest.mark.parametrize("name", ["dae", "vqvae"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(rgb_root, tmp_path, name):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--model", name, "--epochs", "3"]
    run_train(rgb_root, "synthetic", straight, *args)
    kill_after_first_epoch(rgb_root, "synthetic", resumed, *args)
    assert len(rows(resumed)) == 1
    killed_row = rows(resumed)[0]
    r = run_train(rgb_root, "synthetic", resumed, *args, "--resume")
    # it goes on from epoch 2 and keeps epoch 1's row (its seconds are the killed run's own): a
    # run that started over would reach the same weights, since every epoch is seeded alike
    assert " epoch 1/3" not in r.stdout and " epoch 2/3" in r.stdout
    assert {k: rows(resumed)[0][k] for k in killed_row} == killed_row  # later stages add columns
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"]
    for key, tensor in a["model_state"].items():
        torch.testing.assert_close(tensor, b["model_state"][key], rtol=1e-5, atol=1e-6, msg=key)
    def drop_time(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert drop_time(rows(straight)) == drop_time(rows(resumed))


def test_resume_without_a_checkpoint_is_a_clear_error(rgb_root, tmp_path):
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--resume", check=False)
    assert r.returncode != 0 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_grayscale_category_trains(gray_root, tmp_path):
    run_train(gray_root, "synthetic_gray", tmp_path, "--model", "savae", "--epochs", "1")
    assert (tmp_path / "best.pt").is_file()


def test_non_finite_loss_names_the_term_that_blew_up():
    with pytest.raises(FloatingPointError, match="kl"):
        train.check_finite({"mse": 0.1, "kl": float("nan")}, "autoencoder", 3)
    train.check_finite({"mse": 0.1}, "autoencoder", 3)  # finite: no error


def test_synthetic_anomalies_change_only_the_requested_share_of_the_batch():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = train.add_synthetic_anomalies(x, 0.5)
    changed = (y != x).flatten(1).any(1)
    assert changed[:4].all() and not changed[4:].any()
    assert torch.equal(train.add_synthetic_anomalies(x, 0.0), x)


def test_synthetic_anomalies_keep_grey_images_grey():
    """Recoloured patches must not teach a greyscale category that colour is an anomaly cue."""
    torch.manual_seed(0)
    grey = torch.rand(8, 1, 32, 32).expand(8, 3, 32, 32).contiguous()
    y = train.add_synthetic_anomalies(grey, 0.5)
    assert not torch.equal(y, grey) and torch.equal(y[:, :1].expand_as(y), y)


def blobs_of(add_blobs, clean):
    """(output, blob pixels, images with a blob) of add_blobs(clean, marked, share=0.5) on 16
    images, where marked stands for what the other anomalies made of them: about half get a blob,
    the others keep every pixel, and share 0 changes nothing."""
    marked = torch.full_like(clean, -1.0)
    out = add_blobs(clean, marked, share=0.5)
    inside = out[:, :1] != -1
    got = inside.flatten(1).any(1)
    assert 2 <= got.sum() <= 14
    assert all(torch.equal(out[i], marked[i]) for i in range(16) if not got[i])
    assert torch.equal(add_blobs(clean, marked, share=0.0), marked)
    return out, inside, got


def test_moved_blobs_show_the_images_own_content_from_a_few_pixels_away():
    torch.manual_seed(0)
    clean = torch.rand(16, 3, 64, 64)
    out, inside, got = blobs_of(train.add_moved_blobs, clean)
    moves = [(r, c) for r in range(-6, 7) for c in range(-6, 7) if min(abs(r), abs(c)) >= 1.5]
    for i in torch.nonzero(got).flatten():
        match = [m for m in moves if torch.equal(out[i][:, inside[i, 0]], clean[i].roll(m, (1, 2))[:, inside[i, 0]])]
        assert len(match) == 1  # its own image, moved 2-6 px along each axis (3-12 px at 128 px)


def never_called(*args, **kwargs):
    raise AssertionError("called with a share of 0")


def test_synthetic_anomalies_without_moved_or_removed_blobs_draw_nothing_more(monkeypatch):
    """A share of 0 never reaches the blobs' code, so it draws nothing from the random stream and
    runs without those blobs are as they were; a share of 1 changes the images."""
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    plain = train.add_synthetic_anomalies(x, 0.5)
    for blobs in ("moved", "removed"):
        torch.manual_seed(0)
        assert not torch.equal(train.add_synthetic_anomalies(x, 0.5, **{blobs: 1.0}), plain)
    monkeypatch.setattr(train, "add_moved_blobs", never_called)
    monkeypatch.setattr(train, "add_removed_blobs", never_called)
    torch.manual_seed(0)
    assert torch.equal(train.add_synthetic_anomalies(x, 0.5, moved=0.0, removed=0.0), plain)


def test_fill_from_surroundings_erases_what_lies_inside_and_keeps_the_rest():
    """A bright square inside the region is gone, filled with the surface around it; outside the
    region not a pixel changes, and a flat surface stays as it was."""
    x = torch.full((1, 3, 32, 32), 0.3)
    x[..., 12:20, 12:20] = 0.9  # a part on a plain surface
    region = torch.zeros(1, 1, 32, 32)
    region[..., 8:24, 8:24] = 1
    out = train.fill_from_surroundings(x, region, sigma=2.0)
    assert torch.allclose(out[..., 8:24, 8:24], torch.tensor(0.3), atol=1e-5)
    assert torch.equal(out[..., region[0, 0] == 0], x[..., region[0, 0] == 0])
    flat = torch.full((2, 1, 16, 16), 0.6)
    assert torch.allclose(train.fill_from_surroundings(flat, torch.ones_like(flat).tril(), 2.0), flat)


def test_removed_blobs_take_structure_away_in_about_the_requested_share():
    torch.manual_seed(0)
    stripes = torch.zeros(16, 3, 64, 64)
    stripes[..., ::4] = 1.0  # fine structure everywhere: a fill from the surroundings is grey
    out, inside, got = blobs_of(train.add_removed_blobs, stripes)
    for i in torch.nonzero(got).flatten():
        filled = out[i][:, inside[i, 0]]
        assert 0.05 < filled.mean() < 0.5 and filled.std() < 0.2  # stripes averaged away, not copied


def test_removed_blobs_are_in_the_daes_recipe_only_and_can_be_turned_off():
    assert models.DAE.recipe["removed"] > 0 and models.BetaVAE.recipe["removed"] == 0
    args = ["--model", "dae", "--category", "bottle"]
    assert train.parse_args(args).removed == models.DAE.recipe["removed"]
    assert train.parse_args(args + ["--removed", "0"]).removed == 0


def test_moved_blobs_are_on_only_where_the_parts_lie_alike():
    aligned, turned = turned_parts(8, aligned=True), turned_parts(8, aligned=False)
    assert train.lie_alike(aligned) > 0.99 and train.lie_alike(turned) < train.ALIKE_CORR
    texture = (torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert abs(train.lie_alike(texture)) < 0.1  # grain differs from image to image
    share, why = train.decide_moved("auto", "dae", aligned)
    assert share == models.DAE.recipe["moved"] > 0 and "lie alike" in why
    for other in (turned, texture):
        assert train.decide_moved("auto", "dae", other)[0] == 0
    assert train.decide_moved("auto", "beta_vae", aligned) == (0.0, "not part of beta_vae's recipe")
    assert train.decide_moved("off", "dae", aligned)[0] == 0
    assert train.decide_moved("on", "dae", turned)[0] == models.DAE.recipe["moved"]
    assert train.decide_moved("on", "beta_vae", turned)[0] == train.MOVED_SHARE
    assert train.parse_args(["--model", "dae", "--category", "bottle", "--moved", "on"]).moved_share > 0


def test_rotate_turns_each_image_about_its_centre_by_its_own_angle():
    x = torch.rand(2, 3, 16, 16)
    turned = train.rotate(x, torch.tensor([0.0, math.pi / 2]))
    torch.testing.assert_close(turned[0], x[0])  # no turn: the image itself
    torch.testing.assert_close(turned[1], torch.rot90(x[1], 1, (1, 2)), rtol=0, atol=1e-5)  # a quarter turn
    torch.manual_seed(0)
    once = train.rotate_randomly(x[:1].expand(4, 3, 16, 16))
    assert not torch.allclose(once[0], once[1])  # every image of a batch gets its own angle


def test_a_turn_keeps_the_detail_a_model_should_learn_to_copy():
    """Turned by 23 degrees and back, fine detail keeps 90 % of its gradient (bicubic; a bilinear
    turn keeps 65 %, and a model trained on blurred parts learns to copy blur)."""
    x = F.avg_pool2d(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), 3, 1, 1)
    angle = torch.full((4,), 0.4)
    back = train.rotate(train.rotate(x, angle), -angle)
    centre = slice(16, 48)  # away from the corners the turn fills by reflection
    detail = lambda z: (z[..., centre, 1:] - z[..., centre, :-1]).abs().mean()
    assert detail(back) / detail(x) > 0.85
    black_and_white = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    turned = train.rotate_randomly(black_and_white)
    assert turned.min() >= 0 and turned.max() <= 1  # bicubic overshoots at sharp edges; clamped


def test_shift_moves_each_image_by_its_own_whole_pixel_offset():
    x = torch.rand(1, 3, 16, 16).expand(64, 3, 16, 16)
    torch.manual_seed(0)
    moved = train.shift_randomly(x, 2)
    padded = torch.nn.functional.pad(x[:1], [2] * 4, mode="reflect")[0]
    crops = {(r, c): padded[:, r:r + 16, c:c + 16] for r in range(5) for c in range(5)}
    offsets = [next(k for k, crop in crops.items() if torch.equal(m, crop)) for m in moved]  # StopIteration: no crop
    assert len(set(offsets)) > 10  # every image its own offset, all 25 within +-2 px possible


def test_a_resume_must_keep_the_shift(rgb_root, tmp_path):
    run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "1", "--shift", "2")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["shift"] == 2
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "2", "--resume", check=False)
    assert r.returncode != 0 and "--shift is 1 but the run" in r.stderr and "Traceback" not in r.stderr


def test_rotate_is_recorded_and_a_resume_must_keep_it(rgb_root, tmp_path):
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "1", "--rotate", "on")
    assert "rotation augmentation on: --rotate on" in r.stdout
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert config["rotate"] == "on" and config["rotate_used"] is True
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "2", "--resume", check=False)
    assert r.returncode != 0 and "--rotate is auto but the run" in r.stderr and "Traceback" not in r.stderr


def test_moved_blobs_are_printed_recorded_and_kept_by_a_resume(rgb_root, tmp_path):
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "1", "--moved", "off")
    assert "moved-structure anomalies off: --moved off" in r.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]["moved_share"] == 0
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "2", "--resume", check=False)
    assert r.returncode != 0 and "--moved is auto but the run" in r.stderr and "Traceback" not in r.stderr
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["config"]["moved"], ckpt["config"]["moved_share"]  # as written before moved blobs existed
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "dae", "--epochs", "2", "--resume", "--moved", "on")
    assert "moved-structure anomalies off: the run being resumed was trained without them" in r.stdout


def turned_parts(n, aligned, size=32):
    """n images of one asymmetric part (an L of two bars), all upright or each at a random angle."""
    part = torch.zeros(1, 3, size, size)
    part[..., 6:26, 8:12] = 1.0
    part[..., 22:26, 8:24] = 1.0
    angles = torch.zeros(n) if aligned else torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    return (train.rotate(part.expand(n, -1, -1, -1), angles) * 255).round().to(torch.uint8)


def test_auto_rotation_is_on_only_for_few_parts_at_random_angles():
    assert train.alignment_gain(turned_parts(8, aligned=True)) < 0.01 < train.UNALIGNED_GAIN
    assert train.alignment_gain(turned_parts(8, aligned=False)) > 2 * train.UNALIGNED_GAIN
    on, why = train.decide_rotation("auto", turned_parts(8, aligned=False))
    assert on and "random angles" in why and "only 8 training images" in why
    assert not train.decide_rotation("auto", turned_parts(8, aligned=True))[0]  # aligned: never turned
    many = turned_parts(train.ROTATE_BELOW, aligned=False)
    assert not train.decide_rotation("auto", many)[0]  # enough images cover the angles themselves
    assert train.decide_rotation("on", many)[0] and not train.decide_rotation("off", turned_parts(8, False))[0]


def round_parts(n, size=32):
    """n images of one round part seen from above: two soft bright rings, each image with three
    brighter spots on them at its own angles (the reflections a bottle's rim shows)."""
    r = torch.linspace(-1, 1, size)
    radius, angle = torch.hypot(r[:, None], r[None]), torch.atan2(r[:, None], r[None])
    rings = torch.exp(-((radius - 0.5) / 0.1) ** 2) + torch.exp(-((radius - 0.8) / 0.08) ** 2)
    spots = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    near_spot = torch.exp(-(((angle - spots + math.pi) % (2 * math.pi) - math.pi) / 0.15) ** 2).sum(1)
    part = 0.5 * rings * (1 + 0.3 * near_spot)
    return (part[:, None].expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)


def test_auto_rotation_turns_few_round_parts_but_not_aligned_ones_or_textures():
    assert train.turn_symmetry(round_parts(8)) > train.SYMMETRIC_CORR
    on, why = train.decide_rotation("auto", round_parts(8))
    assert on and "alike at any angle" in why and "only 8 training images" in why
    assert not train.decide_rotation("auto", round_parts(train.ROTATE_BELOW))[0]  # enough angles already
    texture = (torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    for aligned in (turned_parts(8, aligned=True), texture):
        assert train.turn_symmetry(aligned) < train.SYMMETRIC_CORR
        assert not train.decide_rotation("auto", aligned)[0]


@pytest.mark.parametrize("name", ["savae", "vqvae"])
def test_bf16_autocast_trains_to_finite_losses(rgb_root, tmp_path, name):
    # no SSIM warm-up: the loss of both epochs then has the same terms and weights
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", name, "--epochs", "2", "--bf16", "--ssim-warmup", "0")
    assert "with bf16 autocast" in r.stdout
    values = [float(v) for r in rows(tmp_path) for k, v in r.items() if k.startswith(("train_", "val_")) and v]
    assert values and all(torch.isfinite(torch.tensor(values)))
    first, last = [r for r in rows(tmp_path) if r["stage"] == "autoencoder"]
    assert float(last["train_loss"]) < float(first["train_loss"])


def test_bf16_is_on_by_default_only_where_the_recipe_says_and_the_device_has_bf16_units(monkeypatch):
    for has_units in (True, False):
        monkeypatch.setattr(train, "native_bf16", lambda device, answer=has_units: answer)
        for name, cls in models.MODELS.items():
            base = ["--model", name, "--category", "bottle", "--device", "cpu"]
            assert train.parse_args(base).bf16 is (cls.recipe["bf16"] and has_units)
            assert train.parse_args(base + ["--bf16"]).bf16 is True
            assert train.parse_args(base + ["--no-bf16"]).bf16 is False
    assert models.DAE.recipe["bf16"]  # measured: the same detection figures, 1.3x faster epochs


def test_a_cpu_without_bf16_probes_reads_as_without_bf16_units(monkeypatch):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert train.native_bf16(torch.device("cpu")) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert train.native_bf16(torch.device("cpu")) is True


def test_one_vocabulary_class_and_category_runs_and_out():
    args = train.parse_args(["--model", "dae", "--class", "bottle"])
    assert args.category == "bottle" and args.out == os.path.join("outputs", "bottle", "dae")
    args = train.parse_args(["--model", "vqvae", "--category", "bottle", "--runs", "elsewhere"])
    assert args.out == os.path.join("elsewhere", "bottle", "vqvae")
    assert train.parse_args(["--model", "dae", "--category", "bottle", "--out", "here"]).out == "here"


def test_recipe_fills_what_the_command_line_leaves_open():
    args = train.parse_args(["--model", "savae", "--category", "bottle", "--prior-lr", "0.5"])
    schedule = (args.steps, args.lr, args.prior_steps, args.prior_lr, args.anomaly_fraction)
    assert schedule == (2400, 1e-3, 360, 0.5, 0.5) and args.batch_size == 16
    assert train.parse_args(["--model", "dae", "--category", "bottle"]).batch_size == 8
    assert train.parse_args(["--model", "dae", "--category", "bottle", "--batch-size", "32"]).batch_size == 32
    assert (args.shift, train.parse_args(["--model", "dae", "--category", "bottle"]).shift) == (0, 1)
    assert train.parse_args(["--model", "dae", "--category", "bottle", "--shift", "0"]).shift == 0
    assert args.epochs is None and args.prior_epochs is None  # from the steps, once the data is known
    assert train.model_args(args) == {"image_size": 128}  # the model's own defaults for the rest


def test_help_shows_every_models_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: recipe)" not in text
    assert "dae 2400, savae 2400, ar_savae 1920, vqvae 480, beta_vae 3000 steps" in text  # --epochs
    assert "dae 8, savae 16, ar_savae 16, vqvae 16, beta_vae 16" in text  # --batch-size
    assert "savae 360, ar_savae 360, vqvae 480 steps" in text  # --prior-epochs
    assert "latent_dim=2048" in text and "lpips_weight=1.0" in text


def test_an_option_the_model_does_not_take_is_a_clear_error(rgb_root, tmp_path):
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "vqvae", "--latent-dim", "64", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: vqvae") and "latent_dim" in r.stderr


def test_recipe_steps_become_whole_epochs_of_the_training_set_unless_epochs_are_given():
    """Training time stays the same for a larger category, and a tiny one still gets its updates,
    in epochs of several passes over its images, so that it is not spent validating and writing
    checkpoints; given epochs are single passes."""
    args = train.parse_args(["--model", "savae", "--category", "bottle", "--prior-epochs", "7"])
    model = models.MODELS["savae"]()
    bottle, metal_nut, thirty, five = (train.plan_stages(model, args, n) for n in (24, 25, 4, 1))
    assert [s.epochs for s in bottle] == [100, 7] and [s.total_steps for s in bottle] == [2400, 168]
    assert [s.passes for s in bottle + metal_nut] == [1] * 4 and metal_nut[0].epochs == 96
    assert (thirty[0].passes, thirty[0].steps_per_epoch, thirty[0].epochs) == (4, 16, 150)
    assert (five[0].passes, five[0].steps_per_epoch, five[0].epochs) == (16, 16, 150)
    assert five[1].epochs == 7 and five[1].passes == 1 and five[1].total_steps == 7
    args.prior_epochs, args.prior_steps = None, 5  # a stage shorter than an epoch: one epoch of its steps
    assert (train.plan_stages(model, args, 1)[1].epochs, train.plan_stages(model, args, 1)[1].total_steps) == (1, 5)


def test_a_larger_set_trains_at_least_the_recipes_epochs_but_at_most_one_and_a_half_times_its_steps():
    """The DAE's 2400 steps are 100 epochs of bottle; 288 screws get 100 epochs too, a thousand
    solar cells 1.5x the steps, not 5x; small sets and given epochs are untouched."""
    args = train.parse_args(["--model", "dae", "--category", "bottle"])
    model = models.MODELS["dae"]()
    steps = {n: train.plan_stages(model, args, n)[0].total_steps for n in (24, 25, 36, 128, 4, 1)}
    assert steps == {24: 2400, 25: 2500, 36: 3600, 128: 3712, 4: 2400, 1: 2400}
    assert "at least 100 passes over the 288 training images" in train.schedule_line(
        train.plan_stages(model, args, 36)[0], args, 288, 36)
    assert train.schedule_line(train.plan_stages(model, args, 24)[0], args, 188, 24).endswith("the recipe's 2400 steps")
    args.epochs = 10
    assert train.plan_stages(model, args, 128)[0].total_steps == 1280


def test_an_epoch_of_several_passes_shows_every_image_once_per_pass():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    sampler = train.DistributedSampler(range(5), 1, 0, shuffle=True, seed=0)
    first = [b[:, 0, 0, 0].mul(255).round().long().tolist() for b in train.batches(images, sampler, 2, "cpu", 7, 3)]
    seen = sum(first, [])
    assert len(first) == 9 and all(sorted(seen[k:k + 5]) == list(range(5)) for k in (0, 5, 10))
    assert seen[:5] != seen[5:10] and seen[5:10] != seen[10:]  # each pass shuffled anew
    again = [b[:, 0, 0, 0].mul(255).round().long().tolist() for b in train.batches(images, sampler, 2, "cpu", 7, 1)]
    assert sum(again, []) == seen[:5]  # the first pass is the one-pass epoch of the same seed


def test_training_images_that_are_nearly_black_get_a_warning_naming_the_likely_bit_depth():
    twelve_bit = (torch.arange(4096) * 255 / 65535).round().to(torch.uint8)  # 0..4095 read as 16 bits
    assert "10- or 12-bit data" in train.dim_warning(twelve_bit.view(1, 1, 64, 64).expand(2, 3, 64, 64))
    assert train.dim_warning(torch.full((2, 3, 8, 8), 17, dtype=torch.uint8)) is None


def test_a_stage_option_for_a_stage_the_model_lacks_is_named_as_ignored():
    def unused(*argv):
        return train.unused_stage_options(train.parse_args(["--category", "bottle", *argv]))
    assert unused("--model", "dae", "--prior-epochs", "1", "--prior-lr", "0.1") == ["--prior-epochs", "--prior-lr"]
    assert unused("--model", "savae", "--prior-epochs", "1") == [] and unused("--model", "dae") == []


def test_which_stages_get_synthetic_anomalies_and_which_keep_their_last_epoch():
    def flags(name):
        args = train.parse_args(["--model", name, "--category", "bottle"])
        return [(s.anomalies, s.keep_last) for s in train.plan_stages(models.MODELS[name](), args, 12)]
    assert flags("dae") == [(True, True)] and flags("savae") == [(True, False), (False, False)]


def test_a_keep_last_stage_writes_best_pt_even_when_its_val_loss_rose(tmp_path):
    """The DAE's val loss (reconstruction error and the segmenter's false alarms on clean val
    images) does not pick the epoch that detects best: its latest epoch is best.pt."""
    model = models.build_model("dae", image_size=32)
    optimizer = torch.optim.AdamW(model.parameters())
    for keep_last in (False, True):
        stage = train.Stage(0, "autoencoder", 2, 1e-3, 1, anomalies=True, keep_last=keep_last, epoch=1, best_val=0.1)
        train.save_epoch(model, optimizer, stage, {}, {"val_loss": 0.2}, 1.0, [], {"model": "dae", "out": tmp_path}, {})
        assert (tmp_path / "best.pt").exists() == keep_last


def test_epoch_seconds_count_the_checkpoint_writes(rgb_root, tmp_path, monkeypatch):
    """The summary's training minutes add up metrics.csv's seconds: writing checkpoints is part
    of training (on five images it was most of it), so a slow write must show there."""
    write = train.save_atomic

    def slow_write(obj, path):
        time.sleep(0.5)
        write(obj, path)
    monkeypatch.setattr(train, "save_atomic", slow_write)
    train.main(["--model", "dae", "--category", "synthetic", "--data-root", str(rgb_root),
                "--out", str(tmp_path), *FAST, "--epochs", "3"])
    seconds = [float(r["seconds"]) for r in rows(tmp_path)]
    assert min(seconds[1:]) >= 1.0  # the previous epoch's checkpoint.pt and best.pt, 0.5 s each


def test_time_left_is_the_mean_epoch_pace_times_the_epochs_left():
    assert train.time_left(70.0, 10, 80) == "9 min left"  # 7 s an epoch, 80 epochs to go
    assert train.time_left(70.0, 10, 5) == "35 s left"
    assert train.time_left(70.0, 10, 0) == "0 s left"


def test_every_epoch_line_says_how_long_the_stage_still_needs(rgb_root, tmp_path, capsys):
    train.main(["--model", "dae", "--category", "synthetic", "--data-root", str(rgb_root),
                "--out", str(tmp_path), *FAST, "--epochs", "2"])
    lines = [l for l in capsys.readouterr().out.splitlines() if " epoch " in l]
    assert len(lines) == 2 and all(re.search(r"s, \d+ (s|min) left\)$", l) for l in lines)
    assert lines[-1].endswith(", 0 s left)")


def test_stroke_masks_are_thin_curves_inside_the_image():
    torch.manual_seed(0)
    masks = train.stroke_masks(64, 128)
    assert masks.shape == (64, 1, 128, 128) and set(masks.unique().tolist()) == {0.0, 1.0}
    covered = masks.flatten(1).mean(1)
    assert (covered > 0).all() and covered.max() < 0.05  # every mask has a stroke, none is a blob
    rows = masks.amax(3)[:, 0].sum(1)
    cols = masks.amax(2)[:, 0].sum(1)
    assert (masks.flatten(1).sum(1) < 0.5 * rows * cols).float().mean() > 0.5  # mostly not filled boxes


def test_blob_masks_cover_the_share_asked_of_each_image():
    torch.manual_seed(0)
    coverage = torch.tensor([0.01, 0.05, 0.1, 0.5])
    masks = train.smooth_noise_masks(4, 64, coverage)
    assert masks.shape == (4, 1, 64, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(masks.flatten(1).mean(1), coverage, atol=1 / 64 ** 2)  # to the pixel


def parts_on_a_table(n, size=64, part=12, places="random"):
    """n images of a bright square part on a plain dark table, at random places or all at one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((n, 3, size, size), 20, dtype=torch.uint8)
    for i in range(n):
        y0, x0 = torch.randint(0, size - part, (2,), generator=gen) if places == "random" else (10, 10)
        x[i, :, y0:y0 + part, x0:x0 + part] = 200
    return x


def test_zoom_is_on_only_for_small_parts_at_changing_places_on_a_plain_background():
    small = parts_on_a_table(8)
    zoom, why = train.decide_zoom("auto", small)
    assert set(zoom) == {"side", "turn"} and not zoom["turn"] and "at changing places" in why
    assert abs(zoom["side"] - train.ZOOM_MARGIN * 12 / 64) < 0.02 and type(zoom["side"]) is float
    assert train.decide_zoom("off", small) == (None, "--zoom off")
    assert "lie alike" in train.decide_zoom("auto", parts_on_a_table(8, places="one"))[1]  # a misplaced part shows
    assert "fill the frame" in train.decide_zoom("auto", parts_on_a_table(8, part=48))[1]
    texture = (torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert "no plain background" in train.decide_zoom("auto", texture)[1]


def long_parts_on_a_table(angles, size=128):
    """Images of a screw-like part (long_part) on a plain table, one per angle (degrees),
    each at another place."""
    gen = np.random.default_rng(0)
    images = [np.where(long_part(size, np.radians(a), gen.uniform(40, size - 40, 2)), 60, 200) for a in angles]
    return torch.from_numpy(np.stack(images).astype(np.uint8))[:, None].repeat(1, 3, 1, 1)


def test_the_window_turns_only_for_long_parts_whose_axes_point_every_way():
    """Long parts at any angle: turned, and the window holds the part's length; along one line
    (a part turned out of line is then a defect) or round: not turned."""
    any_angle = np.linspace(0, 360, 12, endpoint=False)
    zoom, why = train.decide_zoom("auto", long_parts_on_a_table(any_angle))
    assert zoom["turn"] and "turned with its part's long axis" in why
    assert abs(zoom["side"] - train.ZOOM_MARGIN * 60 / 128) < 0.03
    zoom, why = train.decide_zoom("auto", long_parts_on_a_table([30 + 180 * (i % 2) for i in range(12)]))
    assert not zoom["turn"] and "along one line" in why
    zoom, why = train.decide_zoom("auto", parts_on_a_table(8))
    assert not zoom["turn"] and "not long" in why


def test_a_resumed_run_keeps_its_decisions_and_one_trained_before_a_setting_existed_keeps_how_it_was_trained():
    """A run of this version keeps its own zoom window, rotation and moved blobs (not decided again
    from the images); a config without the zoom window, moved or removed blobs or the epoch floor
    resumes with whole images, none of those blobs and no floor; a window recorded before windows
    turned keeps its side and does not turn."""
    def values(config):
        return {k: v[0] for k, v in train.settings_of_run(config).items()}
    assert values({"size": 128}) == {"zoom_window": None, "moved_share": 0.0, "removed": 0.0, "min_epochs": 0}
    now = {"zoom_window": {"side": 0.56, "turn": True}, "rotate_used": True, "moved_share": 0.0, "removed": 0.5,
           "min_epochs": 100}
    assert values(now) == {"zoom_window": {"side": 0.56, "turn": True}, "rotate_used": True, "moved_share": 0.0}
    assert values({**now, "zoom_window": {"side": 0.56}})["zoom_window"] == {"side": 0.56, "turn": False}
    assert values({**now, "zoom_window": None})["zoom_window"] is None


def test_a_resumed_run_keeps_its_schedule_unless_told_otherwise(rgb_root, tmp_path):
    """A plain --resume goes on as the run was planned: a run of --epochs 1 resumed without it is
    finished (it does not fall back to the recipe's hundreds of epochs), and its learning rate and
    objective weights stay the run's; an --epochs given on resume counts epochs of the run's length."""
    run_train(rgb_root, "synthetic", tmp_path, "--model", "beta_vae", "--epochs", "1", "--lr", "3e-4",
              "--ssim-weight", "0.5")
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "beta_vae", "--resume")
    assert "epoch 2/" not in r.stdout and "note: --resume" not in r.stdout
    r = run_train(rgb_root, "synthetic", tmp_path, "--model", "beta_vae", "--resume", "--epochs", "2")
    assert "epoch 1/2" not in r.stdout and "epoch 2/2" in r.stdout
    assert "note: --resume: --epochs 2 (the run had 1)" in r.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["lr"] == 3e-4 and ckpt["model_args"]["ssim_weight"] == 0.5 and ckpt["epoch"] == 1
    run = SimpleNamespace(epochs=3, lr=1e-3, steps=2400, min_epochs=0)
    stage, = train.plan_stages(models.build_model("beta_vae", image_size=32), run, 3, run_passes=[6])
    assert stage.passes == 6 and stage.total_steps == 3 * 6 * 3


def test_zoom_is_printed_recorded_and_kept_by_a_resume(small_parts_root, tmp_path):
    r = run_train(small_parts_root, "small_parts", tmp_path, "--model", "dae", "--epochs", "1")
    assert "zoom on: parts span at most" in r.stdout
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert 0 < config["zoom_window"]["side"] < train.ZOOM_MAX_SIDE and config["zoom"] == "auto"
    r = run_train(small_parts_root, "small_parts", tmp_path, "--model", "dae", "--epochs", "2", "--resume",
                  "--zoom", "off", check=False)
    assert r.returncode != 0 and "--zoom is off but the run" in r.stderr and "Traceback" not in r.stderr
