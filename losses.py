"""LPIPS (Zhang et al. 2018) for the scripts: the perceptual distance AR-SAVAE's objective weighs,
evaluate.py's reconstruction LPIPS and detect.py's lpips map.

The lpips package and its AlexNet weights are loaded here, never by models.py (which needs only
torch): train.py passes the loaded network to model.loss as its `perceptual` callable.
"""
import os

import torch

import data

LPIPS_BACKBONE_ENV = "LPIPS_BACKBONE"
LPIPS_HELP = (
    "LPIPS needs torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth), downloaded "
    "automatically when online. Offline, pass --lpips-backbone PATH or set "
    f"{LPIPS_BACKBONE_ENV}=PATH; or pass --lpips-random-backbone to train with a randomly "
    "initialised backbone (logged as such; not LPIPS), or --lpips-weight 0 to drop the term")


class LPIPSUnavailable(RuntimeError):
    """LPIPS backbone weights could not be had; the message says how to provide them."""


# torchvision names its weight files by the first hex digits of their SHA-256: any other file,
# however AlexNet-shaped (a randomly initialised one, say), would put a number that is not LPIPS
# under its name
ALEXNET_SHA256_PREFIX = "7be5be79"
# AlexNet's stride-4 convolution and two 3 x 3 poolings leave nothing of a smaller image
LPIPS_MIN_SIZE = 31


def require_size(size):
    """LPIPSUnavailable unless images of size x size pixels are large enough for LPIPS."""
    if size < LPIPS_MIN_SIZE:
        raise LPIPSUnavailable(f"LPIPS needs images of at least {LPIPS_MIN_SIZE} px (AlexNet's poolings "
                               f"leave nothing of smaller ones); these are {size} px")


class Perceptual:
    """LPIPS distance between images in [0, 1], as load_lpips builds it.

    Not an nn.Module on purpose: its frozen network must stay out of model checkpoints and
    optimizers. `random_backbone` is True when the opt-in random AlexNet is used; every metric
    then carries the name "lpips_random", never "lpips".
    """

    def __init__(self, net, random_backbone, source="torchvision download"):
        self.net, self.random_backbone, self.source = net, random_backbone, source
        self.name = "lpips_random" if random_backbone else "lpips"

    def to(self, device):
        self.net.to(device)
        return self

    def __call__(self, x, y):
        """Per-image LPIPS, (B,): the callable model.loss and evaluate.py take."""
        return self.map(x, y).flatten(1).mean(1)

    def map(self, x, y):
        """LPIPS of images in [0, 1] (lpips wants [-1, 1]): (B, 1, H, W) if built spatial, else (B, 1, 1, 1)."""
        return self.net(x * 2 - 1, y * 2 - 1)


def load_backbone(lpips_net, path):
    """Copy torchvision AlexNet `features` weights from a local file into lpips' sliced copy."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, a pickle of other objects: all mean "not usable"
        raise LPIPSUnavailable(f"cannot read '{path}' as AlexNet weights ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise LPIPSUnavailable(f"'{path}' is not an AlexNet state_dict (it holds a {type(state).__name__})")
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    for slice_module in (lpips_net.net.slice1, lpips_net.net.slice2, lpips_net.net.slice3,
                         lpips_net.net.slice4, lpips_net.net.slice5):
        for name, layer in slice_module.named_children():
            for p in ("weight", "bias"):
                if hasattr(layer, p) and f"{name}.{p}" in features:
                    target, value = getattr(layer, p).data, features[f"{name}.{p}"]
                    if target.shape != value.shape:
                        raise LPIPSUnavailable(f"'{path}' is not an AlexNet state_dict (features.{name}.{p} "
                                               f"is {tuple(value.shape)}, AlexNet's {tuple(target.shape)})")
                    target.copy_(value)
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
            digest = data.sha256_of(backbone_path)
            if not digest.startswith(ALEXNET_SHA256_PREFIX):
                raise LPIPSUnavailable(f"'{backbone_path}' is not torchvision's AlexNet weights "
                                       f"alexnet-owt-{ALEXNET_SHA256_PREFIX}.pth (its SHA-256 begins {digest[:8]}); "
                                       f"{LPIPS_HELP}")
            load_backbone(net, backbone_path)
        random = not backbone_path
        source = "random" if random else f"{backbone_path} (sha256 {digest[:16]})"
    else:
        try:
            net = lpips.LPIPS(net="alex", spatial=spatial, verbose=False)
        except Exception as e:  # a download failure surfaces as URLError/OSError/RuntimeError
            raise LPIPSUnavailable(f"could not load LPIPS weights ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120]}); {LPIPS_HELP}") from None
        random, source = False, "torchvision download"
    for p in net.parameters():
        p.requires_grad_(False)
    return Perceptual(net.eval(), random, source)
