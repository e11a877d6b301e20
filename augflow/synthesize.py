"""``augflow synthesize``: class-conditional samples of a trained flow, streamed into the shared HDF5 schema.

Use it to top up under-represented classes (``--balance``) or to draw N images of one class. Samples are drawn
at a reduced temperature (Kingma & Dhariwal 2018, Glow, arXiv 1807.03039), clipped to [0, 1]; non-finite samples
are rejected, redrawn and counted in the provenance. Batches are written as they are made, so memory stays
flat in N, and the file appears under its name only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from augflow import __version__
from augflow.data.store import DatasetWriter, sha256_file
from augflow.errors import ConfigError
from augflow.models import load_model
from augflow.precision import autocast, resolve_amp
from augflow.train.checkpoint import MODEL
from augflow.train.loop import derive_seed, resolve_device

_MAX_REDRAWS = 20


@dataclass
class SynthesisResult:
    out: Path
    counts: dict[str, int]
    rejected_nonfinite: int


def model_file(model: str | Path) -> Path:
    """A run folder (its ``model.pt``) or a model file."""
    path = Path(model)
    if path.is_dir():
        path = path / MODEL
    if not path.is_file():
        raise ConfigError(f"--model: no trained model at {path} (expected a run folder or a model .pt file)")
    return path


def stored_amp(meta: dict) -> bool:
    """Whether the model's recipe trained with amp: its default for sampling and density evaluation too."""
    return bool((meta.get("recipe") or {}).get("train", {}).get("amp", False))


def resolve_class(name: str, class_names: list[str]) -> int:
    """Index of a class by case-insensitive name; an unknown name lists the valid ones."""
    matches = [i for i, c in enumerate(class_names) if c.casefold() == name.strip().casefold()]
    if not matches:
        raise ConfigError(f"--class: unknown class {name!r}; valid classes: {', '.join(class_names)}")
    return matches[0]


def balance_counts(class_counts: list[int], target: int | None = None) -> list[int]:
    """Synthetic images per class so that real + synthetic reaches ``target`` (default: the largest class)."""
    target = max(class_counts) if target is None else target
    if target < 1:
        raise ConfigError(f"--target-count must be positive, but is: {target}")
    return [max(0, target - c) for c in class_counts]


def model_class_names(model: str | Path) -> list[str]:
    """The class names of a run folder or model file, in label order."""
    return load_model(model_file(model), with_meta=True)[1]["class_names"]


def balanced_counts(model: str | Path, target: int | None = None) -> dict[str, int]:
    """Per-class counts that top a model's training classes up to ``target`` (default: the largest class)."""
    _, meta = load_model(model_file(model), with_meta=True)
    return dict(zip(meta["class_names"], balance_counts(meta["class_counts"], target), strict=True))


@torch.inference_mode()
def synthesize(
    model: str | Path,
    out: str | Path,
    counts: dict[str, int],
    temperature: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    amp: bool | None = None,
) -> SynthesisResult:
    """Sample ``counts[class] `` images per class from a trained model into a synthetic dataset file.

    Arguments:
        model: A run folder or model file.
        out: Output .h5 file.
        counts: Images per class name (case-insensitive); classes not named get none.
        temperature: Scale of the latent standard deviation (default: the one stored with the model).
        seed: Seed of the latent draws (same seed, same file contents).
        batch_size: Images per sampling batch.
        device: "auto", "cpu" or "cuda[:N]".
        progress: Show a progress bar.
        amp: Run the networks in bf16 (:mod:`augflow.precision`); default: as the model was trained.
    """
    path = model_file(model)
    flow, meta = load_model(path, map_location="cpu", with_meta=True)
    class_names = meta["class_names"]
    per_class = [0] * len(class_names)
    for name, n in counts.items():
        if n < 0:
            raise ConfigError(f"--n must be non-negative, but is: {n}")
        per_class[resolve_class(name, class_names)] += int(n)
    if sum(per_class) == 0:
        raise ConfigError("nothing to synthesize: every class already has the requested count")
    temperature = meta.get("temperature", 0.8) if temperature is None else temperature
    if not 0 < temperature <= 2:
        raise ConfigError(f"--temperature must be in range (0, 2], but is: {temperature}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, but is: {batch_size}")
    dev = resolve_device(device)
    amp = resolve_amp(stored_amp(meta) if amp is None else amp, dev)
    flow = flow.to(dev).eval()

    rejected = 0
    provenance = {
        "generator": "augflow synthesize", "model": str(path.resolve()), "model_sha256": sha256_file(path),
        "recipe": meta.get("recipe"), "training_fingerprint": meta.get("fingerprint"),
        "temperature": temperature, "seed": seed, "amp": amp, "counts": dict(zip(class_names, per_class, strict=True)),
        "augflow_version": __version__, "privacy": meta.get("privacy"),
    }
    bar = tqdm(total=sum(per_class), desc="synthesize", unit="img", disable=not progress, dynamic_ncols=True)
    with DatasetWriter(out, flow.config.image_shape, class_names, "synthetic", provenance) as writer:
        for k, n in enumerate(per_class):
            generator = torch.Generator(dev).manual_seed(derive_seed(seed, k))
            made = 0
            while made < n:
                b = min(batch_size, n - made)
                with autocast(dev, amp):
                    x = _finite_batch(flow, k, b, temperature, generator, dev)
                rejected += x.rejected
                ids = [f"synthetic-{class_names[k]}-{made + i:06d}" for i in range(b)]
                writer.append(x.images.clamp(0, 1).float().cpu().numpy(), [k] * b, ids, [0] * b)
                made += b
                bar.update(b)
        writer.provenance["rejected_nonfinite"] = rejected
    bar.close()
    return SynthesisResult(Path(out), dict(zip(class_names, per_class, strict=True)), rejected)


@dataclass
class _Batch:
    images: torch.Tensor
    rejected: int


def _finite_batch(flow, k: int, b: int, temperature: float, generator, device) -> _Batch:
    """Draw b samples of class k, redrawing non-finite ones."""
    y = torch.full((b,), k, dtype=torch.long, device=device)
    images = flow.sample(y, temperature=temperature, generator=generator)
    rejected = 0
    for _ in range(_MAX_REDRAWS):
        bad = ~torch.isfinite(images).flatten(1).all(1)
        if not bad.any():
            return _Batch(images, rejected)
        rejected += int(bad.sum())
        images[bad] = flow.sample(y[bad], temperature=temperature, generator=generator)
    raise FloatingPointError(f"class {k}: samples stayed non-finite after {_MAX_REDRAWS} redraws; "
                             "the model is unusable (retrain it or lower --temperature)")
