"""Measure how well each trained model generates and reconstructs the normal images of a category.

    python evaluate.py --category bottle                       # every trained model of bottle
    python evaluate.py --category bottle --models dae vqvae --num-samples 1000
    python evaluate.py --category all --no-generation          # offline: reconstruction only

Generation: --num-samples draws from each model's prior (the VQ-VAE's learned code prior) are saved
as PNG in <runs>/eval/<category>/<model>/gen/ and compared with the category's train/good
images at the model's resolution (written once to <runs>/eval/<category>/reference_<size>/):
FID, Inception Score (mean and std over 10 splits) and KID (mean and std over 100 subsets of
min(1000, N, reference) images), all by torch_fidelity.calculate_metrics.
Reconstruction: MSE, SSIM and LPIPS between the held-out normal images (val split and test/good)
and their reconstructions, means over images. SSIM is the mean of models.ssim_map over every
pixel, the 5 px next to the border included (filled by reflection there), so it reads higher
than implementations that leave the border out (LPIPS: from 31 px).

Writes <runs>/gen_eval_summary.csv, one row per (category, model), replaced in place when a
model is evaluated again, and prints the rows of the evaluated categories as a table.

Offline: FID/IS/KID need torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth,
downloaded into the torch hub cache when online). Pass a local copy with --inception-weights PATH
or $INCEPTION_WEIGHTS; its SHA-256 is checked. LPIPS needs torchvision's AlexNet weights
(--lpips-backbone or $LPIPS_BACKBONE); without them the lpips column stays empty.
Numbers from other networks (a test's random Inception, --lpips-random-backbone) are only ever
written under their own column names (fid_unofficial, ..., lpips_random), never as fid or lpips.
"""
import csv
import functools
import os
import shutil
import sys
from pathlib import Path

import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from tqdm import tqdm

import checks
import data
import losses
from models import MODELS, ssim_map
from train import add_shared_options, pick_device, run_dir, trained_checkpoint, write_csv_atomic

INCEPTION_ENV = "INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# the address torch-fidelity 0.4 itself downloads from (feature_extractor_inceptionv3.URL_INCEPTION_V3)
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_HELP = (
    f"FID/IS/KID need torch-fidelity's Inception weights {INCEPTION_FILE} (downloaded automatically "
    f"when online from {INCEPTION_URL}); offline, fetch it on a machine with network, then pass "
    f"--inception-weights PATH or set {INCEPTION_ENV}=PATH, or use --no-generation for reconstruction "
    "metrics only")

SUMMARY_FILE = "gen_eval_summary.csv"
GENERATION = ["fid", "isc_mean", "isc_std", "kid_mean", "kid_std"]
UNOFFICIAL = [f"{c}_unofficial" for c in GENERATION]
COLUMNS = ["category", "model", "resolution", "num_samples", "reference_images", "seed",
           *GENERATION, *UNOFFICIAL, "kid_subset_size",
           "recon_images", "mse", "ssim", "lpips", "lpips_random", "checkpoint"]
# always in the header, even when empty, so every summary has the same comparable columns
ALWAYS = [c for c in COLUMNS if c not in UNOFFICIAL and c != "lpips_random"]


class EvaluationError(Exception):
    """A problem the user can fix (missing checkpoint, weights, ...). Printed as one line."""


def parse_args(argv=None):
    p = data.ArgumentParser(description="FID / IS / KID of samples and reconstruction MSE / SSIM / "
                                        "LPIPS of trained models, into one summary table.")
    add_shared_options(p, "MVTec AD category, or 'all' for every category with trained models; "
                          "results go to <runs>/eval/ and <runs>/gen_eval_summary.csv")
    p.add_argument("--models", nargs="+", choices=list(MODELS),
                   help="models to evaluate (default: every trained one)")
    p.add_argument("--data-root", help="folder holding the categories (default: the checkpoint's "
                                       f"training data root, else {data.DEFAULT_ROOT})")
    p.add_argument("--num-samples", type=int, default=1000, help="samples drawn per model (N)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch for sampling, reconstruction and Inception (samples depend on it and --seed)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0, help="seeds sampling and the IS/KID subsets")
    p.add_argument("--no-generation", action="store_true",
                   help="reconstruction metrics only (no samples, no Inception weights needed)")
    p.add_argument("--inception-weights", help=f"local {INCEPTION_FILE} (or ${INCEPTION_ENV})")
    p.add_argument("--allow-unofficial-inception", action="store_true",
                   help="accept Inception weights whose SHA-256 is not the official file's (tests); "
                        "their numbers go to the *_unofficial columns, never to fid/isc/kid")
    p.add_argument("--lpips-backbone",
                   help=f"local AlexNet weights alexnet-owt-7be5be79.pth (or ${losses.LPIPS_BACKBONE_ENV})")
    p.add_argument("--lpips-random-backbone", action="store_true",
                   help="LPIPS with a randomly initialised backbone (tests); written as lpips_random, not lpips")
    args = p.parse_args(argv)
    if args.num_samples < 10:
        p.error("--num-samples must be at least 10 (the Inception Score uses 10 splits)")
    if args.num_samples < 1000 and not args.no_generation:
        print(f"note: --num-samples {args.num_samples}: the Inception Score averages 10 splits of "
              f"{args.num_samples // 10} samples (at 1 sample a split it is exactly 1), and FID is "
              "biased upward with few samples; 1000 or more for figures to compare")
    if args.batch_size < 1:
        p.error("--batch-size must be positive")
    return args


# ----------------------------------------------------------------------------- finding things

def find_jobs(runs, category, wanted):
    """(category, model, checkpoint path) for every model to evaluate, in MODELS order."""
    runs = Path(runs)
    if category == "all":
        categories = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    else:
        categories = [category]
    jobs = []
    for cat in categories:
        found = {m: trained_checkpoint(run_dir(runs, cat, m)) for m in MODELS}
        found = {m: path for m, path in found.items() if path is not None}
        missing = [m for m in wanted or [] if m not in found]
        if missing and category != "all":
            raise EvaluationError(
                f"no checkpoint for {', '.join(missing)} in '{runs / cat}' (trained there: "
                f"{', '.join(found) or 'none'}); train with: python train.py --model {missing[0]} "
                f"--category {cat}")
        jobs += [(cat, m, path) for m, path in found.items() if not wanted or m in wanted]
    if not jobs:
        raise EvaluationError(f"no trained models for category '{category}' under '{runs}' (looked "
                              f"for <category>/<model>/best.pt or checkpoint.pt); train one with train.py")
    return jobs


def first_line(e):
    return (str(e).splitlines() or [""])[0][:200]


def locate_inception(path, allow_unofficial):
    """Path of usable Inception weights and whether they are the official ones, checked before any
    sampling. Order: --inception-weights, $INCEPTION_WEIGHTS, the torch hub cache (where
    torch-fidelity keeps its own download), else download there. Raises EvaluationError."""
    path = path or os.environ.get(INCEPTION_ENV)
    if path and not os.path.isfile(path):
        raise EvaluationError(f"Inception weights file '{path}' not found; {INCEPTION_HELP}")
    if not path:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, hash_prefix=INCEPTION_SHA256)
            except Exception as e:  # no network surfaces as URLError, OSError, RuntimeError, ...
                raise EvaluationError(f"could not download the Inception weights ({type(e).__name__}: "
                                      f"{first_line(e)}); {INCEPTION_HELP}") from None
    official = data.sha256_of(path) == INCEPTION_SHA256
    if not official and not allow_unofficial:
        raise EvaluationError(
            f"'{path}' is not the official {INCEPTION_FILE} (SHA-256 differs from {INCEPTION_SHA256[:16]}...), "
            f"so its FID/IS/KID would not be comparable; {INCEPTION_HELP}")
    try:  # build the extractor once now, so a wrong file fails here and not after sampling
        FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    except Exception as e:
        raise EvaluationError(f"'{path}' cannot be loaded as torch-fidelity's InceptionV3 "
                              f"({type(e).__name__}: {first_line(e)}); {INCEPTION_HELP}") from None
    return path, official


def load_perceptual(args):
    """LPIPS, or None (one note printed) when its weights cannot be had without being asked for."""
    try:
        return losses.load_lpips(args.lpips_backbone, args.lpips_random_backbone)
    except losses.LPIPSUnavailable as e:
        if args.lpips_backbone or os.environ.get(losses.LPIPS_BACKBONE_ENV):
            raise  # a backbone file was named: failing to use it is an error, not a note
        print(f"note: the lpips column is left empty: {e}")
        return None


# ----------------------------------------------------------------------------- images

def save_png(image_uint8, path):
    Image.fromarray(image_uint8.permute(1, 2, 0).numpy()).save(path)


def to_uint8(x):
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def ensure_reference(root, category, size, folder, zoom=None):
    """Write every train/good image at `size` px (cut to its part's window, for a zoomed run) as
    PNG into `folder` once; returns the count.

    Reused when it already holds exactly those files; written to a temporary folder and renamed,
    so an interrupted run never leaves a partial reference that looks complete."""
    sources = data.image_files(data.category_dir(root, category) / "train" / "good")
    names = sorted(f"{Path(p).stem}.png" for p in sources)
    if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == names:
        return len(names)
    # val_fraction 0: the 'train' split is then all of train/good (train + val)
    split = data.load_split(root, category, "train", size, val_fraction=0.0, zoom=zoom)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for image, path in zip(split.images, split.paths):
        save_png(image, tmp / f"{Path(path).stem}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return len(split)


@torch.inference_mode()
def save_samples(model, n, batch_size, seed, folder, desc):
    """n draws from the model's prior as PNG; the generator makes them reproducible."""
    shutil.rmtree(folder, ignore_errors=True)  # samples of an earlier, larger N must not be counted
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        images = to_uint8(model.sample(min(batch_size, n - start), generator))
        for i, image in enumerate(images, start):
            save_png(image, folder / f"{i:05d}.png")


@functools.lru_cache(maxsize=4)  # models of one category share these images: decode them once
def held_out_normal(root, category, size, val_files, zoom=None):
    """Normal images the model never trained on: its val files (as recorded in training) and
    test/good. zoom: a zoomed run's window as (side, turn) pairs, so the cache can key on it."""
    zoom = None if zoom is None else dict(zoom)
    test = data.load_split(root, category, "test", size, zoom=zoom)
    parts = [test.images[test.labels == 0]]
    if val_files:
        parts.append(data.load_split(root, category, "val", size, files=list(val_files), zoom=zoom).images)
    images = torch.cat(parts)
    if len(images) == 0:
        raise EvaluationError(f"category '{category}' has no val or test/good images to reconstruct")
    return images


# ----------------------------------------------------------------------------- metrics

@torch.inference_mode()
def reconstruction_metrics(model, images, batch_size, device, perceptual):
    """Means over images of per-image MSE, SSIM and (when available) LPIPS."""
    sums = {}
    for start in range(0, len(images), batch_size):
        x = data.to_float(images[start:start + batch_size], device)
        recon = model.reconstruct(x)
        per_image = {"mse": (recon - x).pow(2).flatten(1).mean(1),
                     "ssim": ssim_map(recon, x).flatten(1).mean(1)}
        if perceptual is not None:
            per_image[perceptual.name] = perceptual(recon, x)
        for k, v in per_image.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    return {"recon_images": len(images), **{k: v / len(images) for k, v in sums.items()}}


def fidelity_metrics(gen_dir, ref_dir, n_gen, n_ref, weights, official, cuda, batch_size, seed):
    """FID, IS and KID of the generated folder against the reference folder."""
    subset = min(1000, n_gen, n_ref)
    try:
        m = torch_fidelity.calculate_metrics(
            input1=str(gen_dir), input2=str(ref_dir), isc=True, fid=True, kid=True,
            kid_subset_size=subset, feature_extractor_weights_path=weights, cuda=cuda,
            batch_size=batch_size, rng_seed=seed,
            cache=False,  # its cache is keyed by input name, not by weights: never reuse features
            save_cpu_ram=True,  # no DataLoader worker processes: decoding PNGs is cheap next to Inception
            verbose=False)
    except Exception as e:  # keep torch-fidelity's deep tracebacks away from the user
        raise EvaluationError(f"torch-fidelity failed on '{gen_dir}' against '{ref_dir}' "
                              f"({type(e).__name__}: {first_line(e)})") from None
    values = [m["frechet_inception_distance"], m["inception_score_mean"], m["inception_score_std"],
              m["kernel_inception_distance_mean"], m["kernel_inception_distance_std"]]
    names = GENERATION if official else UNOFFICIAL
    return {**dict(zip(names, values)), "kid_subset_size": subset}


def load_job(path, name, device):
    """The checkpoint of <category>/<name>/, checked (one line for a broken or foreign file)."""
    return checks.load_checkpoint(path, device, expected=name,
                                  advice=f"it sits in the '{name}' folder; move it to its own model's folder",
                                  use_hint="move the broken file away and evaluate.py takes it")


def evaluate_model(category, name, path, args, device, inception, perceptual):
    """One summary row: generation metrics (unless skipped) and reconstruction metrics."""
    model, ckpt = load_job(path, name, device)
    config = ckpt.get("config", {})
    root = args.data_root or config.get("data_root") or data.DEFAULT_ROOT
    data.ensure_category(root, category, args.download)
    size = model.config["image_size"]
    zoom = config.get("zoom_window")  # the run saw each image cut to its part's window: so do these
    reference = f"reference_{size}" + (f"_zoom{zoom['side']:g}{'_turned' if zoom.get('turn') else ''}" if zoom else "")
    row = {"category": category, "model": name, "resolution": size, "checkpoint": str(path)}
    eval_dir = Path(args.runs) / "eval" / category
    # the held-out images first: a val file gone since training stops before minutes of sampling
    split = checks.split_of(ckpt, path, root, category)
    images = held_out_normal(root, category, size, tuple(data.split_files(root, category, split, "val")),
                             zoom and tuple(sorted(zoom.items())))
    prior_trained = ckpt.get("stage_index", 0) == len(model.stages) - 1
    if inception and not prior_trained:
        print(f"note: {name}: checkpoint '{path}' stops before its '{model.stages[-1]}' stage, so its "
              "prior is untrained; generation metrics skipped (finish training first)")
    elif inception:
        n_ref = ensure_reference(root, category, size, eval_dir / reference, zoom)
        gen_dir = eval_dir / name / "gen"
        save_samples(model, args.num_samples, args.batch_size, args.seed, gen_dir, f"sample {name}")
        print(f"{category}/{name}: FID / IS / KID of {args.num_samples} samples against {n_ref} "
              f"train/good images at {size} px ...")
        row.update(num_samples=args.num_samples, reference_images=n_ref, seed=args.seed,
                   **fidelity_metrics(gen_dir, eval_dir / reference, args.num_samples, n_ref,
                                      *inception, device.type == "cuda", args.batch_size, args.seed))
    if perceptual is not None and size < losses.LPIPS_MIN_SIZE:
        print(f"note: {name}: no LPIPS at {size} px (it needs at least {losses.LPIPS_MIN_SIZE})")
        perceptual = None
    row.update(reconstruction_metrics(model, images, args.batch_size, device, perceptual))
    return row


# ----------------------------------------------------------------------------- summary

def cell(value):
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def update_summary(path, row):
    """Replace the row of the same (category, model) in place, else append it; returns all rows."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    row = {k: cell(v) for k, v in row.items()}
    keys = [(r["category"], r["model"]) for r in rows]
    if (row["category"], row["model"]) in keys:
        # the whole row: no number of an older checkpoint or run survives next to the new ones
        rows[keys.index((row["category"], row["model"]))] = row
    else:
        rows.append(row)
    used = {k for r in rows for k, v in r.items() if v not in ("", None)}
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in COLUMNS and k in used]
    header = [c for c in COLUMNS if c in ALWAYS or c in used] + extra
    write_csv_atomic([{c: r.get(c) or "" for c in header} for r in rows], path)
    return rows


def format_table(rows):
    """Aligned text table of the columns set in any row; mean and std shown as 'mean ± std'."""
    columns = [c for c in COLUMNS if "_std" not in c and any(r.get(c) for r in rows)]

    def show(row, col):
        if "_mean" in col and row.get(col):
            return f"{short(row[col])} ± {short(row[col.replace('_mean', '_std')])}"
        return short(row.get(col) or "")

    table = [[c.replace("_mean", "") for c in columns]] + [[show(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def short(value):
    """Integers as they are, other numbers to 4 significant digits, text unchanged."""
    try:
        return value if value.lstrip("-").isdigit() else f"{float(value):.4g}"
    except ValueError:
        return value


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # torch-fidelity moves Inception with a bare .cuda()
    jobs = find_jobs(args.runs, args.category, args.models)
    checks.writable_dir(args.runs, "--runs")  # the summary and samples go there: check first
    for _, name, path in jobs:  # every checkpoint readable before hours of sampling
        load_job(path, name, "cpu")
    inception = None if args.no_generation else locate_inception(args.inception_weights,
                                                                  args.allow_unofficial_inception)
    if inception and not inception[1]:
        print(f"warning: Inception weights '{inception[0]}' are NOT the official file; their numbers "
              "are written as *_unofficial and are not FID/IS/KID")
    perceptual = load_perceptual(args)
    if perceptual is not None:
        perceptual.to(device)
    summary = Path(args.runs) / SUMMARY_FILE
    rows = []
    for category, name, path in jobs:
        new = evaluate_model(category, name, path, args, device, inception, perceptual)
        rows = update_summary(summary, new)  # after each model, so a later failure keeps it
    shown = [r for r in rows if r["category"] in {c for c, _, _ in jobs}]
    print(f"\n{format_table(shown)}\n\nwritten: {summary}")


if __name__ == "__main__":
    try:
        main()
    except (EvaluationError, data.DatasetError, losses.LPIPSUnavailable, checks.RunError) as e:
        sys.exit(f"error: {e}")
