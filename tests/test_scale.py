"""Scale out: DDP and ddp_spawn train exactly as one process with the same global batch does."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO, TINY_OPTIONS, RanksHoldOneBudget, cli, fit
from tsa_lightning.data import ContiguousWindows, TextDataModule


def test_ddp_spawn_equals_one_process_with_the_same_global_batch(small_corpus):
    single = fit(small_corpus, "auto", 1, batch_size=8)
    ddp = fit(small_corpus, "ddp_spawn", 2, batch_size=4)
    for key in ("val/soft/loss", "val/hard/loss", "val/tlops_saved_executed", "val/tlops_saved_paper"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-4), key  # tolerance: float reduction order


def test_a_budget_sets_one_threshold_from_the_whole_global_batch(small_corpus):
    """Each rank's quantile of its half of the batch is not the batch's quantile: ranks pool their p.

    Momentum 1 sets the threshold to the last batch's quantile; averaging the ranks' quantiles runs
    0.551 of the blocks here where one process runs 0.555.
    """
    budget = {"compute_budget": 0.6, "budget_momentum": 1.0}
    single = fit(small_corpus, "auto", 1, batch_size=8, **budget)
    ddp = fit(small_corpus, "ddp_spawn", 2, batch_size=4, callbacks=[RanksHoldOneBudget()], **budget)
    assert ddp["train/skip_threshold"] == pytest.approx(single["train/skip_threshold"], rel=1e-7)
    assert ddp["train/executed_share"] == pytest.approx(single["train/executed_share"], abs=1e-6)
    assert ddp["val/hard/loss"] == pytest.approx(single["val/hard/loss"], abs=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_through_the_real_cli(small_corpus, tmp_path, strategy):
    result = cli(
        "fit",
        f"--config={REPO / 'configs' / 'shakespeare_cpu.yaml'}",
        "--data=tsa_lightning.data.TextDataModule",
        f"--data.init_args.path={small_corpus}",
        "--data.init_args.block_size=16",
        "--data.init_args.batch_size=4",
        *TINY_OPTIONS,
        f"--trainer.strategy={strategy}",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.name=ddp",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the summary names the step reached and each validation (ddp_spawn's launcher trained nothing itself)
    assert "Run finished at step 4." in result.stderr and "\n    | 4 | " in result.stderr
    assert "sync_dist" not in result.stderr  # values the same on every rank are logged as such
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]  # rank 0 alone writes
    assert (run / "version_0" / "config.yaml").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    events = EventAccumulator(str(run / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    data = TextDataModule(str(small_corpus), block_size=16)
    data.setup()
    every_val_token = len(ContiguousWindows(data.splits["val"], 16)) * 16
    assert events.Histograms("halting/val/block_1")[-1].histogram_value.num == every_val_token  # both ranks
