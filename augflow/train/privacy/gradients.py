"""DP-SGD's gradients: exact per-sample gradients of the whole model, clipped and noised by Opacus' DPOptimizer.

``torch.func.vmap(torch.func.grad(...))`` of the model's per-sample objective through ``functional_call``, over the
*whole model*: exact also for log-determinant terms of ActNorm and the LU 1x1 convolution, which Opacus' hook and
functorch modes silently drop (see the design notes). They are assigned to ``p.grad_sample`` and clipped, summed and
noised by :class:`opacus.optimizers.DPOptimizer` (its "no_op" use: the optimizer only reads ``p.grad_sample``). A
Poisson batch is processed in microbatches of ``privacy.microbatch`` examples; each is a virtual step
(``signal_skip_step``) that clips and accumulates, and the Gaussian noise ``N(0, sigma^2 C^2)`` is added once per
Poisson batch, even an empty one.

References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016, arXiv:1607.00133 (DP-SGD).
    Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021, arXiv:2109.12298.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from augflow.train.privacy.accounting import PrivacyPlan


class PerSampleGradients:
    """Exact per-sample gradients of a per-sample objective: ``vmap(grad(loss of one example))`` over
    ``functional_call`` of the whole module, so every term (log-determinants included) is differentiated.

    Arguments:
        objective: A module whose ``forward(x, y)`` returns per-sample losses ``(B,)``.

    Call with ``(x, y)`` to get ``(grads, losses)``: a dict parameter name -> ``(B, *shape)`` and ``(B,)``.
    Randomness inside the objective (dropout) differs per example (``randomness="different"``).
    """

    def __init__(self, objective: nn.Module):
        self.objective = objective

        def loss(params: dict[str, Tensor], fixed: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return functional_call(objective, (params, fixed), (x[None], y[None]))[0]  # one example as a batch of 1

        self._fn = vmap(grad_and_value(loss), in_dims=(None, None, 0, 0), randomness="different")

    def __call__(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        params = {n: p.detach() for n, p in self.objective.named_parameters() if p.requires_grad}
        fixed = {n: p.detach() for n, p in self.objective.named_parameters() if not p.requires_grad}
        fixed.update(self.objective.named_buffers())
        return self._fn(params, fixed, x, y)


class PrivateStep:
    """One DP-SGD step (Abadi et al. 2016) on a Poisson batch, with Opacus' DPOptimizer clipping and noising.

    Arguments:
        objective: Per-sample objective module (``forward(x, y) -> (B,)``).
        optimizer: The wrapped optimizer (AdamW), over the objective's non-empty trainable parameters.
        plan: The calibrated :class:`PrivacyPlan`.
        microbatch: Examples per vmap call, and per virtual step.
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, plan: PrivacyPlan, microbatch: int):
        self.grads = PerSampleGradients(objective)
        self.named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad and p.numel() > 0]
        self.microbatch = microbatch
        self.max_grad_norm = plan.max_grad_norm
        # loss_reduction="mean" divides the noisy sum by the *expected* batch size, as Poisson sampling requires.
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size,
                                     loss_reduction="mean")

    def step(self, x: Tensor, y: Tensor, noise_seed: int) -> dict[str, float | None]:
        """Clip, sum, noise and apply the gradients of a batch ``x, y`` (any size, 0 included).

        Returns:
            ``{"loss", "batch", "grad_norm", "clipped"}``: the mean per-sample loss (None for an empty batch), the
            batch size, the median per-sample gradient norm before clipping and the fraction clipped.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        opt.generator = torch.Generator(x.device).manual_seed(noise_seed)
        starts = list(range(0, len(x), self.microbatch)) or [0]
        losses, norms = [], []
        for i, start in enumerate(starts):
            xb, yb = x[start:start + self.microbatch], y[start:start + self.microbatch]
            if len(xb):
                grads, loss = self.grads(xb, yb)
            else:  # an empty Poisson batch still takes a (noise-only) step: the analysis counts every step
                grads, loss = {n: p.new_zeros((0, *p.shape)) for n, p in self.named}, x.new_zeros(0)
            squares = x.new_zeros(len(xb))
            for name, p in self.named:
                p.grad_sample = grads[name]
                squares = squares + grads[name].reshape(len(xb), -1).pow(2).sum(1)
            norms.append(squares.sqrt())
            losses.append(loss.detach())
            last = i == len(starts) - 1
            if not last:
                opt.signal_skip_step(True)  # a virtual step: clip and accumulate only
            opt.step()
            if not last:
                opt.zero_grad(set_to_none=True)  # frees this microbatch's per-sample gradients, keeps the sums
        norm, loss = torch.cat(norms), torch.cat(losses)
        return {"loss": loss.mean().item() if len(loss) else None, "batch": len(loss),
                "grad_norm": norm.median().item() if len(norm) else None,
                "clipped": (norm > self.max_grad_norm).float().mean().item() if len(norm) else None}
