"""``augflow demo``: the whole pipeline on the built-in brain-MRI data, end to end.

Generates the built-in scanner data at 32 px, splits it by subject, trains the ``quick`` recipe for 20 epochs,
writes a balanced synthetic top-up of the under-represented scanners and audits it (``augflow audit`` with a smaller
downstream protocol: the steps of 2 epochs per CNN, a 2-epoch domain encoder). The generator and the audit's CNNs
run in bf16 where the hardware has it. 7 minutes on 2 cores of a recent Xeon (AMX-BF16), 16 on a slower machine in
float32. The audit compares the top-up with oversampling the real minority images and prints its verdict in one
sentence.

The demo does not use the release that beat oversampling at 64 px (a classifier-selected set of every class added to
the oversampled images, reports/usefulness.md): at demo size a real-trained classifier files almost none of the
small generator's TrioTim, Prisma and Prisma Fit samples under their class, so a selected set cannot be drawn, and
added unselected, that set hurt as the top-up does, and cost 2.5 more minutes (reports/demo).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from augflow.atomic import check_output_folder
from augflow.audit import EncoderRecipe, run_audit
from augflow.audit.downstream import usefulness_sentence
from augflow.data.phantom import generate_demo_data
from augflow.data.splits import split_file
from augflow.data.store import read_info
from augflow.precision import bf16_support
from augflow.runs import resolve_device
from augflow.synthesize import synthesize, topup_counts
from augflow.train.loop import train
from augflow.train.recipe import load_recipe

DEMO_SIZE = 32
# Where the demo's minutes buy quality: 600 steps give val 4.37 bits/dim and samples a real-trained classifier
# recognises 32% of (3 epochs: 5.37 and 15%).
TRAIN_EPOCHS = 20


def run_demo(out_dir: str | Path, task: str = "scanner", seed: int = 0, echo: Callable = print,
             progress: bool = True, audit: bool = True, audit_seeds: int = 3, audit_epochs: int = 2,
             encoder_epochs: int = 2, bootstraps: int = 30, train_epochs: int = TRAIN_EPOCHS, scale: float = 1.0,
             overwrite: bool = False) -> dict:
    """Run generate → split → train → synthesize → audit in ``out_dir``; return the paths written, by name.

    Arguments:
        out_dir: Folder of everything the demo writes (the domain encoder is cached in ``out_dir/cache``): new or
            empty, or with ``overwrite`` a previous demo's, which it replaces.
        task: "scanner" or "modality".
        seed: Seeds every step.
        echo: Where progress lines go.
        progress: Show progress bars.
        audit: Run the audit (step 5).
        audit_seeds: Downstream CNN trainings per protocol (the audit's default is 3).
        audit_epochs: Epochs per downstream CNN training (the audit's default is 30).
        encoder_epochs: Epochs of the audit's domain encoder (the audit's default is 10).
        bootstraps: FID bootstrap resamples (the audit's default is 100).
        train_epochs: Epochs of the generator's training (the quick recipe's own default is 3).
        scale: Multiplier of the built-in data's class counts (the tests run a half-size demo).
        overwrite: Run in a non-empty ``out_dir``, replacing what a previous demo wrote there.

    Raises:
        ConfigError: For a non-empty ``out_dir`` without ``overwrite``.
    """
    out_dir = check_output_folder(out_dir, overwrite, "--out-dir")
    steps = 5 if audit else 4
    echo(f"[1/{steps}] generating the built-in {task} data at {DEMO_SIZE} px (MNI152 template, seed {seed})")
    full = generate_demo_data(task, out_dir / f"{task}.h5", size=DEMO_SIZE, seed=seed, scale=scale,
                              progress=progress, overwrite=overwrite)
    echo(f"[2/{steps}] splitting by subject (train 70% / val 10% / test 20%)")
    parts = split_file(full, out_dir / "data", seed=seed, overwrite=overwrite)
    for name, path in parts.items():
        info = read_info(path, check_values=False)
        counts = ", ".join(f"{k} {v}" for k, v in info.class_counts().items())
        echo(f"  {name:5s} {len(info):5d} images, {len(set(info.subjects)):4d} subjects: {counts}")

    # bf16 where the CPU (or GPU) runs it natively: the generator trains faster, and the audit's CNNs follow the
    # model's stored setting. Elsewhere float32, without amp's fallback warning.
    bf16 = bf16_support(resolve_device("auto"))
    echo(f"[3/{steps}] training MAGIC-Flow with the quick recipe for {train_epochs} epochs"
         + (f" (bf16 mixed precision: {bf16})" if bf16 else ""))
    run = out_dir / "runs" / "quick"
    recipe = load_recipe("quick", [f"train.epochs={train_epochs}", f"train.amp={'true' if bf16 else 'false'}"])
    result = train(parts["train"], run, recipe, val=parts["val"], seed=seed, command="augflow demo",
                   progress=progress, overwrite=overwrite)
    echo(f"  {result.steps} steps, best validation {result.best_val_loss:.3f} {result.loss_name} "
         f"-> {result.model_path}")

    echo(f"[4/{steps}] synthesizing a balanced top-up of the under-represented classes")
    counts, source = topup_counts(result.model_path, real=parts["train"])
    synthetic = synthesize(result.model_path, out_dir / "synthetic.h5", counts, seed=seed, progress=progress,
                           counts_source=source, overwrite=overwrite)
    echo(f"  wrote {sum(synthetic.counts.values())} images to {synthetic.out}: "
         + ", ".join(f"{k} {v}" for k, v in synthetic.counts.items() if v))
    paths = {"data": full, **parts, "run": run, "synthetic": synthetic.out}
    if not audit:
        return paths

    echo(f"[5/{steps}] auditing the synthetic images against the held-out test split")
    report = run_audit(parts["test"], parts["train"], synthetic.out, out_dir / "audit", model=result.model_path,
                       val=parts["val"], seeds=audit_seeds, downstream_epochs=audit_epochs, bootstraps=bootstraps,
                       encoder_recipe=EncoderRecipe(epochs=encoder_epochs), cache_dir=out_dir / "cache", seed=seed,
                       command="augflow demo", progress=progress, overwrite=overwrite)
    fid = report["fidelity"]["overall"]
    echo(f"  FID {fid['synthetic']['fid']:.1f} (real train vs test: {fid['real']['fid']:.1f}); copy fraction "
         f"{report['memorization']['copy_fraction']:.3f}; membership-inference AUC "
         f"{report['membership_inference']['auc']:.3f}")
    rec = report["recognition"]
    echo(f"  a classifier trained on the real images files {rec['synthetic_mean']:.0%} of the synthetic images under "
         f"their own class (real test images: {rec['real_mean']:.0%})")
    balanced = {p: v["summary"]["balanced_accuracy"] for p, v in report["downstream"]["protocols"].items()}
    spread = (lambda v: f" ± {v['std']:.3f}") if audit_seeds > 1 else (lambda v: "")
    echo(f"  downstream balanced accuracy ({audit_seeds} seed(s)): "
         + ", ".join(f"{p} {v['mean']:.3f}{spread(v)}" for p, v in balanced.items()))
    echo(f"  {usefulness_sentence(report['downstream'])}")
    gate, said = report["gate"], report["verdict"]["gate"]
    caveat = f" ({said['text'][:1].lower()}{said['text'][1:]})" if said["status"] == "warn" else ""
    echo("  release gate: " + ("passed" + caveat if gate["passed"] else f"failed ({', '.join(gate['failed'])})"))
    echo(f"  report: {report['paths']['html']}")
    return {**paths, "report": Path(report["paths"]["html"]), "metrics": Path(report["paths"]["metrics"])}
