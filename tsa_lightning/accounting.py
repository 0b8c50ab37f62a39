"""Compute accounting: the paper's soft TLOps metric beside the work hard mode really executes.

The paper reports alpha = mean(1 - p) and calls 1 - (1 + (L-1) alpha) / L "TLOps saved"; that
number is not counted from executed work (an untrained router already scores ~22%). We report it
next to two honest measures: the fraction of (token, block) pairs that actually ran, and the
analytic forward FLOPs of what ran against the dense twin's.

Everything is kept as sums (`tally`) so batches and DDP ranks add up before `summarize` divides.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tsa_lightning.baselines import VARIANTS
from tsa_lightning.model import Routing, TSAConfig


def paper_tlops_saved(alpha: float, n_layer: int) -> float:
    """The published metric: block 0 always runs, the other L-1 blocks are weighted by alpha."""
    return 1.0 - (1.0 + (n_layer - 1) * alpha) / n_layer


def forward_flops(config: TSAConfig, executed: Tensor, valid: Tensor | None = None) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of one batch, given which token ran which block.

    `valid` (B, T) marks real positions; padding of a split's last window costs nothing.

    Counted: attention projections, attention scores and weighted values (causal: a token at
    position t reads t + 1 keys), FFN, routing decisions (for every token; each variant knows
    its own cost), LM head.
    Not counted: norms, softmax, embeddings.
    Every token's keys and values are computed at every block, run or skipped, because later
    tokens may attend to a skipped token's copied state.
    """
    B, T, L = executed.shape
    tokens = B * T
    if valid is not None:
        executed, tokens = executed & valid[..., None], int(valid.sum())
    C, F, V = config.n_embd, config.ffn_hidden, config.vocab_size
    kept_cost = 2 * C * C + 2 * C * C + 4 * C * F  # query, output projection, FFN
    attention_cost = 4 * C * torch.arange(1, T + 1, dtype=torch.float64, device=executed.device)
    run = (executed.to(torch.float64) * (kept_cost + attention_cost[None, :, None])).sum().item()
    key_value = 4 * C * C * L
    head = 2 * C * V
    deciding = VARIANTS[config.routing].routing_flops_per_token(config)
    return run + tokens * (key_value + deciding + head)


def dense_twin_flops(config: TSAConfig, batch: int, seq_len: int, valid: Tensor | None = None) -> float:
    dense = replace(config, routing="none")
    device = None if valid is None else valid.device
    everyone = torch.ones(batch, seq_len, config.n_layer, dtype=torch.bool, device=device)
    return forward_flops(dense, everyone, valid)


def tally(config: TSAConfig, routing: Routing, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Additive sums of one batch; add tallies of many batches or ranks, then `summarize`.

    `valid` (B, T) marks real positions (targets that are not padding); None: every position.
    """
    B, T, _ = routing.executed.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=routing.executed.device) if valid is None else valid
    halts = routing.halt_probs
    keep_sum = 0.0 if halts is None else ((1 - halts.double()) * valid[..., None]).sum().item()
    halt_count = 0 if halts is None else int(valid.sum()) * halts.size(-1)
    return {
        "keep_sum": torch.tensor(keep_sum, dtype=torch.float64),
        "halt_count": torch.tensor(halt_count, dtype=torch.float64),
        "executed_per_layer": (routing.executed & valid[..., None]).double().sum(dim=(0, 1)).cpu(),
        "tokens": torch.tensor(int(valid.sum()), dtype=torch.float64),
        "flops": torch.tensor(forward_flops(config, routing.executed, valid), dtype=torch.float64),
        "dense_flops": torch.tensor(dense_twin_flops(config, B, T, valid), dtype=torch.float64),
    }


@dataclass
class ComputeReport:
    paper_alpha: float  # mean(1 - p); 1.0 for the dense twin
    paper_tlops_saved: float
    executed_fraction: float  # of (token, block) pairs, the stem included
    executed_tlops_saved: float
    executed_per_layer: list[float]
    flops: float
    dense_flops: float
    flops_saved: float


def summarize(config: TSAConfig, sums: dict[str, Tensor]) -> ComputeReport:
    alpha = (sums["keep_sum"] / sums["halt_count"]).item() if sums["halt_count"] > 0 else 1.0
    per_layer = (sums["executed_per_layer"] / sums["tokens"]).tolist()
    executed = sum(per_layer) / len(per_layer)
    flops, dense = sums["flops"].item(), sums["dense_flops"].item()
    return ComputeReport(
        paper_alpha=alpha,
        paper_tlops_saved=paper_tlops_saved(alpha, config.n_layer),
        executed_fraction=executed,
        executed_tlops_saved=1.0 - executed,
        executed_per_layer=per_layer,
        flops=flops,
        dense_flops=dense,
        flops_saved=1.0 - flops / dense,
    )


def report(config: TSAConfig, routing: Routing) -> ComputeReport:
    """The accounting of a single forward pass."""
    return summarize(config, tally(config, routing))
