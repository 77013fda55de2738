"""Image-space losses and maps shared by training, evaluation and detection.

The likelihood terms (Gaussian NLL, diagonal-Gaussian KL, Monte-Carlo KL against a mixture
prior) live in models.py, which must need only torch; they are imported here so that every loss
can be found in one place. Everything below works on images in [0, 1], shape (B, 3, H, W), and
returns per-pixel maps of shape (B, 1, H, W) or per-image / batch scalars.
"""
import os

import torch
import torch.nn.functional as F

from models import diagonal_gaussian_kl, gaussian_log_prob, mixture_kl_mc  # noqa: F401


def mse(x, y):
    return F.mse_loss(x, y)


def gaussian_nll(x, mean, logvar):
    # -log N(x; m, s^2), elementwise
    return -gaussian_log_prob(x, mean, logvar)


def squared_error_map(x, y):
    return (x - y).pow(2).mean(1, keepdim=True)


# ----------------------------------------------------------------------------- SSIM

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


def blur(x, kernel):
    """Separable filter with reflect padding, so the map keeps the input size.

    Up to 512 px a side: two products with banded matrices that hold the padding, 2-4x faster
    than the depthwise convolution on CPU, forward and backward (bench.py). Larger: convolution.
    """
    h, w = x.shape[-2:]
    if max(h, w) <= 512:
        return reflect_blur_matrix(h, kernel).t() @ x @ reflect_blur_matrix(w, kernel)
    c, k = x.shape[1], len(kernel)
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


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


def ssim_loss(x, y):
    return 1 - ssim_map(x, y).mean()


# ----------------------------------------------------------------------------- MSGMS

PREWITT = torch.tensor([[1.0, 0.0, -1.0]] * 3) / 3


def gradient_magnitude(x):
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


def msgms_loss(x, y):
    return msgms_map(x, y).mean()


# ----------------------------------------------------------------------------- LPIPS

LPIPS_BACKBONE_ENV = "LPIPS_BACKBONE"
LPIPS_HELP = (
    "LPIPS needs torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth), downloaded "
    "automatically when online. Offline, pass --lpips-backbone PATH or set "
    f"{LPIPS_BACKBONE_ENV}=PATH; or pass --lpips-random-backbone to train with a randomly "
    "initialised backbone (logged as such; not LPIPS), or --lpips-weight 0 to drop the term")


class LPIPSUnavailable(RuntimeError):
    """LPIPS backbone weights could not be had; the message says how to provide them."""


class Perceptual:
    """LPIPS distance (Zhang et al. 2018) between images in [0, 1], loaded lazily.

    Not an nn.Module on purpose: its frozen network must stay out of model checkpoints and
    optimizers. `random_backbone` is True when the opt-in random AlexNet is used; every metric
    then carries the name "lpips_random", never "lpips".
    """

    def __init__(self, net, random_backbone):
        self.net, self.random_backbone = net, random_backbone
        self.name = "lpips_random" if random_backbone else "lpips"

    def to(self, device):
        self.net.to(device)
        return self

    def __call__(self, x, y):
        """LPIPS of images in [0, 1] (lpips wants [-1, 1]): (B, 1, H, W) if built spatial, else (B, 1, 1, 1)."""
        return self.net(x * 2 - 1, y * 2 - 1)

    def distance(self, x, y):
        """Per-image LPIPS, (B,)."""
        return self(x, y).flatten(1).mean(1)


def load_backbone(lpips_net, path):
    """Copy torchvision AlexNet `features` weights from a local file into lpips' sliced copy."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    for slice_module in (lpips_net.net.slice1, lpips_net.net.slice2, lpips_net.net.slice3,
                         lpips_net.net.slice4, lpips_net.net.slice5):
        for name, layer in slice_module.named_children():
            for p in ("weight", "bias"):
                if hasattr(layer, p) and f"{name}.{p}" in features:
                    getattr(layer, p).data.copy_(features[f"{name}.{p}"])
                elif hasattr(layer, p):
                    raise LPIPSUnavailable(f"'{path}' is not an AlexNet state_dict (no features.{name}.{p})")


def load_lpips(backbone_path=None, random_backbone=False, spatial=False):
    """LPIPS-AlexNet: standard download, else a local backbone file, else an explicit random opt-in.

    Raises LPIPSUnavailable with one line of help when none of them works.
    """
    try:
        import lpips
    except ImportError as e:
        raise LPIPSUnavailable(f"the lpips package is not installed ({e}); pip install lpips") from None
    backbone_path = backbone_path or os.environ.get(LPIPS_BACKBONE_ENV)
    if random_backbone or backbone_path:
        net = lpips.LPIPS(net="alex", pnet_rand=True, spatial=spatial, verbose=False)
        if backbone_path:
            if not os.path.isfile(backbone_path):
                raise LPIPSUnavailable(f"LPIPS backbone file '{backbone_path}' not found; {LPIPS_HELP}")
            load_backbone(net, backbone_path)
        random = not backbone_path
    else:
        try:
            net = lpips.LPIPS(net="alex", spatial=spatial, verbose=False)
        except Exception as e:  # a download failure surfaces as URLError/OSError/RuntimeError
            raise LPIPSUnavailable(f"could not load LPIPS weights ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120]}); {LPIPS_HELP}") from None
        random = False
    for p in net.parameters():
        p.requires_grad_(False)
    return Perceptual(net.eval(), random)
