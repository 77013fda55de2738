"""Checks on what the user hands the scripts: arguments, output folders, checkpoints, results.

train.py, detect.py and evaluate.py call these before the work where they can, so that bad
input costs one `error: ...` line (exit 1), or argparse's own error line (exit 2) for an
argument, and never a traceback, a silently wrong number or a lost run. Every problem found
after parsing is a RunError, which each script prints as one line.
"""
import argparse
import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import data
from models import MODELS, build_model


class RunError(Exception):
    """A problem the user can fix (bad checkpoint, unwritable folder, ...): printed as one line."""


def first_line(e, limit=160):
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


# ----------------------------------------------------------------------------- argparse types
# Each returns the parsed value or raises ArgumentTypeError, which argparse prints as its one
# line "<script>: error: argument --x: <message>" (exit 2).

def _parse(text, kind, ok, wanted):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got '{text}'") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got '{text}'")
    return value


def positive_int(text):
    return _parse(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text):
    return _parse(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text):
    return _parse(text, float, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text):
    return _parse(text, float, lambda v: v >= 0, "a finite number >= 0")


def finite_float(text):
    return _parse(text, float, lambda v: True, "a finite number")


def open_fraction(text):
    """A fraction strictly between 0 and 1 (the val split: both parts must be non-empty)."""
    return _parse(text, float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")


def unit_fraction(text):
    return _parse(text, float, lambda v: 0 <= v <= 1, "a fraction from 0 to 1")


def category_name(text):
    """A category name; a trailing slash (shell completion of a folder) is dropped."""
    name = text.strip().rstrip("/\\")
    if not name or "/" in name or "\\" in name:
        raise argparse.ArgumentTypeError(f"must be a category name such as bottle, not a path: '{text}'")
    return name


def device_name(text):
    """'auto', or a device this machine has: 'cuda' without CUDA fails here, not mid-run."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device '{text}' (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"'{text}': this machine has no usable CUDA device (torch.cuda.is_available() is "
                "False); use --device cpu or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"'{text}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"'{text}': MPS is not available here; use --device cpu")
    return text


# ----------------------------------------------------------------------------- models and sizes

def check_model_config(name, config, flag="--size"):
    """Build the model once (cheaply, before any data is read) so a size or latent setting the
    architecture cannot take fails with the model's own message."""
    try:
        with torch.device("meta"):
            build_model(name, **config)
    except (ValueError, TypeError) as e:
        others = ", ".join(f"{k}={v}" for k, v in config.items() if k != "image_size")
        raise RunError(f"{name} cannot be built with {flag} {config.get('image_size')}"
                       f"{f' ({others})' if others else ''}: {first_line(e)}") from None


def check_topk(score, topk, size):
    if score == "topk" and topk > size * size:
        raise RunError(f"--topk {topk} is more than the {size * size} pixels of a {size} px map, so it "
                       f"would score the whole-map mean; pass at most {size * size}")


# ----------------------------------------------------------------------------- output folders

def writable_dir(path, flag):
    """Create the folder if needed and prove it takes a file, before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunError(f"{flag} '{path}' is a file, not a folder: pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise RunError(f"{flag} '{path}' cannot be written ({e.strerror or first_line(e)}): pass a "
                       "folder you can write to") from None
    return path


RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.csv", "recon.png", "samples.png")


def claim_run_dir(out, resume, overwrite):
    """Check, before any work, the output folder of a training run. An existing run there is
    never replaced silently: --resume continues it, --overwrite replaces it (clear_run, once the
    data and the model are ready), anything else is refused."""
    if resume and overwrite:
        raise RunError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    out = writable_dir(out, "--out")
    found = [name for name in RUN_FILES[:3] if (out / name).exists()]
    if found and not (resume or overwrite):
        raise RunError(f"'{out}' already holds a trained run ({', '.join(found)}); continue it with "
                       "--resume, replace it with --overwrite, or pass another --out")
    return out


def clear_run(out):
    """--overwrite: delete the old run's files, so none of them is mistaken for the new run's."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(out) / name).unlink()


def write_atomic(path, write, binary=False):
    """write(file) into <path>.tmp, then rename over path: the old file survives any failure.
    A full disk or a vanished folder becomes one line that says what was kept."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # a Python file object: torch.save to a path reports a full disk as a RuntimeError
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = (f"the previous '{path.name}' is kept intact" if path.exists()
                else f"no '{path.name}' was written")
        raise RunError(f"could not write '{path}' ({e.strerror or first_line(e)}); {kept}: free disk "
                       "space, then run again (train.py continues from the last saved epoch with "
                       "--resume)") from None
    except BaseException:  # Ctrl-C mid-write: leave no partial file behind either
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
