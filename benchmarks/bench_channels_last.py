"""One MAGIC-Flow training step and one density evaluation (scanner recipe, 64 px, batch 32), in float32 and bf16,
NCHW and channels-last: images/s over a fixed window, all in one process (the ratios are what compares).

    python benchmarks/bench_channels_last.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from augflow.flows import MagicFlow
from augflow.train.recipe import load_recipe


def images_per_s(config, x: torch.Tensor, y: torch.Tensor, channels_last: bool, amp: bool, mode: str,
                 seconds: float) -> float:
    torch.manual_seed(0)
    model = MagicFlow(config)
    model.initialize(x, y)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        if mode == "train":
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                loss = model.bits_per_dim(x, y).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                model.log_prob(x, y)

    step(), step()  # warm-up: oneDNN picks its kernels on the first calls
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return len(x) * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_recipe("scanner").model_config((1, 64, 64), 7)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 64, 64, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    print("| mode | precision | layout | images/s |\n| --- | --- | --- | --- |")
    for mode in ("train", "density"):
        for amp in (False, True):
            for channels_last in (False, True):
                rate = images_per_s(config, x, y, channels_last, amp, mode, args.seconds)
                print(f"| {mode} | {'bf16' if amp else 'fp32'} | {'channels-last' if channels_last else 'NCHW'} | "
                      f"{rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
