"""What the benchmark scripts share: configs resolved as the CLI resolves them, and side-by-side timing.

The scripts import this module by name (`from common import ...`): Python puts a script's own folder
on the path, so they run from any working directory.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tsa_lightning.cli import main as cli_main
from tsa_lightning.data import TextDataModule
from tsa_lightning.model import TSAConfig

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "configs" / "shapes"
EXPERIMENTS = REPO / "configs" / "experiments"


def resolved_config(*configs: str | Path, args: tuple[str, ...] = ()) -> dict:
    """The whole config `tsa-lightning fit --config A --config B ... args` would run, defaults included."""
    command = ["fit", *(f"--config={c}" for c in configs), *args, "--print_config"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")  # this process's own argv
            cli_main(command)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise ValueError(f"tsa-lightning {' '.join(command)}: {stop.code}") from None
    return yaml.safe_load(printed.getvalue())


def data_module(config: dict, **init_args) -> TextDataModule:
    """The DataModule of a resolved config's `data` section (`init_args` override its options)."""
    module_name, _, class_name = config["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**config["data"]["init_args"], **init_args})


def network(config: dict, data: TextDataModule) -> TSAConfig:
    """The TSAConfig of a resolved config, with the data's vocabulary and context (as fit links them)."""
    options = {**config["model"]["config"], "vocab_size": data.vocab_size, "block_size": data.block_size}
    return TSAConfig(**options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, run in turn so that machine noise hits all of them alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
