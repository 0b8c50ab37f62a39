"""Never lose or mix up work: concurrent runs, failed writes, mixed precision, broken checkpoints."""

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import TINY, cli_error, fit_on, quiet_trainer
from tsa_lightning import runs
from tsa_lightning.baselines import build_model
from tsa_lightning.cli import main
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import ConfigError, RunError
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import Router, TSAConfig
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import AtomicCheckpointIO, RunLock, read_checkpoint

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_a_second_run_under_the_same_name_is_refused_while_the_first_lives(small_corpus, tmp_path):
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from pathlib import Path; from tsa_lightning.runs import RunLock; "
            f"RunLock(Path({str(folder)!r})); print('held', flush=True); import time; time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = cli_error(*fit_on(small_corpus, tmp_path), *QUIET)
        assert "still going" in message and f"pid {holder.pid}" in message and "another name" in message
        assert not list(folder.glob("*.ckpt"))
    finally:
        holder.kill()
        holder.wait()
    main([*fit_on(small_corpus, tmp_path), *QUIET])  # the lock died with its process
    assert (folder / "last.ckpt").is_file()


def test_resuming_with_nothing_to_resume_says_a_new_run_starts(small_corpus, tmp_path, capsys):
    main([*fit_on(small_corpus, tmp_path), "--ckpt_path=last", *QUIET])
    assert "No checkpoint to resume" in capsys.readouterr().err
    assert (tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt").is_file()


def test_a_run_refused_before_it_starts_leaves_no_log_and_a_resumed_one_its_folder(small_corpus, tmp_path):
    """Lightning opens the log folder before the setup hooks that find a missing init_from or a
    validation split too short for the context, and before the sanity check that finds an empty
    one; a refused run leaves no version folder to take the next run's number, and a refused
    resume leaves its run's folder as it was."""
    run = tmp_path / "runs" / "shakespeare_cpu"
    too_short = "--data.init_args.split=[0.9998,0.0001,0.0001]"
    message = cli_error(*fit_on(small_corpus, tmp_path), *QUIET, "--model.init_from=missing.ckpt")
    assert "missing.ckpt does not exist" in message
    assert not (tmp_path / "runs").exists()
    assert "the val split is empty" in cli_error(
        *fit_on(small_corpus, tmp_path), *QUIET, "--data.init_args.split=[0.9,0,0.1]"
    )
    assert not (tmp_path / "runs").exists()
    main([*fit_on(small_corpus, tmp_path), *QUIET])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]  # not version_1
    held = {p.name: p.read_bytes() for p in (run / "version_0").iterdir()}
    resume = [*fit_on(small_corpus, tmp_path), *QUIET, "--ckpt_path=last", "--trainer.max_steps=4"]
    assert "too few for block_size" in cli_error(*resume, too_short)
    last = run / "checkpoints" / "last.ckpt"
    validate = ["validate", *fit_on(small_corpus, tmp_path)[1:], f"--ckpt_path={last}"]
    assert "too few for block_size" in cli_error(*validate, too_short)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "version_0"]  # no validate_step2 either
    assert {p.name: p.read_bytes() for p in (run / "version_0").iterdir()} == held
    main([*resume, "--trainer.max_steps=3"])  # the refused resume, on a split that fits
    assert {*held, "config.resume1.yaml"} <= {p.name for p in (run / "version_0").iterdir()}


def test_a_refusal_removes_only_what_its_own_process_wrote(tmp_path):
    class RefusedInSetup(TSALanguageModel):
        def setup(self, stage: str) -> None:
            log_dir = Path(self.trainer.log_dir)
            (log_dir / "notes.txt").write_text("another process's")
            (log_dir / "events.out.tfevents.1.otherhost.4242.0").write_bytes(b"")
            raise ConfigError("refused")

    trainer = quiet_trainer(logger=TensorBoardLogger(tmp_path, name="run"), max_steps=1, limit_val_batches=0)
    trainer.callbacks.append(runs.RefusalLeavesNoLogs.of(trainer))
    data = DataLoader(TensorDataset(torch.zeros(2, 16, dtype=torch.long)), batch_size=2)
    with pytest.raises(ConfigError, match="refused"):
        trainer.fit(RefusedInSetup(TSAConfig(vocab_size=11, block_size=16, **TINY)), data)
    left = sorted(p.name for p in (tmp_path / "run" / "version_0").iterdir())
    assert left == ["events.out.tfevents.1.otherhost.4242.0", "notes.txt"]  # its own event file went


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)

    def fill_the_disk(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a checkpoint, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.torch, "save", fill_the_disk)
    with pytest.raises(RunError, match="No space left on device; the previous checkpoint there is intact"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file under any name
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_full_disk_during_fit_ends_in_one_line_and_keeps_last(small_corpus, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def fails_on_the_third_write(obj, f):
        calls.append(obj["global_step"])
        if len(calls) == 3:
            f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(runs.torch, "save", fails_on_the_third_write)
    args = ["--trainer.max_steps=8", "--last_checkpoint.every_n_train_steps=2"]
    message = cli_error(*fit_on(small_corpus, tmp_path, *args, "--trainer.limit_val_batches=0"), *QUIET)
    assert "could not write checkpoint" in message and "No space left on device" in message
    folder = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints"
    assert not [p for p in folder.iterdir() if "partial" in p.name]
    last = read_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == calls[1]  # the previous save survived, whole
    assert (folder.parent / "version_0" / "config.yaml").is_file()  # a run that trained keeps its log


def tiny(routing: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = TSAConfig(
        vocab_size=11, block_size=32, n_layer=4, n_head=2, n_embd=32, routing=routing, **overrides
    )
    model = build_model(config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("out.weight"):  # router outputs: spread p away from 0.5, so bf16 still splits
                weight.mul_(50)
    return model


PARTIAL_SKIP = {  # routers that skip some tokens and keep others
    "tsa": {"router_bias_init": 0.0},
    "mod": {"mod_every": 1, "router_bias_init": 0.0},
    "early_exit": {"skip_threshold": 0.134},  # about the median confidence of this untrained model
}


AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=NEEDS_GPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=NEEDS_GPU),
]


@pytest.mark.parametrize("device, dtype", AUTOCASTS)
@pytest.mark.parametrize("routing", sorted(PARTIAL_SKIP))
def test_hard_mode_and_cached_decoding_under_autocast(routing, device, dtype):
    model = tiny(routing, **PARTIAL_SKIP[routing]).to(device).eval()
    x = torch.randint(0, 11, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        _, _, reference = model(x, mode="hard")
        executed = reference.executed[..., 1:].float().mean().item()
        assert 0.0 < executed < 1.0, executed  # a batch that mixes kept and skipped tokens
        with torch.autocast(device, dtype=dtype):
            logits, _, routing_bf16 = model(x, mode="hard")
            out = generate_cached(model, [x[0, :5], x[1, :3]], max_new_tokens=6, temperature=0)
    assert torch.isfinite(logits).all() and 0.0 < routing_bf16.executed[..., 1:].float().mean() < 1.0
    assert [len(o) for o in out] == [11, 9]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("routing", sorted(PARTIAL_SKIP))
def test_training_step_in_float64_and_bf16(routing, dtype):
    model = tiny(routing, **PARTIAL_SKIP[routing]).to(dtype)
    x = torch.randint(0, 11, (2, 32), generator=torch.Generator().manual_seed(2))
    _, loss, routing_out = model(x, x, mode="soft")
    total = loss if routing_out.aux_loss is None else loss + routing_out.aux_loss
    total.backward()
    assert torch.isfinite(total) and all(
        p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()
    )


def split_routers(checkpoint: Path, out: Path, corpus: Path) -> Path:
    """The same checkpoint with its (one) router split down the middle: half the tokens skip block 1."""
    saved = torch.load(checkpoint, weights_only=True)
    module = TSALanguageModel.load_from_checkpoint(checkpoint)
    data = TextDataModule(str(corpus), block_size=32)
    data.setup()
    x = next(iter(data.val_dataloader()))[0]
    model = module.model
    with torch.no_grad():
        h = model.blocks[0](model.wte(x) + model.wpe(torch.arange(x.size(1))))
        for router in (m for m in model.modules() if isinstance(m, Router)):
            router.hidden.weight.mul_(30)
            router.out.weight.mul_(30)
            router.out.bias -= router.logit(h).median()
    saved["state_dict"] = module.state_dict()
    torch.save(saved, out)
    return out


PRECISIONS = [  # every precision Lightning offers on each accelerator; the GPU ones run where there is one
    pytest.param("cpu", "32-true", id="cpu-32"),
    pytest.param("cpu", "bf16-mixed", id="cpu-bf16-mixed"),
    pytest.param("gpu", "16-mixed", id="gpu-16-mixed", marks=NEEDS_GPU),
    pytest.param("gpu", "bf16-mixed", id="gpu-bf16-mixed", marks=NEEDS_GPU),
]


@pytest.mark.parametrize("accelerator, precision", PRECISIONS)
@pytest.mark.parametrize("routing", ["tsa", "mod"])
def test_fit_validate_and_sample_in_every_precision_with_routers_that_skip(
    small_corpus, tmp_path, routing, accelerator, precision, capsys
):
    run = tmp_path / "runs" / "shakespeare_cpu"
    extra = ["--model.config.mod_every=1"] if routing == "mod" else []
    args = fit_on(
        small_corpus,
        tmp_path,
        f"--model.config.routing={routing}",
        f"--trainer.accelerator={accelerator}",
        f"--trainer.precision={precision}",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=3",
        *extra,
    )
    main([*args, *QUIET])  # two steps
    split = split_routers(run / "checkpoints" / "last.ckpt", tmp_path / "split.ckpt", small_corpus)
    # a new run from the split checkpoint, validating in hard mode at step 4
    split_run = ["--trainer.logger.init_args.name=split", "--trainer.max_steps=4", f"--ckpt_path={split}"]
    main([*args, *split_run, *QUIET])
    config = tmp_path / "runs" / "split" / "version_0" / "config.yaml"
    checkpoint = tmp_path / "runs" / "split" / "checkpoints" / "last.ckpt"
    main(["validate", f"--config={config}", f"--ckpt_path={checkpoint}", *QUIET])
    printed = capsys.readouterr().out
    saved = float(re.search(r"val/tlops_saved_executed\W+([-0-9.e]+)", printed).group(1))
    assert 0.0 < saved < 0.75, printed  # routers skip part of the tokens, not all
    main(["sample", f"--ckpt_path={checkpoint}", "--max_new_tokens=20", "--mode=hard", "--prompt=ab"])
    assert capsys.readouterr().out.startswith("ab")


def test_corrupt_and_foreign_checkpoints_are_refused_in_one_line(small_corpus, tmp_path):
    main([*fit_on(small_corpus, tmp_path), *QUIET])
    good = tmp_path / "runs" / "shakespeare_cpu" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.ones(3)}, foreign)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    cases = {
        cut: "not a readable checkpoint",
        text: "not a readable checkpoint",
        foreign: "not a tsa-lightning",
    }
    cases[good.parent] = "is a folder"
    for path, expected in cases.items():
        for command in (
            ["sample", f"--ckpt_path={path}"],
            fit_on(small_corpus, tmp_path, f"--ckpt_path={path}"),
        ):
            message = cli_error(*command)
            assert expected in message and "weights_only" not in message, message


def test_a_file_where_a_folder_belongs_ends_in_one_line(small_corpus, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a folder")
    message = cli_error(*fit_on(small_corpus, tmp_path))
    assert str(blocker) in message and "a file stands where a folder is needed" in message


def test_locks_are_released_between_in_process_commands(tmp_path):
    lock = RunLock(tmp_path / "checkpoints")
    with pytest.raises(RunError, match="still going"):
        RunLock(tmp_path / "checkpoints")
    RunLock.release_all()
    RunLock(tmp_path / "checkpoints").release()
    assert lock not in RunLock.held
