"""Metrics summed over batches and ranks: losses weighted by target count, and executed compute."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric, MetricCollection

from tsa_lightning import names
from tsa_lightning.accounting import ComputeReport, summarize, tally
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.model import MODES, Routing, TSAConfig


def pooled(metric: Metric) -> Any:
    """`metric.compute()` over every rank. A rank that never updated the metric (none of its rows
    took that budget) still joins the gather, as the ranks' collectives must match: torchmetrics'
    warning that it computes before updating says nothing there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The ``compute`` method of metric")
        return metric.compute()


class ComputeMetric(Metric):
    """Sums of `accounting.tally` over batches and ranks; `compute` gives the ComputeReport."""

    full_state_update = False

    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.config = config
        for name in ("keep_sum", "halt_count", "tokens", "flops", "dense_flops"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "executed_per_layer", torch.zeros(config.n_layer, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, routing: Routing, valid: Tensor | None = None) -> None:
        """`valid` (B, T): real positions; padding enters no count."""
        for name, value in tally(self.config, routing, valid).items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> ComputeReport:
        names = ("keep_sum", "halt_count", "tokens", "flops", "dense_flops", "executed_per_layer")
        return summarize(self.config, {name: getattr(self, name) for name in names})


class Nats(MeanMetric):
    """Mean loss in nats per target, weighted by target count so every target counts once."""

    def update(self, loss: Tensor, targets: Tensor) -> None:
        super().update(loss.detach(), weight=(targets != IGNORE_INDEX).sum())


class Bits(Nats):
    """Mean loss in bits per target: bits per character (or per byte), the corpus literature's unit."""

    def compute(self) -> Tensor:
        return super().compute() / math.log(2)


class Perplexity(Nats):
    def compute(self) -> Tensor:
        return torch.exp(super().compute())


def compute_logged(stage: str, report: ComputeReport) -> dict[str, float]:
    """A report's FLOPs and paper TLOps saved and each block's executed share, by their logged names
    (the executed TLOps saved goes to the progress bar on its own)."""
    shares = {names.block_share(stage, block): v for block, v in enumerate(report.executed_per_layer)}
    return {
        names.of_split(stage, "tlops_saved_paper"): report.paper_tlops_saved,
        names.of_split(stage, "flops_saved"): report.flops_saved,
        **shares,
    }


def loss_metrics() -> torch.nn.ModuleDict:
    """One loss collection per stage and mode (`<stage>_<mode>`), so that Lightning computes, syncs
    and resets each, logged under `names.loss`."""
    losses = MetricCollection({"loss": Nats(), "bpc": Bits(), "ppl": Perplexity()}, compute_groups=False)
    return torch.nn.ModuleDict(
        {
            f"{stage}_{mode}": losses.clone(prefix=names.loss(stage, mode, ""))
            for stage in names.STAGES
            for mode in MODES
        }
    )
