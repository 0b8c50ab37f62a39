"""`last.ckpt` always holds a run's newest state, and a resume never mixes two runs or two corpora.

End to end through the command line with the shipped checkpoint settings (best by val/hard/bpc,
top 1): each case checks the step inside `last.ckpt` and that no `last-v*.ckpt` appears.
"""

import re
import shutil
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import checkpoints, cli, cli_error, fit_args, quiet_trainer, scalars, step_of, write_corpus
from tsa_lightning.cli import main
from tsa_lightning.data import TextDataModule
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import LastCheckpoint


def test_last_is_refreshed_by_validations_that_do_not_improve_and_by_the_end_off_the_grid(tmp_path):
    """mode=max makes every later validation a non-improvement; max_steps 7 is off the grid of 2,
    and validated all the same."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(
        corpus, "--trainer.max_steps=7", "--trainer.val_check_interval=2", "--checkpoint.mode=max"
    )
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    assert checkpoints(folder) == ["best-2.ckpt", "last.ckpt"]
    assert step_of(folder / "last.ckpt") == 7
    # the last step is validated too, off the grid: the checkpoint's calibration and the summary are its
    assert sorted(scalars(folder.parent / "version_0", "val/hard/bpc")) == [2, 4, 6, 7]
    summary = result.stderr[result.stderr.index("Run finished at step 7.") :]  # the end names every file
    assert f"final state:     {folder.resolve() / 'last.ckpt'}" in summary
    assert f"best checkpoint: {folder.resolve() / 'best-2.ckpt'}" in summary
    assert "tensorboard --logdir runs" in summary


def test_a_resume_point_exists_from_the_first_interval_whatever_save_top_k(tmp_path):
    """With save_top_k 0 (no best checkpoint at all) last.ckpt still appears every N steps."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    data = TextDataModule(str(corpus), block_size=16, batch_size=8)
    model = TSALanguageModel(
        TSAConfig(vocab_size=data.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    )
    folder = tmp_path / "checkpoints"
    last = LastCheckpoint(every_n_train_steps=3)
    last.dirpath = folder
    seen: dict[int, int | None] = {}

    class Probe(L.Callback):  # runs before the checkpoint callbacks (Lightning orders them last)
        def on_train_batch_start(self, trainer, *args) -> None:
            path = folder / "last.ckpt"
            seen[trainer.global_step] = step_of(path) if path.exists() else None

    trainer = quiet_trainer(
        max_steps=7,
        limit_val_batches=0,
        callbacks=[Probe(), L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_top_k=0), last],
        enable_checkpointing=True,
    )
    trainer.fit(model, data)
    assert seen == {0: None, 1: None, 2: None, 3: 3, 4: 3, 5: 3, 6: 6}
    assert step_of(folder / "last.ckpt") == 7  # and the end
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]


def test_a_copied_run_folder_resumes_from_its_newest_state_and_leaves_the_original(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(corpus, "--trainer.val_check_interval=4")
    first = cli(*args, "--trainer.max_steps=6", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    original = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    before = {p.name: p.read_bytes() for p in original.iterdir()}
    shutil.copytree(tmp_path / "runs", tmp_path / "elsewhere")

    resumed = cli(
        *args,
        "--trainer.max_steps=10",
        "--trainer.logger.init_args.save_dir=elsewhere",
        "--ckpt_path=last",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    copy = tmp_path / "elsewhere" / "shakespeare_cpu" / "checkpoints"
    assert step_of(copy / "last.ckpt") == 10
    best = [name for name in checkpoints(copy) if name.startswith("best-")]
    assert len(best) == 1  # save_top_k 1: the copied best was superseded, not left beside the new one
    assert f"best checkpoint: {copy.resolve() / best[0]}" in resumed.stderr  # the copy's, not the original's
    assert {p.name: p.read_bytes() for p in original.iterdir()} == before


def test_a_reused_config_under_a_new_name_writes_only_into_its_own_folder(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    first = cli(*fit_args(corpus, "--trainer.max_steps=4", "--trainer.val_check_interval=2"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "runs"
    before = {p.name: p.read_bytes() for p in (runs / "shakespeare_cpu" / "checkpoints").iterdir()}
    saved = runs / "shakespeare_cpu" / "version_0" / "config.yaml"
    again = ["fit", f"--config={saved}", "--trainer.logger.init_args.name=other"]
    for command in (again, [*again, "--ckpt_path=last"]):  # the refusal's own advice, too
        result = cli(*command, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (runs / "shakespeare_cpu" / "checkpoints").iterdir()} == before
    assert step_of(runs / "other" / "checkpoints" / "last.ckpt") == 4
    assert "No checkpoint to resume" not in result.stderr


def test_a_resume_continues_in_its_own_log_folder_and_keeps_both_configs(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(corpus, "--trainer.val_check_interval=2")
    for extra in (["--trainer.max_steps=2"], ["--trainer.max_steps=4", "--ckpt_path=last"]):
        result = cli(*args, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "shakespeare_cpu"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]
    assert {"config.yaml", "config.resume1.yaml"} <= {p.name for p in (run / "version_0").iterdir()}
    history = [line.split(" | ")[1] for line in result.stderr.splitlines() if line.startswith("    | ")]
    assert history == ["step", "2", "4"]  # the summary's validations: the one before the stop, too


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(root / "corpus.txt")
    result = cli(*fit_args(corpus, "--trainer.max_steps=4", "--trainer.val_check_interval=2"), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_a_resume_on_a_corpus_whose_alphabet_changed_is_refused(one_run, tmp_path, monkeypatch):
    text = (one_run / "corpus.txt").read_text().replace("h", "z")
    (tmp_path / "corpus.txt").write_text(text)
    shutil.copytree(one_run / "runs", tmp_path / "runs")
    last = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    args = fit_args(tmp_path / "corpus.txt", "--trainer.max_steps=6")
    message = cli_error(*args, "--ckpt_path=last")
    assert "vocabulary differs" in message and "'z'" in message and "'h'" in message
    message = cli_error("validate", *args[1:], f"--ckpt_path={last}")
    assert "vocabulary differs" in message
    assert step_of(last) == 4


def test_options_a_resume_cannot_honour_are_refused_and_evaluation_applies_them(one_run, capsys, monkeypatch):
    monkeypatch.chdir(one_run)
    args = fit_args(one_run / "corpus.txt", "--trainer.max_steps=6")
    last = one_run / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt"
    for option in ("--model.learning_rate=0.01", "--model.config.n_layer=4"):
        for ckpt in ("last", str(last)):
            message = cli_error(*args, option, f"--ckpt_path={ckpt}")
            assert option.removeprefix("--model.").split("=")[0] in message and "checkpoint:" in message
    assert step_of(last) == 4
    message = cli_error("validate", *args[1:], "--model.config.n_head=4", f"--ckpt_path={last}")
    assert "n_head=4 (checkpoint: 2)" in message

    saved = {}
    for threshold in (0.5, 0.0):
        main(["validate", *args[1:], f"--model.config.skip_threshold={threshold}", f"--ckpt_path={last}"])
        printed = capsys.readouterr().out
        saved[threshold] = float(re.search(r"val/tlops_saved_executed\W+([-0-9.e]+)", printed).group(1))
    assert saved[0.5] < 0.3 and saved[0.0] > 0.6  # threshold 0 skips every routed block: the option took


def test_a_run_killed_while_writing_its_first_last_ckpt_points_to_its_best(one_run, tmp_path, monkeypatch):
    """A SIGKILL in the middle of the write leaves the temporary file and no last.ckpt."""
    shutil.copytree(one_run / "runs", tmp_path / "runs")
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    (folder / "last.ckpt").unlink()
    (folder / ".last.ckpt.4242.partial").write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.chdir(tmp_path)
    args = fit_args(one_run / "corpus.txt", "--trainer.max_steps=6")
    best = next(folder.glob("best-*.ckpt"))
    message = cli_error(*args, "--ckpt_path=last")
    assert "no last.ckpt" in message and f"--ckpt_path {best.relative_to(tmp_path)}" in message

    main([*args, f"--ckpt_path={best}"])
    assert step_of(folder / "last.ckpt") == 6 and "last.ckpt" in checkpoints(folder)
    assert not list(folder.glob(".*.partial"))


@pytest.mark.parametrize("resume_from", ["best-4.ckpt", "last.ckpt"])
def test_a_resume_logs_every_later_scalar_at_the_step_and_value_of_the_uninterrupted_run(
    tmp_path, resume_from
):
    """From a checkpoint written at a validation (best-4): every later point at its step, with its
    value. From the final one of a finished run extended to more steps (last, at 4 of 4): at its
    step; Lightning counts the epoch as ended at max_steps, so the extension trains on the windows
    of a new one. (The warmup outlasts both runs, so their learning rates agree whatever max_steps.)"""
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = fit_args(
        corpus, "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--model.warmup_steps=100"
    )
    keep = ["--checkpoint.save_top_k=-1", "--checkpoint.monitor=null"]  # best-2, best-4, ... all kept
    full = cli(*args, "--trainer.max_steps=8", "--trainer.logger.init_args.name=full", *keep, cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    resumed_run = ["--trainer.logger.init_args.name=resumed"]
    ckpt = tmp_path / "runs" / "full" / "checkpoints" / resume_from
    if resume_from == "last.ckpt":
        assert cli(*args, "--trainer.max_steps=4", *resumed_run, cwd=tmp_path).returncode == 0
        ckpt = tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt"
    resumed = cli(*args, "--trainer.max_steps=8", *resumed_run, f"--ckpt_path={ckpt}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full_logs, resumed_logs = (
        tmp_path / "runs" / "full" / "version_0",
        tmp_path / "runs" / "resumed" / "version_0",
    )
    events = EventAccumulator(str(full_logs), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "val/hard/bpc" in tags
    for tag in tags:  # a validation at step 4 ran before the checkpoint: the resume logs from step 5
        since = 4 if tag.startswith(("train/", "executed/train/")) else 5
        got, expected = scalars(resumed_logs, tag, since), scalars(full_logs, tag, since)
        if resume_from == "last.ckpt":  # Lightning ends the epoch at max_steps: the extension draws a new one
            assert sorted(got) == sorted(expected), tag
        else:
            assert got == expected, tag
