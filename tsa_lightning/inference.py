"""Incremental decoding with a key/value cache, where each new token decides per block whether to run it.

The model's own forward does the work (`TSATransformer.forward` with `input_pos`, after
`set_kv_cache`): a token that skips a block still writes that block's keys and values to the cache,
projected from its copied hidden state (CALM-style), so later tokens attend to it exactly as in the
full-sequence hard forward. Prompts of different lengths are left-padded; pads are never attended to.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import Tensor

from tsa_lightning.budget import probability
from tsa_lightning.errors import ConfigError, check_range
from tsa_lightning.model import Mode, TSATransformer, sample_next, skip_logit
from tsa_lightning.runs import load_checkpoint

MAX_THRESHOLD = 1.01  # above every probability and confidence: nothing is ever skipped


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    threshold: float | None = None,
    budget: float | None = None,
) -> None:
    """What sampling refuses, in one line each: the command line and Python alike."""
    if budget is not None and threshold is not None:
        raise ConfigError("give a budget or a threshold, not both: a budget sets the threshold")
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


def sample(
    ckpt_path: str | None = None,
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    mode: Mode | None = None,
    threshold: float | None = None,
    seed: int = 1337,
    compile: bool = False,
    budget: float | None = None,
) -> str:
    """Print text sampled from a checkpoint with the KV-cache decoder.

    Args:
        ckpt_path: a checkpoint written by `fit`.
        prompt: text to continue (in the corpus alphabet).
        max_new_tokens: how many tokens to generate (>= 1).
        temperature: softmax temperature (>= 0); 0 is greedy.
        top_k: sample only among the k most likely tokens (>= 1).
        mode: "soft" (every block runs) or "hard" (tokens skip blocks); default: the mode the model
            was trained for (hard for a straight-through gate, early exit and Mixture-of-Depths).
        threshold: skip threshold for hard mode, in [0, 1.01] (default: the trained model's).
        budget: an elastic checkpoint's budget (a share of the routed blocks run) to decode at,
            within the range it was trained for (default: its compute_budget).
        seed: random seed for sampling.
        compile: run the decoding steps through torch.compile (the first call compiles for
            seconds; docs/speed.md says when it pays).
    """
    check_sampling(max_new_tokens, temperature, top_k, threshold, budget)  # before the slow load
    module = load_checkpoint(ckpt_path).eval()
    threshold = module.threshold_at(budget) if budget is not None else threshold
    torch.manual_seed(seed)
    if compile:  # skipping is data-dependent: dynamo's notes on the graph breaks and recompiles it
        torch._logging.set_logs(dynamo=logging.ERROR)  # causes are expected, nothing for a user to act on
    mode = mode or module.model.trained_mode
    text = module.sample(prompt, max_new_tokens, temperature, top_k, mode, threshold, compile)
    used = module.skip_threshold if threshold is None else threshold
    at = f"threshold {probability(skip_logit(used)):.4g}"
    if module.elastic_range:
        at = f"budget {module.budget.budget if budget is None else budget:g}, {at}"
    compiled = ", compiled" if compile else ""
    print(f"[{mode} mode at {at}, KV-cache decoding{compiled}]", file=sys.stderr)
    print(prompt + text)
    return text
