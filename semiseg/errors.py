"""User-facing errors.

Every error a user can cause (bad config, bad data, bad checkpoint) is raised as a
:class:`SemisegError` subclass whose message is one line naming the file, key or value
and what was expected. The CLI prints that line and exits non-zero without a traceback.
"""


class SemisegError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(SemisegError):
    """Invalid config file, key, type or value (exit code 2)."""

    exit_code = 2


class DataError(SemisegError):
    """Missing, unreadable or inconsistent data (image, mask, split file, data root)."""

    exit_code = 3


class CheckpointError(SemisegError):
    """Missing, corrupt or incompatible checkpoint."""

    exit_code = 4


class TrainingError(SemisegError):
    """Training cannot go on: non-finite losses past ``train.nonfinite``'s allowance, or weights
    that hold NaN/inf where a checkpoint would be written."""

    exit_code = 5


class SemisegWarning(UserWarning):
    """Something the user should know that does not stop the command (a skipped unreadable
    file, a resumed run without a checkpoint yet). The CLI prints it as one line."""


def warn(message: str) -> None:
    """Issue a :class:`SemisegWarning` (``semiseg: warning: ...`` on one line in the CLI)."""
    import warnings

    warnings.warn(message, SemisegWarning, stacklevel=3)
