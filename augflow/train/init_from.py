"""Starting a run from a trained model (``--init-from``): public pretraining, then a (DP) fine-tune.

``train.init_from`` (``--init-from MODEL``) names a run folder or model file; the new run starts from its weights.
It must be of the recipe's family and architecture, trained on images of the data's shape: every difference is an
error before the run writes anything. The class set may differ: the state-dict entries whose shape depends on the
number of classes (:meth:`~augflow.models.ModelFamily.class_entries`; MAGIC-Flow: the first layer of every
conditional coupling network's label embedding, and the class means and scales of a class prior) are re-initialised
when the class names differ (named in an :class:`InitWarning` and in the ledger), and every other tensor is loaded
bit-exactly. Nothing data-dependent overwrites them: ActNorm is not initialised again, and the mask buffers (the
application mask and the coupling masks built from it) are the loaded model's — its weights were fitted to that
mask; under DP the declared-public model's mask is public (it came from its own public training data, or from the
MNI152 template). ``train.app_mask`` together with ``init_from`` is therefore refused.

Under DP the loaded weights enter the released model outside the accounting, so they must be public, and only the
user can say so: ``--init-from-public`` (``train.init_from_public = true``) is that declaration, recorded in the
ledger; without it a DP run refuses the model, and a model trained on the very files of this run is refused even
with it. A model that is itself differentially private is allowed, and its ledger is recorded. Frozen parameters
(``privacy.trainable``, :mod:`augflow.train.privacy.trainable`) are allowed under DP only when they were loaded
from a declared-public model.

References:
    Liu, Lyu, Vinaroz & Park, "DP-LDMs: Differentially Private Latent Diffusion Models", 2023, arXiv:2305.15759.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from augflow.data.store import sha256_file
from augflow.errors import ConfigError, PrivacyError
from augflow.models import ModelFamily, load_model
from augflow.runs import model_file
from augflow.train.recipe import Recipe
from augflow.train.rows import TrainingRows

DECLARED = "declared public by the user (--init-from-public / train.init_from_public = true)"
NOT_DECLARED = "not declared public"


class InitWarning(UserWarning):
    """The ``--init-from`` model was loaded in part: some entries were re-initialised (the class set differs)."""


@dataclass(frozen=True)
class InitFrom:
    """The model a run starts from, checked against the run's recipe and data.

    Attributes:
        model: The model file, as the user named it (``runs/x`` becomes ``runs/x/model.pt``).
        sha256: Its SHA-256.
        family: Its model family.
        class_names: The classes it was trained on (None if its metadata has none).
        fingerprint: The data it was trained on (its stored fingerprint), or None.
        model_privacy: Its own ledger's guarantee (``{"dp", "epsilon", "delta", "unit"}``), or None.
        declared_public: Whether the user declared it trained on public data.
        reinitialized: State-dict entries not loaded (their shape depends on the classes, which differ).
        state: Its weights (None when a resumed run read this from its checkpoint, which holds the weights).
    """

    model: str
    sha256: str
    family: str
    class_names: list[str] | None
    fingerprint: dict | None
    model_privacy: dict | None
    declared_public: bool
    reinitialized: tuple[str, ...]
    state: dict[str, Tensor] | None = None

    def is_public(self, name: str) -> bool:
        """Whether parameter ``name`` was loaded from a model declared public (so it may be frozen under DP)."""
        return self.declared_public and name not in self.reinitialized

    @torch.no_grad()
    def apply(self, model: ModelFamily) -> None:
        """Load every entry but the re-initialised ones into a freshly built ``model`` (bit-exact copies)."""
        own = model.state_dict()
        own.update({name: tensor for name, tensor in self.state.items() if name not in self.reinitialized})
        model.load_state_dict(own)

    def record(self) -> dict:
        """The plain dict kept in the checkpoint and, with the trained set, in the ledger (``init_from``)."""
        return {"model": self.model, "model_sha256": self.sha256, "family": self.family,
                "class_names": self.class_names, "dataset_fingerprint": self.fingerprint,
                "model_privacy": self.model_privacy, "declared_public": self.declared_public,
                "declaration": DECLARED if self.declared_public else NOT_DECLARED,
                "reinitialized": list(self.reinitialized),
                "reinitialized_why": ("their shape depends on the number of classes, and the class set differs"
                                      if self.reinitialized else "none: the class names are the same")}

    @classmethod
    def from_record(cls, record: dict) -> InitFrom:
        """The :class:`InitFrom` of a :meth:`record` (a resumed run: the weights are the checkpoint's)."""
        return cls(record["model"], record["model_sha256"], record["family"], record["class_names"],
                   record["dataset_fingerprint"], record["model_privacy"], record["declared_public"],
                   tuple(record["reinitialized"]))


def open_init(recipe: Recipe, rows: TrainingRows, saved: dict | None = None) -> InitFrom | None:
    """The model a run starts from (``train.init_from``), checked; None for a run from scratch.

    A resumed run takes it from its checkpoint (the file need not exist any more); a new run loads the file.

    Arguments:
        recipe: The run's recipe.
        rows: The run's rows (image shape, classes and fingerprint).
        saved: The checkpoint being resumed, or None.

    Returns:
        The :class:`InitFrom`, or None.

    Raises:
        ConfigError: For no model at the path, another family, image shape or architecture, a mask file given too,
            or a declaration without a model. PrivacyError: Under DP, for a model not declared public or trained on
            this run's own files.
    """
    cfg, dp = recipe.train, recipe.privacy.enabled
    if not cfg.init_from:
        if cfg.init_from_public:
            raise ConfigError("--init-from-public (train.init_from_public = true) declares the --init-from model "
                              "public, but no model is given; add --init-from MODEL (train.init_from) or drop the "
                              "declaration")
        return None
    if saved is not None and saved.get("init"):
        return InitFrom.from_record(saved["init"])
    where = f"--init-from {cfg.init_from}"
    if cfg.app_mask:
        raise ConfigError(f"{where}: train.app_mask = {cfg.app_mask!r} cannot be combined with it: the model's own "
                          f"mask is loaded with its weights, which were fitted to it; drop train.app_mask")
    path = model_file(cfg.init_from, "--init-from")
    model, meta = load_model(path, with_meta=True, option="--init-from")
    if model.family != recipe.family:
        raise ConfigError(f"{where}: a {model.family!r} model, but the recipe trains model.family = "
                          f"{recipe.family!r}; the init model must be of the same family")
    shape, data_shape = tuple(model.config.image_shape), tuple(rows.info.image_shape)
    if shape != data_shape:
        raise ConfigError(f"{where}: the model was trained on images of shape {shape}, but --data "
                          f"{rows.info.path} has images of shape {data_shape}; the image shape must match (pretrain "
                          f"on images of this size, or resample the data with augflow prepare --size)")
    mine = model.config.to_dict()
    wanted = recipe.model_config(data_shape, rows.info.num_classes).to_dict()
    differ = [f"model.{k} {mine[k]!r} (init model) vs {wanted[k]!r} (recipe)" for k in wanted
              if k != "num_classes" and mine.get(k) != wanted[k]]
    if differ:
        raise ConfigError(f"{where}: the architecture differs from the recipe's: {'; '.join(differ)}; train with the "
                          f"init model's [model] settings (augflow info {cfg.init_from} --json shows its recipe)")
    ledger = meta.get("privacy") or {}
    fingerprint = meta.get("fingerprint") or ledger.get("dataset_fingerprint")
    if dp:
        _check_public(where, cfg.init_from_public, fingerprint, rows.fingerprint)
    classes = meta.get("class_names")
    same_classes = classes is not None and list(classes) == list(rows.info.class_names)
    reinitialized = () if same_classes else tuple(model.class_entries())
    if reinitialized:
        warnings.warn(f"{where}: the classes differ ({classes} vs {rows.info.class_names}): {len(reinitialized)} "
                      f"entries whose shape depends on the classes are re-initialised, every other tensor is loaded: "
                      f"{', '.join(reinitialized)}", InitWarning, stacklevel=3)
    own = ({"dp": bool(ledger.get("dp")), **{k: ledger[k] for k in ("epsilon", "delta", "unit") if k in ledger}}
           if ledger else None)
    return InitFrom(str(path), sha256_file(path), model.family, None if classes is None else list(classes),
                    fingerprint, own, bool(cfg.init_from_public), reinitialized, model.state_dict())


def _check_public(where: str, declared: bool, fingerprint: dict | None, data: dict) -> None:
    """Under DP: refuse an undeclared model, and one trained on this run's own training or validation file."""
    if not declared:
        raise PrivacyError(f"{where} under --dp: its weights would be released with the model without being "
                           f"covered by the DP accounting, so they must come from public data only; if it was "
                           f"trained on public data, declare it with --init-from-public (train.init_from_public = "
                           f"true), otherwise train from scratch")
    theirs = {(fingerprint or {}).get(k) for k in ("data_sha256", "val_sha256")} - {None}
    ours = {data.get(k) for k in ("data_sha256", "val_sha256")} - {None}
    if theirs & ours:
        raise PrivacyError(f"{where} was declared public, but it was trained on a file of this run (SHA-256 "
                           f"{sorted(theirs & ours)[0][:12]}...), the private data: it is not public; pretrain on "
                           f"other, public data")

