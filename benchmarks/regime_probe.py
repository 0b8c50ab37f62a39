"""Quick probes for issue 12 item 1: a CPU shape in which depth matters (dense models only).

Trains one dense model with the recipe of `adaptive_depth.py` (AdamW, warmup 100, cosine to lr/10,
gradient clipping 1.0), scores the whole val and test splits in hard mode every `--eval_every`
steps and at the end, and appends one JSON line to `--log`. Evaluation time is not counted in
`train_seconds`.

    python benchmarks/regime_probe.py --n_layer 6 --n_embd 128 --steps 3000
    python benchmarks/regime_probe.py --corpus enwik8 --n_layer 2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import torch

from tsa_lightning.data import Enwik8DataModule, ShakespeareDataModule, data_root
from tsa_lightning.evaluation import score
from tsa_lightning.module import TSALanguageModel

EVAL_BATCH = 64


class Probe(L.Callback):
    """Scores val and test every `every` steps; keeps evaluation out of the training clock."""

    def __init__(self, loaders: dict, every: int) -> None:
        self.loaders, self.every = loaders, every
        self.curve: list[dict] = []
        self.eval_seconds = 0.0

    def evaluate(self, module: TSALanguageModel, step: int) -> dict:
        t0 = time.time()
        was_training = module.training
        point = {"step": step}
        with torch.no_grad():
            for split, loader in self.loaders.items():
                point[f"{split}_bpc"] = score(module.model, loader, "hard")["bpc"]
        module.train(was_training)
        self.eval_seconds += time.time() - t0
        self.curve.append(point)
        print(json.dumps(point), flush=True)
        return point

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0 and step < trainer.max_steps:
            self.evaluate(module, step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=["shakespeare", "enwik8"], default="shakespeare")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tag", default="")
    p.add_argument("--log", type=Path, default=Path("benchmarks/results/regime/probes.jsonl"))
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    common = {"block_size": args.block_size, "batch_size": args.batch_size, "seed": args.seed}
    evaluating = {"block_size": args.block_size, "batch_size": EVAL_BATCH}
    if args.corpus == "shakespeare":
        data = ShakespeareDataModule(data_dir=args.data_dir, **common)
        evaluation = ShakespeareDataModule(data_dir=args.data_dir, **evaluating)
    else:
        path = str(data_root(args.data_dir) / "enwik8" / "enwik8_prefix.bin")
        data = Enwik8DataModule(path=path, sha256=None, **common)
        evaluation = Enwik8DataModule(path=path, sha256=None, **evaluating)
    evaluation.setup()
    loaders = {"val": evaluation.val_dataloader(), "test": evaluation.test_dataloader()}
    model = TSALanguageModel(
        vocab_size=data.vocab_size,
        alphabet=data.alphabet,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        routing="none",
        learning_rate=args.learning_rate,
        min_learning_rate=args.learning_rate / 10,
        warmup_steps=100,
        weight_decay=args.weight_decay,
    )
    probe = Probe(loaders, args.eval_every)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[probe],
    )
    t0 = time.time()
    trainer.fit(model, data)
    train_seconds = time.time() - t0 - probe.eval_seconds
    final = probe.evaluate(model, args.steps)
    row = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "tag": args.tag,
        **{k: v for k, v in vars(args).items() if k not in ("log", "data_dir", "tag", "eval_every")},
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.model.parameters()),
        "tokens": args.steps * args.batch_size * args.block_size,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / args.steps, 4),
        "val_bpc": final["val_bpc"],
        "test_bpc": final["test_bpc"],
        "curve": probe.curve,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
