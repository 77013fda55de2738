"""Training and inference throughput of every model against a plain reference loop, in one run.

    python bench.py                                   # all models, 128 and 256 px, CPU (+ CUDA)
    python bench.py --models vqvae --sizes 128 --steps 4 --out bench_results.md
    python bench.py --models vqvae --sizes 128 --profile   # where the time goes, and what helps
    python bench.py --inspect --sizes 128 --batch-size 32  # detect.py --images: img/s per model

Ours      = what train.py does: the split decoded once into a uint8 tensor in memory,
            `data.to_float` per batch, the model as train.py builds it, then train.train_step
            itself (model.loss + backward + gradient clipping + AdamW step, train.py's optimizer,
            bf16 autocast when train.py would use it: the recipe's `bf16` on a device with bf16 units),
            with the recipe's extra terms off so both loops optimise the same objective. "Recipe"
            = the same with train.py's default recipe on (synthetic anomalies + SSIM term; LPIPS is
            left out, it needs downloaded weights). Inference: model.reconstruct under inference_mode.
Reference = the obvious loop of the reference VQ-VAE recipe: a Dataset that opens, decodes and
            resizes each PNG with PIL on every access, torchvision ToTensor, a DataLoader with
            num_workers=0, float32 NCHW, default threads, the same model, the same AdamW
            (inference: model.eval() under no_grad).

Both loops run interleaved step by step in the same process (so a busy machine slows both
alike); warm-up steps are not timed and throughput is batch size / median step time. The peak
rows time a large float32 matmul and a representative 3x3 convolution; each model's FLOPs per
training image (forward + backward, torch.utils.flop_counter) times its throughput gives the
achieved GFLOP/s and the fraction of that measured convolution peak.
"""
import argparse
import contextlib
import copy
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import data
import detect
import train
from models import MODELS, build_model, load_model


# ----------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=data.DEFAULT_ROOT, help="folder holding the categories")
    p.add_argument("--category", default="bottle",
                   help="category to read; a synthetic one is generated if it is not there")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256], help="image sides in pixels")
    p.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, both loops")
    p.add_argument("--device", default="auto", help="auto (CPU, and CUDA if present), cpu, cuda")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads for every loop (default: torch's default, one per core); "
                        "1 gives steadier ratios on a machine shared with other jobs")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul/conv peak")
    p.add_argument("--profile", action="store_true",
                   help="profile our training step of the first model/size on the first device "
                        "and time channels_last, thread counts and torch.compile against it")
    p.add_argument("--no-compile", action="store_true", help="--profile without torch.compile")
    p.add_argument("--inspect", action="store_true",
                   help="instead of training: images/s of detect.py --images scoring, from decoded "
                        "tensors (maps + score + verdict) and end to end from the PNG files")
    p.add_argument("--inspect-images", type=int, default=64,
                   help="--inspect: PNG files decoded and scored end to end")
    p.add_argument("--runs", default="outputs",
                   help="--inspect: uses <runs>/<category>/<model>/best.pt when trained at the size, "
                        "else untrained weights (the same work per image)")
    return p.parse_args(argv)


def devices(name):
    if name == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(name)]


def resolve_data(root, category, sizes, tmp):
    """(root, category, description): the named category if present, else a synthetic one."""
    if (Path(root) / category / "train" / "good").is_dir():
        files = data.image_files(Path(root) / category / "train" / "good")
        with Image.open(files[0]) as im:
            shape = f"{im.size[0]}x{im.size[1]} {im.mode}"
        return root, category, f"real: {Path(root) / category} ({len(files)} train/good PNGs, {shape})"
    side = max(sizes)
    data.make_synthetic_category(tmp, "synthetic", size=side, n_train=80)
    return tmp, "synthetic", (f"SYNTHETIC: '{Path(root) / category}' not found, generated 80 "
                              f"{side} px PNGs into {tmp} (timings only; decoding real 900 px "
                              f"MVTec PNGs costs the reference loop more)")


def load_average():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def fraction(x):
    return "-" if math.isnan(x) else f"{x:.0%}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shuffled_batches(n, batch_size, seed=0):
    """Endless full batches of indices, a fresh permutation per pass (like a shuffled epoch)."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=g).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


# ----------------------------------------------------------------------------- our path (train.py)

def train_config(name, root, category, size, batch_size, device, recipe=True):
    """train.py's own arguments for this model: its recipe, or with the extra terms off."""
    extra = [] if recipe else ["--anomaly-fraction", "0", "--ssim-weight", "0"]
    return train.parse_args(["--model", name, "--category", category, "--data-root", str(root),
                             "--size", str(size), "--batch-size", str(batch_size),
                             "--device", str(device), "--lpips-weight", "0", *extra])


def first_stage(model, args, device, steps):
    """train.py's first stage of the model, planned as one epoch of `steps` steps, and its optimizer."""
    stage = train.plan_stages(model, SimpleNamespace(**{**vars(args), "epochs": 1}), steps)[0]
    return stage, train.make_optimizer(model, stage, device)


def ours_train(model, images, args, device, steps, seed=0):
    """train.py's training step (train.train_step), one batch per call so that the reference
    loop can be interleaved."""
    stage, optimizer = first_stage(model, args, device, steps)
    model.train()
    for batch in shuffled_batches(len(images), args.batch_size, seed):
        train.train_step(model, optimizer, data.to_float(images[batch], device), stage, args)
        yield


def ours_infer(model, images, batch_size, device):
    model.eval()
    for batch in shuffled_batches(len(images), batch_size):
        with torch.inference_mode():
            recon = model.reconstruct(data.to_float(images[batch], device))
        float(recon[0, 0, 0, 0])  # read one value back, as a caller would (syncs CUDA)
        yield


# ----------------------------------------------------------------------------- reference path

class DiskImages(Dataset):
    """The obvious Dataset: open, decode and resize the PNG every time it is asked for."""

    def __init__(self, paths, size):
        self.paths, self.size = list(paths), size
        self.to_tensor = transforms.ToTensor()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size))
        return self.to_tensor(img)


def reference_train(model, optimizer, loader, device):
    model.train()
    while True:
        for x in loader:
            x = x.to(device)
            loss = model.loss(x)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the obvious loop logs the loss
            yield


def reference_infer(model, loader, device):
    model.eval()
    while True:
        for x in loader:
            with torch.no_grad():
                recon = model.reconstruct(x.to(device))
            float(recon[0, 0, 0, 0])
            yield


# ----------------------------------------------------------------------------- timing

def race(loops, steps, warmup, device):
    """Step the named generators round-robin (alternating the order); median seconds per step."""
    names = list(loops)
    for _ in range(warmup):
        for name in names:
            next(loops[name])
    times = {name: [] for name in names}
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            t = time.perf_counter()
            next(loops[name])
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def flops_per_image(model, size, device, n=2):
    """FLOPs of one training forward + backward of model.loss per image, on a copy of the model."""
    m = copy.deepcopy(model).to(device).train()
    x = torch.rand(n, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        m.loss(x)[0].backward()
    return counter.get_total_flops() / n


def measure_peak(device, reps=5):
    """Best-of-reps GFLOP/s of a float32 matmul and of a 3x3 convolution (forward)."""
    def best(fn, flops):
        fn(), sync(device)
        ts = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t)
        return flops / min(ts) / 1e9

    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul = best(lambda: a @ b, 2 * n ** 3)
    batch, c, s = (16, 128, 32) if device.type == "cpu" else (128, 128, 64)
    x = torch.randn(batch, c, s, s, device=device)
    w = torch.randn(c, c, 3, 3, device=device)
    conv = best(lambda: F.conv2d(x, w, padding=1), 2 * batch * c * c * 9 * s * s)
    return {"matmul": matmul, "matmul_shape": f"{n}x{n} @ {n}x{n}",
            "conv": conv, "conv_shape": f"conv3x3 {c}->{c} ch, batch {batch}, {s}x{s}"}


def bench_one(name, size, device, split, root, category, opts, peak):
    args = train_config(name, root, category, size, opts.batch_size, device, recipe=False)
    recipe_args = train_config(name, root, category, size, opts.batch_size, device)
    torch.manual_seed(0)
    ours = train.make_model(args, device)
    torch.manual_seed(0)  # the reference builds the plain model: same weights, NCHW
    ref = build_model(name, **train.model_args(args)).to(device)
    torch.manual_seed(0)
    recipe = train.make_model(recipe_args, device)  # the same weights, its recipe's objective
    flops_train = flops_per_image(ref, size, device)
    total = opts.warmup + opts.steps
    _, opt_ref = first_stage(ref, args, device, total)
    bs = min(opts.batch_size, len(split))
    disk = DiskImages(split.paths, size)
    train_loader = DataLoader(disk, batch_size=bs, shuffle=True, num_workers=0, drop_last=True)
    infer_loader = DataLoader(disk, batch_size=bs, shuffle=False, num_workers=0, drop_last=True)
    t_train = race({"ours": ours_train(ours, split.images, args, device, total),
                    "recipe": ours_train(recipe, split.images, recipe_args, device, total),
                    "ref": reference_train(ref, opt_ref, train_loader, device)},
                   opts.steps, opts.warmup, device)
    t_infer = race({"ours": ours_infer(ours, split.images, bs, device),
                    "ref": reference_infer(ref, infer_loader, device)},
                   opts.steps, opts.warmup, device)
    row = {"model": name, "px": size, "device": device.type,
           "train_ours": bs / t_train["ours"], "train_ref": bs / t_train["ref"],
           "train_recipe": bs / t_train["recipe"],
           "infer_ours": bs / t_infer["ours"], "infer_ref": bs / t_infer["ref"],
           "gflop_train": flops_train / 1e9}
    row["achieved"] = row["train_ours"] * row["gflop_train"]
    row["of_conv_peak"] = row["achieved"] / peak["conv"] if peak else float("nan")
    return row


# ----------------------------------------------------------------------------- profile

def phase_breakdown(model, images, args, device, steps, warmup):
    """Median seconds of each piece of our training step, train.train_step taken apart: the batch,
    the forward pass (model.loss with its SSIM term), train.backward_step."""
    phases = {k: [] for k in ("to_float + synthetic anomalies", "forward (model.loss with SSIM)",
                              "backward + clip + AdamW step")}
    _, optimizer = first_stage(model, args, device, warmup + steps)
    model.train()
    batches = shuffled_batches(len(images), args.batch_size)
    for i in range(warmup + steps):
        marks = [time.perf_counter()]
        x = data.to_float(images[next(batches)], device)
        inputs = train.add_synthetic_anomalies(x, args.anomaly_fraction, moved=args.moved_share)
        sync(device), marks.append(time.perf_counter())
        total = model(inputs, target=x)[0]
        sync(device), marks.append(time.perf_counter())
        train.backward_step(optimizer, total)
        sync(device), marks.append(time.perf_counter())
        if i >= warmup:
            for k, t0, t1 in zip(phases, marks, marks[1:]):
                phases[k].append(t1 - t0)
    return {k: statistics.median(v) for k, v in phases.items()}


class Threads:
    """Run a generator's steps with a given torch thread count, restoring it afterwards."""

    def __init__(self, n, gen):
        self.n, self.gen = n, gen

    def __iter__(self):
        return self

    def __next__(self):
        before = torch.get_num_threads()
        torch.set_num_threads(self.n)
        try:
            return next(self.gen)
        finally:
            torch.set_num_threads(before)


def profile(name, size, device, split, root, category, opts, out):
    """Our training step with train.py's default recipe (anomalies + SSIM; LPIPS left out)."""
    args = train_config(name, root, category, size, opts.batch_size, device)
    torch.manual_seed(0)
    base = build_model(name, **train.model_args(args)).to(device)  # NCHW: the variants convert
    out.append(f"\n## Profile: {name} at {size} px on {device.type}, batch {args.batch_size}, "
               f"recipe on (anomaly fraction {args.anomaly_fraction}, SSIM weight "
               f"{base.ssim_weight})\n")

    model = copy.deepcopy(base)
    phases = phase_breakdown(model, split.images, args, device, opts.steps, opts.warmup)
    step = sum(phases.values())
    out.append("| phase | ms / step | share |\n|---|---:|---:|")
    out += [f"| {k} | {1e3 * v:.1f} | {v / step:.0%} |" for k, v in phases.items()]

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    gen = ours_train(model, split.images, args, device, 10 ** 6)
    next(gen)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            next(gen)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.append("\nTop operators over 2 training steps (torch.profiler):\n\n```")
    out.append(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40))
    out.append("```")

    # variants of our step, raced against the unchanged one
    total = opts.warmup + opts.steps
    loops, notes = {}, {}

    def variant(label, model, images=split.images, threads=None, **overrides):
        gen = ours_train(model, images, argparse.Namespace(**{**vars(args), **overrides}), device, total)
        loops[label] = Threads(threads, gen) if threads else gen

    default_threads = torch.get_num_threads()
    variant(f"baseline (NCHW model, float32, {default_threads} threads)", copy.deepcopy(base), bf16=False)
    variant("channels_last model", copy.deepcopy(base).to(memory_format=torch.channels_last), bf16=False)
    variant("channels_last model + images",
            copy.deepcopy(base).to(memory_format=torch.channels_last),
            split.images.contiguous(memory_format=torch.channels_last), bf16=False)
    variant("channels_last model, bf16 autocast (--bf16)",
            copy.deepcopy(base).to(memory_format=torch.channels_last), bf16=True)
    if device.type == "cpu":
        for n in sorted({1, default_threads, os.cpu_count() or 1} - {default_threads}):
            variant(f"torch.set_num_threads({n})", copy.deepcopy(base), threads=n, bf16=False)
    if not opts.no_compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(copy.deepcopy(base))
            gen = ours_train(compiled, split.images, argparse.Namespace(**{**vars(args), "bf16": False}),
                             device, total)
            next(gen)  # the compilation itself, timed apart
            loops["torch.compile (inductor)"] = gen
            notes["torch.compile (inductor)"] = f"first step (compile) {time.perf_counter() - t0:.0f} s"
        except Exception as e:  # no compiler, unsupported op: report instead of failing
            notes["torch.compile (inductor)"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
    times = race(loops, opts.steps, opts.warmup, device)
    ref = next(iter(times.values()))
    out.append("\n| variant of our training step | img/s | vs baseline | note |\n|---|---:|---:|---|")
    for label, t in times.items():
        out.append(f"| {label} | {args.batch_size / t:.1f} | {ref / t:.2f}x | {notes.get(label, '')} |")
    for label, note in notes.items():
        if label not in times:
            out.append(f"| {label} | - | - | {note} |")


# ----------------------------------------------------------------------------- inspection (detect.py --images)

def inspect_model(name, size, device, opts, category):
    """The trained model when <runs>/<category>/<name>/best.pt is at this size, else untrained."""
    path = train.trained_checkpoint(train.run_dir(opts.runs, category, name))
    if path is not None:
        model, ckpt = load_model(str(path), device)
        if ckpt["config"]["size"] == size:
            return model, "trained"
    torch.manual_seed(0)
    return build_model(name, image_size=size).to(device).eval(), "untrained"


def bench_inspect(name, size, device, split, opts, category):
    """detect.py's own scoring (detect.score_batch) with its default map and a calibration made
    from the first images: img/s from decoded tensors, from PNG files (decoding in threads
    ahead of the model, data.decoded_batches), and of decoding alone."""
    model, weights = inspect_model(name, size, device, opts, category)
    names, bs = model.default_map.split("+"), opts.batch_size
    extra = detect.picture_maps(detect.model_map_names(model, device))  # detect.py draws pictures by default
    run = SimpleNamespace(names=names, ckpt_path="(bench)", maps_of=lambda images, pictures=False: detect.compute_maps(
        model, images, names, device, bs, 8, None, extra=extra if pictures else ()))
    raw = run.maps_of(split.images[:bs])[0]
    baseline = {n: m.mean(0) for n, m in raw.items()}
    calibration = {"baseline": baseline, "map_stats": detect.map_statistics(detect.subtract_baseline(raw, baseline))}
    args = detect.parse_args(["--class", category])  # detect.py's defaults: closing, smoothing, score
    detect.map_settings(args, model)

    def score(images):
        scores = detect.score_batch(run, calibration, images, args)[3]
        return scores > 0.5  # the verdict

    def tensors():
        for batch in shuffled_batches(len(split.images), bs):
            score(split.images[batch])
            yield
    t_tensor = race({"tensors": tensors()}, opts.steps, opts.warmup, device)["tensors"]
    paths = split.paths[:opts.inspect_images]

    def seconds(work):
        t = time.perf_counter()
        for _, images in data.decoded_batches(paths, size, bs):
            work(images)
        sync(device)
        return time.perf_counter() - t
    t_decode = seconds(lambda images: None)
    t_e2e = seconds(score)
    return {"model": name, "px": size, "device": device.type, "weights": weights, "batch": bs,
            "tensors": bs / t_tensor, "png": len(paths) / t_e2e, "decode": len(paths) / t_decode,
            "files": len(paths)}


def inspect_table(opts, splits, category, emit):
    emit("| model | px | device | weights | batch | tensors img/s (maps + score + verdict) | "
         "PNG end to end img/s | decode alone img/s | time per image vs dae (tensors) |")
    emit("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for device in devices(opts.device):
        for size in opts.sizes:
            rows = [bench_inspect(name, size, device, splits[size], opts, category) for name in opts.models]
            dae = next((r["tensors"] for r in rows if r["model"] == "dae"), rows[0]["tensors"])
            for r in rows:
                emit(f"| {r['model']} | {r['px']} | {r['device']} | {r['weights']} | {r['batch']} | "
                     f"{r['tensors']:.1f} | {r['png']:.1f} | {r['decode']:.1f} | {dae / r['tensors']:.2f}x |")
    emit(f"\nend to end: {rows[0]['files']} PNG files decoded by data.decoded_batches "
         f"({min(8, os.cpu_count() or 1)} threads, two batches ahead) while detect.score_batch scores")


# ----------------------------------------------------------------------------- main

def cpu_name():
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = []

    def emit(line=""):
        print(line, flush=True)
        out.append(line)

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root, category, description = resolve_data(opts.data_root, opts.category, opts.sizes, tmp)
        cpu = cpu_name()
        emit("# Inspection throughput: detect.py --images\n" if opts.inspect else
             "# Throughput: ours (train.py) vs the plain reference loop\n")
        emit(f"- data: {description}")
        emit(f"- torch {torch.__version__}, Python {platform.python_version()}, CPU: {cpu}, "
             f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
             + (f", GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
        emit(f"- batch {opts.batch_size}, {opts.warmup} warm-up + {opts.steps} timed steps per loop, "
             "loops interleaved step by step; img/s = batch / median step time")
        if not opts.inspect:
            emit("- ours: decoded-once uint8 images, data.to_float, the model as train.py builds it, "
                 "train.train_step (model.loss + backward + clip + AdamW); recipe: the same plus "
                 "train.py's default synthetic anomalies + SSIM term (LPIPS excluded); ref: PIL decode "
                 "+ resize from disk per access, ToTensor, DataLoader(num_workers=0), float32 NCHW, "
                 "model.loss + backward + AdamW")
        emit(f"- load average at start: {load_average()} (other processes on these cores slow "
             "both loops alike; compare the ratios)\n")

        peaks = {}
        for device in devices(opts.device):
            if not opts.no_peak:
                peaks[device.type] = peak = measure_peak(device)
                emit(f"- measured peak on {device.type}: matmul {peak['matmul']:.0f} GFLOP/s "
                     f"({peak['matmul_shape']}), conv {peak['conv']:.0f} GFLOP/s ({peak['conv_shape']})")
        splits = {}
        for size in opts.sizes:
            t0 = time.perf_counter()
            args = train_config(opts.models[0], root, category, size, opts.batch_size, "cpu")
            with contextlib.redirect_stderr(io.StringIO()):  # no progress bar between table lines
                splits[size] = data.load_split(root, category, "train", size, args.val_fraction,
                                               args.seed)
            emit(f"- ours decodes the {len(splits[size])} train images once at {size} px: "
                 f"{time.perf_counter() - t0:.1f} s, then never again (the reference pays it every epoch)")
        emit("")
        if opts.inspect:
            inspect_table(opts, splits, category, emit)
        elif opts.profile:
            report = []
            profile(opts.models[0], opts.sizes[0], devices(opts.device)[0], splits[opts.sizes[0]],
                    root, category, opts, report)
            for line in report:
                emit(line)
            emit("")
        if not opts.inspect:
            train_table(opts, splits, root, category, peaks, emit)
    emit(f"\nload average at end: {load_average()}")
    if opts.out:
        Path(opts.out).write_text("\n".join(out) + "\n")
        print(f"\nwrote {opts.out}")


def train_table(opts, splits, root, category, peaks, emit):
    emit("| model | px | device | train ours img/s | train ref img/s | train ratio | "
         "train recipe img/s | infer ours img/s | infer ref img/s | infer ratio | "
         "GFLOP / train img | achieved GFLOP/s | of conv peak |")
    emit("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for device in devices(opts.device):
        for size in opts.sizes:
            for name in opts.models:
                r = bench_one(name, size, device, splits[size], root, category, opts,
                              peaks.get(device.type))
                emit(f"| {r['model']} | {r['px']} | {r['device']} | {r['train_ours']:.1f} | "
                     f"{r['train_ref']:.1f} | {r['train_ours'] / r['train_ref']:.2f}x | "
                     f"{r['train_recipe']:.1f} | {r['infer_ours']:.1f} | {r['infer_ref']:.1f} | "
                     f"{r['infer_ours'] / r['infer_ref']:.2f}x | {r['gflop_train']:.2f} | "
                     f"{r['achieved']:.0f} | {fraction(r['of_conv_peak'])} |")


if __name__ == "__main__":
    try:
        main()
    except data.DatasetError as e:
        sys.exit(f"error: {e}")
