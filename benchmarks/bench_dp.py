"""DP-SGD cost and privacy-utility results: writes reports/benchmarks-dp.md and the numbers of reports/privacy.md.

Subcommands (run on a quiet machine; timings are ratios measured in the same process, interleaved):

    python benchmarks/bench_dp.py speed --threads 1            # DP vs non-private step time, same batch
    python benchmarks/bench_dp.py memory                       # per-example memory of the per-sample gradients
    python benchmarks/bench_dp.py table --val data/val.h5 --runs eps1=runs/dp-e1 ... --png reports/privacy-samples.png

``speed`` and ``memory`` append their results to reports/benchmarks-dp.md; ``table`` prints a markdown table of
validation bits/dim per run and draws a sample grid (one row per run, one column per class).

References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016, arXiv:1607.00133.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "benchmarks-dp.md"


def _model(recipe_name: str, size: int, num_classes: int = 7):
    from augflow.flows import MagicFlow
    from augflow.train.privacy.public import public_initialize, template_mask
    from augflow.train.recipe import load_recipe

    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = MagicFlow(recipe.model_config((1, size, size), num_classes), app_mask=template_mask(size, size))
    public_initialize(model, "template")
    return model.train()


def _batch(size: int, batch: int, num_classes: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    from augflow.train.privacy.public import template_images

    template = template_images((1, size, size))  # brain-like inputs, so the losses are realistic
    generator = torch.Generator().manual_seed(0)
    x = template[torch.arange(batch) % len(template)]
    x = (x + 0.02 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    return (x * 255 + torch.rand(x.shape, generator=generator)) / 256, torch.arange(batch) % num_classes


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def speed(args: argparse.Namespace) -> None:
    """Median step time of DP-SGD (per-sample gradients + DPOptimizer) vs a non-private step, same batch."""
    from augflow.train.loop import Objective
    from augflow.train.privacy.accounting import PrivacyPlan
    from augflow.train.privacy.gradients import PrivateStep

    torch.set_num_threads(args.threads)
    lines = [f"\n## Step time, DP vs non-private ({time.strftime('%Y-%m-%d %H:%M')}, {args.threads} thread(s), "
             f"load average before: {_load()})\n",
             f"`python benchmarks/bench_dp.py speed --threads {args.threads} --recipe {args.recipe} --size "
             f"{args.size} --batch {args.batch} --repeats {args.repeats}`\n",
             "| microbatch (vmap chunk) | non-private step (s) | DP step (s) | DP / non-private |",
             "| --- | --- | --- | --- |"]
    model = _model(args.recipe, args.size)
    x, y = _batch(args.size, args.batch)
    objective = Objective(model, 0.0)
    params = [p for p in model.parameters() if p.numel()]
    plain = torch.optim.AdamW(params, lr=1e-4)
    plan = PrivacyPlan(8.0, 0.0, 1e-5, "", "rdp", 1.0, 0.01, 1000, 1.0, "slice", 10_000, args.batch)

    def plain_step() -> None:
        plain.zero_grad(set_to_none=True)
        objective(x, y).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        plain.step()

    print(f"{sum(p.numel() for p in params):,} parameters; load {_load()}", flush=True)
    for chunk in args.microbatch:
        private = PrivateStep(objective, torch.optim.AdamW(params, lr=1e-4), plan, chunk)
        times: dict[str, list[float]] = {"plain": [], "dp": []}
        plain_step(), private.step(x, y, 0)  # warm-up
        for r in range(args.repeats):  # interleaved, so load changes hit both
            start = time.perf_counter()
            plain_step()
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            private.step(x, y, r)
            times["dp"].append(time.perf_counter() - start)
        a, b = statistics.median(times["plain"]), statistics.median(times["dp"])
        lines.append(f"| {chunk} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"\n{args.recipe} recipe model at {args.size} px, batch {args.batch}, "
                 f"{sum(p.numel() for p in params):,} parameters; medians of {args.repeats} interleaved steps; "
                 f"load average after: {_load()}.")
    _append(lines)


def _peak_rss(recipe: str, size: int, chunk: int) -> float:
    """Peak resident memory (bytes) of a fresh process that takes one DP step of ``chunk`` examples."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import resource, torch;"
            f"torch.set_num_threads(1);"
            f"from bench_dp import _model, _batch; from augflow.train.loop import Objective;"
            f"from augflow.train.privacy.gradients import PerSampleGradients; m = _model({recipe!r}, {size}); "
            f"x, y = _batch({size}, {chunk}); g, _ = PerSampleGradients(Objective(m, 0.0))(x, y);"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def memory(args: argparse.Namespace) -> None:
    """Per-example memory of one vmap call (activations under vmap + the per-sample gradients), as the slope of
    the peak RSS of fresh processes over the chunk size, extrapolated to 24 GiB."""
    model = _model(args.recipe, args.size)
    params = sum(p.numel() for p in model.parameters())
    peaks = {chunk: _peak_rss(args.recipe, args.size, chunk) for chunk in args.microbatch}
    chunks = np.array(list(peaks), dtype=float)
    slope, base = np.polyfit(chunks, np.array(list(peaks.values())), 1)
    budget = 24 * 2**30
    fits = int((budget - base) / slope)
    lines = [f"\n## Memory of per-sample gradients ({time.strftime('%Y-%m-%d %H:%M')})\n",
             f"`python benchmarks/bench_dp.py memory --recipe {args.recipe} --size {args.size} --microbatch "
             f"{' '.join(map(str, args.microbatch))}`\n",
             "| examples per vmap call | peak RSS (GiB) |", "| --- | --- |",
             *(f"| {c} | {p / 2**30:.2f} |" for c, p in peaks.items()),
             f"\n{args.recipe} recipe model at {args.size} px ({params:,} parameters, so the per-sample gradients "
             f"alone are {params * 4 / 2**20:.1f} MiB per example). Linear fit of the peak over the chunk size: "
             f"{slope / 2**20:.0f} MiB per example (activations kept by vmap for the backward pass plus the per-sample "
             f"gradients), {base / 2**30:.2f} GiB fixed. In 24 GiB one vmap call holds about {fits} examples. With "
             f"virtual steps (privacy.microbatch < Poisson batch) the Poisson batch itself is not limited by "
             f"memory: only one microbatch's per-sample gradients exist at a time, plus one summed gradient."]
    print("\n".join(lines))
    _append(lines)


def _append(lines: list[str]) -> None:
    if not REPORT.exists():
        REPORT.write_text("# DP-SGD benchmarks\n\nWritten by `benchmarks/bench_dp.py`; timings are ratios measured in "
                          "one process (this CPU is shared: see the load averages).\n")
    with REPORT.open("a") as f:
        f.write("\n".join(lines) + "\n")


def table(args: argparse.Namespace) -> None:
    """Validation bits/dim of each run's model.pt (fixed dequantisation noise) and a grid of samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from augflow.models import load_model
    from augflow.train.loop import dataset_loss

    torch.set_num_threads(args.threads)
    runs = dict(item.rsplit("=", 1) for item in args.runs)
    rows, grids = [], []
    for label, run in runs.items():
        model, meta = load_model(Path(run) / "model.pt", with_meta=True)
        bpd = dataset_loss(model, args.val, batch_size=64)
        ledger = meta.get("privacy") or {}
        metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        elapsed = max(r.get("elapsed_s", 0) for r in metrics)
        eps = f"{ledger['epsilon']:.3g}" if ledger.get("dp") else "∞ (no DP)"
        sigma = f"{ledger['noise_multiplier']:.3g}" if ledger.get("dp") else "-"
        rows.append(f"| {label} | {eps} | {sigma} | {meta['step']} | {elapsed / 60:.1f} | {bpd:.3f} |")
        k = len(meta["class_names"])
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(k).repeat_interleave(args.per_class)
        grids.append(model.sample(y, temperature=meta.get("temperature", 0.8), generator=generator).clamp(0, 1))
        names = meta["class_names"]
    print("| run | ε (ledger) | σ | steps | minutes | validation bits/dim |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    n_cols = grids[0].shape[0]
    fig, axes = plt.subplots(len(grids), n_cols, figsize=(n_cols * 0.9, len(grids) * 1.0 + 0.4), squeeze=False)
    for r, (label, images) in enumerate(zip(runs, grids, strict=True)):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0 and c % args.per_class == 0:
                ax.set_title(names[c // args.per_class], fontsize=5)
    fig.tight_layout(pad=0.2)
    fig.savefig(args.png, dpi=150)
    print(f"wrote {args.png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "memory"):
        p = sub.add_parser(name)
        p.add_argument("--recipe", default="scanner")
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--microbatch", type=int, nargs="+", default=[4, 8, 16] if name == "speed" else [1, 2, 4, 8])
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("table")
    p.add_argument("--val", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="label=run_folder ...")
    p.add_argument("--png", default=str(ROOT / "reports" / "privacy-samples.png"))
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    {"speed": speed, "memory": memory, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
