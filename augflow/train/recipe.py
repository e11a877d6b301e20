"""Recipes: one typed source of defaults for training, shared by the API, the TOML recipes and the CLI.

A recipe is a TOML file with the tables ``[model]`` (``family``, see :mod:`augflow.models`, and the fields of that
family's config except the image shape and class count, which always come from the data file), ``[train]``
(:class:`TrainConfig`), ``[augment]`` (:class:`AugmentConfig`) and ``[privacy]`` (:class:`PrivacyConfig`, DP-SGD;
off by default). ``--set table.key=value`` overrides any key; the
value is parsed as TOML (``--set train.lr=1e-3``, ``--set model.hidden_channels=[32,64,64,64]``). Unknown tables or
keys are errors that list the valid ones; every ``[train]`` and ``[augment]`` value is checked against its type and
allowed range (:data:`RANGES`) when the recipe is loaded, before a run writes anything. ``[model]`` values are
checked by the family's config, ``[privacy]`` ones by :func:`augflow.train.privacy.checks.validate_config`, both
before a run writes anything too.

The shipped recipes live in the top-level ``recipes/`` folder of the source tree, and inside the wheel as the
package data ``augflow/recipes`` (``pyproject.toml`` maps the folder there), so ``--recipe quick`` works from a
checkout, an editable install and an installed wheel alike.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path

from augflow.errors import ConfigError
from augflow.models import DEFAULT_FAMILY, family, model_config

# Fields of the model config that come from the data, never from a recipe.
DATA_FIELDS = ("image_shape", "num_classes")


def recipes_dir() -> Traversable:
    """The folder of the shipped recipes: the wheel's package data, or the source tree's ``recipes/``."""
    packaged = importlib.resources.files("augflow") / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of ``augflow train`` (defaults: the MAGIC-Flow paper, scaled for a CPU).

    The schedule is AdamW with a linear warm-up from ``warmup_start * lr`` over ``warmup_epochs``, then cosine
    decay to ``min_lr``, as in the reference training of MAGIC-Flow (arXiv 2510.22070).
    """

    epochs: int = 30
    batch_size: int = 16
    lr: float = 4e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    warmup_start: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA; e.g. 0.999
    balanced_sampling: bool = False
    val_fraction: float = 0.1  # subject-wise split of the training file when no --val is given
    checkpoint_every: int = 200  # steps
    log_every: int = 10  # steps
    max_steps: int = 0  # stop after this many steps (0: run all epochs); the schedule still spans all epochs
    temperature: float = 0.8  # default sampling temperature stored with the model
    app_mask: str = ""  # .npy (H, W) brain mask (public under DP); "" = Otsu on the training mean (DP: on the template)
    amp: bool = False  # bf16 networks where the hardware has bf16 (augflow.precision); else float32 with a warning
    # torch.compile of the training objective (inductor; not under DP): 1.3x faster steps after a one-off compilation
    # of minutes per recipe and image shape, cached on disk (reports/benchmarks.md); pays off in long runs
    compile: bool = False
    ce_weight: float = 0.0  # MAGIC-Flow hybrid objective: bits/dim + ce_weight * cross-entropy of the Bayes posterior
    # The class prior of that posterior: "uniform", or "train" (the stored training class counts: the joint model's
    # own posterior, so the likelihoods need not absorb the imbalance; logit adjustment, arXiv:2007.07314)
    ce_prior: str = "uniform"
    label_smoothing: float = 0.0  # of that cross-entropy's target (IB-INN, arXiv:2001.06448: 0.02); needs ce_weight > 0
    # Which validation figure keeps the released model: "loss" (lowest) or "balanced_accuracy" (highest, of the
    # likelihood classifier: a classifier is stopped early on what it is for; MAGIC-Flow only)
    select_on: str = "loss"
    init_from: str = ""  # --init-from: a run folder or model.pt to start from (augflow.train.init_from); "" = fresh
    init_from_public: bool = False  # --init-from-public: the user declares the init_from model trained on public data


@dataclass
class AugmentConfig:
    """Light augmentation of the training images (:mod:`augflow.train.augment`): whole-pixel shifts, noise, and a
    rotation that is off by default because its resampling erases the scanner signature."""

    enabled: bool = True
    rotation_deg: float = 0.0
    shift_px: int = 2
    noise_std: float = 0.01


@dataclass
class PrivacyConfig:
    """Differentially private training (DP-SGD with Poisson sampling); see :mod:`augflow.train.privacy`.

    The noise multiplier is not a setting: it is calibrated so that the run reaches ``(epsilon, delta)`` exactly
    at its planned number of steps (``train.epochs`` passes over the units of privacy).

    References:
        Abadi et al., "Deep Learning with Differential Privacy", 2016, arXiv:1607.00133.
    """

    enabled: bool = False  # --dp
    epsilon: float = 0.0  # total budget, label counts included; required (> 0) when enabled
    delta: float = 0.0  # 0: the largest power of 10 at most 1/(10 N), N = number of units; must be < 1/N
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    accountant: str = "rdp"  # "rdp" (Mironov 2017) or "prv" (Gopi et al. 2021)
    unit: str = "slice"  # what one record is: "slice" (image) or "subject" (one slice per subject per step)
    microbatch: int = 8  # examples per vmap call; per-sample gradients of one microbatch are held at once
    public_class_counts: bool = False  # true: the training class counts are public; false: released with noise
    count_epsilon_fraction: float = 0.05  # share of epsilon spent on the noisy class counts (Laplace)
    max_slices_per_subject: int = 11  # unit "subject": a subject's weight in the noisy counts is capped here
    actnorm_init: str = "template"  # "template" (public MNI152 slices) or "identity"
    # What DP-SGD trains: "all", "conditioning", "top" (the family's groups) or a list of parameter-name patterns;
    # anything but "all" needs a declared-public train.init_from (augflow.train.privacy.trainable).
    trainable: str | list[str] = "all"


@dataclass
class Recipe:
    """A full training recipe: the model fields from the recipe, and the train, augment and privacy settings."""

    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    name: str = "custom"

    @property
    def family(self) -> str:
        """The model family (``[model] family``, default ``magic``)."""
        return self.model.get("family", DEFAULT_FAMILY)

    def model_config(self, image_shape, num_classes):
        """The model config for data of the given shape and class count."""
        return model_config(self.model, image_shape, num_classes)

    def to_dict(self) -> dict:
        return {"name": self.name, "model": dict(self.model), "train": dataclasses.asdict(self.train),
                "augment": dataclasses.asdict(self.augment), "privacy": dataclasses.asdict(self.privacy)}


# The allowed values of every number of [train] and [augment]: (low, high, low included, high included).
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "train.epochs": (1, math.inf, True, False),
    "train.batch_size": (1, math.inf, True, False),
    "train.lr": (0, math.inf, False, False),
    "train.min_lr": (0, math.inf, True, False),
    "train.weight_decay": (0, math.inf, True, False),
    "train.warmup_epochs": (0, math.inf, True, False),
    "train.warmup_start": (0, 1, False, True),
    "train.grad_clip": (0, math.inf, False, False),
    "train.ema_decay": (0, 1, True, False),
    "train.val_fraction": (0, 1, True, False),
    "train.checkpoint_every": (1, math.inf, True, False),
    "train.log_every": (1, math.inf, True, False),
    "train.max_steps": (0, math.inf, True, False),
    "train.temperature": (0, 2, False, True),
    "train.ce_weight": (0, math.inf, True, False),
    "train.label_smoothing": (0, 1, True, False),
    "augment.rotation_deg": (0, 180, True, True),
    "augment.shift_px": (0, math.inf, True, False),
    "augment.noise_std": (0, math.inf, True, False),
}


SELECT_ON = ("loss", "balanced_accuracy")
CE_PRIORS = ("uniform", "train")


def _describe_range(low: float, high: float, low_in: bool, high_in: bool) -> str:
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_values(table: str, config, source: str = "recipe") -> None:
    """Check every field of a ``[train]`` or ``[augment]`` config against its type and :data:`RANGES`.

    Raises:
        ConfigError: Naming the key, the allowed values and the value received.
    """
    for f in dataclasses.fields(config):
        key, value = f"{table}.{f.name}", getattr(config, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "int":
            ok, allowed = number and isinstance(value, int), "an integer"
        elif kind == "float":
            ok, allowed = number and math.isfinite(value), "a number"
        elif kind == "bool":
            ok, allowed = isinstance(value, bool), "true or false"
        else:
            ok, allowed = isinstance(value, str), "a string"
        if key in RANGES:
            ok = ok and _in_range(value, *RANGES[key])
            allowed += " " + _describe_range(*RANGES[key])
        if not ok:
            raise ConfigError(f"{source}: {key} must be {allowed}, but is: {value!r}; change it in the recipe or "
                              f"with --set {key}=VALUE")


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def _model_keys(family_name: str) -> list[str]:
    fields = dataclasses.fields(family(family_name).config)
    return ["family", *(f.name for f in fields if f.name not in DATA_FIELDS)]


def _tables(family_name: str = DEFAULT_FAMILY) -> dict[str, list[str]]:
    return {
        "model": _model_keys(family_name),
        "train": [f.name for f in dataclasses.fields(TrainConfig)],
        "augment": [f.name for f in dataclasses.fields(AugmentConfig)],
        "privacy": [f.name for f in dataclasses.fields(PrivacyConfig)],
    }


def recipe_from_dict(data: dict, name: str = "custom", source: str = "recipe") -> Recipe:
    """Build and check a recipe from nested dicts; unknown tables and keys raise ConfigError."""
    model_table = data.get("model", {})
    tables = _tables(model_table.get("family", DEFAULT_FAMILY) if isinstance(model_table, dict) else DEFAULT_FAMILY)
    for table, values in data.items():
        if table not in tables:
            raise ConfigError(f"{source}: unknown table [{table}]; valid tables: {', '.join(tables)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{table}] must be a table of keys")
        for key in values:
            if key not in tables[table]:
                raise ConfigError(f"{source}: unknown key '{table}.{key}'; valid keys of [{table}]: "
                                  f"{', '.join(tables[table])}")
    try:
        train = TrainConfig(**data.get("train", {}))
        augment = AugmentConfig(**data.get("augment", {}))
        privacy = PrivacyConfig(**data.get("privacy", {}))
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
    check_values("train", train, source)
    if train.select_on not in SELECT_ON:
        raise ConfigError(f"{source}: train.select_on must be one of {', '.join(SELECT_ON)}, but is: "
                          f"{train.select_on!r}")
    if train.ce_prior not in CE_PRIORS:
        raise ConfigError(f"{source}: train.ce_prior must be one of {', '.join(CE_PRIORS)}, but is: "
                          f"{train.ce_prior!r}")
    if train.label_smoothing and not train.ce_weight:
        raise ConfigError(f"{source}: train.label_smoothing smooths the hybrid objective's cross-entropy and needs "
                          f"train.ce_weight > 0, but train.ce_weight is 0")
    if train.ce_weight and isinstance(model_table, dict) and model_table.get("label_dropout"):
        raise ConfigError(f"{source}: model.label_dropout trains a null label that the hybrid objective's "
                          f"cross-entropy cannot score: set model.label_dropout = 0 or train.ce_weight = 0")
    check_values("augment", augment, source)
    if not isinstance(privacy.enabled, bool):
        raise ConfigError(f"{source}: privacy.enabled must be true or false, but is: {privacy.enabled!r}")
    return Recipe(model=dict(data.get("model", {})), train=train, augment=augment, privacy=privacy, name=name)


def parse_override(text: str) -> tuple[str, str, object]:
    """Parse ``table.key=value`` (value in TOML syntax; a bare word is a string)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set must look like table.key=value (e.g. train.lr=1e-3), but is: {text!r}")
    dotted, raw = text.split("=", 1)
    table, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table, key, value


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(Path(p.name).stem for p in recipes_dir().iterdir() if p.name.endswith(".toml"))


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> Recipe:
    """Load a TOML recipe (a file, or the name of a shipped one such as ``quick``; the defaults when None)
    and apply ``--set`` overrides."""
    data: dict = {}
    name = "defaults"
    if path is not None:
        path = _recipe_file(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        name = Path(path.name).stem
    for text in overrides:
        table, key, value = parse_override(text)
        data.setdefault(table, {})[key] = value
    return recipe_from_dict(data, name=name, source=str(path) if path else "recipe")


def _recipe_file(path: str | Path) -> Path | Traversable:
    """A recipe file, or the shipped recipe of that name."""
    if Path(path).is_file():
        return Path(path)
    shipped = recipes_dir() / f"{path}.toml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"--recipe: no file {path} and no shipped recipe of that name; "
                      f"shipped: {', '.join(shipped_recipes())}")
