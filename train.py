"""Train one autoencoder on the defect-free images of one MVTec AD category.

    python train.py --model dae --category bottle --data-root data/mvtec_ad
    torchrun --nproc_per_node=2 train.py --model vqvae --category bottle   # several processes

The model owns its objective (model.loss) and its defaults (model.recipe, its constructor); this
file runs its stages in order, each epoch train_epoch -> validate -> checkpoint. Before the
first, it reads from the training images whether to cut each image to a window around its part
(--zoom auto: a small part on a plain background at changing places; turned with the part where
it is long and lies at any angle) and whether to turn them by
random angles (--rotate auto: few images of parts that lie at any angle), and prints both decisions.
Writes to <runs>/<category>/<model>/ (--runs, default outputs; --out names the folder itself):
    checkpoint.pt   latest state (model args + weights + optimizer + stage/epoch/step + config +
                    the train/val files: name, bytes, SHA-256), written atomically every epoch;
                    --resume continues from it, --overwrite replaces it, nothing else touches it
    best.pt         the epoch with the lowest validation loss of the last stage, or its latest
                    epoch for a stage the model lists in last_epoch_stages (the DAE's)
    metrics.csv     one row per epoch: every loss term, validation loss and reconstruction MSE,
                    seconds since the previous row (checkpoint writing included)
    recon.png       validation images (top row) and their reconstructions (bottom row)
    samples.png     draws from the model's prior
"""
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from torchvision.utils import save_image
from tqdm import tqdm

import checks
import data
import losses
from models import MODELS, blur, build_model, gaussian_kernel

GRAD_CLIP = 5.0  # every step rescales the gradient to a global norm of at most this


# ----------------------------------------------------------------------------- options

def stage_option(index, stage, what):
    """The option that sets a stage's `what` (epochs, lr, steps): --epochs/--lr for the first
    stage, --<stage>-epochs/--<stage>-lr for each later one (--prior-epochs, ...)."""
    return what if index == 0 else f"{stage}_{what}"


def recipe_defaults(cls):
    """What a model's recipe fills in: steps and lr of each stage (a later stage the recipe does
    not name runs like the first), batch_size, anomaly_fraction, shift, moved, removed and
    min_epochs. Epochs come from the steps once the size of the training set is known (plan_stages)."""
    recipe = cls.recipe
    values = {k: recipe[k] for k in ("batch_size", "anomaly_fraction", "shift", "moved", "removed", "min_epochs")}
    for index, stage in enumerate(cls.stages):
        for what in ("steps", "lr"):
            values[stage_option(index, stage, what)] = recipe.get(stage_option(index, stage, what), recipe[what])
    return values


def per_model(key):
    """'dae 300, beta_vae 250, ...': each model's default for an option, for --help."""
    return ", ".join(f"{name} {recipe_defaults(cls)[key]:g}" for name, cls in MODELS.items()
                     if key in recipe_defaults(cls))


class Parser(data.ArgumentParser):
    """--help ends with every model's constructor defaults. They are read from a default-built
    instance of each model (its config), so only when help is asked for."""

    def format_help(self):
        lines = [f"  {name:9s} " + ", ".join(f"{k}={v}" for k, v in cls().config.items() if k != "image_size")
                 for name, cls in MODELS.items()]
        self.epilog = "each model's constructor defaults (the model options change them):\n" + "\n".join(lines)
        return super().format_help()


def parse_args(argv=None):
    later = {}  # every stage that follows a model's first -> the models that have it
    for name, cls in MODELS.items():
        for stage in cls.stages[1:]:
            later.setdefault(stage, []).append(name)
    p = Parser(description="Train an autoencoder on one MVTec AD category.")
    p.add_argument("--model", required=True, choices=list(MODELS), help="which model (models.py)")
    add_shared_options(p, "MVTec AD category, e.g. bottle")
    p.add_argument("--data-root", default=data.DEFAULT_ROOT, help="folder holding the categories")
    p.add_argument("--out", help="write this run to this folder instead of <runs>/<category>/<model>")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the folder (deleted first); without it, or --resume, "
                        "an existing run is never touched")
    p.add_argument("--size", type=checks.positive_int, default=128,
                   help="image side in pixels; a 256 px epoch costs about 4.4x a 128 px one (DAE on CPU)")
    p.add_argument("--batch-size", type=checks.positive_int,
                   help=f"total over all processes (default: the recipe's, {per_model('batch_size')})")
    p.add_argument("--seed", type=checks.non_negative_int, default=0,
                   help="seeds the weights, the val split, the shuffling and the synthetic anomalies")
    p.add_argument("--val-fraction", type=checks.open_fraction, default=0.1, help="train/good held out for validation")
    p.add_argument("--rotate", choices=["auto", "on", "off"], default="auto",
                   help="turn every training image by a random angle (corners filled by reflection). "
                        f"auto: on when there are fewer than {ROTATE_BELOW} training images and the parts lie "
                        "at random angles or look alike at any angle (round parts seen from above), so few "
                        "angles are covered (printed with its reason); a large "
                        "set covers the angles itself, and turning it teaches that a mirrored part is "
                        "normal (metal_nut's flip)")
    p.add_argument("--zoom", choices=["auto", "off"], default="auto",
                   help="cut every image (training, val, test, new ones) to a window around its part before "
                        "it is resized to --size, so the part gets more of the pixels. auto: where the "
                        "training images show the part on a plain background, not in the same place in "
                        f"every image (a screw anywhere on the table), and the largest part spans under "
                        f"{100 * ZOOM_MAX_SIDE / ZOOM_MARGIN:.0f} %% of the frame; the window is {ZOOM_MARGIN:g} times "
                        "that wide (printed with its reason). Where the parts are long and lie at any angle "
                        "(a screw), the window also turns with each part's long axis, heavier end first. "
                        "Parts that lie alike keep the whole frame, where a part in the wrong place is a defect")
    p.add_argument("--moved", choices=["auto", "on", "off"], default="auto",
                   help="also give some synthetic anomalies a blob of their own image moved a few pixels "
                        "(structure out of line: a bent lead, a misplaced part). auto: on for the models "
                        f"whose recipe has it ({per_model('moved')}, the share of anomalous images) when the "
                        "parts lie alike in every image, where they were measured to help (they cost parts "
                        "at any angle); printed with its reason. on: the recipe's share, or "
                        f"{MOVED_SHARE:.2f}")
    p.add_argument("--shift", type=checks.non_negative_int,
                   help="move every training image by a random whole-pixel offset of up to this many "
                        "pixels each way (border filled by reflection), so that a part placed a pixel "
                        f"or two off is not taken for a defect (default: the recipe's, {per_model('shift')})")
    g = p.add_argument_group("schedule (default: the model's recipe, values in brackets)")
    g.add_argument("--epochs", type=checks.positive_int,
                   help="epochs of the first stage (default: the recipe's optimisation steps as whole epochs of "
                        f"the training set, {per_model('steps')} steps; 2400 are 100 epochs of 188 images at batch 8; "
                        f"a larger set gets at least the recipe's epochs, {per_model('min_epochs')}, up to "
                        f"{MAX_STEPS_FACTOR:g}x the steps)")
    g.add_argument("--lr", type=checks.positive_float,
                   help=f"peak learning rate of the first stage, cosine-decayed to 0 ({per_model('lr')})")
    for stage, names in later.items():
        g.add_argument(f"--{stage}-epochs", type=checks.positive_int,
                       help=f"epochs of the '{stage}' stage of {', '.join(names)} (default: "
                            f"{per_model(f'{stage}_steps')} steps, as whole epochs)")
        g.add_argument(f"--{stage}-lr", type=checks.positive_float,
                       help=f"peak learning rate of the '{stage}' stage ({per_model(f'{stage}_lr')})")
    g.add_argument("--anomaly-fraction", type=checks.unit_fraction,
                   help="fraction of each batch given synthetic anomalies, in the stages that use them "
                        f"({per_model('anomaly_fraction')})")
    g.add_argument("--removed", type=checks.unit_fraction,
                   help="share of the anomalous images that also get a blob filled from its surroundings, "
                        "a piece of the part taken away (a missing component, a chipped edge), so the model "
                        f"learns to put back what is absent ({per_model('removed')})")
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (the first steps compile)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast for the forward pass; the weights, the optimizer and the image "
                        "terms stay float32 (default: on for the models whose recipe says so, "
                        f"{', '.join(n for n, c in MODELS.items() if c.recipe.get('bf16'))}, where the device "
                        "computes bf16 natively: GPUs with bf16, CPUs with AVX-512 BF16 or AMX; "
                        "bench.py --profile measures it)")
    g = p.add_argument_group("model (default: the model's own, listed below; a model that does not take "
                             "an option given here stops with an error)")
    g.add_argument("--latent-dim", type=checks.positive_int, help="latent size (dae, beta_vae, savae, ar_savae)")
    g.add_argument("--width", type=checks.positive_int, help="channels of the first conv layer (not vqvae)")
    g.add_argument("--bottleneck", choices=["vector", "spatial"], help="latent layout (not vqvae)")
    g.add_argument("--beta", type=checks.non_negative_float, help="KL weight (VAEs) or commitment weight (VQ-VAE)")
    g.add_argument("--no-ema", action="store_true", help="VQ-VAE: learn the codebook by gradient")
    g.add_argument("--ssim-weight", type=checks.non_negative_float, help="weight of 1 - SSIM in the objective")
    g.add_argument("--ssim-warmup", type=checks.unit_fraction,
                   help="fraction of a stage over which the SSIM weight ramps up from 0; with the full "
                        "weight from step 0 the model sits at the mean image for epochs")
    g.add_argument("--lpips-weight", type=checks.non_negative_float, help="weight of LPIPS in the objective")
    g = p.add_argument_group("LPIPS network (loaded when the objective weighs LPIPS)")
    g.add_argument("--lpips-backbone", help=f"local AlexNet weights file (or ${losses.LPIPS_BACKBONE_ENV})")
    g.add_argument("--lpips-random-backbone", action="store_true",
                   help="allow a randomly initialised LPIPS backbone (logged as lpips_random)")
    args = p.parse_args(argv)
    # a resumed run takes these from the run, not from the recipe (follow_run)
    args.not_given = sorted(k for k in set(checks.RESUME_FOLLOWS) | set(recipe_defaults(MODELS[args.model]))
                            if getattr(args, k, None) is None)
    for key, value in recipe_defaults(MODELS[args.model]).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.shift >= args.size // 2:
        p.error(f"--shift {args.shift} must be below half of --size {args.size}")
    args.out = args.out or str(run_dir(args.runs, args.category, args.model))
    if args.bf16 is None:
        args.bf16 = MODELS[args.model].recipe.get("bf16", False) and native_bf16(pick_device(args.device))
    args.zoom_window = None  # decided in main, once the training images are read
    args.rotate_used = args.rotate == "on"  # auto likewise
    args.moved_share = 0.0 if args.moved == "auto" else decide_moved(args.moved, args.model, None)[0]  # likewise
    return args


def unused_stage_options(args):
    """The --<stage>-epochs / --<stage>-lr given for a stage this model does not have (--prior-epochs
    to the DAE): said, not refused, so one command line can serve every model."""
    own = MODELS[args.model].stages
    later = dict.fromkeys(stage for cls in MODELS.values() for stage in cls.stages[1:] if stage not in own)
    return [f"--{stage}-{what}" for stage in later for what in ("epochs", "lr")
            if getattr(args, f"{stage}_{what}", None) is not None]


def native_bf16(device):
    """Whether the device has bfloat16 arithmetic units, so that bf16 autocast pays: about 1.3x
    per DAE epoch on an AVX-512 BF16 CPU, with the same detection figures (RESULTS.md). Without
    such units autocast would emulate bf16 and run slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def model_args(args):
    """Constructor arguments: the image size, and each model option that was given (the model's
    own default otherwise). build_model refuses one the model does not take."""
    given = {"latent_dim": args.latent_dim, "width": args.width, "bottleneck": args.bottleneck,
             "beta": args.beta, "ema": False if args.no_ema else None, "ssim_weight": args.ssim_weight,
             "ssim_warmup": args.ssim_warmup, "lpips_weight": args.lpips_weight}
    return {"image_size": args.size, **{k: v for k, v in given.items() if v is not None}}


# ----------------------------------------------------------------------------- shared with detect.py, evaluate.py

def add_shared_options(p, category_help):
    """The options train.py, detect.py and evaluate.py spell and explain alike."""
    p.add_argument("--category", "--class", dest="category", required=True, type=checks.category_name,
                   help=category_help)
    p.add_argument("--download", action="store_true", help="download MVTec AD if the category is missing")
    p.add_argument("--runs", "--outputs", dest="runs", default="outputs",
                   help="folder of the training runs: train.py writes <runs>/<category>/<model>/")
    p.add_argument("--device", type=checks.device_name, default="auto",
                   help="auto (CUDA if present), cpu, cuda, cuda:1, ...")


def run_dir(runs, category, model):
    """Where train.py writes a run (unless --out), and where detect.py and evaluate.py find it."""
    return Path(runs) / category / model


def trained_checkpoint(folder):
    """best.pt, else the latest checkpoint.pt, else None."""
    for name in ("best.pt", "checkpoint.pt"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def pick_device(name, rank=0):
    """--device: auto is this process's GPU when there are any, else the CPU."""
    if name == "auto":
        name = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def write_csv_atomic(rows, path):
    header = list(dict.fromkeys(k for row in rows for k in row))

    def write(f):
        writer = csv.DictWriter(f, header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    checks.write_atomic(path, write)


# ----------------------------------------------------------------------------- plumbing

def make_model(args, device):
    """The model as train.py trains it: on device, and channels_last on CPU, where oneDNN runs
    these convolutions 1.1-1.35x faster than NCHW (bench.py --profile)."""
    model = build_model(args.model, **model_args(args)).to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model


def setup_distributed():
    """(rank, world size); torchrun sets the environment variables, a plain run has none."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def epoch_seed(seed, stage_index, epoch):
    # every epoch's randomness derives from (seed, stage, epoch): resuming replays it exactly
    return seed * 1_000_003 + stage_index * 10_007 + epoch


def save_atomic(obj, path):
    checks.write_atomic(path, lambda f: torch.save(obj, f), binary=True)  # a full disk: one line


def read_rows_until(path, stage_index, epoch):
    """Rows of an earlier run up to the checkpoint, so a resumed run appends after them."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)
                if (int(r["stage_index"]), int(r["epoch"])) <= (stage_index, epoch)]


def time_left(seconds, epochs_run, epochs_left):
    """How long the stage still needs at the mean pace of the epochs this process ran (their
    checkpoint writes included): a 2-core CPU without bf16 units takes several times as long as
    one with them, and the per-epoch bar does not say how many minutes remain."""
    left = seconds / epochs_run * epochs_left
    return f"{left / 60:.0f} min left" if left >= 90 else f"{left:.0f} s left"


def check_finite(sums, stage, epoch):
    bad = [k for k, v in sums.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"loss term(s) {', '.join(bad)} became non-finite in stage "
                                 f"'{stage}' epoch {epoch + 1}; try a lower --lr")


# ----------------------------------------------------------------------------- synthetic anomalies

def smooth_noise_masks(n, size, coverage):
    """Blob-shaped binary masks (n, 1, S, S): bicubic-upsampled coarse noise thresholded so a
    `coverage` fraction of each mask (one value per image) is set."""
    grid = int(torch.randint(0, 3, ()).item())  # 4, 8 or 16 cells: big, medium or small blobs
    coarse = torch.rand(n, 1, 4 * 2 ** grid, 4 * 2 ** grid)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).flatten(1)
    rank = ((1 - coverage) * (field.shape[1] - 1)).long()
    # per-image quantile: the (rank + 1)-th smallest value (kthvalue: a third of a full sort's time)
    cut = torch.stack([row.kthvalue(int(r) + 1).values for row, r in zip(field, rank)])
    return (field > cut[:, None]).float().view(n, 1, size, size)


def stroke_masks(n, size, segments=8):
    """Thin curved strokes (n, 1, S, S), like scratches, cracks and bent wires: random walks of
    `segments` straight pieces (10-50 % of the side in all) drawn 1-3 px wide at 128 px."""
    scale = size / 128
    start = torch.rand(n, 1, 2) * 0.6 + 0.2  # in [0, 1] image coordinates
    heading = torch.rand(n, 1) * 2 * math.pi + torch.cumsum(torch.randn(n, segments) * 0.5, 1)
    step = (torch.rand(n, 1) * 0.4 + 0.1) / segments
    moves = torch.stack([torch.cos(heading), torch.sin(heading)], -1) * step[..., None]
    points = (torch.cat([start, start + torch.cumsum(moves, 1)], 1) * size).round().int().numpy()
    widths = torch.randint(1, 4, (n,)).mul(scale).round().clamp_min(1).int().tolist()
    masks = np.zeros((n, size, size), np.uint8)
    for mask, line, width in zip(masks, points, widths):
        cv2.polylines(mask, [line], False, 1, thickness=width)
    return torch.from_numpy(masks).float()[:, None]


def add_synthetic_anomalies(x, fraction, strokes=0.5, moved=0.0, removed=0.0):
    """Paste shifted, recoloured pieces of other training images into the first `fraction` of the
    batch, through smooth-noise blobs or, for a `strokes` share of them, thin curves (scratches
    and cracks are the defects a model most easily copies); the model is trained to output the
    clean image (restoration, as in DRAEM's reconstructive network, with patches from normal images
    as in NSA: no outside data; the random colour gain and offset make a patch foreign even where
    it lands on the same kind of surface). A `moved` share of them also get a blob of their own
    image moved a few pixels (add_moved_blobs; decide_moved says when), and a `removed` share a
    blob filled from its surroundings (add_removed_blobs)."""
    k = int(round(fraction * len(x)))
    if k == 0 or len(x) < 2:
        return x
    size = x.shape[-1]
    mask = smooth_noise_masks(k, size, torch.empty(k).uniform_(0.01, 0.1))
    thin = torch.rand(k, 1, 1, 1) < strokes  # this share of the anomalies are thin strokes
    mask = torch.where(thin, stroke_masks(k, size), mask).to(x.device)
    donors = x.roll(1, dims=0)[:k]  # another image of the batch ...
    shift = torch.randint(-size // 4, size // 4 + 1, (2,)).tolist()
    donors = donors.roll(shift, dims=(2, 3))  # ... from another place, so the patch looks foreign
    channels = 1 if torch.equal(x[:, :1].expand_as(x), x) else x.shape[1]  # grey stays grey
    gain = torch.empty(k, channels, 1, 1).uniform_(0.5, 1.5).to(x.device)  # recoloured, so that
    offset = torch.empty(k, channels, 1, 1).uniform_(-0.2, 0.2).to(x.device)  # stains count too
    donors = (donors * gain + offset).clamp(0, 1)
    opacity = torch.empty(k, 1, 1, 1).uniform_(0.5, 1.0).to(x.device)
    corrupted = x[:k] * (1 - opacity * mask) + donors * opacity * mask
    if moved > 0:
        corrupted = add_moved_blobs(x[:k], corrupted, moved)
    if removed > 0:
        corrupted = add_removed_blobs(x[:k], corrupted, removed)
    return torch.cat([corrupted, x[k:]])


def add_moved_blobs(clean, corrupted, share):
    """corrupted, where for a `share` of the images a blob (1-10 % of the image) shows their own
    clean image moved by 3-12 px along each axis at 128 px (one move per batch), as it is:
    structure out of line (a bent lead, a misplaced part) rather than a foreign surface."""
    k, size = len(clean), clean.shape[-1]
    own = (torch.rand(k, 1, 1, 1) < share).float()
    blob = (smooth_noise_masks(k, size, torch.empty(k).uniform_(0.01, 0.1)) * own).to(clean.device)
    low, high = max(1, round(3 * size / 128)), max(1, round(12 * size / 128))
    step = torch.randint(low, high + 1, (2,)) * (torch.randint(0, 2, (2,)) * 2 - 1)
    return torch.where(blob > 0, clean.roll(step.tolist(), dims=(2, 3)), corrupted)


def fill_from_surroundings(x, region, sigma):
    """x with `region` (B, 1, S, S; 1 inside) filled by a Gaussian-weighted mean of the pixels
    around it: blur(x * (1 - m)) / blur(1 - m), a normalised convolution. What lay inside is gone
    and the surface around it runs on in."""
    kernel = gaussian_kernel(2 * int(3 * sigma + 0.5) + 1, sigma, x.device)
    outside = 1 - region
    summed, weight = blur(torch.cat([x * outside, outside], 1), kernel).split([x.shape[1], 1], 1)
    filled = summed / weight.clamp_min(1e-6)
    # beyond the kernel's reach of every outside pixel: the mean of all that lies outside
    mean_outside = (x * outside).sum((2, 3), keepdim=True) / outside.sum((2, 3), keepdim=True).clamp_min(1)
    filled = torch.where(weight > 1e-6, filled, mean_outside)
    return torch.where(region > 0, filled.clamp(0, 1), x)


def add_removed_blobs(clean, corrupted, share):
    """corrupted, where for a `share` of the images a blob (2-10 % of the image) is filled from its
    surroundings (σ 8 px at 128 px): a piece of the part taken away, as a missing component leaves
    the board beneath. Pasted pieces teach the model to take out what is foreign; these teach it
    to put back what is absent, which an autoencoder otherwise copies as it finds it."""
    k, size = len(clean), clean.shape[-1]
    chosen = (torch.rand(k) < share).to(clean.device)
    blob = smooth_noise_masks(k, size, torch.empty(k).uniform_(0.02, 0.1)).to(clean.device)[chosen]
    out = corrupted.clone()  # only the chosen images are filled: the blur is most of the cost
    out[chosen] = torch.where(blob > 0, fill_from_surroundings(clean[chosen], blob, 8 * size / 128), out[chosen])
    return out


# ----------------------------------------------------------------------------- one step, one epoch

@dataclass
class Stage:
    """One training stage as planned (epochs of steps_per_epoch steps in `passes` passes over the
    training set, peak lr) and where it stands (the next epoch, the steps taken, the best
    validation loss so far)."""

    index: int
    name: str
    epochs: int
    lr: float
    steps_per_epoch: int
    anomalies: bool  # its batches get synthetic anomalies (the model's anomaly_stages)
    keep_last: bool = False  # best.pt is its latest epoch, whatever its val loss (last_epoch_stages)
    passes: int = 1  # shuffled passes over the training set per epoch
    epoch: int = 0
    step: int = 0
    best_val: float = math.inf

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    def current_lr(self):
        # cosine decay from the peak to 0 over the stage: lr * (1 + cos(pi * step / total)) / 2
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(self.step / max(self.total_steps, 1), 1.0)))


# Every epoch ends in validation and two checkpoint writes (0.1-0.3 s here). Five training
# images make a pass over the set one step, and 2400 such epochs took 1.6x as long as 150 of 16
# passes (10.1 -> 7.5 min; RESULTS.md); so where the recipe sets the steps, an epoch holds as
# many passes as make this many steps (bottle's and metal_nut's 24-25 steps stay one pass).
MIN_EPOCH_STEPS = 16


# A fixed number of steps sees each image of a larger set fewer times: 2400 steps of batch 8 are
# 100 epochs of bottle's 188 training images but 67 of 288 screws at any angle and place, whose
# reconstructions then lose more of their threads. So the first stage runs at least the recipe's
# min_epochs passes over the set (DAE 100), but never more than MAX_STEPS_FACTOR times the
# recipe's steps, which keeps a large set within minutes. A screw-like stand-in, seeds 0 / 1:
# image AUROC 0.838 / 0.857 -> 0.875 / 0.865, F1 0.154 / 0.413 -> 0.373 / 0.588 (4.2 -> 5.8 min);
# 1018 solar cells at 1.5x the steps 0.805 -> 0.806 (at 2x 0.794); metal_nut 96 -> 100 epochs
# 0.997 / 0.984 / 0.947 -> 0.993 / 0.985 / 0.950, within its seeds' spread; bottle is 100 epochs
# either way (RESULTS.md, "A screw-like stand-in").
MAX_STEPS_FACTOR = 1.5


def first_stage_steps(steps, min_epochs, steps_per_pass):
    """The first stage's steps: the recipe's, raised to min_epochs passes over the training set,
    at most MAX_STEPS_FACTOR times the recipe's."""
    return min(max(steps, min_epochs * steps_per_pass), int(MAX_STEPS_FACTOR * steps))


def plan_stages(model, args, steps_per_pass, run_passes=None):
    """The model's stages, in order, with their peak lr and their epochs: as given (one pass
    each), else the recipe's steps (the first stage's raised by first_stage_steps) rounded up to
    whole epochs of at least MIN_EPOCH_STEPS steps. run_passes: a resumed run's passes per epoch
    of each stage, kept so that its epochs still count the steps they counted (an --epochs given
    on resume counts epochs of the run's length)."""
    def plan(i, name):
        lr = getattr(args, stage_option(i, name, "lr"))
        given = getattr(args, stage_option(i, name, "epochs"))
        steps = getattr(args, stage_option(i, name, "steps"))
        steps = first_stage_steps(steps, args.min_epochs, steps_per_pass) if i == 0 else steps
        passes = 1 if given else math.ceil(min(MIN_EPOCH_STEPS, steps) / steps_per_pass)  # never past `steps`
        passes = run_passes[i] if run_passes else passes
        epochs = given or math.ceil(steps / (passes * steps_per_pass))
        return Stage(i, name, epochs, lr, passes * steps_per_pass, anomalies=name in model.anomaly_stages,
                     keep_last=name in model.last_epoch_stages, passes=passes)
    return [plan(i, name) for i, name in enumerate(model.stages)]


def schedule_line(stage, args, n_train, steps_per_pass):
    """One line: how long the first stage runs, and why."""
    line = f"schedule: {stage.epochs} epochs, {stage.total_steps} steps"
    if args.epochs:
        return f"{line} (--epochs)"
    if first_stage_steps(args.steps, args.min_epochs, steps_per_pass) > args.steps:
        return (f"{line}: at least {args.min_epochs} passes over the {n_train} training images, at most "
                f"{MAX_STEPS_FACTOR:g}x the recipe's {args.steps} steps")
    return f"{line}: the recipe's {args.steps} steps"


def make_optimizer(model, stage, device):
    """AdamW over the stage's parameters, with everything else frozen; fused (one kernel for all
    parameters) on GPUs, CPUs keep the default implementation."""
    params = model.stage_parameters(stage.name)
    trainable = set(params)
    for p in model.parameters():
        p.requires_grad_(p in trainable)
    return torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0, fused=device.type == "cuda")


def backward_step(optimizer, total):
    """Gradients of `total`, clipped to a global norm of GRAD_CLIP, then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], GRAD_CLIP)
    optimizer.step()


def turn_grid(angle, shape, dtype=torch.float32):
    """Where each output pixel of a turn about the image centre by angle (B,) radians reads its
    input, as grid_sample coordinates (B, S, S, 2) in [-1, 1] inside the picture, beyond it outside."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps output to input coordinates: [[cos, -sin, 0], [sin, cos, 0]]
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return F.affine_grid(theta.to(dtype), list(shape), align_corners=False)


TURN_INTERPOLATION = "bicubic"  # calibrations record it: detect.py recomputes those made otherwise


def rotate(x, angle):
    """Each image of x (B, C, S, S) turned about its centre by its angle (B,) in radians,
    counter-clockwise as displayed; the corners are filled by reflection, so the model never sees
    black wedges that test images lack. Bicubic: a bilinear turn blurs (bottles turned and turned
    back keep 86 % of their gradient, bicubic 101 %), and a model trained on blurred parts learns
    to copy blur (33 metal_nut images, two splits: image AUROC 0.983 -> 0.993 and 0.981 -> 0.992,
    pixel AUROC 0.876 -> 0.885 and 0.874 -> 0.853)."""
    grid = turn_grid(angle, x.shape, x.dtype)
    return F.grid_sample(x, grid, mode=TURN_INTERPOLATION, padding_mode="reflection", align_corners=False)


def rotate_randomly(x):
    """x in [0, 1], each image at a random angle; bicubic overshoots a little at sharp edges."""
    return rotate(x, torch.rand(len(x), device=x.device) * 2 * math.pi).clamp(0, 1)


def move(x, rows, cols, max_shift):
    """Each image of x (B, C, S, S) moved by its own whole-pixel offset (rows[i], cols[i], each in
    [-max_shift, max_shift]; positive: the content moves up / left), the uncovered border filled
    by reflection. Whole pixels keep the images as sharp as they are; a sub-pixel shift would
    blur them."""
    size, m = x.shape[-1], max_shift
    padded = F.pad(x, [m] * 4, mode="reflect")
    return torch.stack([p[:, m + r:m + r + size, m + c:m + c + size] for p, r, c in zip(padded, rows, cols)])


def shift_randomly(x, max_shift):
    """Each image of x moved by its own random offset in [-max_shift, max_shift] along each axis."""
    rows, cols = (torch.randint(0, 2 * max_shift + 1, (2, len(x))) - max_shift).tolist()
    return move(x, rows, cols, max_shift)


# auto-rotation: measured on metal_nut (parts at random angles, DAE): 5 training images 0.615 ->
# 0.864 image AUROC with rotation; all 198 images 0.980 -> 0.907, pixel AUROC 0.962 -> 0.611:
# mirrored nuts pass. 30 images: 0.904 -> 0.990 (pixel AUROC 0.967 -> 0.846), so turning still
# pays there; 59 images: 0.986 -> 0.992, pixel AUROC 0.966 -> 0.884, twice the defects pass, so it
# stops between 30 and 59.
ROTATE_BELOW = 50
UNALIGNED_GAIN = 0.1  # measured gains: bottle 0.000, metal_nut 0.165-0.213, random blobs 0.055
# A round part seen from above (bottle) is aligned, yet its detail (the rim's reflections) lies at
# any angle, which a few images cannot show: turning five bottles took image AUROC 0.969 -> 0.993,
# good bottles flagged 6 -> 3 of 20; 33 bottles 17 -> 2 of 20 flagged, pixel AUROC 0.983 -> 0.971.
# All 188 bottles turned (bilinear) lost pixel AUROC (0.981 -> 0.956) and gained nothing.
SYMMETRIC_CORR = 0.9  # measured: bottle 0.965, metal_nut 0.366 (four lobes), random texture 0.36


def unit(x, weight=1.0):
    """Each grey image of x (B, 1, S, S), weighted, minus its mean and scaled to norm 1: then the
    sum of two images' product is their correlation."""
    x = (x - (x * weight).mean((2, 3), keepdim=True) / torch.as_tensor(weight).mean()) * weight
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None, None]


def grey(images, size):
    return F.interpolate(images.float().mean(1, keepdim=True), size=(size, size), mode="area")


def turned_by(x, k, turns):
    return rotate(x, torch.full((len(x),), 2 * math.pi * k / turns))


def alignment_gain(images, size=32, turns=24):
    """How much better each training image matches the next one when turned onto it: the mean
    over pairs of max_angle corr(turn(a), b) - corr(a, b), on grey 32 px copies. About 0 for
    aligned parts (already at their best match), large for parts at random angles."""
    x = unit(grey(images, size))
    other = x.roll(1, 0)
    corr = torch.stack([(unit(turned_by(x, k, turns)) * other).flatten(1).sum(1)
                        for k in range(turns)])  # (turns, images); turn 0 is the image as it lies
    return float((corr.max(0).values - corr[0]).mean())


def turn_symmetry(images, turns=24):
    """How alike the training images stay when turned about their centre: the lowest, over angles,
    of the mean corr(turn(a), a), inside the inscribed disc (the corners a turn fills by reflection
    are left out), on grey copies at full size (at 32 px a fine texture averages out to its
    lighting, which is round). Near 1 only for round parts seen from above."""
    x = grey(images, images.shape[-1])
    r = torch.linspace(-1, 1, x.shape[-1])
    disc = (r[:, None] ** 2 + r[None] ** 2 <= 1).float()
    a = unit(x, disc)
    return min(float((unit(turned_by(x, k, turns), disc) * a).flatten(1).sum(1).mean()) for k in range(1, turns))


def decide_rotation(mode, images):
    """(rotate or not, why) for --rotate auto|on|off, from the training images (uint8 N, C, S, S)."""
    if mode != "auto":
        return mode == "on", f"--rotate {mode}"
    if len(images) < 2:
        return False, "one training image: no angles to compare"
    gain = alignment_gain(images)
    lie = f"turning one image onto another raises their correlation by {gain:.3f}"
    if gain >= UNALIGNED_GAIN:
        if len(images) >= ROTATE_BELOW:
            return False, f"parts at random angles ({lie}), but {len(images)} training images cover the angles"
        return True, f"parts at random angles ({lie}) and only {len(images)} training images"
    if len(images) >= ROTATE_BELOW:
        return False, f"parts aligned ({lie} < {UNALIGNED_GAIN})"
    symmetry = turn_symmetry(images)
    alike = f"turned onto itself an image keeps a correlation of {symmetry:.3f}"
    if symmetry >= SYMMETRIC_CORR:
        return True, f"parts aligned but alike at any angle ({alike}) and only {len(images)} training images"
    return False, f"parts aligned ({lie} < {UNALIGNED_GAIN}; {alike} < {SYMMETRIC_CORR})"


# Moved blobs (add_moved_blobs) teach that structure out of line is a defect; measured to pay
# where every part lies the same way. DAE, mean of three seeds each (GPU, RESULTS.md), a blob on
# two thirds of the anomalous images: bottle 0.998 / 0.982 / 0.930 -> 1.000 / 0.985 / 0.937; on
# metal_nut, whose nuts lie at any angle, image AUROC 0.997 -> 0.985 (colour strokes 0.996 ->
# 0.976; blobs moved 16-32 px cost as much), so auto leaves them off where parts do not lie alike.
MOVED_SHARE = 2 / 3  # --moved on, for a model whose recipe has none
ALIKE_CORR = 0.9  # printed at 128 px: bottle 0.990, metal_nut 0.608


def lie_alike(images):
    """Mean correlation of each training image with the next, as they lie, on grey copies at full
    size (a fine texture does not average out to its lighting): near 1 only when every image
    shows the same thing at the same place."""
    x = unit(grey(images, images.shape[-1]))
    return float((x * x.roll(1, 0)).flatten(1).sum(1).mean())


def decide_moved(mode, model_name, images):
    """(share of anomalous images that get a moved blob, why) for --moved auto|on|off."""
    share = MODELS[model_name].recipe["moved"]
    if mode != "auto":
        return (share or MOVED_SHARE) if mode == "on" else 0.0, f"--moved {mode}"
    if not share:
        return 0.0, f"not part of {model_name}'s recipe"
    if len(images) < 2:
        return 0.0, "one training image: nothing to compare"
    corr = lie_alike(images)
    if corr >= ALIKE_CORR:
        return share, f"parts lie alike (neighbouring images correlate {corr:.3f} >= {ALIKE_CORR})"
    return 0.0, f"parts do not lie alike (neighbouring images correlate {corr:.3f} < {ALIKE_CORR})"


# A small part anywhere on a plain table (a screw) gets few of the --size pixels, and its thin
# defects fewer still. Where the parts do not lie alike and the largest spans little of the frame,
# each image is cut to a window ZOOM_MARGIN times that size, centred on its part (past the image's
# edge if need be, filled with more of its table), before it is resized (data.part_box): the part
# gets more pixels and always lies in the window's middle. Parts that lie alike keep the whole
# frame, where a part in the wrong place is itself a defect. Grey metal_nut images placed anywhere
# in a frame twice their size (seeds 0 / 1, image / pixel AUROC / AUPRO): whole frame 0.824 /
# 0.994 / 0.951, F1 0.000 and 0.814 / 0.994 / 0.948, F1 0.821; zoomed 0.957 / 0.983 / 0.910 and
# 0.950 / 0.981 / 0.903, F1 0.933 both (pixel figures of the windows; pasted back into the whole
# frame 0.995 / 0.976 and 0.995 / 0.974). Windows kept inside the image: 0.923, F1 0.158, a nut
# at the frame's edge off centre in its window setting the threshold (RESULTS.md).
ZOOM_MARGIN = 1.25  # room around the largest part: a part found a little off centre, a bent lead
ZOOM_MAX_SIDE = 0.75  # a larger window gains under 1.8x the pixels: not worth moving the part


# A long part at any angle (a screw) is more: the model must learn its every angle from a few
# hundred images, and a good part at a rarer angle comes back worse (its head, its tip) than a
# defective one at a common angle. Where the parts are long and their axes point every way, each
# window turns with its part's long axis (data.part_axis), heavier end first, so every part lies
# alike. Parts whose axes all point one way keep their angle: a part turned out of line is a defect.
TURN_ELONGATION = 2.0  # the median part's length over its width; a nut or a bottle seen from above: 1
TURN_ALIGNED = 0.5  # |mean of exp(2i angle)| of the parts' axes: 1 along one line, near 0 at any angle


def decide_turn(axes):
    """(turn or not, why) from each training part's part_axis (length, width, angle)."""
    length, width, angle = (np.array(v) for v in zip(*((a[2], a[3], a[4]) for a in axes)))
    elongation = float(np.median(length / np.maximum(width, 1e-6)))
    if elongation < TURN_ELONGATION:
        return False, f"parts not long ({elongation:.1f}x as long as wide < {TURN_ELONGATION:g})"
    aligned = float(np.abs(np.exp(2j * angle).mean()))
    if aligned >= TURN_ALIGNED:
        return False, f"long parts along one line (axes agree {aligned:.2f} >= {TURN_ALIGNED:g})"
    return True, f"long parts, {elongation:.1f}x as long as wide, at any angle (axes agree {aligned:.2f})"


def decide_zoom(mode, images):
    """(zoom or None, why) for --zoom auto|off from the training images (uint8 N, 3, S, S); zoom
    is {"side": the window's side as a fraction of the image's, "turn": whether the window turns
    with the part's long axis}."""
    if mode == "off":
        return None, "--zoom off"
    plain, share = data.plain_background(images)
    if not plain:
        return None, f"no plain background to find the part on (only {share:.0%} of the border on a smooth table)"
    if len(images) > 1 and lie_alike(images) >= ALIKE_CORR:
        return None, "parts lie alike: the whole frame shows a part out of place"
    parts = data.parts_of(images)[0]
    axes = [data.part_axis(part) for part in parts]
    turn, why_turn = decide_turn(axes) if len(images) > 1 else (False, "one training image")
    if turn:  # a turned window must hold the part along and across its axis
        largest = float(max(max(length, width) for _, _, length, width, _ in axes)) / images.shape[-1]
    else:
        largest = float(max(max(height, width) for _, _, height, width in map(data.part_span, parts)))
    side = ZOOM_MARGIN * largest
    if side >= ZOOM_MAX_SIDE:
        return None, f"parts fill the frame (the largest spans {largest:.0%} of it)"
    turned = f", turned with its part's long axis: {why_turn}" if turn else f"; not turned: {why_turn}"
    return ({"side": round(side, 4), "turn": turn},
            f"parts span at most {largest:.0%} of the frame, at changing places: each image is cut to "
            f"the {side:.0%} window around its part ({1 / side ** 2:.1f}x the pixels){turned}")


def train_step(net, optimizer, x, stage, args, perceptual=None):
    """One optimisation step on a batch x of clean images, at the stage's current lr and progress;
    returns the terms to log (on the device). With rotation on (args.rotate_used) the batch is
    first turned by random angles, then moved by up to args.shift pixels. In the model's
    anomaly_stages a share of the batch gets synthetic anomalies (args.anomaly_fraction) and the
    model is asked for x."""
    x = rotate_randomly(x) if args.rotate_used else x
    x = shift_randomly(x, args.shift) if args.shift else x
    inputs = (add_synthetic_anomalies(x, args.anomaly_fraction, moved=args.moved_share, removed=args.removed)
              if stage.anomalies else x)
    for group in optimizer.param_groups:
        group["lr"] = stage.current_lr()
    # --bf16: the network runs under autocast, the model keeps its image terms in float32
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.bf16):
        total, terms, _ = net(inputs, target=x, stage=stage.name, progress=stage.step / stage.total_steps,
                              perceptual=perceptual)
    backward_step(optimizer, total)
    stage.step += 1
    return {**terms, "loss": total}


def batches(images, sampler, per_rank, device, seed, passes=1):
    """This process's share of one epoch, batch by batch, as floats on the device: `passes`
    passes over the images, each shuffled anew (the first by `seed` itself)."""
    for p in range(passes):
        sampler.set_epoch(seed + 1_000_000_007 * p)
        order = list(sampler)
        for start in range(0, len(order), per_rank):
            yield data.to_float(images[order[start:start + per_rank]], device)


def train_epoch(net, optimizer, loader, stage, args, perceptual=None):
    """One pass over `loader`'s batches; returns the epoch mean of every logged term over every process."""
    net.train()
    sums, count = {}, 0
    distributed = dist.is_available() and dist.is_initialized()
    desc = f"{stage.name} {stage.epoch + 1}/{stage.epochs}"
    for x in tqdm(loader, desc=desc, total=stage.steps_per_epoch, leave=False,
                  disable=distributed and dist.get_rank() != 0):
        for k, v in train_step(net, optimizer, x, stage, args, perceptual).items():
            sums[k] = sums.get(k, 0) + v.detach()  # summed on the device; read back once per epoch
        count += 1
    if distributed:  # log means over every process's batches, not over rank 0's share
        packed = torch.stack([v.float() for v in sums.values()])  # same keys, same order per rank
        dist.all_reduce(packed)
        sums = dict(zip(sums, packed / dist.get_world_size()))
    return {k: float(v) / count for k, v in sums.items()}


@torch.inference_mode()
def validate(model, images, args, stage, device):
    """Validation loss of the current stage and reconstruction MSE, means over val images. The
    loss is the model's own terms (base_loss), without the image terms whose weight ramps up."""
    model.eval()
    loss_sum, mse_sum = 0.0, 0.0
    for start in range(0, len(images), args.batch_size):
        x = data.to_float(images[start:start + args.batch_size], device)
        loss_sum += float(model.base_loss(x, x, stage)[0]) * len(x)
        mse_sum += float((model.reconstruct(x) - x).pow(2).mean()) * len(x)
    return {"val_loss": loss_sum / len(images), "val_mse": mse_sum / len(images)}


@torch.inference_mode()
def save_pictures(model, val_images, out, seed, device):
    model.eval()
    x = data.to_float(val_images[:8], device)
    pairs = torch.cat([x, model.reconstruct(x)])
    samples = model.sample(16, torch.Generator().manual_seed(seed))
    for name, images, nrow in (("recon.png", pairs, len(x)), ("samples.png", samples, 8)):
        checks.write_atomic(os.path.join(out, name), lambda f: save_image(images, f, nrow=nrow, format="png"),
                            binary=True)


# ----------------------------------------------------------------------------- main

def load_data(args, rank, world, resume):
    """(split record, train, val): the train/val files, decoded once into memory (rank 0
    downloads, if asked, first). A resumed run keeps the split its checkpoint records; a new one
    records train/good as it is now, file by file, for its checkpoints (data.split_record)."""
    if rank == 0:
        data.ensure_category(args.data_root, args.category, args.download)
    if world > 1:
        dist.barrier()  # the other processes wait for rank 0's download
    split = (checks.split_of(resume, os.path.join(args.out, "checkpoint.pt"), args.data_root, args.category)
             if resume else data.split_record(args.data_root, args.category, args.val_fraction, args.seed))
    return (split, *train_and_val(args, split))


def train_and_val(args, split, zoom=None):
    """The recorded train and val files, decoded at --size (each cut to its part's window with zoom)."""
    return [data.load_split(args.data_root, args.category, which, args.size, zoom=zoom,
                            files=data.split_files(args.data_root, args.category, split, which))
            for which in ("train", "val")]


# Cameras that record 10 or 12 bits often store them in 16-bit files, which are read as 0..65535
# (data.to_rgb): 12 bits then come out as 0..16 of 255, nearly black and in 17 grey levels.
DIM_LEVEL = 16


def dim_warning(images):
    """A warning line when even the brightest pixel of the training images (uint8) is at most
    DIM_LEVEL, else None."""
    brightest = int(images.max())
    if brightest > DIM_LEVEL:
        return None
    return (f"warning: the training images are nearly black (their brightest pixel is {brightest} of 255): "
            "10- or 12-bit data in 16-bit files are read as 0..65535; scale them to their range first")


def load_perceptual(model, args, device, rank):
    """The LPIPS network the model's objective weighs, or None when it weighs none."""
    if not model.lpips_weight:
        return None
    losses.require_size(args.size)
    perceptual = losses.load_lpips(args.lpips_backbone, args.lpips_random_backbone).to(device)
    if perceptual.random_backbone and rank == 0:
        print("warning: the LPIPS term uses a RANDOMLY INITIALISED backbone; it is logged as "
              "'lpips_random' and is not LPIPS")
    return perceptual


def load_resume(args, device, model_config):
    """With --resume: the checkpoint to continue, read and checked against this run's settings
    before any data is read (checks.read_resume refuses a changed --size, --seed, ...); else None."""
    return checks.read_resume(args.out, vars(args), device, model_config) if args.resume else None


def save_epoch(model, optimizer, stage, terms, scores, seconds, rows, config, split):
    """Rank 0's files after an epoch: its metrics.csv row, checkpoint.pt, and best.pt when the
    validation loss improved (every epoch, in a stage.keep_last stage). config: the run's options
    (config["out"] is the folder); split: the train/val file record detect.py and evaluate.py use."""
    out = config["out"]
    rows.append({"stage_index": stage.index, "stage": stage.name, "epoch": stage.epoch, "step": stage.step,
                 "seconds": seconds, "lr": stage.current_lr(),
                 **{f"train_{k}": round(v, 6) for k, v in terms.items()},
                 **{k: round(v, 6) for k, v in scores.items()}})
    write_csv_atomic(rows, os.path.join(out, "metrics.csv"))
    ckpt = {"model_name": config["model"], "model_args": model.config,
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "stage_index": stage.index, "stage": stage.name, "epoch": stage.epoch, "step": stage.step,
            "best_val": min(stage.best_val, scores["val_loss"]), "val": scores, "config": config,
            "split": split}
    # best.pt first: checkpoint.pt records this epoch's val loss as the best so far, and a run
    # stopped between the two writes resumes from checkpoint.pt believing best.pt holds it
    if scores["val_loss"] < stage.best_val or stage.keep_last:
        save_atomic(ckpt, os.path.join(out, "best.pt"))
    save_atomic(ckpt, os.path.join(out, "checkpoint.pt"))


KEPT = "as the run being resumed was trained"


def settings_of_run(config):
    """{setting: (value, why)}: what a resumed run keeps of its own instead of deciding it again
    from the images (a threshold or a library that moved since could decide otherwise): its zoom
    window, rotation and moved blobs. A setting its config predates takes the value the run was
    trained with (whole images, windows that do not turn, no moved or removed blobs, a schedule
    without a floor); a config without rotate_used decides it anew. Removed blobs and the floor
    of a config that has them follow the run unless given (follow_run)."""
    kept = {k: (config[k], KEPT) for k in ("zoom_window", "rotate_used", "moved_share") if k in config}
    window = config.get("zoom_window")
    if "zoom_window" not in config:
        kept["zoom_window"] = (None, "the run being resumed was trained on whole images")
    elif window and "turn" not in window:
        kept["zoom_window"] = ({**window, "turn": False}, "the run being resumed was trained on windows that do not turn")
    for key in ("moved_share", "removed"):
        if key not in config:
            kept[key] = (0.0, "the run being resumed was trained without them")
    if "min_epochs" not in config:
        kept["min_epochs"] = (0, "the run being resumed was planned without a floor")
    return kept


def follow_run(args, ckpt):
    """On --resume, each schedule option and objective weight the command line leaves out
    (args.not_given) takes the run's value, not the recipe's: a plain --resume goes on as the run
    was planned, and one that sets --epochs or --lr changes only that."""
    was = {**ckpt["config"], **ckpt["model_args"]}
    for key in args.not_given:
        if key in was:
            setattr(args, key, was[key])


def main(argv=None):
    args = parse_args(argv)
    model_config = checks.check_model_config(args.model, model_args(args))  # before any data is read
    rank, world = setup_distributed()
    device = pick_device(args.device, rank)
    torch.manual_seed(args.seed)
    checks.claim_run_dir(args.out, args.resume, args.overwrite)  # a finished run is never replaced silently
    resume = load_resume(args, device, model_config)
    if resume:
        follow_run(args, resume)
    split, train, val = load_data(args, rank, world, resume)
    kept = settings_of_run(resume["config"]) if resume else {}
    args.zoom_window, why_zoom = kept.get("zoom_window") or decide_zoom(args.zoom, train.images)
    if args.zoom_window:
        train, val = train_and_val(args, split, args.zoom_window)
    args.rotate_used, why = kept.get("rotate_used") or decide_rotation(args.rotate, train.images)
    args.moved_share, why_moved = kept.get("moved_share") or decide_moved(args.moved, args.model, train.images)
    args.removed = kept.get("removed", (args.removed,))[0]
    args.min_epochs = kept.get("min_epochs", (args.min_epochs,))[0]
    model = make_model(args, device)
    perceptual = load_perceptual(model, args, device, rank)
    if args.overwrite and rank == 0:
        checks.clear_run(args.out)  # only now that the data and the model are ready
    if resume:
        checks.load_weights(model, resume, os.path.join(args.out, "checkpoint.pt"))
    metrics = os.path.join(args.out, "metrics.csv")
    rows = read_rows_until(metrics, resume["stage_index"], resume["epoch"]) if resume else []
    config = {**vars(args), "lpips_backbone_kind": None if perceptual is None else perceptual.name}
    if rank == 0:
        if warning := dim_warning(train.images):
            print(warning)
        if unused := unused_stage_options(args):
            print(f"note: {', '.join(unused)}: {args.model} has no such stage; ignored")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {n_params / 1e6:.2f} M parameters, {len(train)} train / {len(val)} val "
              f"images at {args.size} px, device {device}{' with bf16 autocast' if args.bf16 else ''}, "
              f"{world} process(es)")
        print(f"zoom {'on' if args.zoom_window else 'off'}: {why_zoom}")
        print(f"rotation augmentation {'on' if args.rotate_used else 'off'}: {why}")
        moved = f"on ({args.moved_share:.2f} of the anomalous images)" if args.moved_share else "off"
        print(f"moved-structure anomalies {moved}: {why_moved}")
        print(f"removed-part anomalies {f'on ({args.removed:.2f} of the anomalous images)' if args.removed else 'off'}")

    sampler = DistributedSampler(range(len(train)), world, rank, shuffle=True, seed=args.seed)
    per_rank = max(1, args.batch_size // world)
    steps_per_pass = math.ceil(len(sampler) / per_rank)
    stages = plan_stages(model, args, steps_per_pass, resume and resume["config"].get("stage_passes"))
    config["stage_passes"] = [stage.passes for stage in stages]
    if rank == 0:
        print(schedule_line(stages[0], args, len(train), steps_per_pass))
    for stage in stages:
        if resume and stage.index < resume["stage_index"]:
            continue
        optimizer = make_optimizer(model, stage, device)
        net = DistributedDataParallel(model) if world > 1 else model
        net = torch.compile(net) if args.compile else net
        if resume and stage.index == resume["stage_index"]:
            optimizer.load_state_dict(resume["optimizer_state"])
            stage.epoch, stage.step, stage.best_val = resume["epoch"] + 1, resume["step"], resume["best_val"]
        clock = started = time.time()
        epochs_run = 0
        while stage.epoch < stage.epochs:
            seed = epoch_seed(args.seed, stage.index, stage.epoch)
            torch.manual_seed(seed + rank)  # synthetic anomalies, dropout, the posterior's noise
            loader = batches(train.images, sampler, per_rank, device, seed, stage.passes)  # shuffled by seed
            terms = train_epoch(net, optimizer, loader, stage, args, perceptual)
            check_finite(terms, stage.name, stage.epoch)
            if rank == 0:
                scores = validate(model, val.images, args, stage.name, device)
                # since the previous epoch's seconds, so its checkpoint writes and pictures count
                # too: the column adds up to the stage's wall time
                seconds, clock = round(time.time() - clock, 2), time.time()
                save_epoch(model, optimizer, stage, terms, scores, seconds, rows, config, split)
                if (stage.epoch + 1) % 10 == 0 or stage.epoch + 1 == stage.epochs:
                    save_pictures(model, val.images, args.out, args.seed, device)
                epochs_run += 1
                left = time_left(time.time() - started, epochs_run, stage.epochs - stage.epoch - 1)
                print(f"{stage.name} epoch {stage.epoch + 1}/{stage.epochs}  " + "  ".join(
                    f"{k} {v:.4g}" for k, v in {**terms, **scores}.items()) + f"  ({seconds:.1f}s, {left})")
                stage.best_val = min(stage.best_val, scores["val_loss"])
            stage.epoch += 1
        resume = None
    if rank == 0:
        print(f"done: {args.out}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (data.DatasetError, losses.LPIPSUnavailable, FloatingPointError, ValueError, checks.RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if (Path(parse_args().out) / "checkpoint.pt").is_file():
            sys.exit("interrupted: the last finished epoch is in checkpoint.pt; continue with --resume")
        sys.exit("interrupted before the first epoch was saved: nothing to resume; run it again")
