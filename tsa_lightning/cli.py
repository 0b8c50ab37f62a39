"""Train, score and sample TSA language models: LightningCLI's fit/validate/test/predict, sample, evaluate.

tsa-lightning fit --config configs/shakespeare_cpu.yaml
tsa-lightning sample --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --prompt "ROMEO:"
tsa-lightning evaluate --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --data ShakespeareDataModule
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
import warnings
from argparse import ArgumentError
from dataclasses import fields
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from jsonargparse import Namespace, auto_cli
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsa_lightning import names
from tsa_lightning.budget import probability
from tsa_lightning.callbacks import (
    BudgetCurve,
    Dashboard,
    DepthMap,
    HaltingHistograms,
    HardSample,
    PredictionWriter,
    RunProgressBar,
)
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import ConfigError, RunError, TSAError
from tsa_lightning.evaluation import (
    evaluate,
)
from tsa_lightning.inference import check_sampling
from tsa_lightning.model import TSAConfig, skip_logit
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import (
    AtomicCheckpointIO,
    GracefulStop,
    LastCheckpoint,
    RunLock,
    checkpoint_folder,
    describe_os_error,
    is_launching_process,
    last_checkpoint,
    load_checkpoint,
    logger_args,
    read_checkpoint,
    remove_partial_writes,
    resolve_last,
    resumes_own_run,
    where_logged,
)

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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        """The checkpoint's model options, except those given here: refused on resume, applied otherwise.

        Lightning replaces every model option with the checkpoint's, silently. A resumed `fit`
        continues the checkpoint's training (its optimizer, its schedule), so an option given
        differently would be dropped: refuse it. `validate`, `test` and `predict` apply the given
        options that do not change the weights' shapes (a threshold, a budget).
        """
        if self.saved is None:
            return
        subcommand = self.config.subcommand
        ckpt_path = self.config[subcommand].ckpt_path
        saved = self.saved["hyper_parameters"]
        given = given_model_options(self.config[subcommand].model, self._subcommand_parsers[subcommand])
        differing = {
            key: value for key, value in given.items() if normalized(value) != normalized(lookup(saved, key))
        }
        shape_fields = {f"config.{f.name}" for f in fields(TSAConfig) if f.metadata.get("shape")}
        refused = (
            differing if subcommand == "fit" else {k: v for k, v in differing.items() if k in shape_fields}
        )
        if refused:
            listed = ", ".join(
                f"{key}={value!r} (checkpoint: {lookup(saved, key)!r})" for key, value in refused.items()
            )
            advice = (
                "a resumed run continues the checkpoint's training; drop these options to resume it, or "
                "start a new run under another name"
                if subcommand == "fit"
                else "these change the network's shape; use the run's own config.yaml with its checkpoint"
            )
            raise RunError(
                f"the checkpoint {ckpt_path} was trained with other model options: {listed}; {advice}"
            )
        if "compute_budget" in differing and "budget.running" not in self.saved["state_dict"]:
            raise ConfigError(
                f"the checkpoint {ckpt_path} was trained without a compute budget, so it has no threshold "
                "for one: drop --model.compute_budget and give --model.config.skip_threshold, or sweep "
                "thresholds with `tsa-lightning evaluate`"
            )
        super()._parse_ckpt_path()
        for key, value in differing.items():  # what validate/test/predict were asked for wins
            self.config[subcommand].model[key] = value

    def before_instantiate_classes(self) -> None:
        """A resumed run continues its own log version: TensorBoard shows one run, not two. `validate`,
        `test` and `predict` of a checkpoint log beside the training runs as `<command>_step<N>`."""
        if self.saved is None:
            return
        config = self.config[self.subcommand]
        args = logger_args(config)
        if args is None or "version" not in args or args.version is not None:
            return
        if self.subcommand != "fit":
            args.version = f"{self.subcommand}_step{self.saved.get('global_step', 0)}"
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
        trainer.callbacks.append(GracefulStop())
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


def end_of_run(trainer: Trainer) -> str:
    lines = [f"Run finished at step {trainer.global_step}."]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    labels = {
        names.loss("val", "hard"): "hard-mode bpc",
        names.of_split("val"): "TLOps saved",
        names.of_split("val", "flops_saved"): "FLOPs saved",
    }
    shown = [f"{label} {metrics[k]:.4f}" for k, label in labels.items() if k in metrics]
    shares = names.block_shares(metrics, "val")
    if shares:
        shown.append(f"mean blocks per token {sum(shares):.2f} of {len(shares)}")
        shown.append("each block ran for " + " ".join(f"{share:.0%}" for share in shares))
    if shown:
        lines.append("  last validation: " + ", ".join(shown))
    module = trainer.lightning_module
    shown = module.budget.shown() if module.elastic_range else []
    budgets = {b: metrics.get(names.at_budget(b, "bpc")) for b in shown}
    if shown:
        low, high = module.elastic_range
        lines.append(
            f"  elastic depth:   trained for every budget in [{low:g}, {high:g}]; evaluation and sampling "
            f"run at {module.budget.budget:g} unless given --budget"
        )
    if budgets and None not in budgets.values():
        each = ", ".join(f"{b:.2f} {bpc:.4f}" for b, bpc in budgets.items())
        lines.append(f"  bpc by budget:   {each}")
    last = last_checkpoint(trainer)
    if last is not None and last.path.is_file():
        lines.append(f"  final state:     {last.path}")
    best = trainer.checkpoint_callback
    if best is not None and best.best_model_path:
        score = f" ({best.monitor} {float(best.best_model_score):.4f})" if best.best_model_score else ""
        lines.append(f"  best checkpoint: {best.best_model_path}{score}")
    logged = where_logged(trainer)
    if logged is not None:
        log_dir, board = logged
        lines.append(f"  logs:            {log_dir}  (see them: tensorboard --logdir {board})")
    if last is not None and last.path.is_file():
        at = f" --budget {min(shown):.2f}" if shown else ""
        lines.append(f"  next:            tsa-lightning sample --ckpt_path {last.path}{at}")
    return "\n".join(lines)


def given_model_options(model: Namespace, parser: LightningArgumentParser) -> dict:
    """Model options whose value is not the parser's default: those the command line or a config gave."""
    defaults = parser.get_defaults().model
    return {key: value for key, value in model.items() if normalized(value) != normalized(defaults.get(key))}


def lookup(hparams: dict, key: str):
    """`config.n_layer` in a checkpoint's nested hyperparameters."""
    for part in key.split("."):
        hparams = hparams.get(part) if isinstance(hparams, dict) else None
    return hparams


def normalized(value):
    return list(value) if isinstance(value, tuple) else value


def sample(
    ckpt_path: str | None = None,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    mode: Literal["soft", "hard"] | None = None,
    threshold: float | None = None,
    seed: int = 1337,
    compile: bool = False,
    budget: float | None = None,
) -> str:
    """Print text sampled from a checkpoint with the KV-cache decoder.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        prompt: text to continue (in the corpus alphabet).
        max_new_tokens: how many tokens to generate (>= 1).
        temperature: softmax temperature (>= 0); 0 is greedy.
        top_k: sample only among the k most likely tokens (>= 1).
        mode: "soft" (every block runs) or "hard" (tokens skip blocks); default: the mode the model
            was trained for (hard for a straight-through gate, early exit and Mixture-of-Depths).
        threshold: skip threshold for hard mode, in [0, 1.01] (default: the trained model's).
        budget: an elastic checkpoint's budget (a share of the routed blocks run) to decode at,
            within the range it was trained for (default: its compute_budget).
        seed: random seed for sampling.
        compile: run the decoding steps through torch.compile (the first call compiles for
            seconds; docs/speed.md says when it pays).
    """
    check_sampling(max_new_tokens, temperature, top_k, threshold)
    if budget is not None and threshold is not None:
        raise ConfigError("give --budget or --threshold, not both: a budget sets the threshold")
    module = load_checkpoint(ckpt_path).eval()
    threshold = module.threshold_at(budget) if budget is not None else threshold
    torch.manual_seed(seed)
    if compile:  # skipping is data-dependent: dynamo's notes on the graph breaks and recompiles it
        torch._logging.set_logs(dynamo=logging.ERROR)  # causes are expected, nothing for a user to act on
    mode = mode or module.model.trained_mode
    text = module.sample(prompt, max_new_tokens, temperature, top_k, mode, threshold, compile)
    used = module.skip_threshold if threshold is None else threshold
    at = f"threshold {probability(skip_logit(used)):.4g}"
    if module.elastic_range:
        at = f"budget {module.budget.budget if budget is None else budget:g}, {at}"
    compiled = ", compiled" if compile else ""
    print(f"[{mode} mode at {at}, KV-cache decoding{compiled}]", file=sys.stderr)
    print(prompt + text)
    return text


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
                yaml.safe_load(Path(config).read_text())
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


class LightningNotes(logging.Filter):
    """Drops Lightning's notes that concern nothing the user did: an advertisement, and the loading
    default it picks for checkpoints, which this package writes itself."""

    DROPPED = ("💡 Tip:", "`weights_only` was not set")

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
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        overview().parse_args(argv)
    try:
        check_arguments(argv)
        if argv and argv[0] in SUBCOMMANDS:
            auto_cli(SUBCOMMANDS[argv[0]], args=argv[1:])
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
    except (ArgumentError, TSAError, OSError, ValueError) as e:
        if os.environ.get("TSA_TRACEBACK") or not is_usage_error(e):
            raise
        sys.exit(f"error: {one_line(e, argv[0] if argv else 'fit')}")
    finally:
        RunLock.release_all()


if __name__ == "__main__":
    main()
