"""A run owns its folder and never loses work.

- `RunLock`: one live `fit` per checkpoint folder; the lock is an OS file lock, so it dies with
  its process and a crashed run never blocks the next one.
- `LastCheckpoint`: `last.ckpt` always holds the newest state - every N steps, after every
  validation and at the end of training, whatever the best-checkpoint settings are.
- `GracefulStop`: SIGTERM or SIGINT ends training after the current step with a resumable
  checkpoint, and the command exits 143 or 130 instead of pretending it finished.
- `RefusalLeavesNoLogs`: a run refused before it starts leaves no log folder to take the next
  run's version number.
- `AtomicCheckpointIO`: a checkpoint is written to a temporary file beside its target, flushed to
  disk, then renamed over it; a failed write (a full disk) leaves the previous file intact.
- `read_checkpoint`: a checkpoint file is loadable and ours, or one line says why not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsa_lightning.errors import ConfigError, RunError, is_usage_error

if TYPE_CHECKING:
    from tsa_lightning.module import TSALanguageModel

LAST = "last.ckpt"
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


class RunLock:
    """An exclusive lock on a checkpoint folder for the lifetime of this process (or `release`)."""

    held: ClassVar[set[RunLock]] = set()

    def __init__(self, folder: Path) -> None:
        self.made = [p for p in (folder, *folder.parents) if not p.exists()]  # nearest first
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder.with_name(folder.name + ".lock")  # beside the folder: Lightning wants it empty
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the run lives
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise RunError(
                f"{folder} belongs to a run that is still going ({owner}); wait for it to finish, stop it, "
                "or start this one under another name (--trainer.logger.init_args.name=...)"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        RunLock.held.add(self)

    def release(self) -> None:
        for folder in self.made[:1]:  # a run that ended before saving anything leaves no empty folder
            with contextlib.suppress(OSError):  # (removed while the lock is held: no run can be using it)
                folder.rmdir()
        self.path.unlink(missing_ok=True)  # tidy; a lock file left by a crash is harmless
        self.file.close()  # closing the descriptor drops the lock
        RunLock.held.discard(self)
        for folder in self.made[1:]:  # the folders above it, once the lock file beside it is gone
            with contextlib.suppress(OSError):  # not empty: kept, with the folders above it
                folder.rmdir()

    @classmethod
    def release_all(cls) -> None:
        """For a command that ends without leaving the process (tests, notebooks)."""
        for lock in list(cls.held):
            lock.release()


class LastCheckpoint(Checkpoint):
    """Writes `<dirpath>/last.ckpt`: every `every_n_train_steps`, after each validation, at the end.

    Separate from the best-by-metric checkpoint (Lightning's ModelCheckpoint refreshes its `last`
    only when it also saves a top-k one, and versions the name when it finds a file it did not
    write): this one always overwrites the same path, so a stopped, moved or copied run resumes
    from its newest state. A `Checkpoint` subclass, so Lightning runs it after the callbacks whose
    state it saves (the best checkpoint's bookkeeping included).

    Args:
        every_n_train_steps: write `last.ckpt` at least this often (in optimizer steps), so that a
            killed run loses at most this many steps.
    """

    def __init__(self, every_n_train_steps: int = 100) -> None:
        if every_n_train_steps < 1:
            raise ConfigError(f"last_checkpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath: Path | None = None  # the run's checkpoint folder, set by the CLI
        self.saved_step: int | None = None
        self.ending = False  # saving the final state

    @property
    def path(self) -> Path:
        if self.dirpath is None:
            raise RunError("LastCheckpoint needs the run's checkpoint folder (dirpath)")
        return Path(self.dirpath) / LAST

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_train_steps == 0 and step != self.saved_step:  # once, accumulating too
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)  # after validation: with the newest calibration and best-checkpoint record

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ending = True  # max_steps, max_epochs, max_time or early stopping: the final state
        try:
            self.save(trainer)
        finally:
            self.ending = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Every checkpoint names its log version, so that a resume continues in the same folder.

        The final one records the logging step as Lightning's own save points do, before its last
        step counted: Lightning 2.6 adds that step back on every resume, and an extended run
        logged every later point one step late."""
        checkpoint["log_version"] = trainer.logger.version if trainer.logger is not None else None
        if self.ending:
            record_logged_step(checkpoint, max(0, logged_step(trainer) - 1))


class BestCheckpoint(ModelCheckpoint):
    """Lightning's best-checkpoint callback, which keeps its record when a run's folder was copied
    or moved and the run resumed there: the record's paths are rebased onto the files in the new
    folder. (Lightning 2.6 then keeps only `best_model_path`, in the old folder: the summary named
    a file elsewhere, and a copied best-*.ckpt stayed beside the new best with save_top_k 1.)"""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and Path(old) != Path(new):
            state_dict = rebased(state_dict, Path(old), Path(new))
        super().load_state_dict(state_dict)


def rebased(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """A ModelCheckpoint record moved from folder `old` to `new`: each file found in `new` under its
    name is recorded there; one found in neither is forgotten."""

    def moved(path: str) -> str:
        here = new / Path(path).name
        if path and Path(path).parent == old and here.is_file():
            return str(here)
        return path if path and Path(path).is_file() else ""

    record = {**state, "dirpath": str(new)}
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        record[key] = moved(state.get(key) or "")
    record["best_k_models"] = {
        here: score for path, score in state.get("best_k_models", {}).items() if (here := moved(path))
    }
    return record


def last_checkpoint(trainer: L.Trainer) -> LastCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)


def remove_partial_writes(folder: Path) -> None:
    """Temporary files of writes that a SIGKILL or a power cut interrupted (the targets are intact)."""
    for partial in folder.glob(".*.partial"):
        partial.unlink(missing_ok=True)


def is_launching_process() -> bool:
    """True in the process a user started (not in the extra ranks a DDP launcher spawns)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class GracefulStop(L.Callback):
    """SIGTERM or SIGINT: finish the current step (or validation batch), write `last.ckpt`, and exit
    143 or 130.

    Lightning already turns SIGTERM into an exception at the end of a training step or validation
    batch (points from which a checkpoint resumes exactly; an interrupted validation runs again);
    this callback routes SIGINT to the same place, from the sanity check on, writes the checkpoint
    there, and records the signal so that the command can exit with its status. A signal during the
    final validation lets it finish, since a resume at max_steps could not run it again (it holds
    the thorough calibration); the run then ends as usual. A second SIGINT interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.spawned = False
        self.handling = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum, self.handling = None, False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.take_over_signals(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.take_over_signals(trainer)

    def take_over_signals(self, trainer: L.Trainer) -> None:
        """From the first hook after the Trainer installs its handlers (the sanity check, else
        training) on; a SIGTERM before that reached Lightning's handler, which says so."""
        if self.handling:
            return
        self.handling = True
        self.signum = signal.SIGTERM if trainer.received_sigterm else None
        lightning_handler = signal.getsignal(signal.SIGTERM)  # installed by the Trainer just before
        # ddp_spawn's workers: Lightning's handler runs a collective inside the signal handler, which
        # hangs ranks caught in another one; they agree at the end of each step instead
        self.spawned = (
            isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and trainer.world_size > 1
        )

        def request_stop(signum: int, frame: Any) -> None:
            if self.signum == signal.SIGINT and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = self.signum or signum
            final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
            if trainer.validating and not trainer.sanity_checking and final:
                name = signal.Signals(signum).name
                print(
                    f"{name} during the final validation: it finishes first (Ctrl-C again stops at once)",
                    file=sys.stderr,
                )
                return
            if callable(lightning_handler) and not self.spawned:
                lightning_handler(signum, frame)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.spawned and trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            self.signum = self.signum or signal.SIGTERM  # the rank that was not signalled stops too
            self.save(trainer)  # a spawned worker's exception skips the callbacks' on_exception
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher ends the workers once one exits
            raise SIGTERMException(EXIT_CODES[signal.Signals(self.signum)])  # a SystemExit: exit 143 or 130

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        signum = signal.Signals(self.signum or signal.SIGTERM)
        path = self.save(trainer)
        exception.code = EXIT_CODES[signum]
        exception.add_note(stop_note(signum, f"step {trainer.global_step}", path))

    @staticmethod
    def save(trainer: L.Trainer) -> Path:
        last = last_checkpoint(trainer)
        path = last.path if last is not None else Path(trainer.default_root_dir) / LAST
        trainer.save_checkpoint(path)
        return path


class RefusalLeavesNoLogs(L.Callback):
    """A run refused before it starts (an option, corpus or checkpoint found wrong while it sets up,
    loads or checks its validation) leaves nothing in its log folder: Lightning opens the folder
    before any setup hook can refuse, and a new folder left behind would hold an empty run and take
    the next run's version number. Only what this process wrote goes (its event file, saved config
    and hyperparameters): a resumed run's folder keeps all it held, and another process's files stay."""

    def __init__(self, log_dir: str | None) -> None:
        self.folder = None if log_dir is None else Path(log_dir)
        self.held = set(self.folder.iterdir()) if self.folder is not None and self.folder.is_dir() else set()
        self.new = self.folder is not None and not self.folder.exists()
        self.started = False

    @classmethod
    def of(cls, trainer: L.Trainer) -> RefusalLeavesNoLogs:
        """Watches the run's log folder from the process a user started, unless workers it spawns set
        up (ddp_spawn: their refusals reach it as another exception, after they may have trained)."""
        spawning = isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)
        logged = where_logged(trainer) if is_launching_process() and not spawning else None
        return cls(logged and logged[0])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True  # set up, restored, validation checked: from here on its logs are its record

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.started or not trainer.sanity_checking

    on_test_start = on_predict_start = on_train_start

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if self.started or self.folder is None or not self.folder.is_dir() or not is_usage_error(exception):
            return
        trainer.logger.finalize("failed")  # its event file closed first (Lightning's own call: a no-op)
        written = {c.config_filename for c in trainer.callbacks if isinstance(c, SaveConfigCallback)}
        written.add(TensorBoardLogger.NAME_HPARAMS_FILE)  # saved once the hyperparameters are logged
        mine = f".{socket.gethostname()}.{os.getpid()}."  # in the name of each event file this process writes
        for path in set(self.folder.iterdir()) - self.held:
            if path.is_file() and (mine in path.name or path.name in written):
                with contextlib.suppress(OSError):
                    path.unlink()
        if self.new:
            with contextlib.suppress(OSError):  # something else was written there: kept
                self.folder.rmdir()


class ForwardSignals:
    """ddp_spawn: the process a user started only launches the workers that train, so a SIGTERM
    (`kill <pid>`) or Ctrl-C sent to it is forwarded to them; they stop as one process does
    (`GracefulStop`: the step finished, `last.ckpt` written) and exit, and the launcher exits 143 or
    130 naming the step saved (`stopped`). Without it the launcher died at once and left its
    workers behind. A second Ctrl-C interrupts at once."""

    received: ClassVar[int | None] = None
    last: ClassVar[Path | None] = None

    @classmethod
    def install(cls, last: Path | None) -> None:
        cls.received, cls.last = None, last

        def forward(signum: int, frame: Any) -> None:
            if cls.received == signal.SIGINT and signum == signal.SIGINT:
                raise KeyboardInterrupt
            cls.received = cls.received or signum
            for worker in multiprocessing.active_children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)

    @classmethod
    def stopped(cls) -> tuple[str, int] | None:
        """After the workers stopped on a forwarded signal: the line to print and the exit status."""
        if cls.received is None:
            return None
        signum = signal.Signals(cls.received)
        if cls.last is None or not cls.last.is_file():  # the workers had not started training
            return f"stopped by {signum.name} before training started; nothing to resume", EXIT_CODES[signum]
        step = f"step {read_checkpoint(cls.last)['global_step']}"
        return stop_note(signum, step, cls.last), EXIT_CODES[signum]


def stop_note(signum: signal.Signals, step: str, path: Path | None) -> str:
    """The line a run stopped by a signal ends with."""
    resume = "Resume with the same command plus --ckpt_path last"
    return f"stopped by {signum.name} at {step}; saved {path}. {resume}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the destination folder, flush to disk, then rename.

    Lightning's own writer stages the file elsewhere and moves it, which across filesystems (a
    Docker volume) is a copy that a full disk can cut short under the final name.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException as e:
            partial.unlink(missing_ok=True)
            if isinstance(e, OSError):
                kept = "the previous checkpoint there is intact" if path.exists() else "nothing was written"
                raise RunError(
                    f"could not write checkpoint {path}: {e.strerror or e}; {kept}. "
                    + ("Free some disk space" if e.errno == errno.ENOSPC else "Make the folder writable")
                    + ", then resume with --ckpt_path last"
                ) from e
            raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU, or raise RunError saying why it is not a usable one."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"checkpoint {path} is a folder; give a .ckpt file in it, e.g. {path / LAST}")
    if not path.is_file():
        raise RunError(
            f"checkpoint {path} does not exist; give the path of a .ckpt file, "
            "e.g. runs/<name>/checkpoints/last.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except PermissionError:
        raise  # reported as what it is
    except Exception:  # a cut-short zip fails to map or to unpack; other files fail to unpickle
        raise RunError(
            f"{path} is not a readable checkpoint (cut short, or not written by torch.save); "
            "use another checkpoint of the run, e.g. the best-*.ckpt beside it"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= checkpoint.keys():
        raise RunError(f"{path} is not a tsa-lightning checkpoint (it has no model hyperparameters)")
    if "config" not in checkpoint["hyper_parameters"]:  # a Lightning checkpoint of another model
        raise RunError(
            f"{path} was written by another LightningModule, or by a tsa-lightning version from before "
            "the network's options were grouped under model.config; train it again with this version"
        )
    return checkpoint


# Lightning (2.4-2.6) offers no public way to read or set two pieces of loop state a run needs. The
# four functions below are the only places that touch them, and tests fail when either changes:
# - `fit_loop.epoch_loop._batches_that_stepped`, the step every scalar is logged at (`validate` and
#   `test` of a checkpoint would log at step 0, a fit's validation one step early): `logged_step`,
#   `log_at_step`, `record_logged_step` (tests/test_resume.py::test_a_resume_logs_every_later_scalar_*,
#   tests/test_cli.py);
# - a checkpoint's record of the val loop's batch progress, which Lightning 2.6 reads to skip a
#   validation a signal interrupted: `rerun_interrupted_validation`
#   (tests/test_stopping.py::test_a_signal_during_validation_saves_and_the_resume_runs_that_validation_again).


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs scalars at: the global step in training, the checkpoint's step when
    validating or testing one (`log_at_step`)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_at_step(trainer: L.Trainer, step: int) -> None:
    """Make Lightning log what follows at `step`."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def record_logged_step(checkpoint: dict, step: int) -> None:
    """Make a checkpoint being written record `step` as the step a resume logs from."""
    checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] = step


def rerun_interrupted_validation(checkpoint: dict) -> None:
    """Make a checkpoint written in the middle of a fit's validation (a signal stopped it) resume by
    running that validation again from its first batch. Lightning 2.6 resumes such a checkpoint
    with the validation skipped, and re-runs one only when the checkpoint says a batch of it had
    started but not finished; its scores are never in a checkpoint, so the whole pass runs again.
    A checkpoint written after the validation's last batch is left as it is."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    if progress["is_last_batch"]:
        return
    before = progress["total"]["completed"] - progress["current"]["completed"]  # earlier validations' batches
    progress["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False


class FinalValidation(L.Callback):
    """A fit validates at its last step, also when max_steps is not a multiple of
    val_check_interval: Lightning validates only on the interval's steps and at an epoch's end, so
    a run of 3750 steps validated every 500 ended with its scores, its checkpoint's calibration (an
    elastic model's thorough one) and its summary from step 3500. Lightning validates after a step
    that sets `should_stop`, as early stopping does; at max_steps the fit ends there anyway."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class ValidationAtItsStep(L.Callback):
    """A fit's validation logs at the step its checkpoint, the summary and `validate` name (the
    optimizer steps taken); Lightning logs it at the index of the batch before, one less. The step
    goes back when the validation ends, and checkpoints written during it record Lightning's own
    (`on_save_checkpoint`), which a resume counts on; one written before it ended (a signal) makes
    the resume run it again."""

    def __init__(self) -> None:
        self.restore: int | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.restore = logged_step(trainer)
            log_at_step(trainer, trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restore is not None:
            log_at_step(trainer, self.restore)
            self.restore = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written during the validation (the best one, before the step goes back)
        records Lightning's own step, so that a resume from it logs where the run would have."""
        if self.restore is not None:
            record_logged_step(checkpoint, self.restore)
            rerun_interrupted_validation(checkpoint)


def checkpoint_folder(config) -> Path | None:
    """A run's checkpoints: --checkpoint.dirpath, else <save_dir>/<name>/checkpoints beside its logs.

    Derived at run time, never written into the run's config.yaml: a config reused under another
    name gets a folder of its own.
    """
    if config.checkpoint.dirpath is not None:
        return Path(config.checkpoint.dirpath)
    args = logger_args(config)
    if args is None or "save_dir" not in args:
        return None
    return Path(args.save_dir) / (args.get("name") or "") / "checkpoints"


def logger_args(config) -> Namespace | None:
    """The logger's init_args in a parsed config (None: no logger, or one given as an object)."""
    logger = config.trainer.logger
    return logger.init_args if logger and hasattr(logger, "init_args") else None


def side_run_version(args: Namespace, subcommand: str, step: int) -> str:
    """The log folder of a `validate`, `test` or `predict` of a checkpoint trained to `step`, beside
    the training runs: `<command>_step<N>`, then `_2`, `_3`, ... so that no two share a folder."""
    root = Path(args.save_dir or ".") / (args.name or "")
    version, n = f"{subcommand}_step{step}", 1
    while (root / (version if n == 1 else f"{version}_{n}")).exists():
        n += 1
    return version if n == 1 else f"{version}_{n}"


def where_logged(trainer: L.Trainer) -> tuple[str, Path] | None:
    """The run's log folder and the folder to give `tensorboard --logdir` (not trainer.log_dir,
    which waits for every rank)."""
    log_dir = getattr(trainer.logger, "log_dir", None)
    return None if log_dir is None else (log_dir, Path(log_dir).parent.parent)


def resumes_own_run(config) -> bool:
    """Whether fit resumes from a checkpoint in this run's own folder (not another run's)."""
    folder, ckpt_path = checkpoint_folder(config), config.get("ckpt_path")
    if folder is None or ckpt_path is None:
        return False
    return Path(ckpt_path).parent.resolve() == folder.resolve()


def resolve_last(ckpt_path: str | None, folder: Path | None, subcommand: str) -> str | None:
    """`last` means this run's own `<folder>/last.ckpt`; without one, fit starts anew (nothing to resume)."""
    if ckpt_path != "last":
        return ckpt_path
    last = folder / LAST if folder is not None else None
    if last is not None and last.is_file():
        return str(last)
    others = list(folder.glob("*.ckpt")) if folder is not None and folder.is_dir() else []
    if others:
        newest = max(others, key=os.path.getmtime)
        raise RunError(
            f"{folder} has no {LAST} (the run was killed before writing one); resume from its newest "
            f"checkpoint with --ckpt_path {newest}, or start a new run under another name"
        )
    if subcommand != "fit":
        raise RunError(f"--ckpt_path last: there is no {last or LAST}; give the .ckpt file to {subcommand}")
    print(f"No checkpoint to resume in {folder}: a new run starts.", file=sys.stderr)
    return None


def load_checkpoint(ckpt_path: str | None) -> TSALanguageModel:
    """The module saved by `fit`, on the CPU; refused in one line when unusable or older than model.config."""
    if ckpt_path is None:
        raise ConfigError("--ckpt_path is required: the .ckpt file written by `fit`")
    from tsa_lightning.module import TSALanguageModel  # here: the module reads checkpoints through this file

    read_checkpoint(ckpt_path)  # one line for a missing, cut-short or foreign file
    return TSALanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")


def run_of(ckpt_path: str | Path) -> str:
    """The run a checkpoint belongs to: the folder holding its `checkpoints/`, else its file's stem."""
    path = Path(ckpt_path).resolve()
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
