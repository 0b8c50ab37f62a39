"""Incremental decoding with a key/value cache, where each new token decides per block whether to run it.

A token that skips a block still writes that block's keys and values to the cache, projected from
its copied hidden state (CALM-style), so later tokens attend to it exactly as in the full-sequence
hard forward; only its query, attention, output projection and FFN are skipped. Prompts of
different lengths are left-padded; pads are never attended to.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tsa_lightning.model import Block, TSATransformer, sample_next, scale_update


class KVCache:
    """Keys and values of every block for every position so far: (L, B, 2, H, max_len, head_dim)."""

    def __init__(self, model: TSATransformer, batch: int, max_len: int, like: Tensor) -> None:
        c = model.config
        self.kv = like.new_zeros(c.n_layer, batch, 2, c.n_head, max_len, c.n_embd // c.n_head)


def _block_step(
    block: Block, x: Tensor, keep: Tensor | None, kept: Tensor | None, cache: Tensor, t: int, mask: Tensor
) -> Tensor:
    """One position of one block for the whole batch; rows with kept False only write keys/values."""
    attn = block.attn
    a = block.ln_1(x)
    B, _, C = x.shape
    cache[:, :, :, t] = attn.key_value(a).view(B, 2, attn.n_head, C // attn.n_head)  # one write for k and v
    running = B if kept is None else int(kept.sum())
    if running == 0:
        return x  # nobody runs this block: the projections above were all it cost
    rows = None if running == B else kept[:, 0].nonzero().squeeze(1)
    pick = slice(None) if rows is None else rows
    w = None if keep is None else keep[pick]
    q = attn.split_heads(attn.query(a[pick]))
    kv = cache[pick, :, :, : t + 1]
    y = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=mask[pick])
    h = x[pick] + scale_update(attn.proj(attn.merge_heads(y)), w)
    h = h + scale_update(block.mlp(block.ln_2(h)), w)
    if rows is None:
        return h
    x = x.clone()
    x[rows] = h
    return x


def decode_step(
    model: TSATransformer, cache: KVCache, token: Tensor, t: int, start: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Feed position t (token: (B,)); returns next-token logits (B, V) and the executed mask (B, L)."""
    B = token.size(0)
    positions = torch.arange(t + 1, device=token.device)
    # a real token reads real tokens only; a pad reads itself, so nothing is ever all-masked
    mask = ((positions >= start[:, None]) | (positions == t))[:, None, None, :]
    x = model.wte(token)[:, None] + model.wpe((t - start).clamp(min=0))[:, None]
    executed = [torch.ones(B, dtype=torch.bool, device=token.device)]
    x = _block_step(model.blocks[0], x, None, None, cache.kv[0], t, mask)
    for i, block in enumerate(model.blocks[1:]):
        decision = model.route(i, x, "hard", threshold, None)
        x = _block_step(block, x, decision.keep, decision.kept, cache.kv[i + 1], t, mask)
        executed.append(executed[0] if decision.kept is None else decision.kept[:, 0])
    return model.lm_head(model.ln_f(x))[:, 0], torch.stack(executed, dim=-1)


@torch.no_grad()
def generate_cached(
    model: TSATransformer,
    prompts: list[Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    threshold: float | None = None,
) -> list[Tensor]:
    """Hard-mode sampling with a key/value cache; prompts may differ in length. Returns prompt + new tokens.

    The cache holds block_size positions, as learned position embeddings allow no more.
    """
    model.eval()
    threshold = model.config.skip_threshold if threshold is None else threshold
    lengths = torch.tensor([len(p) for p in prompts])
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    total = int(lengths.max()) + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(
            f"prompt plus max_new_tokens is {total} tokens, more than block_size {model.config.block_size}; "
            "use TSATransformer.generate (full recompute over a sliding window) for longer samples"
        )
    device = model.wte.weight.device
    T0 = int(lengths.max())
    start = (T0 - lengths).to(device)
    padded = torch.zeros(len(prompts), T0, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        padded[b, T0 - len(p) :] = p.to(device)
    cache = KVCache(model, len(prompts), total, model.wte.weight)
    for t in range(T0):  # prefill, one position at a time
        logits, _ = decode_step(model, cache, padded[:, t], t, start, threshold)
    generated = []
    for t in range(T0, total):
        token = sample_next(logits, temperature, top_k)
        generated.append(token)
        if t + 1 < total:
            logits, _ = decode_step(model, cache, token, t, start, threshold)
    new = torch.stack(generated, dim=1) if generated else padded[:, :0]
    return [torch.cat([p.to(device), new[b]]) for b, p in enumerate(prompts)]
