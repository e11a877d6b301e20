"""What a trained MAGIC-Flow's latents know about the class: probes fitted on the training images' latents.

A diagnosis for the likelihood classifier (reports/classification.md). With unconditional couplings the latent
``z = f(x)`` is the same whatever the class, so classifiers fitted on it after training tell which prior could
use it:

- the flow's own Bayes classifier (its trained class prior, argmax of ``log p(x | k)``, uniform class prior);
- a logistic regression on the flattened latents (scikit-learn, balanced class weights): what a linear read-out
  gets, which a class-mean prior (``class_gaussian``) is;
- a Gaussian naive Bayes (a mean and a variance per class and latent element, uniform class prior), in total and
  per latent part: what a prior of class means and scales (``class_diagonal``) could get.

    python benchmarks/latent_probe.py --model work/cv-cg5/fold-0/flow/model.pt \\
        --train work/cv-cg5/fold-0/train.h5 --test work/cv-cg5/fold-0/test.h5
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.naive_bayes import GaussianNB

from augflow.data.store import read_images, read_info
from augflow.models import load_model


@torch.no_grad()
def latents(flow, path: str, batch: int = 64) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The latent parts ``(N, C, H, W)`` of every image of a file, its labels, and the flow's ``log p(x | k)``."""
    x, labels = torch.from_numpy(read_images(path)), read_info(path).labels
    parts, scores = [], []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        zs, _ = flow.encode(xb, torch.zeros(len(xb), dtype=torch.long))
        parts.append([z.numpy() for z in zs])
        scores.append(flow.class_log_probs(xb).numpy())
    return [np.concatenate(p) for p in zip(*parts, strict=True)], labels, np.concatenate(scores)


def flat(parts: list[np.ndarray]) -> np.ndarray:
    """The latent parts of each image as one row."""
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flow = load_model(args.model).eval()
    if flow.config.conditional_couplings:
        raise SystemExit(f"{args.model}: its couplings see the label, so its latent depends on the class; the probe "
                         "needs a model trained with model.conditional_couplings = false")
    z_train, y_train, _ = latents(flow, args.train)
    z_test, y_test, scores = latents(flow, args.test)
    uniform = np.full(flow.config.num_classes, 1 / flow.config.num_classes)
    print(f"flow's own classifier (uniform prior): {balanced_accuracy_score(y_test, scores.argmax(1)):.3f}")
    for c in (0.01, 0.1, 1.0):
        linear = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(flat(z_train), y_train)
        print(f"logistic regression, C = {c:g}: {balanced_accuracy_score(y_test, linear.predict(flat(z_test))):.3f}")
    bayes = GaussianNB(priors=uniform).fit(flat(z_train), y_train)
    print(f"Gaussian naive Bayes, all latents: {balanced_accuracy_score(y_test, bayes.predict(flat(z_test))):.3f}")
    for j, (train_part, test_part) in enumerate(zip(z_train, z_test, strict=True)):
        part = GaussianNB(priors=uniform).fit(train_part.reshape(len(train_part), -1), y_train)
        accuracy = balanced_accuracy_score(y_test, part.predict(test_part.reshape(len(test_part), -1)))
        print(f"Gaussian naive Bayes, latent part {j} {tuple(train_part.shape[1:])}: {accuracy:.3f}")


if __name__ == "__main__":
    main()
