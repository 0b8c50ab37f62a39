"""The compute report: the paper's alpha and TLOps next to executed work and FLOPs, counted by hand."""

import pytest
import torch

from tests.helpers import make, spread_routers, tokens
from tsa_lightning import Routing, TSAConfig
from tsa_lightning.accounting import dense_twin_flops, forward_flops, report, summarize, tally
from tsa_lightning.baselines import MixtureOfDepthsTransformer


def concat(a: Routing, b: Routing) -> Routing:
    halts = None if a.halt_probs is None else torch.cat([a.halt_probs, b.halt_probs])
    return Routing(halt_probs=halts, executed=torch.cat([a.executed, b.executed]))


@pytest.mark.parametrize("routing", ["tsa", "none"])
def test_tallies_of_two_batches_add_up_to_the_tally_of_both(routing):
    """What lets batches and ranks be summed before dividing: every entry is a plain sum."""
    model = make(routing=routing)
    if routing == "tsa":
        spread_routers(model)
    with torch.no_grad():
        a, b = (model(tokens(B=2, T=12, seed=seed), mode="hard")[2] for seed in (1, 2))
    valid_a = torch.arange(12).expand(2, 12) < torch.tensor([[12], [7]])  # a padded row
    valid_b = torch.ones(2, 12, dtype=torch.bool)
    both = tally(model.config, concat(a, b), torch.cat([valid_a, valid_b]))
    parts = [tally(model.config, r, v) for r, v in ((a, valid_a), (b, valid_b))]
    for key, value in both.items():
        torch.testing.assert_close(parts[0][key] + parts[1][key], value, rtol=1e-12, atol=0, msg=key)


def test_the_dense_twin_reports_no_savings_of_any_kind():
    model = make(routing="none")
    with torch.no_grad():
        rep = report(model.config, model(tokens(), mode="hard")[2])
    assert rep.paper_alpha == 1.0 and rep.paper_tlops_saved == 0.0
    assert rep.executed_fraction == 1.0 and rep.executed_tlops_saved == 0.0
    assert rep.flops == rep.dense_flops and rep.flops_saved == 0.0


def test_alpha_is_the_mean_keep_weight_even_of_a_single_decision():
    """A two-block model on one token: one router, one p."""
    model = make(n_layer=2)
    with torch.no_grad():
        routing = model(tokens(B=1, T=1), mode="hard")[2]
    (p,) = routing.halt_probs.flatten().tolist()
    rep = report(model.config, routing)
    assert rep.paper_alpha == pytest.approx(1 - p, rel=1e-6)
    assert rep.paper_tlops_saved == pytest.approx(1 - (1 + (1 - p)) / 2, rel=1e-6)


def test_executed_shares_and_savings_by_hand():
    """L=4, T=4: the stem runs 4 tokens, blocks 1..3 run 3, 2 and 1: 10 of 16 (token, block) pairs."""
    config = TSAConfig(vocab_size=3, block_size=4, n_layer=4, n_head=1, n_embd=4, ffn_hidden=8)
    executed = torch.ones(1, 4, 4, dtype=torch.bool)
    executed[0, 3:, 1] = executed[0, 2:, 2] = executed[0, 1:, 3] = False
    routing = Routing(halt_probs=torch.full((1, 4, 3), 0.25), executed=executed)
    rep = report(config, routing)
    assert rep.executed_per_layer == [1.0, 0.75, 0.5, 0.25]
    assert rep.executed_fraction == 10 / 16 and rep.executed_tlops_saved == 6 / 16
    assert rep.paper_alpha == 0.75 and rep.paper_tlops_saved == pytest.approx(1 - (1 + 3 * 0.75) / 4)
    assert rep.flops == forward_flops(config, executed) and rep.dense_flops == dense_twin_flops(config, 1, 4)
    assert rep.flops_saved == pytest.approx(1 - rep.flops / rep.dense_flops, rel=1e-12)


def test_flops_saved_by_hand():
    """test_model's hand count: C=4, F=8, V=3, L=2, router width 16, T=2; token 1 skips block 1."""
    config = TSAConfig(vocab_size=3, block_size=2, n_layer=2, n_head=1, n_embd=4, ffn_hidden=8)
    executed = torch.tensor([[[True, True], [True, False]]])
    kv, head = 2 * 2 * (2 * (2 * 4 * 4)), 2 * (2 * 4 * 3)
    run = 2 * 4 * 4 + 2 * 4 * 4 + 2 * 2 * 4 * 8  # query, output projection and FFN of one (token, block)
    flops = kv + 3 * run + (1 + 2 + 1) * (2 * 2 * 4) + 2 * (2 * 4 * 16 + 2 * 16) + head
    dense = kv + 4 * run + 2 * (1 + 2) * (2 * 2 * 4) + head
    rep = report(config, Routing(halt_probs=torch.tensor([[[0.2], [0.9]]]), executed=executed))
    assert (rep.flops, rep.dense_flops) == (flops, dense)
    assert rep.flops_saved == pytest.approx(1 - flops / dense, rel=1e-12)


def test_flops_are_exact_counts_at_a_real_size():
    """Three windows of 127 tokens, a random half of the routed pairs skipped, at widths whose counts
    float32 cannot hold (odd: no multiples of large powers of two): no rounding anywhere."""
    config = TSAConfig(n_embd=195, n_head=3)
    executed = torch.rand(3, 127, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    executed[..., 0] = True
    flops, dense = forward_flops(config, executed), dense_twin_flops(config, 3, 127)
    assert float(torch.tensor(flops, dtype=torch.float32)) != flops  # a count float32 cannot hold
    assert float(torch.tensor(dense, dtype=torch.float32)) != dense
    sums = tally(config, Routing(halt_probs=torch.rand(3, 127, 5), executed=executed))
    rep = summarize(config, sums)
    assert (rep.flops, rep.dense_flops) == (flops, dense)


def test_mixture_of_depths_routing_costs_a_scorer_and_a_predictor_per_routed_block():
    """n_layer=7, mod_every=3: blocks 3 and 6 are routed; scorer 2C, predictor 2R(C+1) per token."""
    shape = dict(vocab_size=3, block_size=4, n_layer=7, n_head=1, n_embd=4, ffn_hidden=8, mod_every=3)
    mod, dense = TSAConfig(routing="mod", **shape), TSAConfig(routing="none", **shape)
    per_token = 2 * (2 * 4 + 2 * 16 * (4 + 1))
    assert MixtureOfDepthsTransformer.routing_flops_per_token(mod) == per_token
    executed = torch.ones(2, 4, 7, dtype=torch.bool)
    assert forward_flops(mod, executed) - forward_flops(dense, executed) == 8 * per_token
