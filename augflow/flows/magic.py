"""MAGIC-Flow: a class-conditional multiscale normalizing flow for generation and classification.

``log p(x | y) = log N(f(x, y); mu_y, diag(sigma_y^2)) + log|det df/dx|`` with ``f`` a stack of flow steps
(ActNorm -> 1x1 conv -> conditional affine coupling), squeezes and splits (Glow's multiscale
architecture). The same model generates (``sample``) and classifies
(``argmax_y log p(x|y) + log p(y)``).

Default hierarchy (24 steps, the paper's): full resolution: step 0 application mask, steps 1-4
checkerboard; then three levels, each: squeeze, 3 channel-wise steps, split (half the channels
out to the latent), checkerboard steps (3, 3, 4). The last latent is ``(8C, H/8, W/8)``.

The prior is factorised (never a dense D x D covariance): the paper's standard normal (``mu_y = 0``,
``sigma_y = 1``, ``prior = "standard"``), a learned mean per class and latent element (``prior =
"class_gaussian"``, as in IB-INN and FlowGMM), or a learned mean and standard deviation per class and latent
element (``prior = "class_diagonal"``: classes that differ in spread, such as scanners in their noise level, are
told apart by their variances too). With ``label_dropout > 0`` the model learns a null label ``K`` beside the K
classes (a random share of the training labels is replaced by it) and samples with classifier-free guidance
(:class:`~augflow.flows.coupling.Guided`). With ``conditional_couplings = False`` the coupling networks do not see
the label: ``f`` and its log-det are the same for every class and only the base tells classes apart, so
:meth:`MagicFlow.class_log_probs` scores all K classes from one flow pass, and the hybrid objective's
cross-entropy costs one pass instead of K.

Data ``x`` lives in ``[0, 1]``; the flow sees ``2x - 1`` and ``log_prob`` includes the ``D log 2``
of that map, so it is the exact density of continuous ``x``. Training uses uniformly dequantised
8-bit data (:func:`dequantize`), so :meth:`MagicFlow.bits_per_dim` is comparable with Glow.

References:
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
    Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
    Theis, van den Oord & Bethge, "A note on the evaluation of generative models", 2016,
    arXiv:1511.01844 (dequantisation).
    Ardizzone, Mackowiak, Rother & Köthe, "Training Normalizing Flows with the Information Bottleneck
    for Competitive Generative Classification" (IB-INN), 2020, arXiv:2001.06448.
    Izmailov, Kirichenko, Finzi & Wilson, "Semi-Supervised Learning with Normalizing Flows" (FlowGMM),
    2020, arXiv:1912.13025.
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022, arXiv:2207.12598 (label dropout, guidance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from augflow.errors import ConfigError
from augflow.flows.coupling import COUPLING_KINDS, AffineCoupling, Guided, make_coupling_net
from augflow.flows.layers import FlowStep, Split, Squeeze, unsqueeze2d
from augflow.flows.masks import MASK_KINDS, as_app_mask, ellipse_mask, make_mask
from augflow.model_base import FamilyModel, ModelConfig, is_int

_LOG_2PI = math.log(2 * math.pi)
PRIORS = ("standard", "class_gaussian", "class_diagonal")


@dataclass
class MagicFlowConfig(ModelConfig):
    """Architecture of a :class:`MagicFlow`; defaults reproduce the paper's 24-step hierarchy.

    Attributes:
        image_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** len(checker_steps)``.
        num_classes: Number of labels ``K``.
        coupling: Coupling network, ``"generation"`` or ``"classification"``.
        full_res_steps: Mask kind of each full-resolution step (``"application"``,
            ``"checkerboard"``, ``"channel"``).
        channel_steps: Channel-wise steps after each squeeze, before the split.
        checker_steps: Checkerboard steps after each split; its length is the number of levels.
        hidden_channels: Coupling-network width at full resolution, then at each level (length
            ``1 + len(checker_steps)``). Default: the widest entry of each of the paper's per-scale
            width tuples, from (16, 16, 32) at full resolution to (128, 256, 256) at the coarsest.
        embed_dim: Label-embedding width ``E`` (paper: 128).
        num_blocks: Blocks per generation network.
        dropout: Dropout of the classification network (paper: 0.3).
        log_scale_bound: Coupling log-scale ``s = log_scale_bound * tanh(h)`` (paper: 0.5).
        prior: Base distribution: ``"standard"`` (``N(0, I)``, the paper's), ``"class_gaussian"``
            (``N(mu_y, I)``, a learned mean per class and latent element; IB-INN, FlowGMM) or
            ``"class_diagonal"`` (``N(mu_y, diag(sigma_y^2))``, a learned mean and log standard deviation per
            class and latent element).
        conditional_couplings: Whether the coupling networks see the label. ``False``: the flow is the
            same for every class and only a class prior tells them apart, so the K class scores
            cost one flow pass.
        label_dropout: Share of the training labels replaced by the null label ``K`` (classifier-free guidance;
            Ho & Salimans use 0.1-0.2); ``> 0`` adds that label to the coupling networks and the class prior, and
            needs conditional couplings. 0: no null label, no guidance.
    """

    image_shape: tuple[int, int, int] = (1, 64, 64)
    num_classes: int = 2
    coupling: str = "generation"
    full_res_steps: tuple[str, ...] = ("application",) + ("checkerboard",) * 4
    channel_steps: int = 3
    checker_steps: tuple[int, ...] = (3, 3, 4)
    hidden_channels: tuple[int, ...] = (32, 64, 128, 256)
    embed_dim: int = 128
    num_blocks: int = 1
    dropout: float = 0.3
    log_scale_bound: float = 0.5
    prior: str = "standard"
    conditional_couplings: bool = True
    label_dropout: float = 0.0

    def validate(self) -> MagicFlowConfig:
        """Check every field; return ``self``.

        Raises:
            ConfigError: Naming the field, the allowed values and the value received.
        """
        checker = self.checker_steps
        if not (isinstance(checker, tuple) and all(is_int(v, 0) for v in checker)):
            raise ConfigError(f"checker_steps must be a tuple of ints >= 0, got {checker!r}")
        self.check_image_shape(2 ** len(checker), "2 ** number of levels")
        shape = self.image_shape
        if not is_int(self.num_classes, 1):
            raise ConfigError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
        if self.coupling not in COUPLING_KINDS:
            raise ConfigError(f"coupling must be one of {COUPLING_KINDS}, got {self.coupling!r}")
        steps = self.full_res_steps
        if not isinstance(steps, tuple) or any(kind not in MASK_KINDS for kind in steps):
            raise ConfigError(f"full_res_steps entries must be in {MASK_KINDS}, got {steps!r}")
        if "channel" in steps and shape[0] < 2:
            raise ConfigError(
                f"full_res_steps may use 'channel' only with C >= 2, got image_shape {shape!r}"
            )
        if not is_int(self.channel_steps, 0):
            raise ConfigError(f"channel_steps must be an int >= 0, got {self.channel_steps!r}")
        widths = self.hidden_channels
        if not (
            isinstance(widths, tuple)
            and len(widths) == 1 + len(self.checker_steps)
            and all(is_int(v, 1) for v in widths)
        ):
            raise ConfigError(
                f"hidden_channels must hold {1 + len(self.checker_steps)} ints >= 1 (full "
                f"resolution, then one per level), got {widths!r}"
            )
        if not is_int(self.embed_dim, 1):
            raise ConfigError(f"embed_dim must be an int >= 1, got {self.embed_dim!r}")
        if not is_int(self.num_blocks, 1):
            raise ConfigError(f"num_blocks must be an int >= 1, got {self.num_blocks!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.log_scale_bound, int | float) and self.log_scale_bound > 0):
            raise ConfigError(f"log_scale_bound must be > 0, got {self.log_scale_bound!r}")
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if not isinstance(self.conditional_couplings, bool):
            raise ConfigError(
                f"conditional_couplings must be true or false, got {self.conditional_couplings!r}"
            )
        if not (isinstance(self.label_dropout, int | float) and 0 <= self.label_dropout < 1):
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if self.label_dropout and not self.conditional_couplings:
            raise ConfigError("label_dropout > 0 (classifier-free guidance) needs conditional_couplings = true: "
                              "unconditional couplings have no label to drop")
        return self

    @property
    def num_labels(self) -> int:
        """Labels the model is trained with: the K classes, and the null label ``K`` when ``label_dropout > 0``."""
        return self.num_classes + (self.label_dropout > 0)

    @property
    def uses_app_mask(self) -> bool:
        """Whether a step uses the application-specific (brain) mask."""
        return "application" in self.full_res_steps


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of 8-bit data in ``[0, 1]``: ``(x * 255 + u) / 256``, ``u ~ U(0, 1)``.

    Used by the training loss, not inside ``log_prob``.

    Arguments:
        x: Images with values ``k / 255``, ``k`` in ``0..255``.
        generator: Optional RNG on ``x``'s device.
    """
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x * 255 + noise) / 256


def _gaussian_map(z: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Per-element log-density of ``N(mean, exp(log_scale)^2)``."""
    z = (z - mean) * torch.exp(-log_scale)
    return -0.5 * (z * z + _LOG_2PI) - log_scale


def _gaussian_log_prob(zs: list[Tensor], prior: tuple[list[Tensor], list[Tensor]]) -> Tensor:
    """``log N(z; mean, diag(scale^2))`` of the ``(means, log_scales)`` of ``prior``, summed over the last three
    dims (C, H, W) of each latent part and over the parts."""
    return sum(_gaussian_map(z, m, s).sum(dim=(-3, -2, -1)) for z, m, s in zip(zs, *prior, strict=True))


class MagicFlow(FamilyModel):
    """Class-conditional multiscale normalizing flow (MAGIC-Flow).

    ``forward(x, y)`` is :meth:`log_prob`, so ``torch.func.functional_call(model, params, (x, y))``
    gives log-densities (for per-sample DP gradients call it on ``x[i:i+1]``, ``y[i:i+1]``).

    Arguments:
        config: The architecture (validated here).
        app_mask: ``(H, W)`` brain mask for the application-specific steps; default: a centred
            ellipse (:func:`augflow.flows.masks.brain_mask_from_images` derives one from data).
            Stored as the ``app_mask`` buffer, so it survives save/load.

    Raises:
        ConfigError: If the config or ``app_mask`` is invalid.
    """

    family = "magic"
    loss_name = "bits/dim"
    has_likelihood = True
    default_temperature = 0.8  # a reduced temperature gives cleaner samples (Glow)
    config_class = MagicFlowConfig

    def __init__(self, config: MagicFlowConfig, app_mask: Tensor | np.ndarray | None = None):
        super().__init__()
        self.config = config.validate()
        channels, height, width = config.image_shape
        self.num_dims = channels * height * width
        if app_mask is None:
            mask = ellipse_mask(height, width)
        else:
            mask = as_app_mask(app_mask, height, width)
        self.register_buffer("app_mask", mask)
        self.layers = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        self._mask_uses = dict.fromkeys(MASK_KINDS, 0)
        shape = (channels, height, width)
        for kind in config.full_res_steps:
            self._add_step(kind, shape, config.hidden_channels[0])
        for level, checker in enumerate(config.checker_steps, start=1):
            self.layers.append(Squeeze())
            shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)  # (4C', H'/2, W'/2)
            for _ in range(config.channel_steps):
                self._add_step("channel", shape, config.hidden_channels[level])
            self.layers.append(Split())
            shape = (shape[0] // 2, shape[1], shape[2])  # half the channels go to the latent
            self.latent_shapes.append(shape)
            for _ in range(checker):
                self._add_step("checkerboard", shape, config.hidden_channels[level])
        self.latent_shapes.append(shape)
        if config.prior != "standard":
            # Created last, so the flow steps draw the same initial weights as under the standard prior. Per
            # element std 0.1: two classes start about 0.01 * D nats apart (41 nats at 64x64), while the offset
            # costs each class only 0.005 nats per element against the N(0, I) the flow is initialised for.
            self.class_means = nn.ParameterList(
                nn.Parameter(0.1 * torch.randn(config.num_labels, *s)) for s in self.latent_shapes
            )
        if config.prior == "class_diagonal":  # starts at sigma_y = 1, the scale the flow is initialised for
            self.class_log_scales = nn.ParameterList(
                nn.Parameter(torch.zeros(config.num_labels, *s)) for s in self.latent_shapes
            )

    def _add_step(self, kind: str, shape: tuple[int, int, int], hidden: int) -> None:
        """Append a flow step with a ``kind`` mask, flipped on every other use of that kind."""
        cfg = self.config
        mask = make_mask(kind, shape, self.app_mask)
        if self._mask_uses[kind] % 2:
            mask = 1 - mask
        self._mask_uses[kind] += 1
        nets = [
            make_coupling_net(
                cfg.coupling,
                in_channels=shape[0],
                num_classes=cfg.num_labels if cfg.conditional_couplings else 1,
                hidden=hidden,
                size=shape[1:],
                embed_dim=cfg.embed_dim,
                num_blocks=cfg.num_blocks,
                dropout=cfg.dropout,
            )
            for _ in range(2)
        ]
        coupling = AffineCoupling(mask, nets[0], nets[1], cfg.log_scale_bound)
        self.layers.append(FlowStep(shape[0], coupling))

    # ----------------------------------------------------------------------------- internals

    def _check(self, x: Tensor, y: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            expected = ", ".join(map(str, self.config.image_shape))
            raise ConfigError(
                f"x must have shape (B, *image_shape) = (B, {expected}), got {tuple(x.shape)}"
            )
        if y.shape != x.shape[:1]:
            raise ConfigError(f"y must have shape (B,) = ({x.shape[0]},), got {tuple(y.shape)}")

    def _coupling_labels(self, y: Tensor | Guided) -> Tensor | Guided:
        """The labels the coupling networks see: ``y``, or label 0 (their only one) when unconditional."""
        return y if self.config.conditional_couplings else torch.zeros_like(y)

    def guided(self, y: Tensor, guidance: float) -> Tensor | Guided:
        """Labels ``y`` under classifier-free guidance of weight ``guidance`` (1: ``y`` itself, no guidance).

        Raises:
            ConfigError: For a guidance other than 1 when the model was trained without a null label.
        """
        if guidance == 1:
            return y
        if not self.config.label_dropout:
            raise ConfigError(f"guidance {guidance:g} needs a model trained with label dropout (model.label_dropout "
                              f"> 0, e.g. --set model.label_dropout=0.1); this model has none: use guidance 1")
        return Guided(y, self.config.num_classes, float(guidance))

    def training_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The labels a training step uses: ``y`` with the share ``label_dropout`` replaced by the null label
        (classifier-free guidance, Ho & Salimans 2022, arXiv:2207.12598)."""
        if not self.config.label_dropout:
            return y
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.config.label_dropout
        return torch.where(drop, self.config.num_classes, y)

    def _flow(
        self, h: Tensor, y: Tensor, elementwise: bool = False
    ) -> tuple[list[Tensor], Tensor, list[Tensor | None]]:
        """Run the flow on preprocessed ``h``: latents, summed log-det and per-layer maps."""
        y = self._coupling_labels(y)
        zs: list[Tensor] = []
        maps: list[Tensor | None] = []
        logdet = h.new_zeros(h.shape[0])
        for layer in self.layers:
            if isinstance(layer, Split):
                h, z = layer(h)
                zs.append(z)
                maps.append(None)
            else:
                h, ld = layer(h, y, elementwise)
                maps.append(ld)
                logdet = logdet + (ld.sum(dim=(1, 2, 3)) if elementwise else ld)
        zs.append(h)
        return zs, logdet, maps

    # ---------------------------------------------------------------------------- public API

    def encode(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Map data to latents.

        Arguments:
            x: Images ``(B, C, H, W)`` in ``[0, 1]``.
            y: Labels ``(B,)`` (LongTensor); unconditional couplings ignore them.

        Returns:
            ``(zs, logdet)``: the latent parts from the first split to the final latent (shapes
            ``latent_shapes``), and ``log|det dz/dx|`` ``(B,)`` including the ``[0,1] -> [-1,1]``
            map.
        """
        self._check(x, y)
        zs, logdet, _ = self._flow(2 * x - 1, y)
        return zs, logdet + self.num_dims * math.log(2)

    def decode(self, zs: list[Tensor], y: Tensor) -> Tensor:
        """Map latents (as from :meth:`encode`) back to data space ``[0, 1]`` (not clamped)."""
        if len(zs) != len(self.latent_shapes) or any(
            tuple(z.shape[1:]) != s for z, s in zip(zs, self.latent_shapes, strict=True)
        ):
            raise ConfigError(
                f"zs must be {len(self.latent_shapes)} tensors of shapes (B, *s) for s in "
                f"{self.latent_shapes}, got {[tuple(z.shape) for z in zs]}"
            )
        h, k, y = zs[-1], len(zs) - 2, self._coupling_labels(y)
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                h = layer.inverse(h, zs[k])
                k -= 1
            else:
                h = layer.inverse(h, y)
        return (h + 1) / 2

    def prior(self, y: Tensor | Guided) -> tuple[list[Tensor], list[Tensor]]:
        """The prior's ``(means, log_scales)``: ``mu_y`` and ``log sigma_y`` of every latent part, ``(B,
        *latent_shape)`` each. Learned class means for a class prior (IB-INN, arXiv:2001.06448; FlowGMM,
        arXiv:1912.13025), else zeros; learned class log standard deviations for ``"class_diagonal"``, else
        zeros. Under guidance both are guided as the couplings are (:class:`Guided`)."""
        if isinstance(y, Guided):
            labelled, null = self.prior(y.labels), self.prior(torch.full_like(y.labels, y.null))
            return tuple([y.mix(c, u) for c, u in zip(*pair, strict=True)] for pair in zip(labelled, null, strict=True))
        zeros = [self.app_mask.new_zeros((*y.shape, *s)) for s in self.latent_shapes]
        means = zeros if self.config.prior == "standard" else [m[y] for m in self.class_means]
        log_scales = [s[y] for s in self.class_log_scales] if self.config.prior == "class_diagonal" else zeros
        return means, log_scales

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """Exact ``log p(x | y)`` in nats ``(B,)`` of continuous ``x`` in ``[0, 1]``."""
        zs, logdet = self.encode(x, y)
        return logdet + _gaussian_log_prob(zs, self.prior(y))

    forward = log_prob

    def class_log_probs(self, x: Tensor) -> Tensor:
        """``log p(x | k)`` for every class ``k``: ``(B, K)``.

        With unconditional couplings the latents and the log-det are the same for every class, so one flow
        pass and K Gaussian evaluations of its latents give every class (IB-INN, arXiv:2001.06448; FlowGMM,
        arXiv:1912.13025); otherwise the flow runs once over the K-fold repeated batch.
        """
        k, b = self.config.num_classes, x.shape[0]
        passes = k if self.config.conditional_couplings else 1
        labels = torch.arange(passes, device=x.device).repeat_interleave(b)  # (passes*B,) class-major
        zs, logdet = self.encode(x.repeat(passes, 1, 1, 1), labels)
        zs = [z.reshape(passes, b, *z.shape[1:]) for z in zs]  # (passes, B, C, H, W)
        prior = [[p[:, None] for p in part] for part in self.prior(torch.arange(k, device=x.device))]  # (K, 1, C, H, W)
        return (logdet.reshape(passes, b) + _gaussian_log_prob(zs, prior)).T  # (B, K)

    def training_loss(self, x: Tensor, y: Tensor, ce_weight: float = 0.0, log_prior: Tensor | None = None,
                      label_smoothing: float = 0.0) -> Tensor:
        """Per-sample objective ``(B,)``: bits/dim of dequantised ``x``, plus ``ce_weight`` times the
        cross-entropy of the Bayes posterior ``softmax(log p(x | k) + log_prior_k)`` (the hybrid objective; 0 = the
        paper's conditional maximum likelihood). ``log_prior`` ``(K,)``: None = uniform. With the training
        frequencies it is the joint model's own posterior, so the class likelihoods need not absorb the class
        imbalance (the logit-adjusted loss, Menon et al. 2021, arXiv:2007.07314). ``label_smoothing`` spreads that
        much of the target over all K classes (IB-INN, arXiv:2001.06448, uses 0.02). The hybrid term needs all K
        class densities (:meth:`class_log_probs`): one flow pass with unconditional couplings, else K times the cost."""
        if ce_weight == 0:
            return self.bits_per_dim(x, y)
        log_p = self.class_log_probs(x)  # (B, K)
        own = log_p.gather(1, y[:, None])[:, 0]
        bpd = -(own - self.num_dims * math.log(256)) / (self.num_dims * math.log(2))
        logits = log_p if log_prior is None else log_p + log_prior
        return bpd + ce_weight * nn.functional.cross_entropy(logits, y, reduction="none",
                                                             label_smoothing=label_smoothing)

    @staticmethod
    def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Uniform dequantisation of 8-bit data, see :func:`dequantize`."""
        return dequantize(x, generator)

    def bits_per_dim(self, x: Tensor, y: Tensor) -> Tensor:
        """Bits per dimension ``(B,)`` of 8-bit data, Glow's convention (``x`` dequantised)."""
        log_p = self.log_prob(x, y) - self.num_dims * math.log(256)
        return -log_p / (self.num_dims * math.log(2))

    def log_prob_map(self, x: Tensor, y: Tensor) -> Tensor:
        """Exact likelihood-attribution map ``H(x, y)`` (paper section 5).

        Walks from the last latent back to the input: per-element Gaussian log-densities of the
        latents under the class's prior ``N(mu_y, sigma_y^2)`` (concatenated at splits, unsqueezed at squeezes),
        plus each step's per-element log-det map (coupling log-scales; ActNorm and 1x1-conv log-dets
        spread over positions), plus ``log 2`` per element for the ``[0,1] -> [-1,1]`` map.

        Returns:
            ``(B, C, H, W)`` with ``H.sum(dim=(1, 2, 3)) == log_prob(x, y)``.
        """
        self._check(x, y)
        zs, _, maps = self._flow(2 * x - 1, y, elementwise=True)
        parts = [_gaussian_map(z, m, s) for z, m, s in zip(zs, *self.prior(y), strict=True)]
        k = len(zs) - 1
        heat = parts[k]
        for layer, layer_map in zip(reversed(self.layers), reversed(maps), strict=True):
            if isinstance(layer, Split):
                k -= 1
                heat = torch.cat([heat, parts[k]], dim=1)
            elif isinstance(layer, Squeeze):
                heat = unsqueeze2d(heat) + layer_map  # (B, C, H, W) from (B, 4C, H/2, W/2)
            else:
                heat = heat + layer_map
        return heat + math.log(2)

    attribution = log_prob_map

    def level_temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        """One temperature per latent part (:attr:`latent_shapes`, finest first): a number applies to all.

        Hierarchical latent models sample each latent group at its own temperature (VDVAE, Child 2021,
        arXiv 2011.10650): here the early splits hold the fine texture (a scanner's noise and ringing), the last
        parts the coarse anatomy. On the built-in scanner data, fine texture at 1.0-1.4 and coarse anatomy near
        its mode raises the real-trained classifier's recognition of the samples (0.57 -> 0.70 at 32 px), but not
        their use as a top-up (reports/usefulness.md, Round 14).

        Raises:
            ConfigError: If a sequence does not have one value per latent part.
        """
        if isinstance(temperature, (int, float)):
            return [float(temperature)] * len(self.latent_shapes)
        temperatures = [float(t) for t in temperature]
        if len(temperatures) != len(self.latent_shapes):
            raise ConfigError(
                f"per-level temperatures need one value per latent part of this model, finest first: "
                f"{len(self.latent_shapes)} for shapes {self.latent_shapes}, got {len(temperatures)} ({temperatures})"
            )
        return temperatures

    @torch.no_grad()
    def sample(
        self, y: Tensor, temperature: float | Sequence[float] = 1.0, generator: torch.Generator | None = None,
        guidance: float = 1.0,
    ) -> Tensor:
        """Draw ``x ~ p(x | y)``: decode ``z = mu_y + T sigma_y eps`` (without gradients; call ``eval()`` first).

        Arguments:
            y: Labels ``(B,)``.
            temperature: ``T``, the latents' spread about their prior means in units of the prior's standard
                deviation (1 = the model's distribution); or one ``T`` per latent part, finest first
                (:meth:`level_temperatures`).
            generator: Optional RNG on the model's device.
            guidance: Classifier-free guidance weight (:meth:`guided`; 1 = none).

        Returns:
            ``(B, C, H, W)`` in data space (nominally ``[0, 1]``, not clamped).
        """
        y = self.guided(y.to(self.app_mask.device), guidance)
        means, log_scales = self.prior(y)
        return self.decode([m + t * s.exp() * torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
                            for m, s, t in zip(means, log_scales, self.level_temperatures(temperature), strict=True)],
                           y)

    def sample_near(self, x: Tensor, c: Tensor, y: Tensor, strength: float,
                    temperature: float | Sequence[float] = 1.0, generator: torch.Generator | None = None,
                    guidance: float = 1.0) -> Tensor:
        """Samples of classes ``y`` anchored to real images ``x`` of classes ``c``.

        Each image is encoded under its own class, its latent standardised by that class's prior,
        ``u = (z - mu_c) / sigma_c``, mixed with fresh noise and decoded under ``y``:
        ``z' = mu_y + sigma_y (sqrt(1 - s^2) u + s T eps)``. With ``c = y``, ``s -> 0`` returns ``x`` and ``s = 1``
        is :meth:`sample` with the same generator; with ``c != y`` and small ``s``, the cINN's counterfactual
        translation of ``x`` into class ``y`` (Ardizzone et al. 2019, arXiv 1907.02392). ``guidance``: of the
        decoding under ``y`` (:meth:`guided`).

        Returns:
            ``(B, C, H, W)`` in data space (nominally ``[0, 1]``, not clamped).
        """
        y = self.guided(y.to(self.app_mask.device), guidance)
        zs, _ = self.encode(x, c)
        keep = math.sqrt(1 - strength ** 2)
        mixed = []
        for z, mu_c, log_sigma_c, mu_y, log_sigma_y, t in zip(zs, *self.prior(c), *self.prior(y),
                                                              self.level_temperatures(temperature), strict=True):
            eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            mixed.append(mu_y + log_sigma_y.exp() * (keep * (z - mu_c) * (-log_sigma_c).exp() + strength * t * eps))
        return self.decode(mixed, y)

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor) -> None:
        """Data-dependent ActNorm initialisation: run ``x`` through the flow, setting each ActNorm
        from the statistics of its input (Glow). Call once, before training, on a large batch."""
        self._check(x, y)
        h, y = 2 * x - 1, self._coupling_labels(y)
        for layer in self.layers:
            if isinstance(layer, Split):
                h, _ = layer(h)
                continue
            if isinstance(layer, FlowStep):
                layer.actnorm.initialize(h)
            h, _ = layer(h, y)

    def parameter_groups(self) -> dict[str, list[str]]:
        """The parameter groups a DP fine-tune may train alone (``privacy.trainable``), as parameter-name patterns.

        - ``"conditioning"``: the class conditioning: of every conditional coupling network, its label embedding
          (``embed``) and the layers the embedding feeds, FiLM (``film``, ``film1``, ``film2``) and the
          classification network's fusion MLP (``fuse``), about 8% of the parameters of the scanner recipes'
          model; and the class means and log standard deviations of a class prior (``class_means``,
          ``class_log_scales``). Unconditional couplings see one constant label, so their embedding and FiLM layers
          are not class conditioning and are left out. Training only the conditioning of a publicly pretrained
          generator follows DP-LDM (Liu et al., arXiv:2305.15759), which fine-tunes only the conditioning and
          attention modules under DP-SGD.
        - ``"top"``: the coarsest scale, the top of the multiscale hierarchy: every flow step after the last
          squeeze (its channel-wise steps and the checkerboard steps after its split), nearest the final latent
          and first in sampling, which sets the global layout and contrast. These are the widest networks: about
          half of the scanner model's parameters.
        """
        squeezes = [i for i, layer in enumerate(self.layers) if isinstance(layer, Squeeze)]
        start = squeezes[-1] if squeezes else -1  # no squeeze: every step is at the one scale
        top = [f"layers.{i}.*" for i, layer in enumerate(self.layers) if i > start and isinstance(layer, FlowStep)]
        couplings = ["*.embed.*", "*.film.*", "*.film1.*", "*.film2.*", "*.fuse.*"]
        means = {"standard": [], "class_gaussian": ["class_means.*"],
                 "class_diagonal": ["class_means.*", "class_log_scales.*"]}[self.config.prior]
        conditioning = (couplings if self.config.conditional_couplings else []) + means
        return {"conditioning": conditioning, "top": top}

    @property
    def initialized(self) -> bool:
        """Whether :meth:`initialize` has been run (the flags are saved with the model)."""
        return all(bool(m.actnorm.initialized) for m in self.layers if isinstance(m, FlowStep))
