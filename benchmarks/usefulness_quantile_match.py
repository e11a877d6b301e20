"""Screen: does mapping a top-up's intensities onto the real images' quantiles make it useful?

A post-processing screened outside ``augflow synthesize`` (reports/usefulness.md, Round 15): each class's synthetic
pixel values are mapped onto the quantiles of that class's real training images (a monotone map: it restores the
exact-zero background that makes every top-up detectable in pixels), and the result is scored with the usefulness
instrument's downstream recipe (:func:`usefulness.train_arm`, 10 epochs of the real set's steps, bf16 where native)
on the ``--eval`` split. Compare with the instrument's own arms of the same work folder and seeds.

    python benchmarks/usefulness_quantile_match.py --work /work/exp/use32 --topup topup_magic_T0.8.h5 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pixel_detectability import quantile_matched  # noqa: E402
from usefulness import BATCH, train_arm  # noqa: E402

from augflow.audit.baseline import predict_proba, steps_per_epoch  # noqa: E402
from augflow.audit.downstream import cnn_metrics  # noqa: E402
from augflow.data.store import read_images, read_info, write_dataset  # noqa: E402
from augflow.precision import resolve_amp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="A usefulness work folder (split/, synthetic/).")
    parser.add_argument("--topup", required=True, help="A top-up file in WORK/synthetic.")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--eval", choices=["val", "test"], default="val")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held_out = args.work / "split" / "train.h5", args.work / "split" / f"{args.eval}.h5"
    x, info = read_images(train), read_info(train)
    out = args.work / "synthetic" / f"matched_{args.topup}"
    if not out.exists():
        source = args.work / "synthetic" / args.topup
        images, synthetic = read_images(source), read_info(source)
        write_dataset(out, quantile_matched(images, synthetic.labels, x, info.labels), synthetic.labels,
                      list(synthetic.subjects), synthetic.slice_index, synthetic.class_names, "synthetic",
                      {"quantile_matched_from": str(source), "to": str(train)})
    x_eval, eval_info = read_images(held_out), read_info(held_out)
    amp = resolve_amp(True, torch.device("cpu"))
    steps = args.epochs * steps_per_epoch(len(info.labels), BATCH)
    for seed in map(int, args.seeds.split(",")):
        model, n = train_arm("matched", {}, x, info.labels, {"matched": out}, seed, args.epochs, steps,
                             len(info.class_names), amp)
        metrics = cnn_metrics(predict_proba(model, x_eval, amp=amp), eval_info.labels, eval_info.class_names)
        print(json.dumps({"seed": seed, "n_train": n, "balanced_accuracy": metrics["balanced_accuracy"],
                          "recall": metrics["per_class_recall"]}), flush=True)


if __name__ == "__main__":
    main()
