"""Train one autoencoder on the defect-free images of one MVTec AD category.

    python train.py --model dae --category bottle --data-root data/mvtec_ad
    torchrun --nproc_per_node=2 train.py --model vqvae --category bottle   # several processes

Writes to --out (default outputs/<category>/<model>/):
    checkpoint.pt   latest state (model args + weights + optimizer + stage/epoch/step + config),
                    written atomically every epoch; --resume continues from it
    best.pt         the epoch with the lowest validation loss of the last stage
    metrics.csv     one row per epoch: every loss term, validation loss and reconstruction MSE
    recon.png       validation images (top row) and their reconstructions (bottom row)
    samples.png     draws from the model's prior
"""
import argparse
import csv
import inspect
import math
import os
import sys
import time
from pathlib import Path

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
from models import MODELS, build_model

# Per-model training defaults. Every default run on bottle at 128 px takes < 10 min on 2 CPU cores.
# All restore synthetic anomalies (anomaly_fraction) with an SSIM term; the DAE, the detector,
# keeps a spatial latent for sharp reconstructions, the VAEs a global one for sampling.
DETECTION = dict(anomaly_fraction=0.5, ssim_weight=1.0)
RECIPES = {
    "dae":      dict(epochs=300, lr=1e-3, bottleneck="spatial", latent_dim=2048, **DETECTION),
    "beta_vae": dict(epochs=250, lr=1e-3, **DETECTION),
    "savae":    dict(epochs=200, lr=1e-3, prior_epochs=30, prior_lr=1e-2, **DETECTION),
    "ar_savae": dict(epochs=160, lr=1e-3, prior_epochs=30, prior_lr=1e-2, lpips_weight=1.0, **DETECTION),
    "vqvae":    dict(epochs=40, lr=1e-3, prior_epochs=40, prior_lr=1e-3, **DETECTION),
}


def parse_args(argv=None):
    recipes = "\n".join(f"  {name:9s} " + ", ".join(f"{k}={v}" for k, v in r.items())
                         for name, r in RECIPES.items())
    p = argparse.ArgumentParser(description="Train an autoencoder on one MVTec AD category.",
                                epilog=f"recipes (defaults per model):\n{recipes}",
                                formatter_class=data.HelpFormatter)
    p.add_argument("--model", required=True, choices=list(MODELS))
    p.add_argument("--category", required=True, type=checks.category_name, help="MVTec AD category, e.g. bottle")
    p.add_argument("--data-root", default=data.DEFAULT_ROOT, help="folder holding the categories")
    p.add_argument("--download", action="store_true", help="download MVTec AD if the category is missing")
    p.add_argument("--size", type=checks.positive_int, default=128,
                   help="image side in pixels; a 256 px epoch costs about 4.4x a 128 px one (DAE on CPU)")
    p.add_argument("--epochs", type=checks.positive_int, help="autoencoder epochs (default: the model's recipe)")
    p.add_argument("--prior-epochs", type=checks.positive_int, help="epochs of the second stage: the prior (SAVAE, AR-SAVAE, VQ-VAE)")
    p.add_argument("--prior-lr", type=checks.positive_float, help="peak learning rate of the prior stage (default: recipe)")
    p.add_argument("--batch-size", type=checks.positive_int, default=16, help="total over all processes")
    p.add_argument("--lr", type=checks.positive_float, help="peak learning rate, cosine-decayed (default: recipe)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0)
    p.add_argument("--val-fraction", type=checks.open_fraction, default=0.1, help="train/good held out for validation")
    p.add_argument("--device", type=checks.device_name, default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", help="output folder (default outputs/<category>/<model>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (deleted first); without it, or --resume, "
                        "an existing run is never touched")
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (the first steps compile)")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the forward pass (pays where the hardware has bf16 units: "
                        "recent GPUs and CPUs; bench.py --profile measures it)")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=checks.positive_int, help="latent vector size (dae, beta_vae, savae)")
    g.add_argument("--width", type=checks.positive_int, help="channels of the first conv layer (not vqvae)")
    g.add_argument("--bottleneck", choices=["vector", "spatial"],
                   help="latent layout of dae/beta_vae/savae (default: recipe)")
    g.add_argument("--beta", type=checks.non_negative_float, help="KL weight (VAEs) or commitment weight (VQ-VAE)")
    g.add_argument("--no-ema", action="store_true", help="VQ-VAE: learn the codebook by gradient")
    g = p.add_argument_group("defect-detection recipe")
    g.add_argument("--anomaly-fraction", type=checks.unit_fraction,
                   help="fraction of each batch given synthetic anomalies to restore (default: recipe)")
    g = p.add_argument_group("extra loss terms")
    g.add_argument("--ssim-weight", type=checks.non_negative_float, help="weight of 1 - SSIM (default: recipe)")
    g.add_argument("--ssim-warmup", type=checks.unit_fraction, default=0.1,
                   help="fraction of the first stage over which the SSIM weight ramps up from 0; with "
                        "the full weight from step 0 the model sits at the mean image for epochs")
    g.add_argument("--lpips-weight", type=checks.non_negative_float, help="weight of LPIPS (default: recipe)")
    g.add_argument("--lpips-backbone", help=f"local AlexNet weights file (or ${losses.LPIPS_BACKBONE_ENV})")
    g.add_argument("--lpips-random-backbone", action="store_true",
                   help="allow a randomly initialised LPIPS backbone (logged as lpips_random)")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model]
    for key in ("epochs", "lr", "prior_epochs", "prior_lr", "lpips_weight", "anomaly_fraction", "ssim_weight"):
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, 0))
    for key in ("bottleneck", "latent_dim"):  # model arguments: None leaves the model's default
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key))
    args.out = args.out or str(Path("outputs") / args.category / args.model)
    return args


def model_args(args):
    """Constructor arguments given on the command line that the chosen model accepts."""
    given = {"image_size": args.size, "latent_dim": args.latent_dim, "width": args.width,
             "beta": args.beta, "ema": False if args.no_ema else None, "bottleneck": args.bottleneck}
    cls = MODELS[args.model]
    accepted = {name for klass in cls.__mro__ if "__init__" in vars(klass)
                for name in inspect.signature(klass.__init__).parameters}
    return {k: v for k, v in given.items() if v is not None and k in accepted}


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


def pick_device(name, rank):
    if name == "auto":
        name = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def epoch_seed(seed, stage_index, epoch):
    # every epoch's randomness derives from (seed, stage, epoch): resuming replays it exactly
    return seed * 1_000_003 + stage_index * 10_007 + epoch


def save_atomic(obj, path):
    checks.write_atomic(path, lambda f: torch.save(obj, f), binary=True)  # a full disk: one line


def write_csv_atomic(rows, path):
    header = list(dict.fromkeys(k for row in rows for k in row))

    def write(f):
        writer = csv.DictWriter(f, header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    checks.write_atomic(path, write)


def read_rows_until(path, stage_index, epoch):
    """Rows of an earlier run up to the checkpoint, so a resumed run appends after them."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)
                if (int(r["stage_index"]), int(r["epoch"])) <= (stage_index, epoch)]


def cosine_lr(base_lr, step, total_steps):
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


def warmup_ramp(step, fraction, total_steps):
    """0 -> 1 linearly over the first `fraction` of the steps, then 1 (fraction 0: always 1)."""
    return 1.0 if fraction <= 0 else min(1.0, step / (fraction * total_steps))


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
    cut = field.sort(dim=1).values.gather(1, rank[:, None])  # per-image quantile
    return (field > cut).float().view(n, 1, size, size)


def add_synthetic_anomalies(x, fraction):
    """Paste shifted, recoloured pieces of other training images through smooth-noise masks into
    the first `fraction` of the batch; the model is trained to output the clean image (restoration,
    as in DRAEM's reconstructive network, with patches from normal images as in NSA: no outside
    data; the random colour gain and offset make a patch foreign even where it lands on the same
    kind of surface)."""
    k = int(round(fraction * len(x)))
    if k == 0 or len(x) < 2:
        return x
    size = x.shape[-1]
    mask = smooth_noise_masks(k, size, torch.empty(k).uniform_(0.01, 0.1)).to(x.device)
    donors = x.roll(1, dims=0)[:k]  # another image of the batch ...
    shift = torch.randint(-size // 4, size // 4 + 1, (2,)).tolist()
    donors = donors.roll(shift, dims=(2, 3))  # ... from another place, so the patch looks foreign
    channels = 1 if torch.equal(x[:, :1].expand_as(x), x) else x.shape[1]  # grey stays grey
    gain = torch.empty(k, channels, 1, 1).uniform_(0.5, 1.5).to(x.device)  # recoloured, so that
    offset = torch.empty(k, channels, 1, 1).uniform_(-0.2, 0.2).to(x.device)  # stains count too
    donors = (donors * gain + offset).clamp(0, 1)
    opacity = torch.empty(k, 1, 1, 1).uniform_(0.5, 1.0).to(x.device)
    corrupted = x[:k] * (1 - opacity * mask) + donors * opacity * mask
    return torch.cat([corrupted, x[k:]])


# ----------------------------------------------------------------------------- one epoch

def train_epoch(net, images, sampler, optimizer, args, stage, state, total_steps,
                perceptual, device, rank):
    """One pass over the training images; returns the epoch mean of every logged term."""
    net.train()
    order = list(sampler)
    per_rank = max(1, args.batch_size // state["world"])
    sums, batches = {}, 0
    bar = tqdm(range(0, len(order), per_rank), desc=f"{stage} {state['epoch'] + 1}/{state['epochs']}",
               leave=False, disable=rank != 0)
    for start in bar:
        x = data.to_float(images[order[start:start + per_rank]], device)
        inputs = add_synthetic_anomalies(x, args.anomaly_fraction) if stage == "autoencoder" else x
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(state["lr"], state["step"], total_steps)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):  # the network only
            total, terms, recon = net(inputs, target=x, stage=stage)
        recon = None if recon is None else recon.float()  # image losses need fp32's small constants
        if recon is not None and args.ssim_weight:
            terms["ssim"] = losses.ssim_loss(recon, x)
            ramp = warmup_ramp(state["step"], args.ssim_warmup, total_steps)
            total = total + ramp * args.ssim_weight * terms["ssim"]
        if recon is not None and perceptual is not None:
            terms[perceptual.name] = perceptual.distance(recon, x).mean()
            total = total + args.lpips_weight * terms[perceptual.name]
        terms["loss"] = total
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 5.0)
        optimizer.step()
        state["step"] += 1
        for k, v in terms.items():  # summed on the device; read back once per epoch
            sums[k] = sums.get(k, 0) + v.detach()
        batches += 1
    if state["world"] > 1:  # log means over every process's batches, not over rank 0's share
        packed = torch.stack([v.float() for v in sums.values()])  # same keys, same order per rank
        dist.all_reduce(packed)
        sums = dict(zip(sums, packed / state["world"]))
    return {k: float(v) / batches for k, v in sums.items()}


@torch.inference_mode()
def validate(model, images, args, stage, device):
    """Validation loss of the current stage and reconstruction MSE, means over val images."""
    model.eval()
    loss_sum, mse_sum = 0.0, 0.0
    for start in range(0, len(images), args.batch_size):
        x = data.to_float(images[start:start + args.batch_size], device)
        loss_sum += float(model.loss(x, stage=stage)[0]) * len(x)
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

def main(argv=None):
    args = parse_args(argv)
    checks.check_model_config(args.model, model_args(args))  # before any data is read
    rank, world = setup_distributed()
    device = pick_device(args.device, rank)
    torch.manual_seed(args.seed)
    checks.claim_run_dir(args.out, args.resume, args.overwrite)
    resume = checks.read_resume(args.out, vars(args), device) if args.resume else None
    if rank == 0:
        data.ensure_category(args.data_root, args.category, args.download)
    if world > 1:
        dist.barrier()  # the other processes wait for rank 0's download
    split = (checks.split_of(resume, os.path.join(args.out, "checkpoint.pt"), args.data_root, args.category)
             if resume else data.split_record(args.data_root, args.category, args.val_fraction, args.seed))
    train = data.load_split(args.data_root, args.category, "train", args.size,
                            files=data.split_files(args.data_root, args.category, split, "train"))
    val = data.load_split(args.data_root, args.category, "val", args.size,
                          files=data.split_files(args.data_root, args.category, split, "val"))
    model = make_model(args, device)
    perceptual = None
    if args.lpips_weight > 0:
        perceptual = losses.load_lpips(args.lpips_backbone, args.lpips_random_backbone).to(device)
        if perceptual.random_backbone and rank == 0:
            print("warning: the LPIPS term uses a RANDOMLY INITIALISED backbone; it is logged as "
                  "'lpips_random' and is not LPIPS")
    os.makedirs(args.out, exist_ok=True)
    if args.overwrite and rank == 0:
        checks.clear_run(args.out)
    ckpt_path, best_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "best.pt")
    metrics_path = os.path.join(args.out, "metrics.csv")

    if resume:
        checks.load_weights(model, resume, ckpt_path)
    rows = read_rows_until(metrics_path, resume["stage_index"], resume["epoch"]) if resume else []
    config = {k: v for k, v in vars(args).items()}
    config["lpips_backbone_kind"] = None if perceptual is None else perceptual.name
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model}: {n_params / 1e6:.2f} M parameters, {len(train)} train / {len(val)} val "
              f"images at {args.size} px, device {device}, {world} process(es)")

    for stage_index, stage in enumerate(model.stages):
        epochs, lr = (args.epochs, args.lr) if stage_index == 0 else (args.prior_epochs, args.prior_lr)
        if resume and stage_index < resume["stage_index"]:
            continue
        params = model.stage_parameters(stage)
        trainable = set(params)
        for p in model.parameters():  # freeze what this stage does not train
            p.requires_grad_(p in trainable)
        net = DistributedDataParallel(model) if world > 1 else model
        net = torch.compile(net) if args.compile else net
        # fused: one kernel for all parameters on GPUs; CPUs keep the default implementation
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
        state = {"epoch": 0, "epochs": epochs, "lr": lr, "step": 0, "world": world, "best_val": math.inf}
        if resume and stage_index == resume["stage_index"]:
            optimizer.load_state_dict(resume["optimizer_state"])
            state.update(epoch=resume["epoch"] + 1, step=resume["step"], best_val=resume["best_val"])
        sampler = DistributedSampler(range(len(train)), world, rank, shuffle=True, seed=args.seed)
        per_rank = max(1, args.batch_size // world)
        total_steps = epochs * math.ceil(len(sampler) / per_rank)
        while state["epoch"] < epochs:
            epoch, t0 = state["epoch"], time.time()
            torch.manual_seed(epoch_seed(args.seed, stage_index, epoch) + rank)
            sampler.set_epoch(epoch_seed(args.seed, stage_index, epoch))
            terms = train_epoch(net, train.images, sampler, optimizer, args, stage, state,
                                total_steps, perceptual, device, rank)
            check_finite(terms, stage, epoch)
            if rank == 0:
                scores = validate(model, val.images, args, stage, device)
                row = {"stage_index": stage_index, "stage": stage, "epoch": epoch, "step": state["step"],
                       "seconds": round(time.time() - t0, 2), "lr": cosine_lr(lr, state["step"], total_steps),
                       **{f"train_{k}": round(v, 6) for k, v in terms.items()},
                       **{k: round(v, 6) for k, v in scores.items()}}
                rows.append(row)
                write_csv_atomic(rows, metrics_path)
                ckpt = {"model_name": args.model, "model_args": model.config,
                        "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                        "stage_index": stage_index, "stage": stage, "epoch": epoch, "step": state["step"],
                        "best_val": min(state["best_val"], scores["val_loss"]), "val": scores,
                        "config": config, "split": split}
                save_atomic(ckpt, ckpt_path)
                if scores["val_loss"] < state["best_val"]:
                    save_atomic(ckpt, best_path)
                if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
                    save_pictures(model, val.images, args.out, args.seed, device)
                print(f"{stage} epoch {epoch + 1}/{epochs}  " + "  ".join(
                    f"{k} {v:.4g}" for k, v in {**terms, **scores}.items()) + f"  ({row['seconds']:.1f}s)")
            state["best_val"] = min(state["best_val"], scores["val_loss"]) if rank == 0 else state["best_val"]
            state["epoch"] += 1
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
        sys.exit("interrupted: the last finished epoch is in checkpoint.pt; continue with --resume")
