"""Localise defects from reconstruction error, with a threshold calibrated on good images.

    python detect.py --class bottle                      # best trained model for the class
    python detect.py --class bottle --model savae --map ssim+msgms --save-maps

Maps (per pixel, higher = more anomalous), each model's own (model.anomaly_maps): l2 (squared
error), ssim (1 - SSIM, 11 x 11 window), msgms (1 - multi-scale gradient-magnitude similarity),
feature (1 - cosine similarity of the model's own encoder features of input and reconstruction),
and its extras (SAVAE/AR-SAVAE: variance_weighted, epistemic; VQ-VAE: code_nll, the prior's
-log p of each code, with the reconstruction decoded from prior-restored codes); and lpips
(spatial LPIPS, real weights only), computed here. Without --map, the model's default_map
(README, Detection, lists them and their measured effect).
Each map first loses its baseline: the per-pixel mean of that map over the
training images, the error every good image has at that place (--baseline none keeps it).
"a+b" averages maps, each standardised by the mean and std of its values on the val split.
Every map is smoothed by a Gaussian (--sigma, pixels at the model's resolution); the image score
is its maximum (or the mean of its top-k pixels).

Threshold: the largest image score among the val images (good images never trained on). With n
exchangeable good images the chance that a new good one scores higher is 1 / (n + 1). Predicted
masks are the pixels above that same threshold, so an image is flagged exactly when its mask is
non-empty. Maps are never normalised by each image's own min and max: that stretches the noise
of a good image to full scale, so every good image would look defective.

Writes results/<class>/: metrics.json, scores.csv, roc.png, failures.png, one
<class>_<defect>_<idx>_viz.png per test image, and maps.npz with --save-maps.
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import checks  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
from models import MODELS  # noqa: E402
from train import add_shared_options, pick_device, run_dir, trained_checkpoint  # noqa: E402


class DetectError(Exception):
    """Bad request (no checkpoint, unknown map); printed as one line."""


# ----------------------------------------------------------------------------- metrics

def auroc(scores, labels):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count 1/2.

    Mann-Whitney form: (sum of the positives' mid-ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mid_ranks = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each tied group
    return float((mid_ranks[inverse][labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores, labels):
    """(false-positive rates, true-positive rates) over all thresholds, from (0, 0) to (1, 1)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores)[order], np.asarray(labels).astype(bool)[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def aupro(maps, masks, fpr_limit=0.3):
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    PRO(t) = mean over ground-truth regions (8-connected components of each mask) of the
    fraction of the region's pixels with map >= t; FPR(t) = fraction of defect-free pixels with
    map >= t. One sort of all pixels gives both curves at every threshold.
    """
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks).astype(bool)
    weights = np.zeros(maps.shape, np.float64)  # 1 / (R |region|) on region pixels
    regions = []
    for i, m in enumerate(masks):
        n, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(i, labels == k) for k in range(1, n)]
    if not regions or masks.all():
        return float("nan")
    for i, region in regions:
        weights[i][region] = 1.0 / (len(regions) * region.sum())
    order = np.argsort(-maps.ravel(), kind="stable")
    values, normal = maps.ravel()[order], ~masks.ravel()[order]
    last_of_tie = np.r_[np.nonzero(np.diff(values))[0], len(values) - 1]
    fpr = np.r_[0, np.cumsum(normal)[last_of_tie] / normal.sum()]
    pro = np.r_[0, np.cumsum(weights.ravel()[order])[last_of_tie]]
    keep = fpr <= fpr_limit
    fpr_cut, pro_cut = fpr[keep], pro[keep]
    if fpr_cut[-1] < fpr_limit:  # close the curve at the limit by linear interpolation
        j = np.searchsorted(fpr, fpr_limit)
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        fpr_cut = np.r_[fpr_cut, fpr_limit]
        pro_cut = np.r_[pro_cut, pro[j - 1] + t * (pro[j] - pro[j - 1])]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def f1_and_false_alarms(scores, labels, threshold):
    predicted, labels = np.asarray(scores) > threshold, np.asarray(labels).astype(bool)
    tp, fp, fn = (predicted & labels).sum(), (predicted & ~labels).sum(), (~predicted & labels).sum()
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return float(f1), float(predicted[~labels].mean()) if (~labels).any() else float("nan")


def oracle_f1(scores, labels):
    """Best F1 over all thresholds on the test set itself: for reference only, not deployable."""
    candidates = np.unique(scores)
    best = max((f1_and_false_alarms(scores, labels, t)[0], t) for t in np.r_[candidates[0] - 1, candidates])
    return {"f1": best[0], "threshold": float(best[1])}


# ----------------------------------------------------------------------------- maps

@torch.inference_mode()
def compute_maps(model, split, names, device, batch_size, mc_passes, perceptual):
    """Raw maps (N, H, W) for each requested name, reconstructions (N, 3, H, W) as uint8,
    and the model's epistemic map when it has one (for the uncertainty panel)."""
    out, recons, epistemic = {n: [] for n in names}, [], []
    for start in range(0, len(split), batch_size):
        x = data.to_float(split.images[start:start + batch_size], device)
        recon, own = model.anomaly_maps(x, mc_passes)
        for n in names:
            amap = perceptual.map(x, recon) if n == "lpips" else own[n]
            out[n].append(amap[:, 0].float().cpu().numpy())
        recons.append((recon.clamp(0, 1) * 255).round().byte().cpu())
        if "epistemic" in own:
            epistemic.append(own["epistemic"][:, 0].float().cpu().numpy())
    return ({n: np.concatenate(v) for n, v in out.items()}, torch.cat(recons),
            np.concatenate(epistemic) if epistemic else None)


@torch.inference_mode()
def model_map_names(model, device):
    """Names of every map the model gives, read from one tiny call (no model-name branching)."""
    size = model.config["image_size"]
    return set(model.anomaly_maps(torch.zeros(1, 3, size, size, device=device), 1)[1])


def smooth(maps, sigma):
    if sigma <= 0:
        return maps.astype(np.float32)
    return np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigma) for m in maps])


def subtract_baseline(maps, baseline):
    """Each map minus the mean map of the training images: the error a good image usually has at
    that pixel (edges, fine texture) stops counting as evidence of a defect."""
    return {n: m - baseline[n] for n, m in maps.items()}


def combine(raw_test, raw_val, names):
    """One map: each map standardised with its val mean and std (never per image), averaged.

    A map that is constant on the val images carries nothing to standardise (chroma on a grey
    category is zero everywhere) and is left out, so it cannot turn noise into evidence."""
    informative = [n for n in names if raw_val[n].std() > 0] or names[:1]
    if len(informative) == 1:
        return raw_test[informative[0]], raw_val[informative[0]]

    def standardise(m, ref):
        return (m - ref.mean()) / ref.std()
    return (sum(standardise(raw_test[n], raw_val[n]) for n in informative) / len(informative),
            sum(standardise(raw_val[n], raw_val[n]) for n in informative) / len(informative))


def image_scores(maps, rule, topk):
    flat = maps.reshape(len(maps), -1)
    if rule == "max":
        return flat.max(1)
    return np.sort(flat, axis=1)[:, -topk:].mean(1)


def detection_metrics(scores, labels, maps, masks, threshold):
    """Image and pixel metrics of one run; an image is flagged when its score exceeds threshold."""
    f1, false_alarms = f1_and_false_alarms(scores, labels, threshold)
    return {
        "image_auroc": auroc(scores, labels), "pixel_auroc": auroc(maps, masks),
        "aupro_0.3": aupro(maps, masks), "threshold": threshold,
        "f1": f1, "good_false_alarm_rate": false_alarms,
        "defect_miss_rate": float((scores[labels == 1] <= threshold).mean()) if (labels == 1).any() else float("nan"),
        "oracle_f1_on_test (reference only)": oracle_f1(scores, labels),
    }


def write_tables(out, metrics, test, scores, maps, masks, save_maps):
    """metrics.json, scores.csv (one row per test image) and, if asked, maps.npz."""
    checks.write_json(out / "metrics.json", metrics)  # strict (null for NaN), never half-written
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "defect_type", "label", "score", "predicted_label"])
        for p, d, y, s in zip(test.paths, test.defect_types, test.labels.numpy(), scores):
            w.writerow([p, d, int(y), f"{s:.6g}", int(s > metrics["threshold"])])
    if save_maps:
        np.savez_compressed(out / "maps.npz", maps=maps.astype(np.float32), masks=masks.astype(np.uint8))


# ----------------------------------------------------------------------------- pictures

def to_hwc(image_uint8):
    return image_uint8.permute(1, 2, 0).numpy()


def overlay_red(image, mask):
    out = image.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0])
    return out.astype(np.uint8)


class Picture:
    """One reusable six (or seven) panel figure; only the pixel data changes per test image."""

    titles = ["original", "reconstruction", "ground truth", "error map", "predicted mask", "overlay"]

    def __init__(self, size, vmax, threshold, with_uncertainty, unc_vmax):
        n = 7 if with_uncertainty else 6
        self.fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 0.6, 2.6), dpi=100)
        blank = np.zeros((size, size, 3), np.uint8)
        self.panels = []
        for ax, title in zip(axes, self.titles + ["epistemic (MC dropout)"]):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
            if title == "error map":
                im = ax.imshow(np.zeros((size, size)), cmap="jet", vmin=0, vmax=vmax)
                bar = self.fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
                bar.ax.axhline(threshold, color="white", lw=1.5)  # the calibrated threshold
                bar.ax.tick_params(labelsize=7)
            elif title.startswith("epistemic"):
                im = ax.imshow(np.zeros((size, size)), cmap="magma", vmin=0, vmax=unc_vmax)
            else:
                im = ax.imshow(blank)
            self.panels.append(im)
        self.suptitle = self.fig.suptitle("", fontsize=9)
        self.fig.tight_layout()

    def save(self, path, image, recon, mask, amap, predicted, title, uncertainty=None):
        values = [image, recon, np.repeat(mask[..., None] * 255, 3, 2).astype(np.uint8), amap,
                  np.repeat(predicted[..., None] * 255, 3, 2).astype(np.uint8),
                  overlay_red(image, predicted)]
        for panel, v in zip(self.panels, values + ([uncertainty] if uncertainty is not None else [])):
            panel.set_data(v)
        self.suptitle.set_text(title)
        self.fig.savefig(path)


def failure_grid(path, test, recons, maps, scores, threshold, vmax, count=4):
    """Failure modes: the highest-scoring good images (false positives when flagged) above the
    lowest-scoring defective ones (false negatives when passed)."""
    good, bad = np.nonzero(test.labels.numpy() == 0)[0], np.nonzero(test.labels.numpy() == 1)[0]
    rows = [("good", i) for i in good[np.argsort(-scores[good])][:count]] + \
           [(test.defect_types[i], i) for i in bad[np.argsort(scores[bad])][:count]]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.2 * len(rows)), dpi=80, squeeze=False)
    for (kind, i), ax in zip(rows, axes):
        verdict = "flagged" if scores[i] > threshold else "passed"
        ax[0].imshow(to_hwc(test.images[i]))
        ax[0].set_title(f"{kind} #{i}: {verdict}", fontsize=8)
        ax[1].imshow(to_hwc(recons[i]))
        ax[1].set_title("reconstruction", fontsize=8)
        ax[2].imshow(maps[i], cmap="jet", vmin=0, vmax=vmax)
        ax[2].set_title(f"score {scores[i]:.4g} (threshold {threshold:.4g})", fontsize=8)
        for a in ax:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def roc_picture(path, scores, labels, title):
    fpr, tpr = roc_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_pictures(out, category, size, test, recons, maps, scores, threshold, vmax, epistemic):
    """One <class>_<defect>_<idx>_viz.png per test image; the predicted mask is map > threshold."""
    unc_vmax = float(np.percentile(epistemic, 99.9)) if epistemic is not None else None
    picture = Picture(size, vmax, threshold, epistemic is not None, unc_vmax)
    masks, counters = test.masks[:, 0].numpy().astype(bool), {}
    for i in tqdm(range(len(test)), desc="pictures", leave=False):
        d = test.defect_types[i]
        counters[d] = counters.get(d, -1) + 1
        picture.save(out / f"{category}_{d}_{counters[d]:03d}_viz.png", to_hwc(test.images[i]),
                     to_hwc(recons[i]), masks[i], maps[i], maps[i] > threshold,
                     f"{d}  score {scores[i]:.4g}  threshold {threshold:.4g}  "
                     f"{'DEFECT' if scores[i] > threshold else 'good'}",
                     None if epistemic is None else epistemic[i])
    plt.close(picture.fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Localise defects of one MVTec AD class from reconstruction error.",
                                formatter_class=data.HelpFormatter)
    add_shared_options(p, "MVTec AD class, e.g. bottle")
    p.add_argument("--model", choices=list(MODELS),
                   help="model name (default: the first trained one for the class, in the order "
                        f"{', '.join(MODELS)}: best first, measured on bottle)")
    p.add_argument("--checkpoint", help="checkpoint file (default: <runs>/<class>/<model>/best.pt)")
    p.add_argument("--data-root", help="folder holding the categories (default: the checkpoint's)")
    p.add_argument("--results", default="results", help="results go to <results>/<class>/")
    p.add_argument("--map", help="l2, ssim, msgms, feature, lpips, the model's own (SAVAE/AR-SAVAE: "
                   "variance_weighted, epistemic; VQ-VAE: code_nll), or several joined by '+' "
                   "(default: the model's default_map, printed when the run starts)")
    p.add_argument("--sigma", type=checks.non_negative_float, default=4.0, help="Gaussian smoothing of the map, pixels")
    p.add_argument("--baseline", choices=["train", "none"], default="train",
                   help="train: subtract from each map the per-pixel mean map of the training images")
    p.add_argument("--score", choices=["max", "topk"], default="max", help="image score from its map")
    p.add_argument("--topk", type=checks.positive_int, default=100, help="pixels averaged by --score topk")
    p.add_argument("--threshold", type=checks.finite_float, help="image/pixel threshold (default: max val score)")
    p.add_argument("--save-maps", action="store_true", help="also write maps.npz (maps, masks)")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-image pictures")
    p.add_argument("--mc-passes", type=checks.positive_int, default=8, help="MC-dropout passes for epistemic maps")
    p.add_argument("--seed", type=checks.non_negative_int, default=0, help="seeds the MC-dropout passes: same run, same numbers")
    p.add_argument("--lpips-backbone", help="local AlexNet weights for the lpips map")
    p.add_argument("--batch-size", type=checks.positive_int, default=16, help="images per forward pass")
    return p.parse_args(argv)


def find_checkpoint(args):
    """--checkpoint, else best.pt (or checkpoint.pt) of --model, else of the first model in
    MODELS' order that has been trained for the class."""
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise DetectError(f"checkpoint '{args.checkpoint}' not found")
        return args.checkpoint
    for name in ([args.model] if args.model else MODELS):
        path = trained_checkpoint(run_dir(args.runs, args.category, name))
        if path is not None:
            return str(path)
    model = args.model or next(iter(MODELS))
    raise DetectError(f"no trained model for class '{args.category}' under '{args.runs}'; train one "
                      f"first: python train.py --model {model} --category {args.category}")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    out = checks.writable_dir(Path(args.results) / args.category, "--results")  # before the work
    ckpt_path = find_checkpoint(args)
    model, ckpt = checks.load_checkpoint(ckpt_path, device, expected=args.model)
    cfg = ckpt["config"]
    checks.check_topk(args.score, args.topk, cfg["size"])
    root = args.data_root or cfg["data_root"]
    data.ensure_category(root, args.category, args.download)
    args.map = args.map or model.default_map
    names = args.map.split("+")
    allowed = {"lpips"} | model_map_names(model, device)
    if not set(names) <= allowed:
        raise DetectError(f"unknown map '{args.map}' for {ckpt['model_name']} "
                          f"(choose from {', '.join(sorted(allowed))})")
    perceptual = losses.load_lpips(args.lpips_backbone, spatial=True).to(device) if "lpips" in names else None
    split = checks.split_of(ckpt, ckpt_path, root, args.category)  # the val images of training
    val = data.load_split(root, args.category, "val", cfg["size"],
                          files=data.split_files(root, args.category, split, "val"))
    test = data.load_split(root, args.category, "test", cfg["size"], cfg["val_fraction"], cfg["seed"])
    print(f"{ckpt['model_name']} ({ckpt_path}): {len(test)} test / {len(val)} val images "
          f"at {cfg['size']} px, map {args.map}")

    def maps_of(split):
        return compute_maps(model, split, names, device, args.batch_size, args.mc_passes, perceptual)

    raw_val, _, _ = maps_of(val)
    raw_test, recons, epistemic = maps_of(test)
    if args.baseline == "train":
        train = data.load_split(root, args.category, "train", cfg["size"],
                                files=data.split_files(root, args.category, split, "train"))
        baseline = {n: m.mean(0) for n, m in maps_of(train)[0].items()}
        raw_val, raw_test = subtract_baseline(raw_val, baseline), subtract_baseline(raw_test, baseline)
    map_test, map_val = combine(raw_test, raw_val, names)
    map_test, map_val = smooth(map_test, args.sigma), smooth(map_val, args.sigma)
    checks.require_finite(ckpt_path, val_maps=map_val, test_maps=map_test)
    scores = image_scores(map_test, args.score, args.topk)
    threshold = args.threshold if args.threshold is not None else float(image_scores(map_val, args.score, args.topk).max())
    labels, masks = test.labels.numpy(), test.masks[:, 0].numpy().astype(bool)
    metrics = {
        "class": args.category, "model": ckpt["model_name"], "checkpoint": ckpt_path,
        "map": args.map, "baseline": args.baseline, "sigma": args.sigma,
        "score": args.score if args.score == "max" else f"top{args.topk}",
        "resolution": cfg["size"], "test_images": len(test), "val_images": len(val),
        "threshold_rule": "--threshold" if args.threshold is not None else "max of val image scores",
        **detection_metrics(scores, labels, map_test, masks, threshold),
    }
    write_tables(out, metrics, test, scores, map_test, masks, args.save_maps)
    roc_picture(out / "roc.png", scores, labels,
                f"{args.category} {ckpt['model_name']} {args.map}: AUROC {metrics['image_auroc']:.3f}")
    vmax = float(max(threshold * 1.5, np.percentile(map_test, 99.9)))
    failure_grid(out / "failures.png", test, recons, map_test, scores, threshold, vmax)
    if not args.no_pictures:
        write_pictures(out, args.category, cfg["size"], test, recons, map_test, scores, threshold, vmax, epistemic)
    print(f"image AUROC {metrics['image_auroc']:.3f}  pixel AUROC {metrics['pixel_auroc']:.3f}  "
          f"AUPRO {metrics['aupro_0.3']:.3f}  F1 {metrics['f1']:.3f}  "
          f"good flagged {metrics['good_false_alarm_rate']:.0%}  -> {out}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (data.DatasetError, DetectError, losses.LPIPSUnavailable, checks.RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # metrics.json is written whole or not at all
        print("interrupted: results may be incomplete (metrics.json is never half-written); run "
              "detect.py again for all of them", file=sys.stderr)
        sys.exit(130)
