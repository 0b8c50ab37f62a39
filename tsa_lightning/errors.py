"""The package's errors: each message says what to fix.

The command line prints these in one line and exits 1; any other exception is a bug and keeps
its traceback. From Python, catch `TSAError` (or the standard type each one also is).
"""

import math


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


def check_range(name: str, value: float | None, low: float, high: float = math.inf) -> None:
    """A command's option (`--name`) refused in one line when outside [low, high]."""
    if value is not None and not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ConfigError(f"--{name} must be {bounds}, got {value}")
