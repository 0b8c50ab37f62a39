"""Compute/quality curves: sweep the skip threshold of a trained model and measure hard-mode quality.

For each threshold: bits per token in hard mode, executed token-block operations and FLOPs saved,
next to the paper's soft metric. Results go to JSON, a markdown table, a PNG plot and TensorBoard.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchmetrics import Metric, SumMetric

from tsa_lightning.budget import probability
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.metrics import ComputeMetric
from tsa_lightning.model import Mode, TSATransformer

MAX_THRESHOLD = 1.01  # above every probability and confidence: nothing is ever skipped
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
    soft = result["soft_bpc"]
    lines = [
        (f"soft-mode bpc {soft:.4f}" if soft is not None else "soft mode not causal: not scored")
        + f" over {result['targets']} targets",
        "",
        "| threshold | hard bpc | executed TLOps saved | executed FLOPs saved | paper TLOps saved (soft) |",
        "|---|---|---|---|---|",
    ]
    trained = result.get("trained_threshold")
    for p in result["points"]:
        mark = " (trained)" if trained is not None and p["threshold"] == trained else ""
        mark += f" (budget {p['budget']:g})" if "budget" in p else ""
        lines.append(
            f"| {p['threshold']:.3g}{mark} | {p['bpc']:.4f} | {p['executed_tlops_saved']:.1%} | "
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
) -> None:
    """bpc against executed FLOPs (fraction of the dense twin's), one line per model; `ymax` cuts
    the far tails of threshold sweeps off so that the operating points stay readable.

    `trained`: a curve's trained threshold, marked with a star, and each point of a single curve is
    labelled with its budget (an elastic model's) or its threshold. `references`: models drawn as
    one point each (FLOPs share, bpc), e.g. the dense twin.
    """
    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curves.items():
        xs = [1 - p["flops_saved"] for p in points]
        ys = [p["bpc"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if len(curves) == 1:  # one sweep: each point says its threshold
            for p, x, y in zip(points, xs, ys, strict=True):
                label = f"{p['threshold']:g}" if "threshold" in p else ""
                label = f"budget {p['budget']:g}" if "budget" in p else label
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
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
        plot_curves(
            {name: result["points"]},
            out_dir / f"{name}.png",
            title=f"{name} at step {result['step']}" if "step" in result else name,
            unit=result.get("unit", "token"),
            trained={name: result["trained_threshold"]}
            if result.get("trained_threshold") is not None
            else None,
            references={f"{ref['name']} (reference)": (ref["flops_share"], ref["bpc"])}
            if (ref := result.get("reference"))
            else None,
        )
        with SummaryWriter(str(out_dir / "tensorboard" / name)) as writer:
            for i, p in enumerate(result["points"]):
                for key in ("bpc", "executed_tlops_saved", "flops_saved", "threshold"):
                    writer.add_scalar(f"sweep/{name}/{key}", p[key], global_step=i)
    except BaseException:  # Ctrl-C included
        for path in output_paths(out_dir, name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
