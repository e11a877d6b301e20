"""Where MedSymmFlow's read-out decides: the one-step mask prediction per time, and read-outs on shifted time grids.

For labelled images the joint state is put on the symmetric paths at time ``t`` (true mask, fresh noise) and the
network's one-step prediction of the clean mask, ``m_t - t v_hat_m`` (exact for the straight paths), is read by the
nearest palette colour. At t = 1 the mask is pure noise, so this is the network's classification of the image
alone; at smaller ``t`` it also reads the noisy true mask. Then the full read-out (``[x, noise]`` integrated from
t = 1 to 0 by Euler) on time grids shifted by ``a`` (``t = a u / (1 + (a - 1) u)``; 1 = uniform; the model's own
read-out uses its training shift, ``model.time_shift``) with the given numbers of steps.

    python benchmarks/symmflow_probe.py --model runs/NAME --data data/val.h5

Prints balanced accuracies (scikit-learn). Used in reports/classification-notes.md (``model.time_shift``).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from sklearn.metrics import balanced_accuracy_score

from augflow.data.store import read_images, read_info
from augflow.models import load_model
from augflow.symmflow.model import interpolate
from augflow.symmflow.palette import MASK_CHANNELS, colour_distances


def nearest_colour(model, mask: torch.Tensor) -> torch.Tensor:
    return colour_distances(mask, model.colours, model.region).argmin(1)


@torch.no_grad()
def one_step_predictions(model, x: torch.Tensor, y: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    """Nearest colour of the one-step clean-mask prediction at time ``t`` of images ``x`` with true labels ``y``."""
    generator = torch.Generator().manual_seed(seed)
    z, m = model.to_flow(x), model.class_mask(y)
    times = torch.full((len(x),), t)
    z_t, m_t = interpolate(z, m, torch.randn(z.shape, generator=generator), torch.randn(m.shape, generator=generator),
                           times, model.config.sigma_min)
    v = model.velocity(torch.cat([z_t, m_t], dim=1), times)
    return nearest_colour(model, m_t - t * v[:, z.shape[1]:])


@torch.no_grad()
def readout_predictions(model, x: torch.Tensor, shift: float, seed: int, steps: int) -> torch.Tensor:
    """Nearest colour of the read-out integrated by ``steps`` Euler steps on a grid shifted by ``shift``."""
    generator = torch.Generator().manual_seed(seed)
    z = model.to_flow(x)
    state = torch.cat([z, torch.randn((len(x), MASK_CHANNELS, *z.shape[2:]), generator=generator)], dim=1)
    state = model.integrate(state, 1.0, 0.0, steps, solver="euler", shift=shift)
    return nearest_colour(model, state[:, z.shape[1]:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A symmflow run folder or model.pt.")
    parser.add_argument("--data", required=True, help="Labelled images (HDF5), e.g. the validation split.")
    parser.add_argument("--times", default="1,0.99,0.97,0.93,0.85,0.7")
    parser.add_argument("--grid-shifts", default="1,4,16")
    parser.add_argument("--grid-steps", default="", help="Euler steps of the read-outs (default: the model's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    if model.has_likelihood:
        raise SystemExit(f"{args.model} is a {model.family!r} model; this probe reads MedSymmFlow's masks")
    x = torch.as_tensor(read_images(args.data)).float()
    y = torch.as_tensor(read_info(args.data).labels).long()
    for t in [float(t) for t in args.times.split(",") if t]:
        bacc = balanced_accuracy_score(y, one_step_predictions(model, x, y, t, args.seed))
        print(f"one-step mask prediction at t = {t:g}: balanced accuracy {bacc:.3f}")
    steps = [int(n) for n in args.grid_steps.split(",") if n] or [model.config.steps]
    for shift, n in itertools.product(map(float, args.grid_shifts.split(",")), steps):
        bacc = balanced_accuracy_score(y, readout_predictions(model, x, shift, args.seed, n))
        print(f"read-out, {n} steps on a grid shifted by {shift:g}: balanced accuracy {bacc:.3f}")


if __name__ == "__main__":
    main()
