import json

import lightning as L
import pytest

from tsa_lightning.cli import evaluate
from tsa_lightning.data import TextDataModule
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
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        default_root_dir=tmp_path,
    )
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
    for suffix in ("json", "md", "png"):
        assert (out / f"{routing}.{suffix}").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((out / f"{routing}.json").read_text())
    assert saved["routing"] == routing and saved["soft_bpc"] > 0
    points = saved["points"]
    assert len(points) == 22 and all(set(p) >= FIELDS for p in points)
    executed = [p["executed_fraction"] for p in points]
    assert executed == sorted(executed)  # higher thresholds never run less
    assert executed[-1] == 1.0  # 1.01 runs everything
    if routing != "mod":  # MoD's soft mode is top-k routing, so only the others match it there
        assert points[-1]["bpc"] == pytest.approx(saved["soft_bpc"], rel=1e-5)
    if routing != "none":
        assert executed[0] < 1.0
    assert result["points"] == points
    with pytest.raises(SystemExit, match="exists"):  # never overwrite an earlier evaluation
        evaluate(ckpt, data, split="val", out_dir=str(out), limit_batches=3)
