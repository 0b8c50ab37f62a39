"""The package's errors: each message says what to fix.

The command line prints these in one line and exits 1; any other exception is a bug and keeps
its traceback. From Python, catch `TSAError` (or the standard type each one also is).
"""

import errno
import math
import os
import re
import traceback
from argparse import ArgumentError
from pathlib import Path

import yaml


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


def check_finite_loss(loss, step: int) -> None:
    """A non-finite training loss stops the run before it can reach a checkpoint."""
    if not math.isfinite(float(loss)):
        raise TrainingDiverged(
            f"training loss became {float(loss)} at step {step}; stopped before it could reach a checkpoint "
            "(the last good one is kept). Lower learning_rate, raise warmup_steps or set "
            "trainer.gradient_clip_val, then resume with --ckpt_path last"
        )


def check_finite_weights(named_parameters) -> None:
    """Non-finite weights would overwrite the last good checkpoint: refused instead."""
    broken = [name for name, p in named_parameters if not p.isfinite().all()]
    if broken:
        raise TrainingDiverged(f"weights became non-finite ({', '.join(broken[:3])}); checkpoint not written")


def check_range(name: str, value: float | None, low: float, high: float = math.inf) -> None:
    """A command's option (`--name`) refused in one line when outside [low, high]."""
    if value is not None and not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ConfigError(f"--{name} must be {bounds}, got {value}")


def check_arguments(argv: list[str]) -> None:
    """Faults jsonargparse would report without naming the argument or the file: found here first."""
    for i, arg in enumerate(argv):
        try:
            arg.encode()
        except UnicodeEncodeError:
            raise RunError(
                f"argument {os.fsencode(arg)!r} is not valid UTF-8 (a file name in another encoding?); "
                "rename the file, or link to it under a UTF-8 name"
            ) from None
        config = arg.removeprefix("--config=") if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        if config and Path(config).is_file():
            try:
                yaml.safe_load(Path(config).read_bytes().decode())
            except UnicodeDecodeError as e:
                raise RunError(
                    f"config file {config} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                    "save it as UTF-8"
                ) from None
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                problem = getattr(e, "problem", e)
                raise RunError(f"config file {config} is not valid YAML{at}: {problem}") from None


def explained(message: str) -> str:
    """One line: jsonargparse's reasons without its dump of every type a value could have had."""
    if "Errors:" not in message:
        return " ".join(message.split())
    head = message.split("Does not validate")[0]
    errors = message.split("Errors:", 1)[1].split("Given value")[0]
    reasons = [" ".join(item.split()) for item in re.split(r"\n\s*- ", "\n" + errors) if item.strip()]
    return " ".join((head + "; ".join(r for r in reasons if "NoneType" not in r)).split())


def is_usage_error(e: BaseException) -> bool:
    """The package's own errors, a file-system fault, or an option jsonargparse refused while
    building the classes; any other exception is a bug and keeps its traceback."""
    if isinstance(e, ArgumentError | TSAError | OSError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and "jsonargparse" in frames[-1].filename


def one_line(e: BaseException, command: str) -> str:
    if isinstance(e, ArgumentError):  # an unknown key or a wrong type, from the command line or a file
        return f"{explained(str(e))} (see `tsa-lightning {command} --help` for the options)"
    if isinstance(e, OSError):  # a full disk, a read-only folder
        return describe_os_error(e)
    return explained(str(e))


def describe_os_error(e: OSError) -> str:
    """One line for a file-system fault a user can fix."""
    where = " -> ".join(str(name) for name in (e.filename, e.filename2) if name is not None) or "a file"
    hints = {
        errno.ENOSPC: "the disk is full: free some space, then resume with --ckpt_path last",
        errno.EACCES: "permission denied: make it writable/readable or choose another folder",
        errno.EPERM: "permission denied: make it writable/readable or choose another folder",
        errno.EROFS: "the file system is read-only: choose another folder",
        errno.EISDIR: "this is a folder, but a file is needed here",
        errno.ENOTDIR: "a file stands where a folder is needed",
        errno.ENOENT: "no such file or folder",
    }
    return f"{where}: {hints.get(e.errno, e.strerror or str(e))}"
