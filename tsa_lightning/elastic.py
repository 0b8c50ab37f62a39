"""Elastic depth beyond the thresholds: full depth teaches the rows trained below it, and validation
scores (and calibrates) every budget of the grid."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from tsa_lightning import names
from tsa_lightning.budget import REFINEMENTS, THOROUGH_BATCHES, Budgets
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.metrics import Bits, ComputeMetric, pooled
from tsa_lightning.model import Routing, TSAConfig, TSATransformer
from tsa_lightning.retrofit import distillation_kl


def full_depth_kl(model: TSATransformer, x: Tensor, logits: Tensor, threshold: Tensor) -> Tensor:
    """In-place distillation: KL from the network's own full-depth prediction of the same text, for
    the rows trained below full depth; the teacher's pass runs without dropout or gradient."""
    below = ~torch.isinf(threshold)
    if not below.any():
        return logits.new_zeros(())
    model.eval()
    with torch.no_grad():
        teacher_logits = model(x[below], mode="hard", threshold=1.0)[0]
    model.train()
    return distillation_kl(teacher_logits, logits[below])


class GridScores(nn.Module):
    """Each grid budget's bpc and compute over a validation split, summed over batches and ranks; it
    calibrates one budget alike, and scores nothing for it."""

    def __init__(self, config: TSAConfig, budgets: list[float]) -> None:
        super().__init__()
        self.budgets = budgets
        self.bits = nn.ModuleList(Bits() for _ in budgets)
        self.compute = nn.ModuleList(ComputeMetric(config) for _ in budgets)

    @torch.no_grad()
    def update(
        self,
        model: TSATransformer,
        budget: Budgets,
        batch: tuple[Tensor, Tensor],
        batch_idx: int,
        thorough: bool,
        *,
        batches: float = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """Run validation batch `batch_idx` of `batches` at the budgets `budget.validation_passes`
        deals its rows, observing each row's router logits for calibration. While training, an
        elastic model's rows take the grid's budgets in turn. The last validation of a fit and
        `validate` calibrate thoroughly, so that any budget evaluation and sampling ask for lands on
        the whole split: every table budget (every 0.01) on THOROUGH_BATCHES batches spread over
        the split, each pass's thresholds refined on its batch (a moved threshold changes later
        routers' logits) until the batch runs its budget's share within SETTLED, at most
        REFINEMENTS times; the last pass is the one observed."""
        if thorough and batch_idx % (math.ceil(batches / THOROUGH_BATCHES) if math.isfinite(batches) else 1):
            return  # 71 budgets' passes cost many: every THOROUGH_BATCHES-th part of the split
        x, y = batch
        start = budget.validation_thresholds()
        valid = y != IGNORE_INDEX
        for points in budget.validation_passes(len(x), batch_idx, thorough, rank, world_size):
            threshold = start[points.to(start.device)]
            logits, _, routing = model(x, mode="hard", threshold=threshold)
            for _ in range(REFINEMENTS if thorough else 0):
                if budget.settled(~model.skips(routing.halt_logits, threshold), valid, points):
                    break
                threshold = budget.batch_thresholds(routing.halt_logits, valid, points)
                logits, _, routing = model(x, mode="hard", threshold=threshold)
            budget.observe(routing.halt_logits, valid, points)
            if not self.budgets or not set(points.tolist()) & set(budget.grid_index):
                continue  # one budget (scored by the pass at its threshold), or one between the grid's
            losses = F.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            ).view_as(y)
            points = points.to(x.device)
            for g, k in enumerate(budget.grid_index):
                rows = points == k
                if valid[rows].any():
                    self.bits[g].update(losses[rows][valid[rows]].mean(), y[rows])
                    self.compute[g].update(
                        Routing(routing.halt_probs[rows], routing.executed[rows]), valid[rows]
                    )

    def logged(self, gated: list[int]) -> dict[str, Tensor | float]:
        """Each budget's bpc, FLOPs saved and routed share executed, under the names of `names.at_budget`;
        the metrics start again."""
        values = {}
        tokens = torch.stack([compute.tokens for compute in self.compute]) if self.budgets else None
        if tokens is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tokens)  # every rank logs the same names, or the ranks' syncs would not match
        for g, (budget, bits, compute) in enumerate(zip(self.budgets, self.bits, self.compute, strict=True)):
            if not tokens[g]:  # a split too small to reach this budget's rows
                continue
            report = pooled(compute)
            shares = [report.executed_per_layer[b] for b in gated]
            values[names.at_budget(budget, "bpc")] = pooled(bits)
            values[names.at_budget(budget, "flops_saved")] = report.flops_saved
            values[names.at_budget(budget, "routed_executed")] = sum(shares) / len(shares)
            bits.reset()
            compute.reset()
        return values
