"""Train, score and sample TSA language models: LightningCLI's fit/validate/test/predict, sample, evaluate.

tsa-lightning fit --config configs/shakespeare_cpu.yaml
tsa-lightning sample --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --prompt "ROMEO:"
tsa-lightning evaluate --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --data ShakespeareDataModule
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
from jsonargparse import auto_cli
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsa_lightning import names
from tsa_lightning.callbacks import (
    BudgetCurve,
    Dashboard,
    DepthMap,
    HaltingHistograms,
    HardSample,
    PredictionWriter,
    RunProgressBar,
)
from tsa_lightning.compatibility import given_model_options, options_to_apply
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import RunError, TSAError, check_arguments, is_usage_error, one_line
from tsa_lightning.evaluation import evaluate
from tsa_lightning.inference import sample
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import (
    AtomicCheckpointIO,
    BestCheckpoint,
    FinalValidation,
    ForwardSignals,
    GracefulStop,
    LastCheckpoint,
    RefusalLeavesNoLogs,
    RunLock,
    ValidationAtItsStep,
    checkpoint_folder,
    is_launching_process,
    last_checkpoint,
    logger_args,
    read_checkpoint,
    remove_partial_writes,
    resolve_last,
    resumes_own_run,
    side_run_version,
    where_logged,
)
from tsa_lightning.summary import ValidationHistory, end_of_run

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "tsa_lightning.callbacks.TensorBoard",
        "init_args": {"save_dir": "runs", "name": "tsa", "default_hp_metric": False},
    },
    "max_steps": 5000,
    "val_check_interval": 500,
    "check_val_every_n_epoch": None,  # validation is counted in steps, across epoch boundaries
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
}


class SaveRunConfig(SaveConfigCallback):
    """The run's `config.yaml`; a resume continuing the same log folder saves `config.resume<n>.yaml`
    beside it, so that the first command and every later one are all kept."""

    def setup(self, trainer: Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            resumes = 1
            while (Path(log_dir) / f"config.resume{resumes}.yaml").exists():
                resumes += 1
            self.config_filename = f"config.resume{resumes}.yaml"
        super().setup(trainer, pl_module, stage)


class TSALightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the corpus decides the vocabulary and the context: written once, in data
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.alphabet", "model.alphabet", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.config.block_size", apply_on="instantiate")
        parser.add_lightning_class_args(Dashboard, "dashboard")
        parser.add_lightning_class_args(HaltingHistograms, "halting_histograms")
        parser.add_lightning_class_args(DepthMap, "depth_map")
        parser.add_lightning_class_args(BudgetCurve, "budget_curve")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(HardSample, "hard_sample")
        # the best checkpoint by the metric; `last.ckpt` is LastCheckpoint's alone (added after it,
        # so it runs after it and saves its newest record)
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": False,
                "checkpoint.monitor": names.loss("val", "hard"),
                "checkpoint.mode": "min",
                "checkpoint.filename": "best-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """A checkpoint path that names no usable file fails here, in one line, before Lightning reads it;
        `last` becomes this run's own `last.ckpt`."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.checkpoint.save_last:
            raise RunError(
                "drop --checkpoint.save_last: every run writes last.ckpt itself (every "
                "--last_checkpoint.every_n_train_steps steps, after each validation and at the end)"
            )
        config.ckpt_path = resolve_last(config.get("ckpt_path"), checkpoint_folder(config), subcommand)
        self.saved = None  # the checkpoint's contents, read once (memory-mapped)
        if config.ckpt_path and config.ckpt_path not in ("best", "hpc", "registry"):
            self.saved = read_checkpoint(config.ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's model options, except those given here: refused on resume, applied otherwise
        (compatibility.py says which). Overrides a private method of Lightning 2.x's LightningCLI,
        which writes the checkpoint's hyperparameters over the parsed config; its name and call are
        checked by tests/test_cli.py."""
        if self.saved is None:
            return
        subcommand = self.config.subcommand
        defaults = self._subcommand_parsers[subcommand].get_defaults().model
        given = given_model_options(self.config[subcommand].model, defaults)
        differing = options_to_apply(subcommand, given, self.saved, self.config[subcommand].ckpt_path)
        super()._parse_ckpt_path()
        for key, value in differing.items():  # what validate/test/predict were asked for wins
            self.config[subcommand].model[key] = value

    def before_instantiate_classes(self) -> None:
        """A resumed run continues its own log version: TensorBoard shows one run, not two. Each
        `validate`, `test` and `predict` of a checkpoint logs beside the training runs in a folder of
        its own, `<command>_step<N>` (then `_2`, ...)."""
        if self.saved is None:
            return
        config = self.config[self.subcommand]
        args = logger_args(config)
        if args is None or "version" not in args or args.version is not None:
            return
        if self.subcommand != "fit":
            args.version = side_run_version(args, self.subcommand, self.saved.get("global_step", 0))
        elif resumes_own_run(config):
            args.version = self.saved.get("log_version")

    def after_validate(self) -> None:
        self.say_where_logged()

    after_test = after_validate

    def after_predict(self) -> None:
        self.say_where_logged()
        written = [c.path(self.trainer) for c in self.trainer.callbacks if isinstance(c, PredictionWriter)]
        for path in written if self.trainer.is_global_zero else []:
            print(f"Wrote {path}", file=sys.stderr)

    def say_where_logged(self) -> None:
        logged = where_logged(self.trainer)
        if self.trainer.is_global_zero and logged is not None:
            log_dir, board = logged
            print(f"Logged to {log_dir} (tensorboard --logdir {board})", file=sys.stderr)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Every run writes checkpoints atomically into its own folder and stops cleanly on a signal."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        folder = checkpoint_folder(self.config[self.subcommand]) if self.subcommand else None
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint | LastCheckpoint) and callback.dirpath is None:
                callback.dirpath = folder and os.path.realpath(folder)
        trainer.callbacks += [ValidationAtItsStep(), FinalValidation(), GracefulStop(), ValidationHistory()]
        trainer.callbacks.append(RefusalLeavesNoLogs.of(trainer))
        defaults = (TQDMProgressBar, RichProgressBar)  # Lightning's own, counting batches per epoch
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) in defaults:
                trainer.callbacks[i] = RunProgressBar()
        return trainer

    def before_fit(self) -> None:
        """The run owns its checkpoint folder: one live run per folder, never over an earlier run's work."""
        config = self.config_init.fit
        folder = checkpoint_folder(config)
        if folder is None or not is_launching_process():
            return
        RunLock(folder)  # held until the process ends (RunLock.held), never by an object a process pickles
        if isinstance(self.trainer.strategy.launcher, _MultiProcessingLauncher):  # ddp_spawn
            last = last_checkpoint(self.trainer)
            ForwardSignals.install(last.path if last is not None else None)
        remove_partial_writes(folder)
        if not resumes_own_run(config) and any(folder.glob("*.ckpt")):
            raise RunError(
                f"{folder} already holds checkpoints of an earlier run. Resume it with "
                "`--ckpt_path last`, or start a new run under another name "
                "(--trainer.logger.init_args.name=...) or folder (--checkpoint.dirpath=...)."
            )
        logged = where_logged(self.trainer)
        if logged is not None:
            log_dir, board = logged
            print(f"Logs: {log_dir} (watch them: tensorboard --logdir {board})", file=sys.stderr)
        print(f"Checkpoints: {folder}", file=sys.stderr)

    def after_fit(self) -> None:
        """Where everything went, the final metrics, and what to run next."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        print(end_of_run(trainer), file=sys.stderr)


SUBCOMMANDS = {"sample": sample, "evaluate": evaluate}


def overview() -> argparse.ArgumentParser:
    """`tsa-lightning --help`: every subcommand, Lightning's and ours; each has its own --help."""
    parser = argparse.ArgumentParser(prog="tsa-lightning", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    functions = {name: getattr(L.Trainer, name) for name in LightningCLI.subcommands()} | SUBCOMMANDS
    for name, function in functions.items():
        first_sentence = " ".join(function.__doc__.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        commands.add_parser(name, help=first_sentence)
    return parser


class LightningNotes(logging.Filter):
    """Drops Lightning's notes that concern nothing the user did: an advertisement, the loading
    default it picks for checkpoints (which this package writes itself), and its note that fit
    reached max_steps (printed into the open progress bar, which then drew itself twice; the run's
    summary says where it stopped)."""

    DROPPED = ("💡 Tip:", "`weights_only` was not set", "`Trainer.fit` stopped:")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in self.DROPPED)


def quiet_lightning() -> None:
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, LightningNotes) for f in logger.filters):
            logger.addFilter(LightningNotes())
    warnings.filterwarnings("ignore", message=".*treespec.*")  # inside Lightning, about a torch internal
    # a resumed run's own folder is not empty; a new run over another's is refused before this
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")


def main(args: list[str] | None = None) -> None:
    """Bad input ends in one line that says what to fix; TSA_TRACEBACK=1 shows the traceback instead."""
    quiet_lightning()
    ForwardSignals.received = None
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        overview().parse_args(argv)
    try:
        check_arguments(argv)
        if argv and argv[0] in SUBCOMMANDS:
            auto_cli(SUBCOMMANDS[argv[0]], args=argv[1:], exit_on_error=False)
            return
        TSALightningCLI(
            TSALanguageModel,
            TextDataModule,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_callback=SaveRunConfig,
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except SIGTERMException as e:  # stopped by a signal, with a resumable checkpoint
        print(*getattr(e, "__notes__", []), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: nothing half-written stays
        interrupted = "error: interrupted (Ctrl-C); an interrupted `fit` resumes with --ckpt_path last"
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except (ArgumentError, TSAError, OSError, ValueError) as e:
        if os.environ.get("TSA_TRACEBACK") or not is_usage_error(e):
            raise
        sys.exit(f"error: {one_line(e, argv[0] if argv else 'fit')}")
    except Exception:
        stopped = ForwardSignals.stopped()  # ddp_spawn's workers stopped by a signal, their state saved
        if stopped is None:
            raise
        print(stopped[0], file=sys.stderr)
        sys.exit(stopped[1])
    finally:
        RunLock.release_all()


if __name__ == "__main__":
    main()
