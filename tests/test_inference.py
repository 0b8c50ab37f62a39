import pytest
import torch

from tests.test_baselines import make, spread_predictors
from tests.test_model import TINY, spread_routers
from tsa_lightning.inference import KVCache, decode_step, generate_cached


def prompts_of_lengths(*lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lengths]


def trained_like(routing: str):
    """A float64 model whose routers make a real mix of decisions (float64: no argmax ties from rounding)."""
    model = make(routing, mod_every=1).double()
    if routing == "tsa":
        spread_routers(model)
    if routing == "mod":
        spread_predictors(model)
    return model


@pytest.mark.parametrize("routing", ["tsa", "early_exit", "mod", "none"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_cached_greedy_equals_full_recompute(routing, threshold):
    model = trained_like(routing)
    if routing == "early_exit":
        threshold = threshold * 0.2  # confidences of an untrained 11-way softmax sit near 0.1-0.2
    prompts = prompts_of_lengths(3, 7, 1)
    cached = generate_cached(model, prompts, max_new_tokens=8, temperature=0, threshold=threshold)
    for prompt, got in zip(prompts, cached, strict=True):
        model.config.skip_threshold = threshold
        expected = model.generate(prompt[None], max_new_tokens=8, temperature=0, mode="hard")[0]
        assert torch.equal(got, expected)


def test_cached_decoding_really_skips():
    """Guards the equality test: with these routers, decoding skips a real share of blocks."""
    model = trained_like("tsa")
    cache = KVCache(model, 2, 16, model.wte.weight)
    start = torch.zeros(2, dtype=torch.long)
    executed = [
        decode_step(model, cache, torch.tensor([t % 11, (3 * t) % 11]), t, start, 0.5)[1] for t in range(16)
    ]
    share = torch.stack(executed)[..., 1:].float().mean()
    assert 0.1 < share < 0.9


def test_cached_generation_refuses_more_than_block_size():
    model = trained_like("tsa")
    with pytest.raises(ValueError, match="block_size"):
        generate_cached(model, prompts_of_lengths(10), max_new_tokens=10)


def test_sampling_with_cache_stays_in_vocabulary():
    model = trained_like("tsa")
    out = generate_cached(model, prompts_of_lengths(2, 5), max_new_tokens=6, temperature=1.0, top_k=3)
    assert [len(o) for o in out] == [8, 11]
    assert all(int(o.max()) < TINY["vocab_size"] for o in out)
