"""``augflow synthesize``: class-conditional samples of a trained model, streamed into the shared HDF5 schema.

Use it to top up under-represented classes (``--balance``) or to draw N images of one class. Samples are drawn
at the temperature stored with the model (MAGIC-Flow: a reduced one, Kingma & Dhariwal 2018, Glow,
arXiv 1807.03039), clipped to [0, 1]; non-finite samples
are rejected, redrawn and counted in the provenance. Batches are written as they are made, so memory stays
flat in N, and the file appears under its name only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from augflow.data.store import DatasetWriter, sha256_file
from augflow.errors import ConfigError
from augflow.models import ModelFamily, load_model
from augflow.precision import autocast, resolve_amp
from augflow.runs import derive_seed, model_file, resolve_class, resolve_device, stored_amp
from augflow.train.privacy.ledger import Ledger
from augflow.version import __version__

_MAX_REDRAWS = 20


@dataclass
class SynthesisResult:
    """What :func:`synthesize` wrote."""

    out: Path
    counts: dict[str, int]
    rejected_nonfinite: int


def training_counts(model: str | Path) -> dict[str, int]:
    """The training class counts stored with a model (run folder or model file), by class name in label order."""
    _, meta = load_model(model, with_meta=True)
    return dict(zip(meta["class_names"], meta["class_counts"], strict=True))


def balance_counts(counts: dict[str, int], target: int | None = None) -> dict[str, int]:
    """Synthetic images per class so that real + synthetic reaches ``target`` (default: the largest class).

    Arguments:
        counts: Real images per class (:func:`training_counts` of a model).
        target: The per-class total to reach.

    Raises:
        ConfigError: If ``target`` is not positive.
    """
    target = max(counts.values()) if target is None else target
    if target < 1:
        raise ConfigError(f"--target-count must be positive, but is: {target}")
    return {name: max(0, target - n) for name, n in counts.items()}


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
    temperature = meta.get("temperature", flow.default_temperature) if temperature is None else temperature
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
        "augflow_version": __version__, "privacy": _ledger(meta.get("privacy")),
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


def _ledger(stored: dict | None) -> dict | None:
    """The model's privacy ledger, for the provenance of everything made from it."""
    ledger = Ledger.from_dict(stored)
    return None if ledger is None else ledger.to_dict()


def _finite_batch(flow: ModelFamily, k: int, b: int, temperature: float, generator, device) -> _Batch:
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
