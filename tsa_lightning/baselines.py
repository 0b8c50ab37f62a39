"""Adaptive-depth baselines on TSA's own trunk: same blocks, init, data, trainer and accounting.

Each baseline overrides how it routes (`route`, `skips`) and what routing costs and trains
(`routing_flops_per_token`, `depth_term`, `auxiliary_loss`, ...), so the hard-mode machinery -
gather/compute/scatter, keys and values from every position's current state - and the compute
accounting are shared with TSA. `threshold` always means "higher runs more"; routing reports its
scores in log-odds, as TSA's routers do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsa_lightning.model import (
    Decision,
    Mode,
    Router,
    Routing,
    TSAConfig,
    TSATransformer,
    router_flops,
)


class EarlyExitTransformer(TSATransformer):
    """Early exit (CALM-style): exit heads tied to the LM head after every block.

    A token leaves at the first block whose exit head's max-softmax confidence reaches the
    threshold; its state is copied upward, so later tokens still attend to it, and the final
    head on the copied state is exactly its exit head. Training minimises the mean loss over
    all exits. Since a skipped token's state no longer changes, deciding afresh at every block
    gives the same answer as remembering who left.
    """

    trained_mode: Mode = "hard"

    def confidence(self, x: Tensor) -> Tensor:
        return F.softmax(self.lm_head(self.ln_f(x)), dim=-1).amax(dim=-1)

    def route(self, i: int, x: Tensor, mode: Mode, threshold: float, targets: Tensor | None) -> Decision:
        if mode == "hard":
            halt_logit = torch.logit(self.confidence(x).double())
            return Decision(kept=~self.skips(halt_logit, threshold), halt_logit=halt_logit)
        if targets is None:
            return Decision()
        logits = self.lm_head(self.ln_f(x))
        return Decision(aux_loss=F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1)))

    def skips(self, halt_logits: Tensor, threshold: float) -> Tensor:
        """A token leaves once its exit head is confident enough: compared as probabilities, since
        a confidence can be one (its log-odds in float64 keep every float32 confidence apart). Hard
        mode decides on the log-odds it reports, so the accounting reads back the same decisions."""
        return torch.sigmoid(halt_logits) >= threshold

    def depth_term(self, routing: Routing) -> Tensor | None:
        return None  # depth follows from confidence; training averages the exits' losses instead

    @classmethod
    def routing_flops_per_token(cls, config: TSAConfig) -> int:
        """The tied exit heads after blocks 0..L-2."""
        return (config.n_layer - 1) * 2 * config.n_embd * config.vocab_size

    def auxiliary_loss(self, loss: Tensor | None, terms: list[Tensor]) -> Tensor | None:
        """Chosen so that loss + aux is the mean over the L exits (the last exit being `loss`)."""
        if loss is None or not terms:
            return None
        return (torch.stack(terms).sum() + loss) / (len(terms) + 1) - loss


class MixtureOfDepthsTransformer(TSATransformer):
    """Mixture-of-Depths (Raposo et al. 2024) with a causal predictor.

    On every mod_every-th block a linear router scores tokens; in training only the top
    mod_capacity share of each sequence runs the block, its update weighted by sigmoid(score).
    Top-k looks at the whole sequence, so it cannot decide while sampling: a small MLP predictor,
    trained with BCE on a detached state to guess top-k membership, decides in hard mode
    (a token runs when its predicted skip probability is <= threshold).
    """

    trained_mode: Mode = "hard"

    def __init__(self, config: TSAConfig) -> None:
        super().__init__(config)
        routed = [str(i) for i in self.routed(config)]
        self.scorers = nn.ModuleDict({i: nn.Linear(config.n_embd, 1) for i in routed})
        self.predictors = nn.ModuleDict({i: Router(config) for i in routed})
        self.scorers.apply(self._init_router)
        self.predictors.apply(self._init_router)

    @staticmethod
    def routed(config: TSAConfig) -> list[int]:
        """Every mod_every-th block is routed."""
        return [i for i in range(config.n_layer - 1) if (i + 1) % config.mod_every == 0]

    @classmethod
    def routing_flops_per_token(cls, config: TSAConfig) -> int:
        """A linear scorer and an MLP predictor per routed block."""
        return len(cls.routed(config)) * (2 * config.n_embd + router_flops(config))

    def depth_term(self, routing: Routing) -> Tensor | None:
        return None  # capacity fixes the depth; the predictor trains through the auxiliary loss

    @property
    def reported_modes(self) -> tuple[Mode, ...]:
        """Hard mode only: the soft (training) forward picks top-k over the whole window, so it sees
        future tokens, the targets included; its numbers are not a language model's."""
        return ("hard",)

    def capacity(self, seq_len: int) -> int:
        return max(1, round(self.config.mod_capacity * seq_len))

    def route(self, i: int, x: Tensor, mode: Mode, threshold: float, targets: Tensor | None) -> Decision:
        if str(i) not in self.scorers:
            return Decision()
        weight = torch.sigmoid(self.scorers[str(i)](x))
        skip = self.predictors[str(i)].logit(x.detach())  # the predictor never steers the trunk
        if mode == "hard":
            return Decision(scale=weight, kept=~self.skips(skip, threshold), halt_logit=skip)
        top = weight.squeeze(-1).topk(self.capacity(x.size(1)), dim=-1).indices
        kept = torch.zeros_like(skip, dtype=torch.bool).scatter(1, top, True)
        # from logits: safe under autocast and in any dtype
        target = (~kept).to(skip.dtype)
        return Decision(
            scale=weight,
            kept=kept,
            halt_logit=skip,
            aux_loss=F.binary_cross_entropy_with_logits(skip, target),
        )


VARIANTS: dict[str, type[TSATransformer]] = {
    "none": TSATransformer,
    "tsa": TSATransformer,
    "early_exit": EarlyExitTransformer,
    "mod": MixtureOfDepthsTransformer,
}


def build_model(config: TSAConfig) -> TSATransformer:
    """The model class that `config.routing` names."""
    return VARIANTS[config.routing](config)
