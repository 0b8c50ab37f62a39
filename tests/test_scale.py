"""Scale out and never lose work: DDP equals one process, and a SIGKILLed run resumes exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO, TINY_OPTIONS, cli, fit, scalars
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
    ddp = fit(small_corpus, "ddp_spawn", 2, batch_size=4, **budget)
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


def test_sigkill_then_resume_matches_an_uninterrupted_run(small_corpus, tmp_path):
    args = [
        "fit",
        f"--config={REPO / 'configs' / 'shakespeare_cpu.yaml'}",
        "--data=tsa_lightning.data.TextDataModule",
        f"--data.init_args.path={small_corpus}",
        "--data.init_args.block_size=16",
        "--data.init_args.batch_size=8",
        "--data.init_args.samples_per_epoch=96",  # 12 batches an epoch: the kill lands mid-epoch
        *TINY_OPTIONS,
        "--trainer.max_steps=40",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--last_checkpoint.every_n_train_steps=5",
    ]
    full = cli(*args, "--trainer.logger.init_args.name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    last = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    victim = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args, "--trainer.logger.init_args.name=killed"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL and last.exists()
    killed_at = torch.load(last, weights_only=True)["global_step"]

    resumed = cli(*args, "--trainer.logger.init_args.name=killed", "--ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = scalars(tmp_path / "runs" / "full" / "version_0", "train/loss")
    continued = scalars(tmp_path / "runs" / "killed" / "version_0", "train/loss", since=killed_at)
    assert killed_at < 40 and max(continued) == max(expected)  # resumed mid-run and ran to the end
    assert len(continued) >= 10
    for step, value in continued.items():
        assert value == pytest.approx(expected[step], abs=1e-5), step
    assert not (tmp_path / "runs" / "killed" / "version_1").exists()  # one run, one log folder
