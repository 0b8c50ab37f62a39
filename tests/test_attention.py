"""Attention for a subset of tokens: kept queries packed per row, masked by their own positions, equal to
the full causal attention's rows; dropout on every path in training; the cache outside the weights."""

import pytest
import torch

from tests.helpers import make, spread_routers
from tsa_lightning import TSAConfig, TSATransformer
from tsa_lightning.model import Block, CausalSelfAttention, KVCache

SHAPE = dict(vocab_size=11, block_size=64, n_layer=3, n_head=2, n_embd=16)
T = 40  # longer than 16: sorting kept tokens to the left must keep them in order, which no short row tests


def attn_config(**overrides) -> TSAConfig:
    return TSAConfig(**{**SHAPE, **overrides})


def with_cache(attn: CausalSelfAttention, x: torch.Tensor) -> CausalSelfAttention:
    """The attention with a cache for rows of x's shape (no padding), to be filled from position 0."""
    attn.kv_cache = KVCache(x.size(0), x.size(1), attn_config(), torch.zeros(x.size(0), dtype=torch.long), x)
    return attn


def attention(**overrides) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(attn_config(**overrides)).eval()


def inputs(B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """States (B, T, C) and a kept mask that keeps about 40% of each row, a different subset per row."""
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(B, T, generator=g) < 0.4
    kept[:, 0] = True
    return torch.randn(B, T, SHAPE["n_embd"], generator=g), kept


def test_kept_queries_get_the_rows_of_the_full_causal_attention():
    attn = attention()
    x, kept = inputs()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, kept), attn(x)[kept])


def test_cached_attention_over_a_whole_window_equals_the_plain_one():
    attn = attention()
    x, _ = inputs()
    with torch.no_grad():
        plain = attn(x)
        torch.testing.assert_close(with_cache(attn, x)(x, None, 0), plain)


@pytest.mark.parametrize("run_for_all_above", [1.0, 0.0])  # always gather / always run for all
def test_a_partly_kept_block_updates_exactly_its_kept_tokens(run_for_all_above):
    torch.manual_seed(0)
    block = Block(attn_config()).eval()
    block.run_for_all_above = run_for_all_above
    x, kept = inputs()
    keep = torch.rand(*kept.shape, 1)
    with torch.no_grad():
        expected = torch.where(kept[..., None], block(x, keep), x)
        torch.testing.assert_close(block(x, keep, kept), expected)


def test_hard_mode_on_long_sequences_gathers_and_runs_for_all_alike():
    torch.manual_seed(0)
    model = TSATransformer(attn_config(n_layer=4)).eval()
    spread_routers(model)
    idx = torch.randint(0, 11, (3, 48), generator=torch.Generator().manual_seed(2))
    outputs = []
    for run_for_all_above in (1.0, -1.0):
        for block in model.blocks:
            block.run_for_all_above = run_for_all_above
        with torch.no_grad():
            logits, _, routing = model(idx, mode="hard")
        outputs.append(logits)
    assert 0.2 < routing.executed[..., 1:].float().mean() < 0.8
    torch.testing.assert_close(outputs[0], outputs[1])


def test_attention_dropout_acts_in_training_on_every_path_and_never_in_evaluation():
    attn = attention(dropout=0.5)
    x, kept = inputs()
    paths = {
        "full": lambda: attn(x),
        "gathered": lambda: attn(x, kept),
        "cached": lambda: with_cache(attn, x)(x, None, 0),
    }
    for name, path in paths.items():
        attn.kv_cache = None
        with torch.no_grad():
            attn.eval()
            evaluated = path()
            torch.testing.assert_close(path(), evaluated, msg=name)  # deterministic
            attn.train()
            torch.manual_seed(0)
            trained = path()
        assert not torch.allclose(trained, evaluated), name
    attn.kv_cache = None


def test_a_kv_cache_is_never_part_of_the_weights():
    """A state dict taken while decoding is the model's own, and loads into a model without a cache."""
    model = make()
    keys = set(model.state_dict())
    model.set_kv_cache(2, 16)
    saved = model.state_dict()
    assert set(saved) == keys
    model.clear_kv_cache()
    make(seed=1).load_state_dict(saved, strict=True)
