"""Scale out and never lose work: DDP equals one process, and a SIGKILLed run resumes exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO, TINY_OPTIONS, cli, fit, fit_args, scalars
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


def processes_mentioning(text: str) -> list[int]:
    """The live processes whose command line holds `text` (Linux)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # a process that ended while we looked
            continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ddp_spawn_stopped_by_a_signal_saves_the_step_reached_and_leaves_no_worker(
    small_corpus, tmp_path, signum
):
    """A signal to the launching process (`kill <pid>`, or Ctrl-C): its workers finish the step, save
    it, exit; the command exits 143 or 130 naming the step. Without care the launcher died at once
    (-15) and left its workers behind, or hung waiting for their results."""
    name = f"spawned_{signum.name}"
    args = fit_args(
        small_corpus,
        "--data.init_args.batch_size=4",
        "--trainer.strategy=ddp_spawn",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=100000",
        "--trainer.val_check_interval=100000",
        "--last_checkpoint.every_n_train_steps=5",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.name={name}",
    )
    last = tmp_path / "runs" / name / "checkpoints" / "last.ckpt"
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not last.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # training is under way once the first periodic last.ckpt exists
    time.sleep(1.0)
    launcher.send_signal(signum)
    try:
        _, stderr = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], stderr[-3000:]
    stop = [line for line in stderr.splitlines() if line.startswith(f"stopped by {signum.name} at step")]
    step = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert stop and stop[0].startswith(f"stopped by {signum.name} at step {step}; saved {last}"), stderr[
        -3000:
    ]
    trained = scalars(tmp_path / "runs" / name / "version_0", "train/loss")
    # the checkpoint holds the last step trained (index step - 1); the workers stop before Lightning
    # logs that step's point, which the resumed run does not log again
    assert max(trained) == step - 2
    time.sleep(1.0)
    assert processes_mentioning(name) == []  # no worker left behind


class SignalTheLauncherDuringTheSanityCheck(L.Callback):
    """In a ddp_spawn worker: `kill <launcher pid>` while the workers run the sanity check."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking and trainer.global_rank == 0:
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(2.0)  # the launcher forwards it to both workers before the check goes on


def test_ddp_spawn_signalled_before_training_stops_after_its_first_step_and_saves_it(small_corpus, tmp_path):
    """A SIGTERM that reaches the workers during their setup or sanity check was lost: they trained on."""
    args = fit_args(
        small_corpus,
        "--data.init_args.batch_size=4",
        "--trainer.strategy=ddp_spawn",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=100000",
        "--trainer.val_check_interval=100000",
        "--trainer.num_sanity_val_steps=1",
        "--trainer.callbacks+=tests.test_scale.SignalTheLauncherDuringTheSanityCheck",
    )
    done = cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 143, done.stderr[-3000:]
    last = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGTERM at step 1; saved {last.resolve()}" in done.stderr, done.stderr[-3000:]
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 1


def test_a_spawned_run_stopped_before_its_workers_saved_anything_says_so_and_leaves_no_folder(tmp_path):
    from tsa_lightning.runs import ForwardSignals, RunLock

    folder = tmp_path / "runs" / "name" / "checkpoints"
    RunLock(folder)
    ForwardSignals.install(folder / "last.ckpt")
    ForwardSignals.received = signal.SIGTERM  # the workers died before their handlers were up
    assert ForwardSignals.stopped() == ("stopped by SIGTERM before training started; nothing to resume", 143)
    RunLock.release_all()
    assert list(tmp_path.iterdir()) == []  # the folders the run made for its checkpoints, gone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
