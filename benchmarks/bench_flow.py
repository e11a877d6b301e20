"""Throughput and memory of MAGIC-Flow on this machine, relative to a dense matmul measured in the same run.

Writes reports/benchmarks.md. Each measurement runs in its own subprocess so its peak RSS is its own.

    python benchmarks/bench_flow.py --recipe scanner --threads 2

Measured: training images/s (batch 32 by default, fwd + bwd + AdamW), density evaluation images/s
(``log_prob`` under ``inference_mode``), sampling images/s, and for each the achieved FLOP/s (counted with
``torch.utils.flop_counter``) as a fraction of an fp32 2048x2048 matmul's FLOP/s timed in the same process;
peak RSS of training; and the peak RSS of ``augflow synthesize`` for 1k and 20k images (memory must be flat).
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


def _matmul_flops(seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def _timed(fn, min_seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, recipe: str, batch: int, seconds: float, channels_last: bool) -> dict:
    """One measurement in this process: train, density or sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from augflow.flows import MagicFlow
    from augflow.train.recipe import load_recipe

    torch.manual_seed(0)
    config = load_recipe(recipe).model_config((1, 64, 64), 7)
    model = MagicFlow(config)
    x, y = torch.rand(batch, 1, 64, 64), torch.randint(0, 7, (batch,))
    model.initialize(x, y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    params = sum(p.numel() for p in model.parameters())
    if mode == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            loss = model.bits_per_dim(x, y).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    elif mode == "density":
        model.eval()

        def step():
            with torch.inference_mode():
                model.log_prob(x, y)
    else:
        model.eval()
        generator = torch.Generator().manual_seed(0)

        def step():
            with torch.inference_mode():
                model.sample(y, temperature=0.8, generator=generator)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    peak = _matmul_flops()
    seconds_per_batch = _timed(step, seconds)
    peak_after = _matmul_flops()
    reference = (peak + peak_after) / 2
    achieved = flops / seconds_per_batch
    return {
        "mode": mode, "batch": batch, "params": params, "images_per_s": batch / seconds_per_batch,
        "gflop_per_image": flops / batch / 1e9, "achieved_gflops": achieved / 1e9,
        "matmul_gflops": reference / 1e9, "fraction_of_matmul": achieved / reference,
        "peak_rss_mib": _peak_rss_mib(), "channels_last": channels_last,
    }


def _child(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def synthesize_rss(recipe: str, n: int, threads: int) -> dict:
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
            f"synthesize('{tmp}/model.pt', '{tmp}/s.h5', {{'0': {n}}}, batch_size=64, progress=False)\n"
            "dt = time.perf_counter() - t\n"
            f"print(json.dumps({{'n': {n}, 'seconds': dt, 'images_per_s': {n} / dt, "
            "'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
        )
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"load average before the run {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="scanner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing window per measurement")
    parser.add_argument("--sample-counts", default="1000,20000")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--measure", choices=["train", "density", "sample"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, args.recipe, args.batch, args.seconds, args.channels_last)))
        return

    machine = _machine()
    command = "python benchmarks/bench_flow.py " + " ".join(sys.argv[1:])
    extra = ["--channels-last"] if args.channels_last else []
    rows = []
    for mode in ("train", "density", "sample"):
        print(f"measuring {mode} ...", file=sys.stderr)
        rows.append(_child(["--measure", mode, "--recipe", args.recipe, "--batch", str(args.batch),
                            "--seconds", str(args.seconds), *extra], args.threads))
    synth = []
    for n in map(int, args.sample_counts.split(",")):
        print(f"synthesizing {n} images ...", file=sys.stderr)
        synth.append(synthesize_rss(args.recipe, n, args.threads))
    load_after = os.getloadavg()[0]

    lines = [
        f"# MAGIC-Flow benchmark: recipe `{args.recipe}`, 64x64x1, {args.threads} threads",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; load average after {load_after:.2f}.  ",
        f"Model: {rows[0]['params'] / 1e6:.2f} M parameters; batch {args.batch}; "
        f"channels-last {'on' if args.channels_last else 'off'}.",
        "",
        "| measurement | images/s | GFLOP/image | achieved GFLOP/s | same-run matmul GFLOP/s | fraction | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['images_per_s']:.1f} | {r['gflop_per_image']:.3f} | "
                     f"{r['achieved_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['fraction_of_matmul']:.0%} | "
                     f"{r['peak_rss_mib'] / 1024:.2f} GiB |")
    lines += ["", "`augflow synthesize` (streaming to HDF5, batch 64):", "",
              "| images | seconds | images/s | peak RSS |", "| --- | --- | --- | --- |"]
    for s in synth:
        lines.append(f"| {s['n']} | {s['seconds']:.1f} | {s['images_per_s']:.1f} | {s['peak_rss_mib']:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPORT if not args.channels_last else REPORT.with_name("benchmarks-channels-last.md")
    # Keep the hand-written notes (what was tried and what it gave) below the generated tables.
    notes = out.read_text().partition(NOTES)[2] if out.exists() else ""
    out.write_text(text + (f"\n{NOTES}{notes}" if notes else ""))
    print(json.dumps({"rows": rows, "synthesize": synth}), file=sys.stderr)


if __name__ == "__main__":
    main()
