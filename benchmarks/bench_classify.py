"""Cost of classifying an image for all K classes in one call, against K density passes batched.

For the shipped ``scanner-classify`` recipe (a prior of class means and scales, couplings that ignore the label) and
for the paper's conditional maximum likelihood (couplings that see the label), on random 64 px images with K = 7:
``class_log_probs(x)`` (the one call ``augflow classify`` makes) against ``log_prob`` of the K-fold repeated batch
with every label (what a likelihood classifier costs without the one-pass prior). Both run in the same process,
interleaved, under ``inference_mode``; the ratio is what compares. Writes reports/benchmarks-classify.md.

    python benchmarks/bench_classify.py --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from augflow.flows import MagicFlow
from augflow.precision import autocast, bf16_support
from augflow.train.recipe import load_recipe

REPORT = Path(__file__).resolve().parents[1] / "reports" / "benchmarks-classify.md"
VARIANTS = {
    "scanner-classify (one-pass prior)": [],
    "conditional couplings (the paper's)": ["model.prior=standard", "model.conditional_couplings=true"],
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    amp = bf16_support(torch.device("cpu"))
    k, b = args.classes, args.batch
    x = torch.rand(b, 1, args.size, args.size)
    rows = []
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        model = MagicFlow(load_recipe("scanner-classify", overrides).model_config((1, args.size, args.size), k)).eval()
        model.initialize(x, torch.arange(b) % k)
        labels = torch.arange(k).repeat_interleave(b)

        def one_call(model=model):
            return model.class_log_probs(x)

        def k_passes(model=model, labels=labels):
            return model.log_prob(x.repeat(k, 1, 1, 1), labels)

        with torch.inference_mode():
            torch.testing.assert_close(one_call(), k_passes().reshape(k, b).T, rtol=1e-5, atol=1e-3)  # same scores
            with autocast(x.device, amp):
                one_call(), k_passes()  # warm-up: oneDNN picks its kernels
                pairs = [(seconds(one_call), seconds(k_passes)) for _ in range(args.repeats)]  # interleaved
        one, many = median([p[0] for p in pairs]), median([p[1] for p in pairs])
        rows.append(f"| {name} | {b / one:.1f} | {b / many:.1f} | {one / many:.2f} |")
    command = f"python benchmarks/bench_classify.py --threads {args.threads}"
    text = "\n".join([
        "# Classifying for all K classes in one call", "",
        f"`{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {'bf16' if amp else 'float32'}): {k} classes, batch {b}, {args.size} px, random "
        "images, medians of interleaved calls.", "",
        "| model | one call: images/s | K density passes: images/s | cost of one call / K passes |",
        "|---|---|---|---|", *rows, "",
        "The issue's goal is a ratio of at most 1.1. With couplings that see the label, the one call is the K passes.",
        "With the one-pass prior, it is one flow pass and K Gaussian evaluations of its latents.", ""])
    REPORT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
