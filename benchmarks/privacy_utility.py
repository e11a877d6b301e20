"""Privacy–utility of DP releases, with and without public pretraining: the numbers of reports/privacy.md.

On the built-in scanner data (the split of :mod:`usefulness`, so its real and oversampled CNN runs are shared) it
runs, each stage once (outputs are kept in ``--work`` and reused):

1. the **public** pretraining set: ``augflow demo-data`` with its own seed (other simulated subjects, declared
   public), split into train / val, and one non-private MAGIC-Flow trained on it (``scanner-public`` recipe);
2. DP runs at ε per subject: from scratch (``scanner-dp``, ε in ``--scratch``) and fine-tunes of the public model
   (``scanner-dp-finetune``: ``--init-from`` the public model, declared public; ε in ``--epsilons``), which train
   the class conditioning only, every parameter (ε in ``--all-trainable``) or the coarsest scale (ε in
   ``--top-trainable``);
3. per generator: a balanced top-up at the stored temperature (``augflow synthesize --balance --real train.h5``)
   and ``augflow audit --no-downstream`` against the held-out split: precision / coverage in the domain feature
   space, class recognition, likelihood membership inference and its empirical ε lower bound, the ledger's ε.

It writes a markdown table; the downstream CNN arms are one :mod:`usefulness` command over the same work folder
(printed at the end), so that every top-up is measured against the same oversampling control.

    python benchmarks/privacy_utility.py --work work/usefulness-scanner-32 --epsilons 1,4,8 --threads 1 \\
        --nonprivate runs/magic32 --out reports/privacy-utility.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from augflow.data.store import read_info
from augflow.models import load_model
from augflow.runs import model_file
from augflow.train.loop import dataset_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from usefulness import parse_arm, run, synthetic_file  # noqa: E402

PUBLIC_SEED = 1  # the simulator's subjects of seed 1 are not those of seed 0 (the private data)


def train(command: list[str], out: Path, log: list[str], work: Path) -> Path:
    """``augflow train ... --out out`` unless ``out`` holds a model. Training writes ``model.pt`` at checkpoints too,
    so a folder of an interrupted run counts as done: finish it with ``augflow train ... --resume`` first."""
    if not (out / "model.pt").exists():
        run([*command, "--out", str(out)], log, work)
    return out


def audit(label: str, model: Path, topup: Path, split: Path, work: Path, log: list[str], threads: int) -> dict:
    """``augflow audit --no-downstream`` of one top-up (cached): its metrics.json."""
    out = work / "audit" / label
    if not (out / "metrics.json").exists():
        run(["augflow", "audit", "--real", str(split / "test.h5"), "--train", str(split / "train.h5"),
             "--synthetic", str(topup), "--model", str(model), "--out", str(out), "--no-downstream",
             "--bootstraps", "20", "--threads", str(threads), "--overwrite"], log, work)
    return json.loads((out / "metrics.json").read_text())


def row(label: str, metrics: dict, val_bpd: float) -> str:
    """One table row; the public model never saw the private data, so its ε with respect to them is 0."""
    ledger = metrics["privacy"]["ledger"] or {}
    eps = 0.0 if label == "public" else ledger.get("epsilon")
    init = label == "public" or (ledger.get("init_from") or {}).get("declared_public")
    synthetic = metrics["fidelity"]["overall"]["synthetic"]
    mia = metrics["membership_inference"]
    cells = [label, "∞" if eps is None else f"{eps:.2f}", "yes" if init else "no", f"{val_bpd:.4f}",
             f"{synthetic['precision']:.2f}", f"{synthetic['coverage']:.2f}",
             f"{metrics['recognition']['synthetic_mean']:.2f}", f"{synthetic['fid']:.0f}",
             f"{mia['auc']:.3f}", f"{mia['epsilon_lower_bound']:.2f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="A usefulness.py work folder (its split is used).")
    parser.add_argument("--epsilons", default="1,4,8", help="ε per subject of the DP runs.")
    parser.add_argument("--scratch", default="8", help="ε of the DP runs without pretraining ('' for none).")
    parser.add_argument("--all-trainable", default="8",
                        help="ε of DP fine-tunes of every parameter (the recipe's: the conditioning only).")
    parser.add_argument("--top-trainable", default="",
                        help="ε of DP fine-tunes of the coarsest scale (privacy.trainable = top).")
    parser.add_argument("--nonprivate", type=Path, default=None,
                        help="A non-private MAGIC-Flow run on the private split (ε = ∞), labelled 'magic'.")
    parser.add_argument("--temperature", default="0.8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="Recipe override for every training (e.g. train.epochs=2 for a smoke run).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    split = work / "split"
    if not (split / "test.h5").exists():
        raise SystemExit(f"--work {work}: no split/test.h5; run benchmarks/usefulness.py with this --work first")
    log: list[str] = []
    common = ["--threads", str(args.threads), "--seed", "0", *sum((["--set", o] for o in args.overrides), [])]

    size = str(read_info(split / "train.h5").image_shape[-1])
    public, public_split = work / "public.h5", work / "public"
    if not (public_split / "train.h5").exists():
        run(["augflow", "demo-data", "--task", "scanner", "--size", size, "--seed", str(PUBLIC_SEED), "--out",
             str(public), "--overwrite"], log, work)
        run(["augflow", "split", str(public), "--out-dir", str(public_split), "--val", "0.1", "--test", "0",
             "--seed", str(PUBLIC_SEED), "--overwrite"], log, work)
    runs: dict[str, Path] = {}
    runs["public"] = train(["augflow", "train", "--data", str(public_split / "train.h5"), "--val",
                            str(public_split / "val.h5"), "--recipe", "scanner-public", *common],
                           work / "runs" / "public", log, work)
    private = ["--data", str(split / "train.h5"), "--val", str(split / "val.h5"), *common]
    for eps in filter(None, args.scratch.split(",")):
        runs[f"dp{eps}"] = train(["augflow", "train", *private, "--recipe", "scanner-dp", "--epsilon", eps],
                                 work / "runs" / f"dp{eps}", log, work)
    for eps in filter(None, args.epsilons.split(",")):
        runs[f"dp{eps}-pub"] = train(["augflow", "train", *private, "--recipe", "scanner-dp-finetune",
                                      "--init-from", str(runs["public"]), "--init-from-public", "--epsilon", eps],
                                     work / "runs" / f"dp{eps}-pub", log, work)
    for group, epsilons in (("all", args.all_trainable), ("top", args.top_trainable)):  # the recipe: conditioning
        for eps in filter(None, epsilons.split(",")):
            runs[f"dp{eps}-pub-{group}"] = train(
                ["augflow", "train", *private, "--recipe", "scanner-dp-finetune", "--init-from", str(runs["public"]),
                 "--init-from-public", "--epsilon", eps, "--set", f"privacy.trainable={group}"],
                work / "runs" / f"dp{eps}-pub-{group}", log, work)
    if args.nonprivate:  # labelled as usefulness.py's own MAGIC-Flow run, so its top-up and CNN runs are shared
        runs["magic"] = args.nonprivate.resolve()

    lines = ["| generator | ε (subject) | public pretraining | val bits/dim | precision | coverage | "
             "class recognition | FID | MIA AUC | ε lower bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, model in runs.items():
        arm = parse_arm(f"{label}:T={args.temperature}", set(runs))
        topup = synthetic_file(arm, work, runs, split / "train.h5", log, args.threads)
        val_bpd = dataset_loss(load_model(model_file(model)), split / "val.h5", device="cpu")
        lines.append(row(label, audit(label, model, topup, split, work, log, args.threads), val_bpd))
    arms = ",".join(["real", "oversampled", *(f"{label}:T={args.temperature}" for label in runs)])
    downstream = ["python", "benchmarks/usefulness.py", "--work", str(work), "--eval", "test", "--epochs", "10",
                  "--arms", arms, *sum((["--run", f"{k}={v}"] for k, v in runs.items()), [])]
    text = "\n".join(["# Privacy–utility on the built-in scanner data", "", *lines, "",
                      "Validation bits/dim: the private validation split (fixed dequantisation noise). "
                      "Precision / coverage and FID in the audit's domain feature space against the held-out test "
                      "split; class recognition: the fraction of synthetic images a ResNet-18 trained on the real "
                      "training split files under their own class; MIA: likelihood membership inference of the "
                      "training split against the test split (ROC AUC and the 95% empirical ε lower bound).", "",
                      "Commands:", "", "```", shlex.join(["python", *sys.argv]), *log, "```", "",
                      "Downstream arms (the same work folder):", "", "```", shlex.join(downstream), "```", ""])
    out = args.out or work / "privacy-utility.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
