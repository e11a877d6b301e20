"""The ``augflow`` command line: a thin click layer over the library.

Each command parses its options, calls one library function and prints the result. Library errors
(:class:`~augflow.errors.AugflowError`) become ``click.ClickException`` ("Error: ...", exit code 1).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from augflow import __version__
from augflow.errors import AugflowError


def _library_errors(fn):
    """Turn library errors into clean CLI errors (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AugflowError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _print_summary(summary: dict) -> None:
    click.echo(f"{summary['path']}: {summary['num_images']} {summary['source']} images "
               f"of shape {tuple(summary['image_shape'])} from {summary['num_subjects']} subjects")
    width = max(len(name) for name in summary["class_counts"])
    for name, count in summary["class_counts"].items():
        click.echo(f"  {name:<{width}}  {count:6d}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="augflow")
def cli():
    """augflow: privacy-preserving data augmentation for medical imaging.

    \b
    Example:
        augflow demo-data --task scanner --out scanner.h5
        augflow split scanner.h5 --out-dir data/
        augflow info data/train.h5
    """


@cli.command("demo-data")
@click.option("--task", type=click.Choice(["scanner", "modality"]), default="scanner", show_default=True,
              help="Classes by scanner (7, imbalanced) or by modality (6, MRI and PET).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .h5 file.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplier of the class counts.")
@_library_errors
def demo_data(task, out, size, seed, scale):
    """Generate the built-in brain-MRI dataset from the MNI152 template shipped with nilearn.

    \b
    Example:
        augflow demo-data --task scanner --out scanner.h5 --size 64
    """
    from augflow.data.phantom import generate_demo_data
    from augflow.data.store import read_info

    path = generate_demo_data(task, out, size=size, seed=seed, scale=scale)
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
@_library_errors
def prepare(manifest, out, size, slices_per_volume, axis, skip_bad):
    """Turn NIfTI volumes listed in a manifest into a 2D slice dataset (HDF5).

    \b
    Example:
        augflow prepare --manifest scans.csv --out scans.h5 --size 64 --axis coronal
    """
    from augflow.data.nifti import prepare_dataset
    from augflow.data.store import read_info

    result = prepare_dataset(manifest, out, size=size, slices_per_volume=slices_per_volume, axis=axis,
                             skip_bad=skip_bad)
    for skipped in result.skipped:
        click.echo(f"skipped row {skipped['row']} ({skipped['path']}): {skipped['reason']}", err=True)
    _print_summary(read_info(result.out, check_values=False).summary())


@cli.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--val", type=float, default=0.1, show_default=True, help="Fraction of subjects for validation.")
@click.option("--test", type=float, default=0.2, show_default=True, help="Fraction of subjects for test.")
@click.option("--seed", type=int, default=0, show_default=True)
@_library_errors
def split(data, out_dir, val, test, seed):
    """Split a dataset into train/val/test files, stratified by class and grouped by subject.

    \b
    Example:
        augflow split scanner.h5 --out-dir data/ --val 0.1 --test 0.2
    """
    from augflow.data.splits import split_file
    from augflow.data.store import read_info

    for path in split_file(data, out_dir, val=val, test=test, seed=seed).values():
        _print_summary(read_info(path, check_values=False).summary())


@cli.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_library_errors
def info(data, as_json):
    """Show the schema, shape, class counts, source and provenance of a dataset file.

    \b
    Example:
        augflow info data/train.h5 --json
    """
    from augflow.data.store import read_info

    summary = read_info(data).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)
    click.echo(f"schema version {summary['schema_version']}, created {summary['created_at']} "
               f"by augflow {summary['augflow_version']}")
    click.echo("provenance: " + json.dumps(summary["provenance"], indent=2))


def _device_option(fn):
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(fn)


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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override a recipe key, e.g. --set train.lr=1e-3 (repeatable).")
@_device_option
@_threads_option
@_library_errors
def train(data, val, recipe, out, resume, seed, overrides, device):
    """Train a class-conditional generative model (MAGIC-Flow, or the recipe's model.family) on a dataset file.

    \b
    Example:
        augflow train --data data/train.h5 --recipe recipes/scanner.toml --out runs/scanner
        augflow train --data data/train.h5 --recipe recipes/scanner.toml --out runs/scanner --resume
    """
    import sys

    from augflow.config import load_recipe
    from augflow.train.loop import train as run_training

    result = run_training(data, out, load_recipe(recipe, overrides), val=val, resume=resume, device=device,
                          seed=seed, command=" ".join(["augflow", *sys.argv[1:]]))
    best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
    click.echo(f"trained {result.steps} steps; best validation {result.loss_name} {best}; model: {result.model_path}")


@cli.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Run folder (or its model.pt).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output .h5 file.")
@click.option("--class", "class_name", default=None, help="Class to sample (case-insensitive).")
@click.option("--n", type=int, default=None, help="Number of images of --class.")
@click.option("--balance", is_flag=True, help="Top up every class to the largest training class.")
@click.option("--target-count", type=int, default=None, help="With --balance: the per-class target instead.")
@click.option("--temperature", type=float, default=None, help="Latent temperature (default: the model's, 0.8).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@_device_option
@_threads_option
@_library_errors
def synthesize(model, out, class_name, n, balance, target_count, temperature, seed, batch_size, device):
    """Write synthetic images of a trained model to a dataset file.

    \b
    Example:
        augflow synthesize --model runs/scanner --class Prisma --n 500 --out prisma.h5
        augflow synthesize --model runs/scanner --balance --out topup.h5
    """
    from augflow.synthesize import balanced_counts
    from augflow.synthesize import synthesize as run_synthesis

    if balance == (class_name is not None):
        raise click.UsageError("give either --class NAME --n N, or --balance [--target-count N]")
    if class_name is not None:
        if n is None:
            raise click.UsageError("--class needs --n")
        counts = {class_name: n}
    else:
        if n is not None:
            raise click.UsageError("--n goes with --class; use --target-count with --balance")
        counts = balanced_counts(model, target_count)
    result = run_synthesis(model, out, counts, temperature=temperature, seed=seed, batch_size=batch_size,
                           device=device)
    made = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v)
    click.echo(f"wrote {sum(result.counts.values())} synthetic images to {result.out} ({made}); "
               f"rejected non-finite: {result.rejected_nonfinite}")


@cli.command()
@click.option("--model", type=click.Path(exists=True, path_type=Path), required=True,
              help="Run folder (or its model.pt).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of per-image predictions, posteriors, log p(x|y) and entropy.")
@click.option("--prior", type=click.Choice(["train", "uniform"]), default="train", show_default=True,
              help="Class prior: training-class frequencies or uniform.")
@click.option("--calibrate-on", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labelled file (the validation split) to fit the posterior temperature on.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@_device_option
@_threads_option
@_library_errors
def classify(model, data, out, prior, calibrate_on, batch_size, as_json, device):
    """Classify images with the flow's exact likelihood: argmax_y log p(x|y) + log p(y).

    \b
    Example:
        augflow classify --model runs/scanner --data data/test.h5 --calibrate-on data/val.h5 --json
    """
    from augflow.classify import classify_file, write_predictions

    result = classify_file(model, data, prior=prior, calibrate_on=calibrate_on, batch_size=batch_size,
                           device=device)
    metrics = result["metrics"]
    if out is not None:
        write_predictions(result, out)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    click.echo(f"{metrics['n']} images: accuracy {metrics['accuracy']:.3f}, balanced accuracy "
               f"{metrics['balanced_accuracy']:.3f}, macro AUC {metrics['auc_macro']:.3f}, macro F1 "
               f"{metrics['f1_macro']:.3f}")
    click.echo(f"temperature {metrics['temperature']:.3g}: ECE {metrics['ece_uncalibrated']:.3f} -> "
               f"{metrics['ece']:.3f}; selective-prediction area {metrics['selective_prediction']['area']:.3f}")


@cli.command()
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("augflow-demo"),
              show_default=True)
@click.option("--task", type=click.Choice(["scanner", "modality"]), default="scanner", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_library_errors
def demo(out_dir, task, seed):
    """Run the whole pipeline on the built-in brain-MRI data.

    \b
    Example:
        augflow demo --out-dir augflow-demo
    """
    from augflow.demo import run_demo

    run_demo(out_dir, task=task, seed=seed, echo=click.echo)


def main() -> None:
    cli(prog_name="augflow")
