"""Shared fixtures: tiny synthetic categories in the MVTec layout, built once per test session."""
import os
import sys
from pathlib import Path

# Tiny tensors on a small shared machine: one thread each avoids oversubscription stalls
# (set before torch is imported, inherited by the subprocesses the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402


@pytest.fixture(scope="session")
def rgb_root(tmp_path_factory):
    """<root>/synthetic: 24 train/good, 4 test/good, 4 defects with masks, RGB, 64 px."""
    root = tmp_path_factory.mktemp("mvtec_rgb")
    data.make_synthetic_category(root, "synthetic", size=64)
    return root


@pytest.fixture(scope="session")
def gray_root(tmp_path_factory):
    """The same layout with single-channel (grayscale) PNGs, like screw, grid and zipper."""
    root = tmp_path_factory.mktemp("mvtec_gray")
    data.make_synthetic_category(root, "synthetic_gray", size=64, grayscale=True, seed=1)
    return root


def unevenly_lit(n=6, size=64, part=12):
    """uint8 (N, 3, size, size): a bright square part at random places on a table lit from the
    left and darker towards the corners (58 to 100 at its border: no one colour holds it), with
    its light falling on the part too."""
    gen = torch.Generator().manual_seed(0)
    v, u = torch.meshgrid(data.centred(0, size, size), data.centred(0, size, size), indexing="ij")
    light = 100 - 60 * (u ** 2 + v ** 2) - 30 * u + 40 * (u ** 2 * v ** 2)  # not quite a quadratic
    x = light.expand(n, 3, size, size).clone()
    for i in range(n):
        y0, x0 = torch.randint(4, size - part - 4, (2,), generator=gen)
        x[i, :, y0:y0 + part, x0:x0 + part] += 120
    return x.round().clamp(0, 255).to(torch.uint8)


def mottled(n=4, size=128, part=16, amplitude=3.0, seed=0):
    """uint8 (N, 3, size, size): a dark square part at random places on a grey table with faint
    blotches (smoothed noise, `amplitude` levels RMS, a few px across), as a plate shows them."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        blotches = cv2.GaussianBlur(rng.normal(size=(size, size)), (0, 0), 4)
        x = 180 + amplitude * blotches / blotches.std()
        y0, x0 = rng.integers(8, size - part - 8, size=2)
        x[y0:y0 + part, x0:x0 + part] = 60
        images.append(np.repeat(x[None], 3, 0))
    return torch.from_numpy(np.stack(images)).round().clamp(0, 255).to(torch.uint8)


def long_part(size, angle, centre, length=60, shank=5, head=12, head_length=14):
    """bool (size, size): a screw-like part, a shank `shank` px wide and a wider head at its start,
    its axis from head to tip at `angle` (radians, from x towards y) through `centre` (y, x)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    u = (x - centre[1]) * np.cos(angle) + (y - centre[0]) * np.sin(angle)
    v = -(x - centre[1]) * np.sin(angle) + (y - centre[0]) * np.cos(angle)
    along = np.abs(u) < length / 2
    return along & ((np.abs(v) < shank / 2) | ((u < -length / 2 + head_length) & (np.abs(v) < head / 2)))


def write_small_parts(root, category="small_parts", size=96, part=20, n_train=24, seed=0):
    """A small part (a bright L with grain) anywhere on a plain dark table, in the MVTec layout:
    n_train train/good, 4 test/good, 4 test/spot (a dark spot on the part, masked). A screw on
    a table in miniature: the part spans about a fifth of the frame, at changing places."""
    rng = np.random.default_rng(seed)
    cat = Path(root) / category

    def image(spot):
        x = np.full((size, size, 3), 24, np.uint8)
        y0, x0 = rng.integers(2, size - part - 2, size=2)
        piece = np.zeros((part, part), bool)
        piece[:, :6] = piece[-6:, :] = True
        x[y0:y0 + part, x0:x0 + part][piece] = rng.integers(180, 230, (int(piece.sum()), 3))
        mask = np.zeros((size, size), np.uint8)
        if spot:
            mask[y0 + part - 5:y0 + part - 1, x0 + 8:x0 + 12] = 255
            x[mask > 0] = 40
        return x, mask

    for folder, n, spot in (("train/good", n_train, False), ("test/good", 4, False), ("test/spot", 4, True)):
        (cat / folder).mkdir(parents=True)
        for i in range(n):
            x, mask = image(spot)
            Image.fromarray(x).save(cat / folder / f"{i:03d}.png")
            if spot:
                (cat / "ground_truth/spot").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(cat / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def small_parts_root(tmp_path_factory):
    """<root>/small_parts: write_small_parts' category."""
    return write_small_parts(tmp_path_factory.mktemp("mvtec_small"))
