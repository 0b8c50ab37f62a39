"""Stopping never loses work: a signal, a kill or a stop at any point (training, validation, the
sanity check, one process or ddp_spawn) saves the step reached, and the resume goes on as the
uninterrupted run would."""

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

from tests.helpers import (
    REPO,
    TINY_OPTIONS,
    checkpoints,
    cli,
    fit_args,
    quiet_trainer,
    scalars,
    step_of,
    write_corpus,
)
from tsa_lightning.data import TextDataModule
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import LastCheckpoint, RunLock


@pytest.mark.parametrize("stop", ["max_time", "early_stopping"])
def test_a_run_that_stops_itself_saves_its_final_state(tmp_path, stop):
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = TextDataModule(str(corpus), block_size=16, batch_size=8)
    model = TSALanguageModel(
        TSAConfig(vocab_size=data.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    )
    last = LastCheckpoint(every_n_train_steps=1000)
    last.dirpath = tmp_path / "checkpoints"
    ends = {
        "max_time": {"max_time": {"seconds": 2}},
        "early_stopping": {  # mode max: the second validation does not improve, and the run stops
            "val_check_interval": 3,
            "callbacks": [L.pytorch.callbacks.EarlyStopping("val/soft/loss", patience=0, mode="max")],
        },
    }[stop]
    trainer = quiet_trainer(
        max_steps=10_000,
        limit_val_batches=2,
        enable_checkpointing=True,
        **{**ends, "callbacks": [*ends.get("callbacks", []), last]},
    )
    trainer.fit(model, data)
    assert 0 < trainer.global_step < 10_000
    assert step_of(last.path) == trainer.global_step


def stop_and_wait(victim: subprocess.Popen, signum: int, when) -> str:
    deadline = time.time() + 300
    while not when() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signum)
    return victim.communicate(timeout=300)[1]


def test_a_signal_before_the_first_validation_then_a_resume_to_the_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(
        corpus,
        "--trainer.max_steps=60",
        "--trainer.val_check_interval=40",
        "--last_checkpoint.every_n_train_steps=5",
        "--data.init_args.samples_per_epoch=96",
    )
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    victim = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    stderr = stop_and_wait(victim, signal.SIGTERM, (folder / "last.ckpt").exists)
    assert victim.returncode == 143, stderr[-3000:]
    stopped_at = step_of(folder / "last.ckpt")
    assert 5 <= stopped_at < 40 and checkpoints(folder) == ["last.ckpt"]

    resumed = cli(*args, "--ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoints(folder) == ["best-60.ckpt", "last.ckpt"]  # 60, off the grid of 40, is validated too
    assert step_of(folder / "last.ckpt") == 60
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoints", "version_0"]


class SignalDuringValidation(L.Callback):
    """Sends this process SIGTERM in the middle of the first real validation."""

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_validation_saves_and_the_resume_runs_that_validation_again(tmp_path):
    """The validation at step 4 is cut short by the signal; the resumed run runs it again from its
    first batch, and logs every scalar at the step and with the value of an uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(
        corpus, "--trainer.max_steps=8", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1"
    )
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    env = {"PYTHONPATH": str(REPO)}
    stopped = cli(
        *args, "--trainer.callbacks+=tests.test_stopping.SignalDuringValidation", cwd=tmp_path, env=env
    )
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"saved {folder.resolve() / 'last.ckpt'}" in stopped.stderr
    assert step_of(folder / "last.ckpt") == 4 and checkpoints(folder) == ["last.ckpt"]

    resumed = cli(*args, "--ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_of(folder / "last.ckpt") == 8 and "last.ckpt" in checkpoints(folder)
    full = cli(*args, "--trainer.logger.init_args.name=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    full_logs, resumed_logs = tmp_path / "runs" / "full" / "version_0", folder.parent / "version_0"
    events = EventAccumulator(str(full_logs), size_guidance={"scalars": 0})
    events.Reload()
    assert 4 in scalars(full_logs, "val/hard/bpc", 0)
    for tag in events.Tags()["scalars"]:
        assert scalars(resumed_logs, tag, 0) == scalars(full_logs, tag, 0), tag


def resumable_fit(corpus) -> list[str]:
    return fit_args(
        corpus,
        "--data.init_args.samples_per_epoch=96",  # 12 batches an epoch: the signal lands mid-epoch
        "--trainer.max_steps=60",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--last_checkpoint.every_n_train_steps=5",
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):

    root = tmp_path_factory.mktemp("signals")
    corpus = write_corpus(root / "corpus.txt")
    full = cli(*resumable_fit(corpus), "--trainer.logger.init_args.name=full", cwd=root)
    assert full.returncode == 0, full.stderr[-3000:]
    return root, corpus, scalars(root / "runs" / "full" / "version_0", "train/loss")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_reached_and_resumes_exactly(uninterrupted, signum, status):
    root, corpus, expected = uninterrupted
    name = f"stopped_{signum.name}"
    last = root / "runs" / name / "checkpoints" / "last.ckpt"
    victim = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "cli.py"),
            *resumable_fit(corpus),
            f"--trainer.logger.init_args.name={name}",
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not last.exists() and victim.poll() is None and time.time() < deadline:  # written at step 5
        time.sleep(0.02)
    os.kill(victim.pid, signum)
    stderr = victim.communicate(timeout=300)[1]
    assert victim.returncode == status, stderr[-3000:]
    saved = torch.load(last, weights_only=True)
    stop_line = stderr.strip().splitlines()[-1]
    assert stop_line.startswith(f"stopped by {signum.name} at step {saved['global_step']};"), stop_line
    assert "--ckpt_path last" in stop_line and 5 <= saved["global_step"] < 60

    resumed = cli(
        *resumable_fit(corpus), f"--trainer.logger.init_args.name={name}", "--ckpt_path=last", cwd=root
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    continued = scalars(root / "runs" / name / "version_0", "train/loss", since=saved["global_step"])
    assert min(continued) == saved["global_step"] and max(continued) == max(expected)
    for step, value in continued.items():
        assert value == pytest.approx(expected[step], abs=1e-5), step


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


def spawned_fit_args(corpus, *extra: str) -> list[str]:
    """A ddp_spawn fit of two CPU workers that runs until it is stopped."""
    return fit_args(
        corpus,
        "--data.init_args.batch_size=4",
        "--trainer.strategy=ddp_spawn",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=100000",
        "--trainer.val_check_interval=100000",
        *extra,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ddp_spawn_stopped_by_a_signal_saves_the_step_reached_and_leaves_no_worker(
    small_corpus, tmp_path, signum
):
    """A signal to the launching process (`kill <pid>`, or Ctrl-C): its workers finish the step, save
    it, exit; the command exits 143 or 130 naming the step. Without care the launcher died at once
    (-15) and left its workers behind, or hung waiting for their results."""
    name = f"spawned_{signum.name}"
    args = spawned_fit_args(
        small_corpus,
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
    step = step_of(last)
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
    args = spawned_fit_args(
        small_corpus,
        "--trainer.num_sanity_val_steps=1",
        "--trainer.callbacks+=tests.test_stopping.SignalTheLauncherDuringTheSanityCheck",
    )
    done = cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert done.returncode == 143, done.stderr[-3000:]
    last = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGTERM at step 1; saved {last.resolve()}" in done.stderr, done.stderr[-3000:]
    assert step_of(last) == 1


def test_a_spawned_run_stopped_before_its_workers_saved_anything_says_so_and_leaves_no_folder(tmp_path):
    from tsa_lightning.runs import ForwardSignals

    folder = tmp_path / "runs" / "name" / "checkpoints"
    lock = RunLock(folder)
    try:
        ForwardSignals.install(folder / "last.ckpt")
        ForwardSignals.received = signal.SIGTERM  # the workers died before their handlers were up
        stopped = ForwardSignals.stopped()
    finally:
        lock.release()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert stopped == ("stopped by SIGTERM before training started; nothing to resume", 143)
    assert list(tmp_path.iterdir()) == []  # the folders the run made for its checkpoints, gone


def test_a_signal_during_the_final_validation_lets_it_finish_and_the_run_end(tmp_path):
    """A resume at max_steps runs nothing, so a final validation cut short (the thorough calibration,
    the longest one) would be lost for good: it finishes, and the run ends as usual."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(corpus, "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    done = cli(
        *args,
        "--trainer.callbacks+=tests.test_stopping.SignalDuringValidation",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM during the final validation: it finishes first" in done.stderr
    assert "Run finished at step 4." in done.stderr
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    assert checkpoints(folder) == ["best-4.ckpt", "last.ckpt"] and step_of(folder / "last.ckpt") == 4
    assert 4 in scalars(folder.parent / "version_0", "val/hard/bpc")
