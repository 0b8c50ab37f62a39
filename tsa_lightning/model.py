"""Token-Selective Attention (TSA): a GPT whose tokens choose their own depth.

Between consecutive pre-norm blocks a small router reads each token's hidden state and emits a
halting probability p. The next block's two residual updates are scaled by the keep weight
(1 - p), so training stays end-to-end differentiable (soft mode). At inference a token with
p > skip_threshold does not run the block at all (hard mode): its state is copied upward, and
later tokens still read keys and values computed from that copied state. Decisions compare the
router's logit, not p: float32 rounds p to exactly 1 for logits above ~16.6, and no threshold
could split such tokens.

The `unit` gate makes hard mode's kept tokens add their whole update (training's gradient still
flows through 1 - p), so a threshold that skips nothing gives the dense network itself.

The dense twin (`routing="none"`) is the same network without routers: same blocks, same
initialisation, same code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from tsa_lightning.errors import ConfigError

Mode = Literal["soft", "hard"]
MODES: tuple[Mode, ...] = get_args(Mode)


def shape(default):
    """A field that fixes the weights: a checkpoint must agree on it to be loaded."""
    return field(default=default, metadata={"shape": True})


@dataclass
class TSAConfig:
    """The network (nanoGPT's names) and its routing; invalid values raise ValueError naming the field.

    The one definition of the architecture: the CLI's `model.config` options, the checkpoint's
    hyperparameters and the checkpoint compatibility check (the `shape` fields) all come from here.

    Attributes:
        vocab_size: tokens in the vocabulary (set from the data).
        block_size: the longest context, in tokens (set from the data).
        n_layer: transformer blocks; block 0 always runs, a router gates each later one.
        n_head: attention heads per block.
        n_embd: width of the residual stream.
        ffn_hidden: width of each block's MLP (None: 4 * n_embd).
        dropout: dropout after the embeddings and on each block's updates, in training.
        bias: biases in the linear layers and LayerNorms.
        routing: "tsa" (a router per block, the method), "none" (the dense twin), "early_exit" or
            "mod" (Mixture-of-Depths), the baselines on the same trunk.
        router_hidden: hidden width of each router's MLP (None: max(16, n_embd // 4), as published).
        router_bias_init: the routers' output bias at initialisation; -1 gives p ~ 0.27, so every
            token starts mostly kept.
        router_slope: negative slope of the router's hidden activation (0: the published ReLU). A
            ReLU router whose units are all off gives a token exactly its output bias as the logit;
            a budget's threshold cannot split tokens that tie, and a slope gives each its own.
        skip_threshold: hard mode skips a block when the router's p > skip_threshold (a compute
            budget sets its own).
        gate: how p gates a block in training: "soft" scales the update by 1 - p (as published);
            "straight_through" applies hard mode's decision with soft mode's gradient; "unit" runs
            a kept token at full strength, so that a threshold of +inf is the dense network.
        mod_capacity: Mixture-of-Depths: the share of each sequence a routed block runs.
        mod_every: Mixture-of-Depths: route every mod_every-th block.
    """

    vocab_size: int = shape(65)
    block_size: int = shape(128)
    n_layer: int = shape(6)
    n_head: int = shape(8)
    n_embd: int = shape(256)
    ffn_hidden: int | None = shape(None)
    dropout: float = 0.0
    bias: bool = shape(True)
    routing: Literal["none", "tsa", "early_exit", "mod"] = shape("tsa")
    router_hidden: int | None = shape(None)
    router_bias_init: float = -1.0
    router_slope: float = 0.0
    skip_threshold: float = 0.5
    gate: Literal["soft", "straight_through", "unit"] = "soft"
    mod_capacity: float = 0.125
    mod_every: int = shape(2)

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd
        if self.router_hidden is None:
            self.router_hidden = max(16, self.n_embd // 4)
        for name, kind in get_type_hints(TSAConfig).items():  # the choices are the annotations' own
            value = getattr(self, name)
            if get_origin(kind) is Literal and value not in get_args(kind):
                raise ConfigError(f"TSAConfig.{name} must be one of {get_args(kind)}, got {value!r}")
            if kind in (int, int | None) and (
                not isinstance(value, int) or isinstance(value, bool) or value <= 0
            ):
                raise ConfigError(f"TSAConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"TSAConfig.n_embd ({self.n_embd}) must be divisible by TSAConfig.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"TSAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.skip_threshold <= 1.0:
            raise ConfigError(f"TSAConfig.skip_threshold must be in [0, 1], got {self.skip_threshold!r}")
        if self.routing != "none" and self.n_layer < 2:
            raise ConfigError(f"TSAConfig.n_layer must be at least 2 when routing blocks, got {self.n_layer}")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ConfigError(f"TSAConfig.mod_capacity must be in (0, 1], got {self.mod_capacity!r}")
        if not 0.0 <= self.router_slope < 1.0:
            raise ConfigError(f"TSAConfig.router_slope must be in [0, 1), got {self.router_slope!r}")
        if not math.isfinite(self.router_bias_init):
            raise ConfigError(f"TSAConfig.router_bias_init must be finite, got {self.router_bias_init!r}")

    def mismatches(self, other: TSAConfig) -> list[str]:
        """The `shape` fields on which two configs disagree: a checkpoint of one cannot load in the other."""
        return [
            f.name
            for f in fields(self)
            if f.metadata.get("shape") and getattr(self, f.name) != getattr(other, f.name)
        ]


@dataclass
class Routing:
    """What the routers decided in one forward pass."""

    halt_probs: Tensor | None  # (B, T, L-1): router l's p, read after block l; None for the dense twin
    executed: Tensor  # (B, T, L) bool: which token ran which block (soft mode runs everything)
    aux_loss: Tensor | None = None  # training term to add to the task loss, if the router has one
    halt_logits: Tensor | None = None  # (B, T, L-1): the log-odds of halt_probs, which decisions compare


@dataclass
class Decision:
    """How one block runs: who runs it and how strongly their updates count."""

    scale: Tensor | None = None  # (B, T, 1) scale of the block's updates; None: 1
    kept: Tensor | None = None  # (B, T) bool: tokens that run the block; None: every token
    halt_logit: Tensor | None = None  # (B, T) the log-odds of the router's halting probability
    aux_loss: Tensor | None = None  # a training term the router adds (baselines)


def p_dtype(stream: torch.dtype) -> torch.dtype:
    """Halting probabilities are float32 at least: in half precision a p near a threshold would tie."""
    return torch.promote_types(stream, torch.float32)


def skip_logit(threshold: float | Tensor) -> float | Tensor:
    """A skip threshold in the units decisions compare: a probability (a float, as users give one)
    becomes log-odds (1: +inf, nothing skips; 0: -inf); a tensor (budgets hold theirs so) already is."""
    if isinstance(threshold, Tensor):
        return threshold
    if threshold >= 1.0:
        return math.inf
    return -math.inf if threshold <= 0.0 else math.log(threshold) - math.log1p(-threshold)


class KVCache(nn.Module):
    """Keys and values of one attention layer for every position decoded so far (litgpt's design).

    Rows are left-padded to a common length: `start` (B,) is each row's first real position, and
    no real token ever reads a pad.
    """

    def __init__(self, batch: int, max_len: int, config: TSAConfig, start: Tensor, like: Tensor) -> None:
        super().__init__()
        shape = (batch, config.n_head, max_len, config.n_embd // config.n_head)
        self.register_buffer("k", like.new_zeros(shape), persistent=False)
        self.register_buffer("v", like.new_zeros(shape), persistent=False)
        self.start = start

    def forward(self, input_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store positions input_pos.. of (B, H, T, D) keys and values; return every position up to them."""
        end = input_pos + k.size(2)
        self.k[:, :, input_pos:end], self.v[:, :, input_pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.query = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.key_value = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.kv_cache: KVCache | None = None  # set for decoding by TSATransformer.set_kv_cache

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def merge_heads(self, y: Tensor) -> Tensor:
        B, H, T, D = y.shape
        return y.transpose(1, 2).reshape(B, T, H * D)

    def forward(self, x: Tensor, kept: Tensor | None = None, input_pos: int = 0) -> Tensor:
        """Updates (B, T, C) of every token, or (N, C) of the `kept` (B, T) ones in row-major order.

        Keys and values come from every position (a skipped token's state is still readable), but
        queries and the output projection run only for kept tokens. Kept queries are packed to the
        left of each row, so the attention is batched with a causal mask by position. With a KV
        cache, x holds positions input_pos.. and earlier keys and values come from the cache.
        """
        B, T, C = x.shape
        k, v = map(self.split_heads, self.key_value(x).chunk(2, dim=-1))
        p = self.dropout if self.training else 0.0
        every_token = kept is None
        if self.kv_cache is None and every_token:
            y = F.scaled_dot_product_attention(
                self.split_heads(self.query(x)), k, v, dropout_p=p, is_causal=True
            )
            return self.proj(self.merge_heads(y))
        start = None
        if self.kv_cache is not None:
            k, v = self.kv_cache(input_pos, k, v)
            start = self.kv_cache.start
        if every_token:  # cached decoding: every query, masked by position (no packing to do)
            positions = torch.arange(input_pos, input_pos + T, device=x.device).expand(B, T)
            mask = may_attend(positions, k.size(2), start)
            y = F.scaled_dot_product_attention(
                self.split_heads(self.query(x)), k, v, attn_mask=mask[:, None], dropout_p=p
            )
            return self.proj(self.merge_heads(y))
        counts = kept.sum(dim=1)
        n = int(counts.max())
        if n == 0:
            return x.new_zeros(0, C)  # nobody runs: writing the cache above was all the work
        # positions of the kept tokens, packed left in each row (stable sort keeps them in order)
        positions = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :n]
        slot_used = torch.arange(n, device=x.device) < counts[:, None]  # (B, n)
        q_kept = self.query(x[kept])  # under autocast, in the autocast dtype
        q = q_kept.new_zeros(B, n, C)
        q[slot_used] = q_kept
        mask = may_attend(input_pos + positions, k.size(2), start)
        y = F.scaled_dot_product_attention(self.split_heads(q), k, v, attn_mask=mask[:, None], dropout_p=p)
        return self.proj(self.merge_heads(y)[slot_used])


def may_attend(query_pos: Tensor, n_keys: int, start: Tensor | None) -> Tensor:
    """(B, n, S): a query reads keys up to its own position, and never a left pad (a pad reads itself)."""
    keys = torch.arange(n_keys, device=query_pos.device)
    mask = keys <= query_pos[..., None]
    if start is None:
        return mask
    return mask & ((keys >= start[:, None, None]) | (keys == query_pos[..., None]))


class MLP(nn.Module):
    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """A standard pre-norm block; TSA only rescales its residual updates.

    `run_for_all_above`: a full sequence whose kept share is above it runs the block for every token
    and drops the skipped updates, because packing the kept queries and masking attention cost more
    than the rows they save when most tokens run (docs/benchmarks.md). Decoding steps (one position)
    always gather. 1.0 gathers always, 0.0 never; the result is the same either way.
    """

    def __init__(self, config: TSAConfig, run_for_all_above: float = 0.5) -> None:
        super().__init__()
        self.run_for_all_above = run_for_all_above
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, scale: Tensor | None = None, kept: Tensor | None = None, input_pos: int = 0
    ) -> Tensor:
        """Tokens with `kept` (B, T) run (None: all), their updates scaled by `scale` (B, T, 1; None: 1).

        Dense when every token runs; nothing when none does (but a KV cache still receives their
        keys and values). When some do: gather, compute, scatter - unless most of a full sequence
        runs (`run_for_all_above`): then the block runs for all and drops the skipped updates.
        """
        if kept is None or kept.all():
            return self.update(x, scale, input_pos)
        if not kept.any():
            if self.attn.kv_cache is not None:
                self.attn(self.ln_1(x), kept, input_pos)  # writes keys and values, runs no query
            return x
        if kept.size(1) > 1 and kept.float().mean() > self.run_for_all_above:
            return torch.where(kept[..., None], self.update(x, scale, input_pos), x)
        h, w = x[kept], None if scale is None else scale[kept]
        h = h + scale_update(self.dropout(self.attn(self.ln_1(x), kept, input_pos)), w)
        h = h + scale_update(self.dropout(self.mlp(self.ln_2(h))), w)
        return x.masked_scatter(kept[..., None], h)

    def update(self, x: Tensor, scale: Tensor | None, input_pos: int) -> Tensor:
        """The block for every token."""
        x = x + scale_update(self.dropout(self.attn(self.ln_1(x), input_pos=input_pos)), scale)
        return x + scale_update(self.dropout(self.mlp(self.ln_2(x))), scale)


def router_flops(config: TSAConfig) -> int:
    """Forward FLOPs of one Router on one token."""
    return 2 * config.router_hidden * (config.n_embd + 1)


def scale_update(update: Tensor, scale: Tensor | None) -> Tensor:
    return update if scale is None else scale * update


class Router(nn.Module):
    """p = sigmoid(W2 ReLU(W1 h + b1) + b2): the probability that a token halts before the next block
    (with `router_slope`, a leaky ReLU)."""

    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.hidden = nn.Linear(config.n_embd, config.router_hidden)
        self.out = nn.Linear(config.router_hidden, 1)
        self.slope = config.router_slope

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(h))

    def logit(self, h: Tensor) -> Tensor:
        """The log-odds of p, in float32 at least."""
        logit = self.out(F.leaky_relu(self.hidden(h), self.slope)).squeeze(-1)
        return logit.to(p_dtype(logit.dtype))


class TSATransformer(nn.Module):
    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_gpt2)
        for block in self.blocks:  # GPT-2: scale residual projections by depth
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # Routers are built and initialised after the trunk, so that under one seed the dense
        # twin and the TSA model start from identical blocks.
        self.routers: nn.ModuleList | None = None
        if config.routing == "tsa":
            self.routers = nn.ModuleList(Router(config) for _ in range(config.n_layer - 1))
            self.routers.apply(self._init_router)

    def _init_gpt2(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _init_router(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        if isinstance(module, Router):
            nn.init.constant_(module.out.bias, self.config.router_bias_init)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        mode: Mode = "soft",
        threshold: float | Tensor | None = None,
        input_pos: int | None = None,
    ) -> tuple[Tensor, Tensor | None, Routing]:
        """Returns (logits, loss or None, routing). `threshold` overrides config.skip_threshold: a
        probability, or a tensor of log-odds (one, or one per row (B,)) as budgets hold them.

        With `input_pos` (after `set_kv_cache`), idx holds positions input_pos.. of a sequence whose
        earlier keys and values are cached: the same blocks and routing serve incremental decoding.
        """
        if mode not in MODES:
            raise ConfigError(f"mode must be 'soft' or 'hard', got {mode!r}")
        B, T = idx.shape
        start = 0 if input_pos is None else input_pos
        if self.config.block_size < start + T:
            raise ConfigError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        threshold = self.config.skip_threshold if threshold is None else threshold
        x = self.drop(self.wte(idx) + self.wpe(self.positions(start, T, idx.device)))
        x = self.blocks[0](x, input_pos=start)  # the stem: every token runs block 0
        everyone = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        executed, halts, aux = [everyone], [], []
        for i, block in enumerate(self.blocks[1:]):
            decision = self.route(i, x, mode, threshold, targets)
            x = block(x, decision.scale, decision.kept, start)
            executed.append(everyone if decision.kept is None else decision.kept)
            if decision.halt_logit is not None:
                halts.append(decision.halt_logit)
            if decision.aux_loss is not None:
                aux.append(decision.aux_loss)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        halt_logits = torch.stack(halts, dim=-1) if halts else None
        routing = Routing(
            halt_probs=None if halt_logits is None else torch.sigmoid(halt_logits).to(p_dtype(x.dtype)),
            executed=torch.stack(executed, dim=-1),
            aux_loss=self.auxiliary_loss(loss, aux),
            halt_logits=halt_logits,
        )
        return logits, loss, routing

    def positions(self, input_pos: int, T: int, device: torch.device) -> Tensor:
        """Position ids of the next T tokens; a left-padded row counts from its first real token."""
        pos = torch.arange(input_pos, input_pos + T, device=device)
        cache = self.blocks[0].attn.kv_cache
        return pos if cache is None else (pos - cache.start[:, None]).clamp(min=0)

    def set_kv_cache(self, batch: int, max_len: int, start: Tensor | None = None) -> None:
        """Give every attention a KV cache; `start` (B,): first real position of each left-padded row."""
        like = self.wte.weight
        start = torch.zeros(batch, dtype=torch.long, device=like.device) if start is None else start
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, max_len, self.config, start, like)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def route(
        self, i: int, x: Tensor, mode: Mode, threshold: float | Tensor, targets: Tensor | None
    ) -> Decision:
        """TSA's decision for block i + 1, read from the state after block i.

        Hard mode runs the tokens whose p is at most the threshold. Their updates are scaled by
        1 - p, or count whole under the unit gate. Training's forward (soft mode): the soft gate
        scales every token's update by 1 - p; the straight-through and unit gates give hard mode's
        values (a skipped token adds nothing) with the soft gate's gradient.
        """
        if self.routers is None:
            return Decision()
        logit = self.routers[i].logit(x)
        keep = (1 - torch.sigmoid(logit)).unsqueeze(-1).to(x.dtype)
        kept = ~self.skips(logit, threshold)
        unit = self.config.gate == "unit"
        if mode == "hard":
            return Decision(scale=None if unit else keep, kept=kept, halt_logit=logit)
        if unit:  # the value 1 or 0, the gradient of 1 - p
            return Decision(scale=kept.unsqueeze(-1).to(keep.dtype) + keep - keep.detach(), halt_logit=logit)
        if self.config.gate == "straight_through":
            keep = keep + (keep * kept.unsqueeze(-1) - keep).detach()
        return Decision(scale=keep, halt_logit=logit)

    def skips(self, halt_logits: Tensor, threshold: float | Tensor) -> Tensor:
        """Hard mode's rule: a token whose router says p > threshold skips the block, compared in
        log-odds (`skip_logit`), where float32 splits any two tokens whose router logits differ.

        `threshold`: one for every token, or one per row (B,), as elastic training gives each row
        of a batch its own budget."""
        threshold = skip_logit(threshold)
        if isinstance(threshold, Tensor):
            threshold = threshold.to(halt_logits.device).view(-1, *[1] * (halt_logits.dim() - 1))
        return halt_logits > threshold

    @staticmethod
    def routed(config: TSAConfig) -> list[int]:
        """Routers i (deciding block i + 1) that exist: TSA routes every block after the stem."""
        return list(range(config.n_layer - 1)) if config.routing != "none" else []

    def gated_blocks(self) -> list[int]:
        """The block each column of `Routing.halt_probs` gates; logs name a router by this block."""
        return [i + 1 for i in self.routed(self.config)]

    def hard_executed(self, halt_logits: Tensor, threshold: float | Tensor) -> Tensor:
        """Which token hard mode would run in which block (B, T, L), from the routers' outputs alone."""
        B, T, _ = halt_logits.shape
        executed = torch.ones(B, T, self.config.n_layer, dtype=torch.bool, device=halt_logits.device)
        executed[..., self.gated_blocks()] = ~self.skips(halt_logits, threshold)
        return executed

    def executed_share(self, routing: Routing, threshold: float | Tensor) -> Tensor:
        """The share of routed token-block operations that hard mode runs: what a compute budget controls."""
        return (~self.skips(routing.halt_logits, threshold)).float().mean()

    @property
    def steerable(self) -> bool:
        """Whether a depth term (a depth loss or a compute budget) steers how much this model skips."""
        return self.routers is not None

    def depth_term(self, routing: Routing) -> Tensor | None:
        """The paper's depth term mean(1 - p) (weighted by the module): pushes routers towards skipping."""
        return None if routing.halt_probs is None else (1 - routing.halt_probs).mean()

    @classmethod
    def routing_flops_per_token(cls, config: TSAConfig) -> int:
        """What deciding costs per token: TSA's L - 1 routers (none for the dense twin)."""
        if config.routing == "none":
            return 0
        return (config.n_layer - 1) * router_flops(config)

    @property
    def reported_modes(self) -> tuple[Mode, ...]:
        """The modes whose metrics mean something: the dense twin's soft and hard mode are one, and
        so are a unit gate's (its soft mode is the trained hard network)."""
        if self.config.routing == "none":
            return ("soft",)
        return ("hard",) if self.config.gate == "unit" else ("soft", "hard")

    @property
    def trained_mode(self) -> Mode:
        """The mode the network was trained as: the straight-through and unit gates train the hard network."""
        return "soft" if self.config.gate == "soft" else "hard"

    def auxiliary_loss(self, loss: Tensor | None, terms: list[Tensor]) -> Tensor | None:
        """What training adds to the task loss (the baselines' exit and predictor losses)."""
        return torch.stack(terms).sum() if terms else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def router_overhead(self) -> float:
        """Routing parameters (anything outside the trunk) as a fraction of the dense twin's."""
        trunk = {id(p) for m in (self.wte, self.wpe, self.blocks, self.ln_f) for p in m.parameters()}
        dense = sum(p.numel() for p in self.parameters() if id(p) in trunk)
        return (self.num_params() - dense) / dense

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (linear weights, embeddings) only; never biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        mode: Mode = "soft",
    ) -> Tensor:
        """Sample by full recomputation over the last block_size tokens; temperature 0 is greedy.

        The reference that `inference.generate_cached` (the fast way) is tested against.
        """
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -self.config.block_size :], mode=mode)
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k)[:, None]), dim=1)
        return idx


def sample_next(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """One token id per row of next-token logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]
