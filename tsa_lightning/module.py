"""The LightningModule: trains a TSA model (or its dense twin) and scores it in soft and hard mode."""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric

from tsa_lightning.accounting import ComputeReport, summarize, tally
from tsa_lightning.baselines import build_model
from tsa_lightning.corpus import Codec
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import Mode, Routing, TSAConfig

MODES = ("soft", "hard")


class ComputeMetric(Metric):
    """Sums of `accounting.tally` over batches and ranks; `compute` gives the ComputeReport."""

    full_state_update = False

    def __init__(self, config: TSAConfig) -> None:
        super().__init__()
        self.config = config
        for name in ("keep_sum", "halt_count", "tokens", "flops", "dense_flops"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "executed_per_layer", torch.zeros(config.n_layer, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, routing: Routing, valid: Tensor | None = None) -> None:
        """`valid` (B, T): real positions; padding enters no count."""
        for name, value in tally(self.config, routing, valid).items():
            setattr(self, name, getattr(self, name) + value.to(self.device))

    def compute(self) -> ComputeReport:
        names = ("keep_sum", "halt_count", "tokens", "flops", "dense_flops", "executed_per_layer")
        return summarize(self.config, {name: getattr(self, name) for name in names})


class LossMetrics(torch.nn.Module):
    """Mean loss in nats per target, weighted by target count so every target counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.nats = MeanMetric()

    def update(self, loss: Tensor, targets: Tensor) -> None:
        self.nats.update(loss.detach(), weight=(targets != IGNORE_INDEX).sum())

    def compute(self) -> dict[str, Tensor]:
        nats = self.nats.compute()
        return {"loss": nats, "bpc": nats / math.log(2), "ppl": torch.exp(nats)}

    def reset(self) -> None:
        self.nats.reset()


class TSALanguageModel(L.LightningModule):
    """A character/byte language model whose tokens choose their own depth.

    `config` is the network (`TSAConfig`; a dict when read back from a checkpoint). Training args:
    AdamW (decay on matrices only), linear warmup then cosine decay to min_lr by step, and the
    variant's depth loss (TSA: the paper's `depth_loss_weight * mean(1 - p)`, which pushes routers
    towards skipping). `alphabet` (None: bytes) travels with the checkpoint so samples can be decoded.
    `compile` runs the training forward (dense, masked: no data-dependent shapes) through
    torch.compile; evaluation and the sparse hard mode stay eager.
    """

    def __init__(
        self,
        config: TSAConfig,
        depth_loss_weight: float = 0.0,
        learning_rate: float = 1e-3,
        min_learning_rate: float = 1e-4,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        alphabet: str | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.config = config if isinstance(config, TSAConfig) else TSAConfig(**config)
        # save_hyperparameters reads the argument by name: store plain types, loadable with weights_only
        config = asdict(self.config)
        self.save_hyperparameters()
        if alphabet is not None and len(alphabet) != self.config.vocab_size:
            raise ValueError(
                f"alphabet has {len(alphabet)} characters but vocab_size is {self.config.vocab_size}"
            )
        self.model = build_model(self.config)
        self.codec = Codec(alphabet)
        self.eval_loss = torch.nn.ModuleDict({mode: LossMetrics() for mode in MODES})
        self.eval_compute = ComputeMetric(self.config)
        self.compute_reports: dict[str, ComputeReport] = {}  # the last validation's and test's
        # a compiled function, not a module: the state dict keeps one copy of the weights
        self.train_forward = torch.compile(self.model.forward) if compile else self.model.forward

    @property
    def modes(self) -> tuple[str, ...]:
        return self.model.reported_modes

    def forward(self, idx: Tensor, mode: str = "soft") -> Tensor:
        return self.model(idx, mode=mode)[0]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        _, loss, routing = self.train_forward(x, y)
        total = loss if routing.aux_loss is None else loss + routing.aux_loss
        keep = self.model.depth_term(routing)
        if keep is not None:
            total = total + self.hparams.depth_loss_weight * keep
            self.log("train/keep", keep)
        if routing.halt_probs is not None:
            would_skip = self.model.skips(routing.halt_probs, self.config.skip_threshold).float().mean()
            self.log("train/skip", would_skip, prog_bar=True)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"training loss became {total.item()} at step {self.global_step}; stopped before it could "
                "reach a checkpoint (the last good one is kept). Lower learning_rate, raise warmup_steps or "
                "set trainer.gradient_clip_val, then resume with --ckpt_path last"
            )
        # averaged over ranks at each step, so the progress bar and the logs show the global batch
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/bpc", loss / math.log(2), prog_bar=True, sync_dist=True)
        self.log("train/ppl", torch.exp(loss), sync_dist=True)
        return {
            "loss": total,
            "halt_probs": None if routing.halt_probs is None else routing.halt_probs.detach(),
        }

    def _evaluate(self, batch: tuple[Tensor, Tensor]) -> dict[str, Routing]:
        x, y = batch
        routings = {}
        for mode in self.modes:
            _, loss, routings[mode] = self.model(x, y, mode=mode)
            self.eval_loss[mode].update(loss, y)
        routings.setdefault("hard", routings.get("soft"))
        # the paper's metric is soft (as published) where soft mode is causal; executed work is hard mode's
        soft = routings.get("soft", routings["hard"])
        self.eval_compute.update(Routing(soft.halt_probs, routings["hard"].executed), y != IGNORE_INDEX)
        return routings

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Routing]:
        return self._evaluate(batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Routing]:
        return self._evaluate(batch)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Hard mode on held-out windows: the greedy next token and how many blocks each token ran."""
        logits, _, routing = self.model(batch[0], mode="hard")
        return {"next_token": logits.argmax(dim=-1), "blocks_run": routing.executed.sum(dim=-1)}

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, stage: str) -> None:
        results = {mode: self.eval_loss[mode].compute() for mode in self.modes}
        results.setdefault("hard", results.get("soft"))  # the dense twin's hard mode is its soft mode
        for mode, values in results.items():
            for name, value in values.items():
                self.log(f"{stage}/{mode}/{name}", value, prog_bar=(name == "bpc"))
        for metric in self.eval_loss.values():
            metric.reset()
        report = self.compute_reports[stage] = self.eval_compute.compute()
        self.log(f"{stage}/tlops_saved_paper", report.paper_tlops_saved)
        self.log(f"{stage}/tlops_saved_executed", report.executed_tlops_saved, prog_bar=True)
        self.log(f"{stage}/flops_saved", report.flops_saved)
        self.eval_compute.reset()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one line, a checkpoint whose network differs from the one configured."""
        saved = TSAConfig(**checkpoint["hyper_parameters"]["config"])
        mismatched = [
            f"{key}={getattr(saved, key)!r} (this run: {getattr(self.config, key)!r})"
            for key in saved.mismatches(self.config)
        ]
        if mismatched:
            raise ValueError(
                "the checkpoint was trained with a different model: "
                + ", ".join(mismatched)
                + "; use the run's own config.yaml (and the same data) with this checkpoint"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint with NaN or infinite weights would overwrite the last good one: refuse it."""
        broken = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise FloatingPointError(
                f"weights became non-finite ({', '.join(broken[:3])}); checkpoint not written"
            )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.param_groups(hp.weight_decay), lr=hp.learning_rate, betas=hp.betas
        )
        total = self.trainer.max_steps
        if total is None or total < 0:
            raise ValueError("set trainer.max_steps: the learning-rate schedule decays by step")

        def lr_factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            floor = hp.min_learning_rate / hp.learning_rate
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        mode: Mode | None = None,
        threshold: float | None = None,
    ) -> str:
        """Continue `prompt` with the KV-cache decoder, by default in the mode the model was trained for."""
        idx = torch.tensor(self.codec.encode(prompt or "\n"), device=self.device)
        mode = mode or self.model.trained_mode
        out = generate_cached(self.model, [idx], max_new_tokens, temperature, top_k, threshold, mode)[0]
        return self.codec.decode(out[len(idx) :])


def upgrade_checkpoint(path: str) -> Path:
    """Write <stem>.upgraded.ckpt beside a checkpoint from before `model.config`, with its options nested."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    hparams["config"] = {f.name: hparams.pop(f.name) for f in fields(TSAConfig) if f.name in hparams}
    target = Path(path).with_suffix(".upgraded.ckpt")
    torch.save(checkpoint, target)
    return target
