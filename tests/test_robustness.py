"""Bad input ends in one line that names the problem and the fix; broken training never eats a checkpoint."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import cli_error, fit_on, quiet_trainer, write_corpus
from tsa_lightning.cli import main
from tsa_lightning.data import TextDataModule
from tsa_lightning.errors import TrainingDiverged
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel


def test_unknown_config_key(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, "--model.config.n_embdd=32"))
    assert "n_embdd" in message and "--help" in message


def test_unknown_key_in_a_config_file(small_corpus, tmp_path):
    config = tmp_path / "extra.yaml"
    config.write_text("model:\n  learning_rat: 0.1\n")
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--config={config}"))
    assert "learning_rat" in message


def test_a_broken_second_config_file_is_named(small_corpus, tmp_path):
    config = tmp_path / "overlay.yaml"
    config.write_text("trainer:\n  max_steps: 2\n   extra: [\n")
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--config={config}"))
    assert f"config file {config} is not valid YAML at line 3" in message


def test_a_config_file_that_is_not_utf8_is_named(small_corpus, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("model:\n  learning_rate: 0.001  # caf\xe9\n".encode("latin-1"))
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--config={config}"))
    assert message == f"error: config file {config} is not UTF-8 text (byte 36 is 0xe9); save it as UTF-8"


def test_a_negative_learning_rate_is_one_line(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, "--model.learning_rate=-0.001"))
    assert message == "error: --model.learning_rate must be > 0, got -0.001"
    assert not (tmp_path / "runs").exists()  # refused before the Trainer made a log folder


def test_a_checkpoint_from_another_module_or_an_older_layout_is_named(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"n_layer": 6}}, path)
    message = cli_error("sample", f"--ckpt_path={path}")
    assert "written by another LightningModule, or by a tsa-lightning version from before" in message


def test_ctrl_c_outside_training_is_one_line_and_exits_130(small_corpus, monkeypatch, capsys):
    from tsa_lightning import evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "load_checkpoint", interrupted)
    data = ["--data=tsa_lightning.data.TextDataModule", f"--data.path={small_corpus}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt_path=x.ckpt", *data])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1:] == [
        "error: interrupted (Ctrl-C); an interrupted `fit` resumes with --ckpt_path last"
    ]


def test_a_refused_data_option_is_one_reason_not_a_type_dump(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, "--data.init_args.batch_size=0"))
    assert message == "error: batch_size must be a positive integer, got 0"
    message = cli_error(*fit_on(small_corpus, tmp_path, "--data.init_args.batch_sizee=3"))
    assert "'batch_sizee' is not accepted" in message and "Given value" not in message, message


def test_a_file_name_that_is_not_utf8_is_named(small_corpus, tmp_path):
    odd = os.fsdecode(bytes(tmp_path / "caf") + b"\xe9.txt")
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--data.init_args.path={odd}"))
    assert "is not valid UTF-8" in message and "rename the file" in message


def test_wrong_type(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, "--model.config.n_layer=many"))
    assert "model.config.n_layer" in message and "int" in message


@pytest.mark.parametrize(
    "args, named",
    [
        (["sample", "--temperature=warm"], ['"temperature"', "float", "warm"]),
        (["sample", "--mode=medium"], ['"mode"', "'soft', 'hard'"]),
        (["sample", "--budgett=0.5"], ["unrecognized arguments: --budgett"]),
        (["evaluate", "--limit_batches=all"], ['"limit_batches"', "int"]),
    ],
)
def test_sample_and_evaluate_refuse_a_wrong_option_in_one_line_as_fit_does(args, named):
    message = cli_error(*args)
    assert all(name in message for name in named), message
    assert message.endswith(f"(see `tsa-lightning {args[0]} --help` for the options)")


def test_n_embd_not_divisible_by_n_head(small_corpus, tmp_path):
    message = cli_error(
        *fit_on(small_corpus, tmp_path, "--model.config.n_embd=30", "--model.config.n_head=4")
    )
    assert "n_embd (30) must be divisible by" in message and "n_head (4)" in message


def test_block_size_larger_than_a_split(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, "--data.init_args.block_size=4000"))
    assert "block_size 4000" in message and "lower block_size" in message


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in cli_error(*fit_on(empty, tmp_path, "--data.init_args.level=byte"))


def test_checksum_mismatch(small_corpus, tmp_path):
    before = small_corpus.read_bytes()
    message = cli_error(*fit_on(small_corpus, tmp_path, "--data.init_args.sha256=" + "0" * 64))
    assert "sha256" in message and "left untouched" in message
    assert small_corpus.read_bytes() == before


def test_missing_corpus_offline(tmp_path):
    missing = tmp_path / "nowhere" / "input.txt"
    offline = ["--data.init_args.url=http://127.0.0.1:9/input.txt", "--data.init_args.level=byte"]
    message = cli_error(*fit_on(missing, tmp_path, *offline))
    assert str(missing) in message and "TSA_DATA_DIR" in message and "http://127.0.0.1:9/input.txt" in message


def test_undecodable_bytes_in_a_character_corpus(tmp_path):
    broken = tmp_path / "latin1.txt"
    broken.write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    message = cli_error(*fit_on(broken, tmp_path))
    assert "not valid UTF-8" in message and "level='byte'" in message


def test_checkpoint_path_that_does_not_exist(small_corpus, tmp_path):
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert "nope.ckpt does not exist" in message


def test_checkpoint_from_an_incompatible_config(small_corpus, tmp_path):
    """A checkpoint trained on one alphabet, resumed on a corpus with another vocabulary."""
    main([*fit_on(small_corpus, tmp_path), "--trainer.enable_progress_bar=false"])
    checkpoint = next((tmp_path / "runs").glob("*/checkpoints/last.ckpt"))
    other = write_corpus(tmp_path / "other.txt", alphabet="xyz\n")
    message = cli_error(*fit_on(other, tmp_path, f"--ckpt_path={checkpoint}"))
    assert "vocabulary differs" in message and "the checkpoint: 10 characters, the data: 4" in message


class PoisonAt(L.Callback):
    """Makes one weight NaN before step `step`: the next loss is non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.wte.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path):
    data = TextDataModule(str(small_corpus), block_size=16, batch_size=4, samples_per_epoch=400)
    model = TSALanguageModel(
        TSAConfig(vocab_size=data.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)
    trainer = quiet_trainer(
        max_steps=20,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[checkpoints, PoisonAt(step=5)],
    )
    with pytest.raises(TrainingDiverged, match="training loss became nan at step 5"):
        trainer.fit(model, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_a_bug_keeps_its_traceback(small_corpus, tmp_path, monkeypatch):
    """Only the package's own errors (and options jsonargparse refused) become one line."""

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(TextDataModule, "setup", broken)
    with pytest.raises(KeyError, match="an internal bug"):
        main([*fit_on(small_corpus, tmp_path), "--trainer.enable_progress_bar=false"])


def test_a_missing_init_from_names_the_file_to_give(small_corpus, tmp_path):
    missing = tmp_path / "dense.ckpt"
    message = cli_error(*fit_on(small_corpus, tmp_path, f"--model.init_from={missing}"))
    assert f"checkpoint {missing} does not exist" in message and "`last`" not in message
