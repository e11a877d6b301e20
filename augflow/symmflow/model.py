"""MedSymmFlow: one velocity field that generates images from class masks and classifies images into masks.

The joint state is ``[image z, class mask m]`` (channels concatenated; ``z`` is the image in ``[-1, 1]``, or its
standardised autoencoder latent). With one shared time ``t ~ U(0, 1)`` the two parts travel in opposite
directions along straight conditional paths (Lipman et al. 2023):

    z_t = (1 - (1 - s) t) eps_z + t z          (t = 0: noise,      t = 1: image)
    m_t = (1 - (1 - s) t) m + t eps_m          (t = 0: clean mask, t = 1: noise),   s = sigma_min = 1e-4
    v_z = z - (1 - s) eps_z,    v_m = eps_m - (1 - s) m
    loss = w ||v_hat_z - v_z||^2 + (1 - w) ||v_hat_m - v_m||^2   (per-element means, w = 0.7)

Generation of class k integrates ``[eps, mask_k]`` from t = 0 to 1 and keeps the image channels; classification
integrates ``[x, eps]`` from t = 1 to 0 and reads the mask: the class is the palette colour nearest to it.

References:
    Caetano, Abdi, Viviers, Valiuddin & van der Sommen, "MedSymmFlow", 2025, arXiv:2507.19098.
    Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow Matching for Generative Modeling", 2023, arXiv:2210.02747.
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", 2021, arXiv:2105.05233 (the U-Net).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from augflow.errors import ConfigError
from augflow.flows.masks import ellipse_mask
from augflow.model_base import FamilyModel, ModelConfig, is_int
from augflow.symmflow.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder
from augflow.symmflow.palette import (
    MASK_CHANNELS,
    MASK_KINDS,
    class_colours,
    class_masks,
    colour_distances,
    dequantize_mask,
)
from augflow.symmflow.unet import UNet

SOLVERS = ("euler", "heun")
SPACES = ("auto", "pixel", "latent")
LATENT_FROM_SIZE = 128  # "auto" runs the flow in an autoencoder's latents from this image side up


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SymmFlowConfig(ModelConfig):
    """Architecture and method settings of a :class:`SymmFlow` (recipe table ``[model]``, family ``symmflow``).

    Attributes:
        image_shape: ``(C, H, W)`` of the data.
        num_classes: Number of labels ``K``.
        base_channels: U-Net width of the first level.
        channel_mult: U-Net width multiplier per level (``len - 1`` downsamplings).
        num_res_blocks: Residual blocks per U-Net level.
        attention_resolutions: Downsample factors with self-attention (e.g. ``[4]``: at 1/4 resolution).
        num_heads: Attention heads.
        dropout: Dropout in the residual blocks.
        mask: ``"constant"`` (the paper's: the class colour everywhere) or ``"semantic"`` (the class colour
            inside a fixed centred ellipse, the brain region, and -1 outside).
        image_weight: ``w`` of the loss (paper: 0.7).
        time_shift: ``a`` of the training times ``t = a u / (1 + (a - 1) u)``, ``u ~ U(0, 1)`` (the timestep shift of
            Esser et al. 2024, arXiv 2403.03206, sec. 5.3.2); 1 = uniform (paper). ``a > 1`` spends more steps near
            ``t = 1``, where the mask is noise and has to be read from the image: a constant mask of ``N`` pixels
            stays readable from its own noisy copy down to a noise-to-signal ratio of about ``sqrt(N)``, so uniform
            times train the read-out on a share of the steps that shrinks as the image grows.
        sigma_min: ``s`` of the paths (paper: 1e-4).
        beta: Mask dequantisation ``beta * (U - 0.5) / 127.5`` (paper: 4).
        steps: Integration steps of sampling and classification over the whole path (paper: 25). The steps are
            uniform in ``u``, so a shifted model integrates on its training times' grid (SD3 samples with the
            shift it trained with): with ``a = 8``, 10 read-out steps tie 25 uniform ones (classification-notes.md).
        solver: ``"euler"`` (paper) or ``"heun"`` (second order, two evaluations per step).
        space: ``"pixel"``, ``"latent"`` (needs ``autoencoder``), or ``"auto"``: latent when an autoencoder is
            given or the image side is >= 128 px (then one is required).
        autoencoder: Path of a ``train-autoencoder`` model (file or folder) for the latent mode; frozen.
    """

    image_shape: tuple[int, int, int] = (1, 64, 64)
    num_classes: int = 2
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 4
    dropout: float = 0.0
    mask: str = "constant"
    image_weight: float = 0.7
    time_shift: float = 1.0
    sigma_min: float = 1e-4
    beta: float = 4.0
    steps: int = 25
    solver: str = "euler"
    space: str = "auto"
    autoencoder: str = ""

    @property
    def latent(self) -> bool:
        """Whether the flow runs in an autoencoder's latent space."""
        if self.space == "auto":
            return bool(self.autoencoder) or max(self.image_shape[1:]) >= LATENT_FROM_SIZE
        return self.space == "latent"

    def validate(self) -> SymmFlowConfig:
        """Check every field; return ``self``.

        Raises:
            ConfigError: Naming the field, the allowed values and the value received.
        """
        self.check_image_shape()
        shape = self.image_shape
        if not is_int(self.num_classes, 2):
            raise ConfigError(f"num_classes must be an int >= 2, but is: {self.num_classes!r}")
        if self.num_classes > 64:
            raise ConfigError(f"num_classes must be <= 64 (the palette's colours), but is: {self.num_classes}")
        if not is_int(self.base_channels, 1):
            raise ConfigError(f"model.base_channels must be an int >= 1, but is: {self.base_channels!r}")
        mult = self.channel_mult
        if not (isinstance(mult, tuple) and mult and all(is_int(v, 1) for v in mult)):
            raise ConfigError(f"model.channel_mult must be a non-empty list of ints >= 1, but is: {mult!r}")
        if not is_int(self.num_res_blocks, 1):
            raise ConfigError(f"model.num_res_blocks must be an int >= 1, but is: {self.num_res_blocks!r}")
        att = self.attention_resolutions
        if not (isinstance(att, tuple) and all(is_int(v, 1) for v in att)):
            raise ConfigError(f"model.attention_resolutions must be a list of downsample factors (ints >= 1), "
                              f"but is: {att!r}")
        if not is_int(self.num_heads, 1) or any(m * self.base_channels % self.num_heads for m in mult):
            raise ConfigError(f"model.num_heads must be an int >= 1 dividing every level's width "
                              f"(base_channels x channel_mult), but is: {self.num_heads!r}")
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ConfigError(f"model.dropout must be in [0, 1), but is: {self.dropout!r}")
        if self.mask not in MASK_KINDS:
            raise ConfigError(f"model.mask must be one of {MASK_KINDS}, but is: {self.mask!r}")
        if not (_is_number(self.image_weight) and 0 <= self.image_weight <= 1):
            raise ConfigError(f"model.image_weight must be in [0, 1], but is: {self.image_weight!r}")
        if not (_is_number(self.time_shift) and self.time_shift > 0):
            raise ConfigError(f"model.time_shift must be a number > 0 (1 = uniform times), but is: {self.time_shift!r}")
        if not (_is_number(self.sigma_min) and 0 <= self.sigma_min < 1):
            raise ConfigError(f"model.sigma_min must be in [0, 1), but is: {self.sigma_min!r}")
        if not (_is_number(self.beta) and self.beta >= 0):
            raise ConfigError(f"model.beta must be >= 0, but is: {self.beta!r}")
        if not is_int(self.steps, 1):
            raise ConfigError(f"model.steps must be an int >= 1, but is: {self.steps!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"model.solver must be one of {SOLVERS}, but is: {self.solver!r}")
        if self.space not in SPACES:
            raise ConfigError(f"model.space must be one of {SPACES}, but is: {self.space!r}")
        if not isinstance(self.autoencoder, str):
            raise ConfigError(f"model.autoencoder must be a path string, but is: {self.autoencoder!r}")
        if self.space == "pixel" and self.autoencoder:
            raise ConfigError("model.autoencoder is set but model.space is 'pixel'; remove one of them")
        if self.latent and not self.autoencoder:
            raise ConfigError(
                f"images of {shape[1]}x{shape[2]} px run MedSymmFlow in an autoencoder's latent space "
                f"(model.space = {self.space!r}); train one with `augflow train-autoencoder --data train.h5 "
                f"--out ae/` and set model.autoencoder = \"ae/autoencoder.pt\" in the recipe (or --set "
                f"model.space=pixel to stay in pixel space)")
        if not self.latent:
            self.check_image_shape(2 ** (len(mult) - 1), "2 ** (len(channel_mult) - 1)")
        return self


def interpolate(z: Tensor, m: Tensor, eps_z: Tensor, eps_m: Tensor, t: Tensor,
                sigma_min: float) -> tuple[Tensor, Tensor]:
    """The symmetric paths at times ``t`` ``(B,)``: image from noise (t=0) to data (t=1), mask the reverse."""
    t = t[:, None, None, None]
    z_t = (1 - (1 - sigma_min) * t) * eps_z + t * z
    m_t = (1 - (1 - sigma_min) * t) * m + t * eps_m
    return z_t, m_t


def shift_time(u: Tensor, shift: float) -> Tensor:
    """Map uniform ``u`` in [0, 1] to ``a u / (1 + (a - 1) u)``: the identity for ``a = 1``, toward 1 for ``a > 1``."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_time(t: float, shift: float) -> float:
    """The inverse of :func:`shift_time`: ``u = t / (a - (a - 1) t)``."""
    return t / (shift - (shift - 1) * t)


def velocity_targets(z: Tensor, m: Tensor, eps_z: Tensor, eps_m: Tensor,
                     sigma_min: float) -> tuple[Tensor, Tensor]:
    """``d/dt`` of :func:`interpolate`: ``(z - (1 - s) eps_z, eps_m - (1 - s) m)``."""
    return z - (1 - sigma_min) * eps_z, eps_m - (1 - sigma_min) * m


class Uncertainty(NamedTuple):
    """Per-image uncertainty of a classification (both ``(B,)``; larger = less certain)."""

    distance: Tensor  # mean per-pixel distance of the integrated mask to the predicted colour (the paper's)
    spread: Tensor  # standard deviation over the passes of the distance to the predicted colour (0 for one)


class SymmFlow(FamilyModel):
    """MedSymmFlow: a symmetrical flow-matching model of images and class masks (generation + classification).

    Images enter and leave in ``[0, 1]``. In latent mode the frozen autoencoder maps them to standardised
    latents (its weights are saved with the model, so a saved model does not need the autoencoder file).

    Arguments:
        config: The settings (validated here).
        autoencoder: In latent mode, the autoencoder to use instead of loading ``config.autoencoder``.

    Raises:
        ConfigError: If the config is invalid or the autoencoder does not fit the images.
    """

    family = "symmflow"
    loss_name = "flow-matching loss"
    default_temperature = 1.0  # flow matching samples its own distribution at temperature 1
    config_class = SymmFlowConfig

    def __init__(self, config: SymmFlowConfig, autoencoder: Autoencoder | None = None):
        super().__init__()
        self.config = config.validate()
        self.autoencoder: Autoencoder | None = None
        if config.latent:
            ae = autoencoder if autoencoder is not None else load_autoencoder(config.autoencoder)
            if ae.config.image_shape != config.image_shape:
                raise ConfigError(f"model.autoencoder {config.autoencoder!r} was trained on images of shape "
                                  f"{ae.config.image_shape}, but the data have {config.image_shape}")
            ae.requires_grad_(False)  # frozen: the loop's optimiser skips parameters without gradients
            self.autoencoder = ae.eval()
            self.flow_shape = ae.config.latent_shape
        else:
            self.flow_shape = config.image_shape
        channels, height, width = self.flow_shape
        factor = 2 ** (len(config.channel_mult) - 1)
        if height % factor or width % factor:
            raise ConfigError(f"the flow's maps {height}x{width} must be divisible by {factor} "
                              f"(2 ** (len(channel_mult) - 1))")
        self.register_buffer("colours", class_colours(config.num_classes))  # (K, 3) in [-1, 1]
        region = ellipse_mask(height, width) if config.mask == "semantic" else torch.ones(height, width)
        self.register_buffer("region", region.view(1, 1, height, width))
        self.unet = UNet(channels + MASK_CHANNELS, channels + MASK_CHANNELS, config.base_channels,
                         config.channel_mult, config.num_res_blocks, config.attention_resolutions,
                         config.num_heads, config.dropout)

    @property
    def dp_blocker(self) -> str | None:
        """Why DP-SGD training of this model would not be private, or None (for ``augflow train --dp`` to refuse).

        The latent mode's autoencoder is trained on the real training images without DP, and its weights are saved
        in the model, so DP-SGD of the flow alone would not bound what the released model reveals.
        """
        if self.autoencoder is None:
            return None
        return ("model.autoencoder is trained on the private training images without differential privacy and is "
                "saved with the model; DP-SGD of the flow alone does not protect them. Train in pixel space "
                "(model.space = 'pixel') or use an autoencoder trained on public data")

    def train(self, mode: bool = True) -> SymmFlow:
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()  # frozen, always deterministic
        return self

    # ------------------------------------------------------------------------------------- spaces

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            expected = ", ".join(map(str, self.config.image_shape))
            raise ConfigError(f"x must have shape (B, {expected}), but is: {tuple(x.shape)}")

    def to_flow(self, x: Tensor) -> Tensor:
        """Images ``[0, 1]`` -> the flow's image part: ``2x - 1``, or standardised latents (no gradients)."""
        if self.autoencoder is None:
            return 2 * x - 1
        with torch.no_grad():
            return self.autoencoder.encode(x).detach().to(x.dtype)  # float32 also under amp

    def from_flow(self, z: Tensor) -> Tensor:
        """The flow's image part -> images (nominally ``[0, 1]``, not clamped)."""
        return (z + 1) / 2 if self.autoencoder is None else self.autoencoder.decode(z).to(z.dtype)

    def class_mask(self, y: Tensor) -> Tensor:
        """Clean class masks ``(B, 3, H', W')`` of labels ``y`` at the flow's resolution."""
        return class_masks(self.colours, self.region, y)

    # ------------------------------------------------------------------------------------- training

    def velocity(self, state: Tensor, t: Tensor) -> Tensor:
        """The learned velocity of the joint state ``(B, C' + 3, H', W')`` at times ``t`` ``(B,)``; in the state's
        dtype also when the U-Net runs in bf16 (amp), so the integration and the loss stay in float32."""
        return self.unet(state, t).to(state.dtype)

    forward = velocity

    def flow_matching_loss(self, z: Tensor, m: Tensor, t: Tensor, eps_z: Tensor, eps_m: Tensor) -> Tensor:
        """Per-sample weighted loss ``(B,)`` of flow-space images ``z`` and masks ``m`` for given noise."""
        s, w = self.config.sigma_min, self.config.image_weight
        z_t, m_t = interpolate(z, m, eps_z, eps_m, t, s)
        v_z, v_m = velocity_targets(z, m, eps_z, eps_m, s)
        v_hat = self.velocity(torch.cat([z_t, m_t], dim=1), t)
        c = z.shape[1]
        loss_z = (v_hat[:, :c] - v_z).square().flatten(1).mean(1)
        loss_m = (v_hat[:, c:] - v_m).square().flatten(1).mean(1)
        return w * loss_z + (1 - w) * loss_m

    def training_loss(self, x: Tensor, y: Tensor, ce_weight: float = 0.0, log_prior: Tensor | None = None,
                      label_smoothing: float = 0.0) -> Tensor:
        """Per-sample symmetric flow-matching loss ``(B,)`` of dequantised images ``x`` in ``[0, 1]``.

        ``t``, the noise and the mask dequantisation come from torch's global RNG (the loop seeds it per step;
        ``torch.func.vmap(..., randomness="different")`` draws per sample). ``log_prior`` and ``label_smoothing`` belong
        to the hybrid objective and are unused.

        Raises:
            ConfigError: If ``ce_weight`` is not 0 (the hybrid objective is MAGIC-Flow's).
        """
        if ce_weight != 0:
            raise ConfigError(f"train.ce_weight must be 0 for model.family 'symmflow' (the hybrid likelihood "
                              f"objective is MAGIC-Flow's), but is: {ce_weight}")
        z = self.to_flow(x)
        m = dequantize_mask(self.class_mask(y), self.config.beta)
        t = shift_time(torch.rand(z.shape[0], device=z.device, dtype=z.dtype), self.config.time_shift)
        return self.flow_matching_loss(z, m, t, torch.randn_like(z), torch.randn_like(m))

    # ------------------------------------------------------------------------------------- integration

    def integrate(self, state: Tensor, t0: float, t1: float, steps: int | None = None,
                  solver: str | None = None, shift: float | None = None) -> Tensor:
        """Integrate the joint state from ``t0`` to ``t1`` with fixed steps (Euler or Heun), uniform in the
        training times' ``u`` (:func:`shift_time` by ``shift``, default ``config.time_shift``; uniform in ``t`` for
        1); ``steps`` defaults to the model's step size: ``config.steps`` over the whole path, proportionally fewer
        over a part of it."""
        shift = self.config.time_shift if shift is None else shift
        u0, u1 = unshift_time(t0, shift), unshift_time(t1, shift)
        steps = max(1, round(self.config.steps * abs(u1 - u0))) if steps is None else steps
        solver = self.config.solver if solver is None else solver
        if solver not in SOLVERS or not is_int(steps, 1):
            raise ConfigError(f"solver must be in {SOLVERS} and steps >= 1, but are: {solver!r}, {steps!r}")
        times = shift_time(torch.linspace(u0, u1, steps + 1, dtype=torch.float64), shift).tolist()
        for t, t_next in itertools.pairwise(times):
            dt = t_next - t
            v = self.velocity(state, state.new_full((state.shape[0],), t))
            if solver == "heun":
                guess = state + dt * v
                v = 0.5 * (v + self.velocity(guess, state.new_full((state.shape[0],), t_next)))
            state = state + dt * v
        return state

    @torch.no_grad()
    def sample(self, y: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Class-conditional images: ``[temperature * eps, mask_y]`` integrated from t=0 to t=1.

        Arguments:
            y: Labels ``(B,)``.
            temperature: Scale of the initial image noise (1 = the model's distribution).
            generator: Optional RNG on the model's device.

        Returns:
            ``(B, C, H, W)`` in ``[0, 1]`` (clamped).
        """
        ref = self.colours
        y = y.to(ref.device)
        eps = torch.randn((y.shape[0], *self.flow_shape), generator=generator, device=ref.device, dtype=ref.dtype)
        state = self.integrate(torch.cat([temperature * eps, self.class_mask(y)], dim=1), 0.0, 1.0)
        return self.from_flow(state[:, : self.flow_shape[0]]).clamp(0, 1)

    @torch.no_grad()
    def sample_near(self, x: Tensor, c: Tensor, y: Tensor, strength: float, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> Tensor:
        """Samples of classes ``y`` anchored to real images ``x`` (SDEdit, Meng et al. 2022, arXiv 2108.01073).

        The joint state is put where the symmetric paths are at ``t0 = 1 - s`` for ``x`` and the mask of ``y``
        (:func:`interpolate`, image noise scaled by ``temperature``) and integrated to ``t = 1`` with the model's
        step size. ``s = 1`` is :meth:`sample` with the same generator; ``s -> 0`` returns ``x``. ``c``, the
        anchors' own classes, is not needed: the mask path carries the target class.

        Returns:
            ``(B, C, H, W)`` in ``[0, 1]`` (clamped).
        """
        self._check(x)
        ref = self.colours
        z = self.to_flow(x.to(device=ref.device, dtype=ref.dtype))
        mask = self.class_mask(y.to(ref.device))
        eps_z = torch.randn(z.shape, generator=generator, device=ref.device, dtype=ref.dtype)
        eps_m = torch.randn(mask.shape, generator=generator, device=ref.device, dtype=ref.dtype)
        t0 = 1 - strength
        z_t, m_t = interpolate(z, mask, temperature * eps_z, eps_m, z.new_full((len(z),), t0), self.config.sigma_min)
        state = self.integrate(torch.cat([z_t, m_t], dim=1), t0, 1.0)
        return self.from_flow(state[:, : self.flow_shape[0]]).clamp(0, 1)

    @torch.no_grad()
    def integrated_mask(self, x: Tensor, generator: torch.Generator | None = None, steps: int | None = None) -> Tensor:
        """The mask read out of images ``x`` in ``[0, 1]``: ``[x, eps]`` integrated from t=1 to 0 in ``steps`` (default:
        ``config.steps``); (B, 3, H', W')."""
        self._check(x)
        ref = self.colours
        z = self.to_flow(x.to(device=ref.device, dtype=ref.dtype))
        eps = torch.randn((z.shape[0], MASK_CHANNELS, *z.shape[2:]), generator=generator, device=ref.device,
                          dtype=ref.dtype)
        return self.integrate(torch.cat([z, eps], dim=1), 1.0, 0.0, steps)[:, z.shape[1]:]

    @torch.no_grad()
    def class_distances(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean per-pixel L2 distance ``(B, K)`` of the integrated mask to each class colour."""
        return colour_distances(self.integrated_mask(x, generator), self.colours, self.region)

    @torch.no_grad()
    def class_scores(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Class scores ``(B, K)``, higher = more likely: minus :meth:`class_distances` (the paper's AUC score)."""
        return -self.class_distances(x, generator)

    @torch.no_grad()
    def classify(self, x: Tensor, passes: int = 1, generator: torch.Generator | None = None,
                 steps: int | None = None) -> tuple[Tensor, Tensor, Uncertainty]:
        """Scores, predictions and uncertainty of ``passes`` stochastic readouts (different mask noise) of ``steps``
        integration steps each (default: ``config.steps``).

        Returns:
            ``(scores (B, K), predicted (B,), Uncertainty)``: scores are minus the distances averaged over the
            passes; ``distance`` is the averaged distance to the predicted colour (for one pass: the paper's
            uncertainty); ``spread`` is the standard deviation over the passes of the distance to the predicted
            colour (beyond the paper; 0 for one pass).
        """
        if not is_int(passes, 1):
            raise ConfigError(f"passes must be an int >= 1, but is: {passes!r}")
        per_pass = torch.stack([colour_distances(self.integrated_mask(x, generator, steps), self.colours, self.region)
                                for _ in range(passes)])  # (S, B, K)
        distances = per_pass.mean(0)
        predicted = distances.argmin(dim=1)
        to_predicted = per_pass.gather(2, predicted[None, :, None].expand(passes, -1, 1))[..., 0]  # (S, B)
        spread = to_predicted.std(dim=0, unbiased=False)
        return -distances, predicted, Uncertainty(to_predicted.mean(0), spread)

    @torch.no_grad()
    def uncertainty(self, x: Tensor, passes: int = 1, generator: torch.Generator | None = None) -> Uncertainty:
        """Per-image uncertainty of the classification of ``x``; see :meth:`classify`."""
        return self.classify(x, passes, generator)[2]

    # ------------------------------------------------------------------------------------- persistence

    def parts(self) -> dict[str, Any]:
        """The autoencoder's config beside its weights, so a saved model does not need the autoencoder file."""
        return {} if self.autoencoder is None else {"autoencoder_config": self.autoencoder.config.to_dict()}

    @classmethod
    def build(cls, payload: dict[str, Any]) -> SymmFlow:
        autoencoder = None
        if "autoencoder_config" in payload:
            autoencoder = Autoencoder(AutoencoderConfig.from_dict(payload["autoencoder_config"]))
        return cls(SymmFlowConfig.from_dict(payload["config"]), autoencoder=autoencoder)
