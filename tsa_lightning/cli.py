"""Command line: LightningCLI for fit / validate / test / predict, plus `sample` from a checkpoint.

tsa-lightning fit --config configs/shakespeare_cpu.yaml
tsa-lightning sample --ckpt_path runs/shakespeare_cpu/checkpoints/last.ckpt --prompt "ROMEO:"
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from itertools import islice
from pathlib import Path

import torch
from jsonargparse import auto_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tsa_lightning.callbacks import Dashboard, DepthMap, HaltingHistograms, HardSample
from tsa_lightning.data import CorpusError, TextDataModule
from tsa_lightning.evaluation import DEFAULT_THRESHOLDS, markdown_table, sweep, write_outputs
from tsa_lightning.module import TSALanguageModel

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
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.alphabet", "model.alphabet", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size", apply_on="instantiate")
        parser.add_lightning_class_args(Dashboard, "dashboard")
        parser.add_lightning_class_args(HaltingHistograms, "halting_histograms")
        parser.add_lightning_class_args(DepthMap, "depth_map")
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

    def after_instantiate_classes(self) -> None:
        """A checkpoint path that names no file fails here, in one line, before any work starts."""
        ckpt_path = self._get(self.config, "ckpt_path")
        if (
            ckpt_path
            and ckpt_path not in ("last", "best", "hpc", "registry")
            and not Path(ckpt_path).is_file()
        ):
            raise SystemExit(
                f"error: checkpoint {ckpt_path} does not exist; give the path of a .ckpt file "
                "(runs/<name>/checkpoints/) or `last` to resume the latest run"
            )

    def before_fit(self) -> None:
        """Never let a fresh run overwrite an earlier run's checkpoints."""
        dirpath = self.config_init.fit.checkpoint.dirpath
        if self.config_init.fit.ckpt_path is None and dirpath and any(Path(dirpath).glob("*.ckpt")):
            raise SystemExit(
                f"error: {dirpath} already holds checkpoints of an earlier run. Resume it with "
                "`--ckpt_path last`, or start a new run under another name "
                "(--trainer.logger.init_args.name=...) or folder (--checkpoint.dirpath=...)."
            )


def _require_checkpoint(ckpt_path: str | None) -> None:
    if ckpt_path is None or not Path(ckpt_path).is_file():
        raise SystemExit(f"error: --ckpt_path must name an existing checkpoint file, got {ckpt_path}")


def sample(
    ckpt_path: str | None = None,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    mode: str = "soft",
    threshold: float | None = None,
    seed: int = 1337,
) -> str:
    """Print text sampled from a checkpoint.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        prompt: text to continue (in the corpus alphabet).
        max_new_tokens: how many tokens to generate.
        temperature: softmax temperature; 0 is greedy.
        top_k: sample only among the k most likely tokens.
        mode: "soft" (every block runs) or "hard" (tokens skip blocks).
        threshold: skip threshold for hard mode (default: the trained model's).
        seed: random seed for sampling.
    """
    _require_checkpoint(ckpt_path)
    torch.manual_seed(seed)
    module = TSALanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    if threshold is not None:
        module.config.skip_threshold = threshold
    text = module.sample(prompt, max_new_tokens, temperature=temperature, top_k=top_k, mode=mode)
    print(prompt + text)
    return text


def evaluate(
    ckpt_path: str | None = None,
    data: TextDataModule | None = None,
    split: str = "test",
    thresholds: list[float] | None = None,
    out_dir: str = "eval",
    name: str | None = None,
    limit_batches: int | None = None,
) -> dict:
    """Sweep the skip threshold of a checkpoint: hard-mode bpc against executed compute.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        data: the corpus, as in the training config (e.g. --data=ShakespeareDataModule).
        split: "val" or "test".
        thresholds: skip thresholds to sweep (default 0, 0.05, ..., 1, 1.01).
        out_dir: folder for <name>.json, <name>.md, <name>.png and tensorboard/.
        name: file stem for the outputs (default: the checkpoint's file stem).
        limit_batches: score only the first batches (quick looks; the full split by default).
    """
    _require_checkpoint(ckpt_path)
    if data is None:
        raise SystemExit("error: --data is required, e.g. --data=ShakespeareDataModule --data.data_dir=...")
    if split not in ("val", "test"):
        raise SystemExit(f"error: --split must be 'val' or 'test', got {split!r}")
    name = name or Path(ckpt_path).stem
    if (Path(out_dir) / f"{name}.json").exists():
        raise SystemExit(f"error: {Path(out_dir) / name}.json exists; choose another --out_dir or --name")
    module = TSALanguageModel.load_from_checkpoint(ckpt_path, map_location="cpu")
    data.setup("test")
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    batches = list(islice(loader, limit_batches)) if limit_batches else loader
    result = sweep(module.model, batches, thresholds or DEFAULT_THRESHOLDS)
    write_outputs(result, Path(out_dir), name)
    print(markdown_table(result))
    return result


SUBCOMMANDS = {"sample": sample, "evaluate": evaluate}


def main(args: list[str] | None = None) -> None:
    """Bad input ends in one line that says what to fix; TSA_TRACEBACK=1 shows the traceback instead."""
    argv = sys.argv[1:] if args is None else args
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
    except ArgumentError as e:  # an unknown key or a wrong type, from the command line or a config file
        if os.environ.get("TSA_TRACEBACK"):
            raise
        command = argv[0] if argv else "fit"
        sys.exit(f"error: {' '.join(str(e).split())} (see `tsa-lightning {command} --help` for the options)")
    except (CorpusError, ValueError, FloatingPointError) as e:
        if os.environ.get("TSA_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
