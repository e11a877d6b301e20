"""Where a MAGIC-Flow pass spends its convolution time: every distinct convolution of the recipe's model (64 px,
batch 32), its calls per density pass, and its FLOP/s when timed alone, against the same run's matmul peak.

Each distinct convolution (channels, kernel, stride, dilation, input size) is recorded by a forward hook during one
density pass, then timed alone with ``F.conv2d`` on a random input of its shape, under ``inference_mode`` and in the
chosen precision. The table, sorted by time per pass, shows which layers of the architecture run far below the
machine's peak (small output widths, large dilations), which is what caps the fraction of peak of the whole pass.

    python benchmarks/conv_profile.py --threads 2 --precision bf16
    python benchmarks/conv_profile.py --threads 2 --precision fp32 --recipe scanner-classify
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F
from bench_flow import _build, _matmul_flops, _timed

from augflow.flows import MagicFlow
from augflow.precision import autocast


def conv_calls(model: MagicFlow, x: torch.Tensor, y: torch.Tensor) -> Counter:
    """``{(conv settings, input shape): calls}`` of one density pass."""
    calls: Counter = Counter()

    def record(module: torch.nn.Conv2d, inputs) -> None:
        calls[(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
               module.dilation, module.groups, tuple(inputs[0].shape))] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model.log_prob(x, y)
    for hook in hooks:
        hook.remove()
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="scanner")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per convolution")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = _build("magic", args.recipe, args.batch)
    model.eval()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = _matmul_flops(dtype)

    with torch.inference_mode(), autocast(torch.device("cpu"), args.precision == "bf16"):
        pass_seconds = _timed(lambda: model.log_prob(x, y), 5.0)
    rows = []
    for (cin, cout, kernel, stride, padding, dilation, groups, shape), n in conv_calls(model, x, y).items():
        inp = torch.randn(shape, dtype=dtype)
        weight = torch.randn(cout, cin // groups, *kernel, dtype=dtype)
        bias = torch.randn(cout, dtype=dtype)

        def conv(inp=inp, weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups):
            return F.conv2d(inp, weight, bias, stride, padding, dilation, groups)

        with torch.inference_mode():
            seconds = _timed(conv, args.seconds)
            out = conv()
        flops = 2 * out.numel() * (cin // groups) * kernel[0] * kernel[1]
        rows.append((n * seconds, n, cin, cout, kernel, dilation, shape, flops / seconds))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"recipe {args.recipe}, {args.precision}, {args.threads} threads, batch {args.batch}: density pass "
          f"{pass_seconds * 1e3:.0f} ms; its {sum(r[1] for r in rows)} convolutions timed alone {total * 1e3:.0f} ms "
          f"({total / pass_seconds:.0%}); {args.precision} matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    print("| in -> out | kernel | dilation | input | calls | ms per pass | share of the pass | GFLOP/s | of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seconds, n, cin, cout, kernel, dilation, shape, rate in rows[:args.rows]:
        print(f"| {cin} -> {cout} | {kernel[0]}x{kernel[1]} | {dilation[0]} | {shape[2]}x{shape[3]} | {n} | "
              f"{seconds * 1e3:.1f} | {seconds / pass_seconds:.0%} | {rate / 1e9:.0f} | {rate / peak:.0%} |")


if __name__ == "__main__":
    main()
