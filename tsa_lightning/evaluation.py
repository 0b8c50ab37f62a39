"""Compute/quality curves: sweep the skip threshold of a trained model and measure hard-mode quality.

For each threshold: bits per token in hard mode, executed token-block operations and FLOPs saved,
next to the paper's soft metric. Results go to JSON, a markdown table, a PNG plot and TensorBoard.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchmetrics import Metric, SumMetric

from tsa_lightning.accounting import dense_twin_flops
from tsa_lightning.budget import probability
from tsa_lightning.corpus import Codec
from tsa_lightning.data import IGNORE_INDEX, TextDataModule
from tsa_lightning.errors import ConfigError, RunError, check_range
from tsa_lightning.inference import MAX_THRESHOLD
from tsa_lightning.metrics import ComputeMetric
from tsa_lightning.model import Mode, TSATransformer, skip_logit
from tsa_lightning.runs import load_checkpoint, run_of

if TYPE_CHECKING:
    from tsa_lightning.module import TSALanguageModel

QUIET = {  # a scoring Trainer: no logs, checkpoints, progress bar or model summary of its own
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
DEFAULT_THRESHOLDS = [round(i / 20, 2) for i in range(21)] + [MAX_THRESHOLD]


def shown_threshold(threshold: float | Tensor) -> float:
    """A threshold as tables show it: a probability (a budget's log-odds converted)."""
    return probability(threshold) if isinstance(threshold, Tensor) else float(threshold)


def threshold_key(threshold: float | Tensor) -> tuple[str, float]:
    """Tells thresholds apart: a probability as given, or log-odds as a budget holds them."""
    return ("log-odds", float(threshold)) if isinstance(threshold, Tensor) else ("p", float(threshold))


class ThresholdSweep(L.LightningModule):
    """One pass over a split: the soft model once, then hard mode at every threshold, batch by batch.

    Run by a Trainer (`sweep`), so it uses the accelerator, devices and precision given; the sums are
    torchmetrics states, which add up over batches and DDP ranks before anything is divided.
    """

    def __init__(self, model: TSATransformer, thresholds: list[float | Tensor]) -> None:
        super().__init__()
        self.model, self.thresholds = model, thresholds
        soft = [("soft", None)] if "soft" in model.reported_modes else []  # not for a non-causal soft mode
        self.runs: list[tuple[Mode, float | Tensor | None]] = soft + [("hard", t) for t in thresholds]
        self.nats = nn.ModuleList(SumMetric() for _ in self.runs)
        self.targets = SumMetric()
        self.compute = nn.ModuleList(ComputeMetric(model.config) for _ in self.runs)
        self.result: dict = {}

    def on_test_start(self) -> None:
        """Sum in float64, as a plain loop over the batches does; the Trainer cast states to its precision."""
        for metric in self.modules():
            if isinstance(metric, Metric):
                metric.set_dtype(torch.float64)

    on_validation_start = on_test_start

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        n = (y != IGNORE_INDEX).sum()
        self.targets.update(n)
        for (mode, threshold), nats, compute in zip(self.runs, self.nats, self.compute, strict=True):
            _, loss, routing = self.model(x, y, mode=mode, threshold=threshold)
            nats.update(loss.double() * n)
            compute.update(routing, y != IGNORE_INDEX)

    validation_step = test_step

    def on_test_epoch_end(self) -> None:
        count = self.targets.compute().item()
        scores = [
            {"bpc": nats.compute().item() / count / math.log(2), **asdict(compute.compute())}
            for nats, compute in zip(self.nats, self.compute, strict=True)
        ]
        soft = scores.pop(0) if self.runs[0][0] == "soft" else None
        self.result = {
            "routing": self.model.config.routing,
            "soft_bpc": None if soft is None else soft["bpc"],
            "targets": int(count),
            "points": [
                {
                    "threshold": shown_threshold(threshold),
                    "bpc": hard["bpc"],
                    "executed_fraction": hard["executed_fraction"],
                    "executed_tlops_saved": hard["executed_tlops_saved"],
                    "flops_saved": hard["flops_saved"],
                    "paper_tlops_saved": (soft or hard)["paper_tlops_saved"],
                    "executed_per_layer": hard["executed_per_layer"],
                }
                for threshold, hard in zip(self.thresholds, scores, strict=True)
            ],
        }

    on_validation_epoch_end = on_test_epoch_end


def sweep(
    model: TSATransformer,
    data: L.LightningDataModule | DataLoader,
    thresholds: list[float | Tensor],
    split: str = "test",
    trainer: L.Trainer | None = None,
) -> dict:
    """Soft bpc, and hard-mode bpc and executed compute at every threshold, over a split of `data`.

    A DataModule is scored on `split`; a DataLoader as it is. The default Trainer is a quiet one.
    """
    trainer = trainer or L.Trainer(**QUIET)
    module = ThresholdSweep(model, thresholds)
    run = trainer.test if split == "test" else trainer.validate
    if isinstance(data, L.LightningDataModule):
        run(module, datamodule=data, verbose=False)
    else:
        run(module, dataloaders=data, verbose=False)
    return module.result


def markdown_table(result: dict) -> str:
    """The sweep in words: what was scored (checkpoint, run, step, split), the dense reference if
    any, then one row per threshold; with a reference, each point's bpc gap to it."""
    soft = result["soft_bpc"]
    scored = (
        result.get("checkpoint") and f"`{result['checkpoint']}` (run {result['run']}, step {result['step']})"
    )
    lines = [
        (f"{scored}, {result['split']} split: " if scored else "")
        + (f"soft-mode bpc {soft:.4f}" if soft is not None else "soft mode not causal: not scored")
        + f" over {result['targets']} targets",
    ]
    ref = result.get("reference")
    if ref:
        lines.append(
            f"reference (dense) `{ref['checkpoint']}` (run {ref['name']}, step {ref['step']}): bpc "
            f"{ref['bpc']:.4f} at {ref['flops_share']:.1%} of the dense twin's FLOPs"
        )
    gap = " vs reference |" if ref else ""
    lines += [
        "",
        f"| threshold | hard bpc |{gap} executed TLOps saved | executed FLOPs saved | "
        "paper TLOps saved (soft) |",
        "|---|---|---|---|---|" + ("---|" if ref else ""),
    ]
    trained = result.get("trained_threshold")
    for p in result["points"]:
        mark = " (trained)" if trained is not None and p["threshold"] == trained else ""
        mark += f" (budget {p['budget']:g})" if "budget" in p else ""
        versus = f" {p['bpc'] / ref['bpc'] - 1:+.2%} |" if ref else ""
        lines.append(
            f"| {p['threshold']:.3g}{mark} | {p['bpc']:.4f} |{versus} {p['executed_tlops_saved']:.1%} | "
            f"{p['flops_saved']:.1%} | {p['paper_tlops_saved']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict]], path: Path, **options) -> None:
    """`curve_figure`, saved as a PNG."""
    figure = curve_figure(curves, **options)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def curve_figure(
    curves: dict[str, list[dict]],
    title: str = "",
    ymax: float | None = None,
    unit: str = "token",
    trained: dict[str, float] | None = None,
    references: dict[str, tuple[float, float]] | None = None,
) -> plt.Figure:
    """bpc against executed FLOPs (fraction of the dense twin's), one line per model; `ymax` cuts
    the far tails of threshold sweeps off so that the operating points stay readable.

    `trained`: a curve's trained threshold, marked with a star, and each point of a single curve is
    labelled with its budget (an elastic model's) or its threshold (t=...), but for points too close
    to one already labelled. `references`: models drawn as one point each (FLOPs share, bpc), e.g.
    the dense twin.
    """
    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curves.items():
        xs = [1 - p["flops_saved"] for p in points]
        ys = [p["bpc"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if len(curves) == 1:  # one sweep: each point says its threshold, where labels do not overlap
            span = (max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0)
            labelled: list[tuple[float, float]] = []
            for p, x, y in zip(points, xs, ys, strict=True):
                if any(abs(x - a) / span[0] < 0.06 and abs(y - b) / span[1] < 0.04 for a, b in labelled):
                    continue
                label = f"t={p['threshold']:g}" if "threshold" in p else ""
                label = f"budget {p['budget']:g}" if "budget" in p else label
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                labelled.append((x, y))
        if trained and name in trained:
            at = min(points, key=lambda p: abs(p["threshold"] - trained[name]))
            ax.plot(
                1 - at["flops_saved"],
                at["bpc"],
                marker="*",
                markersize=14,
                color=line.get_color(),
                linestyle="none",
                label=f"{name}: trained threshold {trained[name]:.3g}",
            )
    for name, (x, y) in (references or {}).items():
        ax.plot(x, y, marker="D", markersize=7, linestyle="none", color="black", label=name)
    ax.set_xlabel("executed FLOPs / dense twin FLOPs")
    ax.set_ylabel(f"bits per {unit} (hard mode)")
    ax.set_title(title)
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def output_paths(out_dir: Path, name: str) -> list[Path]:
    """Everything `write_outputs` creates: checked before any work, never overwritten."""
    return [out_dir / f"{name}.{suffix}" for suffix in ("json", "md", "png")] + [
        out_dir / "tensorboard" / name
    ]


def write_outputs(result: dict, out_dir: Path, name: str) -> None:
    """JSON, markdown, PNG and TensorBoard (tensorboard/<name>/), side by side in out_dir: all of them
    or, when interrupted, none (a partial set would block the rerun)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
        (out_dir / f"{name}.md").write_text(markdown_table(result))
        ref = result.get("reference")
        figure = curve_figure(
            {name: result["points"]},
            title=f"{result['run']} at step {result['step']} ({result['split']} split)"
            if "run" in result
            else name,
            unit=result.get("unit", "token"),
            trained={name: result["trained_threshold"]}
            if result.get("trained_threshold") is not None
            else None,
            references={f"{ref['name']} (dense reference)": (ref["flops_share"], ref["bpc"])}
            if ref
            else None,
        )
        figure.savefig(out_dir / f"{name}.png", dpi=120)
        with SummaryWriter(str(out_dir / "tensorboard" / name)) as writer:
            # TensorBoard's x axis is an integer step: thresholds and costs in thousandths
            for p in result["points"]:
                cost = round(1000 * (1 - p["flops_saved"]))
                writer.add_scalar(f"sweep/{name}/bpc_by_flops_per_mille", p["bpc"], global_step=cost)
                at = round(1000 * p["threshold"]) if p["threshold"] is not None else cost
                writer.add_scalar(f"sweep/{name}/bpc_by_threshold_per_mille", p["bpc"], global_step=at)
                writer.add_scalar(
                    f"sweep/{name}/flops_by_threshold_per_mille", 1 - p["flops_saved"], global_step=at
                )
            writer.add_figure(f"sweep/{name}", figure)
        plt.close(figure)
    except BaseException:  # Ctrl-C included
        for path in output_paths(out_dir, name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def same_vocabulary(module: TSALanguageModel, data: TextDataModule) -> None:
    """A model scores only the symbols it was trained on."""
    different = module.codec.difference(Codec(data.alphabet), ("the checkpoint", "the data"))
    if different:
        raise ConfigError(
            f"the checkpoint's vocabulary differs from the data's ({different}); evaluate a "
            "checkpoint on the corpus it was trained on"
        )


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
    reference: str | None = None,
    budgets: list[float] | None = None,
) -> dict:
    """Sweep the skip threshold of a checkpoint: hard-mode bpc against executed compute.

    The sweep includes the checkpoint's own threshold (a budget's calibrated one, say), marked as
    the trained operating point in the table and the plot. `--budgets` scores an elastic checkpoint
    at the budgets asked for.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        data: the corpus, as in the training config (e.g. --data=ShakespeareDataModule).
        split: "val" or "test".
        thresholds: skip thresholds to sweep, each in [0, 1.01] (default 0, 0.05, ..., 1, 1.01).
        out_dir: folder for <name>.json, <name>.md, <name>.png and tensorboard/<name>/.
        name: file stem for the outputs (default: <run>_step<N>_<split>, the run being the folder
            that holds the checkpoint's checkpoints/, else its file stem).
        limit_batches: score only the first batches (>= 1; quick looks; the full split by default).
        accelerator: Lightning accelerator for the sweep ("cpu", "gpu", "auto", ...).
        devices: Lightning devices for the sweep.
        precision: Lightning precision for the sweep (e.g. "bf16-mixed"; default full precision).
        reference: a dense checkpoint (the dense twin, or a smaller dense model) scored on the same
            split and drawn as one point beside the curve.
        budgets: budgets to score an elastic checkpoint at (trained with elastic_budgets), each at
            the threshold its calibration table gives; without --thresholds, only these are swept.
    """
    if split not in ("val", "test"):
        raise ConfigError(f"--split must be 'val' or 'test', got {split!r}")
    check_range("limit_batches", limit_batches, 1)
    thresholds = thresholds or ([] if budgets else DEFAULT_THRESHOLDS)
    for threshold in thresholds:
        check_range("thresholds", threshold, 0, MAX_THRESHOLD)
    if data is None:
        raise ConfigError("--data is required, e.g. --data=ShakespeareDataModule --data.data_dir=...")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise RunError(f"--out_dir {out_dir} is a file; give a folder for the sweep's outputs")
    module = load_checkpoint(ckpt_path)
    name = name or f"{run_of(ckpt_path)}_step{module.trained_steps}_{split}"
    for path in output_paths(Path(out_dir), name):
        if path.exists():
            raise RunError(f"{path} exists; choose another --out_dir or --name")
    same_vocabulary(module, data)
    dense = None if reference is None else load_checkpoint(reference)
    if dense is not None:
        same_vocabulary(dense, data)
    trained = None if module.config.routing == "none" else module.skip_threshold
    at_budget = {budget: module.threshold_at(budget) for budget in budgets or []}
    # a threshold given as a probability, or held by a budget in log-odds: one point each
    unique = {threshold_key(t): t for t in [*thresholds, *at_budget.values(), trained] if t is not None}
    keys = sorted(unique, key=lambda k: (float(skip_logit(unique[k])), shown_threshold(unique[k])))
    thresholds = [unique[k] for k in keys]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        limit_val_batches=limit_batches,
        limit_test_batches=limit_batches,
        **QUIET,
    )
    result = sweep(module.model, data, thresholds, split, trainer)
    result |= {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "run": run_of(ckpt_path),
        "step": module.trained_steps,
        "split": split,
        "unit": module.codec.unit,
        "trained_threshold": None if trained is None else shown_threshold(trained),
    }
    labelled = []
    for key, point in zip(keys, result["points"], strict=True):  # an elastic model's say their budget
        budgets = [b for b, t in at_budget.items() if threshold_key(t) == key]
        labelled += [{**point, "budget": b} for b in budgets] or [point]
    result["points"] = labelled
    if dense is not None:
        full = dense_twin_flops(module.config, 1, 1)
        result["reference"] = {
            "name": run_of(reference),
            "checkpoint": str(Path(reference).resolve()),
            "step": dense.trained_steps,
            "bpc": sweep(dense.model, data, [MAX_THRESHOLD], split, trainer)["points"][0]["bpc"],
            "flops_share": dense_twin_flops(dense.config, 1, 1) / full,
        }
    if trainer.is_global_zero:
        write_outputs(result, Path(out_dir), name)
        print(markdown_table(result))
        stem = Path(out_dir) / name
        print(f"Wrote {stem}.json, .md, .png and {Path(out_dir) / 'tensorboard' / name}/", file=sys.stderr)
    return result
