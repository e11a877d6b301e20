"""Invertible building blocks of MAGIC-Flow: ActNorm, LU 1x1 convolution, squeeze and split.

All bijections share the :class:`InvertibleLayer` contract. ActNorm and the invertible 1x1
convolution follow Glow; the flow step (ActNorm -> 1x1 conv -> conditional coupling) follows
MAGIC-Flow.

References:
    Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018,
    arXiv:1807.03039.
    Caldera, Bottacini & Cavinato, "MAGIC-Flow", 2025, arXiv:2510.22070.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from augflow.precision import full_precision


class InvertibleLayer(nn.Module):
    """Base class of every bijection in augflow's flows; the one contract they all follow.

    * ``forward(x, y) -> (z, logdet)``: ``z`` is the transformed tensor and ``logdet`` of shape
      ``(B,)`` is ``log|det dz/dx|`` of each sample. ``y`` is the class label, a LongTensor
      ``(B,)``; layers that are not conditional ignore it.
    * ``forward(x, y, elementwise=True) -> (z, logdet_map)``: the same ``z``, and a map with the
      shape of the input ``x`` whose sum over the non-batch dimensions equals ``logdet``. Couplings
      give the per-element log-scales; per-channel layers spread their log-det evenly over the
      positions they act on. Summed through the whole flow these maps give exact
      likelihood-attribution maps.
    * ``inverse(z, y) -> x`` inverts ``forward``; ``inverse(z, y, return_logdet=True)`` also returns
      ``log|det dx/dz|``, which is minus the forward log-det at the matching ``x``.

    ``forward`` contains no data-dependent Python control flow, so a model built from these layers
    works under ``torch.func.vmap(torch.func.grad(...))`` for per-sample (DP) gradients. Subclasses
    implement ``forward`` and ``_inverse(z, y) -> (x, logdet)``.
    """

    def forward(
        self, x: Tensor, y: Tensor | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(
        self, z: Tensor, y: Tensor | None = None, return_logdet: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Invert ``forward``.

        Arguments:
            z: Output of ``forward``.
            y: Class labels ``(B,)``, as given to ``forward``.
            return_logdet: Also return ``log|det dx/dz|`` of shape ``(B,)``.

        Returns:
            ``x``, or ``(x, logdet)`` when ``return_logdet`` is true.
        """
        x, logdet = self._inverse(z, y)
        return (x, logdet) if return_logdet else x


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """Broadcast a scalar log-det to shape ``(B,)``."""
    return value.expand(x.shape[0])


class ActNorm(InvertibleLayer):
    """Per-channel affine map ``z = (x + loc) * exp(log_scale)`` (Glow, section 3.1).

    The layer is the identity at construction. Data-dependent initialisation is an explicit call to
    :meth:`initialize` (or ``MagicFlow.initialize``), never a lazy branch in ``forward``, so that
    ``forward`` stays a pure function of parameters and input (required by ``torch.func``).
    The ``initialized`` buffer records whether that call happened and is saved with the model.

    Arguments:
        channels: Number of channels ``C``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor, eps: float = 1e-6) -> None:
        """Set ``loc`` and ``log_scale`` so the output of ``x`` has zero mean and unit variance.

        Arguments:
            x: A batch ``(B, C, H, W)`` of this layer's inputs.
            eps: Added to the standard deviation to avoid division by zero.
        """
        mean = x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + eps))
        self.initialized.fill_(True)

    def forward(
        self, x: Tensor, y: Tensor | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        z = (x + self.loc) * torch.exp(self.log_scale)
        if elementwise:
            return z, self.log_scale.expand_as(x)
        return z, _per_sample(x.shape[2] * x.shape[3] * self.log_scale.sum(), x)

    def _inverse(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(-self.log_scale) - self.loc
        return x, _per_sample(-z.shape[2] * z.shape[3] * self.log_scale.sum(), z)


class InvertibleConv1x1(InvertibleLayer):
    """Invertible 1x1 convolution with an LU-parameterised weight (Glow, section 3.2).

    ``W = P @ (I + L) @ (U + diag(sign * exp(log_s)))`` with a fixed permutation ``P``, strictly
    lower ``L`` and strictly upper ``U``; ``log|det|`` per sample is ``H * W * sum(log_s)``.
    Only the free entries of ``L`` and ``U`` are parameters, so every parameter receives gradient.
    Initialised from a random orthogonal matrix drawn from torch's global RNG.

    Arguments:
        channels: Number of channels ``C``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        perm, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        lower_idx = torch.tril_indices(channels, channels, offset=-1)  # (2, C(C-1)/2)
        upper_idx = torch.triu_indices(channels, channels, offset=1)
        self.register_buffer("perm", perm)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_idx", lower_idx, persistent=False)
        self.register_buffer("upper_idx", upper_idx, persistent=False)
        self.lower = nn.Parameter(lower[lower_idx[0], lower_idx[1]])
        self.upper = nn.Parameter(upper[upper_idx[0], upper_idx[1]])
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> Tensor:
        """The ``(C, C)`` weight matrix assembled from its LU factors."""
        channels = self.log_s.shape[0]
        eye = torch.eye(channels, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = eye.index_put((self.lower_idx[0], self.lower_idx[1]), self.lower)
        diag = torch.diag(self.sign_s * torch.exp(self.log_s))
        upper = diag.index_put((self.upper_idx[0], self.upper_idx[1]), self.upper)
        return self.perm @ lower @ upper

    def forward(
        self, x: Tensor, y: Tensor | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        with full_precision(x.device.type):  # a bijection: never in bf16, even under amp
            z = _mix_channels(self.weight(), x)
        if elementwise:
            # log|det W| / C per element: summed over C*H*W elements gives H*W*log|det W|.
            per_element = self.log_s.sum() / x.shape[1]
            return z, per_element.expand_as(x)
        return z, _per_sample(x.shape[2] * x.shape[3] * self.log_s.sum(), x)

    def _inverse(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        with full_precision(z.device.type):
            x = _mix_channels(torch.linalg.inv(self.weight()), z)
        return x, _per_sample(-z.shape[2] * z.shape[3] * self.log_s.sum(), z)


def _mix_channels(weight: Tensor, x: Tensor) -> Tensor:
    """``weight @ x`` at every pixel: a 1x1 convolution, written as an einsum because oneDNN's 1x1 convolution is
    slow at the 1-4 channels of a flow's first levels (forward + backward at 64 px, batch 32, one thread: 15 ms as a
    convolution, 0.3 ms as an einsum; a float32 training step of the ``scanner`` recipe is about 4% faster)."""
    return torch.einsum("oc,bchw->bohw", weight, x)


def squeeze2d(x: Tensor) -> Tensor:
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; channel ``4c + 2i + j`` holds the
    pixel at offset ``(i, j)`` of each 2x2 block of channel ``c``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
    x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
    return x.reshape(b, 4 * c, h // 2, w // 2)  # (B, 4C, H/2, W/2)


def unsqueeze2d(z: Tensor) -> Tensor:
    """Inverse of :func:`squeeze2d`: ``(B, 4C, H/2, W/2) -> (B, C, H, W)``."""
    b, c4, h2, w2 = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h2, w2)  # (B, C, 2, 2, H/2, W/2)
    z = z.permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
    return z.reshape(b, c4 // 4, 2 * h2, 2 * w2)  # (B, C, H, W)


class Squeeze(InvertibleLayer):
    """Volume-preserving reshape ``(C, H, W) -> (4C, H/2, W/2)`` (RealNVP/Glow multiscale)."""

    def forward(
        self, x: Tensor, y: Tensor | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        z = squeeze2d(x)
        if elementwise:
            return z, torch.zeros_like(x)
        return z, x.new_zeros(x.shape[0])

    def _inverse(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        return unsqueeze2d(z), z.new_zeros(z.shape[0])


class Split(nn.Module):
    """Factor out the second half of the channels as a standard-normal latent (Glow multiscale).

    Not an :class:`InvertibleLayer`: it has two outputs and no log-det (it is a permutation). The
    factored-out part is scored by the model's factorised standard-normal prior.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(kept, factored)``, each ``(B, C/2, H, W)``."""
        half = x.shape[1] // 2
        return x[:, :half], x[:, half:]

    def inverse(self, kept: Tensor, factored: Tensor) -> Tensor:
        """Concatenate ``kept`` and ``factored`` back to ``(B, C, H, W)``."""
        return torch.cat([kept, factored], dim=1)


class FlowStep(InvertibleLayer):
    """One MAGIC-Flow step: ActNorm -> invertible 1x1 convolution -> conditional affine coupling.

    Arguments:
        channels: Number of channels ``C`` of the input.
        coupling: The conditional coupling layer (an :class:`InvertibleLayer`).
    """

    def __init__(self, channels: int, coupling: InvertibleLayer) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.conv = InvertibleConv1x1(channels)
        self.coupling = coupling

    def forward(
        self, x: Tensor, y: Tensor | None = None, elementwise: bool = False
    ) -> tuple[Tensor, Tensor]:
        h, ld_norm = self.actnorm(x, y, elementwise)
        h, ld_conv = self.conv(h, y, elementwise)
        z, ld_coupling = self.coupling(h, y, elementwise)
        return z, ld_norm + ld_conv + ld_coupling

    def _inverse(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        h, ld_coupling = self.coupling.inverse(z, y, return_logdet=True)
        h, ld_conv = self.conv.inverse(h, y, return_logdet=True)
        x, ld_norm = self.actnorm.inverse(h, y, return_logdet=True)
        return x, ld_coupling + ld_conv + ld_norm
