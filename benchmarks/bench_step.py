"""One MAGIC-Flow step (default: scanner recipe, 64 px, batch 32) in float32 and bf16, eager against one variant, in
one process (the ratios are what compares):

- ``--compare layout``: NCHW against channels-last memory format, for a training step and a density evaluation;
- ``--compare compile``: eager against ``torch.compile`` of the loss (inductor's CPU code generation with the
  system compiler), for a training step; the compiled warm-up is reported separately.

    python benchmarks/bench_step.py --compare layout --threads 2
    python benchmarks/bench_step.py --compare compile --threads 1
    python benchmarks/bench_step.py --compare layout --recipe quick --size 32   # the demo's generator
"""

from __future__ import annotations

import argparse
import time

import torch

from augflow.flows import MagicFlow
from augflow.train.recipe import load_recipe


def measure(config, x: torch.Tensor, y: torch.Tensor, mode: str, amp: bool, channels_last: bool = False,
            compiled: bool = False, seconds: float = 12.0) -> tuple[float, float]:
    """(images/s, warm-up seconds) of training steps (``mode = "train"``) or density evaluations."""
    torch.manual_seed(0)
    model = MagicFlow(config)
    model.initialize(x, y)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = torch.compile(model.bits_per_dim) if compiled else model.bits_per_dim

    def step() -> None:
        if mode == "train":
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = loss_fn(x, y).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                model.log_prob(x, y)

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (1, args.size, args.size)
    config = load_recipe(args.recipe).model_config(shape, 7)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, *shape, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    modes = ("train", "density") if args.compare == "layout" else ("train",)
    names = ("NCHW", "channels-last") if args.compare == "layout" else ("eager", "compiled")
    print("| mode | precision | variant | images/s | warm-up s |\n| --- | --- | --- | --- | --- |")
    for mode in modes:
        for amp in (False, True):
            for variant, name in enumerate(names):
                options = {"channels_last": bool(variant)} if args.compare == "layout" else {"compiled": bool(variant)}
                rate, warm_up = measure(config, x, y, mode, amp, seconds=args.seconds, **options)
                print(f"| {mode} | {'bf16' if amp else 'fp32'} | {name} | {rate:.1f} | {warm_up:.0f} |", flush=True)


if __name__ == "__main__":
    main()
