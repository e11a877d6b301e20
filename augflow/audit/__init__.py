"""``augflow audit``: fidelity, diversity, memorization, privacy and downstream utility of a synthetic dataset.

One module per concept, each a pure staged function (features -> statistics -> value) returning a dict with
stable keys; :func:`~augflow.audit.run.run_audit` runs them in order and writes ``metrics.json``, ``report.md``
and ``report.html`` with the verdict, a data card and the release gate:

- :mod:`~augflow.audit.features`: the feature space (a domain encoder trained on the real training file,
  cached; or Inception-v3 from a local weights file), registered with torch-fidelity.
- :mod:`~augflow.audit.fidelity`: FID, KID, precision/recall/density/coverage beside real-vs-real references.
- :mod:`~augflow.audit.diversity`: intra- and inter-class MS-SSIM.
- :mod:`~augflow.audit.memorization`: distance to closest record, copy detection, membership inference.
- :mod:`~augflow.audit.downstream`: a CNN trained on real / real + synthetic / synthetic, tested on real.
- :mod:`~augflow.audit.baseline`: that CNN (a ResNet-18 from scratch), also the domain encoder's network.
- :mod:`~augflow.audit.verdict`: the verdict lines a data steward reads first (privacy, usefulness, fidelity, gate).
- :mod:`~augflow.audit.report`: the release gate and the report files (no absolute path in them).
- :mod:`~augflow.audit.run`: the audit job, and the models' membership scores.
"""


from augflow.audit.features import EncoderRecipe
from augflow.audit.report import GateThresholds, release_gate
from augflow.audit.run import run_audit

__all__ = ["EncoderRecipe", "GateThresholds", "release_gate", "run_audit"]
