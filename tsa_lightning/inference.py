"""Incremental decoding with a key/value cache, where each new token decides per block whether to run it.

The model's own forward does the work (`TSATransformer.forward` with `input_pos`, after
`set_kv_cache`): a token that skips a block still writes that block's keys and values to the cache,
projected from its copied hidden state (CALM-style), so later tokens attend to it exactly as in the
full-sequence hard forward. Prompts of different lengths are left-padded; pads are never attended to.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_lightning.errors import ConfigError, check_range
from tsa_lightning.model import Mode, TSATransformer, sample_next

MAX_THRESHOLD = 1.01  # above every probability and confidence: nothing is ever skipped


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, threshold: float | None = None
) -> None:
    """What sampling refuses, in one line each: the command line and Python alike."""
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0)
    check_range("top_k", top_k, 1)
    if not isinstance(threshold, Tensor):  # a budget's threshold (log-odds) is the model's own
        check_range("threshold", threshold, 0, MAX_THRESHOLD)


@torch.no_grad()
def generate_cached(
    model: TSATransformer,
    prompts: list[Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    threshold: float | None = None,
    mode: Mode = "hard",
    compile: bool = False,
) -> list[Tensor]:
    """Sample with a key/value cache; prompts may differ in length. Returns prompt + new tokens.

    Each row equals sampling it alone by full recomputation over its own context: its prompt's
    last block_size tokens, then every new token. Learned position embeddings allow no more, so
    when a row's context outgrows block_size it keeps only its last block_size // 2 tokens; the
    batch's cache is then refilled from every row's own context, left-padded again, so no row's
    sample depends on the rest of its batch. `compile` runs the steps through torch.compile
    (dynamic shapes: one graph serves every position; the first call pays the compilation).
    """
    if min(len(p) for p in prompts) < 1:
        raise ConfigError("every prompt needs at least one token")
    was_training = model.training
    model.eval()
    forward = torch.compile(model, dynamic=True) if compile else model
    device = model.wte.weight.device
    window = model.config.block_size
    T0 = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T0, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, T0 - len(p) :] = p.to(device)
    lengths = torch.tensor([min(len(p), window) for p in prompts])  # row b's context: its last lengths[b]
    width = int(lengths.max())  # the cache's rows are left-padded to the longest context
    try:
        for step in range(max_new_tokens):
            if step == 0 or width > window:  # (re)fill the cache from each row's own context
                lengths[lengths > window] = window // 2
                width = int(lengths.max())
                model.set_kv_cache(len(prompts), window, start=(width - lengths).to(device))
                logits = forward(tokens[:, -width:], mode=mode, threshold=threshold, input_pos=0)[0]
            else:
                logits = forward(tokens[:, -1:], mode=mode, threshold=threshold, input_pos=width - 1)[0]
            token = sample_next(logits[:, -1], temperature, top_k)[:, None]
            tokens = torch.cat([tokens, token], dim=1)
            lengths, width = lengths + 1, width + 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)  # the caller's mode, as it was
    return [torch.cat([p.to(device), tokens[b, T0:]]) for b, p in enumerate(prompts)]
