"""A small convolutional autoencoder for latent MedSymmFlow, and its training (``augflow train-autoencoder``).

MedSymmFlow runs its flow in the latent space of a frozen Stable Diffusion VAE for large images. Those weights
cannot be downloaded here, so augflow trains its own autoencoder on the real training images: a GroupNorm conv
encoder (``log2(downsample)`` strided stages) to ``latent_channels`` maps at ``H / downsample``, and a mirrored
decoder; the loss is the MSE of the reconstruction in ``[-1, 1]`` plus an optional small KL term (a VAE when
``kl_weight > 0``; the encoder then outputs a mean and a log-variance, and :meth:`Autoencoder.encode` returns the
mean). After training, the per-channel mean and standard deviation of the training latents are stored with the
model, so the flow sees standardised latents (the role of Stable Diffusion's 0.18215 scale factor).

References:
    Rombach, Blattmann, Lorenz, Esser & Ommer, "High-Resolution Image Synthesis with Latent Diffusion Models",
    2022, arXiv:2112.10752.
    Caetano et al., "MedSymmFlow", 2025, arXiv:2507.19098.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from augflow.atomic import atomic_save, atomic_write_text
from augflow.errors import ConfigError
from augflow.model_config import ModelConfig, is_int
from augflow.symmflow.unet import group_norm, zero_module

AUTOENCODER = "autoencoder.pt"


@dataclass
class AutoencoderConfig(ModelConfig):
    """Architecture of an :class:`Autoencoder`.

    Attributes:
        image_shape: ``(C, H, W)`` of the data; ``H`` and ``W`` divisible by ``downsample``.
        latent_channels: Channels of the latent.
        downsample: Spatial reduction, a power of two >= 2.
        channels: Width of the first stage (doubled per stage, up to 4x).
        kl_weight: Weight of the KL term (0: a plain autoencoder).
    """

    kind = "autoencoder config"

    image_shape: tuple[int, int, int] = (1, 128, 128)
    latent_channels: int = 4
    downsample: int = 4
    channels: int = 32
    kl_weight: float = 0.0

    def validate(self) -> AutoencoderConfig:
        """Check every field; return ``self``.

        Raises:
            ConfigError: Naming the field, the allowed values and the value received.
        """
        shape = self.image_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and all(is_int(v, 1) for v in shape)):
            raise ConfigError(f"image_shape must be (C, H, W) of positive ints, but is: {shape!r}")
        d = self.downsample
        if not (is_int(d, 2) and d & (d - 1) == 0):
            raise ConfigError(f"--downsample must be a power of two >= 2, but is: {d!r}")
        if shape[1] % d or shape[2] % d:
            raise ConfigError(f"image height and width must be divisible by --downsample {d}, but are: {shape[1:]}")
        if not is_int(self.latent_channels, 1):
            raise ConfigError(f"--latent-channels must be an int >= 1, but is: {self.latent_channels!r}")
        if not is_int(self.channels, 1):
            raise ConfigError(f"--channels must be an int >= 1, but is: {self.channels!r}")
        if not (isinstance(self.kl_weight, int | float) and self.kl_weight >= 0):
            raise ConfigError(f"--kl-weight must be >= 0, but is: {self.kl_weight!r}")
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.image_shape[1] // self.downsample, self.image_shape[2] // self.downsample)


class _Res(nn.Module):
    """Unconditional residual block: GroupNorm -> SiLU -> conv, twice."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                   group_norm(channels), nn.SiLU(),
                                   zero_module(nn.Conv2d(channels, channels, 3, padding=1)))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Autoencoder(nn.Module):
    """GroupNorm conv encoder/decoder; images in ``[0, 1]``, latents standardised per channel.

    Arguments:
        config: The architecture (validated here).
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config.validate()
        channels = config.image_shape[0]
        stages = int(math.log2(config.downsample))
        widths = [config.channels * min(2**i, 4) for i in range(stages + 1)]
        out = 2 * config.latent_channels if config.kl_weight > 0 else config.latent_channels
        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for i in range(stages):
            enc += [_Res(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [_Res(widths[-1]), group_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], out, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1), _Res(widths[-1])]
        for i in reversed(range(stages)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    _Res(widths[i])]
        dec += [group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # Per-channel statistics of the training latents; identity until fitted.
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.encoder(2 * x - 1)
        if self.config.kl_weight > 0:
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(-30, 20)
        return h, None

    def encode_raw(self, x: Tensor) -> Tensor:
        """Unstandardised latent (the mean for a VAE) of images ``x`` in ``[0, 1]``."""
        return self._moments(x)[0]

    def encode(self, x: Tensor) -> Tensor:
        """Standardised latents ``(B, *latent_shape)`` of images ``(B, *image_shape)`` in ``[0, 1]``."""
        z = self.encode_raw(x)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, z: Tensor) -> Tensor:
        """Images in ``[0, 1]`` (not clamped) of standardised latents."""
        z = z * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        return (self.decoder(z) + 1) / 2

    def loss(self, x: Tensor) -> Tensor:
        """Per-sample training loss ``(B,)``: MSE in ``[-1, 1]`` (+ ``kl_weight`` x KL per latent element)."""
        mean, logvar = self._moments(x)
        z = mean if logvar is None else mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        mse = (self.decoder(z) - (2 * x - 1)).square().flatten(1).mean(1)
        if logvar is None:
            return mse
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).mean(1)
        return mse + self.config.kl_weight * kl

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{"kind": "autoencoder", "config", "state_dict", "meta"}`` atomically."""
        atomic_save({"kind": "autoencoder", "config": self.config.to_dict(), "state_dict": self.state_dict(),
                     "meta": meta or {}}, path)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> Autoencoder:
        model = cls(AutoencoderConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
        return model


def load_autoencoder(path: str | Path) -> Autoencoder:
    """Load an autoencoder file (or the ``autoencoder.pt`` of a ``train-autoencoder`` folder), in eval mode.

    Raises:
        ConfigError: If the file is missing or is not an augflow autoencoder.
    """
    path = Path(path)
    if path.is_dir():
        path = path / AUTOENCODER
    if not path.is_file():
        raise ConfigError(f"model.autoencoder: no file {str(path)!r}; train one with "
                          f"`augflow train-autoencoder --data train.h5 --out ae/`")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(ckpt, dict) and ckpt.get("kind") == "autoencoder"):
        raise ConfigError(f"model.autoencoder: {str(path)!r} is not an augflow autoencoder")
    return Autoencoder.from_checkpoint(ckpt).eval()


@dataclass
class AutoencoderResult:
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

    Returns:
        An :class:`AutoencoderResult` (MSE in ``[0, 1]`` units).

    Raises:
        ConfigError: For invalid options or data.
    """
    from tqdm.auto import tqdm

    from augflow.data.store import read_images, read_info
    from augflow.train.checkpoint import write_json
    from augflow.train.loop import resolve_device

    if not is_int(epochs, 1) or not is_int(batch_size, 1) or not lr > 0:
        raise ConfigError(f"--epochs and --batch-size must be >= 1 and --lr > 0, but are: {epochs}, {batch_size}, "
                          f"{lr}")
    out = Path(out)
    dev = resolve_device(device)
    info = read_info(data)
    config = AutoencoderConfig(tuple(info.image_shape), latent_channels, downsample, channels, kl_weight).validate()
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
    out.mkdir(parents=True, exist_ok=True)
    write_json({"autoencoder": config.to_dict(), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "seed": seed, "data": str(Path(data).resolve()), "val": str(Path(val).resolve()) if val else None},
               out / "config.json")
    atomic_write_text((command or " ".join(sys.argv)) + "\n", out / "command.txt")
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
        atomic_write_text("\n".join(lines) + "\n", out / "metrics.jsonl")
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
