"""The package's errors: each message says what to fix.

The command line prints these in one line and exits 1; any other exception is a bug and keeps
its traceback. From Python, catch `TSAError` (or the standard type each one also is).
"""


class TSAError(Exception):
    """Input the package cannot use; the message says what to fix."""


class ConfigError(TSAError, ValueError):
    """An option out of range, or options that do not fit together."""


class CorpusError(TSAError):
    """A corpus is missing, corrupt or unusable."""


class RunError(TSAError, RuntimeError):
    """Work could not be saved, or a run folder or checkpoint cannot be used."""


class TrainingDiverged(TSAError, FloatingPointError):
    """The loss or the weights became non-finite."""
