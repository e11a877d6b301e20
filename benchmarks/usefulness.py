"""Does a synthetic top-up help a classifier, compared with what a user does without augflow?

The instrument of the usefulness issue. On the built-in data it runs, each stage once (outputs are kept in
``--work`` and reused):

1. ``augflow demo-data`` and ``augflow split``: a subject-wise train / val / test split (``--rare CLASS=SUBJECTS``
   keeps only that many subjects of a class in the training split: the modality task is balanced, and a top-up
   has nothing to add until a modality is rare);
2. ``augflow train``: one generator per family (MAGIC-Flow, MedSymmFlow), or ``--run FAMILY=DIR`` to reuse one;
3. ``augflow synthesize --balance --real train.h5``: one top-up per arm (temperature, selection, ratio cap), and
   ``--per-class`` for the train-on-synthetic arm;
4. the downstream ResNet-18 of :mod:`augflow.audit.downstream` (class-weighted loss, a fixed number of epochs,
   seeds 0..S-1) on every arm, evaluated on the ``--eval`` split: ``val`` while choosing levers, ``test`` for the
   reported figure (choose on val, report on test, never the other way round); ``fresh-val`` and ``fresh`` are
   their counterparts of new subjects of the simulator, as many as ``--fresh-per-class`` asks (the split's few
   subjects of a rare scanner make its balanced accuracy move by a few points with the subjects drawn);

and writes a markdown report: balanced accuracy per arm (mean ± std), the paired difference of each top-up
against ``real+oversampled`` and ``real`` with a 95% Student-t interval over seeds, per-class recall with the
minority classes marked, CPU time per training, and every command.

Arms are named on the command line: ``real``, ``oversampled``, and top-ups ``FAMILY[:key=value...]`` with FAMILY
``magic`` or ``symm`` and keys ``T`` (sampling temperature; for MAGIC-Flow one per latent part, finest first,
separated by ``/``: ``T=1.0/0.3/0.3/0``), ``g`` (``--guidance``: classifier-free guidance),
``select`` (none | posterior | classifier | realism), ``pub`` (``1``: the selection's classifier trains on the public
set of ``privacy_utility.py``, ``public/train.h5`` in ``--work``, declared public with ``--select-public``: how a DP
model selects), ``conf`` (the selection's minimum confidence), ``keep`` (``realism``: the fraction kept), ``ratio``
(``--max-ratio``), ``denoise`` (``1``: ``--denoise``), ``near``
(``--near train.h5 --strength S``: each image derived from a real training image), ``from`` (with ``near``: the
``--anchor-classes`` same | other | all, whose real images anchor a class's samples), ``bg`` (``1``:
``--zero-background``, the real images' exact-zero background), ``w`` (the
downstream loss weight of each synthetic image, default 1; class weights count it) and ``soft`` (soft labels: the
target of each synthetic image mixes its intended class with weight ``1 - soft`` and the posterior of the audit's
domain encoder, a ResNet-18 trained on the real training images, with weight ``soft``). Before a spec, ``only:`` trains
on a balanced synthetic set alone (``--per-class`` = the largest real class), and ``all:`` adds that same set to the
real images: every class gets as many synthetic images as every other, so that looking synthetic says nothing
about the class (a top-up puts synthetic images in the minority classes only). ``pre:`` pretrains on that balanced
synthetic set for the fraction ``pre`` (default 0.5) of the arm's steps and fine-tunes on ``real+oversampled`` for the
rest: the synthetic images teach anatomy and class layout, the real ones the scanners' exact signatures. ``half:``
adds that balanced synthetic set to ``real+oversampled``: every class is then half real (its duplicates included), half
synthetic, so that neither the class nor looking synthetic tells anything about the other (``all:`` still has a
larger share of synthetic images in the minority classes). The key
``bn=real`` keeps BatchNorm statistics of the real training images only (the test images are real). ``dup=F`` mixes
the two ways of filling a class: the fraction F of each class's gap to the largest class is filled by duplicates of its
real images (as ``oversampled`` does), the rest by the top-up (``dup=0``: the top-up; ``dup=1``: oversampling).
``syn=F`` keeps the fraction F of each class's synthetic images (with ``half:``, ``syn=0.5`` makes every class a
third synthetic).

The generator ``fresh`` is no generator: its images are **new subjects of the built-in simulator** (seed 1, so none
is in the split), a perfect generator's samples. ``fresh`` tops up with them and ``half:fresh`` adds a balanced set
of them, so their rows are the ceiling of what any generator could add in that arm (no ``T``, ``near``, ...; only
``select=classifier:conf=P``, which keeps what the classifier selection would keep of a perfect generator).

    python benchmarks/usefulness.py --task scanner --size 32 --eval test --seeds 5 --threads 1 \\
        --arms real,oversampled,magic:T=1.0,symm:T=1.0,only:magic:T=1.0 --out reports/usefulness.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from augflow.atomic import atomic_write_text
from augflow.audit.baseline import predict_proba, steps_per_epoch, train_cnn
from augflow.audit.detectability import detectability
from augflow.audit.downstream import (
    CONFIDENCE,
    cnn_metrics,
    minority_classes,
    mixed_rows,
    oversample_rows,
    paired_difference,
    topup_rows,
)
from augflow.audit.features import EncoderRecipe, domain_encoder_path, feature_space, load_encoder
from augflow.audit.recognition import class_recognition
from augflow.data.phantom import SLICES_PER_SUBJECT, TASKS, simulate_subject
from augflow.data.splits import write_subset
from augflow.data.store import DatasetWriter, read_images, read_info
from augflow.precision import cpu_model, resolve_amp

FAMILIES = {"magic": "", "symm": "-symmflow"}  # recipe suffix per family
# Generator budgets in epochs (scanner training split: MAGIC-Flow 30 epochs = 1,800 steps of 16 images,
# MedSymmFlow 60 epochs = 1,800 steps of 32).
TRAIN_SETTINGS = {
    "magic": ["--set", "train.amp=true", "--set", "train.epochs=30"],
    "symm": ["--set", "train.amp=true", "--set", "train.epochs=60"],
}
# At 32 px MedSymmFlow's U-Net has one level fewer than the recipe's 64 px one (attention stays at 8 px).
NARROW_SYMM = ["--set", "model.channel_mult=[1,2,2]", "--set", "model.attention_resolutions=[8]"]


BATCH = 64  # images per downstream CNN step
# The keys that change the synthetic file.
SAMPLING_KEYS = ("T", "g", "select", "pub", "conf", "keep", "ratio", "denoise", "near", "from", "bg")
ARM_KEYS = (*SAMPLING_KEYS, "w", "soft", "bn", "pre", "dup", "syn")
MODES = ("only", "all", "pre", "half")  # prefixes of arms that use a balanced synthetic set instead of a top-up
FRESH_SEED = 1  # the simulator's seed of the ``fresh`` subjects; the split is drawn from seed 0
FRESH_EVAL_SEEDS = {"fresh": 2, "fresh-val": 3}  # simulator seeds of the --eval sets of new subjects
FRESH_KEYS = ("select", "conf")  # the sampling keys a perfect generator takes: the classifier's selection
FRESH_POOL = 4  # a selected set of new subjects is drawn from this many times the images it keeps


def run(command: list[str], log: list[str], cwd: Path) -> None:
    """Run one augflow command in ``cwd`` and record it for the report."""
    log.append(shlex.join(command))
    print("$", log[-1], flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def parse_arm(spec: str, labels: set[str] = frozenset()) -> dict:
    """``only:magic:T=1.0:select=classifier`` -> {"mode": "only", "family": "magic", "T": "1.0", ...}.

    The mode is "topup", "only", "all", "pre" or "half"; the "family" is a model family (trained here when no ``--run``
    gives it) or the label of a ``--run``.
    """
    parts = spec.split(":")
    mode = parts[0] if parts[0] in MODES else "topup"
    parts = parts[1:] if mode != "topup" else parts
    if parts[0] not in FAMILIES and parts[0] not in labels and parts[0] != "fresh":
        raise SystemExit(f"--arms: unknown generator {parts[0]!r} in {spec!r}; allowed: a family "
                         f"{sorted(FAMILIES)}, 'fresh' (new simulated subjects) or a --run label {sorted(labels)}")
    options = dict(p.split("=", 1) for p in parts[1:])
    allowed = ([k for k in ARM_KEYS if k not in SAMPLING_KEYS or k in FRESH_KEYS] if parts[0] == "fresh" else
               ARM_KEYS)
    unknown = set(options) - set(allowed)
    if unknown:
        raise SystemExit(f"--arms: unknown keys {sorted(unknown)} in {spec!r}; allowed: {', '.join(allowed)}")
    if parts[0] == "fresh" and options.get("select", "classifier") != "classifier":
        raise SystemExit(f"--arms: {spec!r}: new subjects can only be selected by the classifier (select=classifier)")
    return {"mode": mode, "family": parts[0], **options}


def synthetic_file(arm: dict, work: Path, runs: dict[str, Path], real: Path, log: list[str], threads: int) -> Path:
    """The top-up (or the balanced synthetic-only set) of an arm, sampled once, on ``threads`` CPU threads (torch
    would take every core, and two instruments side by side would crawl)."""
    name = "_".join([arm["family"]] + [f"{k}{arm[k]}".replace("/", "-") for k in SAMPLING_KEYS if k in arm])
    per_class = arm["mode"] != "topup"  # the other modes share one balanced synthetic set
    out = work / "synthetic" / (("only_" if per_class else "topup_") + name + ".h5")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["augflow", "synthesize", "--model", str(runs[arm["family"]]), "--out", str(out), "--seed", "0",
               "--real", str(real), "--threads", str(threads)]
    if per_class:
        command += ["--per-class", str(int(np.bincount(read_info(real).labels).max()))]
    else:
        command += ["--balance"]
    if "T" in arm:
        command += ["--temperature", arm["T"].replace("/", ",")]
    if "g" in arm:
        command += ["--guidance", arm["g"]]
    if arm.get("select", "none") == "realism":
        command += ["--select", "realism", "--keep-fraction", arm.get("keep", "0.25")]
    elif arm.get("select", "none") != "none":
        command += ["--select", arm["select"], "--min-confidence", arm.get("conf", "0.5")]
    if arm.get("pub", "0") == "1":
        command += ["--select-public", str(work / "public" / "train.h5")]
    if "ratio" in arm:
        command += ["--max-ratio", arm["ratio"]]
    if arm.get("denoise", "0") == "1":
        command += ["--denoise"]
    if arm.get("bg", "0") == "1":
        command += ["--zero-background"]
    if "near" in arm:
        command += ["--near", str(real), "--strength", arm["near"], "--anchor-classes", arm.get("from", "same")]
    run(command, log, work)
    return out


def fresh_subjects(task: str, size: int, class_names: list[str], per_class: int, seed: int, out: Path) -> Path:
    """``per_class`` images of each class from new subjects of the built-in simulator (``seed`` != 0, the split's):
    what a generator that samples the true distribution would give, or a test set as large as wanted."""
    if out.exists():
        return out
    with DatasetWriter(out, (1, size, size), class_names, provenance={"seed": seed}) as writer:
        for k, name in enumerate(class_names):
            for j in range(-(-per_class // SLICES_PER_SUBJECT)):
                n = min(SLICES_PER_SUBJECT, per_class - j * SLICES_PER_SUBJECT)
                images, offsets = simulate_subject(task, TASKS[task].index(name), j, seed=seed, size=size,
                                                   num_slices=n)
                writer.append(images, np.full(n, k), np.full(n, f"fresh-{k}-{j:04d}", dtype=object), offsets)
    return out


def fresh_file(arm: dict, task: str, size: int, real: Path, work: Path) -> Path:
    """The balanced set of new subjects of an arm (as many images of every class as the largest real class). With
    ``select=classifier``, the first of a larger pool that the audit's domain encoder (a ResNet-18 trained on the
    real training file) assigns to their class with probability at least ``conf``: what the selection of augflow
    synthesize would keep of a perfect generator's samples."""
    info = read_info(real)
    n = int(np.bincount(info.labels).max())
    if "select" not in arm:
        return fresh_subjects(task, size, info.class_names, n, FRESH_SEED, work / "synthetic" / "fresh.h5")
    conf = float(arm.get("conf", "0.5"))
    out = work / "synthetic" / f"fresh_selectclassifier_conf{conf:g}.h5"
    if out.exists():
        return out
    pool = fresh_subjects(task, size, info.class_names, FRESH_POOL * n, FRESH_SEED,
                          work / "synthetic" / f"fresh-pool{FRESH_POOL * n}.h5")
    labels = read_info(pool).labels
    probs = predict_proba(load_encoder(domain_encoder_path(real, EncoderRecipe())), read_images(pool))
    passed = probs[np.arange(len(labels)), labels] >= conf
    rows = [np.flatnonzero(passed & (labels == k))[:n] for k in range(len(info.class_names))]
    short = {info.class_names[k]: len(r) for k, r in enumerate(rows) if len(r) < n}
    if short:
        raise SystemExit(f"--arms: of {FRESH_POOL * n} new images per class, fewer than {n} pass conf={conf:g}: "
                         f"{short}")
    acceptance = {name: float(passed[labels == k].mean()) for k, name in enumerate(info.class_names)}
    return write_subset(pool, np.concatenate(rows), out, {"selection": {
        "method": "classifier", "min_confidence": conf, "acceptance_rate": acceptance}})


def training_set(arm: str, x: np.ndarray, y: np.ndarray, files: dict[str, Path], seed: int, weight: float = 1.0,
                 dup: float = 0.0, syn: float = 1.0):
    """Images, labels and per-image loss weights of an arm (``weight`` for each synthetic image of a top-up), and
    how many of its first rows are real images (``dup``: the share of each class's top-up replaced by duplicates;
    ``syn``: the fraction of each class's synthetic images kept)."""
    if arm == "real":
        return x, y, None, len(y)
    if arm == "oversampled":
        rows = oversample_rows(y, int(y.max()) + 1, seed)
        return x[rows], y[rows], None, len(rows)
    info, images = read_info(files[arm]), read_images(files[arm])
    if arm.startswith(("only:", "pre:")):
        return images, info.labels, None, 0
    if arm.startswith(("all:", "half:")):
        rows = np.arange(len(images))
    else:
        rows = topup_rows(y, info.labels, len(info.class_names), seed)
    real = oversample_rows(y, int(y.max()) + 1, seed) if arm.startswith("half:") else np.arange(len(y))
    if syn < 1:  # the same share of synthetic images in every class, fewer of them
        rows = np.concatenate([r[:round(syn * len(r))] for r in (rows[info.labels[rows] == k]
                                                                 for k in np.unique(info.labels[rows]))])
    if dup:
        rows, duplicates = mixed_rows(y, info.labels, rows, dup, seed)
        real = np.r_[real, duplicates]
    weights = None if weight == 1 else np.r_[np.ones(len(real)), np.full(len(rows), weight)]
    return np.concatenate([x[real], images[rows]]), np.concatenate([y[real], info.labels[rows]]), weights, len(real)


def soft_targets(teacher, labels: np.ndarray, images: np.ndarray, n_real: int, num_classes: int,
                 share: float) -> np.ndarray:
    """Targets of an arm with soft labels: one-hot for the real images; for the synthetic ones (after row
    ``n_real``) ``(1 - share)`` one-hot of the intended class + ``share`` x the posterior of a classifier trained on
    the real images (soft labels make low-fidelity samples useful, arXiv 2305.12954)."""
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    targets[n_real:] = (1 - share) * targets[n_real:] + share * predict_proba(teacher, images[n_real:])
    return targets


def train_arm(arm: str, spec: dict, x: np.ndarray, y: np.ndarray, files: dict[str, Path], seed: int,
              epochs: int, steps: int | None, num_classes: int, amp: bool, teacher=None):
    """The downstream CNN of one arm and seed, and the number of images it trained on."""
    xa, ya, wa, n_real = training_set(arm, x, y, files, seed, float(spec.get("w", 1)), float(spec.get("dup", 0)),
                                          float(spec.get("syn", 1)))
    common = {"batch_size": BATCH, "seed": seed, "amp": amp}
    if spec.get("mode") != "pre":
        soft = None if "soft" not in spec else soft_targets(teacher, ya, xa, n_real, num_classes, float(spec["soft"]))
        return train_cnn(xa, ya, num_classes, epochs=epochs, steps=steps, sample_weight=wa, soft_targets=soft,
                         bn_images=x if spec.get("bn") == "real" else None, **common), len(ya)
    xo, yo, _, _ = training_set("oversampled", x, y, files, seed)
    total = steps or epochs * steps_per_epoch(len(yo), BATCH)
    pre_steps = round(float(spec.get("pre", 0.5)) * total)
    if not 1 <= pre_steps < total:
        raise SystemExit(f"--arms: pre={spec.get('pre')} in {arm!r} must leave at least one step for each stage "
                         f"of {total}; allowed: a fraction in (0, 1)")
    model = train_cnn(xa, ya, num_classes, steps=pre_steps, **common)
    return train_cnn(xo, yo, num_classes, steps=total - pre_steps, init=model, **common), len(ya) + len(yo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=["scanner", "modality"], default="scanner")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiplier of the built-in data's class counts.")
    parser.add_argument("--rare", default="",
                        help="CLASS=SUBJECTS[,...]: keep only that many subjects of a class in the training split "
                             "(val and test keep theirs), to make a balanced task imbalanced, e.g. "
                             "--task modality --rare FLAIR=6,tau-PET=6.")
    parser.add_argument("--eval", choices=["val", "test", *FRESH_EVAL_SEEDS], default="val",
                        help="The split the CNNs are scored on; 'fresh' (a test set) and 'fresh-val' (to choose "
                             "levers on): --fresh-per-class images per class of new subjects of the simulator "
                             "(seeds 2 and 3), large enough for small differences (the test split has 5 TrioTim PPMI "
                             "images, val 4).")
    parser.add_argument("--fresh-per-class", type=int, default=400, help="Images per class of --eval fresh(-val).")
    parser.add_argument("--arms", default="real,oversampled,magic:T=1.0,symm:T=1.0,only:magic:T=1.0")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="Train seeds --first-seed .. --first-seed + --seeds - 1 (to share one arm's seeds "
                             "between processes; each training is cached in --work).")
    parser.add_argument("--epochs", type=int, default=15, help="Epochs per downstream CNN training.")
    parser.add_argument("--equal-steps", action="store_true",
                        help="Train every arm for the optimiser steps of --epochs passes over the real training set "
                             "(default: --epochs passes over each arm's own, larger, set).")
    parser.add_argument("--control-epochs", type=int, default=None,
                        help="Train the controls (real, oversampled) for this many epochs instead of --epochs: each "
                             "arm at the budget chosen for it on val (a longer budget can overfit the duplicates).")
    parser.add_argument("--run", action="append", default=[],
                        help="LABEL=DIR: a trained generator; LABEL is a family (reused instead of trained) or a "
                             "name arms refer to (e.g. --run eps8=runs/eps8 --arms real,eps8:T=0.8).")
    parser.add_argument("--work", type=Path, default=None, help="Default: work/usefulness-TASK-SIZE.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--recognition-only", action="store_true",
                        help="Only the class recognition of the synthetic files (no downstream training): a cheap "
                             "screen of generators before their CNN runs.")
    args = parser.parse_args()
    if args.fresh_per_class < 1:
        parser.error(f"--fresh-per-class must be at least 1, but is: {args.fresh_per_class}")
    if args.control_epochs is not None and args.control_epochs < 1:
        parser.error(f"--control-epochs must be at least 1, but is: {args.control_epochs}")
    torch.set_num_threads(args.threads)
    rare = parse_rare(args.rare)
    default_work = f"work/usefulness-{args.task}-{args.size}" + (f"-scale{args.scale:g}" if args.scale != 1 else "") \
        + "".join(f"-{name}{n}" for name, n in rare.items())
    work = (args.work or Path(default_work)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check_setup(work, {"task": args.task, "size": args.size, "scale": args.scale, "rare": rare})
    log: list[str] = []

    data, split = work / "data.h5", work / "split"
    if not (split / "test.h5").exists():
        run(["augflow", "demo-data", "--task", args.task, "--size", str(args.size), "--seed", "0", "--scale",
             f"{args.scale:g}", "--out", str(data)], log, work)
        run(["augflow", "split", str(data), "--out-dir", str(split), "--seed", "0"], log, work)
    train_file, eval_file = split / "train.h5", split / f"{args.eval}.h5"
    if args.eval in FRESH_EVAL_SEEDS:
        eval_file = fresh_subjects(args.task, args.size, read_info(train_file).class_names, args.fresh_per_class,
                                   FRESH_EVAL_SEEDS[args.eval], split / f"{args.eval}{args.fresh_per_class}.h5")
    if rare:
        train_file = make_rare(train_file, rare, split / "train-rare.h5")
    arms = args.arms.split(",")
    runs = dict(r.split("=", 1) for r in args.run)
    runs = {f: Path(d).resolve() for f, d in runs.items()}
    specs = {a: parse_arm(a, set(runs)) for a in arms if a not in ("real", "oversampled")}
    for family in {s["family"] for s in specs.values()} - set(runs) - {"fresh"}:
        runs[family] = work / "runs" / family
        # model.pt appears at the first validation, so only the checkpoint tells whether the run finished:
        # resuming a finished run returns at once, an interrupted one goes on.
        resume = (runs[family] / "checkpoint.pt").exists()
        if resume or not (runs[family] / "model.pt").exists():
            run(["augflow", "train", "--data", str(train_file), "--val", str(split / "val.h5"), "--recipe",
                 args.task + FAMILIES[family], "--out", str(runs[family]), "--threads", str(args.threads),
                 *(["--resume"] if resume else []), *TRAIN_SETTINGS[family],
                 *(NARROW_SYMM if family == "symm" and args.size < 64 else [])], log, work)
    info, x = read_info(train_file), read_images(train_file)
    files = {a: fresh_file(s, args.task, args.size, train_file, work) if s["family"] == "fresh" else
             synthetic_file(s, work, runs, train_file, log, args.threads) for a, s in specs.items()}

    y, names = info.labels, info.class_names
    test = read_info(eval_file)
    x_test = read_images(eval_file)
    cache = work / "cnn"
    cache.mkdir(exist_ok=True)
    results: dict[str, list[dict]] = {}
    amp = resolve_amp(True, torch.device("cpu"))  # bf16 where the CPU runs it natively
    # The audit's domain encoder (a ResNet-18 trained on train.h5, cached): recognition, and the teacher of soft labels.
    encoder = load_encoder(domain_encoder_path(train_file, EncoderRecipe()))
    for arm in [] if args.recognition_only else arms:
        results[arm] = []
        epochs = arm_epochs(args, arm)
        steps = epochs * steps_per_epoch(len(y), BATCH) if args.equal_steps else None
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            source = files.get(arm)
            # The real arm's steps are the same under both budgets (and so is its cache entry).
            budget = epochs if steps is None or arm == "real" else f"{steps} steps"
            evaluated = eval_file.stem if args.eval in FRESH_EVAL_SEEDS else args.eval
            tag = f"{arm}|{seed}|{budget}|{evaluated}|" + (hashlib.sha256(source.read_bytes()).hexdigest()
                                                               if source else "")
            path = cache / (hashlib.sha256(tag.encode()).hexdigest()[:20] + ".json")
            if not path.exists():
                start = time.process_time()
                model, n_train = train_arm(arm, specs.get(arm, {}), x, y, files, seed, epochs, steps,
                                           len(names), amp, encoder)
                metrics = cnn_metrics(predict_proba(model, x_test, amp=amp), test.labels, names)
                record = {"balanced_accuracy": metrics["balanced_accuracy"], "recall": metrics["per_class_recall"],
                          "n_train": n_train, "cpu_s": time.process_time() - start}
                atomic_write_text(json.dumps(record), path)
                print(f"{arm} seed {seed}: {record['balanced_accuracy']:.3f} ({record['cpu_s']:.0f} CPU s)",
                      flush=True)
            results[arm].append(json.loads(path.read_text()))
    # Class recognition of every synthetic file.
    recognition = {arm: class_recognition(encoder, read_images(path), read_info(path).labels, x_test, test.labels,
                                          names) for arm, path in files.items()}
    # Detectability of every synthetic file: can a linear classifier tell it from the real eval images?
    space = feature_space("domain", train_file, progress=False)
    real_sets = {"train": (x, space.extract(x), y, info.subjects), "real": (x_test, space.extract(x_test), test.labels,
                                                                             test.subjects)}
    detect = {}
    for arm, path in files.items():
        images, synthetic = read_images(path), read_info(path)
        sets = {**real_sets, "synthetic": (images, space.extract(images), synthetic.labels, synthetic.subjects)}
        detect[arm] = detectability({"pixels": {r: v[0] for r, v in sets.items()},
                                     "features": {r: v[1] for r, v in sets.items()}},
                                    {r: v[2] for r, v in sets.items()}, {r: np.asarray(v[3]) for r, v in sets.items()})
    report = render(args, results, names, minority_classes(y, names), log, files, test, recognition, detect, amp)
    out = args.out or work / f"usefulness-{args.eval}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


def arm_epochs(args, arm: str) -> int:
    """The downstream budget of an arm in epochs: ``--control-epochs`` for the controls, else ``--epochs``."""
    return args.control_epochs if arm in ("real", "oversampled") and args.control_epochs is not None else args.epochs


def check_setup(work: Path, setup: dict) -> None:
    """Refuse a --work folder made for another task, size, scale or --rare (its generators and caches would not fit)."""
    path = work / "setup.json"
    if path.exists() and json.loads(path.read_text()) != setup:
        raise SystemExit(f"--work {work}: made for {path.read_text()}, not for {json.dumps(setup)}; "
                         "give another --work")
    atomic_write_text(json.dumps(setup), path)  # atomic: processes sharing --work read it meanwhile


def parse_rare(spec: str) -> dict[str, int]:
    """``FLAIR=6,tau-PET=6`` -> {"FLAIR": 6, "tau-PET": 6}."""
    rare = {}
    for item in filter(None, spec.split(",")):
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"--rare: {item!r} is not CLASS=SUBJECTS; allowed: e.g. FLAIR=6,tau-PET=6")
        rare[name] = int(n)
    return rare


def make_rare(train: Path, rare: dict[str, int], out: Path) -> Path:
    """A copy of the training split with only ``rare[name]`` subjects of each named class (drawn with seed 0)."""
    if out.exists():
        return out
    info = read_info(train)
    rng = np.random.default_rng(0)
    keep = np.ones(len(info), dtype=bool)
    for name, n in rare.items():
        if name not in info.class_names:
            raise SystemExit(f"--rare: unknown class {name!r}; allowed: {', '.join(info.class_names)}")
        in_class = info.labels == info.class_names.index(name)
        subjects = np.unique(info.subjects[in_class])
        if not 1 <= n <= len(subjects):
            raise SystemExit(f"--rare {name}={n}: allowed 1..{len(subjects)} (its training subjects)")
        kept = rng.choice(subjects, size=n, replace=False)
        keep &= ~in_class | np.isin(info.subjects, kept)
    return write_subset(train, np.flatnonzero(keep), out, {"rare_subjects": rare})


def render(args, results: dict, names: list[str], minority: list[str], log: list[str], files: dict,
           test, recognition: dict, detect: dict, amp: bool) -> str:
    lines = [f"# Usefulness: {args.task} task, {args.size} px, evaluated on the {args.eval} split", ""]
    if args.scale != 1 or args.rare:
        rare = f"; the training split keeps only {args.rare} subjects (val and test keep theirs)" if args.rare else ""
        lines += [f"Built-in data at scale {args.scale:g}{rare}.", ""]
    if results:
        lines += downstream_tables(args, results, names, minority, test, amp)
    if recognition:
        reference = next(iter(recognition.values()))
        lines += ["", "Class recognition: the fraction of each class's images that a ResNet-18 trained on the real "
                  f"training images (the audit's domain encoder) files under their own class; reference: the "
                  f"{args.eval} images.", "", "| images | mean | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names),
                  f"| real {args.eval} | {reference['real_mean']:.2f} | "
                  + " | ".join("" if reference["real"][n] is None else f"{reference['real'][n]:.2f}" for n in names)
                  + " |"]
        for arm, rec in recognition.items():
            lines.append(f"| {arm} | {rec['synthetic_mean']:.2f} | " + " | ".join(
                "" if rec["synthetic"][n] is None else f"{rec['synthetic'][n]:.2f}" for n in names) + " |")
    if detect:
        lines += ["", "Detectability (`augflow.audit.detectability`): ROC AUC of a logistic regression that tells "
                  f"each set from the {args.eval} images, class-matched, 5 folds grouped by subject; 0.5 = "
                  "indistinguishable; the real training images are the reference.", "",
                  "| images | per side | features: synthetic | features: real train | pixels: synthetic | "
                  "pixels: real train |", "|---|---|---|---|---|---|"]
        for arm, det in detect.items():
            cells = ["n/a" if det[s][r] is None else f"{det[s][r]:.2f}" for s in ("features", "pixels")
                     for r in ("synthetic", "real")]
            lines.append(f"| {arm} | {det['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Synthetic files:", ""]
    for arm, path in files.items():
        prov = read_info(path).provenance or {}
        sel = prov.get("selection") or {}
        rate = sel.get("acceptance_rate")
        rate = (", acceptance " + ", ".join(f"{k} {v:.2f}" for k, v in rate.items())) if rate else ""
        if sel.get("pilot_auc"):  # the realism discriminator's in-sample AUC on its pilot batch
            rate += "; discriminator AUC on its pilot " + ", ".join(f"{k} {v:.2f}" for k, v in sel["pilot_auc"].items())
        lines.append(f"- `{arm}`: {path.name}, {len(read_info(path).labels)} images{rate}")
    lines += ["", "Commands (the stages run in this invocation; cached stages are not repeated):", "", "```",
              shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), *log, "```", ""]
    return "\n".join(lines)


def downstream_tables(args, results: dict, names: list[str], minority: list[str], test, amp: bool) -> list[str]:
    """Balanced accuracy per arm with its paired differences, and the per-class recall."""
    bal = {a: [r["balanced_accuracy"] for r in rs] for a, rs in results.items()}
    budget = (f"{args.epochs} epochs of the real training set's steps for every arm" if args.equal_steps else
              f"{args.epochs} epochs")
    if args.control_epochs is not None:
        budget += f" ({args.control_epochs} for the controls real and real+oversampled)"
    precision = "bf16" if amp else "float32"
    seeds = f"{args.first_seed}..{args.first_seed + args.seeds - 1}"
    lines = [f"ResNet-18 from scratch, class-weighted loss, {budget}, {precision} on {cpu_model()}, seeds {seeds}; "
             f"{len(test.labels)} {args.eval} images of {len(set(test.subjects))} subjects never seen in training. "
             f"Minority classes (*): {', '.join(minority) or 'none'}.", "",
             "| arm | training images | balanced accuracy | vs real+oversampled | vs real | CPU s / training |",
             "|---|---|---|---|---|---|"]
    for arm, rs in results.items():
        cells = []
        for control in ("oversampled", "real"):
            if control in bal and arm != control:
                d = paired_difference(bal[arm], bal[control])
                ci = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
                cells.append(f"{d['mean']:+.3f}{ci} {d['verdict']}")
            else:
                cells.append("")
        lines.append(f"| {label(arm)} | {rs[0]['n_train']} | {np.mean(bal[arm]):.3f} ± {np.std(bal[arm]):.3f} | "
                     f"{cells[0]} | {cells[1]} | {np.mean([r['cpu_s'] for r in rs]):.0f} |")
    lines += ["", f"Differences are paired by seed; [low, high] is the {CONFIDENCE:.0%} Student-t interval over "
              f"{args.seeds} seeds; 'helped' / 'hurt' when it excludes 0.", "",
              "Per-class recall (mean over seeds):", "",
              "| arm | " + " | ".join(n + (" *" if n in minority else "") for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for arm, rs in results.items():
        lines.append(f"| {label(arm)} | " + " | ".join(f"{np.mean([r['recall'][n] for r in rs]):.2f}"
                                                       for n in names) + " |")
    return lines


def label(arm: str) -> str:
    if arm in ("real", "oversampled"):
        return "real" if arm == "real" else "real+oversampled"
    if arm.startswith("only:"):
        return arm[5:] + " only"
    if arm.startswith("pre:"):
        return f"{arm[4:]} pretraining, then real+oversampled"
    if arm.startswith("half:"):
        return f"real+oversampled+{arm[5:]} for every class"
    return f"real+{arm[4:]} for every class" if arm.startswith("all:") else "real+" + arm


if __name__ == "__main__":
    main()
