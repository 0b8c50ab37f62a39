"""Compute/quality curves: sweep the skip threshold of a trained model and measure hard-mode quality.

For each threshold: bits per token in hard mode, executed token-block operations and FLOPs saved,
next to the paper's soft metric. Results go to JSON, a markdown table, a PNG plot and TensorBoard.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from tsa_lightning.accounting import summarize, tally
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.model import TSATransformer

DEFAULT_THRESHOLDS = [round(i / 20, 2) for i in range(21)] + [1.01]


@torch.no_grad()
def score(model: TSATransformer, loader: DataLoader, mode: str, threshold: float | None = None) -> dict:
    """Bits per token over every target of the loader, with the compute accounting of that pass."""
    model.eval()
    device = next(model.parameters()).device
    nats, count, sums = 0.0, 0, None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        _, loss, routing = model(x, y, mode=mode, threshold=threshold)
        n = int((y != IGNORE_INDEX).sum())
        nats, count = nats + loss.item() * n, count + n
        batch = tally(model.config, routing)
        sums = batch if sums is None else {k: sums[k] + v for k, v in batch.items()}
    report = summarize(model.config, sums)
    return {"bpc": nats / count / math.log(2), "targets": count, **asdict(report)}


def sweep(model: TSATransformer, loader: DataLoader, thresholds: list[float]) -> dict:
    """The soft model once (the paper's view), then hard mode at every threshold."""
    soft = score(model, loader, "soft")
    points = []
    for threshold in thresholds:
        hard = score(model, loader, "hard", threshold)
        points.append(
            {
                "threshold": threshold,
                "bpc": hard["bpc"],
                "executed_fraction": hard["executed_fraction"],
                "executed_tlops_saved": hard["executed_tlops_saved"],
                "flops_saved": hard["flops_saved"],
                "paper_tlops_saved": soft["paper_tlops_saved"],
                "executed_per_layer": hard["executed_per_layer"],
            }
        )
    return {
        "routing": model.config.routing,
        "soft_bpc": soft["bpc"],
        "targets": soft["targets"],
        "points": points,
    }


def markdown_table(result: dict) -> str:
    lines = [
        f"soft-mode bpc {result['soft_bpc']:.4f} over {result['targets']} targets",
        "",
        "| threshold | hard bpc | executed TLOps saved | executed FLOPs saved | paper TLOps saved (soft) |",
        "|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['threshold']:.2f} | {p['bpc']:.4f} | {p['executed_tlops_saved']:.1%} | "
            f"{p['flops_saved']:.1%} | {p['paper_tlops_saved']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """bpc against executed FLOPs (fraction of the dense twin's), one line per model."""
    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curves.items():
        xs = [1 - p["flops_saved"] for p in points]
        ax.plot(xs, [p["bpc"] for p in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("executed FLOPs / dense twin FLOPs")
    ax.set_ylabel("bits per token (hard mode)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(result: dict, out_dir: Path, name: str) -> None:
    """JSON, markdown, PNG and TensorBoard, side by side in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text(markdown_table(result))
    plot_curves({name: result["points"]}, out_dir / f"{name}.png", title=name)
    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        for i, p in enumerate(result["points"]):
            for key in ("bpc", "executed_tlops_saved", "flops_saved", "threshold"):
                writer.add_scalar(f"sweep/{name}/{key}", p[key], global_step=i)
