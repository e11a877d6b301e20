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
