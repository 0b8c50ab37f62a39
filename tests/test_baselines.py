import pytest
import torch
from torch.nn import functional as F

from tests.helpers import TINY_NET, make, quiet_trainer, spread_predictors, tokens
from tsa_lightning import TSAConfig
from tsa_lightning.accounting import forward_flops
from tsa_lightning.baselines import EarlyExitTransformer, MixtureOfDepthsTransformer
from tsa_lightning.data import TextDataModule
from tsa_lightning.module import TSALanguageModel


def test_build_model_picks_the_class():
    assert isinstance(make("early_exit"), EarlyExitTransformer)
    assert isinstance(make("mod"), MixtureOfDepthsTransformer)


@pytest.mark.parametrize("routing", ["early_exit", "mod"])
def test_baselines_share_the_dense_trunk(routing):
    dense, other = make("none", seed=3), make(routing, seed=3)
    state = other.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("routing", ["early_exit", "mod"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_shapes(routing, mode):
    idx = tokens(B=3, T=12)
    logits, loss, info = make(routing)(idx, idx, mode=mode)
    assert logits.shape == (3, 12, TINY_NET["vocab_size"]) and torch.isfinite(loss)
    assert info.executed.shape == (3, 12, TINY_NET["n_layer"])


def median_threshold(model, idx) -> float:
    """A threshold that splits this batch's decisions about in half, so hard mode skips a mix."""
    return model(idx, mode="hard", threshold=1.01)[2].halt_probs.median().item()


@pytest.mark.parametrize("routing", ["early_exit", "mod"])
def test_hard_mode_is_causal(routing):
    model = make(routing, mod_every=1)
    if routing == "mod":
        spread_predictors(model)
    idx = tokens(B=2)
    threshold = median_threshold(model, idx)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY_NET["vocab_size"]
    a, _, ra = model(idx, mode="hard", threshold=threshold)
    b, _, rb = model(changed, mode="hard", threshold=threshold)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert torch.equal(ra.executed[:, :10], rb.executed[:, :10])
    skipped = (~ra.executed[..., 1:]).float().mean()
    assert 0 < skipped < 1  # the test exercised real skipping


def test_early_exit_hard_mode_runs_what_its_logged_confidences_decide():
    """The accounting reads hard mode's decisions back from the confidences it logged: one rule,
    also at a threshold equal to a token's confidence at the first exit (a tie)."""
    model = make("early_exit")
    idx = tokens(B=2)
    first_exit = model(idx, mode="hard", threshold=1.01)[2].halt_probs[..., 0].flatten()
    for threshold in first_exit.tolist():
        _, _, routing = model(idx, mode="hard", threshold=threshold)
        assert torch.equal(model.hard_executed(routing.halt_logits, threshold), routing.executed)
        assert not routing.executed[..., 1:].all()  # the tied token, at least, leaves


def test_early_exit_threshold_zero_leaves_after_the_first_block():
    model = make("early_exit")
    idx = tokens()
    logits, _, info = model(idx, mode="hard", threshold=0.0)
    assert info.executed[..., 0].all() and not info.executed[..., 1:].any()
    x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    torch.testing.assert_close(logits, model.lm_head(model.ln_f(model.blocks[0](x))))


def test_early_exit_threshold_above_one_never_exits():
    model = make("early_exit")
    idx = tokens()
    hard, _, info = model(idx, mode="hard", threshold=1.01)
    assert info.executed.all()
    torch.testing.assert_close(hard, model(idx)[0])


def test_early_exit_trains_on_the_mean_loss_over_exits():
    model = make("early_exit")
    idx, targets = tokens(), tokens(seed=9)
    _, loss, info = model(idx, targets)
    x = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
    exits = []
    for block in model.blocks:
        x = block(x)
        exits.append(F.cross_entropy(model.lm_head(model.ln_f(x)).flatten(0, 1), targets.flatten()))
    torch.testing.assert_close(loss + info.aux_loss, torch.stack(exits).mean())


@pytest.mark.parametrize("capacity, every, T", [(0.125, 2, 16), (0.5, 1, 16), (0.3, 1, 7), (0.25, 3, 8)])
def test_mod_capacity_is_honoured_exactly(capacity, every, T):
    model = make("mod", mod_capacity=capacity, mod_every=every)
    executed = model(tokens(B=4, T=T))[2].executed
    k = max(1, round(capacity * T))
    for block in range(TINY_NET["n_layer"]):
        per_sequence = executed[..., block].sum(dim=1)
        routed = block >= 1 and block % every == 0
        assert (per_sequence == (k if routed else T)).all(), block


@pytest.mark.parametrize("every, blocks", [(1, [1, 2, 3, 4, 5, 6]), (2, [2, 4, 6]), (3, [3, 6]), (4, [4])])
def test_mod_gates_every_mod_every_th_block(every, blocks):
    assert make("mod", n_layer=7, mod_every=every).gated_blocks() == blocks
    assert make("early_exit", n_layer=7).gated_blocks() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_mod_reports_its_predictors_skip_probabilities_in_both_modes(mode):
    """What training logs as the share hard mode would run: the predictor's p, one column per routed block."""
    model = make("mod", mod_every=2)
    spread_predictors(model)
    idx = tokens(B=2)
    with torch.no_grad():
        halts = model(idx, idx, mode=mode)[2].halt_probs
        x = model.blocks[0](model.wte(idx) + model.wpe(torch.arange(idx.size(1))))
        x = model.blocks[1](x)  # block 1 is not routed
        expected = model.predictors["1"](x)
    assert halts.shape == (2, idx.size(1), 1)
    torch.testing.assert_close(halts[..., 0], expected)


def test_mod_predictor_routes_the_same_in_full_sequence_and_incremental_use():
    model = make("mod", mod_every=1, mod_capacity=0.5)
    spread_predictors(model)
    idx = tokens(B=2)
    threshold = median_threshold(model, idx)
    full = model(idx, mode="hard", threshold=threshold)[2].executed
    assert 0 < (~full[..., 1:]).float().mean() < 1
    for t in range(1, idx.size(1) + 1):
        prefix = model(idx[:, :t], mode="hard", threshold=threshold)[2].executed
        assert torch.equal(prefix[:, -1], full[:, t - 1]), t


def test_mod_predictor_learns_from_bce_and_does_not_steer_the_trunk():
    model = make("mod", mod_every=1).train()
    idx = tokens()
    info = model(idx, idx)[2]
    info.aux_loss.backward()  # the predictor loss alone
    assert all(p.grad is not None for p in model.predictors.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.blocks.parameters())


def test_routing_flops_and_overhead():
    ee, mod = make("early_exit"), make("mod", mod_every=1)
    C, V, L = TINY_NET["n_embd"], TINY_NET["vocab_size"], TINY_NET["n_layer"]
    assert ee.routing_flops_per_token(ee.config) == (L - 1) * 2 * C * V
    assert ee.router_overhead() == 0.0 and mod.router_overhead() > 0.0
    executed = torch.ones(1, 4, L, dtype=torch.bool)
    dense = forward_flops(TSAConfig(**{**TINY_NET, "routing": "none"}), executed)
    assert forward_flops(ee.config, executed) - dense == 4 * (L - 1) * 2 * C * V


def test_mod_reports_only_its_causal_hard_mode(small_corpus):
    """MoD's soft forward picks top-k over the whole window (it sees the future), so it is never scored."""
    model = make("mod", mod_every=1)
    idx = tokens(B=2)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY_NET["vocab_size"]
    soft_past_moves = not torch.allclose(model(idx)[0][:, :10], model(changed)[0][:, :10])
    assert soft_past_moves  # why it must not be reported
    data = TextDataModule(str(small_corpus), block_size=16, batch_size=4)
    module = TSALanguageModel(
        config=TSAConfig(
            vocab_size=data.vocab_size, block_size=16, n_layer=3, n_head=2, n_embd=16, routing="mod"
        )
    )
    trainer = quiet_trainer(limit_val_batches=2)
    trainer.validate(module, data, verbose=False)
    reported = set(trainer.callback_metrics)
    assert "val/hard/bpc" in reported and not [k for k in reported if k.startswith("val/soft/")]
