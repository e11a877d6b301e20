"""Feature spaces of the audit: a domain encoder trained on the real training data, or Inception-v3.

FID, KID and precision/recall are only as meaningful as the feature space they are computed in. ImageNet
Inception-v3 features (the FID standard, Heusel et al. 2017) describe natural photographs, not single-channel
brain slices, and need weights that cannot be downloaded here. The default space is therefore a *domain
encoder*: the baseline ResNet-18 (:mod:`augflow.audit.baseline`) trained with a fixed recipe and seed on the real
training images, supervised by their labels; its 512-d penultimate layer is the feature. The encoder is cached
on disk under a hash of (training file SHA-256, recipe), so audits of the same training data share one space
and their numbers are comparable between runs. Both spaces are registered as torch-fidelity feature
extractors, so ``torch_fidelity.calculate_metrics`` computes FID/KID in them.

Inception features are available only from a local weights file (torch-fidelity's ``inception-v3-compat``
with ``feature_extractor_weights_path``); nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from augflow.atomic import atomic_save
from augflow.audit.baseline import build_resnet18, penultimate, train_cnn
from augflow.data.store import read_images, read_info, sha256_file
from augflow.errors import ConfigError
from augflow.runs import load_file

DOMAIN_EXTRACTOR = "augflow-domain"
INCEPTION_EXTRACTOR = "inception-v3-compat"
FEATURE_SPACES = ("domain", "inception")
ENCODER_VERSION = 1  # bump when the encoder's architecture or training code changes: invalidates caches


@dataclass(frozen=True)
class EncoderRecipe:
    """The fixed training recipe of the domain encoder (arguments of :func:`augflow.audit.baseline.train_cnn`).

    No wall-clock budget: the same recipe and training file must give the same encoder on every machine.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def default_cache_dir() -> Path:
    """``$AUGFLOW_CACHE_DIR/encoders`` if set, else ``~/.cache/augflow/encoders``."""
    root = os.environ.get("AUGFLOW_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "augflow") / "encoders"


def encoder_key(train_sha256: str, recipe: EncoderRecipe) -> str:
    """Cache key of an encoder: a hash of the training file's SHA-256, the recipe and the encoder version."""
    blob = json.dumps({"train_sha256": train_sha256, "recipe": asdict(recipe), "version": ENCODER_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def domain_encoder_path(train: str | os.PathLike, recipe: EncoderRecipe = EncoderRecipe(),
                        cache_dir: str | os.PathLike | None = None, device: str = "cpu",
                        progress: bool = False) -> Path:
    """The cached encoder file of a training file; trains and caches it (atomically) on the first call.

    Arguments:
        train: The real training file (augflow HDF5) the audited model was trained on.
        recipe: Encoder training recipe.
        cache_dir: Folder of cached encoders (default: :func:`default_cache_dir`).
        device: Training device.
        progress: Show the training progress bar.

    Returns:
        Path of ``<cache_dir>/<key>.pt`` holding ``{"state_dict", "num_classes", "image_shape", "recipe",
        "train_sha256", "class_names"}``.
    """
    train_sha = sha256_file(train)
    path = Path(cache_dir or default_cache_dir()) / f"{encoder_key(train_sha, recipe)}.pt"
    if path.is_file():
        return path
    info = read_info(train)
    model = train_cnn(read_images(train), info.labels, info.num_classes, epochs=recipe.epochs,
                      batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed, device=device, progress=progress)
    atomic_save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                 "num_classes": info.num_classes, "image_shape": list(info.image_shape), "recipe": asdict(recipe),
                 "train_sha256": train_sha, "class_names": info.class_names, "version": ENCODER_VERSION}, path)
    return path


def load_encoder(path: str | os.PathLike) -> torch.nn.Module:
    """The ResNet-18 of a cached encoder file, in eval mode.

    Raises:
        DataError: If the file is unreadable (delete it from the cache to retrain the encoder).
    """
    ckpt = load_file(path, "encoder")
    c, h, _ = ckpt["image_shape"]
    model = build_resnet18(ckpt["num_classes"], h, c)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor wrapping a cached domain encoder.

    torch-fidelity builds extractors itself from ``calculate_metrics``' keyword arguments, so the encoder is
    passed as ``feature_extractor_weights_path`` (an encoder file of :func:`domain_encoder_path`), as for the
    built-in extractors. Input: float images (B, C, H, W) in [0, 1]; features: "penultimate" (B, 512) and
    "logits" (B, K).
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ConfigError(f"feature extractor {name!r} needs feature_extractor_weights_path (an encoder file)")
        self.model = load_encoder(feature_extractor_weights_path)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32)

    def forward(self, x):
        h = penultimate(self.model, x.float())  # (B, 512)
        out = {"penultimate": h, "logits": self.model.fc(h)}
        return tuple(out[name] for name in self.features_list)


def register_domain_extractor() -> None:
    """Register :class:`DomainFeatureExtractor` with torch-fidelity (once per process)."""
    if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)


@dataclass
class FeatureSpace:
    """A registered torch-fidelity extractor, its input format and the arguments that build it.

    ``extract`` runs the same module torch-fidelity runs, so features computed here and inside
    ``calculate_metrics`` agree.
    """

    name: str  # "domain" or "inception"
    extractor: str  # torch-fidelity registry name
    layer: str  # feature layer used for every metric
    weights_path: Path
    description: str
    module: FeatureExtractorBase = field(repr=False)

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] as the extractor's input: float for the domain encoder, uint8 RGB for
        Inception (grey replicated to 3 channels, as for torch-fidelity's image folders)."""
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if self.name == "inception":
            x = (x * 255).round().clamp(0, 255).to(torch.uint8)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return x

    @torch.inference_mode()
    def extract(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
        """Features (N, D) as float64."""
        out = []
        for i in range(0, len(images), batch_size):
            (f,) = self.module(self.to_input(images[i:i + batch_size]))
            out.append(f.double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def metric_kwargs(self) -> dict:
        """Keyword arguments selecting this space in ``torch_fidelity.calculate_metrics``."""
        return {"feature_extractor": self.extractor, "feature_layer_fid": self.layer, "feature_layer_kid": self.layer,
                "feature_extractor_weights_path": str(self.weights_path)}

    def summary(self) -> dict:
        return {"name": self.name, "extractor": self.extractor, "layer": self.layer,
                "weights": str(self.weights_path), "description": self.description}


def feature_space(space: str, train: str | os.PathLike, *, inception_weights: str | os.PathLike | None = None,
                  recipe: EncoderRecipe = EncoderRecipe(), cache_dir: str | os.PathLike | None = None,
                  device: str = "cpu", progress: bool = False) -> FeatureSpace:
    """Build (and register) a feature space.

    Arguments:
        space: "domain" (encoder trained on ``train``, cached) or "inception" (needs ``inception_weights``).
        train: The real training file.
        inception_weights: Local torch-fidelity Inception-v3 weights (``pt_inception-2015-12-05-*.pth``).
        recipe: Domain encoder recipe.
        cache_dir: Encoder cache folder.
        device: Device for training the encoder.
        progress: Show the encoder's training progress.

    Raises:
        ConfigError: on an unknown space or missing Inception weights.
    """
    if space not in FEATURE_SPACES:
        raise ConfigError(f"--features must be one of {FEATURE_SPACES}, but is: {space!r}")
    if space == "inception":
        if inception_weights is None or not Path(inception_weights).is_file():
            raise ConfigError("--features inception needs --inception-weights PATH, a local torch-fidelity "
                              f"Inception-v3 weights file (nothing is downloaded); got: {inception_weights}")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        module = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"],
                                             feature_extractor_weights_path=str(inception_weights)).eval()
        return FeatureSpace("inception", INCEPTION_EXTRACTOR, "2048", Path(inception_weights),
                            "ImageNet Inception-v3 pool features (2048-d), grey replicated to RGB", module)
    register_domain_extractor()
    path = domain_encoder_path(train, recipe, cache_dir, device, progress)
    module = DomainFeatureExtractor(DOMAIN_EXTRACTOR, ["penultimate"], feature_extractor_weights_path=path).eval()
    return FeatureSpace("domain", DOMAIN_EXTRACTOR, "penultimate", path,
                        f"ResNet-18 trained on the real training file (recipe {asdict(recipe)}), 512-d "
                        "penultimate layer", module)
