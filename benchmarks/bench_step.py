"""One MAGIC-Flow step (default: scanner recipe, 64 px, batch 32) in float32 and bf16, eager against one variant, in
one process (the ratios are what compares):

- ``--compare layout``: NCHW against channels-last memory format, for a training step and a density evaluation;
- ``--compare compile``: eager against ``torch.compile`` (inductor's CPU code generation with the system compiler)
  of the recipe's training objective (``train.ce_weight`` included, as ``train.compile = true`` compiles it), of a
  density evaluation and of sampling; the compiled warm-up is reported separately. Inference is compiled with
  inductor's ``freezing`` (the weights become constants, so oneDNN can pre-pack them).

    python benchmarks/bench_step.py --compare layout --threads 2
    python benchmarks/bench_step.py --compare compile --threads 1
    python benchmarks/bench_step.py --compare compile --recipe scanner-classify --batch 16 --modes train
    python benchmarks/bench_step.py --compare layout --recipe quick --size 32   # the demo's generator
"""

from __future__ import annotations

import argparse
import time

import torch

from augflow.flows import MagicFlow
from augflow.precision import autocast
from augflow.train.loop import Objective
from augflow.train.recipe import Recipe, load_recipe
from augflow.train.session import COMPILE_OPTIONS

INFERENCE_OPTIONS = {**COMPILE_OPTIONS, "freezing": True}


def measure(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, mode: str, amp: bool, channels_last: bool = False,
            compiled: bool = False, seconds: float = 12.0) -> tuple[float, float]:
    """(images/s, warm-up seconds) of training steps (``mode = "train"``), density evaluations or sampling."""
    torch.manual_seed(0)
    model = MagicFlow(recipe.model_config(tuple(x.shape[1:]), 7))
    model.initialize(x, y)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
    cpu = torch.device("cpu")
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
        objective = Objective(model, recipe.train.ce_weight, amp)
        loss_fn = torch.compile(objective, options=COMPILE_OPTIONS) if compiled else objective

        def step() -> None:
            loss = loss_fn(x, y).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        model.eval()
        generator = torch.Generator().manual_seed(0)
        fn = model.log_prob if mode == "density" else model.sample
        fn = torch.compile(fn, options=INFERENCE_OPTIONS) if compiled else fn
        args, kwargs = ((x, y), {}) if mode == "density" else ((y,), {"temperature": 0.8, "generator": generator})

        def step() -> None:
            with torch.inference_mode(), autocast(cpu, amp):
                fn(*args, **kwargs)

    start = time.perf_counter()
    step(), step()  # warm-up: oneDNN picks its kernels, inductor compiles
    warm_up = time.perf_counter() - start
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return len(x) * n / (time.perf_counter() - start), warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=["layout", "compile"], required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--recipe", default="scanner")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", default=None, help="comma-separated among train, density, sample "
                        "(default: train,density with --compare layout, all three with --compare compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (1, args.size, args.size)
    recipe = load_recipe(args.recipe)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.batch, *shape, generator=generator), torch.randint(0, 7, (args.batch,), generator=generator)
    modes = args.modes.split(",") if args.modes else (
        ("train", "density") if args.compare == "layout" else ("train", "density", "sample"))
    if unknown := set(modes) - {"train", "density", "sample"}:
        parser.error(f"--modes: {', '.join(sorted(unknown))} is not a mode; allowed: train, density, sample")
    names = ("NCHW", "channels-last") if args.compare == "layout" else ("eager", "compiled")
    print("| mode | precision | variant | images/s | warm-up s |\n| --- | --- | --- | --- | --- |")
    for mode in modes:
        for amp in (False, True):
            for variant, name in enumerate(names):
                options = {"channels_last": bool(variant)} if args.compare == "layout" else {"compiled": bool(variant)}
                rate, warm_up = measure(recipe, x, y, mode, amp, seconds=args.seconds, **options)
                print(f"| {mode} | {'bf16' if amp else 'fp32'} | {name} | {rate:.1f} | {warm_up:.0f} |", flush=True)


if __name__ == "__main__":
    main()
