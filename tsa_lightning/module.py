"""The LightningModule: trains a TSA model (or its dense twin) and scores it in soft and hard mode."""

from __future__ import annotations

import math
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
from torch import Tensor

from tsa_lightning import names
from tsa_lightning.accounting import ComputeReport, report
from tsa_lightning.baselines import build_model
from tsa_lightning.budget import budgets_for
from tsa_lightning.compatibility import check_checkpoint
from tsa_lightning.corpus import Codec
from tsa_lightning.data import IGNORE_INDEX
from tsa_lightning.elastic import GridScores, full_depth_kl
from tsa_lightning.errors import ConfigError, check_finite_loss, check_finite_weights, check_range
from tsa_lightning.inference import check_sampling, generate_cached
from tsa_lightning.metrics import ComputeMetric, compute_logged, loss_metrics
from tsa_lightning.model import MODES, Mode, Routing, TSAConfig, TSATransformer
from tsa_lightning.optimisation import adamw_warmup_cosine, check_optimisation
from tsa_lightning.retrofit import check_teacher, distillation_kl, load_dense_trunk
from tsa_lightning.runs import log_at_step


class TSALanguageModel(L.LightningModule):
    """A character/byte language model whose tokens choose their own depth.

    Optimisation is AdamW (decay on matrices only) with linear warmup, then cosine decay to
    `min_learning_rate` by the last step. Compute budgets (TSA): `Budgets` (budget.py) sets the
    skip thresholds that hold one budget or a whole range of them (elastic depth);
    `skip_threshold` is the one evaluation and sampling use, and `config.skip_threshold` is never
    rewritten.

    Args:
        config: the network (`TSAConfig`; a dict when read back from a checkpoint).
        depth_loss_weight: weight of the paper's depth term `mean(1 - p)`, which pushes routers
            towards skipping (0: none, as published).
        learning_rate: peak learning rate, reached after `warmup_steps`.
        min_learning_rate: learning rate at the last step.
        warmup_steps: steps of linear warmup.
        weight_decay: AdamW weight decay of the weight matrices.
        betas: AdamW betas.
        alphabet: the corpus's characters (set from the data; None: bytes); travels with the
            checkpoint so that samples can be decoded.
        compile: run the training forward through torch.compile (evaluation and the sparse hard
            mode stay eager).
        compute_budget: share of the routed token-blocks (blocks 1..L-1) that hard mode should run,
            in (0, 1]; needs the unit or straight-through gate. None: no budget. With
            elastic_budgets: the budget that evaluation and sampling use unless asked for another
            (default: the highest).
        elastic_budgets: [lowest, highest] budget: train one network for every budget in the range
            (elastic depth; needs the unit or straight-through gate), trained every 0.05 and
            calibrated every 0.01 of budget. None: one budget, or none.
        elastic_top_share: share of each batch's rows that train at the highest elastic budget; the
            others take the grid's budgets in turn (0: every budget alike).
        elastic_shrink_steps: [start, end] steps of progressive shrinking: before `start` every row
            trains the highest budget (the dense network, under the unit gate), then the lowest
            budget the rows take falls linearly to the range's by `end`. None: the whole range
            from the first step.
        budget_momentum: share of the way (in log-odds) the training threshold moves towards each
            batch's budget-quantile of the router logits.
        init_from: a dense checkpoint (routing "none") of the same trunk to start from (retrofitting);
            the routers are new.
        distill_weight: weight of the KL divergence from a teacher's next-token distribution to this
            model's: an elastic model's own prediction at full depth of the same text, for every row
            trained below it (in-place distillation), else the `init_from` model (0: none).
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
        compute_budget: float | None = None,
        elastic_budgets: list[float] | None = None,
        elastic_top_share: float = 0.0,
        elastic_shrink_steps: list[int] | None = None,
        budget_momentum: float = 0.1,
        init_from: str | None = None,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = config if isinstance(config, TSAConfig) else TSAConfig(**config)
        # save_hyperparameters reads the argument by name: store plain types, loadable with weights_only
        config = asdict(self.config)
        self.save_hyperparameters()
        check_optimisation(learning_rate, min_learning_rate, warmup_steps, weight_decay, betas)
        check_range("model.depth_loss_weight", depth_loss_weight, 0)
        check_range("model.distill_weight", distill_weight, 0)
        self.codec = Codec(alphabet)
        self.codec.check_fits(self.config.vocab_size)
        self.model = build_model(self.config)
        elastic = elastic_budgets, elastic_top_share, elastic_shrink_steps
        self.budget = budgets_for(self.model, compute_budget, *elastic, budget_momentum, depth_loss_weight)
        check_teacher(distill_weight, init_from, elastic_budgets)
        # one window: Lightning's model summary counts a forward's FLOPs on it
        self.example_input_array = torch.zeros(1, self.config.block_size, dtype=torch.long)
        self.teacher: TSATransformer | None = None  # set by `setup` when distilling
        self.trained_steps = 0  # a loaded checkpoint's step
        self.eval_loss = loss_metrics()
        self.eval_compute = torch.nn.ModuleDict({stage: ComputeMetric(self.config) for stage in names.STAGES})
        # an elastic model's validation scores every budget of its grid
        self.grid_scores = GridScores(self.config, self.budget.budgets if self.elastic_range else [])
        # a compiled function, not a module: the state dict keeps one copy of the weights
        self.train_forward = torch.compile(self.model.forward) if compile else self.model.forward

    def forward(self, idx: Tensor, mode: str = "soft") -> Tensor:
        return self.model(idx, mode=mode)[0]

    def setup(self, stage: str) -> None:
        """Retrofit: the dense trunk's weights before the first step (a resumed run then restores its own)."""
        if stage == "fit" and self.hparams.elastic_shrink_steps is not None:
            self.budget.check_schedule(self.trainer.max_steps)
        if stage != "fit" or self.hparams.init_from is None:
            return
        dense = load_dense_trunk(self.hparams.init_from, self.config)
        self.model.load_state_dict(dense.state_dict(), strict=False)
        if self.hparams.distill_weight and not self.elastic_range:  # elastic: its own full depth teaches
            # a plain attribute, not a submodule: never trained, never in this model's checkpoints
            object.__setattr__(self, "teacher", dense.to(self.device).eval().requires_grad_(False))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        threshold = self.train_threshold(len(x))  # this step's: the budget moves it after the forward
        logits, loss, routing = self.train_forward(x, y, threshold=threshold)
        total = loss if routing.aux_loss is None else loss + routing.aux_loss
        keep = self.model.depth_term(routing)
        if keep is not None:
            total = total + self.hparams.depth_loss_weight * keep
        if self.budget is not None:
            self.log_dict(self.follow_budget(routing, threshold))
        if self.hparams.distill_weight:
            kl = self.distillation(x, logits, threshold)
            total = total + self.hparams.distill_weight * kl
            self.log("train/distill_kl", kl)
        if routing.halt_probs is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            halts = routing.halt_logits.detach()
            # what hard mode would run on this batch, under the names validation uses
            executed = self.model.hard_executed(halts, threshold)
            self._log_compute("train", report(self.config, Routing(routing.halt_probs.detach(), executed)))
        check_finite_loss(total.detach(), self.global_step)
        # averaged over ranks at each step, so the progress bar and the logs show the global batch
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/bpc", loss / math.log(2), prog_bar=True, sync_dist=True)
        self.log("train/ppl", torch.exp(loss), sync_dist=True)
        return {
            "loss": total,
            "halt_probs": None if routing.halt_probs is None else routing.halt_probs.detach(),
        }

    def distillation(self, x: Tensor, logits: Tensor, threshold: float | Tensor) -> Tensor:
        """KL from the teacher's next-token distribution: the `init_from` model's, or (elastic) this
        network's own at full depth."""
        if self.teacher is None:
            return full_depth_kl(self.model, x, logits, threshold)
        with torch.no_grad():
            teacher_logits = self.teacher(x)[0]
        return distillation_kl(teacher_logits, logits)

    def train_threshold(self, batch_size: int) -> float | Tensor:
        """The gate's threshold in training: one per row (log-odds) for the budget the row trains
        this step, else the configured one."""
        if self.budget is None:
            return self.config.skip_threshold
        return self.budget.row_thresholds(
            batch_size, self.global_step, self.global_rank, self.trainer.world_size
        )

    @property
    def skip_threshold(self) -> float | Tensor:
        """Hard mode's threshold in evaluation and sampling: the budget's (log-odds), else the configured."""
        return self.budget.threshold if self.budget is not None else self.config.skip_threshold

    def follow_budget(self, routing: Routing, threshold: Tensor) -> dict[str, float | Tensor]:
        """Move each budget's threshold towards its quantile of the global batch's router logits (the
        same on every rank); returns what to log: the mean budget the batch trained, the share it
        ran and the thresholds it ran at (as probabilities, means over the rows)."""
        mean = partial(self.trainer.strategy.reduce, reduce_op="mean")
        trained = self.budget.follow(self.all_gather(routing.halt_logits.detach()), self.global_step)
        return {
            "train/budget": trained,
            "train/executed_share": mean(self.model.executed_share(routing, threshold).detach()),
            "train/skip_threshold": mean(torch.sigmoid(threshold.double()).mean()),
        }

    def threshold_at(self, budget: float | None) -> float | Tensor:
        """Hard mode's threshold for a budget (None: the model's own), from an elastic model's table."""
        if budget is None:
            return self.skip_threshold
        if not self.elastic_range:
            raise ConfigError(
                "a budget can be chosen only for a model trained with elastic_budgets; this one runs "
                + ("at its trained budget" if self.budget is not None else "at a skip threshold")
                + ": choose a threshold instead (evaluate sweeps them), or train with --model.elastic_budgets"
            )
        return self.budget.threshold_at(budget)

    def reported_passes(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Routing]]:
        """Each mode the model reports, at its own threshold: an evaluation's first passes."""
        losses, routings = {}, {}
        for mode in self.model.reported_modes:
            _, losses[mode], routings[mode] = self.model(x, y, mode=mode, threshold=self.skip_threshold)
        return losses, routings

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, batch_idx: int = 0) -> dict[str, Routing]:
        x, y = batch
        losses, routings = self.reported_passes(x, y)
        for mode in MODES:
            loss = losses.get(mode, losses.get("soft"))  # the dense twin's hard mode is its soft mode
            if loss is None:
                continue  # a mode the variant does not report (MoD's soft mode sees the future)
            metrics = self.eval_loss[f"{stage}_{mode}"]
            metrics.update(loss, y)
            for name, metric in metrics.items():
                self.log(name, metric, prog_bar=name.endswith("/bpc"))
        routings.setdefault("hard", routings.get("soft"))
        valid = y != IGNORE_INDEX
        if stage == "val" and self.budget is not None:
            thorough = self.trainer.state.fn != "fit" or self.global_step >= self.trainer.max_steps
            if thorough or self.elastic_range:  # hard-mode passes that calibrate (and score a grid)
                layout = {"batches": self.trainer.num_val_batches[0], "world_size": self.trainer.world_size}
                self.grid_scores.update(
                    self.model, self.budget, batch, batch_idx, thorough, rank=self.global_rank, **layout
                )
            else:  # one budget while training: the pass above, at training's threshold
                self.budget.observe(routings["hard"].halt_logits, valid)
        # the paper's metric is soft (as published) where soft mode is causal; executed work is hard mode's
        soft = routings.get("soft", routings["hard"])
        self.eval_compute[stage].update(Routing(soft.halt_probs, routings["hard"].executed), valid)
        return routings

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Routing]:
        return self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Routing]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Hard mode on held-out windows: the greedy next token and how many blocks each token ran."""
        logits, _, routing = self.model(batch[0], mode="hard", threshold=self.skip_threshold)
        return {"next_token": logits.argmax(dim=-1), "blocks_run": routing.executed.sum(dim=-1)}

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")
        if self.elastic_range:
            self.log_dict(self.grid_scores.logged(self.model.gated_blocks()), sync_dist=True)
        if self.budget is None:
            return
        if self.trainer.sanity_checking:  # an untrained model's quantile would outlive its check
            self.budget.reset()
            return
        self.log_dict(names.calibrated(self.budget.budgets, self.budget.calibrate()), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, stage: str) -> None:
        """The compute report of the whole split, all ranks summed (Lightning handles the loss metrics)."""
        metric = self.eval_compute[stage]
        fitting = self.trainer.state.fn == "fit"  # the HParams table's step column: steps trained
        step = float(self.global_step if fitting else self.trained_steps)
        self.log(names.of_split(stage, "step"), step, sync_dist=True)  # the same on every rank, as all below
        self._log_compute(stage, metric.compute())
        metric.reset()

    def _log_compute(self, stage: str, report: ComputeReport) -> None:
        """The same names at every stage: work saved (executed, FLOPs, the paper's) and each block's share.

        Training values are one batch's, averaged over ranks; evaluation values are already summed
        over the split and all ranks, so averaging them again changes nothing.
        """
        self.log(names.of_split(stage), report.executed_tlops_saved, prog_bar=True, sync_dist=True)
        self.log_dict(compute_logged(stage, report), sync_dist=True)

    def on_validation_start(self) -> None:
        """`validate` and `test` of a checkpoint log at the step it was trained to, not at 0."""
        if self.trainer.state.fn != "fit":
            log_at_step(self.trainer, self.trained_steps)

    on_test_start = on_validation_start

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one line, a checkpoint whose network differs from the one configured."""
        self.trained_steps = int(checkpoint.get("global_step", 0))
        check_checkpoint(checkpoint, self.config, self.codec, self.budget is not None, self.elastic_range)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint with NaN or infinite weights would overwrite the last good one: refuse it. The
        network's config is kept apart from the hyperparameters, which loading may override."""
        check_finite_weights(self.named_parameters())
        checkpoint["network"] = asdict(self.config)
        checkpoint["elastic_budgets"] = self.elastic_range  # the table's grid, which loading may not change

    @property
    def elastic_range(self) -> list[float] | None:
        """The range of budgets an elastic model was trained for."""
        return None if self.budget is None else self.budget.elastic_range

    def configure_optimizers(self):
        hp = self.hparams
        schedule = hp.learning_rate, hp.min_learning_rate, hp.warmup_steps, hp.weight_decay, hp.betas
        return adamw_warmup_cosine(self.model, *schedule, self.trainer.max_steps)

    @torch.no_grad()
    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        mode: Mode | None = None,
        threshold: float | None = None,
        compile: bool = False,
        budget: float | None = None,
    ) -> str:
        """Continue `prompt` with the KV-cache decoder, by default in the mode the model was trained for.

        `budget` (an elastic model): run at that budget's threshold (or give `threshold`)."""
        check_sampling(max_new_tokens, temperature, top_k, threshold, budget)
        idx = torch.tensor(self.codec.encode(prompt or "\n"), device=self.device)
        mode = mode or self.model.trained_mode
        threshold = self.threshold_at(budget) if threshold is None else threshold
        out = generate_cached(self.model, [idx], max_new_tokens, temperature, top_k, threshold, mode, compile)
        return self.codec.decode(out[0][len(idx) :])
