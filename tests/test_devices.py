"""The model, its decoding cache and the accounting make every tensor on their inputs' device.

A GPU run depends on it: a mask, a position or a count made on torch's default device (the CPU)
meets CUDA tensors and fails. These tests find that mistake on any machine: the inputs stay on the
CPU while torch's default device is "meta" (tensors without data), so a tensor made without its
inputs' device is a meta one, and mixing it with the CPU ones raises at once.
"""

import torch

from tests.helpers import make, spread_routers, tokens
from tsa_lightning import Routing
from tsa_lightning.accounting import dense_twin_flops, forward_flops, tally
from tsa_lightning.budget import Budgets, HaltQuantile

ELSEWHERE = torch.device("meta")  # as a context: torch's default device inside the block


def spread_model(**overrides):
    model = make(**overrides)
    if model.routers is not None:
        spread_routers(model)
    return model


def test_the_forward_of_every_mode_runs_where_its_inputs_are():
    model, idx = spread_model(), tokens()
    with torch.no_grad():
        expected = {t: model(idx, mode="hard", threshold=t) for t in (0.0, 0.5, 1.0)}
        soft = model(idx, mode="soft")[0]
        with ELSEWHERE:
            got = {t: model(idx, mode="hard", threshold=t) for t in expected}  # none, some, all skip
            got_soft = model(idx, mode="soft")[0]
    assert got_soft.device.type == "cpu"
    torch.testing.assert_close(got_soft, soft)
    for t, (logits, _, routing) in got.items():
        torch.testing.assert_close(logits, expected[t][0])
        assert torch.equal(routing.executed, expected[t][2].executed)


def decode(model, idx, start=None):
    """Prefill the first half of idx, then one position at a time; the logits of every step."""
    B, T = idx.shape
    model.set_kv_cache(B, T, start=start)
    try:
        steps = [model(idx[:, : T // 2], mode="hard", input_pos=0)[0]]
        for t in range(T // 2, T):
            steps.append(model(idx[:, t : t + 1], mode="hard", input_pos=t)[0])
    finally:
        model.clear_kv_cache()
    return steps


def test_cached_decoding_runs_where_its_inputs_are():
    model, idx = spread_model(), tokens(B=2, T=12)
    start = torch.tensor([0, 3])  # the second row left-padded by three
    with torch.no_grad():
        expected = decode(model, idx), decode(model, idx, start)
        with ELSEWHERE:
            got = decode(model, idx), decode(model, idx, start)
    for steps, expected_steps in zip(got, expected, strict=True):
        for step, expected_step in zip(steps, expected_steps, strict=True):
            torch.testing.assert_close(step, expected_step)


def test_the_dense_twin_decodes_where_its_inputs_are():
    model, idx = make(routing="none"), tokens(B=2, T=12)
    with torch.no_grad():
        expected = decode(model, idx)
        with ELSEWHERE:
            got = decode(model, idx)
    for step, expected_step in zip(got, expected, strict=True):
        torch.testing.assert_close(step, expected_step)


def test_hard_decisions_from_p_alone_are_made_where_p_is():
    model = spread_model()
    with torch.no_grad():
        routing = model(tokens(), mode="soft")[2]
    expected = model.hard_executed(routing.halt_probs, 0.5)
    with ELSEWHERE:
        assert torch.equal(model.hard_executed(routing.halt_probs, 0.5), expected)


def test_the_accounting_counts_where_the_routing_is():
    model = spread_model()
    with torch.no_grad():
        routing = model(tokens(B=2, T=12), mode="hard")[2]
    valid = torch.arange(12).expand(2, 12) < torch.tensor([[12], [7]])
    config = model.config

    def counts():
        flops = forward_flops(config, routing.executed, valid), dense_twin_flops(config, 2, 12, valid)
        per_layer = [tally(config, routing, v)["executed_per_layer"] for v in (None, valid)]
        dense = tally(config, Routing(halt_probs=None, executed=routing.executed))["executed_per_layer"]
        return flops, [*per_layer, dense]

    expected_flops, expected_per_layer = counts()
    with ELSEWHERE:
        flops, per_layer = counts()
    assert flops == expected_flops
    for got, expected in zip(per_layer, expected_per_layer, strict=True):
        assert got.device.type == "cpu" and torch.equal(got, expected)


def test_a_calibration_refines_each_rows_threshold_where_its_logits_are():
    budget = Budgets.elastic(0.3, 1.0, momentum=0.1, initial=0.5)
    logits, valid = torch.randn(4, 8, 3), torch.ones(4, 8, dtype=torch.bool)
    points = torch.tensor([20, 20, 50, 70])  # the table's 0.5, 0.5, 0.8 and 1.0
    expected = budget.batch_thresholds(logits, valid, points)
    with ELSEWHERE:
        got = budget.batch_thresholds(logits, valid, points)
    assert got.device.type == "cpu" and torch.equal(got, expected)


def test_a_quantile_samples_each_batch_where_its_logits_are():
    torch.manual_seed(0)
    logits, valid = torch.randn(4, 8, 3), torch.ones(4, 8, dtype=torch.bool)
    expected, got = HaltQuantile(0.3, per_batch=20), HaltQuantile(0.3, per_batch=20)  # 20 of 96 values
    expected.update(logits, valid)
    with ELSEWHERE:
        got.update(logits, valid)
    assert got.values[0].device.type == "cpu" and torch.equal(got.values[0], expected.values[0])
    assert len(got.values[0]) == 20
