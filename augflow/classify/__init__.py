"""Classification with a trained model of any family (``augflow classify``).

- :mod:`~augflow.classify.metrics`: the metrics and the :class:`~augflow.classify.metrics.Scores` every
  classifier reports through;
- :mod:`~augflow.classify.likelihood`: MAGIC-Flow's Bayes classifier with the exact likelihood;
- :mod:`~augflow.classify.readout`: MedSymmFlow's read-out of the integrated class mask;
- :mod:`~augflow.classify.calibration`: the calibration temperature, fitted and stored beside the model;
- :mod:`~augflow.classify.dispatch`: one entry for every family, and the predictions file.
"""

from augflow.classify.dispatch import classify_file, write_predictions

__all__ = ["classify_file", "write_predictions"]
