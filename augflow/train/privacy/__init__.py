"""Differentially private training: DP-SGD with exact per-sample gradients, and the privacy ledger.

DP wraps the one training loop (:mod:`augflow.train.loop`), it does not fork it: under ``privacy.enabled`` the loop
runs a :class:`~augflow.train.privacy.session.PrivacySession` instead of a plain one, which owns the plan, the secret
seed, the accountant, the units of privacy and the ledger. The modules:

- :mod:`~augflow.train.privacy.checks`: the ``[privacy]`` settings and the model's compatibility with DP-SGD;
- :mod:`~augflow.train.privacy.public`: the public images of the mask and of ActNorm's initialisation;
- :mod:`~augflow.train.privacy.sampling`: units of privacy, Poisson sampling and the secret seed;
- :mod:`~augflow.train.privacy.accounting`: the calibrated plan, the accountants and the noisy class counts;
- :mod:`~augflow.train.privacy.gradients`: exact per-sample gradients and one DP-SGD step;
- :mod:`~augflow.train.privacy.trainable`: what DP-SGD trains (``privacy.trainable``) after a public ``--init-from``;
- :mod:`~augflow.train.privacy.ledger`: the privacy ledger stored with the model and everything made from it;
- :mod:`~augflow.train.privacy.session`: the session the loop runs.

What they do:

- **Sampling.** Each step takes every unit of privacy independently with probability ``q = batch_size / N``
  (Poisson sampling, the setting of the accountants' analysis). A unit is one slice (``unit = "slice"``) or one
  subject (``unit = "subject"``: a sampled subject contributes one of its slices, drawn uniformly, so each step
  touches a subject at most once and ``q`` and ``N`` count subjects).
- **Per-sample gradients.** ``torch.func.vmap(torch.func.grad(...))`` of the model's per-sample objective through
  ``functional_call``, over the *whole model*: exact also for log-determinant terms of ActNorm and the LU 1x1
  convolution, which Opacus' hook and functorch modes silently drop (see the design notes). They are assigned to
  ``p.grad_sample`` and clipped, summed and noised by :class:`opacus.optimizers.DPOptimizer` (its "no_op" use: the
  optimizer only reads ``p.grad_sample``). A Poisson batch is processed in microbatches of ``privacy.microbatch``
  examples; each is a virtual step (``signal_skip_step``) that clips and accumulates, and the Gaussian noise
  ``N(0, sigma^2 C^2)`` is added once per Poisson batch, even an empty one.
- **Accounting.** The noise multiplier ``sigma`` is calibrated with
  :func:`opacus.accountants.utils.get_noise_multiplier` so that the planned number of steps (``train.epochs``
  passes over the units) spends exactly the DP-SGD part of the budget; an :class:`~opacus.accountants.RDPAccountant`
  or :class:`~opacus.accountants.PRVAccountant` is stepped once per step, saved in every checkpoint and continued
  on ``--resume``; training stops before the budget would be exceeded.
- **Nothing private outside the accounting.** The application mask and the ActNorm initialisation come from the
  public MNI152 template shipped with nilearn (or a mask file the user declares public); the training class
  counts stored with the model are declared public or released with the Laplace mechanism, whose epsilon is
  composed into the ledger (basic composition); the released model is the last one (no selection on private
  validation data); the sampling and noise are drawn from a secret seed (OS entropy) kept only in the private
  ``checkpoint.pt``, so a resumed run is exact while the released model does not reveal them.
- **Public pretraining.** A run may start from a model the user declares trained on public data
  (``--init-from MODEL --init-from-public``, :mod:`augflow.train.init_from`): its weights, mask and ActNorm replace
  the template's; parameters frozen by ``privacy.trainable`` must come from it. The ledger records the model's
  SHA-256, its data fingerprint and the declaration; the guarantee covers the private fine-tuning data.

The guarantee is (epsilon, delta)-DP of the released model (and everything made from it) with respect to adding or
removing one unit of the training file; the dataset size N is treated as public, as in Abadi et al. The run folder
itself (``checkpoint.pt``, ``metrics.jsonl`` with validation losses) is the data holder's and is not covered.

References:
    Abadi et al., "Deep Learning with Differential Privacy", 2016, arXiv:1607.00133 (DP-SGD).
    Mironov, "Renyi Differential Privacy", 2017, arXiv:1702.07476 (RDP accountant).
    Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019,
    arXiv:1908.10530.
    Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy", 2021, arXiv:2106.02848 (PRV).
    Dwork, McSherry, Nissim & Smith, "Calibrating Noise to Sensitivity in Private Data Analysis", 2006
    (Laplace mechanism).
    Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021, arXiv:2109.12298.
"""
