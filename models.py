"""Five autoencoders of increasing stochasticity behind one small interface. Needs only torch.

Every model maps images x in [0, 1], shape (B, 3, H, W), and offers:

    loss(x, target=None, stage, progress=1.0, perceptual=None) -> (total, terms, recon)
        the whole training objective: base_loss plus, where the stage reconstructs, the image
        terms (1 - SSIM with its warm-up ramp, LPIPS when a perceptual callable is given).
        total: scalar to minimise; terms: dict of detached scalars for logging;
        recon: the mean reconstruction of `target` (= x unless training to restore x);
               None in a stage that reconstructs nothing (a prior stage).
    base_loss(x, target, stage)           the model's own terms: its likelihood or ELBO, or in a
                                          prior stage the prior's fit (train.py's val_loss)
    reconstruct(x)  -> recon              deterministic reconstruction (eval mode)
    sample(n)       -> images             draws from the model's prior
    anomaly_maps(x, mc_passes, names=None) -> (recon, {name: (B, 1, H, W)})   every per-pixel map
                                          the model gives: l2, ssim, msgms, chroma, feature
                                          (error_maps) + its own; with names, only those (the
                                          same tensors, without the cost of the others)
    stages, stage_parameters(stage)       training stages (the VAEs with a prior fit it second)
    recipe                                train.py's defaults for the model (steps, lr, ...)

MODELS maps --model names to classes; build_model / load_model rebuild them from a checkpoint.
Per-pixel terms are means over pixels, so `total` is an ELBO (or loss) per pixel and the
KL (nats per image) is divided by the pixel count P = 3 H W.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- probability

def gaussian_log_prob(x, mean, logvar):
    # log N(x; m, s^2) = -1/2 [log 2pi + log s^2 + (x - m)^2 / s^2], elementwise
    return -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def diagonal_gaussian_kl(mu, logvar):
    # KL(N(mu, s^2) || N(0, I)) = 1/2 sum_d (mu^2 + s^2 - log s^2 - 1), one value per sample
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)


def mixture_log_prob(z, means, logvars, logits):
    # log p(z) = log sum_k pi_k N(z; m_k, s_k^2); z (B, D), means/logvars (K, D), logits (K,)
    per_component = gaussian_log_prob(z[:, None], means, logvars).sum(-1)  # (B, K)
    return torch.logsumexp(per_component + F.log_softmax(logits, 0), dim=1)


def mixture_kl_mc(z, mu, logvar, means, logvars, logits):
    # KL(q || p) ~ log q(z|x) - log p(z), single sample z ~ q(z|x) (no closed form for a mixture)
    return gaussian_log_prob(z, mu, logvar).sum(1) - mixture_log_prob(z, means, logvars, logits)


def reparameterize(mu, logvar):
    # z = mu + s * eps, eps ~ N(0, I): differentiable in mu and s
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def noise(shape, generator, device):
    """Standard normal noise drawn on the CPU so a seed gives the same samples on any device."""
    return torch.randn(shape, generator=generator).to(device)


# ----------------------------------------------------------------------------- image similarity

def gaussian_kernel(size, sigma, device=None):
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def reflect_blur_matrix(n, kernel):
    """Banded (n, n) matrix B: v @ B is the correlation of v with `kernel`, reflect-padded."""
    k, r = len(kernel), len(kernel) // 2
    if n <= r:
        raise ValueError(f"reflect padding of {r} needs a side of more than {r} pixels, got {n}")
    i = torch.arange(n, device=kernel.device)
    src = (i[:, None] + torch.arange(k, device=kernel.device) - r).abs()
    src = torch.where(src >= n, 2 * (n - 1) - src, src)  # mirrored at both ends, as F.pad "reflect"
    b = torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device)
    return b.index_put_((src, i[:, None].expand(n, k)), kernel.expand(n, k), accumulate=True)


def blur_conv(x, kernel):
    """Separable filter with reflect padding as two depthwise convolutions (rows, then columns)."""
    c, k = x.shape[1], len(kernel)
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def blur(x, kernel):
    """Separable filter with reflect padding, so the map keeps the input size.

    Up to 512 px a side: B_h^T x B_w, two products with banded matrices that hold the padding,
    2-4x faster than blur_conv on CPU, forward and backward (bench.py). Larger: blur_conv.
    """
    h, w = x.shape[-2:]
    if max(h, w) <= 512:
        return reflect_blur_matrix(h, kernel).t() @ x @ reflect_blur_matrix(w, kernel)
    return blur_conv(x, kernel)


def ssim_map(x, y, window=11, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """SSIM (Wang et al. 2004) per pixel, averaged over channels: (B, 1, H, W), 1 = identical.

    SSIM = (2 mu_x mu_y + c1)(2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2)),
    local statistics under an 11 x 11 Gaussian window (sigma 1.5).
    """
    k = gaussian_kernel(window, sigma, x.device).to(x.dtype)
    mu_x, mu_y = blur(x, k), blur(y, k)
    var_x = blur(x * x, k) - mu_x ** 2
    var_y = blur(y * y, k) - mu_y ** 2
    cov = blur(x * y, k) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(1, keepdim=True)


PREWITT = torch.tensor([[1.0, 0.0, -1.0]] * 3) / 3


def gradient_magnitude(x):
    # g = sqrt(gx^2 + gy^2) of the grey image, Prewitt gradients, replicate padding
    gray = x.mean(1, keepdim=True)
    kx = PREWITT.to(x.device, x.dtype).view(1, 1, 3, 3)
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(2, 3))
    return torch.sqrt(gx ** 2 + gy ** 2 + 1e-12)


def msgms_map(x, y, scales=4, c=0.0026):
    """1 - multi-scale gradient-magnitude similarity (RIAD), (B, 1, H, W); 0 = identical.

    GMS = (2 g_x g_y + c) / (g_x^2 + g_y^2 + c) with Prewitt magnitudes g, computed at
    `scales` dyadic scales, upsampled back and averaged; c = 0.0026 as in RIAD for [0, 1] images.
    """
    size = x.shape[-2:]
    total = torch.zeros_like(x[:, :1])
    for s in range(scales):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gx, gy = gradient_magnitude(x), gradient_magnitude(y)
        gms = (2 * gx * gy + c) / (gx ** 2 + gy ** 2 + c)
        total = total + F.interpolate(1 - gms, size=size, mode="bilinear", align_corners=False)
    return total / scales


def opponent_colours(x):
    # luminance-free colour: red-green and yellow-blue opponent channels, (B, 2, H, W)
    r, g, b = x.unbind(1)
    return torch.stack([r - g, (r + g) / 2 - b], 1)


def chroma_map(x, y, sigma=1.0, grey_tolerance=2 / 255):
    """Colour distance with the luminance removed, (B, 1, H, W); 0 = same colours.

    chroma = sqrt(sum_o (G_sigma * (o(x) - o(y)))^2) over the two opponent channels o, smoothed
    by a 5 x 5 Gaussian. Paint, stains and rust change the colour of a surface whose texture the
    model cannot copy exactly: luminance maps see that texture error everywhere, this map sees
    only the colour. Zero for grey inputs (channels equal), where any colour in the
    reconstruction is the model's own noise. A distance, not its square: like ssim and feature
    it grows in proportion to the change, so its few strongest pixels do not outweigh the other
    maps once each is standardised (detect.combine).
    """
    k = gaussian_kernel(5, sigma, x.device).to(x.dtype)
    distance = blur(opponent_colours(x) - opponent_colours(y), k).pow(2).sum(1, keepdim=True).sqrt()
    has_colour = (x.amax(1) - x.amin(1)).flatten(1).amax(1) > grey_tolerance
    return distance * has_colour.to(x.dtype)[:, None, None, None]


def wants(names, *maps):
    """Whether any of `maps` is asked for; names=None asks for every map."""
    return names is None or any(m in names for m in maps)


def only(maps, names):
    """The maps asked for, in the order asked (all of them for names=None)."""
    if names is None:
        return maps
    missing = [n for n in names if n not in maps]
    if missing:
        raise ValueError(f"no map named {', '.join(missing)} (this model gives {', '.join(maps) or 'others'})")
    return {n: maps[n] for n in names}


# ----------------------------------------------------------------------------- shared blocks

def down_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2, inplace=True))


def up_block(c_in, c_out, dropout=0.0):
    layers = [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
              nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.Dropout2d(dropout)] if dropout else []))


def stage_widths(width, n_down):
    return [min(width * 2 ** i, 256) for i in range(n_down)]


@contextmanager
def mode(modules, training):
    """Inside the block the modules and all their children are in train (True) or eval (False)
    mode; after it, every one of them is back in the mode it had (not its parent's)."""
    was_training = [(m, m.training) for top in modules for m in top.modules()]
    for m in modules:
        m.train(training)
    try:
        yield
    finally:
        for m, t in was_training:
            m.training = t


class ConvEncoder(nn.Sequential):
    """n_down stride-2 convolutions: (B, 3, S, S) -> (B, C, 8, 8) for S = 8 * 2^n_down."""

    def __init__(self, in_channels, width, n_down):
        widths = stage_widths(width, n_down)
        super().__init__(*[down_block(c_in, c_out)
                           for c_in, c_out in zip([in_channels] + widths[:-1], widths)])
        self.out_channels = widths[-1]


class ConvDecoder(nn.Sequential):
    """Mirror of ConvEncoder: (B, C, 8, 8) -> (B, out_channels, S, S), no output activation."""

    def __init__(self, out_channels, width, n_down, dropout=0.0):
        widths = stage_widths(width, n_down)[::-1]
        blocks = [up_block(c_in, c_out, dropout) for c_in, c_out in zip(widths[:-1], widths[1:])]
        super().__init__(*blocks, nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1))


# ----------------------------------------------------------------------------- interface

class AutoEncoder(nn.Module):
    """Base class: the interface every script uses, and the image terms every objective adds.

    A model sets, as class data:
        stages       its training stages in order; train.py runs each with its own epochs and lr
        recipe       train.py's defaults for it: `steps` (optimisation steps) and `lr` of the
                     first stage, `<stage>_steps` and `<stage>_lr` of each later one (default:
                     the first's), `batch_size`, `anomaly_fraction` (the share of each batch
                     given synthetic anomalies to restore). train.py turns steps into whole
                     epochs of the training set, so training time grows little with the number
                     of images and a small set still gets enough updates: 2400 steps of batch 8
                     are 100 epochs of bottle's 188 images (measured training times:
                     RESULTS.md). `min_epochs`: the first stage runs at least that many passes
                     over a larger set, up to 1.5x its steps (train.py).
                     `bf16`: train under bf16 autocast where the device has bf16 units (set
                     for the models whose detection figures were measured that way).
        anomaly_stages     the stages whose batches get synthetic anomalies (train.py)
        last_epoch_stages  the stages whose latest epoch train.py keeps as best.pt, whatever
                           their val loss (a loss on clean val images that does not say which
                           epoch detects best)
        default_map  the anomaly map detect.py uses unless told otherwise (README: Detection)
        turned_map   the one it uses instead for a run whose training turned its few images
                     (train.decide_rotation), where that differs
        default_close, default_sigma  detect.py's closing radius and Gaussian sigma for that map,
                     pixels (--close, --sigma)
        default_template  whether detect.py adds its template map (the image's grey level
                     against its nearest training images)
        maps_revision  raised when the model's maps change for the same weights, so that
                     detect.py recomputes the calibrations stored with the earlier maps
        batch_dependent_maps  its maps draw MC-dropout masks for a whole batch, so an image's
                     maps change a little with the batch it is in (detect.py ties its
                     calibration to --batch-size)
    and records its constructor arguments in `config`, from which checkpoints rebuild it.
    """

    stages = ("autoencoder",)
    anomaly_stages = ("autoencoder",)
    last_epoch_stages = ()
    recipe = dict(steps=1200, lr=1e-3, batch_size=16, anomaly_fraction=0.5, shift=0, moved=0.0, removed=0.0,
                  min_epochs=0, bf16=False)
    default_map = "ssim"
    turned_map = None
    default_close, default_sigma = 0, 4.0
    # a region gone dark or bright comes back as it is, so the template map counts it. Image
    # AUROC without -> with, seed 0: DAE solar cells 0.666 -> 0.723 (metal_nut and bottle within
    # 0.001); metal_nut beta_vae 0.671 -> 0.747, savae 0.775 -> 0.818, vqvae 0.539 -> 0.685;
    # solar cells savae 0.820 -> 0.834, vqvae 0.606 -> 0.782; bottle within 0.003 (RESULTS.md)
    default_template = True
    maps_revision = 0
    batch_dependent_maps = False

    def __init__(self, ssim_weight=1.0, ssim_warmup=0.1, lpips_weight=0.0):
        super().__init__()
        self.ssim_weight, self.ssim_warmup, self.lpips_weight = ssim_weight, ssim_warmup, lpips_weight
        self.config = dict(ssim_weight=ssim_weight, ssim_warmup=ssim_warmup, lpips_weight=lpips_weight)

    def base_loss(self, x, target, stage="autoencoder"):
        raise NotImplementedError

    def loss(self, x, target=None, stage="autoencoder", progress=1.0, perceptual=None):
        """The training objective, where the stage reconstructs (base_loss returns a recon):

            L = L_base + r * w_ssim * (1 - mean SSIM(recon, target)) + w_lpips * LPIPS(recon, target)

        r = min(1, progress / ssim_warmup) ramps the SSIM term in over the first `ssim_warmup` of
        the stage (progress = fraction of its steps done): with the full weight from the first
        step the DAE sat at the mean image for epochs (README). perceptual: optional callable
        (recon, target) -> per-image distance (B,) with a `name` for the logs; passed in, never
        stored, so its frozen network stays out of checkpoints and optimizers. The image terms run
        in float32 even under autocast: their small constants need float32's precision.
        """
        target = x if target is None else target
        total, terms, recon = self.base_loss(x, target, stage)
        if recon is None:
            return total, terms, recon
        recon = recon.float()
        with torch.autocast(recon.device.type, enabled=False):
            if self.ssim_weight:
                ssim = 1 - ssim_map(recon, target).mean()
                ramp = 1.0 if self.ssim_warmup <= 0 else min(1.0, progress / self.ssim_warmup)
                total = total + ramp * self.ssim_weight * ssim
                terms["ssim"] = ssim.detach()
            if perceptual is not None and self.lpips_weight:
                distance = perceptual(recon, target).mean()
                total = total + self.lpips_weight * distance
                terms[perceptual.name] = distance.detach()
        return total, terms, recon

    def forward(self, x, target=None, stage="autoencoder", progress=1.0, perceptual=None):
        # forward is the loss, so DistributedDataParallel's gradient hooks wrap the real work
        return self.loss(x, target, stage, progress, perceptual)

    def reconstruct(self, x):
        raise NotImplementedError

    def sample(self, n, generator=None):
        raise NotImplementedError

    def stage_parameters(self, stage):
        return list(self.parameters())

    def features(self, x):
        """The model's own encoder activations, (B, C, h, w): what the `feature` map compares."""
        raise NotImplementedError

    def feature_layer(self):
        """The module whose output is features(x), when the reconstruction computes it on the way
        (anomaly_maps then keeps it instead of encoding x again); None: it does not."""
        return None

    def keeping_features(self, fn, x):
        """(fn(x), features(x)), the features kept from fn's own pass through feature_layer."""
        layer = self.feature_layer()
        if layer is None:
            return fn(x), self.features(x)
        kept = []
        handle = layer.register_forward_hook(lambda module, inputs, output: kept.append(output))
        try:
            result = fn(x)
        finally:
            handle.remove()
        return result, kept[-1]

    def error_maps(self, x, recon, names=None, x_features=None):
        """Maps every model offers, each (B, 1, H, W), higher = more different:
            l2       = mean_c (x - recon)^2
            ssim     = 1 - SSIM(x, recon), 11 x 11 Gaussian window
            msgms    = 1 - multi-scale gradient-magnitude similarity
            chroma   = smoothed difference of the luminance-free colour (0 on grey images)
            feature  = 1 - cos(f(x), f(recon)) at each feature position, bilinearly upsampled:
                       a difference measured by an encoder trained on this category alone, so a
                       change it has learned to ignore (sensor noise, fine texture) weighs less
                       than one it has never seen.
        names: compute only these (others in names are ignored: a model's own maps);
        None = all. x_features: features(x) when the caller has them already."""
        maps = {}
        if wants(names, "l2"):
            maps["l2"] = (x - recon).pow(2).mean(1, keepdim=True)
        if wants(names, "ssim"):
            maps["ssim"] = 1 - ssim_map(x, recon)
        if wants(names, "msgms"):
            maps["msgms"] = msgms_map(x, recon)
        if wants(names, "chroma"):
            maps["chroma"] = chroma_map(x, recon)
        if wants(names, "feature"):
            fx = self.features(x) if x_features is None else x_features
            distance = 1 - F.cosine_similarity(fx, self.features(recon), dim=1)[:, None]
            maps["feature"] = F.interpolate(distance, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return maps

    def reconstruct_for_maps(self, x, names):
        """reconstruct(x), and features(x) from the same encoder pass when `feature` is asked for."""
        if wants(names, "feature"):
            return self.keeping_features(self.reconstruct, x)
        return self.reconstruct(x), None

    def anomaly_maps(self, x, mc_passes=8, names=None):
        # mc_passes: Monte-Carlo passes, used by models with dropout uncertainty
        recon, x_features = self.reconstruct_for_maps(x, names)
        return recon, only(self.error_maps(x, recon, names, x_features), names)


class LatentVectorAE(AutoEncoder):
    """Conv encoder -> latent vector(s) -> conv decoder; the four continuous models share it.

    The encoder head outputs `head_multiple * latent_dim` numbers (1: a code, 2: mean and
    log-variance); the decoder outputs `out_multiple * 3` channels (2: mean and log-variance).
    bottleneck="vector": fully connected to and from the 8 x 8 feature map (global latent);
    bottleneck="spatial": 1 x 1 convolutions, the latent is a (latent_dim / 64) x 8 x 8 map,
    flattened, so it keeps where things are (sharper reconstructions, less global).
    """

    head_multiple = 1
    out_multiple = 1

    def __init__(self, image_size=128, latent_dim=128, width=32, dropout=0.0, bottleneck="vector",
                 **objective):
        super().__init__(**objective)
        self.config.update(image_size=image_size, latent_dim=latent_dim, width=width,
                           dropout=dropout, bottleneck=bottleneck)
        n_down = int(math.log2(image_size // 8)) if image_size >= 16 else 0
        if n_down < 1 or 8 * 2 ** n_down != image_size:  # the features map needs a down-sampling
            raise ValueError(f"image size must be 8 * 2^k >= 16 (e.g. 64, 128, 256), got {image_size}")
        if bottleneck not in ("vector", "spatial") or (bottleneck == "spatial" and latent_dim % 64):
            raise ValueError("bottleneck must be 'vector' or 'spatial' (latent_dim a multiple of 64)")
        self.image_size, self.latent_dim = image_size, latent_dim
        self.encoder = ConvEncoder(3, width, n_down)
        feat, m = self.encoder.out_channels, self.head_multiple
        if bottleneck == "vector":
            self.to_latent = nn.Sequential(nn.Flatten(), nn.Linear(feat * 64, m * latent_dim))
            self.from_latent = nn.Sequential(nn.Linear(latent_dim, feat * 64),
                                             nn.Unflatten(1, (feat, 8, 8)), nn.ReLU(inplace=True))
        else:
            c = latent_dim // 64
            # channel-major flattening: chunk(2) of the head still splits into mean and log-variance
            self.to_latent = nn.Sequential(nn.Conv2d(feat, m * c, 1), nn.Flatten())
            self.from_latent = nn.Sequential(nn.Unflatten(1, (c, 8, 8)), nn.Conv2d(c, feat, 1),
                                             nn.ReLU(inplace=True))
        self.decoder = ConvDecoder(self.out_multiple * 3, width, n_down, dropout)

    def decode(self, z):
        return self.decoder(self.from_latent(z))

    def features(self, x):
        # the first three encoder blocks: stride 8, fine enough to localise a defect
        for block in list(self.encoder)[:3]:
            x = block(x)
        return x

    def feature_layer(self):
        return list(self.encoder)[:3][-1]  # every reconstruction runs the encoder from its start

    def code_device(self):
        return self.decoder[-1].weight.device


class Segmenter(nn.Module):
    """Where an image differs from its reconstruction the way a defect does (DRAEM's
    discriminative network, small): (x, recon) -> defect logits (B, 1, S, S). Two stride-2
    convolutions, a dilated one (a 26 px field of view), one transposed back to S/2 with the
    first block's output beside it, bilinearly upsampled to S."""

    def __init__(self, width=16):
        super().__init__()
        def block(conv, c_out):
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        self.down1 = block(nn.Conv2d(6, width, 4, 2, 1, bias=False), width)
        self.down2 = block(nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), 2 * width)
        self.middle = block(nn.Conv2d(2 * width, 2 * width, 3, 1, 2, dilation=2, bias=False), 2 * width)
        self.up = block(nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), width)
        self.head = nn.Conv2d(2 * width, 1, 1)

    def forward(self, x, recon):
        half = self.down1(torch.cat([x, recon], 1))
        up = self.up(self.middle(self.down2(half)))
        logits = self.head(torch.cat([half, up], 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


CHANGED = 8 / 255  # what the segmenter must mark: a change of more than this in some channel


def changed_pixels(x, target, threshold=CHANGED):
    """1 where x differs from target by more than `threshold` in some channel, else 0: (B, 1, H, W).
    Where a pasted patch happens to match what it covers, there is nothing to see, nor to mark."""
    return ((x.float() - target.float()).abs().amax(1, keepdim=True) > threshold).float()


def focal_loss(logits, target, gamma=2.0):
    # FL = -(1 - p_t)^gamma log p_t (Lin et al. 2017): the many easy defect-free pixels weigh little
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


class DAE(LatentVectorAE):
    """Deterministic autoencoder.

    Objective:  L_base = mean_pixels (x - D(E(x)))^2, plus the image terms (AutoEncoder.loss)
    Sampling:   z ~ N(m, diag v), moments of the training codes tracked as running averages
                (a plain AE has no prior; ex-post density estimation, Ghosh et al. 2020).
    The detector: a spatial 32 x 8 x 8 latent keeps reconstructions sharp (the VAEs keep a global
    vector, which samples better).
    The segmenter S learns in the same steps to mark the pixels that synthetic anomalies changed,
    from the corrupted image and its reconstruction (DRAEM's discriminative network, trained
    jointly as DRAEM does): L_base += focal loss(S(x, sg(D(E(x)))), changed pixels). Its map,
    `segment`, sees where the reconstruction differs the way a defect does, not merely where it
    differs. sg (stop-gradient): the autoencoder is never trained to help or fool it.
    """

    # on clean val images the loss does not say which epoch detects best (the segmenter's part
    # counts false alarms only); the cosine schedule ends at lr 0, so the last epoch is kept
    last_epoch_stages = ("autoencoder",)
    # three quarters of each batch get anomalies to restore (not half): more restoring, less
    # copying of thin defects; metal_nut 0.978 -> 0.980 image AUROC, bottle AUPRO 0.923 -> 0.927
    # batch 8, 2400 steps: more and smaller steps beat fewer large ones at the same cost (batch 16,
    # 1200 steps: metal_nut pixel AUROC 0.959 against 0.967, mean of three seeds). RESULTS.md
    # shift 1: training images moved by up to 1 px each way, so a part placed a pixel off is not a
    # defect (metal_nut test images moved 1 px after calibration: 10-16 of 22 good nuts flagged ->
    # 0-5). Image AUROC metal_nut 0.986 -> 0.996, grey copy 0.844 -> 0.929, bottle 0.998 either
    # way; metal_nut pixel AUROC 0.971 -> 0.934: mirrored nuts are marked over less of the nut
    # moved 2/3: where the parts lie alike (train.decide_moved), two thirds of the anomalous images
    # also get a blob of their own image moved a few pixels; bottle 0.998 / 0.982 / 0.930 -> 1.000 /
    # 0.985 / 0.937, mean of three seeds (metal_nut, left off by that rule: 0.997 -> 0.985 image AUROC)
    # removed 1/2: half the anomalous images also get a blob filled from its surroundings (a part
    # taken away; train.add_removed_blobs). Seeds 0 and 1: grey copy of metal_nut image AUROC
    # 0.934, 0.921 -> 0.958, 0.946 (scratches 0.828, 0.814 -> 0.947, 0.919); metal_nut pixel AUROC
    # 0.974, 0.970 -> 0.978, 0.979 (image 0.999, 0.995 -> 0.992, 0.998); bottle holds. RESULTS.md
    # min_epochs 100: a set larger than bottle's still sees each image 100 times (train.py)
    recipe = dict(AutoEncoder.recipe, steps=2400, batch_size=8, anomaly_fraction=0.75, shift=1, moved=2 / 3,
                  removed=0.5, min_epochs=100, bf16=True)
    # chroma: metal_nut image AUROC 0.906 -> 0.978 (paint strokes on textured metal); bottle
    # 1.000 -> 0.998 (RESULTS.md). feature: bottle pixel AUROC 0.978 -> 0.984 over ssim alone.
    # segment: metal_nut pixel AUROC 0.964 -> 0.979, AUPRO 0.900 -> 0.926; bottle 0.981 -> 0.982.
    # chroma as a distance, not its square: pixel AUROC and AUPRO up on all nine colour runs
    # measured (metal_nut 0.965 / 0.923 -> 0.966 / 0.926, bottle 0.986 / 0.940 -> 0.987 / 0.943)
    # feature, once the template map joined (detect.py), only where the run turned its few images.
    # Without it, seed 0 (1): metal_nut 0.994 / 0.981 / 0.936 -> 0.997 / 0.984 / 0.947 (0.991 /
    # 0.981 / 0.940 -> 0.993 / 0.984 / 0.947), grey copy 0.957 / 0.972 / 0.896 -> 0.965 / 0.977 /
    # 0.908, solar cells 0.785 -> 0.805 (0.791 -> 0.804), bottle 0.999 / 0.988 / 0.943 -> 0.998 /
    # 0.987 / 0.942; but turned runs lose: 33 bottles 0.999 -> 0.994 (0 -> 3 of 20 flagged), five
    # bottles AUPRO 0.929 -> 0.917, five nuts 0.983 -> 0.979 (RESULTS.md)
    default_map = "ssim+chroma+segment"
    turned_map = "ssim+feature+chroma+segment"
    # its map marks a large defect in patches (a flipped metal_nut along its lobes' edges): a
    # closing of radius 6 joins them, and a narrower Gaussian keeps thin strokes' peaks. Pixel
    # AUROC / AUPRO, mean of 5 seeds: metal_nut 0.952 / 0.916 -> 0.956 / 0.926, bottle 0.980 /
    # 0.925 -> 0.981 / 0.930, grey copy of metal_nut 0.935 / 0.829 -> 0.937 / 0.835 (image AUROC
    # 0.877 -> 0.880), 33 metal_nut images 0.882 / 0.866 -> 0.899 / 0.881. Filling what the marks
    # enclose, then (seed 0): metal_nut pixel AUROC 0.958 -> 0.965, image scores unchanged. The
    # VAEs' smoother maps lose by the closing (beta_vae metal_nut image AUROC 0.658 -> 0.628)
    default_close, default_sigma = 6, 3.0

    def __init__(self, latent_dim=2048, bottleneck="spatial", **kw):
        super().__init__(latent_dim=latent_dim, bottleneck=bottleneck, **kw)
        self.register_buffer("code_mean", torch.zeros(self.latent_dim))
        self.register_buffer("code_var", torch.ones(self.latent_dim))
        self.segmenter = Segmenter()

    def base_loss(self, x, target, stage="autoencoder"):
        z = self.to_latent(self.encoder(x))
        if self.training:
            with torch.no_grad():  # running moments of the codes, for sample(); float32 under autocast too
                z32 = z.float()
                self.code_mean.lerp_(z32.mean(0), 0.05)
                self.code_var.lerp_(z32.var(0) if len(z) > 1 else self.code_var, 0.05)
        recon = torch.sigmoid(self.decode(z))
        mse = F.mse_loss(recon, target)
        # the segmenter marks what the anomalies changed (changed_pixels of x and the clean target)
        focal = focal_loss(self.segmenter(x, recon.detach()).float(), changed_pixels(x, target))
        return mse + focal, {"mse": mse.detach(), "focal": focal.detach()}, recon

    def reconstruct(self, x):
        return torch.sigmoid(self.decode(self.to_latent(self.encoder(x))))

    def sample(self, n, generator=None):
        eps = noise((n, self.latent_dim), generator, self.code_mean.device)
        return torch.sigmoid(self.decode(self.code_mean + self.code_var.sqrt() * eps))

    def anomaly_maps(self, x, mc_passes=8, names=None):
        recon, x_features = self.reconstruct_for_maps(x, names)
        maps = self.error_maps(x, recon, names, x_features)
        if wants(names, "segment"):
            maps["segment"] = torch.sigmoid(self.segmenter(x, recon))
        return recon, only(maps, names)


class BetaVAE(LatentVectorAE):
    """beta-VAE with a diagonal-Gaussian posterior and an N(0, I) prior.

    Objective (per pixel):  L_base = mean_pixels (x - D(z))^2 + beta * KL(q(z|x) || N(0, I)) / P,
                            z ~ q(z|x) = N(mu(x), diag s^2(x))
    """

    recipe = dict(AutoEncoder.recipe, steps=3000)
    head_multiple = 2

    def __init__(self, beta=1.0, **kw):
        super().__init__(**kw)
        self.config.update(beta=beta)
        self.beta = beta

    def posterior(self, x):
        return self.to_latent(self.encoder(x)).chunk(2, dim=1)

    def base_loss(self, x, target, stage="autoencoder"):
        mu, logvar = self.posterior(x)
        recon = torch.sigmoid(self.decode(reparameterize(mu, logvar)))
        mse = F.mse_loss(recon, target)
        kl = diagonal_gaussian_kl(mu, logvar).mean()
        total = mse + self.beta * kl / target[0].numel()
        return total, {"mse": mse.detach(), "kl": kl.detach()}, recon

    def reconstruct(self, x):
        return torch.sigmoid(self.decode(self.posterior(x)[0]))

    def sample(self, n, generator=None):
        z = noise((n, self.latent_dim), generator, self.code_device())
        return torch.sigmoid(self.decode(z))


class MixturePrior(nn.Module):
    """p(z) = sum_k pi_k N(z; m_k, diag s_k^2) with learnable means, variances and weights."""

    def __init__(self, components, dim):
        super().__init__()
        # Means start close together: every component then shares the posterior mass and moves
        # with it. Means drawn at N(0, I) lie ~sqrt(2 dim) apart, so all codes pick the nearest
        # one and the rest never move: samples drawn from those dead components are noise.
        self.means = nn.Parameter(0.01 * torch.randn(components, dim))
        self.logvars = nn.Parameter(torch.zeros(components, dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def kl(self, z, mu, logvar):
        return mixture_kl_mc(z, mu, logvar, self.means, self.logvars, self.logits)

    def sample(self, n, generator=None):
        k = torch.multinomial(F.softmax(self.logits.detach().cpu(), 0), n, True, generator=generator)
        eps = noise((n, self.means.shape[1]), generator, self.means.device)
        k = k.to(self.means.device)
        return self.means[k] + torch.exp(0.5 * self.logvars[k]) * eps


class SAVAE(LatentVectorAE):
    """VAE with a mixture-of-Gaussians prior, a heteroscedastic decoder and MC dropout.

    Decoder:    p(x|z) = N(x; mu(z), diag s^2(z)), log s^2 clamped to [logvar_min, logvar_max]
    Objective:  L_base = mean_pixels -log N(x; mu, s^2) + beta * [log q(z|x) - log p(z)] / P,
                p(z) a K-component Gaussian mixture, KL by one Monte-Carlo sample.
    Uncertainty (T passes with dropout on):  epistemic = Var_t[mu_t],  aleatoric = E_t[s_t^2].
    Stage 2 ("prior"): with the autoencoder frozen, fit p(z) alone to the posterior,
                min E_x E_q(z|x) [log q(z|x) - log p(z)]. In stage 1 the KL weighs 1 / P per pixel,
                too little to pull p(z) onto the codes the decoder knows; sampling off them gives noise.
    """

    stages = ("autoencoder", "prior")
    recipe = dict(AutoEncoder.recipe, steps=2400, prior_steps=360, prior_lr=1e-2)
    default_map = "ssim+variance_weighted"  # structure, plus the likelihood's own error term
    batch_dependent_maps = True  # variance_weighted and epistemic average MC-dropout passes
    head_multiple = 2
    out_multiple = 2
    logvar_min, logvar_max = -9.0, 0.0
    # the KL weighs 1/P per pixel, too little to stop the encoder shrinking its noise: its
    # log-variance drifted to -91 on bottle, exp(91) overflows float32 and log q(z|x) became NaN
    posterior_logvar_min = -20.0

    def __init__(self, beta=1.0, components=10, dropout=0.1, **kw):
        super().__init__(dropout=dropout, **kw)
        self.config.update(beta=beta, components=components)
        self.beta = beta
        self.prior = MixturePrior(components, self.prior_dim())

    def prior_dim(self):
        return self.latent_dim

    def posterior(self, x):
        mu, logvar = self.to_latent(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(min=self.posterior_logvar_min)

    def pixel_distribution(self, z):
        mean, logvar = self.decode(z).chunk(2, dim=1)
        return torch.sigmoid(mean), logvar.clamp(self.logvar_min, self.logvar_max)

    def kl(self, z, mu, logvar):
        return self.prior.kl(z, mu, logvar)

    def prior_modules(self):
        return [self.prior]

    def stage_parameters(self, stage):
        if stage == "prior":
            return [p for m in self.prior_modules() for p in m.parameters()]
        return list(self.parameters())

    def prior_loss(self, x):
        # frozen: batch norm must not drift either
        with mode([self.encoder], training=False), torch.no_grad():
            mu, logvar = self.posterior(x)
            z = reparameterize(mu, logvar)
        kl = self.kl(z, mu, logvar).mean()  # only -log p(z) depends on the prior's parameters
        return kl, {"prior_kl": kl.detach()}, None

    def base_loss(self, x, target, stage="autoencoder"):
        if stage == "prior":
            return self.prior_loss(target)
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar)
        mean, pix_logvar = self.pixel_distribution(z)
        nll = -gaussian_log_prob(target, mean, pix_logvar).mean()
        kl = self.kl(z, mu, logvar).mean()
        total = nll + self.beta * kl / target[0].numel()
        terms = {"nll": nll.detach(), "kl": kl.detach(), "mse": F.mse_loss(mean, target).detach()}
        return total, terms, mean

    def reconstruct(self, x):
        return self.pixel_distribution(self.posterior(x)[0])[0]

    def sample(self, n, generator=None):
        return self.pixel_distribution(self.prior.sample(n, generator))[0]

    def uncertainty(self, x, passes=8):
        """MC dropout: predictive mean, epistemic and aleatoric variance, each (B, 1 or 3, H, W)."""
        dropouts = [m for m in self.modules() if isinstance(m, nn.Dropout2d)]
        with mode(dropouts, training=True):  # dropout on, batch norm still in eval mode
            mu = self.posterior(x)[0]
            means, variances = zip(*(self.pixel_distribution(mu) for _ in range(passes)))
        means = torch.stack(means)
        epistemic = means.var(0, unbiased=False).mean(1, keepdim=True)
        aleatoric = torch.stack(variances).exp().mean(0).mean(1, keepdim=True)
        return means.mean(0), epistemic, aleatoric

    def anomaly_maps(self, x, mc_passes=8, names=None):
        # the MC-dropout passes only for the two maps made of them (first, as ever: they draw
        # the dropout masks from the random state the caller seeded)
        if wants(names, "variance_weighted", "epistemic"):
            mean, epistemic, aleatoric = self.uncertainty(x, mc_passes)
        recon, x_features = self.reconstruct_for_maps(x, names)
        needed = None if names is None else [*names, *(["l2"] if "variance_weighted" in names else [])]
        maps = self.error_maps(x, recon, needed, x_features)
        if wants(names, "variance_weighted"):
            maps["variance_weighted"] = maps["l2"] / aleatoric
        if wants(names, "epistemic"):
            maps["epistemic"] = epistemic
        return recon, only(maps, names)


class ARSAVAE(SAVAE):
    """SAVAE with a global scene latent and K slot latents under an autoregressive prior.

    Prior:      p(z_s) p(z_1 | z_s) prod_{k>1} p(z_k | z_<k, z_s)
                p(z_s): Gaussian mixture; p(z_k | .) = N(m_k, s_k^2) from a GRU over z_<k, z_s
    Objective:  L_base = mean_pixels -log N(x; mu, s^2)
                         + beta * [log q(z_s, z_1..K | x) - log p(z_s, z_1..K)] / P,
                plus the image terms, here with LPIPS(x, mu) at lpips_weight = 1 (AutoEncoder.loss;
                the LPIPS network is passed in as `perceptual`, models.py does not load it)
    Sampling:   ancestral, z_s ~ p(z_s), then z_1, ..., z_K in order.
    """

    recipe = dict(SAVAE.recipe, steps=1920)
    # the template loses AUPRO on both categories measured (seed 0): metal_nut 0.818 -> 0.804,
    # bottle 0.908 -> 0.895 (image AUROC 0.827 -> 0.833 and 0.984 -> 0.979; RESULTS.md)
    default_template = False

    def __init__(self, scene_dim=64, slots=4, slot_dim=16, lpips_weight=1.0, **kw):
        kw.setdefault("latent_dim", scene_dim + slots * slot_dim)
        if kw["latent_dim"] != scene_dim + slots * slot_dim:
            raise ValueError("latent_dim must equal scene_dim + slots * slot_dim")
        self.scene_dim, self.slots, self.slot_dim = scene_dim, slots, slot_dim  # read by prior_dim()
        super().__init__(lpips_weight=lpips_weight, **kw)
        self.config.update(scene_dim=scene_dim, slots=slots, slot_dim=slot_dim)
        hidden = 128
        self.prior_init = nn.Linear(scene_dim, hidden)
        self.prior_rnn = nn.GRUCell(slot_dim, hidden)
        self.prior_head = nn.Linear(hidden, 2 * slot_dim)

    def prior_dim(self):
        return self.scene_dim

    def prior_modules(self):
        return [self.prior, self.prior_init, self.prior_rnn, self.prior_head]

    def slot_priors(self, z_scene, slots):
        """(mean, logvar) of p(z_k | z_<k, z_s) for k = 1..K, given the slot values z_<k."""
        h = torch.tanh(self.prior_init(z_scene))
        params = []
        for k in range(self.slots):
            params.append(self.prior_head(h).chunk(2, dim=1))
            if k + 1 < self.slots:
                h = self.prior_rnn(slots[:, k], h)
        return params

    def kl(self, z, mu, logvar):
        s = self.scene_dim
        kl_scene = self.prior.kl(z[:, :s], mu[:, :s], logvar[:, :s])
        slots = z[:, s:].unflatten(1, (self.slots, self.slot_dim))
        log_q = gaussian_log_prob(z[:, s:], mu[:, s:], logvar[:, s:]).sum(1)
        log_p = sum(gaussian_log_prob(slots[:, k], m, lv).sum(1)
                    for k, (m, lv) in enumerate(self.slot_priors(z[:, :s], slots)))
        return kl_scene + log_q - log_p

    def sample(self, n, generator=None):
        z_scene = self.prior.sample(n, generator)
        h = torch.tanh(self.prior_init(z_scene))
        slots = []
        for k in range(self.slots):
            m, lv = self.prior_head(h).chunk(2, dim=1)
            slots.append(m + torch.exp(0.5 * lv) * noise(m.shape, generator, m.device))
            h = self.prior_rnn(slots[-1], h)
        return self.pixel_distribution(torch.cat([z_scene] + slots, dim=1))[0]


# ----------------------------------------------------------------------------- VQ-VAE

class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient.

    Codebook loss:   ||sg(z) - e||^2        (pulls codes to encoder outputs; replaced by EMA)
    Commitment loss: beta ||z - sg(e)||^2   (keeps encoder outputs near their codes)
    EMA update:      N_k <- g N_k + (1-g) n_k,  m_k <- g m_k + (1-g) sum_{z->k} z,  e_k = m_k / N_k
    Dead codes (EMA usage below `restart_below` vectors per batch) restart at random encoder outputs.
    """

    def __init__(self, codes=512, dim=64, beta=0.25, ema=True, decay=0.99, restart_below=1.0):
        super().__init__()
        self.codes, self.dim, self.beta, self.ema, self.decay = codes, dim, beta, ema, decay
        self.restart_below = restart_below
        self.codebook = nn.Parameter(torch.randn(codes, dim) / dim ** 0.5, requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(codes))
        self.register_buffer("ema_sum", self.codebook.detach().clone())

    def nearest(self, flat):
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin
        dist = self.codebook.pow(2).sum(1) - 2 * flat @ self.codebook.t()
        return dist.argmin(1)

    def forward(self, z, update=False):
        z = z.float()  # distances and EMA statistics in float32, also under bf16 autocast
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        with torch.autocast(z.device.type, enabled=False):  # matrix products: autocast would use bf16
            idx = self.nearest(flat)
            if update and self.ema:
                self.ema_update(flat.detach(), idx)
        q = self.codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], self.dim).permute(0, 3, 1, 2)
        commitment = self.beta * F.mse_loss(z, q.detach())
        codebook = z.new_zeros(()) if self.ema else F.mse_loss(q, z.detach())
        q = z + (q - z).detach()  # straight-through: forward uses q, backward copies grads to z
        usage = torch.bincount(idx, minlength=self.codes).float() / len(idx)
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        stats = {"commitment": commitment.detach(), "codebook": codebook.detach(),
                 "perplexity": perplexity.detach(), "codes_used": (usage > 0).sum().float()}
        return q, idx.view(z.shape[0], z.shape[2], z.shape[3]), commitment + codebook, stats

    @torch.no_grad()
    def ema_update(self, flat, idx):
        onehot = F.one_hot(idx, self.codes).type_as(flat)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every process updates with the statistics of the whole global batch
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()  # Laplace smoothing keeps empty codes from dividing by zero
        count = (self.ema_count + 1e-5) / (n + self.codes * 1e-5) * n
        self.codebook.data.copy_(self.ema_sum / count[:, None])
        dead = self.ema_count < self.restart_below
        if dead.any():
            fresh = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            if distributed:  # the same restarts in every process
                torch.distributed.broadcast(fresh, 0)
            self.codebook.data[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0


class CausalCodePrior(nn.Module):
    """Autoregressive prior over the code map, raster order: p(c) = prod_ij p(c_ij | c_<ij).

    A PixelCNN whose only spatial layer is one causal ("type A" masked) window x window
    convolution, followed by per-position 1x1 layers and a learned embedding of the position
    (i, j). Each conditional sees the codes above and to the left inside the window, plus where
    it is in the image. Sampling needs only that window per position, and positions whose
    windows do not reach each other are drawn together (raster_fill): a 32 x 32 map costs 187
    small batched steps instead of 1024 full-network passes.
    """

    def __init__(self, codes, map_size, embed_dim=32, hidden=256, window=9):
        super().__init__()
        self.codes, self.map_size, self.window = codes, map_size, window
        self.embed = nn.Embedding(codes, embed_dim)
        self.conv = nn.Conv2d(embed_dim, hidden, window, padding=window // 2)
        mask = torch.ones(window, window)
        mask[window // 2, window // 2:] = 0  # the centre and everything right of it on its row
        mask[window // 2 + 1:] = 0  # every row below
        self.register_buffer("mask", mask)
        self.position = nn.Parameter(torch.zeros(1, hidden, map_size, map_size))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, codes, 1))

    def logits(self, code_map):
        x = self.embed(code_map).permute(0, 3, 1, 2)
        h = F.conv2d(x, self.conv.weight * self.mask, self.conv.bias, padding=self.window // 2)
        return self.head(h + self.position)

    def nll(self, code_map):
        # -log p(c_ij | c_<ij) of each code (B, S, S): cross-entropy given its causal window
        return F.cross_entropy(self.logits(code_map), code_map, reduction="none")

    @torch.no_grad()
    def raster_fill(self, n, choose):
        """Fix the code map in raster order: choose(probs (n, P, codes), rows (P,), cols (P,)) ->
        codes (n, P) fixes P positions, each given the codes already fixed above and to the left.

        Position (i, j) sees rows i-r..i-1 up to column j+r and row i left of j (r = window // 2),
        so every position with the same t = (r + 1) i + j depends only on smaller t: the map is
        filled one such wavefront at a time, 187 batched steps for a 32 x 32 map instead of 1024,
        with the same result as one position at a time.
        """
        s, r, w = self.map_size, self.window // 2, self.window
        slope = r + 1
        device = self.position.device
        # the embedded map padded by r on every side; positions not yet fixed are zeros
        canvas = torch.zeros(n, self.embed.embedding_dim, s + 2 * r, s + 2 * r, device=device)
        codes = torch.zeros(n, s, s, dtype=torch.long, device=device)
        weight = (self.conv.weight * self.mask)[:, :, :r + 1]  # the rows below the centre are masked
        for t in range(slope * (s - 1) + s):
            rows = torch.arange(max(0, (t - s) // slope + 1), min(s - 1, t // slope) + 1)
            cols = t - slope * rows
            windows = torch.stack([canvas[:, :, i:i + r + 1, j:j + w]
                                   for i, j in zip(rows.tolist(), cols.tolist())], 1)  # (n, P, embed, r+1, w)
            h = F.conv2d(windows.flatten(0, 1), weight, self.conv.bias).view(n, len(rows), -1)
            h = h + self.position[0, :, rows, cols].t()  # (n, P, hidden)
            logits = self.head(h.reshape(-1, h.shape[-1], 1, 1))[:, :, 0, 0].view(n, len(rows), -1)
            chosen = choose(F.softmax(logits, -1), rows, cols)
            codes[:, rows, cols] = chosen
            canvas[:, :, rows + r, cols + r] = self.embed(chosen).permute(0, 2, 1)
        return codes

    def sample(self, n, generator=None):
        def draw(probs, rows, cols):
            flat = probs.flatten(0, 1).cpu()  # one draw per (image, position)
            return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:2]).to(probs.device)
        return self.raster_fill(n, draw)


class VQVAE(AutoEncoder):
    """VQ-VAE (van den Oord et al. 2017) with a learned autoregressive code prior.

    Encoder: Conv(3,h,4,2,1)-ReLU-Conv(h,h,4,2,1)-ReLU-Conv(h,D,3,1,1); codebook 512 x 64.
    Decoder: ConvT(D,h,3,1,1)-ReLU-ConvT(h,h,4,2,1)-ReLU-ConvT(h,3,4,2,1)-Sigmoid.
    Stage 1:  L_base = mean_pixels (x - D(q(E(x))))^2 + ||sg(z) - e||^2 + beta ||z - sg(e)||^2
              (the codebook term is replaced by EMA updates when ema=True), plus the image terms.
    Stage 2:  fit p(c) = prod_ij p(c_ij | c_<ij) to the code maps of the training images.
    sample(n): c ~ p(c), x = D(e_c).
    """

    stages = ("autoencoder", "prior")
    recipe = dict(AutoEncoder.recipe, steps=480, prior_steps=480, prior_lr=1e-3)
    default_map = "ssim+code_nll"
    maps_revision = 1  # 0: decoded from codes restored by the prior

    def __init__(self, image_size=128, hidden=128, codes=512, code_dim=64, beta=0.25, ema=True,
                 prior_window=9, **objective):
        super().__init__(**objective)
        self.config.update(image_size=image_size, hidden=hidden, codes=codes, code_dim=code_dim,
                           beta=beta, ema=ema, prior_window=prior_window)
        if image_size % 4 or image_size < 8:  # the SSIM window needs more than 5 pixels a side
            raise ValueError(f"image size must be a multiple of 4 and at least 8, got {image_size}")
        h, d = hidden, code_dim
        self.encoder = nn.Sequential(nn.Conv2d(3, h, 4, 2, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(h, h, 4, 2, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(h, d, 3, 1, 1))
        self.quantizer = VectorQuantizer(codes, d, beta, ema)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(d, h, 3, 1, 1), nn.ReLU(inplace=True),
                                     nn.ConvTranspose2d(h, h, 4, 2, 1), nn.ReLU(inplace=True),
                                     nn.ConvTranspose2d(h, 3, 4, 2, 1), nn.Sigmoid())
        self.prior = CausalCodePrior(codes, image_size // 4, window=prior_window)

    def stage_parameters(self, stage):
        if stage == "prior":
            return list(self.prior.parameters())
        codebook = [] if self.quantizer.ema else [self.quantizer.codebook]
        return [*self.encoder.parameters(), *self.decoder.parameters(), *codebook]

    def encode(self, x, update=False):
        return self.quantizer(self.encoder(x), update)

    def base_loss(self, x, target, stage="autoencoder"):
        if stage == "prior":
            with torch.no_grad():  # the autoencoder is frozen while its code prior is fitted
                codes = self.encode(target)[1]
            nll = self.prior.nll(codes).mean()
            return nll, {"prior_nll": nll.detach()}, None
        q, _, vq_loss, stats = self.encode(x, update=self.training)
        recon = self.decoder(q)
        mse = F.mse_loss(recon, target)
        return mse + vq_loss, {"mse": mse.detach(), **stats}, recon

    def reconstruct(self, x):
        return self.decoder(self.encode(x)[0])

    def features(self, x):
        return self.encoder(x)  # before quantisation, stride 4

    def feature_layer(self):
        return self.encoder

    def decode_codes(self, codes):
        return self.decoder(self.quantizer.codebook[codes].permute(0, 3, 1, 2))

    def sample(self, n, generator=None):
        return self.decode_codes(self.prior.sample(n, generator))

    def anomaly_maps(self, x, mc_passes=8, names=None):
        """The error maps of the decoding of the input's own codes, and code_nll: -log p of each
        code under the prior, upsampled to pixels (a defect's codes are rare on normal images).
        The decoding is not restored first (unlikely codes replaced by likely ones): in raster
        order one replaced code changes what the prior expects of every later one, and a good
        part at an unusual angle came back missing whole lobes. Image AUROC restored -> not:
        metal_nut 0.685 -> 0.818, solar cells 0.782 -> 0.813, bottle 0.989 -> 0.979 (RESULTS.md)."""
        def codes_of(x):
            return self.encode(x)[1]
        if wants(names, "feature"):
            codes, x_features = self.keeping_features(codes_of, x)
        else:
            codes, x_features = codes_of(x), None
        recon = self.decode_codes(codes)
        maps = self.error_maps(x, recon, names, x_features)
        if wants(names, "code_nll"):
            nll = self.prior.nll(codes)[:, None]
            maps["code_nll"] = F.interpolate(nll, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return recon, only(maps, names)


# ----------------------------------------------------------------------------- registry

# The order is detect.py's preference: without --model it uses the first one trained for the
# class, ranked by the mean image AUROC of bottle and metal_nut (seed 0: dae 0.997, savae 0.908,
# ar_savae 0.906, vqvae 0.899, beta_vae 0.873; README).
MODELS = {"dae": DAE, "savae": SAVAE, "ar_savae": ARSAVAE, "vqvae": VQVAE, "beta_vae": BetaVAE}


def build_model(name, **config):
    """MODELS[name](**config); an argument the model does not take is an error, never dropped."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    try:
        return MODELS[name](**config)
    except TypeError as e:  # e.g. "got an unexpected keyword argument 'ema'"
        raise ValueError(f"{name}: {e}") from e


def load_model(checkpoint, device="cpu"):
    """Rebuild a model from a training checkpoint: a path, or the dict read from one (the scripts
    read and check the file first: checks.load_checkpoint). Returns (model in eval mode, dict)."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location=device,
                                                                      weights_only=True)
    model = build_model(ckpt["model_name"], **ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt
