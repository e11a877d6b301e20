"""The ``augflow`` command line: a thin click layer over the library.

Each command parses its options, calls one library function and prints the result. Every command runs inside one
error boundary (:func:`_error_boundary`): a failure is one line ``Error: <what>: <why>; <what to do>`` and exit
code 1 (click's usage errors: 2), never a traceback unless ``--debug`` or ``AUGFLOW_DEBUG=1`` asks for it. Every
command that writes refuses an existing output unless ``--overwrite`` is given, and never writes over one of its
inputs (:func:`augflow.atomic.check_output`). SIGTERM interrupts a command like Ctrl-C, so its temporary files are
removed (:func:`augflow.atomic.unwind_on_sigterm`).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from augflow.atomic import unwind_on_sigterm
from augflow.errors import AugflowError
from augflow.version import __version__

_FORMAT_WARNING = warnings.formatwarning

if TYPE_CHECKING:
    from augflow.train.privacy.ledger import Ledger

_DEBUG = "augflow_debug"  # key of ctx.meta, shared by the group's and the commands' contexts


def _set_debug(ctx, param, value):
    if value:
        ctx.meta[_DEBUG] = True


def _debug_option(fn):
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the traceback of an error (or set AUGFLOW_DEBUG=1).")(fn)


def _error_message(e: Exception) -> str:
    """One line for an exception that escaped a command: what, why and what to do."""
    if isinstance(e, AugflowError | FloatingPointError):  # the library's own messages say all three
        text = str(e)
    elif isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}; check the path, that its folder exists and that you may write there"
    elif isinstance(e, OSError):  # HDF5 errors name no file
        text = f"cannot read or write a file ({e}); check the input files and the output folder"
    elif isinstance(e, MemoryError):
        text = "out of memory; lower --batch-size or use a smaller dataset"
    else:
        text = (f"unexpected {type(e).__name__}: {e}; this is a bug in augflow: rerun with --debug and report the "
                f"traceback")
    return " ".join(text.split())


def _error_boundary(fn):
    """Turn every failure of a command into one clean line (exit code 1); ``--debug`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:
            if click.get_current_context().meta.get(_DEBUG) or os.environ.get("AUGFLOW_DEBUG", "0") not in ("", "0"):
                raise
            raise click.ClickException(_error_message(e)) from None

    return _debug_option(wrapper)


def _overwrite_option(fn):
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing output (never one of this command's inputs).")(fn)


def _print_summary(summary: dict) -> None:
    click.echo(f"{summary['path']}: {summary['num_images']} {summary['source']} images "
               f"of shape {tuple(summary['image_shape'])} from {summary['num_subjects']} subjects")
    width = max(len(name) for name in summary["class_counts"])
    for name, count in summary["class_counts"].items():
        click.echo(f"  {name:<{width}}  {count:6d}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="augflow")
@_debug_option
def cli():
    """augflow: privacy-preserving data augmentation for medical imaging.

    \b
    Example:
        augflow demo-data --task scanner --out scanner.h5
        augflow split scanner.h5 --out-dir data/
        augflow info data/train.h5
    """
    # A warning is a message to the user, not a source line: "warning: ..." (the library's own warnings only).
    warnings.formatwarning = lambda message, category, *args, **kwargs: (
        f"warning: {message}\n" if category is UserWarning else _FORMAT_WARNING(message, category, *args, **kwargs))


@cli.command("demo-data")
@click.option("--task", type=click.Choice(["scanner", "modality"]), default="scanner", show_default=True,
              help="Classes by scanner (7, imbalanced) or by modality (6, MRI and PET).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .h5 file.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplier of the class counts.")
@_overwrite_option
@_error_boundary
def demo_data(task, out, size, seed, scale, overwrite):
    """Generate the built-in brain-MRI dataset from the MNI152 template shipped with nilearn.

    \b
    Example:
        augflow demo-data --task scanner --out scanner.h5 --size 64
    """
    from augflow.data.phantom import generate_demo_data
    from augflow.data.store import read_info

    path = generate_demo_data(task, out, size=size, seed=seed, scale=scale, overwrite=overwrite)
    _print_summary(read_info(path, check_values=False).summary())


@cli.command()
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="CSV with columns path,label[,subject]; paths may be relative to the manifest.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .h5 file.")
@click.option("--size", type=int, default=64, show_default=True, help="Output image side in pixels.")
@click.option("--slices-per-volume", type=int, default=11, show_default=True,
              help="Central slice and its nearest neighbours.")
@click.option("--axis", type=click.Choice(["sagittal", "coronal", "axial"]), default="coronal",
              show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip unusable rows (reported) instead of stopping.")
@click.option("--nan-as-background", is_flag=True,
              help="Set NaN voxels to 0 (the outside of masked volumes) instead of rejecting the volume.")
@_overwrite_option
@_error_boundary
def prepare(manifest, out, size, slices_per_volume, axis, skip_bad, nan_as_background, overwrite):
    """Turn NIfTI volumes listed in a manifest into a 2D slice dataset (HDF5).

    \b
    Example:
        augflow prepare --manifest scans.csv --out scans.h5 --size 64 --axis coronal
    """
    from augflow.data.nifti import prepare_dataset
    from augflow.data.store import read_info

    result = prepare_dataset(manifest, out, size=size, slices_per_volume=slices_per_volume, axis=axis,
                             skip_bad=skip_bad, overwrite=overwrite, nan_as_background=nan_as_background)
    for skipped in result.skipped:
        click.echo(f"skipped row {skipped['row']} ({skipped['path']}): {skipped['reason']}", err=True)
    _print_summary(read_info(result.out, check_values=False).summary())


@cli.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--val", type=float, default=0.1, show_default=True, help="Fraction of subjects for validation.")
@click.option("--test", type=float, default=0.2, show_default=True, help="Fraction of subjects for test.")
@click.option("--seed", type=int, default=0, show_default=True)
@_overwrite_option
@_error_boundary
def split(data, out_dir, val, test, seed, overwrite):
    """Split a dataset into train/val/test files, stratified by class and grouped by subject.

    \b
    Example:
        augflow split scanner.h5 --out-dir data/ --val 0.1 --test 0.2
    """
    from augflow.data.splits import split_file
    from augflow.data.store import read_info

    for path in split_file(data, out_dir, val=val, test=test, seed=seed, overwrite=overwrite).values():
        _print_summary(read_info(path, check_values=False).summary())


def _print_ledger(stored: dict | None) -> None:
    from augflow.train.privacy.ledger import Ledger

    ledger = Ledger.from_dict(stored or None)
    if ledger is None:
        click.echo("privacy: no ledger (not made by an augflow model)")
    elif not ledger.dp:
        click.echo("privacy: trained without differential privacy (no guarantee)")
    else:
        click.echo(f"privacy: ({ledger.epsilon:.3g}, {ledger.delta:.0e})-DP per {ledger.unit} "
                   f"({ledger.accountant}, noise multiplier {ledger.noise_multiplier:.3g}, sample rate "
                   f"{ledger.sample_rate:.3g}, {ledger.steps} steps, clipping norm {ledger.max_grad_norm:g}; "
                   f"class counts: {ledger.class_counts_release['release']})")
    if ledger is not None:
        _print_init(ledger)


def _print_init(ledger: Ledger) -> None:
    """The model a ledger's run started from (``--init-from``), if any: two lines."""
    if ledger.init_from:
        init = ledger.init_from
        trained = init.get("trainable") or {}
        selection = trained.get("selection", "all")
        if "trained_elements" in trained:
            total = trained["trained_elements"] + trained["frozen_elements"]
            selection = f"{selection} ({trained['trained_elements']:,} of {total:,} parameters)"
        click.echo(f"initialisation: {ledger.pretraining()}")
        names = init["reinitialized"]
        reinit = f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "none"
        click.echo(f"  from {init['model']}; re-initialised (class-shaped): {reinit}; trained: {selection}")


@cli.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_error_boundary
def info(data, as_json):
    """Show a dataset file (schema, shape, class counts, source, provenance), or a trained model (a run folder or
    model.pt: classes, training step and privacy ledger).

    \b
    Example:
        augflow info data/train.h5 --json
        augflow info runs/scanner-dp          # the privacy ledger of a model
    """
    from augflow.data.store import read_info
    from augflow.models import model_summary

    if data.is_dir() or data.suffix == ".pt":
        summary = model_summary(data)
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        click.echo(f"{summary['path']}: {summary['family']} model of {summary['image_shape']} images, "
                   f"{len(summary['class_names'])} classes, trained {summary['step']} steps")
        if summary["config"].get("label_dropout"):
            click.echo(f"classifier-free guidance: trained with label dropout {summary['config']['label_dropout']:g} "
                       f"(augflow synthesize --guidance W)")
        _print_ledger(summary["privacy"])
        return
    summary = read_info(data).summary()
    if isinstance(summary["provenance"], dict) and "privacy" in summary["provenance"]:
        summary["privacy"] = summary["provenance"]["privacy"]  # the ledger of the model that made the data
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)
    click.echo(f"schema version {summary['schema_version']}, created {summary['created_at']} "
               f"by augflow {summary['augflow_version']}")
    if "privacy" in summary:
        _print_ledger(summary["privacy"])
    click.echo("provenance: " + json.dumps(summary["provenance"], indent=2))


def _parse_temperature(ctx, param, value: str | None) -> float | tuple[float, ...] | None:
    """``0.8`` -> 0.8; ``1.2,0.3,0.3,0`` -> one temperature per latent part, finest first."""
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or a comma-separated list of numbers (one per latent "
                                 "part, finest first, e.g. 1.2,0.3,0.3,0)") from None
    return values[0] if len(values) == 1 else values


def _parse_epochs(ctx, param, value: str) -> tuple[int, ...]:
    """``30`` -> (30,); ``10,30`` -> (10, 30): candidate budgets."""
    try:
        values = tuple(int(v) for v in value.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(f"{value!r} is out of range: a whole number of epochs >= 1, or a comma-separated "
                                 "list of them (e.g. 10,30)")
    return values


def _device_option(fn):
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(fn)


def _amp_option(fn):
    return click.option("--amp/--no-amp", default=None,
                        help="Run the networks in bfloat16 on CPUs with AMX/AVX512-BF16 or GPUs (falls back to float32 "
                             "with a warning elsewhere); default: as the model was trained (train.amp).")(fn)


def _threads_option(fn):
    def set_threads(ctx, param, value):
        if value is not None:
            if value < 1:
                raise click.BadParameter(f"must be positive, but is: {value}")
            import torch

            torch.set_num_threads(value)
        return value

    return click.option("--threads", type=int, default=None, callback=set_threads, expose_value=False,
                        help="CPU threads for torch (default: torch's choice).")(fn)


@cli.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Training file (augflow HDF5).")
@click.option("--val", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Validation file (default: a subject-wise split of --data).")
@click.option("--recipe", default=None,
              help="TOML recipe file, or a shipped recipe's name (quick, scanner, ...); default: built-in defaults.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True,
              help="Start a new run in --out even if it holds a run (its model, checkpoint and logs are replaced) "
                   "or other files.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override a recipe key, e.g. --set train.lr=1e-3 (repeatable).")
@click.option("--dp", "dp_enabled", is_flag=True,
              help="Differentially private training (DP-SGD with Poisson sampling; sets privacy.enabled).")
@click.option("--epsilon", type=float, default=None,
              help="DP: total privacy budget epsilon, label counts included (privacy.epsilon).")
@click.option("--delta", type=float, default=None,
              help="DP: delta, below 1/N (default: the largest power of 10 at most 1/(10 N)).")
@click.option("--max-grad-norm", type=float, default=None, help="DP: per-sample clipping norm C (default 1.0).")
@click.option("--accountant", type=click.Choice(["rdp", "prv"]), default=None,
              help="DP: privacy accountant, Renyi DP or privacy random variables (default rdp).")
@click.option("--dp-unit", type=click.Choice(["slice", "subject"]), default=None,
              help="DP: what is protected, one slice (default) or one subject (one slice per subject per step).")
@click.option("--init-from", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from this model's weights (run folder or model.pt; same family, architecture and image "
                   "shape; class-shaped entries are re-initialised when the classes differ) (train.init_from).")
@click.option("--init-from-public", is_flag=True,
              help="Declare that the --init-from model was trained on public data only: required under --dp "
                   "(train.init_from_public).")
@_device_option
@_threads_option
@_error_boundary
def train(data, val, recipe, out, resume, overwrite, seed, overrides, dp_enabled, epsilon, delta, max_grad_norm,
          accountant, dp_unit, init_from, init_from_public, device):
    """Train a class-conditional generative model (MAGIC-Flow, or the recipe's model.family) on a dataset file.

    \b
    Example:
        augflow train --data data/train.h5 --recipe recipes/scanner.toml --out runs/scanner
        augflow train --data data/train.h5 --recipe recipes/scanner.toml --out runs/scanner --resume
        augflow train --data data/train.h5 --recipe scanner --out runs/dp --dp --epsilon 8 --dp-unit subject
        augflow train --data data/train.h5 --recipe scanner-dp --out runs/ft --init-from runs/public \\
            --init-from-public --set privacy.trainable=conditioning
    """
    from augflow.runs import command_line
    from augflow.train.loop import train as run_training
    from augflow.train.recipe import load_recipe

    dp_options = {"epsilon": epsilon, "delta": delta, "max_grad_norm": max_grad_norm, "accountant": accountant,
                  "unit": dp_unit}
    dp_overrides = [f"privacy.{key}={value!r}" for key, value in dp_options.items() if value is not None]
    init_overrides = [*([f"train.init_from={json.dumps(str(init_from))}"] if init_from is not None else []),
                      *(["train.init_from_public=true"] if init_from_public else [])]
    loaded = load_recipe(recipe, [*overrides, *dp_overrides, *init_overrides,
                                  *(["privacy.enabled=true"] if dp_enabled else [])])
    if dp_overrides and not loaded.privacy.enabled:
        raise click.UsageError("--epsilon, --delta, --max-grad-norm, --accountant and --dp-unit need --dp "
                               "(or a recipe with [privacy] enabled = true)")
    result = run_training(data, out, loaded, val=val, resume=resume, device=device, seed=seed,
                          command=command_line(), overwrite=overwrite)
    if result.ledger.dp:
        last = "n/a" if result.last_val_loss is None else f"{result.last_val_loss:.4f}"
        click.echo(f"trained {result.steps} steps; last validation {result.loss_name} {last}; model (last weights): "
                   f"{result.model_path}")
        _print_ledger(result.ledger.to_dict())
        return
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    step = "" if result.released_step is None else f" (step {result.released_step})"  # unknown in older runs
    click.echo(f"trained {result.steps} steps; best validation {result.loss_name} {best}; model{step}: "
               f"{result.model_path}")
    _print_init(result.ledger)


@cli.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Run folder (or its model.pt).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .h5 file.")
@click.option("--class", "class_name", default=None, help="Class to sample (case-insensitive).")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Number of images of --class.")
@click.option("--balance", is_flag=True,
              help="Top up every class of the real file to the largest class (the model's whole training file, or "
                   "--real).")
@click.option("--target-count", type=int, default=None, help="With --balance: the per-class target instead.")
@click.option("--max-ratio", type=float, default=None,
              help="With --balance: at most this many synthetic images per real image of each class.")
@click.option("--real", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The real training file the synthetic images will be added to: --balance counts its classes, "
                   "--select classifier and realism train on it (unless --select-public is given).")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="N images of every class (a set to audit, or to train on synthetic data only).")
@click.option("--select", "select", type=click.Choice(["none", "posterior", "classifier", "realism"]),
              default="none", show_default=True,
              help="Keep a sample only if the model's own Bayes posterior (MAGIC-Flow), or a ResNet-18 trained on "
                   "--real, gives its class at least --min-confidence; realism: only the --keep-fraction of samples "
                   "that a per-class real-vs-synthetic logistic regression in that ResNet's features finds most real.")
@click.option("--select-public", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --select classifier or realism: train the selection's classifier on this labelled file "
                   "instead of --real, declaring that it holds public images only (none of the model's private "
                   "data). A DP model selects only this way: selecting with public data costs no privacy.")
@click.option("--min-confidence", type=float, default=0.5, show_default=True,
              help="With --select posterior or classifier: the class probability a sample needs, in (0, 1).")
@click.option("--keep-fraction", type=float, default=0.25, show_default=True,
              help="With --select realism: the fraction of the draws kept, in (0, 1] (threshold: a quantile of the "
                   "discriminator's scores of a pilot batch).")
@click.option("--temperature", default=None, callback=_parse_temperature,
              help="Latent temperature (default: the model's, 0.8); for MAGIC-Flow also one per latent part, finest "
                   "first (e.g. 1.2,0.3,0.3,0: the fine texture at 1.2, the coarse anatomy near its mode).")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance weight w in [0, 10]: each coupling's scale and shift become "
                   "null + w * (class - null), more of what sets the class apart (1 = none; needs a MAGIC-Flow model "
                   "trained with --set model.label_dropout=0.1).")
@click.option("--denoise", is_flag=True,
              help="Remove the training input noise (augment.noise_std) from each sample with one score step.")
@click.option("--near", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Derive each sample from a real image of its class in this file (not for a DP or public release: "
                   "the images vary around real subjects).")
@click.option("--strength", type=float, default=None,
              help="With --near: how far a sample moves from its real image, in (0, 1] (1 = an ordinary sample; "
                   "default 0.3, the best of 0.15 / 0.3 / 0.6 on the built-in data's val split).")
@click.option("--anchor-classes", type=click.Choice(["same", "other", "all"]), default=None,
              help="With --near: anchor a class's samples to real images of the same class (default), of every other "
                   "class (translated: the anatomy of other subjects rendered as this class), or of all classes.")
@click.option("--zero-background", is_flag=True,
              help="Give the samples the exact-zero background of the --real images (values below the darkest "
                   "tissue set to 0), so that a faint sampled background does not tell them apart from real ones.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@_overwrite_option
@_amp_option
@_device_option
@_threads_option
@_error_boundary
def synthesize(model, out, class_name, n, balance, target_count, max_ratio, real, per_class, select, select_public,
               min_confidence, keep_fraction, temperature, guidance, denoise, near, strength, anchor_classes,
               zero_background, seed, batch_size, overwrite, amp, device):
    """Write synthetic images of a trained model to a dataset file.

    \b
    Example:
        augflow synthesize --model runs/scanner --class Prisma --n 500 --out prisma.h5
        augflow synthesize --model runs/scanner --balance --out topup.h5
        augflow synthesize --model runs/scanner --balance --real data/train.h5 --select classifier \\
            --min-confidence 0.5 --max-ratio 2 --out topup.h5
        augflow synthesize --model runs/scanner --balance --real data/train.h5 --near data/train.h5 \\
            --strength 0.3 --out in-house-topup.h5
        augflow synthesize --model runs/scanner --per-class 200 --out audit-set.h5
        augflow synthesize --model runs/scanner-dp --per-class 346 --select classifier \\
            --select-public public.h5 --min-confidence 0.4 --out dp-release.h5
    """
    from augflow.synthesize import Anchors, Selection, topup_counts, training_counts
    from augflow.synthesize import synthesize as run_synthesis

    if [class_name is not None, balance, per_class is not None].count(True) != 1:
        raise click.UsageError("give one of --class NAME --n N, --balance [--target-count N], or --per-class N")
    if n is not None and class_name is None:
        raise click.UsageError("--n goes with --class; use --target-count with --balance")
    if (target_count is not None or max_ratio is not None) and not balance:
        raise click.UsageError("--target-count and --max-ratio go with --balance")
    if (strength is not None or anchor_classes is not None) and near is None:
        raise click.UsageError("--strength and --anchor-classes go with --near FILE")
    if zero_background and real is None:
        raise click.UsageError("--zero-background needs --real FILE (the real images whose background to match)")
    source = None
    if class_name is not None:
        if n is None:
            raise click.UsageError("--class needs --n")
        counts = {class_name: n}
    elif per_class is not None:
        counts = dict.fromkeys(training_counts(model), per_class)
    else:
        counts, source = topup_counts(model, real, target_count, max_ratio)
    selection = Selection(select, min_confidence, select_public or real, keep_fraction=keep_fraction,
                          public=select_public is not None)
    result = run_synthesis(model, out, counts, temperature=temperature, seed=seed, batch_size=batch_size,
                           device=device, amp=amp, selection=selection, counts_source=source, denoise=denoise,
                           near=near and Anchors(near, Anchors.strength if strength is None else strength,
                                                 anchor_classes or Anchors.classes),
                           background_from=real if zero_background else None, overwrite=overwrite,
                           guidance=guidance)
    made = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v)
    click.echo(f"wrote {sum(result.counts.values())} synthetic images to {result.out} ({made}); "
               f"rejected non-finite: {result.rejected_nonfinite}")
    if source is not None:
        click.echo(f"balanced against {source['counted_from']}")


@cli.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Run folder (or its model.pt).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of per-image predictions, posteriors, log p(x|y) and entropy.")
@click.option("--prior", type=click.Choice(["train", "uniform"]), default="train", show_default=True,
              help="Class prior: training-class frequencies or uniform.")
@click.option("--calibrate-on", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labelled file (the validation split) to fit the posterior temperature and per-class offsets "
                   "on; stored beside the model (calibration.json) and used when this option is not given.")
@click.option("--no-class-offsets", "no_class_offsets", is_flag=True,
              help="With --calibrate-on: fit the temperature only, no per-class decision offsets (the decisions "
                   "are the posterior's argmax; offsets favour balanced accuracy and the minority classes).")
@click.option("--offsets-on", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="With --calibrate-on: fit the per-class offsets on these labelled files instead (repeatable; e.g. "
                   "the training and validation files: more images of the rare classes); the temperature stays "
                   "fitted on --calibrate-on.")
@click.option("--shift-radius", type=int, default=None,
              help="Average log p(x|y) over the whole-pixel shifts within this many pixels ((2R+1)^2 flow passes; "
                   "reports/classification-32-shift.md measured 1 and 2). Default: the radius the stored calibration "
                   "was fitted with, else 0.")
@click.option("--passes", type=click.IntRange(min=1), default=None,
              help="MedSymmFlow: read-outs per image (different mask noise), their colour distances averaged "
                   "(reports/classification-notes.md measured 5: 0.69 -> 0.74 balanced accuracy at 64 px). Default: "
                   "the passes the stored calibration was fitted with, else 1 (the paper's).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="MedSymmFlow: integration steps of each read-out (on the model's training-time grid; "
                   "reports/classification-notes.md measured 10 against 25 at time shift 8: a tie at 40 %% of the "
                   "cost). Default: the steps the stored calibration was fitted with, else the model's model.steps.")
@click.option("--rank-by", type=click.Choice(["distance", "spread"]), default="distance", show_default=True,
              help="MedSymmFlow: the uncertainty that ranks selective prediction: the mask's distance to its "
                   "colour (the paper's) or its spread over the passes (needs --passes 2 or more).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@_overwrite_option
@_amp_option
@_device_option
@_threads_option
@_error_boundary
def classify(model, data, out, prior, calibrate_on, no_class_offsets, offsets_on, shift_radius, passes, steps,
             rank_by, batch_size, as_json, overwrite, amp, device):
    """Classify images with the flow's exact likelihood: argmax_y log p(x|y) + log p(y); MedSymmFlow by its read-out.

    \b
    Example:
        augflow classify --model runs/scanner --data data/test.h5 --calibrate-on data/val.h5 --json
        augflow classify --model runs/scanner --data data/test.h5 --calibrate-on data/val.h5 \\
            --offsets-on data/train.h5 --offsets-on data/val.h5 --shift-radius 1
        augflow classify --model runs/symmflow --data data/test.h5 --calibrate-on data/val.h5 --passes 5
    """
    from augflow.atomic import check_output
    from augflow.audit.report import public
    from augflow.classify import classify_file, write_predictions
    from augflow.runs import model_file

    if out is not None:  # before the work, not after it
        check_output(out, overwrite, [model_file(model), data, calibrate_on])
    if no_class_offsets and calibrate_on is None:
        raise click.UsageError("--no-class-offsets applies to a calibration being fitted: give --calibrate-on FILE too")
    if offsets_on and (calibrate_on is None or no_class_offsets):
        raise click.UsageError("--offsets-on fits the per-class offsets of a calibration being fitted: give "
                               "--calibrate-on FILE too, and leave out --no-class-offsets")
    result = classify_file(model, data, prior=prior, calibrate_on=calibrate_on, batch_size=batch_size,
                           device=device, amp=amp, class_offsets=not no_class_offsets, shift_radius=shift_radius,
                           offsets_on=offsets_on, passes=passes, rank_by=rank_by, steps=steps)
    metrics = result["metrics"]
    if out is not None:
        write_predictions(result, out)
    if as_json:  # strict JSON: an undefined value (the recall of a class without images) is null, not NaN
        click.echo(json.dumps(public(metrics), indent=2, allow_nan=False))
        return
    click.echo(f"{metrics['n']} images: accuracy {metrics['accuracy']:.3f}, balanced accuracy "
               f"{metrics['balanced_accuracy']:.3f}, macro AUC {metrics['auc_macro']:.3f}, macro F1 "
               f"{metrics['f1_macro']:.3f}")
    if metrics["classes_without_images"]:
        click.echo(f"no image of {', '.join(metrics['classes_without_images'])} in {data}: its recall is not measured "
                   f"and the macro averages are over the other classes")
    offsets = "" if metrics["class_biases"] is None else " and per-class offsets"
    click.echo(f"calibration: temperature {metrics['temperature']:.3g}{offsets} ({metrics['calibration_source']}): "
               f"balanced accuracy {metrics['balanced_accuracy_uncalibrated']:.3f} -> "
               f"{metrics['balanced_accuracy']:.3f}, ECE {metrics['ece_uncalibrated']:.3f} -> "
               f"{metrics['ece']:.3f} (a perfectly calibrated model: {metrics['ece_floor']:.3f} on these "
               f"{metrics['n']} images); selective-prediction area {metrics['selective_prediction']['area']:.3f}")


@cli.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Run folder (or its model.pt) of a MAGIC-Flow.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Dataset file (real or synthetic).")
@click.option("--index", "rows", type=int, multiple=True, required=True, help="Row to explain (repeatable).")
@click.option("--class", "class_name", default=None, help="Class whose map is shown (default: the predicted one).")
@click.option("--contrast", default=None, metavar="CLASS",
              help="Show H(x, class) - H(x, CLASS): where the image is more typical of the class than of CLASS.")
@click.option("--prior", type=click.Choice(["train", "uniform"]), default="train", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Figure (.png, .pdf).")
@_overwrite_option
@_device_option
@_threads_option
@_error_boundary
def explain(model, data, rows, class_name, contrast, prior, out, overwrite, device):
    """Draw likelihood attribution maps: which pixels make an image typical of a class.

    \b
    Example:
        augflow explain --model runs/scanner --data data/test.h5 --index 0 --index 5 --out maps.png
        augflow explain --model runs/scanner --data data/test.h5 --index 3 --contrast "Prisma Fit" --out c.png
    """
    from augflow.atomic import check_output
    from augflow.explain import explain_file, plot_explanation
    from augflow.runs import model_file

    check_output(out, overwrite, [model_file(model), data])
    explanation = explain_file(model, data, list(rows), class_name=class_name, contrast=contrast, prior=prior,
                               device=device)
    plot_explanation(explanation, out)
    names = explanation.class_names
    for row, label, pred, p in zip(rows, explanation.labels, explanation.predicted, explanation.probs, strict=True):
        click.echo(f"row {row}: label {names[label]}, predicted {names[pred]} (p = {p[pred]:.2f})")
    click.echo(f"wrote {out}")


@cli.command()
@click.option("--real", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Held-out real images (the test split): the reference, never trained on.")
@click.option("--train", "train_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The real training file the generator was trained on.")
@click.option("--synthetic", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The synthetic file to audit.")
@click.option("--model", type=click.Path(exists=True, path_type=Path), default=None,
              help="Run folder (or model file) of the generator: adds membership inference and its privacy ledger.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Report folder.")
@click.option("--features", type=click.Choice(["domain", "inception"]), default="domain", show_default=True,
              help="Feature space: an encoder trained on --train (cached), or Inception-v3 from local weights.")
@click.option("--inception-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="torch-fidelity Inception-v3 weights file (nothing is downloaded).")
@click.option("--gate", is_flag=True, help="Exit with an error if the release gate fails.")
@click.option("--max-copy-fraction", type=float, default=0.05, show_default=True,
              help="Gate: largest fraction of synthetic images closer to a training image than 1% of held-out ones.")
@click.option("--max-mia-auc", type=float, default=0.6, show_default=True,
              help="Gate: largest membership-inference ROC AUC (needs --model).")
@click.option("--max-exact-copies", type=int, default=0, show_default=True,
              help="Gate: largest number of exact copies.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Downstream CNN trainings per protocol.")
@click.option("--epochs", callback=_parse_epochs, default="30", show_default=True, metavar="E[,E...]",
              help="Epochs per downstream CNN training; several (e.g. 10,30) are candidate budgets, each protocol "
                   "reported at the one with its best balanced accuracy on --val.")
@click.option("--val", "val_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Real validation images (subjects in neither --train nor --real, e.g. the val.h5 of augflow "
                   "split) that choose each downstream protocol's budget among --epochs and calibrate the model's "
                   "likelihood classifier when no `augflow classify --calibrate-on` calibration is stored.")
@click.option("--budget", type=click.Choice(["steps", "epochs"]), default="steps", show_default=True,
              help="steps: every downstream set trains for the steps of --epochs passes over the real training "
                   "images (the sets differ in their images, not in their compute); epochs: --epochs passes over "
                   "each set.")
@click.option("--duplicates", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="The share of each minority class's gap that the real+duplicates+synthetic set fills with "
                   "duplicates of its real images (the rest with synthetic ones).")
@click.option("--no-downstream", is_flag=True, help="Skip the downstream classification protocol (the slowest stage).")
@click.option("--encoder-epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Epochs of the domain encoder.")
@click.option("--bootstraps", type=click.IntRange(min=0), default=100, show_default=True,
              help="FID bootstrap resamples.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Encoder cache (default: $AUGFLOW_CACHE_DIR/encoders or ~/.cache/augflow/encoders).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--overwrite", is_flag=True,
              help="Write into a non-empty --out (its report files are replaced; never an input).")
@_amp_option
@_device_option
@_threads_option
@_error_boundary
def audit(real, train_file, synthetic, model, out, features, inception_weights, gate, max_copy_fraction, max_mia_auc,
          max_exact_copies, seeds, epochs, val_file, budget, duplicates, no_downstream, encoder_epochs, bootstraps,
          cache_dir, seed, as_json, overwrite, amp, device):
    """Audit a synthetic dataset: fidelity, diversity, memorization, privacy, downstream utility, release gate.

    Writes metrics.json, report.md and a self-contained report.html (with a data card) into --out.

    \b
    Example:
        augflow audit --real data/test.h5 --train data/train.h5 --synthetic topup.h5 \\
            --model runs/scanner --out reports/audit-scanner --gate
        # each downstream protocol at its best budget on the validation images:
        augflow audit ... --val data/val.h5 --epochs 10,30
    """
    from augflow.audit import EncoderRecipe, GateThresholds, run_audit
    from augflow.runs import command_line

    thresholds = GateThresholds(max_copy_fraction=max_copy_fraction, max_mia_auc=max_mia_auc,
                                max_exact_copies=max_exact_copies)
    result = run_audit(real, train_file, synthetic, out, model=model, features=features,
                       inception_weights=inception_weights, gate=thresholds, seeds=seeds, downstream_epochs=epochs,
                       downstream_budget=budget, val=val_file, downstream_duplicates=duplicates,
                       run_downstream=not no_downstream,
                       encoder_recipe=EncoderRecipe(epochs=encoder_epochs), cache_dir=cache_dir, bootstraps=bootstraps,
                       seed=seed, device=device, command=command_line(), amp=amp, overwrite=overwrite)
    verdict = result["gate"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"release gate: {'passed' if verdict['passed'] else 'FAILED'}")
        for reason in verdict["reasons"]:
            click.echo(f"  {reason}")
        click.echo(f"report: {result['paths']['html']}")
    if gate and not verdict["passed"]:
        raise click.ClickException("release gate failed: " + "; ".join(
            verdict["checks"][name]["reason"] for name in verdict["failed"]))


@cli.command()
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("augflow-demo"),
              show_default=True)
@click.option("--task", type=click.Choice(["scanner", "modality"]), default="scanner", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Downstream CNN trainings per protocol in the audit.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Epochs per downstream CNN training (up to 6 protocols x --seeds trainings).")
@click.option("--overwrite", is_flag=True, help="Run in a non-empty --out-dir, replacing a previous demo's files.")
@_error_boundary
def demo(out_dir, task, seed, seeds, epochs, overwrite):
    """Run the whole pipeline on the built-in brain-MRI data (12-15 minutes on 2 CPU cores).

    \b
    Example:
        augflow demo --out-dir augflow-demo
    """
    from augflow.demo import run_demo

    run_demo(out_dir, task=task, seed=seed, echo=click.echo, audit_seeds=seeds, audit_epochs=epochs,
             overwrite=overwrite)


@cli.command("train-autoencoder")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Training file (augflow HDF5, real images).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (gets autoencoder.pt).")
@click.option("--val", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Validation file: its reconstruction MSE is reported.")
@click.option("--latent-channels", type=int, default=4, show_default=True)
@click.option("--downsample", type=int, default=4, show_default=True, help="Spatial reduction (power of two).")
@click.option("--channels", type=int, default=32, show_default=True, help="Width of the first stage.")
@click.option("--kl-weight", type=float, default=0.0, show_default=True, help="KL term weight (0: no KL).")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out (its files are replaced).")
@_device_option
@_threads_option
@_error_boundary
def train_autoencoder(data, out, val, latent_channels, downsample, channels, kl_weight, epochs, batch_size, lr,
                      seed, overwrite, device):
    """Train the autoencoder of latent MedSymmFlow (model.family = "symmflow") on real training images.

    Set model.autoencoder = "OUT/autoencoder.pt" in the recipe; required from 128 px up.

    \b
    Example:
        augflow train-autoencoder --data data/train.h5 --val data/val.h5 --out ae/ --epochs 20
    """
    from augflow.runs import command_line
    from augflow.train.autoencoder import train_autoencoder as run

    result = run(data, out, val=val, latent_channels=latent_channels, downsample=downsample, channels=channels,
                 kl_weight=kl_weight, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                 command=command_line(), overwrite=overwrite)
    val_text = "n/a" if result.val_mse is None else f"{result.val_mse:.5f}"
    click.echo(f"reconstruction MSE: train {result.train_mse:.5f}, validation {val_text} (mean image "
               f"{result.mean_image_mse:.5f}); autoencoder: {result.path}")


def main() -> None:
    unwind_on_sigterm()
    cli(prog_name="augflow")
