"""Elastic depth: one network trained for every budget in a range, and served at any of them."""

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars_metadata
from torch.nn import functional as F

from tests.helpers import (
    RanksHoldOneBudget,
    cli_error,
    fit,
    fit_args,
    quiet_trainer,
    thresholds,
    write_corpus,
)
from tsa_lightning.budget import Budgets, budget_grid, probability
from tsa_lightning.callbacks import operating_point
from tsa_lightning.cli import main
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import ConfigError
from tsa_lightning.evaluation import evaluate
from tsa_lightning.inference import sample
from tsa_lightning.model import TSAConfig, TSATransformer
from tsa_lightning.module import TSALanguageModel

SHAPE = {"block_size": 32, "n_layer": 4, "n_head": 2, "n_embd": 32, "dropout": 0.0}
RANGE = [0.3, 1.0]


def elastic_data(corpus) -> TextDataModule:
    return TextDataModule(str(corpus), block_size=32, batch_size=16)


def train_elastic(
    corpus, steps: int, val_every: int, ckpt_path=None, callbacks=(), **options
) -> tuple[TSALanguageModel, L.Trainer]:
    """The shipped recipe: unit gate, half the rows at full depth, the rest distilled from it."""
    L.seed_everything(0, verbose=False)
    data = elastic_data(corpus)
    config = TSAConfig(vocab_size=data.vocab_size, routing="tsa", gate="unit", **SHAPE)
    recipe = {"elastic_budgets": RANGE, "elastic_top_share": 0.5, "distill_weight": 1.0, **options}
    module = TSALanguageModel(config, learning_rate=3e-3, warmup_steps=10, alphabet=data.alphabet, **recipe)
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=4,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        callbacks=list(callbacks),
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("elastic") / "corpus.txt", n_chars=40_000, words=True)


def calibrated(module: TSALanguageModel, corpus, times: int = 1) -> None:
    """`validate` on the whole validation split, `times` over: every budget on every row."""
    trainer = quiet_trainer()
    for _ in range(times):
        trainer.validate(module, elastic_data(corpus), verbose=False)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """An elastic model trained briefly, its table calibrated on the whole validation split."""
    module, trainer = train_elastic(corpus, steps=300, val_every=300)
    calibrated(module, corpus)
    path = tmp_path_factory.mktemp("elastic_ckpt") / "elastic.ckpt"
    trainer.save_checkpoint(path)
    return path


def routed_shares(module: TSALanguageModel, corpus, budgets: list[float], split: str = "val") -> dict:
    """The share of routed token-blocks hard mode runs on a split at each budget's threshold."""
    data = elastic_data(corpus)
    data.setup("validate" if split == "val" else split)
    loader = data.val_dataloader() if split == "val" else data.test_dataloader()
    shares = {}
    with torch.no_grad():
        for budget in budgets:
            threshold = module.threshold_at(budget)
            executed = [module.model(x, y, mode="hard", threshold=threshold)[2].executed for x, y in loader]
            valid = torch.cat([y != -100 for _, y in loader])
            shares[budget] = float(torch.cat(executed)[..., 1:][valid].float().mean())
    return shares


EVERY_HUNDREDTH = [round(0.3 + 0.01 * k, 2) for k in range(71)]


def test_every_budget_in_steps_of_a_hundredth_lands_within_a_hundredth(trained, corpus):
    module = TSALanguageModel.load_from_checkpoint(trained).eval()
    shares = routed_shares(module, corpus, EVERY_HUNDREDTH)
    misses = {b: round(s - b, 4) for b, s in shares.items() if abs(s - b) > 0.01}
    assert not misses, misses
    assert probability(module.threshold_at(1.0)) == 1.0 and shares[1.0] == 1.0
    held_out = routed_shares(module, corpus, [0.4, 0.62, 0.85], split="test")  # text it never saw
    assert all(abs(s - b) < 0.03 for b, s in held_out.items()), held_out


def saturated(module: TSALanguageModel) -> TSALanguageModel:
    """Routers whose logits spread over about [5, 45]: float32 rounds most p to exactly 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in module.model.routers:
            router.hidden.weight.copy_(torch.randn(router.hidden.weight.shape, generator=generator))
            router.out.weight.copy_(torch.randn(router.out.weight.shape, generator=generator) * 3)
            router.out.bias.fill_(25.0)
    return module


def test_routers_whose_p_saturate_still_land_every_budget(corpus):
    data = elastic_data(corpus)
    config = TSAConfig(vocab_size=data.vocab_size, routing="tsa", gate="unit", **SHAPE)
    module = saturated(TSALanguageModel(config, elastic_budgets=RANGE, alphabet=data.alphabet)).eval()
    data.setup("validate")
    x, _ = next(iter(data.val_dataloader()))
    routing = module.model(x, mode="hard", threshold=1.0)[2]
    assert (routing.halt_probs == 1.0).float().mean() > 0.3  # ties in p: only the logits tell these apart
    calibrated(module, corpus, times=3)  # a model this far from any training settles in a few
    shares = routed_shares(module, corpus, EVERY_HUNDREDTH)
    misses = {b: round(s - b, 4) for b, s in shares.items() if abs(s - b) > 0.01}
    assert not misses, misses


@pytest.mark.parametrize(
    "trained_range, shown",
    [((0.3, 1.0), [1.0, 0.85, 0.7, 0.5, 0.3]), ((0.45, 0.9), [0.9, 0.85, 0.7, 0.5, 0.45])],
)
def test_a_run_shows_the_usual_budgets_inside_its_range_and_both_ends_highest_first(trained_range, shown):
    assert Budgets.elastic(*trained_range, momentum=0.1, initial=0.5).shown() == shown


def test_thresholds_interpolate_between_table_points_and_a_budget_outside_is_refused(trained):
    module = TSALanguageModel.load_from_checkpoint(trained)
    budget = module.budget
    assert budget.budgets == budget_grid(*RANGE) == [0.3, *(round(0.35 + 0.05 * k, 2) for k in range(14))]
    assert budget.table_budgets == EVERY_HUNDREDTH
    for b, threshold in zip(budget.table_budgets, budget.table, strict=True):
        assert torch.equal(budget.threshold_at(b), threshold)
    low, high = budget.threshold_at(0.62), budget.threshold_at(0.63)
    assert low < high and budget.threshold_at(0.624) == pytest.approx(float(0.6 * low + 0.4 * high))
    assert torch.isinf(budget.threshold_at(1.0)) and budget.threshold_at(0.995) == budget.threshold_at(0.99)
    assert torch.equal(module.skip_threshold, budget.threshold_at(1.0))  # no compute_budget: the highest
    for outside in (0.2, 1.05):
        with pytest.raises(ConfigError, match=r"outside the trained range \[0.3, 1.0\]"):
            module.threshold_at(outside)


def test_a_fresh_elastic_model_runs_everything_at_budget_one():
    config = TSAConfig(vocab_size=11, routing="tsa", gate="unit", **SHAPE)
    module = TSALanguageModel(config, elastic_budgets=RANGE)
    assert torch.isinf(module.threshold_at(1.0)) and probability(module.threshold_at(1.0)) == 1.0
    assert probability(module.threshold_at(0.5)) == 0.5  # the configured skip_threshold, until trained


def test_depth_maps_and_samples_show_the_budget_asked_for_else_the_lowest():
    config = TSAConfig(vocab_size=11, routing="tsa", gate="unit", **SHAPE)
    for asked, shown in ((None, "budget 0.3 "), (1.0, "budget 0.3 "), (0.5, "budget 0.5 ")):
        module = TSALanguageModel(config, elastic_budgets=RANGE, compute_budget=asked)
        assert operating_point(module)[1].startswith(shown), (asked, operating_point(module))


class TableAtStart(L.Callback):
    """The table as a resumed fit starts from it."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.table = thresholds(pl_module).clone()


def test_the_calibrated_table_is_saved_and_restored_exactly_on_resume(corpus, tmp_path):
    first, trainer = train_elastic(corpus, steps=20, val_every=20)
    saved = thresholds(first)
    assert not saved.isnan().any() and not torch.equal(first.budget.running, first.budget.table[::5])
    trainer.save_checkpoint(tmp_path / "step20.ckpt")
    assert torch.equal(thresholds(TSALanguageModel.load_from_checkpoint(tmp_path / "step20.ckpt")), saved)
    start = TableAtStart()
    resumed, _ = train_elastic(
        corpus, steps=30, val_every=10, ckpt_path=tmp_path / "step20.ckpt", callbacks=[start]
    )
    assert torch.equal(start.table, saved)
    assert not torch.equal(thresholds(resumed), saved)  # and training went on from it


def test_a_checkpoint_is_refused_with_other_elastic_budgets(trained):
    with pytest.raises(ConfigError, match=r"elastic_budgets=\[0.3, 1.0\] \(this run: \[0.5, 1.0\]\)"):
        TSALanguageModel.load_from_checkpoint(trained, elastic_budgets=[0.5, 1.0])


@pytest.mark.parametrize("gate", ["unit", "straight_through"])
def test_rows_of_one_batch_run_at_their_own_thresholds(gate):
    """A threshold per row equals each row run alone at its own: in hard mode and in training's forward."""
    torch.manual_seed(0)
    model = TSATransformer(TSAConfig(vocab_size=11, routing="tsa", gate=gate, **SHAPE)).eval()
    for router in model.routers:  # p spread across (0, 1), so that the thresholds below split tokens
        torch.nn.init.normal_(router.out.weight, std=3.0)
    x = torch.randint(0, 11, (3, 32))
    logit = model(x)[2].halt_logits
    thresholds = torch.stack([logit.quantile(0.3), logit.quantile(0.7), torch.tensor(torch.inf)])
    for mode in ("hard", "soft"):
        logits, _, routing = model(x, mode=mode, threshold=thresholds)
        for row, threshold in enumerate(thresholds):
            alone, _, own = model(x[row : row + 1], mode=mode, threshold=threshold)
            torch.testing.assert_close(logits[row], alone[0])
            decided = model.hard_executed(routing.halt_logits, thresholds)[row]
            assert torch.equal(decided, model.hard_executed(own.halt_logits, threshold)[0])
            if mode == "hard":
                assert torch.equal(routing.executed[row], own.executed[0])
    shares = model.hard_executed(routing.halt_logits, thresholds)[..., 1:].float().mean(dim=(1, 2))
    assert shares[0] < shares[1] < shares[2] == 1.0


def interleaved(*ranks: torch.Tensor) -> torch.Tensor:
    """The global batch as one process holds it, from each rank's share: DDP deals windows in turn."""
    return torch.stack(ranks, dim=1).flatten(0, 1)


def test_each_step_trains_every_grid_budget_and_follows_each_from_its_own_rows():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5)
    grid = len(budget.budgets)
    for step in (0, 5):
        rows = budget.rows(32, step)
        assert set(rows.tolist()) == set(range(grid))  # the smallest, the largest and all between
        assert torch.equal(interleaved(*(budget.rows(16, step, rank, 2) for rank in (0, 1))), rows)
    logits = torch.randn(15 * 2, 8, 3)  # twice round the grid
    trained = budget.follow(logits, step=5)
    assert float(trained) == pytest.approx(sum(budget.budgets) / grid)  # the mean budget the batch trained
    rows = budget.rows(len(logits), 5)
    for g, running in enumerate(budget.running):
        mine = logits[rows == g]
        expected = (
            torch.inf
            if budget.budgets[g] == 1.0
            else torch.kthvalue(mine.flatten(), round(budget.budgets[g] * mine.numel())).values
        )
        assert float(running) == pytest.approx(float(expected), rel=1e-6)
    again = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5)  # as two ranks gather it
    again.follow(torch.stack([logits[0::2], logits[1::2]]), step=5)
    assert torch.equal(again.running, budget.running)


def test_a_budget_no_row_trains_this_step_keeps_its_threshold():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5)
    before = budget.running.clone()
    budget.follow(torch.randn(4, 8, 3), step=0)  # 4 rows: the grid's 4 lowest budgets
    assert torch.equal(budget.rows(4, 0), torch.arange(4))
    assert not torch.equal(budget.running[:4], before[:4]) and torch.equal(budget.running[4:], before[4:])
    shrinking = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5, shrink_steps=[10, 24])
    before = shrinking.running.clone()
    shrinking.follow(torch.randn(2, 8, 3), step=16)  # 7 highest open, 2 rows: the lowest open one has none
    assert shrinking.rows(2, 16).tolist() == [10, 11] and shrinking.drawn(16) == 7
    moved = [False] * 15
    moved[:8] = [True] * 8  # the unopened budgets follow every row, to open warm
    moved[10:12] = [True, True]
    assert (shrinking.running != before).tolist() == moved


def test_a_calibration_pass_refines_each_row_to_its_own_budgets_quantile_of_its_budgets_rows():
    budget = Budgets.elastic(0.3, 1.0, momentum=0.1, initial=0.5)
    logits, valid = torch.randn(5, 8, 3), torch.ones(5, 8, dtype=torch.bool)
    valid[1, 4:] = False  # padding counts for nothing
    valid[4] = False  # a row without a real position
    points = torch.tensor([20, 20, 50, 70, 30])  # the table's 0.5, 0.5, 0.8, 1.0 and 0.6
    thresholds = budget.batch_thresholds(logits, valid, points)
    half = torch.cat([logits[0].flatten(), logits[1, :4].flatten()])
    assert thresholds[0] == thresholds[1] == torch.kthvalue(half, round(0.5 * half.numel())).values
    assert thresholds[2] == torch.kthvalue(logits[2].flatten(), round(0.8 * 24)).values
    assert thresholds[3] == thresholds[4] == torch.inf  # full depth; nothing to refine on


def test_a_top_share_trains_the_highest_budget_on_its_share_of_rows_and_the_grid_on_the_rest():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5, top_share=0.25)
    grid = len(budget.budgets)
    for step in range(3):
        rows = budget.rows(64, step)
        assert (rows == grid - 1).sum() >= 16  # a quarter at the top, and the top's grid turn
        others = rows[torch.arange(64) % 4 != 3]
        assert set(others.tolist()) == set(range(grid))  # the 48 others take every budget in turn
        assert torch.equal(interleaved(*(budget.rows(32, step, rank, 2) for rank in (0, 1))), rows)
    trained = budget.follow(torch.randn(60, 8, 3), step=0)  # 15 top rows, 45 others: 3 times round the grid
    assert float(trained) == pytest.approx((15 * 1.0 + 3 * sum(budget.budgets)) / 60)


def test_a_validation_while_training_scores_the_grid_on_every_fourth_batch_and_every_budget_alike():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5)
    passes = [budget.validation_passes(32, i, thorough=False) for i in range(16)]
    assert [len(p) for p in passes] == [1, 0, 0, 0] * 4  # GRID_EVERY = 4: a validation costs 1.5x a dense one
    rows = torch.cat([p[0] for p in passes if p])
    counts = torch.bincount(rows, minlength=len(budget.table_budgets))[budget.grid_index]
    assert counts.min() >= 8 and counts.max() - counts.min() <= 1  # 128 rows over 15 budgets
    grid = torch.tensor(budget.grid_index)
    # batches of 4 rows take the budgets in turn, each scored batch one more than a batch on
    turns = [budget.validation_passes(4, i, thorough=False)[0] for i in (0, 4)]
    assert torch.equal(turns[0], grid[[0, 1, 2, 3]]) and torch.equal(turns[1], grid[[5, 6, 7, 8]])
    for i in (0, 4):
        ranks = [budget.validation_passes(16, i, False, rank, 2)[0] for rank in (0, 1)]
        assert torch.equal(interleaved(*ranks), budget.validation_passes(32, i, thorough=False)[0])
    assert len(budget.validation_passes(32, 1, thorough=True)) == len(budget.table_budgets)
    even = Budgets.elastic(0.35, 1.0, momentum=1.0, initial=0.5)  # 14 budgets: rank 0 met only even ones
    for rank in (0, 1):  # each of two ranks meets every budget within a few batches
        met = {k for i in range(0, 16, 4) for k in even.validation_passes(16, i, False, rank, 2)[0].tolist()}
        assert met == set(even.grid_index)


def test_a_calibration_that_scored_only_the_grid_interpolates_the_table_between_its_points():
    budget = Budgets.elastic(0.3, 1.0, momentum=0.1, initial=0.5)
    scores, valid = torch.randn(32, 64, 3), torch.ones(32, 64, dtype=torch.bool)
    for k in budget.grid_index:  # as while training: passes at the grid's budgets only
        budget.observe(scores, valid, torch.full((32,), k))
    budget.calibrate()
    table = dict(zip(budget.table_budgets, budget.table.tolist(), strict=True))
    assert table[0.62] == pytest.approx(0.6 * table[0.6] + 0.4 * table[0.65])  # linear in log-odds
    assert table[0.32] == pytest.approx(0.6 * table[0.3] + 0.4 * table[0.35])  # above the lowest, too
    assert all(torch.isfinite(torch.tensor(t)) for b, t in table.items() if b < 1.0)


def test_thresholds_read_as_probabilities_in_float64():
    assert probability(20.0) < 1.0 and probability(torch.tensor(20.0)) < 1.0  # float32 would round to 1
    assert probability(40.0) == 1.0 and probability(0.0) == 0.5


def test_a_validation_while_training_follows_routers_that_drifted_since_the_last_calibration():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5)
    scores = torch.randn(1, 64, 3).expand(32, 64, 3)  # every row alike: each budget's quantile is the same
    valid = torch.ones(32, 64, dtype=torch.bool)
    budget.follow(scores, step=0)
    for k in range(len(budget.table_budgets)):  # without dropout the logits sit 0.5 higher
        budget.observe(scores + 0.5, valid, torch.full((32,), k))
    budget.calibrate()
    table = budget.table.clone()
    assert torch.equal(budget.validation_thresholds(), table)  # no step since: the table
    budget.follow(scores - 4.0, step=1)  # the routers drift by -4 while training
    finite = torch.isfinite(table)
    drifted = budget.validation_thresholds()
    assert torch.allclose(drifted[finite], table[finite] - 4.0, atol=1e-5)
    assert torch.equal(drifted[~finite], table[~finite])  # budget 1.0 skips nothing, ever


def test_progressive_shrinking_that_would_end_after_the_last_step_is_refused_in_one_line(
    small_corpus, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # its run folder
    message = cli_error(
        *fit_args(small_corpus, "--trainer.max_steps=4"),
        "--model.config.gate=unit",
        "--model.elastic_budgets=[0.5,1.0]",
        "--model.elastic_shrink_steps=[2,10]",
        "--model.depth_loss_weight=0",
    )
    assert "elastic_shrink_steps ends at step 10, after trainer.max_steps 4" in message
    assert message.endswith("the lowest budgets would never train; end it by max_steps")
    budget = Budgets.elastic(0.5, 1.0, momentum=0.1, initial=0.5, shrink_steps=[2, 10])
    for max_steps in (10, 11):  # ending on the last step, or before it
        budget.check_schedule(max_steps)


def test_progressive_shrinking_trains_full_depth_first_then_opens_the_grid_downwards():
    budget = Budgets.elastic(0.3, 1.0, momentum=1.0, initial=0.5, shrink_steps=[10, 24])
    grid = len(budget.budgets)
    lowest = []
    for step in range(30):
        rows = budget.rows(32, step)
        assert torch.equal(interleaved(*(budget.rows(16, step, rank, 2) for rank in (0, 1))), rows)
        drawn = set(rows.tolist())
        assert drawn == set(range(grid - len(drawn), grid))  # the highest budgets, none skipped over
        lowest.append(min(drawn))
    assert lowest[:10] == [grid - 1] * 10  # full depth only
    assert lowest == sorted(lowest, reverse=True)  # the range only widens
    # the lowest budget falls linearly, 0.7 / 15 of budget a step: 0.953 at step 10, 0.86 at 12, ...
    assert [grid - lowest[s] for s in (9, 10, 11, 12, 16, 23, 24)] == [1, 1, 2, 3, 7, 14, 15]
    assert lowest[24:] == [0] * 6  # the whole range from the end on
    short = Budgets.elastic(0.5, 1.0, momentum=1.0, initial=0.5, shrink_steps=[10, 12])
    assert [short.drawn(step) for step in range(14)] == [1] * 10 + [4, 7, 11, 11]  # a step opens 1/3 of it
    logits = torch.randn(32, 8, 3)
    budget.follow(logits, step=3)  # every row at full depth: the unopened budgets follow them all
    for b, running in zip(budget.budgets[:-1], budget.running[:-1], strict=True):
        kth = torch.kthvalue(logits.flatten(), round(b * logits.numel())).values
        assert float(running) == pytest.approx(float(kth))  # so each opens warm


def test_the_rows_below_full_depth_learn_from_the_full_depth_prediction_of_their_own_text():
    torch.manual_seed(0)
    config = TSAConfig(vocab_size=11, routing="tsa", gate="unit", **SHAPE)
    module = TSALanguageModel(config, elastic_budgets=RANGE, elastic_top_share=0.5, distill_weight=1.0)
    x = torch.randint(0, 11, (4, 32))
    thresholds = torch.tensor([torch.inf, -1.0, torch.inf, 0.5])  # rows 1 and 3 train below full depth
    module.train()
    logits = module.model(x, mode="soft", threshold=thresholds)[0]
    kl = module.distillation(x, logits, thresholds)
    assert module.model.training  # the teacher's pass leaves training on
    with torch.no_grad():
        teacher = module.model.eval()(x[[1, 3]], mode="hard", threshold=1.0)[0]
    expected = F.kl_div(
        F.log_softmax(logits[[1, 3]], -1).flatten(0, 1),
        F.log_softmax(teacher, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(kl, expected)
    kl.backward()  # the student learns; the teacher's pass had no graph
    assert module.model.routers[0].out.weight.grad is not None
    assert module.distillation(x, logits, torch.full((4,), torch.inf)) == 0  # nothing below full depth


class RanksAgree(RanksHoldOneBudget):
    """Also fails a step whose rows do not train at the global batch's thresholds of their own windows."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        rows, rank, step = len(batch[0]), trainer.global_rank, trainer.global_step
        every_row = pl_module.budget.row_thresholds(rows * trainer.world_size, step)
        assert torch.equal(pl_module.train_threshold(rows), every_row[rank :: trainer.world_size])


def test_under_ddp_every_window_trains_at_the_budget_one_process_gives_it(small_corpus):
    """float64, momentum 1: any row trained at another budget would move the thresholds and scores."""
    budget = {"elastic_budgets": [0.4, 1.0], "budget_momentum": 1.0, "elastic_top_share": 0.25}
    options = {"precision": "64-true", "gate": "unit", **budget}
    single = fit(small_corpus, "auto", 1, batch_size=8, **options)
    ddp = fit(small_corpus, "ddp_spawn", 2, batch_size=4, callbacks=[RanksAgree()], **options)
    for key in ("train/skip_threshold", "train/budget", "train/executed_share"):  # training: exactly
        assert ddp[key] == pytest.approx(single[key], rel=1e-12), key
    # validation: DDP's sampler pads the split to a multiple of the ranks, so a window may count twice
    calibrated = [key for key in ddp if key.endswith("calibrated_threshold")]
    per_budget = [key for key in ddp if re.match(r"val/budget_.*/bpc", key)]
    assert len(calibrated) == len(per_budget) == len(budget_grid(0.4, 1.0))
    for key in [*calibrated, *per_budget, "val/hard/loss"]:
        assert ddp[key] == pytest.approx(single[key], rel=1e-3), key


@pytest.mark.parametrize(
    "options, message",
    [
        ({"elastic_budgets": [0.5]}, "elastic_budgets must be"),
        ({"elastic_budgets": [0.9, 0.5]}, "elastic_budgets must be"),
        ({"elastic_budgets": [0.5, 0.5]}, "elastic_budgets must be"),  # a range, not one budget
        ({"elastic_budgets": [0.0, 1.0]}, "elastic_budgets must be"),
        ({"elastic_budgets": [0.5, 1.2]}, "elastic_budgets must be"),
        (
            {"elastic_budgets": [0.5, 1.0], "compute_budget": 0.3},
            r"outside elastic_budgets \[0.5, 1.0\]: it is the budget evaluation and sampling use by default, "
            "so it must be one the model was trained for$",
        ),
        ({"elastic_budgets": [0.5, 1.0], "depth_loss_weight": 0.1}, "give elastic_budgets or depth_loss"),
        ({"elastic_budgets": [0.349, 1.0]}, "multiples of 0.01"),
        ({"elastic_budgets": [0.5, 1.0], "elastic_top_share": 1.0}, "elastic_top_share"),
        *(
            (
                {option: value},
                f"^{option} shapes how a batch shares the budgets of elastic_budgets; "
                f"set --model.elastic_budgets too, or leave {option} out$",
            )
            for option, value in (("elastic_top_share", 0.5), ("elastic_shrink_steps", [0, 10]))
        ),
        ({"elastic_budgets": [0.5, 1.0], "elastic_shrink_steps": [-1, 5]}, "0 <= start <= end"),
        ({"elastic_budgets": [0.5, 1.0], "elastic_shrink_steps": [10, 5]}, "0 <= start <= end"),
        ({"elastic_budgets": [0.5, 1.0], "elastic_shrink_steps": [10]}, "elastic_shrink_steps must be"),
    ],
)
def test_impossible_elastic_options_are_refused(options, message):
    config = TSAConfig(routing="tsa", gate="straight_through", **SHAPE)
    with pytest.raises(ConfigError, match=message):
        TSALanguageModel(config, **options)


def test_the_top_share_a_module_is_given_reaches_its_budgets():
    config = TSAConfig(routing="tsa", gate="unit", **SHAPE)
    module = TSALanguageModel(config, elastic_budgets=[0.5, 1.0], elastic_top_share=0.5)
    rows = module.budget.rows(8, step=3)
    assert (rows == len(module.budget.budgets) - 1).sum() >= 4  # half the rows, and some of the others


def test_progressive_shrinking_may_start_at_the_first_step_and_open_the_range_at_once():
    config = TSAConfig(routing="tsa", gate="straight_through", **SHAPE)
    for start, end in ([0, 10], [5, 5]):
        budget = TSALanguageModel(
            config, elastic_budgets=[0.5, 1.0], elastic_shrink_steps=[start, end]
        ).budget
        assert [budget.drawn(step) for step in (start - 1, end)] == [1, len(budget.budgets)]


def test_the_default_budget_may_be_either_end_of_the_range():
    config = TSAConfig(routing="tsa", gate="straight_through", **SHAPE)
    for default in (0.5, 1.0):
        module = TSALanguageModel(config, elastic_budgets=[0.5, 1.0], compute_budget=default)
        assert module.budget.budget == default


@pytest.mark.parametrize("change", [{"gate": "soft"}, {"routing": "none"}])
def test_elastic_depth_needs_straight_through_tsa_routers(change):
    config = TSAConfig(**{"routing": "tsa", "gate": "straight_through", **SHAPE, **change})
    with pytest.raises(ConfigError, match="elastic_budgets"):
        TSALanguageModel(config, elastic_budgets=[0.5, 1.0])


def test_a_budget_outside_the_trained_range_is_refused_in_one_line(trained):
    message = cli_error("sample", f"--ckpt_path={trained}", "--budget=0.2", "--max_new_tokens=2")
    assert "outside the trained range [0.3, 1.0]" in message


def test_sample_budget_on_a_model_without_elastic_budgets_says_what_to_do_instead(corpus, tmp_path):
    data = elastic_data(corpus)
    module = TSALanguageModel(TSAConfig(vocab_size=data.vocab_size, routing="tsa", **SHAPE))
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "fixed.ckpt")
    message = cli_error("sample", f"--ckpt_path={tmp_path / 'fixed.ckpt'}", "--budget=0.5")
    assert "elastic_budgets" in message and "threshold" in message


def test_sample_at_a_budget_decodes_at_the_threshold_its_table_gives(trained, capsys):
    module = TSALanguageModel.load_from_checkpoint(trained)
    common = {"ckpt_path": str(trained), "prompt": "a", "max_new_tokens": 40, "temperature": 0}
    at_budget = sample(**common, budget=0.45)
    assert at_budget == sample(**common, threshold=probability(module.threshold_at(0.45)))
    assert re.search(r"\[hard mode at budget 0.45, threshold 0\.\d+", capsys.readouterr().err)
    with pytest.raises(ConfigError, match="not both"):
        sample(**common, budget=0.45, threshold=0.5)
    with pytest.raises(ConfigError, match="not both"):
        module.sample("a", 4, budget=0.45, threshold=0.5)


def test_evaluate_scores_each_budget_at_its_calibrated_threshold(trained, corpus, tmp_path):
    data = TextDataModule(str(corpus), block_size=32, batch_size=16)
    result = evaluate(str(trained), data=data, budgets=[1.0, 0.5, 0.3], out_dir=str(tmp_path), name="e")
    by_budget = {p["budget"]: p for p in result["points"] if "budget" in p}
    assert sorted(by_budget) == [0.3, 0.5, 1.0]
    assert len(result["points"]) == 3  # the budgets alone (the highest is the model's own)
    for budget, point in by_budget.items():
        routed = point["executed_per_layer"][1:]
        assert abs(sum(routed) / len(routed) - budget) < 0.03, (budget, routed)
    assert by_budget[0.3]["flops_saved"] > by_budget[0.5]["flops_saved"] > by_budget[1.0]["flops_saved"]
    assert "(budget 0.5)" in (tmp_path / "e.md").read_text()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[list[str], Path]:
    """A short elastic fit through the CLI: its arguments and its run folder."""
    root = tmp_path_factory.mktemp("elastic_cli")
    args = fit_args(
        write_corpus(root / "corpus.txt"),
        "--model.depth_loss_weight=0",
        "--model.elastic_budgets=[0.45,1.0]",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
    )
    main(args)
    return args, root / "runs" / "shakespeare_cpu"


def test_tensorboard_shows_every_budget_while_it_trains(cli_run):
    events = EventAccumulator(str(cli_run[1] / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("budgets/val")] == [2, 4]  # each validation, at its step
    proto = events.Tensors(custom_scalars_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    tags = [c.multiline.tag[0] for title, c in charts.items() if title.startswith("bits per token at budget")]
    scalars = events.Tags()["scalars"]
    shown = sorted(t for pattern in tags for t in scalars if re.match(pattern, t))
    assert shown == [f"val/budget_{b}/bpc" for b in ("0.45", "0.50", "0.70", "0.85", "1.00")]


def test_test_runs_an_elastic_checkpoint_at_the_budget_asked_for(cli_run, capsys):
    args, run = cli_run
    last = run / "checkpoints" / "last.ckpt"
    routed = {}
    for budget in (0.5, 1.0):
        main(["test", *args[1:], f"--model.compute_budget={budget}", f"--ckpt_path={last}"])
        printed = capsys.readouterr().out
        saved = float(re.search(r"test/tlops_saved_executed\W+([-0-9.e]+)", printed).group(1))
        routed[budget] = 1 - saved * 3 / 2  # 3 blocks, 2 of them routed
    assert abs(routed[0.5] - 0.5) < 0.1 and routed[1.0] == 1.0, routed
    message = cli_error("test", *args[1:], "--model.compute_budget=0.3", f"--ckpt_path={last}")
    assert "compute_budget 0.3 is outside elastic_budgets [0.45, 1.0]" in message


def test_every_budget_follows_its_quantile_at_the_momentum_asked_for():
    budget = Budgets.elastic(0.3, 1.0, momentum=0.25, initial=0.5)  # initial log-odds 0
    logits = torch.randn(32, 8, 3, generator=torch.Generator().manual_seed(3))
    budget.follow(logits, step=0)
    rows = budget.rows(32, 0)
    for g, b in enumerate(budget.budgets[:-1]):
        target = torch.kthvalue(logits[rows == g].flatten(), round(b * logits[rows == g].numel())).values
        assert float(budget.running[g]) == pytest.approx(0.25 * float(target), rel=1e-6)


def test_calibration_never_counts_the_padding_of_a_last_window():
    """Padded positions carry logits too; a quantile that counted them would move the threshold."""
    budget = Budgets([0.5], momentum=0.1, initial=0.5)
    logits = torch.cat([torch.linspace(-1, 1, 64), torch.full((64,), 50.0)]).view(1, 128, 1)
    valid = torch.arange(128).view(1, 128) < 64  # the last 64 positions are padding
    budget.observe(logits, valid)
    budget.calibrate()
    assert float(budget.table[0]) <= 0.0 + 1e-6  # the median of the real positions, not of all 128
