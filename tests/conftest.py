"""Shared fixtures: tiny synthetic categories in the MVTec layout, built once per test session."""
import os
import sys
from pathlib import Path

# Tiny tensors on a small shared machine: one thread each avoids oversubscription stalls
# (set before torch is imported, inherited by the subprocesses the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

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
