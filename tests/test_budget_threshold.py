"""The compute budget's parts without training: its argument checks, the quantile of p over a split
(read from a bounded, seeded sample) and the threshold's steps in log-odds."""

import re

import pytest
import torch

from tsa_lightning import TSAConfig
from tsa_lightning.baselines import build_model
from tsa_lightning.budget import Budgets, HaltQuantile, check_budget, order_statistic
from tsa_lightning.errors import ConfigError
from tsa_lightning.metrics import pooled

SHAPE = dict(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=16)


def budgeted(**overrides):
    return build_model(TSAConfig(**{**SHAPE, "gate": "straight_through", **overrides}))


def p_of(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of n p (one row, one router) and its valid mask."""
    halts = torch.rand(1, n, 1, generator=torch.Generator().manual_seed(seed))
    return halts, torch.ones(1, n, dtype=torch.bool)


def sampled(metric: HaltQuantile) -> list[torch.Tensor]:
    return [v.clone() for v in metric.values]


# ---------------------------------------------------------------- check_budget


@pytest.mark.parametrize("budget", [1e-3, 0.5, 1.0])
@pytest.mark.parametrize("momentum", [1e-3, 0.5, 1.0])
def test_a_budget_and_a_momentum_anywhere_in_their_ranges_are_accepted(budget, momentum):
    check_budget(budgeted(), budget, momentum, 0.0)


@pytest.mark.parametrize(
    "budget, momentum, message",
    [
        (0.0, 0.1, "compute_budget must be in (0, 1]"),
        (1.5, 0.1, "compute_budget must be in (0, 1]"),
        (-0.5, 0.1, "compute_budget must be in (0, 1]"),
        (0.5, 0.0, "budget_momentum must be in (0, 1]"),
        (0.5, 1.5, "budget_momentum must be in (0, 1]"),
    ],
)
def test_a_budget_or_momentum_outside_its_range_is_refused(budget, momentum, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_budget(budgeted(), budget, momentum, 0.0)


@pytest.mark.parametrize("routing", ["mod", "early_exit", "none"])
def test_a_variant_without_tsa_routers_is_told_which_option_sets_its_depth(routing):
    with pytest.raises(ConfigError) as error:
        check_budget(budgeted(routing=routing), 0.5, 0.1, 0.0)
    message = str(error.value)
    assert repr(routing) in message
    for option in ("skip_threshold", "mod_capacity"):  # the options' own names, as the CLI spells them
        assert re.search(rf"\b{option}\b", message), option


def test_a_soft_gate_is_told_the_option_that_fixes_it():
    with pytest.raises(ConfigError) as error:
        check_budget(budgeted(gate="soft"), 0.5, 0.1, 0.0)
    assert re.search(r"(^|\s)--model\.config\.gate=unit($|[\s.;,)])", str(error.value))


# ---------------------------------------------------------------- HaltQuantile


def test_a_batch_gives_at_most_per_batch_values_and_every_batch_the_same_share():
    metric = HaltQuantile(0.5, per_batch=50)
    for n, expected in ((100, 50), (40, 20), (10, 5), (100, 50)):
        metric.update(*p_of(n))
        assert metric.values[-1].numel() == expected


def test_by_default_a_validation_batch_keeps_16384_values():
    """Validation's memory is bounded whatever the batch: 16384 float32 p per batch and rank."""
    metric = HaltQuantile(0.5)
    metric.update(torch.rand(4, 1000, 5), torch.ones(4, 1000, dtype=torch.bool))
    assert metric.values[-1].numel() == 16384
    small = HaltQuantile(0.5)
    small.update(torch.rand(2, 10, 5), torch.ones(2, 10, dtype=torch.bool))
    assert small.values[-1].numel() == 100  # all of a batch below the bound


def test_a_single_value_fits_a_bound_of_one():
    metric = HaltQuantile(0.5, per_batch=1)
    metric.update(torch.tensor([[[0.3]]]), torch.ones(1, 1, dtype=torch.bool))
    assert metric.compute().item() == pytest.approx(0.3)


def test_padding_is_never_sampled():
    metric = HaltQuantile(1.0, per_batch=4)
    halts = torch.cat([torch.full((1, 8, 2), 0.1), torch.full((1, 8, 2), 0.9)], dim=1)
    metric.update(halts, torch.arange(16)[None] < 8)
    assert metric.values[-1].tolist() == [pytest.approx(0.1)] * 4


def test_a_fresh_and_a_reset_metric_sample_alike():
    """What makes a resumed run (a fresh metric) calibrate as the uninterrupted one (a reset one)."""
    batches = [p_of(100, seed) for seed in range(3)]
    fresh, reused = HaltQuantile(0.5, per_batch=30), HaltQuantile(0.5, per_batch=30)
    for batch in batches[::-1]:
        reused.update(*p_of(len(batch[0][0]) + 7, seed=9))
    reused.reset()
    for batch in batches:
        fresh.update(*batch)
        reused.update(*batch)
    for a, b in zip(sampled(fresh), sampled(reused), strict=True):
        assert torch.equal(a, b)


def test_sampling_leaves_the_global_random_stream_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    metric = HaltQuantile(0.5, per_batch=10)
    for seed in range(3):
        metric.update(*p_of(100, seed))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)  # another global seed picks the same sample
    again = HaltQuantile(0.5, per_batch=10)
    for seed in range(3):
        again.update(*p_of(100, seed))
    for a, b in zip(sampled(metric), sampled(again), strict=True):
        assert torch.equal(a, b)


def test_successive_batches_sample_different_positions():
    """Equal batches sampled alike would read the same (position, router) cells every time."""
    metric = HaltQuantile(0.5, per_batch=20)
    positions = torch.arange(200).float()[None, :, None] / 200
    for _ in range(4):
        metric.update(positions, torch.ones(1, 200, dtype=torch.bool))
    chosen = [frozenset(v.tolist()) for v in metric.values]
    assert len(set(chosen)) == 4


# ---------------------------------------------------------------- order statistic and steps


def test_the_quantile_is_one_of_the_values_and_a_tiny_share_is_the_smallest():
    values = torch.tensor([0.3, 0.1, 0.4, 0.2])
    assert order_statistic(values, 0.5).item() == pytest.approx(0.2)
    assert order_statistic(values, 1.0).item() == pytest.approx(0.4)
    assert order_statistic(values, 0.1).item() == pytest.approx(0.1)  # below one value's share
    assert order_statistic(torch.tensor([0.7]), 0.3).item() == pytest.approx(0.7)


@pytest.mark.parametrize("initial", [0.0, 1.0])
def test_a_threshold_starting_at_a_bound_steps_towards_the_quantile(initial):
    """skip_threshold may be 0 or 1, and the budget's running threshold (log-odds) starts there."""
    budget = Budgets([0.5], momentum=0.1, initial=initial)
    logits = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(0))
    target = order_statistic(logits, 0.5).item()
    budget.follow(logits, step=0)
    running = budget.running.item()
    assert -30 < running < 30 and min(-30, target) < running < max(30, target)
    assert abs(running - target) < abs(torch.logit(torch.tensor(initial).double()).clamp(-30, 30) - target)
    for _ in range(300):
        budget.follow(logits, step=0)
    assert budget.running.item() == pytest.approx(target, rel=1e-3)


def test_each_rank_adds_its_whole_sample_once_to_the_pooled_quantile():
    """Ranks feed a quantile unequally often (the rows of a point fall on either): each gathers its
    batches as one tensor, so the ranks' gathers match and no rank's sample counts twice."""
    metric = HaltQuantile(0.4, per_batch=100)
    for _ in range(2):  # this rank: two batches of 4 zeros
        metric.update(torch.zeros(1, 4, 1), torch.ones(1, 4, dtype=torch.bool))
    gathers = []

    def gather(values, group=None) -> list[torch.Tensor]:  # the other rank sampled 12 ones
        gathers.append(values.numel())
        return [values, torch.ones(12)]

    metric.dist_sync_fn, metric.distributed_available_fn = gather, lambda: True
    assert float(pooled(metric)) == 0.0  # the 8th of 8 zeros and 12 ones
    assert gathers == [8] and len(metric.values) == 2  # one gather; this rank's own batches kept after
