"""Checks on what the user hands the scripts: arguments, output folders, checkpoints, results.

train.py, detect.py and evaluate.py call these before the work where they can, so that bad
input costs one `error: ...` line (exit 1), or argparse's own error line (exit 2) for an
argument, and never a traceback, a silently wrong number or a lost run. Every problem found
after parsing is a RunError, which each script prints as one line.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import data
from models import MODELS, build_model, load_model


class RunError(Exception):
    """A problem the user can fix (bad checkpoint, unwritable folder, ...): printed as one line."""


class CheckpointError(RunError):
    """A checkpoint file that cannot be used: missing, empty, truncated, foreign or non-finite."""


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
    architecture cannot take fails with the model's own message. Returns the model's full
    config (its own defaults filled in), what --resume compares with the checkpoint's."""
    try:
        with torch.device("meta"):
            return build_model(name, **config).config
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
    """write(file) into a temporary file of this process beside path, on disk (fsync), then
    rename it over path: the old file survives any failure, a power cut included. A full disk or
    a vanished folder becomes one line that says what was kept."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        # a Python file object: torch.save to a path reports a full disk as a RuntimeError
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = (f"the previous '{path.name}' is kept intact" if path.exists()
                else f"no '{path.name}' was written")
        remedy = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check that its folder can be written"
        raise RunError(f"could not write '{path}' ({e.strerror or first_line(e)}); {kept}: {remedy}, then run "
                       "again (train.py continues from the last saved epoch with --resume)") from None
    except BaseException:  # Ctrl-C mid-write: leave no partial file behind either
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ----------------------------------------------------------------------------- strict results

def finite_or_none(value):
    """Plain JSON values: numpy scalars to Python, NaN and infinities to None (JSON null)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, obj):
    """Strict JSON (null, never NaN), written atomically: a reader never sees half a file."""
    write_atomic(path, lambda f: json.dump(finite_or_none(obj), f, indent=2, allow_nan=False))


def require_finite(source, **arrays):
    """Stop when maps or scores hold NaN or inf: reported as numbers they would look like a
    result (AUROC 0.5, nothing flagged)."""
    for what, values in arrays.items():
        values = np.asarray(values)
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(1)
        if bad.any():
            raise RunError(f"the {what.replace('_', ' ')} of {int(bad.sum())} of {len(values)} images "
                           f"are not finite (NaN or inf): the model in '{source}' produces non-finite "
                           "output; retrain it (its metrics.csv shows where the loss diverged)")


# ----------------------------------------------------------------------------- checkpoints

REQUIRED_KEYS = ("model_name", "model_args", "model_state")
RESUME_KEYS = ("optimizer_state", "stage_index", "epoch", "step", "best_val", "config")


def _read(path, device):
    """The checkpoint dict, or the reason it cannot be used (a string)."""
    path = Path(path)
    if not path.is_file():
        return None, "not found"
    if path.stat().st_size == 0:
        return None, "is empty (0 bytes)"
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing on them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, a random pickle, text, ...: all mean "unreadable"
        why = first_line(e, 100)
        if why.startswith("Weights only load failed"):  # torch's long advice is about trusted files
            why = "it holds objects other than tensors and plain values"
        return None, f"cannot be read: truncated, corrupt or not a PyTorch checkpoint ({type(e).__name__}: {why})"
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        return None, (f"is not a train.py checkpoint (it has no {', '.join(missing)}; a bare "
                      "state_dict or another program's file?)")
    if ckpt["model_name"] not in MODELS:
        return None, f"names an unknown model '{ckpt['model_name']}' (known: {', '.join(MODELS)})"
    bad = [k for k, v in ckpt["model_state"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        return None, (f"holds non-finite (NaN or inf) weights in {bad[0]}"
                      f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}: the run "
                      "diverged or the file is damaged; retrain")
    return ckpt, None


def intact_sibling(path, device="cpu"):
    """Another checkpoint of the same run (best.pt / checkpoint.pt) that reads fine, or None."""
    path = Path(path)
    for name in ("checkpoint.pt", "best.pt"):
        other = path.with_name(name)
        if other.name != path.name and other.is_file() and _read(other, device)[0] is not None:
            return other
    return None


def read_checkpoint(path, device="cpu", use_hint="pass it with --checkpoint"):
    """A train.py checkpoint dict, checked; every failure is one CheckpointError line that names
    an intact checkpoint.pt / best.pt beside the broken file when there is one."""
    ckpt, problem = _read(path, device)
    if ckpt is None:
        sibling = intact_sibling(path, device) if Path(path).is_file() else None
        hint = f"; '{sibling}' beside it is intact: {use_hint}" if sibling else ""
        raise CheckpointError(f"checkpoint '{path}' {problem}{hint}")
    return ckpt


def load_weights(model, ckpt, path):
    """model.load_state_dict(ckpt['model_state']) with one line, not a traceback, on a mismatch.
    The objective's weights (RESUME_FOLLOWS: --ssim-weight, ...) may differ: they are no weights."""
    diff = sorted(k for k in set(model.config) | set(ckpt["model_args"])
                  if k not in RESUME_FOLLOWS and model.config.get(k) != ckpt["model_args"].get(k))
    if diff:
        raise CheckpointError(
            f"checkpoint '{path}' was trained with other model settings ("
            + ", ".join(f"{k}={ckpt['model_args'].get(k)} vs {model.config.get(k)} now" for k in diff) + ")")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as e:
        raise CheckpointError(weights_mismatch(path, ckpt["model_name"], e)) from None


def load_checkpoint(path, device="cpu", expected=None, advice=None, use_hint="pass it with --checkpoint"):
    """(model in eval mode, checkpoint): read_checkpoint, then models.load_model, every failure
    one line. expected: the model the user asked for (--model); a checkpoint of another model is
    refused."""
    ckpt = read_checkpoint(path, device, use_hint)
    actual = ckpt["model_name"]
    if expected and actual != expected:
        advice = advice or f"pass a {expected} checkpoint, or drop --model to run the {actual}"
        raise CheckpointError(f"checkpoint '{path}' holds a {actual} model, not a {expected}: {advice}")
    try:
        return load_model(ckpt, device)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint '{path}' has model settings its {actual} does "
                              f"not take ({first_line(e)})") from None
    except RuntimeError as e:
        raise CheckpointError(weights_mismatch(path, actual, e)) from None


def weights_mismatch(path, name, error):
    # load_state_dict's first line only says that loading failed; its second says which weights
    lines = str(error).strip().splitlines()
    detail = first_line(lines[1].strip() if len(lines) > 1 else error, 120)
    return (f"the weights in '{path}' do not fit its {name} ({detail}): was it written by another "
            "version of models.py?")


# ----------------------------------------------------------------------------- resuming

# settings that fix the data split, the batches or the architecture: a resumed run must keep them
RESUME_FIXED = {"model": "--model", "category": "--category", "size": "--size", "seed": "--seed",
                "val_fraction": "--val-fraction", "batch_size": "--batch-size",
                "latent_dim": "--latent-dim", "width": "--width", "bottleneck": "--bottleneck",
                "beta": "--beta", "no_ema": "--no-ema", "zoom": "--zoom", "rotate": "--rotate", "moved": "--moved",
                "shift": "--shift"}
# settings a resumed run takes from the command line, where given, from the resumed epoch on: the
# schedule of every stage (--epochs/--lr, --<stage>-epochs/--<stage>-lr) and the objective's weights
RESUME_FOLLOWS = {"epochs": "--epochs", "lr": "--lr",
                  **{f"{stage}_{what}": f"--{stage}-{what}" for cls in MODELS.values()
                     for stage in cls.stages[1:] for what in ("epochs", "lr")},
                  "anomaly_fraction": "--anomaly-fraction", "removed": "--removed", "ssim_weight": "--ssim-weight",
                  "ssim_warmup": "--ssim-warmup", "lpips_weight": "--lpips-weight"}


def read_resume(out, config, device, model_config=None):
    """The checkpoint --resume continues, checked against this run's settings (config: a dict of
    the parsed arguments; model_config: the config of the model they build, its own defaults
    filled in, compared with the checkpoint's model_args): a setting that changes the data, the
    batches or the model is refused."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at '{path}'; train without --resume first")
    ckpt = read_checkpoint(path, device, use_hint="resume reads checkpoint.pt only: start over with "
                                                  "--overwrite, or train into another --out")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume: '{path}' has no {', '.join(missing)}, so it cannot be "
                              "continued; start over with --overwrite")
    model_config, trained = model_config or {}, ckpt["model_args"]
    was = {**ckpt["config"], **{k: v for k, v in trained.items() if k in model_config}}
    config = {**config, **{k: v for k, v in model_config.items() if k in trained}}
    changed = [(flag, was.get(key), config.get(key)) for key, flag in RESUME_FIXED.items()
               if key in was and was[key] != config.get(key)]
    if changed:
        flag, old, new = changed[0]
        more = f" (and {', '.join(c[0] for c in changed[1:])})" if len(changed) > 1 else ""
        raise CheckpointError(
            f"--resume: {flag} is {new} but the run in '{out}' used {old}{more}; the split, the batches "
            "and the model stay as they were on resume: pass the run's value, or start over with --overwrite")
    for key, flag in RESUME_FOLLOWS.items():  # those left out follow the run (train.follow_run)
        if key in was and was[key] != config.get(key) and key not in config.get("not_given", ()):
            print(f"note: --resume: {flag} {config.get(key)} (the run had {was[key]}) applies from the "
                  "resumed epoch on")
    return ckpt


def split_of(ckpt, path, root, category):
    """The train/val file record stored in the checkpoint. A checkpoint from before records were
    kept gets the split recomputed from its seed and val fraction, with a warning."""
    if ckpt.get("split"):
        return ckpt["split"]
    cfg = ckpt.get("config", {})
    print(f"warning: '{path}' does not record its train/val files (written by an older train.py); "
          f"the val split is recomputed from seed {cfg.get('seed', 0)} and val fraction "
          f"{cfg.get('val_fraction', 0.1)}, which is right only if train/good is unchanged since training")
    return data.split_record(root, category, cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
