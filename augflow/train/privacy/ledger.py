"""The privacy ledger: what a model's training guarantees, stored with the model and everything made from it.

Every model records its ledger in ``meta["privacy"]``; ``augflow synthesize`` copies it into the provenance of the
files it writes, ``augflow info`` shows it and ``augflow audit`` reports it. A model trained without DP says so and
states no epsilon; a DP model states its (epsilon, delta), how they were reached and what they protect. All of
them read it through :class:`Ledger`; on disk it stays the plain dict of :meth:`Ledger.to_dict`.

This module imports neither torch nor Opacus, so reading a ledger costs nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

NO_GUARANTEE = "none: trained without differential privacy"
REFERENCES = (
    "Abadi et al. 2016, arXiv:1607.00133 (DP-SGD)",
    "Mironov 2017, arXiv:1702.07476 (RDP)",
    "Gopi et al. 2021, arXiv:2106.02848 (PRV)",
)


@dataclass(frozen=True)
class Ledger:
    """The privacy ledger of one model.

    Without DP only ``dp`` (False), ``guarantee`` and ``dataset_fingerprint`` are set. With DP every other field
    is: ``epsilon`` is the total, ``epsilon_sgd`` (the accountant's, at ``delta``) plus ``epsilon_class_counts``
    (the Laplace release of the class counts, basic composition).

    Attributes:
        dp: Whether the model was trained with differential privacy.
        guarantee: Without DP: that there is none.
        epsilon, delta: The guarantee, per ``unit``.
        accountant: ``"rdp"`` or ``"prv"``.
        noise_multiplier, sample_rate, steps, max_grad_norm: The DP-SGD run the accountant saw.
        unit: ``"slice"`` or ``"subject"``: what one record is.
        epsilon_sgd, epsilon_class_counts: The two parts of ``epsilon``.
        class_counts_release: How the stored class counts were released.
        target_epsilon, planned_steps, delta_rule, population, expected_batch_size: The calibrated plan.
        sampling, protects, composition, model_selection, randomness: The guarantee in words.
        public_inputs: What the model took from outside the private training data.
        init_from: The model the run started from (``--init-from``; :mod:`augflow.train.init_from`): its file and
            SHA-256, the data it was trained on (fingerprint), the user's declaration that it is public, its own
            privacy, the entries re-initialised because their shape depends on the classes, and what was trained.
        dataset_fingerprint: The training data (SHA-256, image shape and row counts).
        references: Papers of the mechanisms.
        extra: Keys this version does not know (from a newer augflow), kept so a round trip loses nothing.
    """

    dp: bool
    guarantee: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    unit: str | None = None
    epsilon_sgd: float | None = None
    epsilon_class_counts: float | None = None
    class_counts_release: dict | None = None
    target_epsilon: float | None = None
    planned_steps: int | None = None
    delta_rule: str | None = None
    population: int | None = None
    expected_batch_size: int | None = None
    sampling: str | None = None
    protects: str | None = None
    composition: str | None = None
    public_inputs: dict | None = None
    init_from: dict | None = None
    model_selection: str | None = None
    randomness: str | None = None
    dataset_fingerprint: dict | None = None
    references: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def without_dp(cls, fingerprint: dict, init_from: dict | None = None) -> Ledger:
        """The ledger of a model trained without DP: it says so, and states no epsilon (and the model it started
        from, if any)."""
        return cls(dp=False, guarantee=NO_GUARANTEE, init_from=init_from, dataset_fingerprint=fingerprint)

    @classmethod
    def with_dp(cls, plan, epsilon_sgd: float, steps: int, counts_info: dict, fingerprint: dict,
                public_inputs: dict, init_from: dict | None = None) -> Ledger:
        """The ledger of a DP model after ``steps`` DP-SGD steps.

        Arguments:
            plan: The run's :class:`~augflow.train.privacy.accounting.PrivacyPlan`.
            epsilon_sgd: The accountant's epsilon of those steps at ``plan.delta``.
            steps: DP-SGD steps taken.
            counts_info: How the class counts were released (``{"release", "epsilon", ...}``).
            fingerprint: The training data.
            public_inputs: What the model took from outside the private training data.
        init_from: The model the run started from (``--init-from``; :mod:`augflow.train.init_from`): its file and
            SHA-256, the data it was trained on (fingerprint), the user's declaration that it is public, its own
            privacy, the entries re-initialised because their shape depends on the classes, and what was trained.
        """
        subject = plan.unit == "subject"
        return cls(
            dp=True, epsilon=epsilon_sgd + counts_info["epsilon"], delta=plan.delta, accountant=plan.accountant,
            noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps,
            max_grad_norm=plan.max_grad_norm, unit=plan.unit, epsilon_sgd=epsilon_sgd,
            epsilon_class_counts=counts_info["epsilon"], class_counts_release=counts_info,
            target_epsilon=plan.target_epsilon, planned_steps=plan.planned_steps, delta_rule=plan.delta_rule,
            population=plan.population, expected_batch_size=plan.expected_batch_size,
            sampling=("Poisson over subjects, one uniformly drawn slice per sampled subject" if subject
                      else "Poisson over slices"),
            protects=(f"adding or removing one {plan.unit} of the training file"
                      + ("" if subject else "; a subject with k slices is protected only at group-privacy level "
                         "(about k * epsilon): use --dp-unit subject for a per-subject guarantee")),
            composition="epsilon = epsilon_sgd (accountant) + epsilon_class_counts (basic composition)",
            public_inputs={**public_inputs, "dataset_size": "N treated as public"}, init_from=init_from,
            model_selection="last weights (no selection on private validation data)",
            randomness="Poisson sampling and Gaussian noise from a secret OS-entropy seed kept only in checkpoint.pt",
            dataset_fingerprint=fingerprint, references=list(REFERENCES))

    @property
    def differentially_private(self) -> bool:
        """Whether the ledger states a DP guarantee (``dp`` and an epsilon)."""
        return self.dp and self.epsilon is not None

    def pretraining(self) -> str | None:
        """The model's origin in one sentence when it started from another model (``--init-from``), else None:
        "pretrained on public data X; fine-tuned with (epsilon, delta)-DP" for a declared-public start under DP.
        Files are named by SHA-256 only (no path of the data holder's machine)."""
        init = self.init_from
        if not init:
            return None
        data = init.get("dataset_fingerprint") or {}
        what = ", ".join(filter(None, [
            f"data SHA-256 {data['data_sha256'][:12]}..." if data.get("data_sha256") else "data not recorded",
            f"{data['train_rows']} training images" if data.get("train_rows") is not None else None,
            f"model SHA-256 {init.get('model_sha256', '?')[:12]}..."]))
        source = (f"pretrained on public data ({what}; declared public by the user)" if init.get("declared_public")
                  else f"initialised from a model trained on other data ({what}; not declared public)")
        own = init.get("model_privacy") or {}
        if own.get("dp") and own.get("epsilon") is not None:
            source += f"; that model is itself ({own['epsilon']:.3g}, {own['delta']:.0e})-DP per {own.get('unit')}"
        if self.differentially_private:
            return f"{source}; fine-tuned with ({self.epsilon:.3g}, {self.delta:.0e})-DP per {self.unit}"
        return f"{source}; fine-tuned without differential privacy"

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in ``meta["privacy"]`` and in provenance: ``dp`` and the fields that are set."""
        data = {name: getattr(self, name) for name in _FIELDS}
        return {**{k: v for k, v in data.items() if v is not None or k == "dp"}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict | None) -> Ledger | None:
        """The ledger of a stored dict (None for models from before the ledger existed).

        A dict without ``dp`` is read as a DP claim, which holds only if it states an epsilon.
        """
        if data is None:
            return None
        known = {k: v for k, v in data.items() if k in _FIELDS}
        return cls(**{"dp": True, **known}, extra={k: v for k, v in data.items() if k not in _FIELDS})


_FIELDS = tuple(f.name for f in dataclasses.fields(Ledger) if f.name != "extra")  # in the stored order
