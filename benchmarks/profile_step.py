"""Where one MAGIC-Flow step spends its time: torch.profiler's operators, grouped by input shape.

A training step (forward, backward, AdamW), a density evaluation or a sampling pass of the recipe's model at batch 32,
in float32 or under bf16 autocast; prints the operators with the most self CPU time per step, each with its input
shapes and its share of the step, so that a narrow convolution shows apart from a wide one.

    python benchmarks/profile_step.py --mode train --precision bf16 --threads 2
    python benchmarks/profile_step.py --mode sample --precision fp32 --threads 2 --top 15
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from augflow.flows import MagicFlow
from augflow.precision import autocast
from augflow.train.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["train", "density", "sample"], default="train")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", default="scanner")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after two warm-up steps)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (1, args.size, args.size)
    model = MagicFlow(load_recipe(args.recipe).model_config(shape, 7))
    x, y = torch.rand(32, *shape), torch.randint(0, 7, (32,))
    model.initialize(x, y)
    cpu, amp = torch.device("cpu"), args.precision == "bf16"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as augflow.train.optim

    def step() -> None:
        if args.mode == "train":
            model.train()
            with autocast(cpu, amp):
                loss = model.bits_per_dim(x, y).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return
        model.eval()
        with torch.inference_mode(), autocast(cpu, amp):
            model.log_prob(x, y) if args.mode == "density" else model.sample(y, temperature=0.8)

    step(), step()  # oneDNN picks its kernels
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.mode}, {args.precision}, {args.threads} threads, batch 32, {args.size} px: "
          f"{total / 1e3 / args.steps:.0f} ms of self CPU time per step\n")
    print("| operator | ms per step | share | calls per step | input shapes |\n| --- | --- | --- | --- | --- |")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        shapes = ", ".join(str(s) for s in e.input_shapes if s)
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | {e.self_cpu_time_total / total:.1%} | "
              f"{e.count // args.steps} | {shapes} |")


if __name__ == "__main__":
    main()
