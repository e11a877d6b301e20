"""Throughput of MAGIC-Flow in float32 and bf16 (amp), against the machine's best peak and a plain Glow.

Writes reports/benchmarks.md. Every throughput runs in its own subprocess (its peak RSS is its own) and is reported
as a fraction of the best dense-matmul rate of the same run: a 2048x2048 matmul in float32 and in bfloat16, each
timed before and after the measurement (machines here are shared; the ratio is what compares across runs).

    python benchmarks/bench_flow.py --recipe scanner --threads 2 --quality-steps 300

Measured, for MAGIC-Flow (the recipe's model) and a peer Glow (``peer_glow.py``: 8 steps x 3 levels, width 128),
in float32 and under bf16 autocast: training images/s (batch 32, fwd + bwd + AdamW), density evaluation images/s
(``log_prob`` under ``inference_mode``) and sampling images/s, with FLOPs counted by ``torch.utils.flop_counter``;
the peak RSS of ``augflow synthesize`` for 1k and 20k images (memory must be flat); and training quality per step
and per CPU-minute: validation bits/dim of the recipe trained on the built-in 64 px scanner data for the same number
of steps in float32 and bf16, and of bf16 continued for as many steps as it makes in the float32 run's time. With
``--compile``, every mode is also measured through ``torch.compile`` (training as ``train.compile = true`` runs it;
density and sampling with inductor's ``freezing``, the weights as constants; FLOPs counted on the eager step, the
compilation excluded from the timing), for both models and precisions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "benchmarks.md"
NOTES = "## Notes"
MODES = ("train", "density", "sample")


def _matmul_flops(dtype, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def peaks() -> dict[str, float]:
    """FLOP/s of a dense 2048x2048 matmul in float32 and in bfloat16."""
    import torch

    return {"fp32": _matmul_flops(torch.float32), "bf16": _matmul_flops(torch.bfloat16)}


def _timed(fn, min_seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def _build(model_name: str, recipe: str, batch: int):
    import torch

    from augflow.flows import MagicFlow
    from augflow.train.recipe import load_recipe

    torch.manual_seed(0)
    if model_name == "glow":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from peer_glow import PeerGlow

        model = PeerGlow((1, 64, 64), steps=8, levels=3, width=128)
    else:
        model = MagicFlow(load_recipe(recipe).model_config((1, 64, 64), 7))
    x, y = torch.rand(batch, 1, 64, 64), torch.randint(0, 7, (batch,))
    model.initialize(x, y)
    return model, x, y


def measure(model_name: str, mode: str, precision: str, recipe: str, batch: int, seconds: float) -> dict:
    """One measurement in this process; ``precision`` "fp32" or "bf16", "+compile" through ``torch.compile``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from augflow.precision import autocast

    model, x, y = _build(model_name, recipe, batch)
    params = sum(p.numel() for p in model.parameters())
    amp = precision.startswith("bf16")
    cpu = torch.device("cpu")
    if mode == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        loss_fn = model.bits_per_dim

        def step():
            with autocast(cpu, amp):
                loss = loss_fn(x, y).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        model.eval()
        generator = torch.Generator().manual_seed(0)
        infer = model.log_prob if mode == "density" else model.sample
        args = (x, y) if mode == "density" else (y,)
        kwargs = {} if mode == "density" else {"temperature": 0.8, "generator": generator}

        def step():
            with torch.inference_mode(), autocast(cpu, amp):
                infer(*args, **kwargs)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if precision.endswith("+compile"):
        from bench_step import INFERENCE_OPTIONS

        from augflow.train.session import COMPILE_OPTIONS

        if mode == "train":
            loss_fn = torch.compile(model.bits_per_dim, options=COMPILE_OPTIONS)
        else:
            infer = torch.compile(infer, options=INFERENCE_OPTIONS)
        step()  # the compilation: minutes, not timed
    before = peaks()
    seconds_per_batch = _timed(step, seconds)
    after = peaks()
    reference = {k: (before[k] + after[k]) / 2 for k in before}
    return {
        "model": model_name, "mode": mode, "precision": precision, "batch": batch, "params": params,
        "images_per_s": batch / seconds_per_batch, "gflop_per_image": flops / batch / 1e9,
        "achieved_gflops": flops / seconds_per_batch / 1e9,
        "peak_gflops": {k: v / 1e9 for k, v in reference.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def synthesize_rss(recipe: str, n: int, threads: int, amp: bool) -> dict:
    """Peak RSS and images/s of `augflow synthesize` of n images from an untrained (initialised) model."""
    with tempfile.TemporaryDirectory() as tmp:
        script = (
            "import sys, time, resource, json, torch\n"
            "from augflow.train.recipe import load_recipe\nfrom augflow.flows import MagicFlow\n"
            "from augflow.synthesize import synthesize\n"
            f"torch.set_num_threads({threads}); torch.manual_seed(0)\n"
            f"model = MagicFlow(load_recipe('{recipe}').model_config((1, 64, 64), 7))\n"
            "model.initialize(torch.rand(32, 1, 64, 64), torch.randint(0, 7, (32,)))\n"
            f"model.save('{tmp}/model.pt', meta={{'class_names': [str(k) for k in range(7)], "
            "'class_counts': [1] * 7})\n"
            "t = time.perf_counter()\n"
            f"synthesize('{tmp}/model.pt', '{tmp}/s.h5', {{'0': {n}}}, batch_size=64, progress=False, amp={amp})\n"
            "dt = time.perf_counter() - t\n"
            f"print(json.dumps({{'n': {n}, 'amp': {amp}, 'seconds': dt, 'images_per_s': {n} / dt, "
            "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
        )
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def quality(recipe: str, steps: int, threads: int, data: Path | None) -> dict:
    """Validation bits/dim after the same steps in float32 and bf16, and of bf16 after the float32 run's time."""
    import torch

    from augflow.models import load_model
    from augflow.train.loop import dataset_loss, train
    from augflow.train.recipe import load_recipe

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:  # the built-in scanner data at 64 px, split by subject
            data = Path(tmp) / "data"
            subprocess.run(["augflow", "demo-data", "--task", "scanner", "--size", "64", "--out",
                            f"{tmp}/scanner.h5"], check=True, capture_output=True)
            subprocess.run(["augflow", "split", f"{tmp}/scanner.h5", "--out-dir", str(data)], check=True,
                           capture_output=True)
        runs = {}

        def run(name: str, amp: bool, max_steps: int, resume: bool = False) -> None:
            overrides = [f"train.max_steps={max_steps}", f"train.amp={str(amp).lower()}"]
            print(f"quality: {name} to step {max_steps} ...", file=sys.stderr, flush=True)
            start = time.process_time()  # this process's CPU seconds: a busy machine does not inflate them
            train(data / "train.h5", Path(tmp) / name, load_recipe(recipe, overrides), val=data / "val.h5",
                  resume=resume, device="cpu", progress=False)
            ckpt = torch.load(Path(tmp) / name / "checkpoint.pt", map_location="cpu", weights_only=True)
            model, _ = load_model(Path(tmp) / name / "model.pt", with_meta=True)
            model.load_state_dict(ckpt["model"])  # the last weights, not the best-validation ones
            runs[name] = {"steps": ckpt["step"], "cpu_s": runs.get(name, {}).get("cpu_s", 0.0)
                          + time.process_time() - start,
                          "val_bpd_fp32": dataset_loss(model, data / "val.h5", device="cpu")}

        run("fp32", False, steps)
        run("bf16", True, steps)
        matched = round(steps * runs["fp32"]["cpu_s"] / runs["bf16"]["cpu_s"])
        runs["bf16 same time"] = dict(runs["bf16"])
        (Path(tmp) / "bf16 same time").symlink_to(Path(tmp) / "bf16")
        run("bf16 same time", True, matched, resume=True)
    return runs


def _machine() -> dict:
    import torch

    from augflow.precision import BF16_CPU_FLAGS, cpu_flags, cpu_model

    flags = [f for f in ("avx512f", *BF16_CPU_FLAGS, "amx_tile") if f in cpu_flags()]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": flags, "python": platform.python_version(),
            "torch": torch.__version__, "load_before": round(os.getloadavg()[0], 2)}


def _fraction(row: dict) -> float:
    return row["achieved_gflops"] / max(row["peak_gflops"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="scanner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing window per measurement")
    parser.add_argument("--sample-counts", default="1000,20000", help="images per synthesize run ('': skip)")
    parser.add_argument("--quality-steps", type=int, default=300, help="training steps of the quality runs (0: skip)")
    parser.add_argument("--data", type=Path, default=None, help="folder with train.h5 and val.h5 (64 px scanner); "
                                                                 "default: generated")
    parser.add_argument("--out", type=Path, default=REPORT, help="report to write (its notes section is kept)")
    parser.add_argument("--compile", action="store_true", help="also time every mode through torch.compile")
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(*args.measure, args.recipe, args.batch, args.seconds)))
        return

    machine = _machine()
    command = "python benchmarks/bench_flow.py " + " ".join(sys.argv[1:])
    rows = []
    for model in ("magic", "glow"):
        for mode in MODES:
            compiled = ("fp32+compile", "bf16+compile") if args.compile else ()
            for precision in ("fp32", "bf16", *compiled):
                print(f"measuring {model} {mode} {precision} ...", file=sys.stderr, flush=True)
                rows.append(_child(["--measure", model, mode, precision, "--recipe", args.recipe, "--batch",
                                    str(args.batch), "--seconds", str(args.seconds)], args.threads))
    synth = []
    for n in (int(c) for c in args.sample_counts.split(",") if c):
        for amp in (False, True):
            print(f"synthesizing {n} images (amp {amp}) ...", file=sys.stderr, flush=True)
            synth.append(synthesize_rss(args.recipe, n, args.threads, amp))
    runs = quality(args.recipe, args.quality_steps, args.threads, args.data) if args.quality_steps else {}
    load_after = os.getloadavg()[0]

    fp32_peaks = [r["peak_gflops"]["fp32"] for r in rows]
    bf16_peaks = [r["peak_gflops"]["bf16"] for r in rows]
    by = {(r["model"], r["mode"], r["precision"]): r for r in rows}
    lines = [
        f"# MAGIC-Flow benchmark: recipe `{args.recipe}`, 64x64x1, {args.threads} threads",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, flags {' '.join(machine['flags']) or 'none'}; "
        f"Python {machine['python']}, torch {machine['torch']}; load average before {machine['load_before']}, "
        f"after {load_after:.2f}.  ",
        f"Same-run peaks (2048² matmul, mean of the timings around each measurement): float32 "
        f"{min(fp32_peaks):.0f}-{max(fp32_peaks):.0f} GFLOP/s, bf16 {min(bf16_peaks):.0f}-{max(bf16_peaks):.0f} "
        f"GFLOP/s. *Fraction* is achieved FLOP/s over the best of the two peaks of the same measurement.  ",
        f"Models: MAGIC-Flow {by[('magic', 'train', 'fp32')]['params'] / 1e6:.2f} M parameters, peer Glow "
        f"{by[('glow', 'train', 'fp32')]['params'] / 1e6:.2f} M; batch {args.batch}.",
        "",
        "| model | mode | precision | images/s | vs fp32 | GFLOP/image | achieved GFLOP/s | fraction of best "
        "peak | MAGIC / Glow fraction | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        key = (r["model"], r["mode"])
        speedup = r["images_per_s"] / by[(*key, "fp32")]["images_per_s"]
        relative = _fraction(r) / _fraction(by[("glow", r["mode"], r["precision"])])
        lines.append(f"| {'MAGIC-Flow' if r['model'] == 'magic' else 'peer Glow'} | {r['mode']} | {r['precision']} | "
                     f"{r['images_per_s']:.1f} | {speedup:.2f}x | {r['gflop_per_image']:.3f} | "
                     f"{r['achieved_gflops']:.1f} | {_fraction(r):.1%} | "
                     f"{relative:.2f}x | {r['peak_rss_mib'] / 1024:.2f} GiB |")
    if synth:
        lines += ["", "`augflow synthesize` (streaming to HDF5, batch 64):", "",
                  "| images | amp | seconds | images/s | peak RSS |", "| --- | --- | --- | --- | --- |"]
    for s in synth:
        lines.append(f"| {s['n']} | {s['amp']} | {s['seconds']:.1f} | {s['images_per_s']:.1f} | "
                     f"{s['peak_rss_mib']:.0f} MiB |")
    if runs:
        lines += ["", f"Training quality per step and per CPU-minute (recipe `{args.recipe}`, built-in scanner data at "
                      f"64 px, validation split; bits/dim of the last weights, evaluated in float32):", "",
                  "| run | steps | CPU minutes | validation bits/dim |", "| --- | --- | --- | --- |"]
        for name, r in runs.items():
            lines.append(f"| {name} | {r['steps']} | {r['cpu_s'] / 60:.1f} | {r['val_bpd_fp32']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    # Keep the hand-written notes (what was tried and what it gave) below the generated tables.
    notes = args.out.read_text().partition(NOTES)[2] if args.out.exists() else ""
    args.out.write_text(text + (f"\n{NOTES}{notes}" if notes else ""))
    print(json.dumps({"rows": rows, "synthesize": synth, "quality": runs}), file=sys.stderr)


if __name__ == "__main__":
    main()
