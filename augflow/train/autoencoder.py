"""``augflow train-autoencoder``: train the autoencoder of latent MedSymmFlow on real training images.

The model is :class:`augflow.symmflow.Autoencoder`; this job reads the images, trains it (AdamW with cosine decay),
standardises its latents by their training statistics and writes an autoencoder folder (:mod:`augflow.runs`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from augflow.atomic import atomic_write_text, check_output_folder
from augflow.data.store import read_images, read_info
from augflow.errors import ConfigError
from augflow.model_base import is_int
from augflow.runs import AUTOENCODER, METRICS, resolve_device, start_run
from augflow.symmflow.autoencoder import Autoencoder, AutoencoderConfig


@dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` made (MSE in ``[0, 1]`` units)."""

    path: Path
    train_mse: float
    val_mse: float | None
    mean_image_mse: float | None  # reconstruction error of the training mean image, for reference


@torch.no_grad()
def _mse(model: Autoencoder, images: Tensor, batch_size: int) -> float:
    """Mean squared reconstruction error in ``[0, 1]`` units."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        total += (model.decode(model.encode(x)) - x).square().sum().item()
    return total / max(1, images.numel())


def train_autoencoder(
    data: str | Path,
    out: str | Path,
    val: str | Path | None = None,
    latent_channels: int = 4,
    downsample: int = 4,
    channels: int = 32,
    kl_weight: float = 0.0,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
    overwrite: bool = False,
) -> AutoencoderResult:
    """Train an autoencoder on the images of a dataset file; write ``out/autoencoder.pt`` and a run log.

    AdamW with cosine decay; after training, the latent mean and standard deviation of the training images are
    stored in the model. ``out`` also gets ``config.json``, ``metrics.jsonl`` and ``command.txt``.

    Arguments:
        data: Training file (augflow HDF5); the images are held in memory.
        out: Output folder.
        val: Optional validation file (its reconstruction MSE is reported).
        latent_channels, downsample, channels, kl_weight: See :class:`AutoencoderConfig`.
        epochs: Passes over the data.
        batch_size: Images per step.
        lr: Peak learning rate.
        seed: Seed of initialisation, order and sampling.
        device: "auto", "cpu" or "cuda[:N]".
        progress: Show a progress bar.
        command: The command line, written to ``command.txt``.
        overwrite: Write into a non-empty ``out`` (its files of the same names are replaced).

    Returns:
        An :class:`AutoencoderResult` (MSE in ``[0, 1]`` units).

    Raises:
        ConfigError: For invalid options or data, or a non-empty ``out`` without ``overwrite``.
    """
    if not is_int(epochs, 1) or not is_int(batch_size, 1) or not lr > 0:
        raise ConfigError(f"--epochs and --batch-size must be >= 1 and --lr > 0, but are: {epochs}, {batch_size}, "
                          f"{lr}")
    dev = resolve_device(device)
    info = read_info(data).require_images("--data")
    config = AutoencoderConfig(tuple(info.image_shape), latent_channels, downsample, channels, kl_weight).validate()
    out = check_output_folder(out, overwrite)
    images = torch.from_numpy(read_images(data)).to(dev)
    val_images = None
    if val is not None:
        val_info = read_info(val)
        if tuple(val_info.image_shape) != config.image_shape:
            raise ConfigError(f"--val {val}: image shape {val_info.image_shape} differs from --data's "
                              f"{config.image_shape}")
        val_images = torch.from_numpy(read_images(val)).to(dev)

    torch.manual_seed(seed)
    model = Autoencoder(config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch,
                                                           eta_min=lr / 100)
    start_run(out, {"autoencoder": config.to_dict(), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                    "seed": seed, "data": str(Path(data).resolve()), "val": str(Path(val).resolve()) if val else None},
              command)
    order_rng = np.random.default_rng(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train-autoencoder", unit="step", disable=not progress,
               dynamic_ncols=True)
    started = time.perf_counter()
    lines = []
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(order_rng.permutation(len(images))).to(dev)
        total = 0.0
        for start in range(0, len(images), batch_size):
            loss = model.loss(images[order[start:start + batch_size]]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * min(batch_size, len(images) - start)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        model.eval()
        record = {"epoch": epoch + 1, "loss": total / len(images), "elapsed_s": round(time.perf_counter() - started, 2)}
        if val_images is not None:
            record["val_mse"] = _mse(model, val_images, batch_size)
        lines.append(json.dumps(record))
        atomic_write_text("\n".join(lines) + "\n", out / METRICS)
    bar.close()

    with torch.no_grad():  # standardise the latents by their training statistics
        latents = torch.cat([model.encode_raw(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
        model.latent_mean.copy_(latents.mean(dim=(0, 2, 3)))
        model.latent_std.copy_(latents.std(dim=(0, 2, 3)).clamp_min(1e-6))
    train_mse = _mse(model, images, batch_size)
    val_mse = _mse(model, val_images, batch_size) if val_images is not None else None
    mean_mse = float((images - images.mean(0, keepdim=True)).square().mean())
    meta = {"data": str(Path(data).resolve()), "class_names": info.class_names, "train_mse": train_mse,
            "val_mse": val_mse, "mean_image_mse": mean_mse, "epochs": epochs, "seed": seed}
    path = out / AUTOENCODER
    model.cpu().save(path, meta)
    return AutoencoderResult(path, train_mse, val_mse, mean_mse)
