import math

import pytest
import torch

from tests.helpers import TINY_NET, make, spread_routers, tokens
from tsa_lightning import TSAConfig, TSATransformer
from tsa_lightning.accounting import dense_twin_flops, forward_flops, report
from tsa_lightning.errors import ConfigError
from tsa_lightning.inference import generate_cached


@pytest.mark.parametrize("routing", ["none", "tsa"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_shapes(routing, mode):
    model = make(routing=routing)
    idx = tokens(B=3, T=10)
    logits, loss, routing_info = model(idx, targets=idx, mode=mode)
    assert logits.shape == (3, 10, TINY_NET["vocab_size"])
    assert loss.shape == () and torch.isfinite(loss)
    assert routing_info.executed.shape == (3, 10, TINY_NET["n_layer"])
    assert routing_info.executed.dtype == torch.bool
    if routing == "tsa":
        assert routing_info.halt_probs.shape == (3, 10, TINY_NET["n_layer"] - 1)
    else:
        assert routing_info.halt_probs is None
    assert model(idx)[1] is None


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_causal(mode):
    model = make()
    spread_routers(model)
    idx = tokens(B=2, T=16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % TINY_NET["vocab_size"]
    a, _, ra = model(idx, mode=mode)
    b, _, rb = model(changed, mode=mode)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert torch.equal(ra.executed[:, :9], rb.executed[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_hard_mode_actually_skips_a_mix():
    """Guards the other tests: with spread routers hard mode skips some but not all pairs."""
    model = make()
    spread_routers(model)
    executed = model(tokens(), mode="hard")[2].executed[..., 1:]
    assert 0.2 < executed.float().mean() < 0.8


def test_hard_at_threshold_one_equals_soft():
    model = make()
    spread_routers(model)
    idx = tokens()
    soft, _, rs = model(idx, mode="soft")
    hard, _, rh = model(idx, mode="hard", threshold=1.0)
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    assert rh.executed.all()
    torch.testing.assert_close(rh.halt_probs, rs.halt_probs)


def test_hard_at_threshold_zero_is_the_stem_only_model():
    model = make()
    idx = tokens()
    logits, _, routing = model(idx, mode="hard", threshold=0.0)
    x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    stem_only = model.lm_head(model.ln_f(model.blocks[0](x)))
    torch.testing.assert_close(logits, stem_only)
    assert routing.executed[..., 0].all() and not routing.executed[..., 1:].any()


def test_sparse_hard_forward_matches_masked_dense_reference():
    """Gather/compute/scatter equals running the block densely and keeping only kept tokens' updates."""
    model = make()
    spread_routers(model)
    idx = tokens()
    logits, _, routing = model(idx, mode="hard")
    x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    x = model.blocks[0](x)
    for i, block in enumerate(model.blocks[1:]):
        p = model.routers[i](x)
        kept = (p <= model.config.skip_threshold)[..., None]
        torch.testing.assert_close(kept[..., 0], routing.executed[..., i + 1])
        x = torch.where(kept, block(x, (1 - p)[..., None]), x)
    torch.testing.assert_close(logits, model.lm_head(model.ln_f(x)), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_router_parameter():
    model = make().train()
    idx = tokens()
    _, loss, _ = model(idx, targets=idx)
    loss.backward()
    for name, param in model.routers.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_dense_twin_has_identical_blocks_and_init():
    dense, tsa = make(seed=5, routing="none"), make(seed=5, routing="tsa")
    tsa_state = tsa.state_dict()
    for name, value in dense.state_dict().items():
        assert torch.equal(value, tsa_state[name]), name
    extra = set(tsa_state) - set(dense.state_dict())
    assert extra and all(name.startswith("routers.") for name in extra)


def test_router_starts_near_published_value():
    model = make()
    p = model(tokens())[2].halt_probs
    assert abs(p.mean().item() - 1 / (1 + math.e)) < 0.02


def test_paper_shape_overhead():
    model = TSATransformer(TSAConfig(vocab_size=65, block_size=128, n_layer=6, n_head=8, n_embd=256))
    assert model.config.ffn_hidden == 1024
    assert 0.016 <= model.router_overhead() <= 0.018
    assert TSATransformer(TSAConfig(routing="none")).router_overhead() == 0.0


def test_executed_counter_equals_mask_count():
    model = make()
    spread_routers(model)
    routing = model(tokens(), mode="hard")[2]
    rep = report(model.config, routing)
    mask = routing.executed
    assert rep.executed_fraction == pytest.approx(mask.sum().item() / mask.numel())
    assert rep.executed_per_layer == pytest.approx(mask.float().mean(dim=(0, 1)).tolist())
    assert rep.executed_per_layer[0] == 1.0
    alpha = (1 - routing.halt_probs).mean().item()
    assert rep.paper_alpha == pytest.approx(alpha)
    assert rep.paper_tlops_saved == pytest.approx(1 - (1 + 3 * alpha) / 4)


def test_soft_mode_saves_nothing_executed_but_costs_router_flops():
    model = make()
    rep = report(model.config, model(tokens())[2])
    assert rep.executed_fraction == 1.0
    assert rep.paper_tlops_saved > 0.15  # the untrained router's "savings"
    assert rep.flops > rep.dense_flops and rep.flops_saved < 0


def test_flops_hand_computation():
    """C=4, F=8, V=3, L=2, router width 16, T=2, one sequence; the second token skips block 1."""
    config = TSAConfig(vocab_size=3, block_size=2, n_layer=2, n_head=1, n_embd=4, ffn_hidden=8)
    executed = torch.tensor([[[True, True], [True, False]]])
    kv = 2 * 2 * (2 * (2 * 4 * 4))  # 2 tokens x 2 blocks x (K and V projections)
    q_o_ffn = 3 * (2 * 4 * 4 + 2 * 4 * 4 + 2 * 2 * 4 * 8)  # 3 (token, block) pairs run
    scores = (1 + 2) * (2 * 2 * 4)  # stem: positions 0 and 1 read 1 and 2 keys
    scores += 1 * (2 * 2 * 4)  # block 1: only position 0, one key
    routers = 2 * (2 * 4 * 16 + 2 * 16)
    head = 2 * (2 * 4 * 3)
    assert forward_flops(config, executed) == kv + q_o_ffn + scores + routers + head
    dense = dense_twin_flops(config, 1, 2)
    assert dense == kv + 4 * (2 * 4 * 4 * 2 + 2 * 2 * 4 * 8) + 2 * (1 + 2) * (2 * 2 * 4) + head


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_generate(mode):
    model = make()
    out = model.generate(tokens(B=2, T=3), max_new_tokens=20, temperature=0.8, top_k=5, mode=mode)
    assert out.shape == (2, 23)
    assert out.min() >= 0 and out.max() < TINY_NET["vocab_size"]
    greedy = model.generate(tokens(B=2, T=3), max_new_tokens=4, temperature=0, mode=mode)
    assert torch.equal(greedy, model.generate(tokens(B=2, T=3), max_new_tokens=4, temperature=0, mode=mode))


def test_param_groups_decay_only_matrices():
    model = make()
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_head=0), "n_head"),
        (dict(n_embd=0), "n_embd"),
        (dict(ffn_hidden=0), "ffn_hidden"),
        (dict(router_hidden=-3), "router_hidden"),
        (dict(n_layer=2.5), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(skip_threshold=1.5), "skip_threshold"),
        (dict(skip_threshold=-0.1), "skip_threshold"),
        (dict(routing="moe"), "routing"),
        (dict(n_layer=1), "n_layer"),
        (dict(router_bias_init=float("nan")), "router_bias_init"),
        (dict(mod_capacity=0.0), "mod_capacity"),
        (dict(mod_capacity=1.5), "mod_capacity"),
        (dict(routing="mod", mod_capacity=-0.1), "mod_capacity"),
        (dict(router_slope=1.0), r"router_slope must be in \[0, 1\), got 1.0"),  # a slope of 1 is linear
        (dict(router_slope=-0.1), "router_slope"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TSAConfig\.{field}"):
        TSAConfig(**{**TINY_NET, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        dict(skip_threshold=0.0),  # every routed block skipped
        dict(skip_threshold=1.0),  # none
        dict(dropout=0.0),
        dict(routing="mod", mod_capacity=1.0),  # every token runs every block
        dict(routing="none", n_layer=1),  # a dense model routes nothing, so one block will do
    ],
)
def test_every_bound_of_a_range_that_is_closed_is_accepted(overrides):
    config = TSAConfig(**{**TINY_NET, **overrides})
    assert all(getattr(config, name) == value for name, value in overrides.items())


@pytest.mark.parametrize("name, value", [("routing", "moe"), ("gate", "hard")])
def test_an_unknown_choice_is_told_every_choice(name, value):
    choices = {"routing": ("none", "tsa", "early_exit", "mod"), "gate": ("soft", "straight_through")}[name]
    with pytest.raises(ConfigError) as error:
        TSAConfig(**{**TINY_NET, name: value})
    assert all(repr(choice) in str(error.value) for choice in choices)


def test_bad_forward_inputs():
    model = make()
    with pytest.raises(ValueError, match="mode"):
        model(tokens(), mode="fast")
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(tokens(T=17))
    model.set_kv_cache(1, 16)
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(tokens(B=1, T=2), input_pos=15)  # positions 15 and 16
    model.clear_kv_cache()


def test_a_single_block_dense_model_trains_and_decodes():
    model = make(routing="none", n_layer=1)
    idx = tokens(B=2, T=6)
    _, loss, routing = model(idx, targets=idx)
    assert torch.isfinite(loss) and routing.executed.shape == (2, 6, 1)
    prompts = [idx[0], idx[1, :3]]
    cached = generate_cached(model, prompts, max_new_tokens=5, temperature=0)
    for prompt, out in zip(prompts, cached, strict=True):
        assert torch.equal(out, model.generate(prompt[None], 5, temperature=0)[0])


def test_the_depth_term_is_the_mean_keep_weight():
    """The paper's term mean(1 - p), over every token and router; the dense twin has none."""
    model = make()
    spread_routers(model)
    routing = model(tokens())[2]
    torch.testing.assert_close(model.depth_term(routing), (1 - routing.halt_probs).mean())
    assert make(routing="none").depth_term(make(routing="none")(tokens())[2]) is None


def test_tsa_gates_every_block_after_the_stem_and_the_dense_twin_none():
    assert make().gated_blocks() == [1, 2, 3]
    assert make(routing="none").gated_blocks() == []


def test_a_bfloat16_model_keeps_its_stream_in_bfloat16_and_p_in_float32():
    """p in bfloat16 would tie at a threshold: 8 bits of mantissa near 0.5 are steps of 1/256."""
    model = make().to(torch.bfloat16)
    spread_routers(model)
    idx = tokens()
    for mode in ("soft", "hard"):
        logits, _, routing = model(idx, mode=mode)
        assert logits.dtype == torch.bfloat16 and routing.halt_probs.dtype == torch.float32, mode
    h = torch.randn(3, 16, TINY_NET["n_embd"]).to(torch.bfloat16)
    router = model.routers[0]
    torch.testing.assert_close(router(h), torch.sigmoid(router.logit(h).float()), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_the_parameter_count_is_nanogpts_with_and_without_biases(bias):
    """config.bias adds a bias to every linear layer and LayerNorm of the trunk; the head is tied."""
    V, P, L, C, F = 11, 16, 4, 16, 64
    norm = 2 * C if bias else C
    linear_biases = (C + 2 * C + C + F + C) if bias else 0  # query, key/value, attention out, FFN in and out
    block = norm + (C * C + 2 * C * C + C * C) + norm + (C * F + F * C) + linear_biases
    dense = V * C + P * C + L * block + norm
    assert make(routing="none", bias=bias).num_params() == dense
    R = 16  # router width max(16, C // 4)
    assert make(bias=bias).num_params() == dense + (L - 1) * (C * R + R + R + 1)


def test_weights_start_as_gpt2s():
    """N(0, 0.02) for every matrix and embedding, N(0, 0.02 / sqrt(2 L)) for the two residual
    projections of each block, zero biases, unit LayerNorms; routers N(0, 0.02) with their output
    bias at router_bias_init."""
    torch.manual_seed(0)
    model = TSATransformer(
        TSAConfig(vocab_size=101, block_size=64, n_layer=8, n_head=4, n_embd=64, router_bias_init=-2.0)
    )
    residual = {id(m.weight) for b in model.blocks for m in (b.attn.proj, b.mlp.proj)}
    router = {id(p) for p in model.routers.parameters()}
    groups: dict[str, list[torch.Tensor]] = {"residual": [], "other": [], "router": []}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w = module.weight
            group = "router" if id(w) in router else "residual" if id(w) in residual else "other"
            groups[group].append(w.detach().flatten())
            if getattr(module, "bias", None) is not None and not name.endswith("out"):
                assert torch.count_nonzero(module.bias) == 0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    stds = {"residual": 0.02 / math.sqrt(2 * 8), "other": 0.02, "router": 0.02}
    for group, weights in groups.items():
        w = torch.cat(weights)
        assert w.std().item() == pytest.approx(stds[group], rel=0.04), group
        assert abs(w.mean().item()) < 4 * stds[group] / math.sqrt(w.numel()), group
    assert all(torch.all(r.out.bias == -2.0) for r in model.routers)


def rows_seen(model) -> dict[str, int]:
    """Counts, from now on, the rows (tokens) each block's query, key/value and output projections and
    FFN receive, by `<block>.attn.query`, `<block>.attn.key_value`, `<block>.attn.proj`, `<block>.mlp`."""
    rows: dict[str, int] = {}

    def counter(name):
        def hook(module, inputs, output):
            rows[name] = rows.get(name, 0) + inputs[0].numel() // inputs[0].size(-1)

        return hook

    for i, block in enumerate(model.blocks):
        for part in ("query", "key_value", "proj"):
            getattr(block.attn, part).register_forward_hook(counter(f"{i}.attn.{part}"))
        block.mlp.register_forward_hook(counter(f"{i}.mlp"))
    return rows


def test_hard_mode_does_no_work_for_skipped_tokens():
    """Count the rows each block's query, FFN and output projection see: exactly the kept tokens.

    (Gathering always: a full sequence with most tokens kept would run the block for all.)
    """
    model = make()
    for block in model.blocks:
        block.run_for_all_above = 1.0
    spread_routers(model)
    rows = rows_seen(model)
    idx = tokens()
    executed = model(idx, mode="hard")[2].executed
    for i in range(TINY_NET["n_layer"]):
        kept = int(executed[..., i].sum())
        for part in ("attn.query", "attn.proj", "mlp"):
            assert rows.get(f"{i}.{part}", 0) == kept, (i, part)
        if kept:  # keys and values of every position, for the tokens that attend to them
            assert rows[f"{i}.attn.key_value"] == idx.numel()
    rows.clear()
    model(idx, mode="hard", threshold=0.0)  # every token skips every routed block
    assert set(rows) == {"0.attn.query", "0.attn.proj", "0.mlp", "0.attn.key_value"}


def test_cached_decoding_does_no_work_for_skipped_tokens():
    """One position per step: a block's query, output projection and FFN see exactly the rows that run
    it (none when nobody does); keys and values are still made for every row."""
    model = make()
    spread_routers(model)
    rows = rows_seen(model)
    B, idx = 8, tokens(B=8, T=16, seed=3)
    model.set_kv_cache(B, 16)
    model(idx[:, :4], mode="hard", input_pos=0)
    shares = set()
    for t in range(4, 16):
        rows.clear()
        threshold = 0.0 if t % 4 == 0 else 0.5  # every fourth step every token skips every routed block
        executed = model(idx[:, t : t + 1], mode="hard", threshold=threshold, input_pos=t)[2].executed
        for i in range(TINY_NET["n_layer"]):
            kept = int(executed[:, 0, i].sum())
            shares.add(kept / B)
            parts = ("attn.query", "attn.proj", "mlp")
            assert [rows.get(f"{i}.{name}", 0) for name in parts] == [kept] * 3, (t, i)
            assert rows[f"{i}.attn.key_value"] == B
    model.clear_kv_cache()
    assert 0.0 in shares and any(0.5 < share < 1.0 for share in shares)  # none, and most but not all
