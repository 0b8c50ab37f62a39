"""Quick single-seed probe of one training variant: train briefly, then score hard mode at a few thresholds.

Used to choose which TSA training variants earn a place as config options (see README). Prints one
JSON line: validation bpc in soft and hard mode, the saved fractions, and (hard bpc, executed
TLOps saved) at thresholds 0.5, 0.7, 0.9.

    python benchmarks/variant_probe.py ste_l0.05 '{"gate": "straight_through", "depth_loss_weight": 0.05}'
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L

from tsa_lightning.data import ShakespeareDataModule
from tsa_lightning.model import TSAConfig
from tsa_lightning.module import TSALanguageModel

BASE = {
    "n_layer": 6,
    "n_head": 4,
    "n_embd": 128,
    "dropout": 0.0,
    "learning_rate": 2e-3,
    "min_learning_rate": 2e-4,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name")
    parser.add_argument("overrides", type=json.loads, help="TSALanguageModel arguments as JSON")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    data = ShakespeareDataModule(data_dir=args.data_dir, block_size=64, batch_size=32)
    options = {**BASE, **args.overrides}
    architecture = {k: options.pop(k) for k in list(options) if k in TSAConfig.__dataclass_fields__}
    config = TSAConfig(vocab_size=data.vocab_size, block_size=64, **architecture)
    model = TSALanguageModel(config, warmup_steps=50, **options)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=20,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
    )
    start = time.time()
    trainer.fit(model, data)
    out = {"name": args.name, "sec": round(time.time() - start)}
    out.update({k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("val")})
    for threshold in (0.5, 0.7, 0.9):
        model.config.skip_threshold = threshold
        metrics = trainer.validate(model, data, verbose=False)[0]
        out[f"thr{threshold}"] = (
            round(metrics["val/hard/bpc"], 4),
            round(metrics["val/tlops_saved_executed"], 3),
        )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
