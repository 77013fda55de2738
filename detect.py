"""Localise defects from reconstruction error, with a threshold calibrated on good images.

    python detect.py --class bottle                      # best trained model for the class
    python detect.py --class bottle --model savae --map ssim+msgms --save-maps
    python detect.py --class bottle --images "new/*.png" # unlabelled images: verdicts and maps
    python detect.py --class all                         # every trained class, results/summary.md

Maps (per pixel, higher = more anomalous), each model's own (model.anomaly_maps): l2 (squared
error), ssim (1 - SSIM, 11 x 11 window), msgms (1 - multi-scale gradient-magnitude similarity),
feature (1 - cosine similarity of the model's own encoder features of input and reconstruction),
chroma (the colour distance of input and reconstruction, zero on grey images), and its extras (DAE: segment, its segmenter's probability that a pixel is a defect;
SAVAE/AR-SAVAE: variance_weighted, epistemic; VQ-VAE: code_nll, the prior's -log p of each
code); and lpips (spatial LPIPS, real weights only), computed here. Without --map, the model's default_map,
or its turned_map for a run that turned its few training images (README, Detection, lists them
and their measured effect). Every model but the AR-SAVAE also joins the template map (the
image's grey level against its nearest training images; --template off leaves it out).
Each map first loses its baseline: the per-pixel mean of that map over the
training images, the error every good image has at that place (--baseline none keeps it); where
the training images do not lie alike, the mean over each image's nearest training images
(baseline_for); for ssim the distance from it counts either way (TWO_SIDED).
"a+b" averages maps, each standardised by the mean and std of its values on the val split.
The combined map is closed (--close: grey-level dilation, then erosion, by a disc), so marks on
one defect less than 2 x radius apart join into one, and what the marks enclose is filled; then
it is smoothed by a Gaussian (--sigma; both in pixels at the model's resolution, each model's
own by default). Where the training images' border shows a plain table (one colour, or one that
changes slowly across the image), the map is held at its floor wherever an image and its
reconstruction both show that table (--background). The image
score is the map's maximum (or the mean of its top-k pixels).

Threshold: one of the image scores of the val images (good images never trained on), each also
scored turned and moved as the run's training images were (val_copies). With n exchangeable good
images a new good one scores above the k-th largest with chance k / (n + 1): the threshold is
the largest (k = 1) below 99 val images, else the k-th largest with k / (n + 1) <=
THRESHOLD_SHARE (2 %), so one unusual good image among many does not set it. Predicted
masks are the pixels above that same threshold in a flagged image, so an image is flagged
exactly when its mask is non-empty (with --score topk a passed image may hold a few such pixels:
its mask stays empty). Maps are never normalised by each image's own min and max: that stretches the noise
of a good image to full scale, so every good image would look defective.

Calibration (baseline map, val map statistics, threshold) is computed once per checkpoint and
setting, stored in <checkpoint folder>/calibration/ and reused while every setting it depends on
matches.

Writes results/<class>/: metrics.json, scores.csv, roc.png, failures.png, one
<class>_<defect>_<idx>_viz.png per test image, and maps.npz with --save-maps. Where a defect
type has no ground_truth/ masks, the class gets image metrics only (pixel metrics null). --images writes
results/<class>/inspect/<date-time>/: scores.csv (path, score, verdict, threshold) and one
<idx>_<name>_viz.png per image.
"""
import copy
import csv
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
from train import (ALIKE_CORR, TURN_INTERPOLATION, add_shared_options, lie_alike, move, pick_device, rotate, run_dir,  # noqa: E402
                   trained_checkpoint, turn_grid)


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
def compute_maps(model, images, names, device, batch_size, mc_passes, perceptual, seed=0, extra=()):
    """Raw maps (N, H, W) of uint8 images (N, 3, H, W) for each requested name, reconstructions
    (N, 3, H, W) as uint8, and the model's epistemic map when it is among the names or `extra`
    (the further maps the pictures need: picture_maps), else None. The model computes only
    those maps. MC dropout is reseeded for every batch, so a batch's maps depend on its images
    alone, but its masks are drawn for the batch as a whole: a model with MC dropout (SAVAE) maps
    an image a little differently (a fraction of a percent) in another batch or at another
    --batch-size, so its calibration records the batch size. Other models map each image alike
    in any batch."""
    out, recons, epistemic = {n: [] for n in names}, [], []
    asked = list(dict.fromkeys([n for n in names if n != "lpips"] + list(extra)))
    for start in range(0, len(images), batch_size):
        torch.manual_seed(seed)
        x = data.to_float(images[start:start + batch_size], device)
        recon, own = model.anomaly_maps(x, mc_passes, names=asked)
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


def picture_maps(offered):
    """The maps the pictures draw besides the one judged: the epistemic panel (MC-dropout models)."""
    return [n for n in ("epistemic",) if n in offered]


# Closing and filling before smoothing. The marks on a large defect can lie apart: a flipped
# metal_nut is marked along its lobes' edges, and a Gaussian alone spreads them past its outline
# as much as into it. Closing fills the gaps between marks less than 2 r apart; filling then
# raises what the marks enclose, however wide, to the lowest mark around it. Neither reaches
# past the outer marks, and a lone mark keeps its size, so the Gaussian can be narrower. Each
# model sets its radius and sigma (models.py: the DAE 6 and 3, the others 0 and 4; RESULTS.md).
def fill_holes(m):
    """Grey-level hole filling of one map (H, W): each basin the border cannot reach without
    climbing rises to the lowest rim around it (reconstruction by erosion from the border). A map
    with a NaN or an infinity is returned as it is (a NaN never lets the loop settle;
    require_finite then reports it)."""
    if not np.isfinite(m).all():
        return m
    marker = np.full_like(m, m.max())
    marker[[0, -1]], marker[:, [0, -1]] = m[[0, -1]], m[:, [0, -1]]
    square = np.ones((3, 3), np.uint8)
    while True:
        grown = np.maximum(cv2.erode(marker, square), m)
        if np.array_equal(grown, marker):
            return grown
        marker = grown


def close_gaps(maps, radius):
    """Grey-level closing of each map (N, H, W) by a disc of `radius` px, then its holes filled;
    0 leaves them as they are."""
    if radius <= 0:
        return maps
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.stack([fill_holes(cv2.morphologyEx(m.astype(np.float32), cv2.MORPH_CLOSE, disc,
                                                 borderType=cv2.BORDER_REFLECT)) for m in maps])


def smooth(maps, sigma):
    if sigma <= 0:
        return maps.astype(np.float32)
    return np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), sigma) for m in maps])


# Maps whose distance from the baseline counts either way. ssim's error on a good part is mostly
# the fine texture its reconstruction cannot copy, so a surface that errs less than good parts do
# there is not like them either: a flipped metal_nut shows its other face, and 42 % of its pixels
# sit below the baseline, where one-sided they pulled down what the other maps found. Two-sided:
# metal_nut pixel AUROC 0.938 -> 0.953 (seed 1 0.929 -> 0.951; clipped at zero 0.946), bottle
# 0.980 either way (RESULTS.md). The other maps stay one-sided: a segmenter's probability or a
# colour error below the usual one is no evidence.
TWO_SIDED = ("ssim",)


def subtract_baseline(maps, baseline):
    """Each map minus the mean map of the training images: the error a good image usually has at
    that pixel (edges, fine texture) stops counting as evidence of a defect. TWO_SIDED maps keep
    the size of the difference: |map - baseline|."""
    return {n: np.abs(m - baseline[n]) if n in TWO_SIDED else m - baseline[n] for n, m in maps.items()}


def map_statistics(val_maps):
    """Mean and std of each map over the val images: all that combining needs of them, so a
    calibration stays small however many val images and copies it scored."""
    return {n: (float(m.mean()), float(m.std())) for n, m in val_maps.items()}


def combine(raw, stats, names):
    """One map: each map standardised with its val mean and std (stats; never per image), averaged.

    A map that is constant on the val images carries nothing to standardise (chroma on a grey
    category is zero everywhere) and is left out, so it cannot turn noise into evidence."""
    # a NaN spread is not constant: that map stays, and require_finite then reports it
    informative = [n for n in names if stats[n][1] != 0] or names[:1]
    if len(informative) == 1:
        return raw[informative[0]]
    return sum((raw[n] - stats[n][0]) / stats[n][1] for n in informative) / len(informative)


def image_scores(maps, rule, topk):
    flat = maps.reshape(len(maps), -1)
    if rule == "max":
        return flat.max(1)
    return np.sort(flat, axis=1)[:, -topk:].mean(1)


# A plain background (metal_nut's dark table, bottle's white surround). The marks on a part spread
# a few pixels past its outline (the smoothing, the feature map's receptive field), and filling
# raises a nut's hole with the nut around it: pixels that no defect's mask holds, beside the
# defects that score highest (a flipped nut's mask is the whole nut less its hole). Where the
# training images' border shows a plain table (data.plain_background), a pixel of the table's
# colour in an image and in its reconstruction shows no part, so no defect of one; the map there
# is held at the image's lowest value. A part missing from where its reconstruction draws it
# keeps its map. Pixel AUROC / AUPRO, metal_nut 0.966 / 0.926 -> 0.974 / 0.941 (seed 1 0.963 /
# 0.917 -> 0.970 / 0.931), its grey copy 0.954 / 0.837 -> 0.963 / 0.864, bottle 0.987 / 0.943
# both; image scores unchanged (RESULTS.md). Textures and busy scenes have no plain border and
# keep the map everywhere.
# Dust on the table lies away from it but is no part: only the part's main piece (data.main_part)
# keeps its map. A dusty stand-in's good nuts set the threshold with specks the model smoothed
# away; held, its image AUROC went 0.822 -> 0.956 (RESULTS.md, "Dust on the table").
# px the part is grown by: a bent lobe's mask reaches past the part (grown 1 px its pixels read
# 0.971 against good images' pixels, 2 px 0.989, 3 px 0.994, ungated 0.996); 3 px loses no
# defect type on metal_nut, 1 px would lift the flipped nuts more
PART_GROW = 3


def part_pixels(images, recons):
    """(N, S, S) bool: where an image or its reconstruction (uint8, N, 3, S, S) is not the image's
    table (data.tables_of), its main piece (data.main_part: dust elsewhere on the table is held),
    grown by PART_GROW px."""
    table = data.tables_of(images)
    away = [(x.double() - table).norm(dim=1) > data.PLAIN_TOLERANCE * 255 for x in (images, recons)]
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * PART_GROW + 1, 2 * PART_GROW + 1))
    parts = [data.main_part(p) for p in (away[0] | away[1]).numpy()]
    return np.stack([cv2.dilate(p.astype(np.uint8), disc) for p in parts]).astype(bool)


def hold_background(maps, part):
    """Each map (N, H, W) held at its own lowest value outside its part."""
    return np.where(part, maps, maps.min((1, 2), keepdims=True))


# A template for parts that lie as some training parts lie. Reconstruction error cannot see a
# change the model reproduces faithfully: a cell of a solar panel gone dark where a crack cut it
# off comes back dark, and its texture comes back with it. Against the training images most like
# the image it stands out: its grey level less their mean, smoothed before its size is taken (the
# grain's differences cancel, a darker or brighter region's do not), over the training images'
# per-pixel spread. The nearest few rather than all of them: a nut turned 30 degrees or a mono
# solar cell is compared with its own kind, not with a blur of every angle and kind. Added as a
# further map to the model's. Image AUROC, seed 0, against all training images' mean: solar cells
# 0.709 -> 0.723 (seed 1 in RESULTS.md), metal_nut 0.990 -> 0.991 (1 -> 0 good flagged), its grey
# copy 0.955 -> 0.959 (AUPRO 0.896 -> 0.901), bottle 0.998 unchanged. A run that turned its few
# images takes it too (with the nearest baseline, below): a val copy turned by 45 degrees finds
# the training parts that lie nearest that angle.
TEMPLATE_SIGMA = 4.0  # px at 128 px, scaled with the image size
TEMPLATE_FLOOR = 0.02  # added to the spread: a pixel that never varies does not divide by ~0
TEMPLATE_NEIGHBOURS = 3  # training images averaged into each image's template
TEMPLATE_BLOCK = 4  # px at 128 px: neighbours are found on block means, by the part's shape, not its grain


def grey_levels(images):
    """uint8 images (N, 3, S, S) -> grey levels (N, S, S) in [0, 1], float32."""
    return (images.float().mean(1) / 255).numpy()


def template_statistics(images):
    """What the template keeps of the training images: their grey levels (uint8, N x S x S)
    and each pixel's standard deviation over them."""
    grey = grey_levels(images)
    return {"grey": (grey * 255).round().astype(np.uint8), "std": grey.std(0)}


def block_means(grey):
    """Grey levels (N, S, S) -> (N, D) float32 means of TEMPLATE_BLOCK px blocks: what images are
    compared by when their nearest training images are looked for."""
    block = max(1, round(TEMPLATE_BLOCK * grey.shape[-1] / 128))
    return torch.nn.functional.avg_pool2d(torch.from_numpy(grey)[:, None], block).flatten(1).numpy()


def nearest_indices(means, train_means, k, skip_self=False):
    """(N, k) indices of the training images nearest each image, by the distance of their block
    means. skip_self: the images are the training images themselves, each its own nearest, which
    is skipped (unless it is the only one)."""
    skip = int(skip_self)
    k = min(k + skip, len(train_means))
    distances = torch.cdist(torch.from_numpy(means), torch.from_numpy(train_means))
    return distances.topk(k, largest=False).indices[:, min(skip, k - 1):].numpy()


def nearest_training_images(grey, train, skip_self=False):
    """(N, TEMPLATE_NEIGHBOURS) indices of the training images (grey levels) nearest each image."""
    return nearest_indices(block_means(grey), block_means(train), TEMPLATE_NEIGHBOURS, skip_self)


def template_map(images, template, skip_self=False):
    """|G_sigma * (grey(x) - mean of its nearest training images)| / (std + TEMPLATE_FLOOR), (N, S, S)."""
    grey, train = grey_levels(images), template["grey"].astype(np.float32) / 255
    nearest = nearest_training_images(grey, train, skip_self)
    difference = np.stack([g - train[i].mean(0) for g, i in zip(grey, nearest)])
    blurred = smooth(difference, TEMPLATE_SIGMA * images.shape[-1] / 128)
    return np.abs(blurred) / (template["std"] + TEMPLATE_FLOOR)


def with_template(raw, images, template, skip_self=False):
    """The model's raw maps, and the template map when the calibration has a template (and the
    maps do not hold it yet). skip_self: the images are the training images (template_map)."""
    if template is None or "template" in raw:
        return raw
    return {**raw, "template": template_map(images, template, skip_self)}


def uses_template(run, args):
    """--template auto and the model asks for it (default_template)."""
    return args.template == "auto" and run.model.default_template


# A baseline per image where the training images do not lie alike. The mean map of all of them is
# the error a good image has at each place only when every image shows the same thing there
# (bottle). Where nuts lie at any angle it is a blur of every angle; where solar cells are smooth
# (mono) or grainy (poly) a grainy cell's error is set against the mean of both kinds, so the good
# grainy cells score above the defective smooth ones. There each image loses instead the mean map
# of its BASELINE_NEIGHBOURS nearest training images (nearest as the template's are: a nut at
# the same angle, a cell of the same kind). The calibration keeps the training images' maps for
# that at half size in float16 (solar cells 25 MB, metal_nut 6.5 MB). The template map keeps
# the mean of all: it already compares each image with its nearest. train.lie_alike decides, as
# it does for the moved-structure anomalies, and detect.py prints it. Image / pixel AUROC / AUPRO,
# the mean of all -> the nearest, seeds 0 and 1: solar cells 0.720 -> 0.784 and 0.730 -> 0.795; a
# grey copy of metal_nut 0.962 / 0.974 / 0.899 -> 0.975 / 0.974 / 0.890; metal_nut 0.993 / 0.980 /
# 0.939 -> 0.995 / 0.979 / 0.938 and 0.999 / 0.980 / 0.942 -> 0.997 / 0.979 / 0.940; bottle (alike)
# unchanged, its AUPRO 0.943 -> 0.941 had it used the nearest (RESULTS.md). A run that turned its
# few images too, with the template: 30 metal_nut images 0.991 / 0.952 / 0.918 -> 0.994 / 0.956 /
# 0.919 and 0.988 / 0.929 / 0.899 -> 0.993 / 0.943 / 0.906, five 0.981 / 0.937 / 0.904 -> 0.983 /
# 0.941 / 0.905; bottles (alike) keep the mean of all and gain the template (30 bottles: 1 -> 0
# of 20 good flagged).
BASELINE_NEIGHBOURS = 3
BASELINE_SCALE = 2  # the training images' maps are kept at 1 / BASELINE_SCALE of their size


def nearest_baseline(train_raw, names, train_grey):
    """What a per-image baseline keeps of the training images: their block means and the named
    maps, shrunk by BASELINE_SCALE, float16; a map that is constant (chroma on grey images) keeps
    the mean of all."""
    def shrink(m):
        return torch.nn.functional.avg_pool2d(torch.from_numpy(m)[:, None], BASELINE_SCALE)[:, 0].half().numpy()
    return {"blocks": block_means(train_grey),
            "maps": {n: shrink(train_raw[n]) for n in names if train_raw[n].std() > 0}}


def baseline_for(images, calibration):
    """The baseline each map of these images loses: the mean map of all the training images, or
    where the calibration keeps a nearest baseline, each image's own, (N, S, S), for the maps it holds."""
    nearest = calibration.get("nearest")
    if nearest is None:
        return calibration["baseline"]
    grey = grey_levels(images)
    idx = nearest_indices(block_means(grey), nearest["blocks"], BASELINE_NEIGHBOURS)
    def own(maps):  # mean of the neighbours' maps, brought back to full size
        mean = torch.from_numpy(maps[idx].astype(np.float32).mean(1))[:, None]
        return torch.nn.functional.interpolate(mean, size=grey.shape[-2:], mode="bilinear")[:, 0].numpy()
    return {**calibration["baseline"], **{n: own(maps) for n, maps in nearest["maps"].items()}}


def anomaly_map(raw, calibration, names, args, images, recons):
    """The one map an image is judged by: baseline subtracted (baseline_for), maps combined with
    the val statistics, closed and filled (close_gaps), smoothed, held at its floor on a plain
    background (hold_background). Calibration and every later image go through exactly this."""
    raw = with_template(raw, images, calibration.get("template"))
    names = list(names) + [n for n in raw if n not in names]
    if calibration["baseline"] is not None:
        raw = subtract_baseline(raw, baseline_for(images, calibration))
    maps = smooth(close_gaps(combine(raw, calibration["map_stats"], names), args.close), args.sigma)
    if not calibration.get("background"):
        return maps
    return hold_background(maps, part_pixels(images, recons))


def detection_metrics(scores, labels, maps, masks, threshold):
    """Image and pixel metrics of one run; an image is flagged when its score exceeds threshold.
    masks None (defects labelled by folder only): the pixel metrics are None."""
    f1, false_alarms = f1_and_false_alarms(scores, labels, threshold)
    return {
        "image_auroc": auroc(scores, labels),
        "pixel_auroc": None if masks is None else auroc(maps, masks),
        "aupro_0.3": None if masks is None else aupro(maps, masks), "threshold": threshold,
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
        np.savez_compressed(out / "maps.npz", maps=maps.astype(np.float32),
                            **({} if masks is None else {"masks": masks.astype(np.uint8)}))


# ----------------------------------------------------------------------------- calibration
# What detection derives from the training data (baseline map, val map statistics, threshold) is
# computed once per checkpoint and setting and stored beside the checkpoint, in calibration/:
# mapping the training split again on every run cost the VQ-VAE minutes.

def calibration_path(ckpt_path, map_name):
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent / "calibration" / f"{ckpt_path.stem}_{map_name}.pt"


# A run trained on turned parts (train.py --rotate) takes any turn of a good part for a good part,
# so each val image is also scored turned by every multiple of 360/8 degrees: more good scores
# behind the threshold where val is small. Five metal_nut images, one val image: good nuts flagged
# 41 % -> 5 % (RESULTS.md).
CALIBRATION_TURNS = 8


def val_turns(cfg):
    return CALIBRATION_TURNS if cfg.get("rotate_used") else 1


def copy_angles(n, turns):
    """The angle of each of n images' turned copies, 2 pi k / turns, all images at k = 0 first."""
    return torch.arange(turns).repeat_interleave(n) * (2 * torch.pi / turns)


def turned_copies(images, turns):
    """uint8 (N, 3, S, S) -> (N * turns, 3, S, S): each image at angles 2 pi k / turns, k = 0 first."""
    if turns == 1:
        return images
    x = data.to_float(images).repeat(turns, 1, 1, 1)
    return (rotate(x, copy_angles(len(images), turns)) * 255).round().clamp(0, 255).to(torch.uint8)


# A run trained on parts moved by up to `shift` px (train.py --shift) takes a part placed that far
# off for a good part, and test parts do lie farther off than the training parts the val images
# come from (centroid std 0.65 against 0.39 px on metal_nut): so each val image is also scored
# moved by `shift` px up, down, left and right. Good images flagged: metal_nut 3 -> 0 of 22,
# bottle 4 -> 2 of 20, a grey copy of metal_nut 2 -> 0; defects passed 0 -> 2 of 93, 0 of 63,
# 14 -> 18 of 93; AUROCs unchanged (RESULTS.md).
def val_moves(cfg):
    return cfg.get("shift", 0)


def moved_copies(images, step):
    """(N, C, S, S) -> (5N, C, S, S): the images as they are, then moved by `step` whole pixels
    up, down, left and right, by training's own move (reflection-filled)."""
    if step == 0:
        return images
    offsets = [(0, 0), (step, 0), (-step, 0), (0, step), (0, -step)]  # (rows, cols), each for all N
    rows, cols = ([o[k] for o in offsets for _ in images] for k in (0, 1))
    return move(images.float().repeat(len(offsets), 1, 1, 1), rows, cols, step).to(images.dtype)


def val_copies(images, settings):
    """The val images as calibration scores them: turned (val_turns), then moved (val_moves)."""
    return moved_copies(turned_copies(images, settings["val_turns"]), settings["val_moves"])


# A turn that is not a multiple of 90 degrees brings the corners of a copy in from outside the
# picture, filled by reflection with pieces of the part (ghost lobes of a nut); no camera shows
# those, yet on 33 metal_nut images they set the threshold (6.02; the copies' shown parts at
# most 2.69): 32 of 93 defects passed. So a copy's score is read only where it shows its own
# image: 4 of 22 good nuts flagged, 1 of 93 defects passed; five images unchanged (RESULTS.md).
def shown_in_copies(n, size, settings):
    """(copies, S, S) bool in val_copies' order: True where a copy shows its own image."""
    turns = settings["val_turns"]
    inside = turn_grid(copy_angles(n, turns), (n * turns, 1, size, size)).abs().amax(-1) <= 1
    return moved_copies(inside[:, None], settings["val_moves"])[:, 0]


def copy_scores(maps, shown, rule, topk):
    """Each copy's image score, read only where it shows its own image (shown_in_copies)."""
    return image_scores(np.where(shown, maps, -np.inf), rule, topk)


def calibration_settings(args, run):
    """Everything a calibration depends on: a stored one is used only when all of it matches."""
    return {"checkpoint_sha256": run.ckpt_sha256,
            "data": str(Path(run.root).resolve() / args.category),
            "map": args.map, "baseline": args.baseline if args.baseline == "none" else
                f"train: mean of all where they lie alike (>= {ALIKE_CORR:g}), else of the {BASELINE_NEIGHBOURS} nearest "
                f"at 1/{BASELINE_SCALE} size, turned runs too", "sigma": args.sigma, "close": args.close, "score": args.score,
            "topk": args.topk, "mc_passes": args.mc_passes, "seed": args.seed,
            # the AlexNet weights, by file and hash: a calibration made with other weights is not reused
            "lpips_backbone": run.perceptual.source if "lpips" in run.names else None, "val_turns": val_turns(run.cfg),
            "val_moves": val_moves(run.cfg), "two_sided": [n for n in run.names if n in TWO_SIDED],
            "copies_scored": "where shown",
            **({"batch_size": args.batch_size} if run.model.batch_dependent_maps else {}),
            "threshold": f"k-th highest val image, k/(n+1) <= {THRESHOLD_SHARE:g}",
            # turned copies were bilinear before: their calibrations recompute, the others stay
            **({"turned_by": TURN_INTERPOLATION} if val_turns(run.cfg) > 1 else {}),
            # chroma was its square before (models.chroma_map): calibrations with it recompute
            **({"chroma": "distance"} if "chroma" in run.names else {}),
            **({"maps_revision": run.model.maps_revision} if run.model.maps_revision else {}),
            "background": args.background if args.background == "off" else
                          f"each image's smooth table within {data.PLAIN_TOLERANCE * 255:g}/255 on {data.PLAIN_SHARE:g} "
                          f"of the border, main piece, grown {PART_GROW}",
            "template": f"{TEMPLATE_NEIGHBOURS} nearest training images, sigma {TEMPLATE_SIGMA:g}, "
                        f"floor {TEMPLATE_FLOOR:g}" if uses_template(run, args) else "off"}


def what_changed(old, new):
    keys = list(new) + [k for k in old if k not in new]
    return ", ".join("the checkpoint file changed" if k == "checkpoint_sha256" else f"{k} {old.get(k)} -> {new.get(k)}"
                     for k in keys if old.get(k) != new.get(k))


def read_calibration(path):
    """The stored calibration, or None when there is none or it cannot be read (then it is
    computed again: it is a cache, never the only copy of anything)."""
    try:
        stored = torch.load(path, weights_only=True)
    except Exception:  # missing, truncated, from another version: all mean "compute it"
        return None
    return stored if isinstance(stored, dict) and "map_stats" in stored else None  # older: maps, not stats


def compute_calibration(run, args, settings):
    """Map the recorded val images, turned and moved as the run's training images were
    (val_copies), and, for the baseline, the recorded train images."""
    root, category, size = run.root, args.category, run.cfg["size"]
    split = checks.split_of(run.ckpt, run.ckpt_path, root, category)
    val = data.load_split(root, category, "val", size, files=data.split_files(root, category, split, "val"),
                          zoom=run.zoom)
    copies = val_copies(val.images, settings)
    raw, recons, _ = run.maps_of(copies)
    train = data.load_split(root, category, "train", size, files=data.split_files(root, category, split, "train"),
                            zoom=run.zoom)
    template = template_statistics(train.images) if uses_template(run, args) else None
    baseline, nearest, alike = None, None, None
    if args.baseline == "train":  # a training image's template is made without itself (skip_self)
        train_raw = with_template(run.maps_of(train.images)[0], train.images, template, skip_self=True)
        baseline = {n: m.mean(0) for n, m in train_raw.items()}
        alike = lie_alike(train.images)
        if alike < ALIKE_CORR:
            nearest = nearest_baseline(train_raw, run.names, grey_levels(train.images))
    background, border_share = data.plain_background(train.images) if args.background == "auto" else (False, None)
    val_raw = with_template(raw, copies, template)
    calibration = {"settings": settings, "baseline": baseline, "nearest": nearest, "alike": alike, "template": template,
                   "val_files": [Path(p).name for p in val.paths], "train_images": len(train) if baseline is not None else 0,
                   "background": background, "border_share": border_share}
    calibration["map_stats"] = map_statistics(
        val_raw if baseline is None else subtract_baseline(val_raw, baseline_for(copies, calibration)))
    val_maps = anomaly_map(val_raw, calibration, run.names, args, copies, recons)
    # copy c shows val image c % n (val_copies' order): checked per image, so the error counts images
    checks.require_finite(run.ckpt_path, val_maps=val_maps.reshape(-1, len(val), *val_maps.shape[1:]).swapaxes(0, 1))
    val_scores = copy_scores(val_maps, shown_in_copies(len(val), size, settings).numpy(), args.score, args.topk)
    calibration["val_scores"] = val_scores
    calibration["threshold"] = float(val_image_scores(calibration)[threshold_image(calibration)])
    return calibration


def val_image_scores(calibration):
    """Each val image's highest score over its copies (copy c shows val image c % n)."""
    n = len(calibration["val_files"])
    return np.asarray(calibration["val_scores"]).reshape(-1, n).max(0)


# The threshold is one val image's score. An unusual good part (or a defective one filed under
# train/good) lifts it for every test image: on one split of 33 metal_nut images one val nut
# scored 6.14 as it lay, the other six at most 1.82, and 67 of 93 defects passed (RESULTS.md).
# Naming it, and the next one, lets the user look at that image. With many val images the
# threshold is the k-th highest, k the largest with k / (n + 1) <= THRESHOLD_SHARE: a new good
# image scores above it with chance k / (n + 1), under the targets' 5 % with room for good test
# images lying a little higher than the val images (metal_nut, RESULTS.md). Below 99 val images
# (every MVTec AD category at the default --val-fraction) k is 1, the highest. Solar cells, 113 val images, the 2nd highest:
# F1 0.235 -> 0.345 and 0.333 -> 0.343 (seeds 0, 1), good flagged 0 -> 1 and 1 -> 1 of 377.
THRESHOLD_SHARE = 0.02


def threshold_rank(n_val):
    """k: the threshold is the k-th highest of n_val val image scores."""
    return max(1, int(THRESHOLD_SHARE * (n_val + 1) + 1e-9))


def threshold_image(calibration):
    """Index of the val image whose score is the threshold (threshold_rank's k-th highest)."""
    scores = val_image_scores(calibration)
    return int(np.argsort(-scores, kind="stable")[threshold_rank(len(scores)) - 1])


def ordinal(k):
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def threshold_rule(n_val):
    k = threshold_rank(n_val)
    return "max of val image scores" if k == 1 else f"{ordinal(k)} highest of {n_val} val image scores"


def threshold_source(calibration):
    """One line: the threshold, the val image that sets it, and the next val image's score (or,
    where the threshold is not the highest, the highest's)."""
    names, scores = calibration["val_files"], val_image_scores(calibration)
    order, k = np.argsort(-scores, kind="stable"), threshold_rank(len(scores))
    at = order[k - 1]
    line = f"threshold {scores[at]:.4g}, set by val image {names[at]}"
    if k > 1:
        return (line + f", the {ordinal(k)} highest of {len(scores)} (about {k / (len(scores) + 1):.0%} of good "
                f"images flagged; the highest, {names[order[0]]}, scores {scores[order[0]]:.4g})")
    if len(order) > 1:
        line += f" (the next, {names[order[1]]}, scores {scores[order[1]]:.4g})"
    return line


def calibrate(run, args):
    """The calibration of this checkpoint and setting, with a warning when it is thin and a line
    naming the val image that sets the threshold."""
    calibration = stored_or_fresh_calibration(run, args)
    if args.threshold is None:
        settings = calibration["settings"]
        warn_if_thin(len(calibration["val_files"]), settings["val_turns"], settings["val_moves"])
        print(threshold_source(calibration))
    print(baseline_line(calibration))
    print(background_line(calibration))
    print(template_line(run, args, calibration))
    return calibration


def template_line(run, args, calibration):
    """One line: whether the template map joins the model's maps, and why."""
    if calibration.get("template") is not None:
        return (f"template: on: the map also counts each image's grey level against its {TEMPLATE_NEIGHBOURS} "
                "nearest training images, over the training images' spread")
    return f"template: off ({'--template off' if args.template == 'off' else f'{run.name} does not use it'})"


def baseline_line(calibration):
    """One line: which baseline the maps lose, and why."""
    alike = calibration.get("alike")
    if calibration["baseline"] is None:
        return "baseline: none (--baseline none)"
    why = f"neighbouring training images correlate {alike:.3f}"
    if calibration.get("nearest") is None:
        return f"baseline: the mean map of all training images (they lie alike: {why} >= {ALIKE_CORR:g})"
    return (f"baseline: the mean map of each image's {BASELINE_NEIGHBOURS} nearest training images "
            f"(they do not lie alike: {why} < {ALIKE_CORR:g})")


def background_line(calibration):
    """One line: whether the map is held at its floor on a plain background, and why."""
    plain, share = calibration["background"], calibration["border_share"]
    if share is None:
        return "background: not looked for (--background off): the map counts everywhere"
    within = (f"{share:.0%} of the training images' border within {data.PLAIN_TOLERANCE * 255:g}/255 "
              "of its image's smooth table")
    if not plain:
        return f"background: not plain ({within}): the map counts everywhere"
    return f"background: plain ({within}): the map counts on the parts only"


def stored_or_fresh_calibration(run, args):
    """The stored calibration when its settings match, else a fresh one (stored for next time).
    Prints one line: computed, reused, or recomputed and why."""
    path = calibration_path(run.ckpt_path, args.map)
    settings = calibration_settings(args, run)
    stored = None if args.recalibrate else read_calibration(path)
    if stored is not None and stored.get("settings") == settings:
        n_val = len(stored['val_files'])
        print(f"calibration: reused {path} ({n_val} val image{'s' * (n_val != 1)})")
        return to_numpy(stored)
    reason = ("recomputed (--recalibrate)" if args.recalibrate else "computed" if stored is None
              else f"recomputed ({what_changed(stored.get('settings', {}), settings) or 'unreadable'})")
    calibration = compute_calibration(run, args, settings)
    try:
        path.parent.mkdir(exist_ok=True)
        checks.write_atomic(path, lambda f: torch.save(to_torch(calibration), f), binary=True)
        where = f"stored in {path}"
    except (OSError, checks.RunError) as e:
        where = f"not stored ({checks.first_line(e)}): the next run computes it again"
    print(f"calibration: {reason} on {len(calibration['val_files'])} val / "
          f"{calibration['train_images']} train images, {where}")
    return calibration


def to_torch(value):
    """numpy arrays to tensors, recursively: torch.load(weights_only=True) reads them back."""
    if isinstance(value, dict):
        return {k: to_torch(v) for k, v in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def to_numpy(value):
    if isinstance(value, dict):
        return {k: to_numpy(v) for k, v in value.items()}
    return value.numpy() if torch.is_tensor(value) else value


def warn_if_thin(n_val, turns=1, moves=0):
    """With n good val images the chance a new good image beats their maximum is 1 / (n + 1);
    turned and moved copies raise the maximum but are not new images, so with turns no estimate
    is given (either way: on one split of 33 metal_nut images a single high val nut passed two
    thirds of the defects); with moves alone (a pixel each way) 1 / (n + 1) stays the guide."""
    if n_val < 10:
        images = f"{n_val} val image{'s' * (n_val != 1)}"
        moved = f" and moved {moves} px each way" if moves else ""
        risk = (f"scored at {turns} angles{moved}: copies are not new parts, so one unusual image moves "
                f"the threshold (many good images flagged, or many defects passed)" if turns > 1 else
                f"so about {1 / (n_val + 1):.0%} of good images will be flagged (1/(n+1))")
        print(f"warning: the threshold rests on {images}, {risk}; add good images to train/good, or "
              "train with a larger --val-fraction")


# ----------------------------------------------------------------------------- pictures

def to_hwc(image_uint8):
    return image_uint8.permute(1, 2, 0).numpy()


def overlay_red(image, mask):
    out = image.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0])
    return out.astype(np.uint8)


class Picture:
    """One reusable figure; only the pixel data changes per image. Panels: original,
    reconstruction, ground truth (when there are masks), error map with its colour bar and the
    threshold on it, predicted mask, red overlay, and epistemic uncertainty (MC-dropout models)."""

    def __init__(self, size, vmax, threshold, with_truth, unc_vmax=None):
        titles = (["original", "reconstruction"] + (["ground truth"] if with_truth else []) +
                  ["error map", "predicted mask", "overlay"] +
                  (["epistemic (MC dropout)"] if unc_vmax is not None else []))
        self.fig, axes = plt.subplots(1, len(titles), figsize=(2.2 * len(titles) + 0.6, 2.6), dpi=100)
        blank = np.zeros((size, size, 3), np.uint8)
        self.with_truth, self.panels = with_truth, []
        for ax, title in zip(axes, titles):
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

    def save(self, path, image, recon, amap, predicted, title, mask=None, uncertainty=None):
        def white(binary):
            return np.repeat(binary[..., None] * 255, 3, 2).astype(np.uint8)
        values = ([image, recon] + ([white(mask)] if self.with_truth else []) +
                  [amap, white(predicted), overlay_red(image, predicted)] +
                  ([uncertainty] if uncertainty is not None else []))
        for panel, v in zip(self.panels, values):
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


def predicted_mask(amap, score, threshold):
    """The pixels marked defective: above the threshold, in a flagged image only (a topk score
    can pass an image that holds a few such pixels)."""
    return (amap > threshold) & (score > threshold)


def write_pictures(out, files, captions, images, recons, maps, scores, threshold, vmax, epistemic,
                   masks=None):
    """One picture per image, out / files[i], its mask the predicted_mask."""
    unc_vmax = float(np.percentile(epistemic, 99.9)) if epistemic is not None else None
    picture = Picture(images.shape[-1], vmax, threshold, masks is not None, unc_vmax)
    for i in tqdm(range(len(files)), desc="pictures", leave=False):
        picture.save(out / files[i], to_hwc(images[i]), to_hwc(recons[i]), maps[i],
                     predicted_mask(maps[i], scores[i], threshold),
                     f"{captions[i]}  score {scores[i]:.4g}  threshold {threshold:.4g}  "
                     f"{'DEFECT' if scores[i] > threshold else 'good'}",
                     None if masks is None else masks[i], None if epistemic is None else epistemic[i])
    plt.close(picture.fig)


def viz_names(category, defect_types):
    """<class>_<defect>_<idx>_viz.png, idx counting within each defect type."""
    counters, names = {}, []
    for d in defect_types:
        counters[d] = counters.get(d, -1) + 1
        names.append(f"{category}_{d}_{counters[d]:03d}_viz.png")
    return names


def colour_scale(maps, threshold):
    """The error map's colour scale: 0 to twice the threshold, so the threshold sits mid-bar (jet's
    green), good parts' maps stay blue, and what passes it turns yellow to red (stronger marks
    saturate). Fixed by the calibration, the same whichever other images a run scores; the run's
    own maps set it only when the threshold is not positive."""
    return 2 * threshold if threshold > 0 else float(max(np.percentile(maps, 99.9), 1e-6))


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = data.ArgumentParser(description="Localise defects of one MVTec AD class from reconstruction error.",
                            epilog=EXIT_CODES)
    add_shared_options(p, "MVTec AD class, e.g. bottle; 'all': every class trained under --runs, "
                          "with results/summary.csv and summary.md")
    p.add_argument("--model", choices=list(MODELS),
                   help="model name (default: the first trained one for the class, in the order "
                        f"{', '.join(MODELS)}: best first on bottle and metal_nut)")
    p.add_argument("--checkpoint", help="checkpoint file (default: <runs>/<class>/<model>/best.pt)")
    p.add_argument("--data-root", help="folder holding the categories (default: the checkpoint's)")
    p.add_argument("--results", default="results", help="results go to <results>/<class>/")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="score these new images instead of test/: files, folders or globs (quote "
                        "them), no labels needed; writes <results>/<class>/inspect/<time>/")
    p.add_argument("--fail-on-defect", action="store_true",
                   help="with --images: exit with code 3 when any image is flagged (for scripts)")
    p.add_argument("--map", help="l2, ssim, msgms, feature, chroma, lpips, the model's own (DAE: segment; "
                   "SAVAE/AR-SAVAE: variance_weighted, epistemic; VQ-VAE: code_nll), or several joined by '+' "
                   "(default: the model's default_map, or its turned_map for a run that turned its few "
                   "training images; printed when the run starts)")
    p.add_argument("--sigma", type=checks.non_negative_float,
                   help="Gaussian smoothing of the map, pixels (default: the model's own; DAE 3, others 4)")
    p.add_argument("--close", type=checks.non_negative_int,
                   help="radius (pixels) of the closing before the smoothing, which joins marks on one "
                        "defect, after which what they enclose is filled; 0: neither (default: the "
                        "model's own; DAE 6, others 0)")
    p.add_argument("--baseline", choices=["train", "none"], default="train",
                   help="train: subtract from each map the per-pixel mean map of the training images")
    p.add_argument("--background", choices=["auto", "off"], default="auto",
                   help="auto: where the training images' border shows a plain table (one colour, or one that "
                        "changes slowly), the map counts on the parts only (pixels of the table's colour in "
                        "the image and its reconstruction are held at the map's floor); off: the map counts "
                        "everywhere")
    p.add_argument("--template", choices=["auto", "off"], default="auto",
                   help="auto: for a model that uses it (all but ar_savae), the map also counts each image's "
                        f"smoothed grey level against the mean of its {TEMPLATE_NEIGHBOURS} nearest training "
                        "images, over the training images' per-pixel spread (what a model reproduces "
                        "faithfully, such as a region gone dark); off: the model's maps only")
    p.add_argument("--score", choices=["max", "topk"], default="max", help="image score from its map")
    p.add_argument("--topk", type=checks.positive_int, default=100, help="pixels averaged by --score topk")
    p.add_argument("--threshold", type=checks.finite_float,
                   help="image/pixel threshold (default: the highest val image score; from "
                        f"{round(2 / THRESHOLD_SHARE) - 1} val images on, the k-th highest with "
                        f"k/(n+1) <= {THRESHOLD_SHARE:.0%}%)")
    p.add_argument("--recalibrate", action="store_true",
                   help="recompute the stored calibration (baseline, val maps, threshold) even if "
                        "its settings match")
    p.add_argument("--save-maps", action="store_true", help="also write maps.npz (maps, masks)")
    p.add_argument("--no-pictures", action="store_true", help="skip the per-image pictures")
    p.add_argument("--mc-passes", type=checks.positive_int, default=8, help="MC-dropout passes for epistemic maps")
    p.add_argument("--seed", type=checks.non_negative_int, default=0, help="seeds the MC-dropout passes: same run, same numbers")
    p.add_argument("--lpips-backbone", help="local AlexNet weights for the lpips map")
    p.add_argument("--batch-size", type=checks.positive_int, default=16, help="images per forward pass")
    args = p.parse_args(argv)
    if args.fail_on_defect and not args.images:
        p.error("--fail-on-defect needs --images")
    if args.category == "all" and (args.images or args.checkpoint):
        p.error("--class all runs each class's test/ with its own checkpoint: drop --images and --checkpoint")
    return args


EXIT_CODES = """exit codes: 0 done (also when defects were found), 1 error (one 'error:' line), 2 bad
argument, 3 --fail-on-defect and at least one image flagged, 130 interrupted."""


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


def map_settings(args, model, turned=False):
    """--map, --close and --sigma: the model's own defaults where they were not given (its
    turned_map, if it has one, for a run whose training turned its few images)."""
    args.map = args.map or (turned and model.turned_map) or model.default_map
    args.close = model.default_close if args.close is None else args.close
    args.sigma = model.default_sigma if args.sigma is None else args.sigma


def load_run(args):
    """The model, its checkpoint, the maps asked for and a maps_of(images) function: all that
    detection needs before it sees any image."""
    device = pick_device(args.device)
    ckpt_path = find_checkpoint(args)
    # the calibration is stored under the checkpoint's hash: it must be the hash of the weights
    # loaded, not of a best.pt that train.py replaced meanwhile
    sha256 = data.sha256_of(ckpt_path)
    model, ckpt = checks.load_checkpoint(ckpt_path, device, expected=args.model)
    if data.sha256_of(ckpt_path) != sha256:
        raise DetectError(f"checkpoint '{ckpt_path}' changed while it was read (is train.py still writing it?); "
                          "run again once training has finished")
    if "config" not in ckpt:
        raise DetectError(f"checkpoint '{ckpt_path}' holds no record of its training run (config): "
                          "detect.py needs a checkpoint written by train.py")
    cfg = ckpt["config"]
    checks.check_topk(args.score, args.topk, cfg["size"])
    root = args.data_root or cfg["data_root"]
    data.ensure_category(root, args.category, args.download)
    split = checks.split_of(ckpt, ckpt_path, root, args.category)
    if cfg.get("category", args.category) != args.category:  # a copied or renamed class may still hold its files
        try:
            data.split_files(root, args.category, split, "val")
        except data.SplitChanged:
            raise DetectError(f"checkpoint '{ckpt_path}' was trained on '{cfg['category']}', not "
                              f"'{args.category}': pass --class {cfg['category']}, or a checkpoint of "
                              f"{args.category}") from None
    map_settings(args, model, turned=cfg.get("rotate_used", False))
    names = list(dict.fromkeys(args.map.split("+")))  # each map once: ssim+ssim is ssim
    args.map = "+".join(names)
    allowed = {"lpips"} | model_map_names(model, device)
    if not set(names) <= allowed:
        raise DetectError(f"unknown map '{args.map}' for {ckpt['model_name']} "
                          f"(choose from {', '.join(sorted(allowed))})")
    perceptual = None
    if "lpips" in names:
        losses.require_size(cfg["size"])
        perceptual = losses.load_lpips(args.lpips_backbone, spatial=True).to(device)

    def maps_of(images, pictures=False):
        return compute_maps(model, images, names, device, args.batch_size, args.mc_passes, perceptual, args.seed,
                            extra=picture_maps(allowed) if pictures else ())
    return SimpleNamespace(model=model, ckpt=ckpt, ckpt_path=ckpt_path, ckpt_sha256=sha256, cfg=cfg, root=root,
                           names=names, perceptual=perceptual, maps_of=maps_of, n_val=len(split["val"]), name=ckpt["model_name"],
                           zoom=cfg.get("zoom_window"))


def map_line(run, args):
    """How the run's maps are made, for the first line a run prints."""
    turned = run.cfg.get("rotate_used", False) and args.map == run.model.turned_map
    why = " (the model's map for a run that turned its few training images)" if turned else ""
    zoom = (f" of the {run.zoom['side']:.0%} window around each image's part"
            f"{', turned with its long axis' if run.zoom.get('turn') else ''}" if run.zoom else "")
    return f"at {run.cfg['size']} px{zoom}, map {args.map}{why}, closing {args.close} px, sigma {args.sigma:g} px"


def evaluate_test(run, args, out):
    """Score test/ against its labels (and masks, where ground_truth/ has them)."""
    test = data.load_split(run.root, args.category, "test", run.cfg["size"], zoom=run.zoom)
    print(f"{run.name} ({run.ckpt_path}): {len(test)} test / {run.n_val} val images {map_line(run, args)}")
    calibration = calibrate(run, args)
    raw, recons, epistemic = run.maps_of(test.images, pictures=not args.no_pictures)
    maps = anomaly_map(raw, calibration, run.names, args, test.images, recons)
    checks.require_finite(run.ckpt_path, test_maps=maps)
    scores = image_scores(maps, args.score, args.topk)
    threshold = args.threshold if args.threshold is not None else calibration["threshold"]
    labels = test.labels.numpy()
    masks = None if test.unmasked else test.masks[:, 0].numpy().astype(bool)
    n_val = len(calibration["val_files"])
    metrics = {
        "class": args.category, "model": run.name, "checkpoint": run.ckpt_path,
        "map": args.map, "baseline": args.baseline, "sigma": args.sigma, "close": args.close,
        "score": args.score if args.score == "max" else f"top{args.topk}",
        "resolution": run.cfg["size"], "test_images": len(test), "val_images": n_val,
        "threshold_rule": "--threshold" if args.threshold is not None else threshold_rule(n_val),
        "threshold_set_by": None if args.threshold is not None else
            calibration["val_files"][threshold_image(calibration)],
        "expected_good_flagged (k/(val+1))": None if args.threshold is not None else threshold_rank(n_val) / (n_val + 1),
        **detection_metrics(scores, labels, maps, masks, threshold),
    }
    if test.unmasked:
        print(f"pixel metrics unavailable (null): no ground_truth/ masks for "
              f"{', '.join(test.unmasked)}; image metrics only")
    write_tables(out, metrics, test, scores, maps, masks, args.save_maps)
    roc_picture(out / "roc.png", scores, labels,
                f"{args.category} {run.name} {args.map}: AUROC {metrics['image_auroc']:.3f}")
    vmax = colour_scale(maps, threshold)
    failure_grid(out / "failures.png", test, recons, maps, scores, threshold, vmax)
    if not args.no_pictures:
        write_pictures(out, viz_names(args.category, test.defect_types), test.defect_types, test.images,
                       recons, maps, scores, threshold, vmax, epistemic, masks)
    print(f"image AUROC {metrics['image_auroc']:.3f}  pixel AUROC {number(metrics['pixel_auroc'])}  "
          f"AUPRO {number(metrics['aupro_0.3'])}  F1 {metrics['f1']:.3f}  "
          f"good flagged {metrics['good_false_alarm_rate']:.0%}  -> {out}")
    return metrics


def number(value):
    return "n/a" if value is None else f"{value:.3f}"


def fresh_folder(parent):
    """A new folder under parent named by the time, so no file of an earlier run is mixed in."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        folder = Path(parent) / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise DetectError(f"cannot make a fresh folder in '{parent}'")


def score_batch(run, calibration, images, args):
    """(maps, reconstructions, epistemic maps, scores) of one batch of uint8 images."""
    raw, recons, epistemic = run.maps_of(images, pictures=not args.no_pictures)
    maps = anomaly_map(raw, calibration, run.names, args, images, recons)
    checks.require_finite(run.ckpt_path, image_maps=maps)
    return maps, recons, epistemic, image_scores(maps, args.score, args.topk)


def inspect_images(run, args, paths, out):
    """Score new, unlabelled images: scores.csv, one picture each, a one-line summary. Decoding
    runs in threads ahead of the model; pictures are drawn only once every score is written."""
    print(f"{run.name} ({run.ckpt_path}): {len(paths)} images / {run.n_val} val images {map_line(run, args)}")
    calibration = calibrate(run, args)
    threshold = args.threshold if args.threshold is not None else calibration["threshold"]
    kept = {"images": [], "recons": [], "maps": [], "epistemic": []}
    scores = []
    batches = data.decoded_batches(paths, run.cfg["size"], args.batch_size, zoom=run.zoom)
    for _, images in tqdm(batches, total=-(-len(paths) // args.batch_size), desc="score", leave=False):
        maps, recons, epistemic, batch_scores = score_batch(run, calibration, images, args)
        scores.append(batch_scores)
        if not args.no_pictures or args.save_maps:
            for key, value in zip(kept, (images, recons, maps, epistemic)):
                kept[key].append(value)
    scores = np.concatenate(scores)
    flagged = scores > threshold
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "score", "verdict", "threshold"])
        for p, s, bad in zip(paths, scores, flagged):
            w.writerow([p, f"{s:.6g}", "defect" if bad else "good", f"{threshold:.6g}"])
    print(f"{len(paths)} images, {int(flagged.sum())} flagged as defective (threshold {threshold:.4g}) -> "
          f"{out / 'scores.csv'}")
    if kept["maps"]:
        maps = np.concatenate(kept["maps"])
        if args.save_maps:
            np.savez_compressed(out / "maps.npz", maps=maps.astype(np.float32), paths=np.array(paths))
        if not args.no_pictures:
            stems = [Path(p).stem for p in paths]
            write_pictures(out, [f"{i:04d}_{s}_viz.png" for i, s in enumerate(stems)], stems,
                           torch.cat(kept["images"]), torch.cat(kept["recons"]), maps, scores,
                           threshold, colour_scale(maps, threshold),
                           np.concatenate(kept["epistemic"]) if kept["epistemic"][0] is not None else None)
    return {"class": args.category, "model": run.name, "out": str(out), "images": len(paths),
            "flagged": int(flagged.sum()), "threshold": threshold, "scores": scores,
            "exit_code": 3 if args.fail_on_defect and flagged.any() else 0}


def detect_one(args):
    """detect.py for one class: test/ with its labels, or --images."""
    paths = data.expand_images(args.images) if args.images else None  # a typo fails before the work
    folder = checks.writable_dir(Path(args.results) / args.category / ("inspect" if paths else ""), "--results")
    run = load_run(args)
    return inspect_images(run, args, paths, fresh_folder(folder)) if paths else evaluate_test(run, args, folder)


def trained_classes(args):
    """Classes under --runs with a trained model (of --model, when given)."""
    runs = Path(args.runs)
    folders = sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    return [p.name for p in folders
            if any(trained_checkpoint(run_dir(runs, p.name, m)) for m in ([args.model] if args.model else MODELS))]


def training_minutes(ckpt_path):
    """Sum of the `seconds` column of the run's metrics.csv (every epoch of every stage, each with
    the checkpoint writing before it)."""
    try:
        with open(Path(ckpt_path).parent / "metrics.csv", newline="") as f:
            return sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60
    except (OSError, KeyError, ValueError):
        return None


SUMMARY_COLUMNS = {"category": "category", "model": "model", "image_auroc": "image AUROC",
                   "pixel_auroc": "pixel AUROC", "aupro_0.3": "AUPRO", "f1": "F1",
                   "good_false_alarm_rate": "good flagged", "train_minutes": "training minutes"}


def classes_word(n):
    return f"{n} class" if n == 1 else f"{n} classes"


def write_summary(results, rows):
    """results/summary.csv and summary.md: one row per class and a mean row; a mean over fewer
    classes than there are rows (pixel metrics without masks) says over how many."""
    numeric = list(SUMMARY_COLUMNS)[2:]
    with open(results / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
        w.writeheader()
        w.writerows({k: "" if r.get(k) is None else r[k] for k in SUMMARY_COLUMNS} for r in rows)
    def cell(k, v):
        formats = {"good_false_alarm_rate": "{:.0%}", "train_minutes": "{:.1f}"}
        return v if isinstance(v, str) else "" if v is None else formats.get(k, "{:.3f}").format(v)
    mean = {"category": f"mean ({classes_word(len(rows))})", "model": ""}
    for k in numeric:
        values = [r[k] for r in rows if r.get(k) is not None and np.isfinite(r[k])]
        mean[k] = "" if not values else cell(k, float(np.mean(values))) + (
            f" (over {len(values)})" if len(values) < len(rows) else "")
    lines = ["| " + " | ".join(SUMMARY_COLUMNS.values()) + " |",
             "|---|---|" + "---:|" * len(numeric)]
    lines += ["| " + " | ".join(cell(k, r.get(k)) for k in SUMMARY_COLUMNS) + " |" for r in rows + [mean]]
    (results / "summary.md").write_text("\n".join(lines) + "\n")


def detect_all(args):
    """Every trained class under --runs, each with its default model (or --model)."""
    classes = trained_classes(args)
    if not classes:
        raise DetectError(f"no trained models under '{args.runs}'; train one first: python train.py "
                          f"--model {args.model or next(iter(MODELS))} --category bottle")
    results = checks.writable_dir(args.results, "--results")
    rows, failed = [], []
    for name in classes:
        one = copy.copy(args)
        one.category = name
        print(f"== {name}")
        try:
            m = detect_one(one)
        except (data.DatasetError, DetectError, losses.LPIPSUnavailable, checks.RunError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        rows.append({**{k: m.get(k) for k in SUMMARY_COLUMNS}, "category": name,
                     "train_minutes": training_minutes(m["checkpoint"])})
    write_summary(results, rows)
    print(f"{classes_word(len(rows))} -> {results / 'summary.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return {"rows": rows, "failed": failed, "exit_code": 1 if failed else 0}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    return detect_all(args) if args.category == "all" else detect_one(args)


if __name__ == "__main__":
    try:
        sys.exit(main().get("exit_code", 0))
    except (data.DatasetError, DetectError, losses.LPIPSUnavailable, checks.RunError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # metrics.json is written whole or not at all
        print("interrupted: results may be incomplete (metrics.json is never half-written); run "
              "detect.py again for all of them", file=sys.stderr)
        sys.exit(130)
