"""MVTec AD loading: decode once, resize once, keep uint8 tensors in memory.

Layout expected under --data-root (default data/mvtec_ad):

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<name>_mask.png

Channel convention: every image is loaded as 3-channel RGB. Grayscale categories (screw, grid,
zipper) have their single channel repeated three times, so every model, metric and picture sees
the same (N, 3, H, W) shape and the Inception/LPIPS networks get the input they expect.

Splits:
    train = train/good minus a seeded validation fraction (never seen in training)
    val   = the held-out train/good images (used to calibrate detection thresholds)
    test  = all of test/, with label 0 (good) / 1 (defect), defect type, and a binary mask

A run that zooms (train.decide_zoom: a small part anywhere on a plain table) has every image and
mask cut to a window around its part before the resize (part_box, cut_window); where those
parts are long and lie at any angle, the window turns with each part's long axis.

Run as a script: `python data.py --synthetic DIR` writes a small synthetic category (a test
fixture, not a benchmark), `python data.py --download CATEGORY` fetches MVTec AD.
"""
import argparse
import collections
import glob
import hashlib
import http.client
import math
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError
from tqdm import tqdm

DEFAULT_ROOT = "data/mvtec_ad"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz")
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_ARCHIVE = "mvtec_anomaly_detection.tar.xz"
MVTEC_LICENSE = ("MVTec AD is licensed CC BY-NC-SA 4.0 (non-commercial use only); cite Bergmann et al., "
                 "'MVTec AD - A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection', CVPR 2019")
LAYOUT_HELP = (
    "expected <root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png and "
    "<root>/<category>/ground_truth/<defect>/<name>_mask.png; get MVTec AD with --download or "
    "from https://www.mvtec.com/company/research/datasets/mvtec-ad"
)


class DatasetError(Exception):
    """Bad or missing input data. Scripts print it as one line and exit."""


@dataclass
class Split:
    """One split held in memory. images: uint8 (N, 3, S, S); masks: uint8 {0, 1} (N, 1, S, S)."""

    images: torch.Tensor
    labels: torch.Tensor  # int64 (N,): 0 good, 1 defect
    masks: torch.Tensor
    defect_types: list
    paths: list
    unmasked: list = None  # defect types without ground_truth/<defect>/: no pixel metrics

    def __len__(self):
        return len(self.paths)


# ----------------------------------------------------------------------------- finding files

def categories_in(root):
    """The folders of root that hold train/good, by name."""
    return sorted(p.name for p in Path(root).iterdir() if (p / "train" / "good").is_dir())


def category_dir(root, category):
    """Check that <root>/<category> exists and looks like MVTec AD; return its path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root '{root}' does not exist; {LAYOUT_HELP}")
    if (root / "train" / "good").is_dir():
        raise DatasetError(
            f"'{root}' is itself a category folder: pass its parent as --data-root "
            f"and '{root.name}' as the category")
    cat = root / category
    if not cat.is_dir():
        raise DatasetError(
            f"category '{category}' not found in '{root}' (categories found: "
            f"{', '.join(categories_in(root)) or 'none'}); {LAYOUT_HELP}")
    return cat


def image_files(folder):
    """Image files of a folder, by name; macOS AppleDouble files ('._name.png', resource forks
    left by copying from a Mac) are not images and are skipped."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("._"))


def train_val_files(cat, val_fraction, seed):
    """Split train/good by a seeded permutation: the same seed always holds out the same images."""
    good = cat / "train" / "good"
    files = image_files(good) if good.is_dir() else []
    if not files:
        raise DatasetError(f"no images in '{good}'; {LAYOUT_HELP}")
    if len(files) < 2:
        raise DatasetError(f"'{good}' holds one image; at least two are needed: one to train on and one "
                           "held out to set the detection threshold")
    n_val = int(round(len(files) * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(files) - 1)
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


class SplitChanged(DatasetError):
    """Files of a recorded train/val split are gone or changed since training."""


def file_record(path):
    """What identifies one image file: its name, size in bytes and SHA-256."""
    digest = sha256_of(path)  # first: an unreadable file or a link to nowhere is its one-line error
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest}


def split_record(root, category, val_fraction, seed):
    """The train/val split of train/good as it is now, file by file: train.py stores it in every
    checkpoint, so detection and evaluation use exactly the images held out from training,
    whatever happens to the folder, the seed or --val-fraction later."""
    train, val = train_val_files(category_dir(root, category), val_fraction, seed)
    return {"folder": "train/good", "val_fraction": val_fraction, "seed": seed,
            "train": [file_record(p) for p in train], "val": [file_record(p) for p in val]}


def split_files(root, category, record, which):
    """Paths of the recorded 'train' or 'val' files, each checked against its recorded size and
    SHA-256. Files added to the folder since are not used; missing or changed ones are an error."""
    folder = category_dir(root, category) / record["folder"]
    paths, missing, changed = [], [], []
    for r in record[which]:
        path = folder / r["name"]
        paths.append(path)
        if not path.is_file():
            missing.append(r["name"])
        elif path.stat().st_size != r["bytes"] or sha256_of(path) != r["sha256"]:
            changed.append(r["name"])
    if missing or changed:
        def some(names):
            return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        problems = ([f"{len(missing)} missing ({some(missing)})"] if missing else []) + \
                   ([f"{len(changed)} changed ({some(changed)})"] if changed else [])
        use = ("the detection threshold is calibrated on exactly these held-out images" if which == "val"
               else "they are the images the model was trained on")
        raise SplitChanged(f"of the {len(record[which])} {which} images recorded in the checkpoint, "
                           f"{' and '.join(problems)} in '{folder}'; {use}: restore them, or train a "
                           "new model on the folder as it is now")
    return paths


def test_files(cat):
    """(image path, defect type, mask path or None) for every test image, good ones first.
    A defect type without a ground_truth/<defect>/ folder is labelled by its folder alone (the
    usual case for a user's own data): its masks are None. Inside a ground_truth/<defect>/ folder
    every image needs its mask."""
    test = cat / "test"
    if not test.is_dir():
        raise DatasetError(f"no test folder '{test}' (images without labels: detect.py --images PATH ...); "
                           f"{LAYOUT_HELP}")
    entries = []
    for defect_dir in sorted(test.iterdir(), key=lambda p: (p.name != "good", p.name)):
        if not defect_dir.is_dir():
            continue
        masked = (cat / "ground_truth" / defect_dir.name).is_dir()
        for path in image_files(defect_dir):
            mask = None
            if defect_dir.name != "good" and masked:
                mask = cat / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"defect image '{path}' has no mask (looked for '{mask}')")
            entries.append((path, defect_dir.name, mask))
    if not entries:
        raise DatasetError(f"no images under '{test}'; {LAYOUT_HELP}")
    return entries


# ----------------------------------------------------------------------------- download

def sha256_of(path):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:  # no read permission, a broken link, a disk error: one line, not a traceback
        raise DatasetError(f"cannot read '{path}' ({e.strerror or e})") from None
    return digest.hexdigest()


def download_file(url, dest, sha256):
    """Fetch url to dest, resuming a partial `dest.part` with an HTTP Range request, then verify.

    A checksum mismatch deletes the download (a corrupt file must not be resumed) and raises.
    """
    dest, part = Path(dest), Path(f"{dest}.part")
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored Range: start again
                have = 0
            total = response.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=dest.name) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        if total is not None and part.stat().st_size < total:  # connection dropped early
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DatasetError(f"download of {url} failed ({e}); run again to resume, "
                           f"or lay the data out by hand: {LAYOUT_HELP}") from None
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise DatasetError(f"checksum mismatch for {dest.name}: expected {sha256}, got {got}; "
                           "the download was deleted, run again")
    os.replace(part, dest)
    return dest


def safe_members(archive, category):
    """Members under <category>/ that stay inside the target folder: no absolute paths, no '..',
    no links (the tarfile 'data' filter enforces the same again when extracting)."""
    for m in archive.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith("/") or ".." in parts or m.issym() or m.islnk():
            continue
        if parts and parts[0] == category:
            yield m


def extract_category(archive_path, root, category):
    """Extract one category into a temporary folder inside root, then rename it into place, so an
    interrupted extraction never leaves a half category that looks complete."""
    root = Path(root)
    tmp = root / f".{category}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive_path, "r:*") as archive:
        members = list(safe_members(archive, category))
        if not members:
            raise DatasetError(f"'{archive_path}' holds no category '{category}'")
        archive.extractall(tmp, members=members, filter="data")
    os.replace(tmp / category, root / category)
    shutil.rmtree(tmp)
    return root / category


def ensure_category(root, category, download=False, url=MVTEC_URL, sha256=MVTEC_SHA256):
    """Return <root>/<category>, downloading and extracting MVTec AD first if asked and missing."""
    if (Path(root) / category / "train" / "good").is_dir() or not download:
        return category_dir(root, category)
    if url == MVTEC_URL and category not in MVTEC_CATEGORIES:
        raise DatasetError(f"'{category}' is not an MVTec AD category ({', '.join(MVTEC_CATEGORIES)})")
    Path(root).mkdir(parents=True, exist_ok=True)
    print(f"downloading MVTec AD (about 4.9 GB) into {root}. {MVTEC_LICENSE}.")
    archive = download_file(url, Path(root) / MVTEC_ARCHIVE, sha256)
    return extract_category(archive, root, category)


# ----------------------------------------------------------------------------- where the part is

# A plain table is one whose colour changes slowly across the image: one colour, or a lamp to one
# side and a lens darker at the corners. Each image's table is the surface, quadratic in x and y
# per channel, fitted to those of the image's own outer BORDER px near their median colour (a part
# touching the edge does not pull it), then again to those within PLAIN_TOLERANCE of that fit (the
# far ends of a lit table come back). One colour for every image called a table about 40 levels
# darker at its corners than at its centre not plain (79 % of its border within the tolerance);
# the fitted surfaces call it plain (RESULTS.md, "A table lit unevenly").
PLAIN_TOLERANCE = 16 / 255  # colour distance (RGB, 0-1) within which a pixel shows the table
PLAIN_SHARE = 0.95  # share of the training images' border pixels that must lie that close
BORDER = 2  # px of each edge the table is fitted to


def centred(start, count, total):
    """Centred coordinates (-0.5 .. 0.5 of total) of pixels start .. start + count - 1."""
    return (torch.arange(start, start + count, dtype=torch.float64) + 0.5) / total - 0.5


def table_basis(v, u):
    """(..., 6): the terms of a quadratic in the centred row and column coordinates v, u."""
    return torch.stack([torch.ones_like(u), u, v, u * u, v * v, u * v], -1)


def table_fit(images):
    """(tables (N, 3, 6), off (N, K)) for uint8 images (N, 3, H, W): each image's table as the
    coefficients of table_basis (centred coordinates of that image), and the colour distance (0-255)
    of each of its K border pixels from it."""
    n, _, height, width = images.shape
    ring = torch.ones(height, width, dtype=torch.bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    v, u = torch.meshgrid(centred(0, height, height), centred(0, width, width), indexing="ij")
    basis, values = table_basis(v[ring], u[ring]), images[..., ring].double()  # (K, 6), (N, 3, K)
    off = (values - values.median(-1, keepdim=True).values).norm(dim=1)
    for reach in (2 * PLAIN_TOLERANCE, PLAIN_TOLERANCE):  # near the median colour, then near the first fit
        weights = (off <= reach * 255).double()  # weighted least squares: (B' W B) t = B' W y
        gram = torch.einsum("kp,nk,kq->npq", basis, weights, basis) + 1e-9 * torch.eye(6, dtype=torch.float64)
        moments = torch.einsum("kp,nk,nck->ncp", basis, weights, values)
        tables = torch.linalg.solve(gram[:, None], moments[..., None])[..., 0]
        off = (values - tables @ basis.T).norm(dim=1)
    return tables, off


def table_surface(tables, v, u):
    """(N, 3, len(v), len(u)) float: the tables (N, 3, 6) at centred coordinates v (rows), u (columns)."""
    v, u = torch.meshgrid(v, u, indexing="ij")
    return torch.einsum("ncp,hwp->nchw", tables, table_basis(v, u))


def plain_background(images):
    """(plain, share): the share of the training images' (uint8 N, 3, S, S) border pixels within
    PLAIN_TOLERANCE of their own image's table, and whether it reaches PLAIN_SHARE."""
    share = float((table_fit(images)[1] <= PLAIN_TOLERANCE * 255).double().mean())
    return share >= PLAIN_SHARE, share


def whole_tables(tables, height, width):
    """(N, 3, height, width) float: the tables (N, 3, 6) over a whole image of that size."""
    return table_surface(tables, centred(0, height, height), centred(0, width, width))


def tables_of(images):
    """(N, 3, S, S) float: each image's (uint8 N, 3, S, S) table over the whole image."""
    return whole_tables(table_fit(images)[0], *images.shape[-2:])


# A table may also be mottled: a plate's faint blotches, a few levels either way, each a few
# pixels across at 128 px. Its border still counts as plain, but at the 16/255 tolerance the
# blotches' darkest and brightest spots count as part, all over the frame: on grey tables with
# blotches of 3 levels a small part's box spread to 84-100 % of the frame (RESULTS.md, "A mottled
# table"), and zoom was refused. So a pixel counts as part only where it also lies farther from the
# table than SPECK_MARGIN times the median distance of the image's border from it. The median
# stays put while a part covers less than half the border. Every table measured here has a border
# median of at most 1.1 levels, so its tolerance stays 16/255.
SPECK_MARGIN = 8


def part_tolerance(off):
    """(N,) colour distance (0-255) beyond which a pixel shows a part, not the table: the larger of
    PLAIN_TOLERANCE and SPECK_MARGIN times the median of each image's border distances (off, (N, K),
    from table_fit)."""
    return (SPECK_MARGIN * off.median(dim=1).values).clamp_min(PLAIN_TOLERANCE * 255)


def away_from(rgb, table, tolerance=PLAIN_TOLERANCE * 255):
    """bool (H, W): the pixels of a uint8 RGB array (H, W, 3) farther than tolerance (0-255) from
    the table (its colour, or its surface (H, W, 3)) once each is the median of its 3 x 3
    neighbourhood: the part, without the specks of noise a plain table still shows (the border
    rule lets 5 % of them through, and 1 % spread over the image would stretch the part's box to
    the whole frame)."""
    rgb = np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).filter(ImageFilter.MedianFilter(3)), np.float32)
    return np.linalg.norm(rgb - np.asarray(table, np.float32), axis=-1) > tolerance


# Dust on the table lies away from it too. One dark speck of a pixel at 128 px beside a part a
# quarter of the frame long stretched the part's box to 59-82 % of the frame and moved its centre
# by a fifth of it (RESULTS.md, "Dust on the table"). So the part is the largest connected piece
# of what lies away from the table and every piece within PART_REACH of it (a part that shows as
# several pieces, split by a glint of the table's colour, keeps them all).
PART_REACH = 0.05  # of the image's side


def main_part(away):
    """bool (H, W): the largest 8-connected piece of `away` (bool (H, W)) and every piece that comes
    within PART_REACH of it; `away` itself where it holds at most one piece."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(away.astype(np.uint8), connectivity=8)
    if count <= 2:
        return away
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    reach = max(1, round(PART_REACH * max(away.shape)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    near = cv2.dilate((labels == largest).astype(np.uint8), disc).astype(bool)
    pieces = np.unique(labels[near & away])
    return np.isin(labels, pieces[pieces > 0])


def parts_of(images):
    """(parts, tables) for uint8 images (N, 3, S, S): each image's part (bool (S, S): the main_part
    of what lies away_from its own table, beyond its part_tolerance) and its table (N, 3, 6, as
    table_fit)."""
    tables, off = table_fit(images)
    surfaces = whole_tables(tables, *images.shape[-2:]).permute(0, 2, 3, 1)
    parts = [main_part(away_from(x.permute(1, 2, 0).numpy(), surface.numpy(), tolerance))
             for x, surface, tolerance in zip(images, surfaces, part_tolerance(off).tolist())]
    return parts, tables


def part_span(part):
    """(centre y, centre x, height, width), fractions of the image, of the box from the 1st to the
    99th percentile of the part's rows and columns (bool (H, W)), so a speck of dust does not
    stretch it; the whole image where there is no part."""
    ys, xs = np.nonzero(part)
    if len(ys) == 0:
        return 0.5, 0.5, 1.0, 1.0
    (h, w), (y0, y1), (x0, x1) = part.shape, np.percentile(ys, [1, 99]), np.percentile(xs, [1, 99])
    return (y0 + y1 + 1) / 2 / h, (x0 + x1 + 1) / 2 / w, (y1 - y0 + 1) / h, (x1 - x0 + 1) / w


def part_axis(part, row_scale=1.0, column_scale=1.0):
    """(centre y, centre x, length, width, angle) of a part (bool (H, W)) in its own frame: the long
    axis is the principal direction of its pixels (covariance's larger eigenvector), pointed from
    its heavier end to its lighter one (the third moment of the pixels along it is positive: a
    screw's head at the start, its tip at the end); centre, length and width are those of the box
    from the 1st to the 99th percentile along and across it. Pixels, each row and column scaled (a
    square copy of an image of another shape), pixel (i, j) spanning [i, i + 1) x [j, j + 1); angle
    in radians from the x axis towards y."""
    ys, xs = np.nonzero(part)
    if len(ys) < 2:
        return part.shape[0] * row_scale / 2, part.shape[1] * column_scale / 2, 0.0, 0.0, 0.0  # no part
    points = np.stack([(xs + 0.5) * column_scale, (ys + 0.5) * row_scale], 1)
    points = points - points.mean(0)
    along = np.linalg.eigh(np.cov(points.T))[1][:, -1]  # unit vector (x, y)
    t = points @ along
    if (t ** 3).mean() < 0:  # the heavier end first
        along, t = -along, -t
    across = np.array([-along[1], along[0]])
    (t0, t1), (s0, s1) = np.percentile(t, [1, 99]), np.percentile(points @ across, [1, 99])
    mean = np.array([(xs.mean() + 0.5) * column_scale, (ys.mean() + 0.5) * row_scale])
    x, y = mean + along * (t0 + t1) / 2 + across * (s0 + s1) / 2
    return float(y), float(x), float(t1 - t0), float(s1 - s0), float(np.arctan2(along[1], along[0]))


@dataclass(frozen=True)
class Window:
    """Where a zoomed image is cut: box (left, top, right, bottom; whole pixels, reaching past the
    image's edges where need be) and, for a turned window, the angle (degrees, counter-clockwise)
    that lays its part's long axis left to right, and the side of the square then cut from the
    middle of the turned box (pixels)."""
    box: tuple
    degrees: float = 0.0
    side: int = 0


def part_box(im, zoom, size):
    """(window, table): the Window of the PIL RGB image im zoom["side"] times its width and height,
    centred on its part as found on a size x size copy, and the image's table (3, 6) found there.
    With zoom["turn"] the window is a square (zoom["side"] of the image's longer side) turned with
    the part's long axis (part_axis). The box may reach past the image's edges (cut_out fills
    there), so that every part lies in the middle of its window. train.decide_zoom says when and
    how large."""
    small = torch.from_numpy(np.asarray(im.resize((size, size), Image.BILINEAR)).copy()).permute(2, 0, 1)[None]
    parts, tables = parts_of(small)
    if zoom.get("turn"):
        cy, cx, _, _, angle = part_axis(parts[0], im.height / size, im.width / size)
        side = round(zoom["side"] * max(im.width, im.height))
        reach = math.ceil(side / math.sqrt(2)) + 1  # half the box that holds the window at any angle
        left, top = round(cx - reach), round(cy - reach)
        return Window((left, top, left + 2 * reach, top + 2 * reach), math.degrees(angle), side), tables[0]
    cy, cx, _, _ = part_span(parts[0])
    width, height = round(zoom["side"] * im.width), round(zoom["side"] * im.height)
    left, top = round(cx * im.width - width / 2), round(cy * im.height - height / 2)
    return Window((left, top, left + width, top + height)), tables[0]


def table_under(im, box, table):
    """PIL RGB image of the box's size: the image's table (3, 6) carried on past its edges, so a
    window reaching past them shows more of the same table, with no seam."""
    left, top, right, bottom = box
    rows, columns = centred(top, bottom - top, im.height), centred(left, right - left, im.width)
    surface = table_surface(table[None], rows, columns)
    return Image.fromarray(surface[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy())


def cut_out(im, box, table=None):
    """The pixels of PIL image im inside box; where the box reaches past im's edges, its table
    (3, 6) carried on there (table_under), or black without one."""
    left, top, right, bottom = box
    past_edge = min(left, top) < 0 or right > im.width or bottom > im.height
    window = (table_under(im, box, table) if table is not None and past_edge
              else Image.new(im.mode, (right - left, bottom - top), 0))
    window.paste(im, (-left, -top))
    return window


def cut_window(im, window, table=None, resample=Image.BICUBIC):
    """The Window of PIL image im: its box cut out (cut_out), and for a turned window turned about
    the box's centre (resample: NEAREST keeps a mask binary) and cut to the square in its middle."""
    im = cut_out(im, window.box, table)
    if not window.side:
        return im
    im = im.rotate(window.degrees, resample=resample)
    start = (im.width - window.side) // 2
    return im.crop((start, start, start + window.side, start + window.side))


# ----------------------------------------------------------------------------- decoding

WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (older Pillow: "I")


def to_rgb(im):
    """Any mode MVTec-like data comes in -> 8-bit RGB with the same [0, 1] range.

    16-bit grey (I;16, or I) is scaled from 0..65535, 32-bit float grey (F) taken as 0..1;
    1-bit, 8-bit grey, palette and RGB convert as PIL does; alpha (RGBA, LA, PA) is dropped,
    keeping the colour. (PIL's own convert("RGB") clips 16-bit values at 255: all white.)"""
    if im.mode in WIDE_GREY_MODES or im.mode == "F":
        grey = np.asarray(im).astype(np.float64)
        grey = grey if im.mode == "F" else grey / 65535
        im = Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8), "L")
    return im.convert("RGB")


def mask_array(im):
    """A ground-truth mask of any mode as bool (H, W): non-zero = defect, so 0/1 and 0/255
    masks, 1-bit, 16-bit and palette masks all read the same (alpha is ignored)."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGB")  # palette index 0 need not be black: compare colours
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert(im.mode[:-1].upper())
    values = np.asarray(im)
    return values.any(-1) if values.ndim == 3 else values != 0


def read_zoomed(path, size, zoom=None):
    """(uint8 (3, S, S), window): the image decoded to RGB (grayscale repeated to 3 channels) and
    resized to size x size; with zoom, only the Window part_box finds around its part, and that
    window (None without zoom)."""
    try:
        with Image.open(path) as im:
            im, window = to_rgb(im), None
            if zoom is not None:
                window, table = part_box(im, zoom, size)
                im = cut_window(im, window, table)
            im = im.resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image '{path}': {e}") from None
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), window


def read_image(path, size, zoom=None):
    """uint8 (3, S, S): read_zoomed without its window."""
    return read_zoomed(path, size, zoom)[0]


def read_mask(path, size, image_path=None, window=None):
    """Nearest-neighbour resize keeps the mask binary: uint8 {0, 1} (1, S, S). Non-zero pixels
    are defect. With image_path, a mask of another size than its image is an error, not a
    silent resize (it would mark the wrong pixels). window: the image's zoom Window (read_zoomed)."""
    if path is None:
        return torch.zeros(1, size, size, dtype=torch.uint8)
    try:
        with Image.open(path) as im:
            if image_path is not None:
                with Image.open(image_path) as image:
                    if image.size != im.size:
                        raise DatasetError(
                            f"mask '{path}' is {im.size[0]}x{im.size[1]} but its image '{image_path}' "
                            f"is {image.size[0]}x{image.size[1]}; a mask must have its image's size")
            binary = Image.fromarray(mask_array(im).astype(np.uint8))
            binary = binary if window is None else cut_window(binary, window, resample=Image.NEAREST)
            binary = binary.resize((size, size), Image.NEAREST)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read mask '{path}': {e}") from None
    return torch.from_numpy(np.asarray(binary).astype(np.uint8))[None]


def decode_all(fn, items, desc):
    # PIL releases the GIL while decoding, so threads give a real speed-up on large PNGs.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, leave=False,
                         disable=len(items) < 50))


def load_split(root, category, split, size, val_fraction=0.1, seed=0, files=None, zoom=None):
    """Load one split ('train', 'val' or 'test') of a category into memory; files: the train or
    val paths to load (split_files of a checkpoint's record) instead of recomputing the split;
    zoom: each image (and its mask) cut to the window around its part (part_box)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}")
    cat = category_dir(root, category)
    why_empty = " (as recorded)" if files is not None else f" (--val-fraction {val_fraction})"
    if split == "test":
        entries = test_files(cat)
    else:
        if files is None:
            train, val = train_val_files(cat, val_fraction, seed)
            files = train if split == "train" else val
        entries = [(p, "good", None) for p in files]
    if not entries:
        raise DatasetError(f"split '{split}' of '{cat}' is empty{why_empty}")
    images, windows = zip(*decode_all(lambda e: read_zoomed(e[0], size, zoom), entries, f"decode {category}/{split}"))
    masks = decode_all(lambda i: read_mask(entries[i][2], size, entries[i][0], windows[i]), range(len(entries)),
                       f"masks {category}/{split}")
    return Split(
        images=torch.stack(images),
        labels=torch.tensor([int(d != "good") for _, d, _ in entries]),
        masks=torch.stack(masks),
        defect_types=[d for _, d, _ in entries],
        paths=[str(p) for p, _, _ in entries],
        unmasked=sorted({d for _, d, m in entries if d != "good" and m is None}),
    )


def expand_images(patterns):
    """Image files named by files, folders (their images, by name) or globs, in the order given,
    each once. A pattern that names no image is an error: a typo must not score nothing."""
    found = {}
    for pattern in patterns:
        path = Path(pattern)
        matches = [path] if path.exists() else [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        files = []
        for m in matches:
            if m.is_dir():
                files += image_files(m)
            elif m.is_file() and (m.suffix.lower() in IMAGE_EXTENSIONS or m == path):
                files.append(m)
        if not files:
            raise DatasetError(f"--images '{pattern}' matches no image files "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        found.update(dict.fromkeys(files))
    return [str(p) for p in found]


def decoded_batches(paths, size, batch_size, workers=None, zoom=None):
    """Yield (paths, uint8 images (B, 3, S, S)) batch by batch, decoding ahead in a thread pool
    (PIL releases the GIL), so the caller scores one batch while the next ones decode; zoom as
    in load_split."""
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]

    def finish(chunk, futures):
        return chunk, torch.stack([f.result() for f in futures])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = collections.deque()
        for chunk in chunks:
            ahead.append((chunk, [pool.submit(read_image, p, size, zoom) for p in chunk]))
            if len(ahead) > 2:  # two batches decoding while the caller works on one
                yield finish(*ahead.popleft())
        while ahead:
            yield finish(*ahead.popleft())


def to_float(images_uint8, device=None):
    """uint8 (N, 3, S, S) -> float32 in [0, 1] on device; done per batch, not per dataset."""
    return images_uint8.to(device, non_blocking=True).float().div_(255)


# ----------------------------------------------------------------------------- synthetic data

def synthetic_image(rng, size, grayscale):
    """A bright ring ('bottle seen from above') on a noisy background, slightly jittered."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = 0.5 + rng.normal(0, 0.02, 2)
    r = np.hypot(yy - cy, xx - cx)
    ring = np.exp(-((r - 0.3) / 0.06) ** 2)
    base = 0.25 + 0.5 * ring + rng.normal(0, 0.02, (size, size))
    tint = np.array([1.0, 0.9, 0.7]) if not grayscale else np.ones(3)
    return np.clip(base[..., None] * tint, 0, 1)


def add_synthetic_defect(rng, img, size):
    """Paint a dark blob or a bright scratch; return the image and its binary mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    if rng.random() < 0.5:
        cy, cx, rad = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [max(2, size // 10)]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2
        img[mask] = 0.05
    else:
        y0 = int(rng.integers(size // 4, 3 * size // 4))
        mask[y0:y0 + max(1, size // 32), size // 5: 4 * size // 5] = True
        img[mask] = 1.0
    return img, mask


def make_synthetic_category(root, category="synthetic", size=64, n_train=24, n_good_test=4,
                            n_defect_test=4, grayscale=False, seed=0):
    """Write a tiny category in the MVTec layout (a test fixture: never report quality on it)."""
    rng = np.random.default_rng(seed)
    cat = Path(root) / category
    mode = "L" if grayscale else "RGB"

    def save(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (arr * 255).round().astype(np.uint8)
        Image.fromarray(pixels[..., 0] if grayscale else pixels, mode).save(path)

    for i in range(n_train):
        save(synthetic_image(rng, size, grayscale), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good_test):
        save(synthetic_image(rng, size, grayscale), cat / "test" / "good" / f"{i:03d}.png")
    for defect in ("blob_or_scratch",):
        for i in range(n_defect_test):
            img, mask = add_synthetic_defect(rng, synthetic_image(rng, size, grayscale), size)
            save(img, cat / "test" / defect / f"{i:03d}.png")
            mask_path = cat / "ground_truth" / defect / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(mask_path)
    return cat


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help for every script: shows defaults, except None/False (those say in words what they
    default to), and keeps the line breaks of descriptions and epilogs."""

    def _get_help_string(self, action):
        hidden = action.default is None or action.default is False  # `is`: a default of 0 is shown
        return action.help if hidden else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The parser of every script: HelpFormatter, and options spelt in full (an abbreviation such
    as detect.py --out would otherwise be read silently as another option, --outputs)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kw)


def main():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--download", metavar="CATEGORY", help="download MVTec AD and extract CATEGORY")
    p.add_argument("--data-root", default=DEFAULT_ROOT, help="folder holding the categories")
    p.add_argument("--synthetic", metavar="DIR", help="write a small synthetic category into DIR")
    p.add_argument("--category", default="synthetic", help="name of the synthetic category")
    p.add_argument("--size", type=int, default=128, help="side of the synthetic images")
    p.add_argument("--grayscale", action="store_true", help="write single-channel images")
    args = p.parse_args()
    if args.download:
        print(f"ready: {ensure_category(args.data_root, args.download, download=True)}")
    elif args.synthetic:
        cat = make_synthetic_category(args.synthetic, args.category, size=args.size,
                                      n_train=60, n_good_test=10, n_defect_test=10,
                                      grayscale=args.grayscale)
        print(f"wrote synthetic category to {cat} (a test fixture: do not report quality on it)")
    else:
        p.print_help()


if __name__ == "__main__":
    try:
        main()
    except DatasetError as e:
        sys.exit(f"error: {e}")
