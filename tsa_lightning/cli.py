"""Train, score and sample TSA language models: LightningCLI's fit/validate/test/predict, sample, evaluate.

tsa-lightning fit --config configs/shakespeare_cpu.yaml
tsa-lightning sample --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --prompt "ROMEO:"
tsa-lightning evaluate --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --data ShakespeareDataModule
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse import auto_cli
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tsa_lightning.callbacks import Dashboard, DepthMap, HaltingHistograms, HardSample, PredictionWriter
from tsa_lightning.corpus import CorpusError
from tsa_lightning.data import TextDataModule
from tsa_lightning.evaluation import (
    DEFAULT_THRESHOLDS,
    MAX_THRESHOLD,
    QUIET,
    markdown_table,
    output_paths,
    sweep,
    write_outputs,
)
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import (
    LAST,
    AtomicCheckpointIO,
    GracefulStop,
    RunError,
    RunLock,
    describe_os_error,
    is_launching_process,
    read_checkpoint,
)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "tsa", "default_hp_metric": False},
    },
    "max_steps": 5000,
    "val_check_interval": 500,
    "check_val_every_n_epoch": None,  # validation is counted in steps, across epoch boundaries
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
}


class TSALightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the corpus decides the vocabulary and the context: written once, in data
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.alphabet", "model.alphabet", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.config.block_size", apply_on="instantiate")
        parser.add_lightning_class_args(Dashboard, "dashboard")
        parser.add_lightning_class_args(HaltingHistograms, "halting_histograms")
        parser.add_lightning_class_args(DepthMap, "depth_map")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(HardSample, "hard_sample")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.monitor": "val/hard/bpc",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        """Checkpoints go to a fixed folder per run name, so that `--ckpt_path last` finds them."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            logger = config.trainer.logger
            args = logger.init_args if logger and hasattr(logger, "init_args") else None
            if args is not None and "save_dir" in args:
                config.checkpoint.dirpath = str(
                    Path(args.save_dir) / (args.get("name") or "") / "checkpoints"
                )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """A checkpoint path that names no usable file fails here, in one line, before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            refuse_flat_checkpoint(ckpt_path)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Every run writes checkpoints atomically and stops cleanly on SIGTERM or SIGINT."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(GracefulStop())
        return trainer

    def before_fit(self) -> None:
        """The run owns its checkpoint folder: one live run per folder, never over an earlier run's work."""
        config = self.config_init.fit
        dirpath = config.checkpoint.dirpath
        if not dirpath or not is_launching_process():
            return
        self.run_lock = RunLock(Path(dirpath))
        if config.ckpt_path == "last":  # only ever this folder's own last.ckpt
            last = Path(dirpath) / LAST
            if last.is_file():
                config.ckpt_path = str(last)
            else:
                print(f"No checkpoint to resume in {dirpath}: a new run starts.", file=sys.stderr)
                config.ckpt_path = None
        if config.ckpt_path is None and any(Path(dirpath).glob("*.ckpt")):
            raise RunError(
                f"{dirpath} already holds checkpoints of an earlier run. Resume it with "
                "`--ckpt_path last`, or start a new run under another name "
                "(--trainer.logger.init_args.name=...) or folder (--checkpoint.dirpath=...)."
            )


def load_checkpoint(ckpt_path: str | None) -> TSALanguageModel:
    """The module saved by `fit`, on the CPU; refused in one line when unusable or older than model.config."""
    if ckpt_path is None:
        raise SystemExit("error: --ckpt_path is required: the .ckpt file written by `fit`")
    refuse_flat_checkpoint(ckpt_path)
    return TSALanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")


def refuse_flat_checkpoint(ckpt_path: str) -> None:
    """A usable checkpoint of this package; those from before `model.config` kept the network's
    options beside the training ones."""
    if "config" not in read_checkpoint(ckpt_path)["hyper_parameters"]:
        raise SystemExit(
            f"error: {ckpt_path} predates model.config (the network's options were flat); convert it once: "
            'python -c "from tsa_lightning.module import upgrade_checkpoint as u; '
            f"print(u('{ckpt_path}'))\" and use the .upgraded.ckpt it prints"
        )


def check_range(name: str, value: float | None, low: float, high: float = math.inf) -> None:
    if value is not None and not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise SystemExit(f"error: --{name} must be {bounds}, got {value}")


def same_vocabulary(module: TSALanguageModel, data: TextDataModule) -> None:
    """A model scores only the symbols it was trained on."""

    def described(alphabet: str | None) -> str:
        return "bytes (256)" if alphabet is None else f"{len(alphabet)} characters {alphabet!r}"

    if module.codec.alphabet != data.alphabet:
        raise SystemExit(
            f"error: the checkpoint's vocabulary is {described(module.codec.alphabet)}, the data's is "
            f"{described(data.alphabet)}; evaluate a checkpoint on the corpus it was trained on"
        )


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
        seed: random seed for sampling.
        compile: run the decoding steps through torch.compile (the first call compiles for
            seconds; see the README's wall-clock section for when it pays).
    """
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0)
    check_range("top_k", top_k, 1)
    check_range("threshold", threshold, 0, MAX_THRESHOLD)
    module = load_checkpoint(ckpt_path).eval()
    torch.manual_seed(seed)
    mode = mode or module.model.trained_mode
    text = module.sample(prompt, max_new_tokens, temperature, top_k, mode, threshold, compile)
    print(f"[{mode} mode, KV-cache decoding{', compiled' if compile else ''}]", file=sys.stderr)
    print(prompt + text)
    return text


def evaluate(
    ckpt_path: str | None = None,
    data: TextDataModule | None = None,
    split: Literal["val", "test"] = "test",
    thresholds: list[float] | None = None,
    out_dir: str = "eval",
    name: str | None = None,
    limit_batches: int | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    precision: str | None = None,
) -> dict:
    """Sweep the skip threshold of a checkpoint: hard-mode bpc against executed compute.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        data: the corpus, as in the training config (e.g. --data=ShakespeareDataModule).
        split: "val" or "test".
        thresholds: skip thresholds to sweep, each in [0, 1.01] (default 0, 0.05, ..., 1, 1.01).
        out_dir: folder for <name>.json, <name>.md, <name>.png and tensorboard/<name>/.
        name: file stem for the outputs (default: the checkpoint's file stem).
        limit_batches: score only the first batches (>= 1; quick looks; the full split by default).
        accelerator: Lightning accelerator for the sweep ("cpu", "gpu", "auto", ...).
        devices: Lightning devices for the sweep.
        precision: Lightning precision for the sweep (e.g. "bf16-mixed"; default full precision).
    """
    if split not in ("val", "test"):
        raise SystemExit(f"error: --split must be 'val' or 'test', got {split!r}")
    check_range("limit_batches", limit_batches, 1)
    thresholds = thresholds or DEFAULT_THRESHOLDS
    for threshold in thresholds:
        check_range("thresholds", threshold, 0, MAX_THRESHOLD)
    if data is None:
        raise SystemExit("error: --data is required, e.g. --data=ShakespeareDataModule --data.data_dir=...")
    name = name or Path(str(ckpt_path)).stem
    for path in output_paths(Path(out_dir), name):
        if path.exists():
            raise SystemExit(f"error: {path} exists; choose another --out_dir or --name")
    module = load_checkpoint(ckpt_path)
    same_vocabulary(module, data)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        limit_val_batches=limit_batches,
        limit_test_batches=limit_batches,
        **QUIET,
    )
    result = sweep(module.model, data, thresholds, split, trainer)
    if trainer.is_global_zero:
        write_outputs(result, Path(out_dir), name)
        print(markdown_table(result))
    return result


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


def main(args: list[str] | None = None) -> None:
    """Bad input ends in one line that says what to fix; TSA_TRACEBACK=1 shows the traceback instead."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        overview().parse_args(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            auto_cli(SUBCOMMANDS[argv[0]], args=argv[1:])
            return
        TSALightningCLI(
            TSALanguageModel,
            TextDataModule,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            parser_kwargs={"exit_on_error": False},
            args=args,
        )
    except SIGTERMException as e:  # stopped by a signal, with a resumable checkpoint
        print(*getattr(e, "__notes__", []), file=sys.stderr)
        sys.exit(e.code)
    except ArgumentError as e:  # an unknown key or a wrong type, from the command line or a config file
        if os.environ.get("TSA_TRACEBACK"):
            raise
        command = argv[0] if argv else "fit"
        sys.exit(f"error: {' '.join(str(e).split())} (see `tsa-lightning {command} --help` for the options)")
    except (CorpusError, RunError, ValueError, FloatingPointError) as e:
        if os.environ.get("TSA_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a read-only folder, a folder where a file should be
        if os.environ.get("TSA_TRACEBACK"):
            raise
        sys.exit(f"error: {describe_os_error(e)}")
    finally:
        RunLock.release_all()


if __name__ == "__main__":
    main()
