import pytest
import torch

from tests.helpers import TINY_NET, make, spread_predictors, spread_routers
from tsa_lightning.inference import generate_cached


def prompts_of_lengths(*lengths: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, TINY_NET["vocab_size"], (n,), generator=g) for n in lengths]


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
    model.set_kv_cache(2, 16)
    executed = [
        model(torch.tensor([[t % 11], [(3 * t) % 11]]), mode="hard", threshold=0.5, input_pos=t)[2].executed
        for t in range(16)
    ]
    model.clear_kv_cache()
    share = torch.stack(executed)[..., 1:].float().mean()
    assert 0.1 < share < 0.9


@pytest.mark.parametrize("routing", ["tsa", "early_exit", "mod"])
def test_cached_forward_equals_the_full_forward(routing):
    """Prefill, then one token at a time through the cache: the logits of the full hard forward."""
    model = trained_like(routing)
    idx = prompts_of_lengths(16)[0][None].repeat(2, 1)
    threshold = 0.5 if routing != "early_exit" else 0.12
    full, _, routing_full = model(idx, mode="hard", threshold=threshold)
    model.set_kv_cache(2, 16)
    steps = [model(idx[:, :5], mode="hard", threshold=threshold, input_pos=0)]
    steps += [model(idx[:, t : t + 1], mode="hard", threshold=threshold, input_pos=t) for t in range(5, 16)]
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat([s[0] for s in steps], dim=1), full)
    assert torch.equal(torch.cat([s[2].executed for s in steps], dim=1), routing_full.executed)


def test_cached_generation_slides_past_block_size():
    """Past block_size the cache is refilled from the last half window; the first tokens are exact."""
    model = trained_like("tsa")
    prompt = prompts_of_lengths(10)
    out = generate_cached(model, prompt, max_new_tokens=30, temperature=0)[0]
    assert len(out) == 40 and int(out.max()) < TINY_NET["vocab_size"]
    model.config.skip_threshold = 0.5
    expected = model.generate(prompt[0][None], max_new_tokens=6, temperature=0, mode="hard")[0]
    assert torch.equal(out[:16], expected)


def test_sampling_with_cache_stays_in_vocabulary():
    model = trained_like("tsa")
    out = generate_cached(model, prompts_of_lengths(2, 5), max_new_tokens=6, temperature=1.0, top_k=3)
    assert [len(o) for o in out] == [8, 11]
    assert all(int(o.max()) < TINY_NET["vocab_size"] for o in out)


def test_batched_prefill_equals_position_by_position_prefill():
    """One hard forward over the prompt fills the cache exactly as feeding it one token at a time."""
    model = trained_like("tsa")
    idx = prompts_of_lengths(12)[0][None]
    model.set_kv_cache(1, 16)
    batched = model(idx, mode="hard", input_pos=0)
    batched_cache = [(b.attn.kv_cache.k.clone(), b.attn.kv_cache.v.clone()) for b in model.blocks]
    model.set_kv_cache(1, 16)
    steps = [model(idx[:, t : t + 1], mode="hard", input_pos=t) for t in range(12)]
    torch.testing.assert_close(torch.cat([s[0] for s in steps], dim=1), batched[0])
    assert torch.equal(torch.cat([s[2].executed for s in steps], dim=1), batched[2].executed)
    for block, (k, v) in zip(model.blocks, batched_cache, strict=True):
        torch.testing.assert_close(block.attn.kv_cache.k, k)
        torch.testing.assert_close(block.attn.kv_cache.v, v)
    model.clear_kv_cache()
    assert (~batched[2].executed).sum() > 0  # the prompt really skipped blocks


def recompute(model, prompt: torch.Tensor, max_new_tokens: int, threshold: float | None = None):
    """Greedy decoding as generate_cached states it: past block_size, keep the last block_size // 2
    tokens, re-read them, go on; every step a full hard forward over the context."""
    window = model.config.block_size
    context = prompt.clone()
    reference = prompt.clone()
    for _ in range(max_new_tokens):
        if len(context) > window:
            context = context[-(window // 2) :]
        logits = model(context[None], mode="hard", threshold=threshold)[0][0, -1]
        token = logits.argmax()[None]
        context, reference = torch.cat([context, token]), torch.cat([reference, token])
    return reference


def test_long_samples_equal_their_stated_recomputation():
    """Past block_size: keep the last block_size // 2 tokens, re-read them, go on (README, sample)."""
    model = trained_like("tsa")
    prompt = prompts_of_lengths(10)[0]
    out = generate_cached(model, [prompt], max_new_tokens=40, temperature=0)[0]
    assert torch.equal(out, recompute(model, prompt, 40))


def lively(model):
    """Larger random trunk weights: an untrained tiny model's greedy samples otherwise collapse into
    one repeated token, which any batching would get right."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("wte", "wpe", "blocks")) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 3 / p.size(-1) ** 0.5)
    return model


@pytest.mark.parametrize("routing", ["tsa", "early_exit", "mod", "none"])
def test_long_samples_of_different_lengths_keep_each_row_its_own_context(routing):
    """A row refills its cache when it would alone: its sample never depends on the rest of the batch."""
    model = lively(trained_like(routing))
    threshold = 0.7 if routing == "early_exit" else 0.5
    prompts = prompts_of_lengths(10, 16, 3)
    batched = generate_cached(model, prompts, max_new_tokens=40, temperature=0, threshold=threshold)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = generate_cached(model, [prompt], max_new_tokens=40, temperature=0, threshold=threshold)[0]
        assert torch.equal(got, alone)
        assert torch.equal(got, recompute(model, prompt, 40, threshold))
    assert len({tuple(o[-40:].tolist()) for o in batched}) == 3  # the samples differ, and none is one token
    assert all(len(set(o[-40:].tolist())) > 2 for o in batched)
    if routing != "none":  # the rows skip, and skip differently
        starts = torch.stack([o[: model.config.block_size] for o in batched])  # prompt and first new tokens
        skipped = ~model(starts, mode="hard", threshold=threshold)[2].executed
        assert 0 < skipped[..., 1:].float().mean() < 1
        assert not torch.equal(skipped[0], skipped[1]) and not torch.equal(skipped[0], skipped[2])


@pytest.mark.parametrize("top_k", [None, 3])
def test_seeded_samples_are_the_same_through_the_cache_and_full_recomputation(top_k):
    model = trained_like("tsa")
    model.config.skip_threshold = 0.5
    prompt = prompts_of_lengths(4)[0]
    torch.manual_seed(7)
    cached = generate_cached(model, [prompt], max_new_tokens=10, temperature=1.0, top_k=top_k)[0]
    torch.manual_seed(7)
    full = model.generate(prompt[None], max_new_tokens=10, temperature=1.0, top_k=top_k, mode="hard")[0]
    assert torch.equal(cached, full)


@pytest.mark.parametrize("routing", ["tsa", "none"])
def test_the_compiled_decoder_equals_the_eager_one(routing):
    model = trained_like(routing)
    prompts = prompts_of_lengths(3, 7)
    eager = generate_cached(model, prompts, max_new_tokens=12, temperature=0)
    compiled = generate_cached(model, prompts, max_new_tokens=12, temperature=0, compile=True)
    for got, expected in zip(compiled, eager, strict=True):
        assert torch.equal(got, expected)


def test_a_partly_skipped_block_gives_the_same_result_gathered_or_run_for_all():
    """Running it for every token and dropping the skipped updates equals gathering the kept ones."""
    model = trained_like("tsa")
    idx = prompts_of_lengths(16)[0][None].repeat(3, 1)
    outputs = {}
    for run_for_all_above in (-1.0, 1.0):  # always run for all / always gather
        for block in model.blocks:
            block.run_for_all_above = run_for_all_above
        logits, _, routing = model(idx, mode="hard", threshold=0.5)
        outputs[run_for_all_above] = logits
    assert 0.1 < routing.executed[..., 1:].float().mean() < 0.9
    torch.testing.assert_close(outputs[-1.0], outputs[1.0])
