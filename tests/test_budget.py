"""Compute budgets and retrofitting: asking for an operating point, and starting from a dense model."""

import math
import re
from dataclasses import asdict

import lightning as L
import pytest
import torch

from tests.helpers import cli_error, fit_on, make, quiet_trainer, tokens, write_corpus
from tsa_lightning.budget import Budgets, HaltQuantile, probability
from tsa_lightning.data import TextDataModule
from tsa_lightning.model import Routing, TSAConfig
from tsa_lightning.module import TSALanguageModel

SHAPE = {"block_size": 32, "n_layer": 4, "n_head": 2, "n_embd": 32, "dropout": 0.0}
ROUTED = TSAConfig(routing="tsa", gate="straight_through", **SHAPE)


class Shares(L.Callback):
    """The executed share and the skip threshold the module logs at every step."""

    def __init__(self) -> None:
        self.executed, self.thresholds = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.executed.append(float(trainer.callback_metrics["train/executed_share"]))
        self.thresholds.append(float(trainer.callback_metrics["train/skip_threshold"]))


def train_with_budget(
    corpus, budget: float, steps: int = 240, validate: bool = False, gate: str = "straight_through"
) -> tuple[TSALanguageModel, Shares]:
    L.seed_everything(0, verbose=False)
    data = TextDataModule(str(corpus), block_size=32, batch_size=8)
    config = TSAConfig(vocab_size=data.vocab_size, routing="tsa", gate=gate, **SHAPE)
    module = TSALanguageModel(config, compute_budget=budget, learning_rate=3e-3, warmup_steps=10)
    shares = Shares()
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=1.0 if validate else 0,
        val_check_interval=steps if validate else None,
        num_sanity_val_steps=2,
        callbacks=[shares],
    )
    trainer.fit(module, data)
    return module, shares


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("budget") / "corpus.txt", n_chars=40_000, words=True)


def test_a_budget_drives_the_executed_share_to_it(corpus):
    # shares that no whole number of the 3 routed blocks gives: the routers must tell tokens apart
    results = {budget: train_with_budget(corpus, budget) for budget in (0.3, 0.8)}
    for budget, (module, shares) in results.items():
        assert shares.executed[0] == 1.0  # routers start open at p ~ 0.27 < 0.5
        late = sum(shares.executed[-60:]) / 60
        assert abs(late - budget) < 0.05, (budget, late)
        assert float(module.skip_threshold) == float(module.budget.running[0])  # no validation calibrated one
        assert module.hparams.config == asdict(module.config)  # the network's definition is not state
        assert module.config.skip_threshold == 0.5
        assert len(set(shares.thresholds)) > 10  # the threshold really moved, step by step
    low, high = (sum(results[b][1].executed[-60:]) / 60 for b in (0.3, 0.8))
    assert low < high


def attached(module: TSALanguageModel) -> TSALanguageModel:
    """A module with a trainer at step 0, as inside a loop."""
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    module.trainer = trainer
    return module


def test_the_threshold_follows_routers_that_collapse_towards_zero():
    """The task loss drives p towards 0; the threshold must follow it into the sigmoid's tail."""
    module = attached(TSALanguageModel(ROUTED, compute_budget=0.7))
    torch.manual_seed(0)
    for scale in [*torch.logspace(0, -6, 100), *[1e-6] * 40]:  # p shrinks 10^6-fold, then settles
        halts = torch.rand(8, 32, SHAPE["n_layer"] - 1) * scale
        module.follow_budget(Routing(halts, None, halt_logits=torch.logit(halts)), module.train_threshold(8))
    executed = (torch.logit(halts) <= module.skip_threshold).float().mean()
    assert 0 < probability(module.skip_threshold) < 1e-5
    assert abs(executed - 0.7) < 0.05


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_the_halt_quantile_resolves_p_in_the_tails(scale):
    torch.manual_seed(0)
    halts = torch.rand(4, 50, 3) * scale
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[:, -10:] = False  # padding: its p must not count
    halts[~valid] = scale
    halts[..., 0] /= 10  # one block's p lie apart: a sample must reach every block
    for per_batch in (10**6, 35):  # every value, or a sample
        metric = HaltQuantile(0.7, per_batch)
        for _ in range(20):
            metric.update(halts, valid)
        share = (halts[valid] <= metric.compute()).float().mean()
        assert abs(share - 0.7) < 0.03, per_batch


def test_a_short_last_batch_weighs_no_more_than_its_size():
    """4 batches of 100 p at 0, a last one of 10 p at 1: 2.4% of the split, so its 0.95 quantile is 0."""
    metric = HaltQuantile(0.95, per_batch=20)
    for _ in range(4):
        metric.update(torch.zeros(1, 100, 1), torch.ones(1, 100, dtype=torch.bool))
    metric.update(torch.ones(1, 10, 1), torch.ones(1, 10, dtype=torch.bool))
    assert metric.compute() == 0.0  # all 10 kept beside 80 sampled zeros would make it 1


@pytest.mark.parametrize("gate, tolerance", [("straight_through", 0.03), ("unit", 0.01)])
def test_validation_calibrates_the_threshold_that_held_out_text_skips_at(corpus, gate, tolerance):
    """Without dropout p sits elsewhere than in training: the last validation sets the threshold. Under
    the unit gate a skipped block moves later routers' logits most: the threshold must settle."""
    module, _ = train_with_budget(corpus, 0.6, steps=120, validate=True, gate=gate)
    calibrated = module.budget.table[0]
    assert module.skip_threshold == calibrated
    data = TextDataModule(str(corpus), block_size=32, batch_size=8)
    data.setup("validate")
    model = module.model.eval()
    with torch.no_grad():
        executed = [
            model(x, mode="hard", threshold=calibrated)[2].executed[..., 1:] for x, _ in data.val_dataloader()
        ]
    assert abs(float(torch.cat(executed).float().mean()) - 0.6) < tolerance


@pytest.mark.parametrize("router_slope", [0.0, 0.01])
def test_a_budget_lands_on_routers_whose_hidden_units_are_all_off(corpus, router_slope):
    """ReLU routers whose units are all off give every token the output bias as its logit: no threshold
    splits them and the budget is missed (as a fixed unit-gate budget's routers learned to do). A
    router slope gives each token its own logit (tokens whose contexts are alike still tie: 1-3% at
    the modal logit, by the seed), and the calibrated threshold lands."""
    torch.manual_seed(0)
    data = TextDataModule(str(corpus), block_size=32, batch_size=8)
    config = TSAConfig(
        vocab_size=data.vocab_size, routing="tsa", gate="unit", router_slope=router_slope, **SHAPE
    )
    module = TSALanguageModel(config, compute_budget=0.7)
    with torch.no_grad():
        for router in module.model.routers:
            router.hidden.bias.fill_(-1.0)  # far below what the small initial states add
    quiet_trainer().validate(module, data, verbose=False)
    data.setup("validate")
    with torch.no_grad():
        threshold = module.skip_threshold
        routings = [module.model(x, mode="hard", threshold=threshold)[2] for x, _ in data.val_dataloader()]
    share = float(torch.cat([r.executed[..., 1:] for r in routings]).float().mean())
    logits = torch.cat([r.halt_logits for r in routings])
    tied = float((logits == logits.flatten().mode().values).float().mean())
    if router_slope:
        assert abs(share - 0.7) < 0.01 and tied < 0.05
    else:
        assert tied > 0.9 and abs(share - 0.7) > 0.25


def calibrate_at(budget: Budgets, quantile: float) -> float:
    """A validation whose p all equal `quantile`."""
    logits = torch.logit(torch.full((1, 8, 1), quantile))
    budget.observe(logits, torch.ones(1, 8, dtype=torch.bool))
    return budget.calibrate()[0]


def test_a_validation_calibrates_afresh_and_training_moves_the_threshold_on():
    module = TSALanguageModel(ROUTED, compute_budget=0.7)
    assert probability(module.skip_threshold) == 0.5  # nothing calibrated yet: training's threshold
    assert calibrate_at(module.budget, 0.1) == pytest.approx(0.1)
    assert probability(module.skip_threshold) == pytest.approx(0.1)
    assert calibrate_at(module.budget, 0.9) == pytest.approx(0.9)  # the last validation's quantile
    module.budget.running.add_(1.5)  # training's threshold moved on by 1.5 in log-odds: evaluation's
    moved = torch.logit(torch.tensor(0.9, dtype=torch.float64)).item() + 1.5  # moves with it until validation
    assert float(module.skip_threshold) == pytest.approx(moved, rel=1e-5)
    assert calibrate_at(module.budget, 0.2) == pytest.approx(0.2)
    assert probability(module.skip_threshold) == pytest.approx(0.2)


def test_the_learned_threshold_travels_with_the_checkpoint(corpus, tmp_path):
    module, _ = train_with_budget(corpus, 0.5, steps=40)
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    path = tmp_path / "budget.ckpt"
    trainer.save_checkpoint(path)
    loaded = TSALanguageModel.load_from_checkpoint(path)
    assert float(loaded.skip_threshold) == float(module.budget.running[0]) != 0.0
    assert calibrate_at(module.budget, 0.123) == pytest.approx(0.123)  # what evaluation uses from now on
    trainer.save_checkpoint(path)
    assert probability(TSALanguageModel.load_from_checkpoint(path).skip_threshold) == pytest.approx(0.123)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compute_budget": 0.0}, "compute_budget must be in (0, 1]"),
        ({"compute_budget": 0.5, "depth_loss_weight": 0.05}, "not both"),
        ({"compute_budget": 0.5, "budget_momentum": 0.0}, "budget_momentum must be in (0, 1]"),
        ({"distill_weight": 1.0}, "distill_weight needs a teacher"),
        ({"learning_rate": -1e-3}, "--model.learning_rate must be > 0, got -0.001"),
        ({"min_learning_rate": 0.01}, "--model.min_learning_rate must be in [0, 0.001], got 0.01"),
        ({"warmup_steps": -5}, "--model.warmup_steps must be >= 0, got -5"),
        ({"weight_decay": -0.1}, "--model.weight_decay must be >= 0, got -0.1"),
        ({"betas": (0.9, 1.5)}, "--model.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
        ({"depth_loss_weight": -1.0}, "--model.depth_loss_weight must be >= 0, got -1.0"),
    ],
)
def test_budget_and_retrofit_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TSALanguageModel(ROUTED, **kwargs)


def test_a_budget_needs_the_straight_through_gate():
    with pytest.raises(ValueError, match="needs gate: unit or straight_through"):
        TSALanguageModel(TSAConfig(routing="tsa", gate="soft", **SHAPE), compute_budget=0.5)


def test_a_budget_needs_tsa_routers():
    message = (
        "compute_budget steers TSA routers; routing 'mod' sets its depth otherwise "  # the option asked for
        "(early exit: skip_threshold; Mixture-of-Depths: mod_capacity)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TSALanguageModel(TSAConfig(routing="mod", **SHAPE), compute_budget=0.5)


def test_a_fixed_budget_samples_more_of_each_batch_than_each_budget_of_an_elastic_one():
    """An elastic model keeps one sample per table budget (every 0.01), so each is smaller."""
    scores, valid = torch.randn(4, 5000, 1), torch.ones(4, 5000, dtype=torch.bool)
    for budget, kept in ((Budgets([0.5], 0.1, 0.5), 16384), (Budgets.elastic(0.5, 1.0, 0.1, 0.5), 4096)):
        budget.observe(scores, valid)
        assert len(budget.quantiles[0].values[0]) == kept


def dense_checkpoint(path, **shape) -> TSALanguageModel:
    torch.manual_seed(0)
    dense = TSALanguageModel(TSAConfig(vocab_size=11, routing="none", **{**SHAPE, **shape}))
    with torch.no_grad():
        for p in dense.parameters():  # weights unlike any fresh initialisation
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": dense.state_dict(), "hyper_parameters": dict(dense.hparams)}, path)
    return dense


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_retrofit_with_closed_routers_reproduces_the_dense_logits(tmp_path, mode):
    dense = dense_checkpoint(tmp_path / "dense.ckpt").eval()
    closed = TSAConfig(vocab_size=11, routing="tsa", router_bias_init=-30.0, **SHAPE)  # p ~ 1e-13
    retrofit = TSALanguageModel(closed, init_from=str(tmp_path / "dense.ckpt"))
    retrofit.setup("fit")
    retrofit.eval()
    idx = tokens(B=2, T=32)
    with torch.no_grad():
        expected = dense.model(idx)[0]
        logits, _, routing = retrofit.model(idx, mode=mode)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)  # float32 rounding, not bit for bit
    assert routing.executed.all()


def test_a_retrofit_distils_from_the_dense_model(tmp_path):
    dense_checkpoint(tmp_path / "dense.ckpt")
    data = TextDataModule(str(write_corpus(tmp_path / "c.txt", alphabet="abcdefghij ")), block_size=32)
    config = TSAConfig(vocab_size=data.vocab_size, routing="tsa", gate="straight_through", **SHAPE)
    module = TSALanguageModel(config, init_from=str(tmp_path / "dense.ckpt"), distill_weight=1.0)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/distill_kl"] >= 0
    assert not any(name.startswith("teacher") for name in module.state_dict())  # never saved with the model


def test_a_retrofit_from_another_shape_is_refused_in_one_line(tmp_path, small_corpus):
    dense_checkpoint(tmp_path / "dense.ckpt")  # width 32; the command line's model is 16 wide
    message = cli_error(
        *fit_on(
            small_corpus,
            tmp_path,
            "--model.config.routing=tsa",
            f"--model.init_from={tmp_path / 'dense.ckpt'}",
        )
    )
    assert "has another trunk" in message and "n_embd=32 (this model: 16)" in message


def test_an_elastic_retrofit_starts_as_the_dense_model_at_budget_one(tmp_path):
    """Unit gate: budget 1.0 runs every block at full strength, so the fine-tune starts from the
    dense model's very logits, however open the new routers are; its own full depth teaches."""
    dense = dense_checkpoint(tmp_path / "dense.ckpt").eval()
    config = TSAConfig(vocab_size=11, routing="tsa", gate="unit", **SHAPE)
    retrofit = TSALanguageModel(
        config, init_from=str(tmp_path / "dense.ckpt"), elastic_budgets=[0.4, 1.0], distill_weight=1.0
    )
    retrofit.setup("fit")
    assert retrofit.teacher is None  # in-place distillation: no second model
    idx = tokens(B=2, T=32)
    with torch.no_grad():
        expected = dense.model(idx)[0]
        logits, _, routing = retrofit.eval().model(idx, mode="hard", threshold=retrofit.threshold_at(1.0))
        skipping = retrofit.model(idx, mode="hard", threshold=0.1)[0]
    assert torch.equal(logits, expected) and routing.executed.all()
    assert not torch.equal(skipping, expected)  # the routers do decide below budget 1.0


def test_a_batch_is_settled_only_when_each_budget_runs_its_share_within_the_tolerance():
    budgets = Budgets.elastic(0.5, 1.0, 0.1, 0.5)
    halts = torch.arange(1000.0).view(1, 1000, 1).repeat(2, 1, 1)  # logits 0..999 in each of two rows
    valid = torch.ones(2, 1000, dtype=torch.bool)
    half, full = budgets.table_budgets.index(0.5), budgets.table_budgets.index(1.0)
    points = torch.tensor([half, full])
    model = make()

    def ran(thresholds: list[float]) -> torch.Tensor:  # hard mode's decisions at one threshold per row
        return ~model.skips(halts, torch.tensor(thresholds))

    assert budgets.settled(ran([499.0, math.inf]), valid, points)  # 500 of 1000 run
    assert budgets.settled(ran([500.0, math.inf]), valid, points)  # 0.501: within 0.002
    assert not budgets.settled(ran([503.0, math.inf]), valid, points)  # 0.504
    assert not budgets.settled(ran([499.0, 989.0]), valid, points)  # full depth skips 10
    valid[0, 600:] = False  # padding counts nothing: 500 of 600 run
    assert not budgets.settled(ran([499.0, math.inf]), valid, points)
