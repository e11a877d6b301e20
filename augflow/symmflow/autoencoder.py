"""A small convolutional autoencoder for latent MedSymmFlow (trained by :mod:`augflow.train.autoencoder`).

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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from augflow.errors import ConfigError
from augflow.model_base import ModelConfig, SavedModule, is_int
from augflow.runs import autoencoder_file, load_file
from augflow.symmflow.unet import group_norm, zero_module


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
        d = self.downsample
        if not (is_int(d, 2) and d & (d - 1) == 0):
            raise ConfigError(f"--downsample must be a power of two >= 2, but is: {d!r}")
        self.check_image_shape(d, "--downsample")
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


class Autoencoder(SavedModule):
    """GroupNorm conv encoder/decoder; images in ``[0, 1]``, latents standardised per channel.

    Arguments:
        config: The architecture (validated here).
    """

    config_class = AutoencoderConfig

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

    def header(self) -> dict[str, Any]:
        return {"kind": "autoencoder"}


def load_autoencoder(path: str | Path) -> Autoencoder:
    """Load an autoencoder file (or the ``autoencoder.pt`` of a ``train-autoencoder`` folder), in eval mode.

    Raises:
        ConfigError: If the file is missing or is not an augflow autoencoder. DataError: If it is unreadable.
    """
    path = autoencoder_file(path)
    if not path.is_file():
        raise ConfigError(f"model.autoencoder: no file {str(path)!r}; train one with "
                          f"`augflow train-autoencoder --data train.h5 --out ae/`")
    ckpt = load_file(path, "autoencoder")
    if not (isinstance(ckpt, dict) and ckpt.get("kind") == "autoencoder"):
        raise ConfigError(f"model.autoencoder: {str(path)!r} is not an augflow autoencoder")
    return Autoencoder.from_checkpoint(ckpt).eval()
