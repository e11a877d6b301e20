"""Error hierarchy of augflow.

Every error a user can cause is an :class:`AugflowError` (a ``ValueError``), so library callers can catch
one type and the CLI can turn it into a clean ``Error: ...`` message. Messages name the file, row or argument,
the problem and the allowed values.
"""


class AugflowError(ValueError):
    """Base class of all user-facing augflow errors."""


class DataError(AugflowError):
    """A dataset file (HDF5) is missing, malformed or violates the schema."""


class ManifestError(AugflowError):
    """A row of a `prepare` manifest or the NIfTI file it names cannot be used."""


class ConfigError(AugflowError):
    """A recipe, config key or command-line value is invalid."""


class PrivacyError(ConfigError):
    """A differential-privacy setting or model cannot give the promised guarantee."""


class PrivacyWarning(UserWarning):
    """The guarantee holds, but may protect less than the user expects (e.g. per slice, not per subject)."""
