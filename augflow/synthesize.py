"""``augflow synthesize``: class-conditional samples of a trained model, streamed into the shared HDF5 schema.

Use it to top up under-represented classes (``--balance``) or to draw N images of one class. Samples are drawn
at the temperature stored with the model (MAGIC-Flow: a reduced one, Kingma & Dhariwal 2018, Glow,
arXiv 1807.03039), clipped to [0, 1]; non-finite samples are rejected, redrawn and counted in the provenance.
Batches are written as they are made, so memory stays flat in N, and the file appears under its name only when
complete.

A top-up balances the real file it will be combined with (:func:`topup_counts`): the whole training file of the
model (or ``--real FILE``), optionally capped at ``max_ratio`` synthetic images per real image of a class. A
selection (:class:`Selection`) keeps a sample only when a classifier assigns it to its intended class with
probability at least ``min_confidence``: the flow's own Bayes posterior, or a ResNet-18 trained on the real
training file. Filtering synthetic images by classifier confidence narrows the gap between synthetic and real
training data (GaFi, Lomurno et al. 2023, arXiv 2305.10118; He et al. 2023, arXiv 2210.07574). The ``realism``
selection asks instead whether a sample looks real: per class, a logistic regression in the domain encoder's
features separates the real training images of that class from a pilot batch of the model's samples, and a sample is
kept when its probability of being real is among the top ``keep_fraction`` of the pilot's (discriminator rejection
sampling, Azadi et al. 2019, arXiv 1810.06758, which also sets its threshold at a percentile of the discriminator's
scores; here a hard threshold in place of its acceptance probability): a downstream classifier that can tell a top-up
from real images learns "looks synthetic" as a feature of the classes it fills.

A model trained on images with Gaussian noise of standard deviation sigma added (``augment.noise_std``) learns the
density of the noisy images, and its samples carry that noise. ``denoise`` removes it with one score step,
``x + sigma^2 * grad_x log p(x | y)`` (Tweedie's formula; TarFlow, Zhai et al. 2024, arXiv 2412.06329), so the
released images keep the noise of their scanner and not the training augmentation's.

``near`` anchors each sample to a real image (the model's ``sample_near``). MAGIC-Flow encodes the real image under
its own class ``c``, mixes its standardised deviation from that class's prior with fresh noise and decodes it under
the class ``y`` to synthesize, ``z = mu_y + sigma_y (sqrt(1 - s^2) (z_real - mu_c) / sigma_c + s T eps)``;
MedSymmFlow starts its ODE from the real image's point on the path at ``t = 1 - s`` (SDEdit, Meng et al. 2022,
arXiv 2108.01073). With anchors of the same class (``c = y``), ``s -> 0`` returns the real image (oversampling),
``s = 1`` an ordinary sample; in between, images vary around real ones and keep what the model renders of their
scanner, as latent-space augmentation does (DeVries & Taylor 2017, arXiv 1702.05538, in a learned feature space;
here the flow's). With anchors of the other classes, the latent of an image of one scanner is decoded as another: a
counterfactual translation of a conditional invertible network (Ardizzone et al. 2019, arXiv 1907.02392, style
transfer with a cINN), which gives a rare class the anatomy of the frequent classes' subjects. Such images are
derived from real subjects: they are for in-house training, not a privacy-preserving release, and a DP model
refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta
from threadpoolctl import threadpool_limits
from torch import Tensor
from tqdm.auto import tqdm

from augflow.atomic import check_output
from augflow.data.store import DatasetWriter, read_images, read_info, sha256_file
from augflow.errors import ConfigError, DataError, PrivacyError
from augflow.models import ModelFamily, load_model
from augflow.precision import autocast, resolve_amp
from augflow.runs import check_classes, derive_seed, model_file, resolve_class, resolve_device, stored_amp
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


def topup_counts(model: str | Path, real: str | Path | None = None, target: int | None = None,
                 max_ratio: float | None = None) -> tuple[dict[str, int], dict]:
    """Synthetic images per class that balance the real file a top-up will be combined with.

    The real counts are those of ``real`` when given, else of the model's whole training file (``--data``, also
    the part ``train`` held out for validation), else (models trained before that was stored) of its training rows.
    Under DP they are the counts the model released (with Laplace noise unless declared public), of its training
    units.

    Arguments:
        model: Run folder or model file.
        real: The real file the top-up will be added to (same classes as the model).
        target: Per-class total to reach (default: the largest real class).
        max_ratio: At most this many synthetic images per real image of each class (None: no cap).

    Returns:
        ``(counts, record)``: synthetic images per class name, and what they were computed from (for the
        provenance).

    Raises:
        ConfigError: For a non-positive ``target`` or ``max_ratio``. DataError: If ``real``'s classes differ.
    """
    _, meta = load_model(model, with_meta=True)
    names = meta["class_names"]
    if real is not None:
        info = read_info(real)
        check_classes(info.class_names, names, f"--real {real}")
        real_counts, source = info.class_counts(), f"--real {Path(real).name} (sha256 {sha256_file(real)})"
    elif meta.get("data_class_counts") is not None:
        real_counts = dict(zip(names, meta["data_class_counts"], strict=True))
        ledger = Ledger.from_dict(meta.get("privacy"))
        source = "the DP-released class counts of the model's training units" if ledger and ledger.dp else \
            "the model's whole training file (--data)"
    else:
        real_counts, source = dict(zip(names, meta["class_counts"], strict=True)), "the model's training rows"
    if max_ratio is not None and not max_ratio > 0:
        raise ConfigError(f"--max-ratio must be > 0 (synthetic images per real image of a class), but is: "
                          f"{max_ratio}")
    counts = balance_counts(real_counts, target)
    if max_ratio is not None:
        counts = {name: min(n, math.floor(max_ratio * real_counts[name])) for name, n in counts.items()}
    return counts, {"counted_from": source, "real_counts": real_counts, "target": target, "max_ratio": max_ratio}


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


@torch.no_grad()  # not inference_mode: --denoise differentiates through the model
def synthesize(
    model: str | Path,
    out: str | Path,
    counts: dict[str, int],
    temperature: float | Sequence[float] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    amp: bool | None = None,
    selection: Selection | None = None,
    counts_source: dict | None = None,
    denoise: bool = False,
    near: Anchors | None = None,
    background_from: str | Path | None = None,
    overwrite: bool = False,
    guidance: float = 1.0,
) -> SynthesisResult:
    """Sample ``counts[class] `` images per class from a trained model into a synthetic dataset file.

    Arguments:
        model: A run folder or model file.
        out: Output .h5 file.
        counts: Images per class name (case-insensitive); classes not named get none.
        temperature: Scale of the latent standard deviation (default: the one stored with the model); for MAGIC-Flow
            also one value per latent part, finest first (:meth:`MagicFlow.level_temperatures`).
        seed: Seed of the latent draws (same seed, same file contents).
        batch_size: Images per sampling batch.
        device: "auto", "cpu" or "cuda[:N]".
        progress: Show a progress bar.
        amp: Run the networks in bf16 (:mod:`augflow.precision`); default: as the model was trained.
        selection: Keep only samples a classifier assigns to their class (default: keep every sample).
        counts_source: How ``counts`` were computed (:func:`topup_counts`), recorded in the provenance.
        denoise: Remove the model's training input noise from each sample with one score step (needs an exact
            likelihood and a model trained with ``augment.noise_std > 0``).
        near: Derive each sample from a real image (:class:`Anchors`; not under DP).
        background_from: A real file whose exact-zero background the samples get (:func:`zero_background`): values
            below its threshold are set to 0.
        overwrite: Replace ``out`` if it exists (never the model or ``selection.real``).
        guidance: Classifier-free guidance weight (1 = none; :meth:`MagicFlow.guided`: a MAGIC-Flow model trained
            with ``model.label_dropout > 0``).

    Raises:
        ConfigError: For invalid arguments, an existing ``out`` without ``overwrite``, ``out`` naming an input, or a
            selection that accepts too few samples of a class.
    """
    path = model_file(model)
    check_output(out, overwrite, [path, selection.real if selection else None, near.real if near else None])
    flow, meta = load_model(path, map_location="cpu", with_meta=True)
    class_names = meta["class_names"]
    per_class = [0] * len(class_names)
    for name, n in counts.items():
        if n < 0:
            raise ConfigError(f"--n must be non-negative, but is: {n}")
        per_class[resolve_class(name, class_names)] += int(n)
    if sum(per_class) == 0:
        raise ConfigError("nothing to synthesize: the requested counts are all 0 (a top-up: every class already "
                          "has the target count)")
    temperature = _checked_temperature(flow, meta.get("temperature", flow.default_temperature)
                                       if temperature is None else temperature)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, but is: {batch_size}")
    _check_guidance(flow, guidance)
    sigma = _training_noise(flow, meta, path) if denoise else 0.0
    dev = resolve_device(device)
    amp = resolve_amp(stored_amp(meta) if amp is None else amp, dev)
    flow = flow.to(dev).eval()
    selector = _Selector(selection or Selection(), flow, meta, path, dev, progress)
    anchors = near.load(flow, meta, path, per_class) if near else None
    if background_from is not None:
        _refuse_under_dp(meta, f"--zero-background sets a threshold read off the pixels of {background_from}",
                        "--zero-background")
    background = zero_background(background_from) if background_from is not None else None

    rejected = 0
    provenance = {
        "generator": "augflow synthesize", "model": str(path.resolve()), "model_sha256": sha256_file(path),
        "recipe": meta.get("recipe"), "training_fingerprint": meta.get("fingerprint"),
        "temperature": temperature, "guidance": guidance, "denoise_sigma": sigma, "seed": seed, "amp": amp,
        "counts": dict(zip(class_names, per_class, strict=True)),
        "augflow_version": __version__, "privacy": _ledger(meta.get("privacy")),
        "counts_source": counts_source, "selection": selector.describe(),
        "near": near.describe() if near else None, "background": background,
    }
    # The bar starts once the output can be written; an error mid-way ends its line before the message.
    with (DatasetWriter(out, flow.config.image_shape, class_names, "synthetic", provenance) as writer,
          tqdm(total=sum(per_class), desc="synthesize", unit="img", disable=not progress, dynamic_ncols=True) as bar):
        for k, n in enumerate(per_class):
            if n == 0:
                continue
            generator = torch.Generator(dev).manual_seed(derive_seed(seed, k))
            order = anchors.order(k, seed) if anchors else None
            made = drawn = 0

            def draw(b: int = batch_size, k: int = k, order: Tensor | None = order, generator=generator) -> Tensor:
                """The next ``b`` samples of class ``k``, in [0, 1], before selection (class bound at definition)."""
                nonlocal drawn, rejected
                with autocast(dev, amp):
                    start = anchors.batch(order, drawn, b, dev) if anchors else None
                    x = _finite_batch(flow, k, b, temperature, generator, dev, start, near.strength if near else 1.0,
                                     guidance)
                    images = _denoised(flow, x.images, k, sigma) if sigma else x.images
                    images = images.clamp(0, 1)
                    if background and background["threshold"]:
                        images = torch.where(images < background["threshold"], 0.0, images)
                rejected += x.rejected
                drawn += b
                return images

            selector.prepare(k, draw, class_names[k])
            while made < n:
                selector.check_budget(k, n, made, class_names[k])
                # With a selection, draw whole batches: most of a batch may be rejected.
                images = draw(min(batch_size, n - made) if selector.method == "none" else batch_size)
                with autocast(dev, amp):
                    images = selector.keep(images, k)[: n - made]
                kept = len(images)
                if kept:
                    ids = [f"synthetic-{class_names[k]}-{made + i:06d}" for i in range(kept)]
                    writer.append(images.float().cpu().numpy(), [k] * kept, ids, [0] * kept)
                made += kept
                bar.update(kept)
        writer.provenance["rejected_nonfinite"] = rejected
        writer.provenance["selection"] = selector.describe(class_names)
    return SynthesisResult(Path(out), dict(zip(class_names, per_class, strict=True)), rejected)


@dataclass(frozen=True)
class Selection:
    """Which samples a synthesis keeps.

    Attributes:
        method: ``"none"`` (every sample), ``"posterior"`` (the model's own Bayes posterior ``p(y | x)`` with its
            training-class prior and the calibration temperature stored beside it, if any and the model is not DP;
            needs an exact likelihood), ``"classifier"`` (a ResNet-18 trained on ``real``, the real training file:
            the audit's domain encoder, cached by the file's SHA-256) or ``"realism"`` (per class, a
            real-vs-synthetic logistic regression in that encoder's features). A DP model allows these two only
            with a ``real`` file declared ``public``.
        min_confidence: Keep a sample of class ``k`` when its probability of ``k`` is at least this, in (0, 1).
        real: The real training file of the ``"classifier"`` and the ``"realism"`` selections.
        public: The user's declaration that ``real`` holds public images only, none of the model's private data.
            Selecting a DP model's samples with a classifier of public data is post-processing: it costs no
            privacy (post-processing, Dwork & Roth 2014, Prop. 2.1).
        keep_fraction: ``"realism"``: keep a sample when its probability of being real is at least the
            ``1 - keep_fraction`` quantile of the pilot batch's, in (0, 1]: about that fraction of the draws is kept.
        max_draws: At most this many samples are drawn per requested sample of a class before giving up (earlier
            when the acceptance so far shows that the rest cannot be reached: ``_Selector.check_budget``).
        cache_dir: Where the classifier is cached (default: the audit's encoder cache).
    """

    method: str = "none"
    min_confidence: float = 0.5
    real: str | Path | None = None
    keep_fraction: float = 0.25
    public: bool = False
    max_draws: int = 20
    cache_dir: str | Path | None = None

    def validate(self) -> Selection:
        """Check the fields; return ``self``.

        Raises:
            ConfigError: Naming the option, the allowed values and the value received.
        """
        if self.method not in SELECTIONS:
            raise ConfigError(f"--select must be one of {', '.join(SELECTIONS)}, but is: {self.method!r}")
        if self.method == "realism" and not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"--keep-fraction must be in (0, 1], but is: {self.keep_fraction}")
        if self.method not in ("none", "realism") and not 0 < self.min_confidence < 1:
            raise ConfigError(f"--min-confidence must be in (0, 1), but is: {self.min_confidence}")
        if self.method in ("classifier", "realism") and self.real is None:
            raise ConfigError(f"--select {self.method} needs --real FILE: the real training file its classifier is "
                              "trained on")
        if self.public and self.method not in ("classifier", "realism"):
            raise ConfigError(f"--select-public goes with --select classifier or realism (the selections that train "
                              f"on a file), not --select {self.method}")
        if self.max_draws < 1:
            raise ConfigError(f"max_draws must be >= 1, but is: {self.max_draws}")
        return self


SELECTIONS = ("none", "posterior", "classifier", "realism")
PILOT = 256  # samples per class that the realism discriminator learns the synthetic side from (at least)


class _Selector:
    """Applies a :class:`Selection` and counts what it drew and kept, per class."""

    def __init__(self, selection: Selection, flow: ModelFamily, meta: dict, model_path: Path, device: torch.device,
                 progress: bool):
        self.selection, self.method = selection.validate(), selection.method
        self.drawn: dict[int, int] = {}
        self.kept: dict[int, int] = {}
        self.details: dict = {}
        if self.method == "posterior":
            if not flow.has_likelihood:
                raise ConfigError(f"--select posterior needs a model with an exact likelihood (MAGIC-Flow); "
                                  f"{model_path} is a {flow.family!r} model: use --select classifier --real FILE")
            from augflow.classify.calibration import stored_calibration
            from augflow.classify.likelihood import class_log_likelihoods, log_prior
            from augflow.classify.metrics import Calibration

            calibration = stored_calibration(model_path, "train", meta["class_names"])
            source = "none" if calibration is None else "calibration.json"
            if calibration is not None and _is_dp(meta):  # fitted on real images, outside the ledger
                calibration, source = None, "ignored: the model is DP and the calibration was fitted on real images"
            calibration = calibration or Calibration()
            temperature = calibration.temperature  # the calibrated Bayes posterior (offsets set decisions only)
            log_pi = torch.tensor(log_prior(meta["class_counts"]), dtype=torch.float32, device=device)
            k = len(meta["class_names"])
            radius = calibration.shift_radius
            self._probs = lambda x: torch.softmax((class_log_likelihoods(flow, x, k, radius).float() + log_pi)
                                                  / temperature, dim=1)
            self.details = {"prior": "train", "calibration_temperature": temperature, "calibration": source}
        elif self.method in ("classifier", "realism"):
            from augflow.audit.baseline import penultimate
            from augflow.audit.features import EncoderRecipe, domain_encoder_path, load_encoder

            sha = sha256_file(selection.real)
            if not selection.public:
                _refuse_under_dp(meta, f"--select {self.method} keeps the samples that a classifier trained on "
                                f"{selection.real} accepts", f"--select {self.method} (or select with a classifier "
                                "of public data: --select-public FILE)")
            elif _is_dp(meta):  # without DP nothing needs the declaration: the selection is allowed anyway
                _check_public(selection.real, sha, meta)
            option = "--select-public" if selection.public else "--real"
            info = read_info(selection.real)
            check_classes(info.class_names, meta["class_names"], f"{option} {selection.real}")
            if info.image_shape != tuple(flow.config.image_shape):
                raise DataError(f"{option} {selection.real}: image shape {info.image_shape} differs from the model's "
                                f"{tuple(flow.config.image_shape)}")
            with torch.enable_grad():  # trains on the first call (minutes), then cached
                encoder_file = domain_encoder_path(selection.real, EncoderRecipe(), selection.cache_dir,
                                                   device=str(device), progress=progress)
            classifier = load_encoder(encoder_file).to(device)
            self._probs = lambda x: torch.softmax(classifier(x).float(), dim=1)
            self.details = {"classifier": "ResNet-18 trained on " + ("a file declared public by the user"
                                                                     if selection.public else "the real training file")
                            + " (the audit's domain encoder)", "trained_on": Path(selection.real).name,
                            "trained_on_sha256": sha, "declared_public": selection.public,
                            "recipe": asdict(EncoderRecipe())}
            if self.method == "realism":
                self._encoder = lambda x: penultimate(classifier, x.float())
                self._real = (read_images(selection.real), info.labels, device)
                self._discriminators: dict[int, object] = {}
                self._thresholds: dict[int, float] = {}
                self.details = {"discriminator": "per class, the audit's two-sample logistic regression (C = 0.1, "
                                "balanced class weights) separating the real training images of the class from a "
                                "pilot batch of samples, in the penultimate features of a ResNet-18 trained on the "
                                "real training file",
                                **self.details, "pilot": {}, "pilot_auc": {}, "threshold": {}}

    def prepare(self, k: int, draw, name: str) -> None:
        """Before class ``k``: fit its realism discriminator on ``draw(b)`` batches (``"realism"`` only).

        Raises:
            ConfigError: If the real file has no image of the class.
        """
        if self.method != "realism":
            return
        from sklearn.metrics import roc_auc_score

        from augflow.audit.detectability import discriminator

        images, labels, device = self._real
        rows = np.flatnonzero(labels == k)
        if len(rows) == 0:
            raise ConfigError(f"--select realism: --real {self.selection.real} has no image of class {name!r}, so "
                              f"nothing tells what a real one looks like; drop the class or use another --select")
        real = np.concatenate([self._features(torch.from_numpy(images[rows[i:i + 256]]).to(device))
                               for i in range(0, len(rows), 256)])
        pilot: list[np.ndarray] = []
        while sum(map(len, pilot)) < max(len(rows), PILOT):
            pilot.append(self._features(draw()))
        fake = np.concatenate(pilot)
        x, y = np.concatenate([real, fake]), np.r_[np.ones(len(real)), np.zeros(len(fake))]
        model = discriminator()
        with threadpool_limits(1):  # a small problem: threads cost more than they give
            model.fit(x, y)
            p_real = model.predict_proba(x)[:, 1]
        self.details["pilot"][name] = len(fake)
        self.details["pilot_auc"][name] = float(roc_auc_score(y, p_real))
        self._thresholds[k] = float(np.quantile(p_real[y == 0], 1 - self.selection.keep_fraction))
        self.details["threshold"][name] = self._thresholds[k]
        self._discriminators[k] = model

    def keep(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """The images of class ``k`` (in ``[0, 1]``) that the selection keeps."""
        self.drawn[k] = self.drawn.get(k, 0) + len(images)
        if self.method == "realism":
            with threadpool_limits(1):
                p_real = self._discriminators[k].predict_proba(self._features(images))[:, 1]
            keep = p_real >= self._thresholds[k]
            images = images[torch.from_numpy(keep).to(images.device)]
        elif self.method != "none":
            images = images[self._probs(images)[:, k] >= self.selection.min_confidence]
        self.kept[k] = self.kept.get(k, 0) + len(images)
        return images

    def _features(self, images: Tensor) -> np.ndarray:
        """The realism discriminator's input, always in float32: pilot and kept samples must be scored alike."""
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self._encoder(images).double().cpu().numpy()

    def check_budget(self, k: int, n: int, made: int, name: str) -> None:
        """Give up on a class when ``max_draws`` samples per requested one did not give ``n``, or earlier, once a
        quarter of that budget is drawn, when even the 99.9% upper (Clopper-Pearson) bound of the acceptance seen so
        far would not give the rest within the budget: a model whose samples the selection almost never keeps fails
        in a quarter of the time.

        Raises:
            ConfigError: Naming the class, what was drawn and kept, and what to change.
        """
        drawn, budget = self.drawn.get(k, 0), self.selection.max_draws * n
        if drawn >= budget:
            early = ""
        elif (drawn >= budget / 4 and made < drawn  # made: every kept sample so far (only the last batch is cut)
              and beta.ppf(0.999, made + 1, drawn - made) * (budget - drawn) < n - made):
            early = f"; at that rate the other {budget - drawn} draws of its budget would not make up the rest"
        else:
            return
        option = (f"--keep-fraction {self.selection.keep_fraction}" if self.method == "realism" else
                  f"--min-confidence {self.selection.min_confidence}")
        raise ConfigError(f"--select {self.method} {option}: class {name!r} kept {made} of {drawn} samples drawn "
                          f"({made / drawn:.1%}), short of the {n} asked for{early}; loosen {option.split()[0]}, "
                          "ask for fewer images, or train the model longer")

    def describe(self, class_names: list[str] | None = None) -> dict:
        """The selection for the provenance (with the acceptance per class once the classes are done)."""
        out = {"method": self.method, **self.details}
        if self.method == "realism":
            out["keep_fraction"] = self.selection.keep_fraction
        elif self.method != "none":
            out["min_confidence"] = self.selection.min_confidence
        if class_names is not None and self.method != "none":
            out["drawn"] = {class_names[k]: v for k, v in self.drawn.items()}
            out["kept"] = {class_names[k]: self.kept[k] for k in self.drawn}
            out["acceptance_rate"] = {class_names[k]: self.kept[k] / v for k, v in self.drawn.items() if v}
        return out


def zero_background(real: str | Path) -> dict:
    """The exact-zero background of a real file, for synthetic images to match.

    Skull-stripped or masked scans store their background as exact zeros, with no intensity between 0 and the
    darkest tissue; a flow trained with dequantisation and input noise samples a faint noisy background instead,
    which a downstream classifier can use to tell synthetic from real images (:mod:`augflow.audit.detectability`).
    When at least 1% of the real pixels are exactly 0, the threshold is half the 0.1% quantile of the nonzero ones
    (the empty gap above 0 stays empty); else there is no such background and the threshold is None.

    Returns:
        ``{"file", "sha256", "zero_fraction", "threshold"}``, recorded in the provenance.
    """
    images = read_images(real)
    zero_fraction = float(np.mean(images == 0))
    nonzero = images[images > 0]
    threshold = (float(np.quantile(nonzero, 0.001)) / 2 if zero_fraction >= 0.01 and nonzero.size else None)
    return {"file": Path(real).name, "sha256": sha256_file(real), "zero_fraction": zero_fraction,
            "threshold": threshold}


@dataclass(frozen=True)
class Anchors:
    """Samples anchored to real images (``synthesize --near FILE --strength S --anchor-classes C``).

    Attributes:
        real: A real file with the model's classes and image shape; the anchors of a class are used in turn, in an
            order shuffled by the seed, so every real image anchors about as many samples as the others.
        strength: ``s`` in (0, 1], how far a sample moves from its real image (0 would copy it, 1 ignores it): the
            noise fraction of MAGIC-Flow's latent, ``1 - t`` of MedSymmFlow's starting time.
        classes: Which real images anchor the samples of class ``y``: ``"same"`` (those of ``y``), ``"other"``
            (those of every other class: translated to ``y``) or ``"all"``.
    """

    real: str | Path
    strength: float = 0.3  # the best of 0.15 / 0.3 / 0.6 on the built-in scanner data's val split
    classes: str = "same"

    def load(self, flow: ModelFamily, meta: dict, model_path: Path, per_class: list[int]) -> _AnchorImages:
        """Read the real images that anchor the classes to synthesize, after checking the model and the file.

        Raises:
            ConfigError: For a strength outside (0, 1], unknown anchor classes or a DP model.
            DataError: For a file whose classes or image shape differ from the model's, or a class to synthesize
                that has no image to anchor to.
        """
        if not 0 < self.strength <= 1:
            raise ConfigError(f"--strength must be in (0, 1] (0 would copy the real images), but is: {self.strength}")
        if self.classes not in ANCHOR_CLASSES:
            raise ConfigError(f"--anchor-classes must be one of {', '.join(ANCHOR_CLASSES)}, but is: {self.classes!r}")
        _refuse_under_dp(meta, f"--near derives each image from a real image of {self.real}", "--near")
        info = read_info(self.real)
        check_classes(info.class_names, meta["class_names"], f"--near {self.real}")
        if info.image_shape != tuple(flow.config.image_shape):
            raise DataError(f"--near {self.real}: image shape {info.image_shape} differs from the model's "
                            f"{tuple(flow.config.image_shape)}")
        images, labels = torch.from_numpy(read_images(self.real)), torch.from_numpy(info.labels.astype(np.int64))
        rows = {}
        for k, n in enumerate(per_class):
            same = labels == k
            rows[k] = torch.nonzero({"same": same, "other": ~same, "all": torch.ones_like(same)}[self.classes])[:, 0]
            if n and not len(rows[k]):
                raise DataError(f"--near {self.real} --anchor-classes {self.classes}: no image to anchor the {n} "
                                f"samples of class {info.class_names[k]!r} to")
        return _AnchorImages(images, labels, rows)

    def describe(self) -> dict:
        """The anchoring for the provenance."""
        return {"real": Path(self.real).name, "real_sha256": sha256_file(self.real), "strength": self.strength,
                "anchor_classes": self.classes, "derived_from_real_images": True}


ANCHOR_CLASSES = ("same", "other", "all")


@dataclass
class _AnchorImages:
    images: Tensor
    labels: Tensor
    rows: dict[int, Tensor]  # the anchor rows of each class to synthesize

    def order(self, k: int, seed: int) -> Tensor:
        """The anchor rows of class ``k`` in a seeded random order (cycled)."""
        rows = self.rows[k]
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(derive_seed(seed, k)))]

    def batch(self, order: Tensor, start: int, b: int, device) -> tuple[Tensor, Tensor]:
        """The images and classes of the next ``b`` anchors of ``order``."""
        rows = order[torch.arange(start, start + b) % len(order)]
        return self.images[rows].to(device), self.labels[rows].to(device)


@dataclass
class _Batch:
    images: torch.Tensor
    rejected: int


def _refuse_under_dp(meta: dict, what: str, option: str) -> None:
    """Refuse an option whose output depends on real images beyond what a DP model's ledger accounted for.

    Raises:
        ConfigError: When the model was trained with DP, naming ``what`` the option does with the real data.
    """
    if _is_dp(meta):
        raise ConfigError(f"{what}: the model's (epsilon, delta) guarantee would not cover the released images; "
                          f"drop {option} to release DP samples")


def _check_public(path: str | Path, sha: str, meta: dict) -> None:
    """Refuse a file declared public (SHA-256 ``sha``) that is the model's own training or validation file (its
    ledger's fingerprint).

    Raises:
        PrivacyError: Naming the file and what it is.
    """
    fingerprint = (meta.get("privacy") or {}).get("dataset_fingerprint") or meta.get("fingerprint") or {}
    for key, role in (("data_sha256", "training"), ("val_sha256", "validation")):
        if fingerprint.get(key) == sha:
            raise PrivacyError(f"--select-public {path} is the model's own {role} file (SHA-256 {sha[:12]}...), "
                               f"its private data, not public; select with a classifier of other, public images, "
                               f"or release without --select")


def _is_dp(meta: dict) -> bool:
    """Whether the model was trained with DP (its ledger says so)."""
    ledger = Ledger.from_dict(meta.get("privacy"))
    return bool(ledger and ledger.dp)


def _ledger(stored: dict | None) -> dict | None:
    """The model's privacy ledger, for the provenance of everything made from it."""
    ledger = Ledger.from_dict(stored)
    return None if ledger is None else ledger.to_dict()


def _training_noise(flow: ModelFamily, meta: dict, path: Path) -> float:
    """The standard deviation of the Gaussian noise the model's training added to its images, for ``denoise``."""
    if not flow.has_likelihood:
        raise ConfigError(f"--denoise needs a model with an exact likelihood (MAGIC-Flow); {path} is a "
                          f"{flow.family!r} model")
    augment = (meta.get("recipe") or {}).get("augment", {})
    sigma = float(augment.get("noise_std", 0.0)) if augment.get("enabled", False) else 0.0
    if sigma <= 0:
        raise ConfigError(f"--denoise removes the training input noise, but {path} was trained without it "
                          "(augment.noise_std = 0 or augment.enabled = false): drop --denoise")
    return sigma


def _denoised(flow: ModelFamily, x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """One Tweedie step ``x + sigma^2 * grad_x log p(x | k)`` (TarFlow): the noise-free image expected given x."""
    y = torch.full((len(x),), k, dtype=torch.long, device=x.device)
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        score, = torch.autograd.grad(flow.log_prob(x, y).sum(), x)
    return (x + sigma ** 2 * score.to(x.dtype)).detach()


def _checked_temperature(flow: ModelFamily, temperature: float | Sequence[float]) -> float | list[float]:
    """A temperature in (0, 2], or (MAGIC-Flow) one per latent part in [0, 2], finest first, not all 0."""
    if isinstance(temperature, (int, float)):
        if not 0 < temperature <= 2:
            raise ConfigError(f"--temperature must be in range (0, 2], but is: {temperature}")
        return float(temperature)
    if not hasattr(flow, "level_temperatures"):
        raise ConfigError(f"--temperature: per-level temperatures ({', '.join(map(str, temperature))}) are for "
                          f"MAGIC-Flow's latent parts; a {flow.family} model takes one number in (0, 2]")
    try:
        temperatures = flow.level_temperatures(temperature)
    except ConfigError as error:
        raise ConfigError(f"--temperature: {error}") from None
    if not all(0 <= t <= 2 for t in temperatures) or not any(temperatures):
        raise ConfigError(f"--temperature: each per-level value must be in range [0, 2] and one above 0, but they "
                          f"are: {temperatures}")
    return temperatures


def _check_guidance(flow: ModelFamily, guidance: float) -> None:
    """A guidance weight in [0, 10], other than 1 only for a model with a null label (:meth:`MagicFlow.guided`)."""
    if not (isinstance(guidance, int | float) and 0 <= guidance <= 10):
        raise ConfigError(f"--guidance must be in range [0, 10] (1 = no guidance), but is: {guidance}")
    if guidance == 1:
        return
    if not hasattr(flow, "guided"):
        raise ConfigError(f"--guidance {guidance:g}: classifier-free guidance is for MAGIC-Flow models trained with "
                          f"model.label_dropout > 0; this is a {flow.family} model: use --guidance 1")
    flow.guided(torch.zeros(1, dtype=torch.long), guidance)  # raises for a model without a null label


def _finite_batch(flow: ModelFamily, k: int, b: int, temperature: float | Sequence[float], generator, device,
                  start: tuple[Tensor, Tensor] | None = None, strength: float = 1.0, guidance: float = 1.0) -> _Batch:
    """Draw b samples of class k (anchored to the real images and classes ``start``, if given), redrawing
    non-finite ones."""
    y = torch.full((b,), k, dtype=torch.long, device=device)
    images = _draw(flow, y, temperature, generator, start, strength, guidance)
    rejected = 0
    for _ in range(_MAX_REDRAWS):
        bad = ~torch.isfinite(images).flatten(1).all(1)
        if not bad.any():
            return _Batch(images, rejected)
        rejected += int(bad.sum())
        images[bad] = _draw(flow, y[bad], temperature, generator, start and (start[0][bad], start[1][bad]), strength,
                            guidance)
    raise FloatingPointError(f"class {k}: samples stayed non-finite after {_MAX_REDRAWS} redraws; "
                             "the model is unusable (retrain it or lower --temperature)")


def _draw(flow: ModelFamily, y: Tensor, temperature: float | Sequence[float], generator,
          start: tuple[Tensor, Tensor] | None, strength: float, guidance: float = 1.0) -> Tensor:
    """Samples of classes ``y``: ordinary ones, or anchored to the real images and classes ``start``."""
    guided = {"guidance": guidance} if guidance != 1 else {}  # only MAGIC-Flow takes it (checked before)
    if start is None:
        return flow.sample(y, temperature=temperature, generator=generator, **guided)
    return flow.sample_near(*start, y, strength, temperature, generator, **guided)
