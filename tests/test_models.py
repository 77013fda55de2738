"""models.py: the shared interface holds for every model, the objective and its image terms, SSIM,
losses fall, priors sample, VQ details."""
import ast
import copy
import sys

import pytest
import torch

from conftest import ROOT
import models

SIZE = 32


def build(name, **kw):
    torch.manual_seed(0)
    return models.build_model(name, image_size=SIZE, **kw)


@pytest.fixture(scope="module")
def batch():
    """Four smooth random images: structured enough to be overfitted in a few dozen steps."""
    torch.manual_seed(1)
    coarse = torch.rand(4, 3, 4, 4)
    return torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear", align_corners=False)


def test_registry_covers_the_five_models_and_rejects_others():
    assert set(models.MODELS) == {"dae", "beta_vae", "savae", "ar_savae", "vqvae"}
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("gan")


def test_an_argument_the_model_does_not_take_is_an_error_not_dropped():
    with pytest.raises(ValueError, match="vqvae.*latent_dim"):
        models.build_model("vqvae", latent_dim=64)
    with pytest.raises(ValueError, match="dae.*ema"):
        models.build_model("dae", ema=False)
    # every constructor argument is recorded, so a checkpoint rebuilds the same model
    for name in models.MODELS:
        config = build(name).config
        assert models.build_model(name, **config).config == config


def test_models_py_imports_only_torch_and_the_standard_library():
    tree = ast.parse((ROOT / "models.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m not in sys.stdlib_module_names} == {"torch"}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_interface_shapes_and_ranges(name, batch):
    model = build(name)
    for stage in model.stages:
        total, terms, recon = model.loss(batch, stage=stage)
        assert total.dim() == 0 and torch.isfinite(total)
        assert all(v.dim() == 0 for v in terms.values())
        if recon is not None:
            assert recon.shape == batch.shape and 0 <= recon.min() and recon.max() <= 1
    model.eval()
    with torch.no_grad():
        recon = model.reconstruct(batch)
        samples = model.sample(3, torch.Generator().manual_seed(0))
        again = model.sample(3, torch.Generator().manual_seed(0))
        _, maps = model.anomaly_maps(batch, 2)
    assert recon.shape == batch.shape and 0 <= recon.min() and recon.max() <= 1
    assert samples.shape == (3, 3, SIZE, SIZE) and 0 <= samples.min() and samples.max() <= 1
    assert torch.equal(samples, again)  # seeded sampling is reproducible
    assert maps["l2"].shape == maps["feature"].shape == (4, 1, SIZE, SIZE)
    assert all(m.shape == (4, 1, SIZE, SIZE) for m in maps.values())


def test_vqvae_maps_compare_the_image_with_its_own_decoding_and_add_each_codes_nll():
    """No restoration: the reconstruction is the decoding of the input's own codes (replacing
    the unlikely ones made good parts at unusual angles come back wrong), and code_nll is the
    prior's -log p of each of those codes, upsampled to the pixels."""
    torch.manual_seed(0)
    model = build("vqvae").eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        recon, maps = model.anomaly_maps(x, names=["ssim", "code_nll"])
        codes = model.encode(x)[1]
        log_probs = torch.log_softmax(model.prior.logits(codes), 1)
    torch.testing.assert_close(recon, model.reconstruct(x))
    nll = -log_probs.gather(1, codes[:, None])[:, 0]  # (B, S, S)
    torch.testing.assert_close(model.prior.nll(codes), nll)
    upsampled = torch.nn.functional.interpolate(nll[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps["code_nll"], upsampled)


def test_code_map_filled_in_wavefronts_equals_one_position_at_a_time():
    """raster_fill fixes many positions per step; the result must be that of the plain raster
    loop, where each position is decided from the full causal pass over the codes fixed so far."""
    torch.manual_seed(0)
    prior = models.CausalCodePrior(codes=16, map_size=7, window=5).eval()
    with torch.no_grad():
        prior.head[-1].weight.mul_(20)  # spread the logits: no near-ties for argmax to flip on
        filled = prior.raster_fill(3, lambda probs, rows, cols: probs.argmax(2))  # greedy
        expected = torch.zeros(3, 7, 7, dtype=torch.long)
        for i in range(7):
            for j in range(7):
                expected[:, i, j] = prior.logits(expected)[:, :, i, j].argmax(1)
    assert len(filled.unique()) > 1  # not one code everywhere: the context matters
    assert torch.equal(filled, expected)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_feature_map_is_zero_for_a_perfect_reconstruction_and_peaks_where_it_differs(name, batch):
    """The model's own encoder compares input and reconstruction; a local change to the
    reconstruction must show up at that place and nowhere far from it."""
    model = build(name).eval()
    changed = batch.clone()
    changed[:, :, 4:12, 20:28] = 1 - changed[:, :, 4:12, 20:28]
    with torch.no_grad():
        same = model.error_maps(batch, batch)["feature"]
        diff = model.error_maps(batch, changed)["feature"][:, 0]
    assert same.abs().max() < 1e-5
    peaks = [divmod(int(d.argmax()), SIZE) for d in diff]
    assert all(0 <= r < 16 and 16 <= c < 32 for r, c in peaks), peaks
    assert (diff[:, 24:, :12] < 1e-5).all()  # far from the change: nothing


@pytest.mark.parametrize("name", list(models.MODELS))
def test_default_map_names_maps_the_model_gives(name):
    model = build(name).eval()
    with torch.no_grad():
        _, maps = model.anomaly_maps(torch.rand(2, 3, SIZE, SIZE), 2)
    assert {"l2", "ssim", "msgms", "feature"} <= set(maps)
    assert set(model.default_map.split("+")) <= set(maps)
    if name == "vqvae":
        assert maps["code_nll"].shape == (2, 1, SIZE, SIZE) and (maps["code_nll"] >= 0).all()



@pytest.mark.parametrize("name", list(models.MODELS))
def test_anomaly_maps_of_some_names_are_exactly_those_of_the_full_call(name, batch):
    """names= computes only the maps asked for (detect.py's speed), never different numbers: the
    feature map from the activations reconstruct kept, SAVAE's MC passes only when asked for."""
    model = build(name).eval()
    with torch.no_grad():
        torch.manual_seed(3)
        recon, full = model.anomaly_maps(batch, 2)
        subsets = [[n] for n in full] + [model.default_map.split("+"), ["feature", "l2"], list(full)[::-1]]
        for names in subsets:
            torch.manual_seed(3)
            again, maps = model.anomaly_maps(batch, 2, names=names)
            assert list(maps) == names and torch.equal(again, recon)
            for n in names:
                assert torch.equal(maps[n], full[n]), (names, n)
        with pytest.raises(ValueError, match="no map named nope"):
            model.anomaly_maps(batch, 2, names=["ssim", "nope"])


@pytest.mark.parametrize("name", ["savae", "ar_savae"])
def test_anomaly_maps_skip_the_mc_dropout_passes_unless_asked_for(name, batch, monkeypatch):
    model = build(name).eval()
    calls = []
    real = model.uncertainty
    monkeypatch.setattr(model, "uncertainty", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        model.anomaly_maps(batch, 2, names=["ssim", "feature", "chroma"])
        assert calls == []
        model.anomaly_maps(batch, 2, names=["ssim", "epistemic"])
    assert calls == [1]


def test_dae_trains_under_bf16_autocast(batch):
    """--bf16: the encoder's codes come out in bfloat16, its running moments stay float32."""
    model = build("dae").train()
    with torch.autocast("cpu", torch.bfloat16):
        total = model.loss(batch)[0]
    assert torch.isfinite(total) and model.code_mean.dtype == model.code_var.dtype == torch.float32


def test_vector_quantizer_works_in_float32_under_bf16_autocast():
    """Nearest codes and EMA statistics are matrix products, which autocast would run in bf16:
    close codes would then be confused and the codebook drift. Same results with and without."""
    torch.manual_seed(0)
    plain = models.VectorQuantizer(codes=64, dim=16)
    autocast = copy.deepcopy(plain)
    z = plain.codebook.detach()[torch.randint(0, 64, (2 * 5 * 5,))].view(2, 5, 5, 16).permute(0, 3, 1, 2)
    z = z + 1e-3 * torch.randn_like(z)  # each vector next to a code, closer than bf16 resolves
    torch.manual_seed(1)  # the same dead-code restarts in both
    idx = plain(z, update=True)[1]
    torch.manual_seed(1)
    with torch.autocast("cpu", torch.bfloat16):
        idx_autocast = autocast(z, update=True)[1]
    assert torch.equal(idx, idx_autocast)
    torch.testing.assert_close(autocast.ema_sum, plain.ema_sum)
    torch.testing.assert_close(autocast.codebook, plain.codebook)


@pytest.mark.parametrize("name", ["savae", "ar_savae"])
def test_kl_stays_finite_when_the_encoder_asks_for_almost_no_noise(name, batch):
    """A posterior log-variance of -100 (exp(100) overflows float32) must not turn the
    Monte-Carlo KL into NaN: the encoder once drifted there in a long run."""
    model = build(name)
    head = next(m for m in model.to_latent if hasattr(m, "bias"))  # its second half is log s^2
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[head.bias.numel() // 2:] = -100.0
    total, terms, _ = model.loss(batch)
    assert torch.isfinite(total) and torch.isfinite(terms["kl"])


@pytest.mark.parametrize("name", ["savae", "ar_savae"])
def test_uncertainty_uses_dropout_and_restores_module_modes(name, batch):
    model = build(name).eval()
    with torch.no_grad():
        mean, epistemic, aleatoric = model.uncertainty(batch, passes=4)
        _, maps = model.anomaly_maps(batch, 4)
    assert mean.shape == batch.shape and epistemic.shape == aleatoric.shape == (4, 1, SIZE, SIZE)
    assert epistemic.max() > 0 and (aleatoric > 0).all()
    assert not any(m.training for m in model.modules())
    assert {"variance_weighted", "epistemic"} <= set(maps)


def test_mode_switches_modules_inside_the_block_and_restores_each_after_it_even_on_error():
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Dropout2d(0.5)).train()
    net[1].eval()  # mixed modes must come back as they were, not as the parent's
    with models.mode([net], training=False):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training
    with pytest.raises(RuntimeError), models.mode([net[1]], training=True):
        assert net[1].training
        raise RuntimeError("inside the block")
    assert not net[1].training


@pytest.mark.parametrize("name", list(models.MODELS))
def test_loss_falls_when_overfitting_a_few_images(name, batch):
    model = build(name)
    for stage in model.stages:
        opt = torch.optim.Adam(model.stage_parameters(stage), lr=2e-3)
        first = None
        for _ in range(40):
            total = model.loss(batch, stage=stage)[0]
            opt.zero_grad()
            total.backward()
            opt.step()
            first = float(total.detach()) if first is None else first
        # a prior stage can only remove the KL's -log p part: a smaller, noisier (Monte-Carlo) fall
        assert float(model.loss(batch, stage=stage)[0].detach()) < (0.8 if stage == "autoencoder" else 0.95) * first, stage


@pytest.mark.parametrize("name", ["savae", "ar_savae"])
def test_prior_stage_changes_the_prior_and_nothing_else(name, batch):
    model = build(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prior = {id(p) for p in model.stage_parameters("prior")}
    opt = torch.optim.Adam(model.stage_parameters("prior"), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.loss(batch, stage="prior")[0].backward()
        opt.step()
    named = dict(model.named_parameters())
    for key, value in model.state_dict().items():  # parameters and batch-norm statistics
        changed = not torch.equal(value, before[key])
        assert changed == (key in named and id(named[key]) in prior), key


def test_dae_segmenter_learns_beside_the_autoencoder_and_sends_it_no_gradient(batch):
    """One objective trains both, but the segmenter reads a detached reconstruction: the
    autoencoder's gradients are those of its own terms alone."""
    model = build("dae").eval()  # batch norm from its running statistics: both passes agree
    corrupted = batch.clone()
    corrupted[:, :, 8:16, 8:16] = 1.0
    total, terms, _ = model.base_loss(corrupted, batch)
    assert terms["focal"] > 0 and torch.isclose(total, terms["mse"] + terms["focal"])
    autoencoder = [p for n, p in model.named_parameters() if not n.startswith("segmenter.")]
    segmenter = list(model.segmenter.parameters())
    grads = torch.autograd.grad(total, autoencoder + segmenter)
    own = torch.autograd.grad(torch.nn.functional.mse_loss(model.reconstruct(corrupted), batch), autoencoder)
    assert all(torch.allclose(g, o, atol=1e-7) for g, o in zip(grads, own))
    assert all(g.abs().sum() > 0 for g in grads[len(autoencoder):])


def test_changed_pixels_are_those_a_corruption_moved_beyond_the_threshold():
    clean = torch.full((1, 3, 8, 8), 0.5)
    corrupted = clean.clone()
    corrupted[0, 1, :2, :2] += 0.1  # one channel is enough
    corrupted[0, :, 6:, 6:] += 2 / 255  # too faint to see
    mask = models.changed_pixels(corrupted, clean)
    assert mask.shape == (1, 1, 8, 8) and mask.sum() == 4 and mask[0, 0, :2, :2].all()


def test_dae_segmenter_learns_to_mark_pasted_squares():
    """The `segment` map is several times higher where a square was pasted than elsewhere, on new
    images (an untrained segmenter: about the same)."""
    torch.manual_seed(0)
    model = build("dae")

    def corrupt(clean):
        x, mask = clean.clone(), torch.zeros_like(clean[:, :1])
        for i in range(len(x)):
            r, c = torch.randint(0, SIZE - 8, (2,)).tolist()
            x[i, :, r:r + 8, c:c + 8] = torch.rand(3, 1, 1)
            mask[i, :, r:r + 8, c:c + 8] = 1
        return x, mask

    def smooth_images(n):
        return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4), size=SIZE, mode="bilinear")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        clean = smooth_images(8)
        opt.zero_grad()
        model.loss(corrupt(clean)[0], clean)[0].backward()
        opt.step()
    x, mask = corrupt(smooth_images(8))
    with torch.no_grad():
        segment = model.eval().anomaly_maps(x, names=["segment"])[1]["segment"]
    assert segment[mask > 0].mean() > 3 * segment[mask == 0].mean()


def test_spatial_bottleneck_keeps_the_interface(batch):
    model = build("savae", bottleneck="spatial", latent_dim=128)
    total, _, recon = model.loss(batch)
    assert torch.isfinite(total) and recon.shape == batch.shape
    assert model.sample(2).shape == (2, 3, SIZE, SIZE)


def test_code_prior_is_causal():
    """Changing code (i, j) changes no logit at (i, j) or any position before it in raster order."""
    torch.manual_seed(0)
    prior = models.CausalCodePrior(codes=16, map_size=6, window=5)
    codes = torch.randint(0, 16, (1, 6, 6))
    base = prior.logits(codes)
    for i, j in [(0, 0), (2, 3), (5, 5)]:
        changed = codes.clone()
        changed[0, i, j] = (changed[0, i, j] + 1) % 16
        diff = (prior.logits(changed) - base).abs().amax(1)[0]  # (6, 6)
        flat = diff.flatten()
        assert flat[: i * 6 + j + 1].max() == 0
        if (i, j) != (5, 5):
            assert flat[i * 6 + j + 1:].max() > 0  # and it does reach later positions


def test_code_prior_sampling_follows_its_own_conditionals():
    """The step-by-step sampler computes exactly the logits of the parallel (training) pass."""
    torch.manual_seed(0)
    prior = models.CausalCodePrior(codes=8, map_size=5, window=5)
    codes = prior.sample(64, torch.Generator().manual_seed(0))
    assert codes.shape == (64, 5, 5) and codes.min() >= 0 and codes.max() < 8
    assert torch.equal(codes, prior.sample(64, torch.Generator().manual_seed(0)))
    # a prior that puts all mass on code 3 everywhere must sample only 3s
    with torch.no_grad():
        prior.head[-1].bias.fill_(-1e4)
        prior.head[-1].bias[3] = 1e4
    assert (prior.sample(4) == 3).all()


def test_vq_straight_through_and_commitment():
    torch.manual_seed(0)
    vq = models.VectorQuantizer(codes=8, dim=4, beta=0.25, ema=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, idx, loss, stats = vq(z)
    e = vq.codebook[idx].permute(0, 3, 1, 2)
    assert torch.allclose(q, e)  # forward value is the code
    assert torch.allclose(stats["commitment"], 0.25 * (z - e).pow(2).mean())
    q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # straight-through copies the gradient
    z2 = torch.randn(2, 4, 3, 3)
    vq(z2)[2].backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0  # no EMA: learned


def test_vq_ema_moves_codes_and_restarts_dead_ones():
    torch.manual_seed(0)
    vq = models.VectorQuantizer(codes=16, dim=4, ema=True)
    before = vq.codebook.detach().clone()
    z = torch.randn(4, 4, 4, 4) + 5.0  # far from every initial code
    _, _, _, stats = vq(z, update=True)
    assert not vq.codebook.requires_grad
    assert not torch.equal(before, vq.codebook)
    # unused codes were restarted at encoder outputs: now most codes lie near the data
    assert (vq.codebook.mean(1) > 2.0).float().mean() > 0.5


def test_checkpoint_round_trip_with_weights_only(tmp_path, batch):
    model = build("savae").eval()
    ckpt = {"model_name": "savae", "model_args": model.config, "model_state": model.state_dict()}
    torch.save(ckpt, tmp_path / "c.pt")
    loaded, _ = models.load_model(tmp_path / "c.pt")
    with torch.no_grad():
        assert torch.equal(model.reconstruct(batch), loaded.reconstruct(batch))


# ----------------------------------------------------------------------------- the objective

class FakePerceptual:
    """A perceptual callable as model.loss takes it: per-image distances, and a name for the logs."""

    name = "fake"

    def __call__(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def test_loss_is_base_loss_plus_the_ramped_ssim_term(batch):
    model = build("dae", ssim_weight=2.0, ssim_warmup=0.1).eval()
    with torch.no_grad():
        base, _, recon = model.base_loss(batch, batch)
        ssim = 1 - models.ssim_map(recon, batch).mean()
        for progress, ramp in [(0.0, 0.0), (0.05, 0.5), (0.1, 1.0), (0.7, 1.0)]:
            total, terms, _ = model.loss(batch, progress=progress)
            torch.testing.assert_close(total, base + ramp * 2.0 * ssim)
            torch.testing.assert_close(terms["ssim"], ssim)
    no_ramp = build("dae", ssim_warmup=0.0).eval()
    no_ssim = build("dae", ssim_weight=0.0).eval()
    with torch.no_grad():
        assert no_ramp.loss(batch, progress=0.0)[0] > no_ramp.base_loss(batch, batch)[0]  # full weight at once
        total, terms, _ = no_ssim.loss(batch)
        assert "ssim" not in terms and torch.equal(total, no_ssim.base_loss(batch, batch)[0])


def test_lpips_term_comes_from_the_callable_passed_in_and_stays_out_of_the_state_dict(batch):
    model = build("ar_savae")  # lpips_weight 1 by default
    keys = set(model.state_dict())
    torch.manual_seed(0)
    without = model.loss(batch)
    torch.manual_seed(0)
    total, terms, recon = model.loss(batch, perceptual=FakePerceptual())
    torch.testing.assert_close(terms["fake"], (recon - batch).abs().mean().detach())
    torch.testing.assert_close(total, without[0] + terms["fake"])
    assert set(model.state_dict()) == keys
    assert "fake" not in build("dae").loss(batch, perceptual=FakePerceptual())[1]  # lpips_weight 0


def test_prior_stage_has_no_image_terms(batch):
    model = build("vqvae")
    total, terms, recon = model.loss(batch, stage="prior", perceptual=FakePerceptual())
    assert recon is None and set(terms) == {"prior_nll"}


def test_image_terms_stay_in_float32_under_bf16_autocast(batch):
    model = build("dae")
    with torch.autocast("cpu", torch.bfloat16):
        _, terms, recon = model.loss(batch)
    assert recon.dtype == torch.float32
    torch.testing.assert_close(terms["ssim"], 1 - models.ssim_map(recon, batch).mean())


# ----------------------------------------------------------------------------- SSIM and its blur

def test_ssim_is_one_for_identical_images_symmetric_and_falls_with_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 48)
    torch.testing.assert_close(models.ssim_map(x, x), torch.ones(2, 1, 40, 48))
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    z = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(models.ssim_map(x, y), models.ssim_map(y, x))
    assert 1 > models.ssim_map(x, y).mean() > models.ssim_map(x, z).mean()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 1, 20, 57), (3, 2, 9, 64)])
def test_banded_matrix_blur_equals_the_reflect_padded_convolution(shape):
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    kernel = models.gaussian_kernel(11, 1.5).double()
    torch.testing.assert_close(models.blur(x, kernel), models.blur_conv(x, kernel))
    odd = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05], dtype=torch.float64)  # not symmetric: orientation counts
    torch.testing.assert_close(models.blur(x, odd), models.blur_conv(x, odd))


def test_msgms_is_zero_for_identical_images_and_marks_a_changed_patch():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    assert models.msgms_map(x, x).abs().max() < 1e-6
    y = x.clone()
    y[:, :, 4:10, 20:28] = 0.5
    diff = models.msgms_map(x, y)[0, 0]
    assert diff[4:10, 20:28].mean() > 5 * diff[20:, :12].mean()


def test_chroma_is_a_distance_twice_the_stain_twice_the_mark():
    """chroma grows in proportion to a colour change (not with its square), so after
    standardising, its strongest pixels weigh like the other maps' and do not drown them."""
    x = torch.full((1, 3, 24, 24), 0.4)
    marks = []
    for strength in (0.1, 0.2):
        stained = x.clone()
        stained[:, 0, 8:16, 8:16] += strength  # a red stain
        marks.append(models.chroma_map(x, stained)[0, 0, 10:14, 10:14].mean())
    assert torch.isclose(marks[1], 2 * marks[0], rtol=1e-4)


def test_chroma_sees_a_colour_change_but_not_a_brightness_change_and_is_zero_on_grey_images():
    torch.manual_seed(0)
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32).contiguous()
    x = grey * torch.tensor([1.0, 0.9, 0.7]).view(1, 3, 1, 1)  # a tinted surface with texture
    brighter = (x * 1.3).clamp(0, 1)  # same colour everywhere, other luminance
    stained = x.clone()
    stained[:, 2, 8:16, 8:16] += 0.3  # a blue stain
    assert models.chroma_map(x, x).abs().max() < 1e-12
    stain = models.chroma_map(x, stained)[0, 0]
    assert stain[8:16, 8:16].mean() > 100 * stain[20:, 20:].mean()
    assert models.chroma_map(x, brighter).mean() < 0.1 * stain[8:16, 8:16].mean()  # 0.01 on the squared map: clipped pixels tint a little
    coloured_recon = grey.clone()
    coloured_recon[:, 0] += 0.1  # a reconstruction of a grey image is never exactly grey
    assert models.chroma_map(grey, coloured_recon).abs().max() == 0
