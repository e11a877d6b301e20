"""torch.compile on a MAGIC-Flow training step (scanner recipe, 64 px, batch 32): images/s of eager and compiled
``bits_per_dim`` + backward + AdamW, in bf16 autocast and float32, in one process. The compiled warm-up (inductor
generating and building C++ kernels with the system compiler) is reported separately.

    python benchmarks/bench_compile.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from augflow.flows import MagicFlow
from augflow.train.recipe import load_recipe


def measure(config, x: torch.Tensor, y: torch.Tensor, compiled: bool, amp: bool, seconds: float) -> tuple[float, float]:
    """(images/s, warm-up seconds) of training steps."""
    torch.manual_seed(0)
    model = MagicFlow(config)
    model.initialize(x, y)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    loss_fn = torch.compile(model.bits_per_dim) if compiled else model.bits_per_dim

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = loss_fn(x, y).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step(), step()
    warm_up = time.perf_counter() - start
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return len(x) * n / (time.perf_counter() - start), warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_recipe("scanner").model_config((1, 64, 64), 7)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 64, 64, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    print("| precision | mode | images/s | warm-up s |\n| --- | --- | --- | --- |")
    for amp in (True, False):
        for compiled in (False, True):
            rate, warm_up = measure(config, x, y, compiled, amp, args.seconds)
            print(f"| {'bf16' if amp else 'fp32'} | {'compiled' if compiled else 'eager'} | {rate:.1f} | "
                  f"{warm_up:.0f} |", flush=True)


if __name__ == "__main__":
    main()
