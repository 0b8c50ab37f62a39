"""The names metrics are logged under. Every writer and reader - the module, the callbacks, the
run's summary, the benchmarks - builds them here, so renaming one cannot break the others."""

from __future__ import annotations

import re

STAGES = ("val", "test")  # the evaluation splits (training logs under "train")
# the work a split saved: executed token-block operations, FLOPs, and the paper's soft formula
SAVED = ("tlops_saved_executed", "flops_saved", "tlops_saved_paper")
BLOCK_SHARE = re.compile(r"executed/(?P<stage>\w+)/block_(?P<block>\d+)$")


def loss(stage: str, mode: str, what: str = "bpc") -> str:
    """`what`: bpc, loss (nats) or ppl."""
    return f"{stage}/{mode}/{what}"


def of_split(stage: str, what: str = "tlops_saved_executed") -> str:
    """A whole split's (or a training batch's) metric: one of SAVED, step or calibrated_threshold."""
    return f"{stage}/{what}"


def block_share(stage: str, block: int) -> str:
    """The share of tokens that ran a block."""
    return f"executed/{stage}/block_{block}"


def block_shares(metrics: dict, stage: str) -> list:
    """A stage's per-block shares from a dict of logged metrics, block 0 first."""
    found = {
        int(m["block"]): v for k, v in metrics.items() if (m := BLOCK_SHARE.match(k)) and m["stage"] == stage
    }
    return [found[block] for block in sorted(found)]


def calibrated(budgets: list[float], thresholds: list[float]) -> dict[str, float]:
    """Calibrated thresholds by name: one budget's under the split, an elastic grid's per budget."""
    if len(budgets) == 1:
        return {of_split("val", "calibrated_threshold"): thresholds[0]}
    return {at_budget(b, "calibrated_threshold"): t for b, t in zip(budgets, thresholds, strict=True)}


def at_budget(budget: float, what: str) -> str:
    """An elastic model's validation metric at one budget: bpc, flops_saved, routed_executed or
    calibrated_threshold. Budgets are named to 0.01."""
    return f"val/budget_{budget:.2f}/{what}"
