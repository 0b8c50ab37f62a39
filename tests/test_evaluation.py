import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import quiet_trainer, spread_predictors, spread_routers, write_corpus
from tsa_lightning.accounting import summarize, tally
from tsa_lightning.baselines import build_model
from tsa_lightning.data import IGNORE_INDEX, TextDataModule
from tsa_lightning.errors import ConfigError, RunError
from tsa_lightning.evaluation import evaluate, sweep
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel

FIELDS = {"threshold", "bpc", "executed_fraction", "executed_tlops_saved", "flops_saved", "paper_tlops_saved"}


def tiny_run(tmp_path, corpus, routing: str) -> str:
    """Four training steps of a tiny model on a generated corpus; returns the checkpoint path."""
    L.seed_everything(0, verbose=False)
    data = TextDataModule(str(corpus), level="char", block_size=16, batch_size=8, samples_per_epoch=64)
    config = TSAConfig(
        vocab_size=data.vocab_size,
        block_size=16,
        n_layer=3,
        n_head=2,
        n_embd=16,
        dropout=0.1,
        routing=routing,
        mod_every=1,
        mod_capacity=0.5,
    )
    model = TSALanguageModel(config, alphabet=data.alphabet, warmup_steps=1)
    trainer = quiet_trainer(max_steps=4, limit_val_batches=2, default_root_dir=tmp_path)
    trainer.fit(model, data)
    path = tmp_path / f"{routing}.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.mark.parametrize("routing", ["tsa", "early_exit", "mod", "none"])
def test_evaluate_writes_every_field_and_is_monotone(tmp_path, small_corpus, routing):
    ckpt = tiny_run(tmp_path, small_corpus, routing)
    data = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=8)
    out = tmp_path / "eval"
    result = evaluate(ckpt, data, split="val", out_dir=str(out), limit_batches=3)
    name = f"{routing}_step4_val"  # the run (here the checkpoint's stem), its step and the split
    for suffix in ("json", "md", "png"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert list((out / "tensorboard" / name).glob("events.out.tfevents.*"))
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["routing"] == routing
    if routing == "mod":  # its soft forward sees future tokens: never scored
        assert saved["soft_bpc"] is None
    else:
        assert saved["soft_bpc"] > 0
    points = saved["points"]
    assert len(points) == 22 and all(set(p) >= FIELDS for p in points)
    executed = [p["executed_fraction"] for p in points]
    assert executed == sorted(executed)  # higher thresholds never run less
    assert executed[-1] == 1.0  # 1.01 runs everything
    if routing != "mod":
        assert points[-1]["bpc"] == pytest.approx(saved["soft_bpc"], rel=1e-5)
    if routing != "none":
        assert executed[0] < 1.0
    assert result["points"] == points
    assert saved["step"] == 4 and saved["unit"] == "character"
    assert saved["trained_threshold"] == (None if routing == "none" else 0.5)  # marked in the table
    assert ("| 0.5 (trained) |" in (out / f"{name}.md").read_text()) == (routing != "none")
    assert saved["checkpoint"] == str(Path(ckpt).resolve()) and saved["run"] == routing
    with pytest.raises(RunError, match="exists"):  # never overwrite an earlier evaluation
        evaluate(ckpt, data, split="val", out_dir=str(out), limit_batches=3)


def test_an_interrupted_write_leaves_no_partial_set(tmp_path, monkeypatch):
    """Ctrl-C while the outputs are written: none of them stays to block the rerun."""
    from tsa_lightning import evaluation

    points = [dict.fromkeys(FIELDS, 0.5)]
    result = {"routing": "tsa", "soft_bpc": 1.0, "targets": 10, "points": points}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "curve_figure", interrupted)  # after the JSON and markdown exist
    with pytest.raises(KeyboardInterrupt):
        evaluation.write_outputs(result, tmp_path / "eval", "run")
    assert not [p for p in evaluation.output_paths(tmp_path / "eval", "run") if p.exists()]


def test_evaluate_draws_a_dense_reference_beside_the_curve_and_says_each_gap_to_it(tmp_path, small_corpus):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt, dense = (
        tiny_run(tmp_path / "a", small_corpus, "tsa"),
        tiny_run(tmp_path / "b", small_corpus, "none"),
    )
    data = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=8)
    out = tmp_path / "eval"
    result = evaluate(ckpt, data, out_dir=str(out), thresholds=[0.5], limit_batches=2, reference=dense)
    alone = evaluate(dense, data, out_dir=str(out), thresholds=[0.5], limit_batches=2)
    bpc = alone["points"][0]["bpc"]
    assert result["reference"] == {
        "name": "none",
        "checkpoint": str(Path(dense).resolve()),
        "step": 4,
        "bpc": bpc,
        "flops_share": 1.0,
    }
    table = (out / "tsa_step4_test.md").read_text()
    assert f"reference (dense) `{Path(dense).resolve()}` (run none, step 4): bpc {bpc:.4f}" in table
    point = result["points"][0]
    assert f"| {point['bpc']:.4f} | {point['bpc'] / bpc - 1:+.2%} |" in table  # the gap, in percent
    assert "vs reference" not in (out / "none_step4_test.md").read_text()


def test_evaluations_of_two_runs_into_one_folder_both_succeed_and_name_their_runs(tmp_path, small_corpus):
    """`fit` names every checkpoint last.ckpt: the run folder names the evaluation, not the file."""
    data = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=8)
    out = tmp_path / "eval"
    for run in ("first", "second"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        ckpt = Path(tiny_run(tmp_path / run, small_corpus, "tsa")).rename(
            tmp_path / run / "checkpoints" / "last.ckpt"
        )
        evaluate(str(ckpt), data, out_dir=str(out), thresholds=[0.5], limit_batches=2)
        table = (out / f"{run}_step4_test.md").read_text()
        assert table.startswith(f"`{ckpt.resolve()}` (run {run}, step 4), test split:")
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == [
        "first_step4_test",
        "second_step4_test",
    ]


def plain_loop(model, loader, mode: str, threshold: float | None = None) -> dict:
    """The scoring loop `evaluate` ran outside Lightning before: the numbers the sweep must reproduce."""
    model.eval()
    nats, count, sums = 0.0, 0, None
    for x, y in loader:
        _, loss, routing = model(x, y, mode=mode, threshold=threshold)
        n = int((y != IGNORE_INDEX).sum())
        nats, count = nats + loss.item() * n, count + n
        batch = tally(model.config, routing, y != IGNORE_INDEX)
        sums = batch if sums is None else {k: sums[k] + v for k, v in batch.items()}
    return {"bpc": nats / count / math.log(2), "targets": count, "report": summarize(model.config, sums)}


@pytest.mark.parametrize("routing", ["tsa", "mod"])
def test_sweep_through_lightning_equals_the_plain_loop(tmp_path, small_corpus, routing):
    module = TSALanguageModel.load_from_checkpoint(tiny_run(tmp_path, small_corpus, routing))
    (spread_routers if routing == "tsa" else spread_predictors)(module.model)  # a real mix of decisions
    data = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=8)
    data.setup("test")
    thresholds = [0.0, 0.3, 0.5, 0.7, 1.01]
    result = sweep(module.model, data, thresholds, split="val")
    soft = plain_loop(module.model, data.val_dataloader(), "soft")
    if routing == "mod":  # not causal in soft mode: not scored, the paper's metric from hard mode
        assert result["soft_bpc"] is None
    else:
        assert result["soft_bpc"] == pytest.approx(soft["bpc"], rel=1e-12)
    assert result["targets"] == soft["targets"] == len(data.splits["val"]) - 1
    for threshold, point in zip(thresholds, result["points"], strict=True):
        hard = plain_loop(module.model, data.val_dataloader(), "hard", threshold)
        assert point["bpc"] == pytest.approx(hard["bpc"], rel=1e-12)
        assert point["executed_fraction"] == pytest.approx(hard["report"].executed_fraction, rel=1e-12)
        assert point["flops_saved"] == pytest.approx(hard["report"].flops_saved, rel=1e-12)
        paper = (hard if routing == "mod" else soft)["report"].paper_tlops_saved
        assert point["paper_tlops_saved"] == pytest.approx(paper, rel=1e-12)
    stem_only = 1 / module.config.n_layer
    assert any(stem_only < p["executed_fraction"] < 1 for p in result["points"])  # real, mixed skipping


def test_evaluate_checks_its_arguments_and_outputs_before_any_work(tmp_path, small_corpus):
    ckpt = tiny_run(tmp_path, small_corpus, "tsa")
    data = TextDataModule(str(small_corpus), level="char", block_size=16, batch_size=8)
    for kwargs, message in [
        ({"limit_batches": 0}, "--limit_batches must be >= 1"),
        ({"thresholds": [0.5, 2.0]}, "--thresholds must be in [0, 1.01]"),
        ({"split": "train"}, "--split must be 'val' or 'test'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(ckpt, data, out_dir=str(tmp_path / "eval"), **kwargs)
    (tmp_path / "eval" / "tensorboard" / "tsa_step4_test").mkdir(parents=True)
    with pytest.raises(RunError, match="tensorboard/tsa_step4_test exists"):
        evaluate(ckpt, data, out_dir=str(tmp_path / "eval"))
    other = TextDataModule(str(write_corpus(tmp_path / "other.txt", alphabet="xyz\n")), block_size=16)
    expected = (
        "the checkpoint: 10 characters, the data: 4 characters; only the checkpoint has ' abcdefgh'; "
        "only the data has 'xyz'"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        evaluate(ckpt, other, out_dir=str(tmp_path / "eval2"))
    assert not (tmp_path / "eval2").exists()
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(RunError, match="a_file is a file; give a folder"):
        evaluate(ckpt, data, out_dir=str(tmp_path / "a_file"))


SPREAD = {"tsa": spread_routers, "mod": spread_predictors}


@pytest.mark.parametrize("routing", ["tsa", "early_exit", "mod"])
def test_padding_enters_no_count(routing):
    """A padded last window counts executed TLOps, FLOPs and alpha of its real positions only."""
    torch.manual_seed(0)
    config = TSAConfig(
        vocab_size=11,
        block_size=16,
        n_layer=4,
        n_head=2,
        n_embd=16,
        routing=routing,
        mod_every=1,
        router_bias_init=0.0,
    )
    model = build_model(config).eval()
    if routing in SPREAD:
        SPREAD[routing](model)  # decisions that differ from token to token
    real = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([real, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    valid = torch.arange(16) < 10
    with torch.no_grad():
        alone = tally(config, model(real, mode="hard")[2])
        with_pad = tally(config, model(padded, mode="hard")[2], valid.expand(2, 16))
    for key in ("executed_per_layer", "tokens", "halt_count", "flops", "dense_flops"):  # counts: exact
        assert torch.equal(with_pad[key], alone[key]), key
    assert with_pad["keep_sum"].item() == pytest.approx(alone["keep_sum"].item(), rel=1e-6)  # float sums
    if routing != "early_exit":  # an untrained exit head is never confident: it keeps every token
        assert 0 < alone["executed_per_layer"][1:].sum() < 3 * 20  # a real mix of decisions
