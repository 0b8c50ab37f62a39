import math

import pytest
import torch

from tests.helpers import TINY_NET, tokens
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel


def test_compiled_training_forward_matches_eager():
    torch.manual_seed(0)
    module = TSALanguageModel(TSAConfig(**TINY_NET, gate="straight_through"), compile=True)
    idx = tokens()
    compiled = module.train_forward(idx, idx)
    eager = module.model(idx, idx)
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2].halt_probs, eager[2].halt_probs)
    assert set(module.state_dict()) == set(
        TSALanguageModel(TSAConfig(**TINY_NET)).state_dict()
    )  # one copy of the weights


def test_learning_rate_warms_up_then_decays_to_the_floor():
    module = TSALanguageModel(
        TSAConfig(**TINY_NET), learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10
    )
    module.trainer = type("T", (), {"max_steps": 110})()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(120):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_alphabet_must_match_vocab_size():
    with pytest.raises(ValueError, match="alphabet has 3 characters but vocab_size is 11"):
        TSALanguageModel(TSAConfig(**TINY_NET), alphabet="abc")


def test_predict_step_gives_tokens_and_blocks_run():
    torch.manual_seed(0)
    module = TSALanguageModel(TSAConfig(**TINY_NET)).eval()
    idx = tokens(B=2, T=16)
    out = module.predict_step((idx, idx), 0)
    assert out["next_token"].shape == (2, 16) and int(out["next_token"].max()) < TINY_NET["vocab_size"]
    assert out["blocks_run"].shape == (2, 16)
    assert int(out["blocks_run"].min()) >= 1 and int(out["blocks_run"].max()) <= TINY_NET["n_layer"]
    routing = module.model(idx, mode="hard")[2]
    assert torch.equal(out["blocks_run"], routing.executed.sum(-1))


def test_the_model_summary_counts_a_windows_flops():
    """Lightning's summary printed `0 Total Flops` without an example input to count them on."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    module = TSALanguageModel(TSAConfig(**TINY_NET))
    assert ModelSummary(module).total_flops > 0
