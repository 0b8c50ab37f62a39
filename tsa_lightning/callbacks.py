"""TensorBoard views of routing: halting histograms, per-layer TLOps, and a depth map of real text.

All three are registered by the CLI, so every run has them. Statistics are reduced over DDP ranks
before rank 0 writes them (the TensorBoard experiment is a no-op elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from tsa_lightning.model import Routing


def _tensorboard(trainer: L.Trainer):
    """The TensorBoard SummaryWriter, or None when the run logs elsewhere."""
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            return logger.experiment
    return None


class HaltingHistograms(L.Callback):
    """Per router, the distribution of halting probabilities p: every N training steps and per validation.

    Counts go into fixed bins so that ranks can be summed with one all-reduce of equal shapes.
    """

    def __init__(self, every_n_steps: int = 100, bins: int = 50) -> None:
        self.every_n_steps, self.bins = every_n_steps, bins
        self._val: Tensor | None = None

    def _stats(self, halt_probs: Tensor) -> Tensor:
        """Per router: bin counts, then count, sum and sum of squares (for TensorBoard's summary)."""
        p = halt_probs.detach().float().flatten(0, -2).T  # (routers, values)
        counts = torch.stack([torch.histc(row, bins=self.bins, min=0.0, max=1.0) for row in p])
        extra = torch.stack([p.new_full((p.size(0),), p.size(1)), p.sum(1), (p * p).sum(1)], dim=1)
        return torch.cat([counts, extra], dim=1).double()

    def _write(self, trainer: L.Trainer, stats: Tensor, stage: str) -> None:
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        writer = _tensorboard(trainer)
        if writer is None or trainer.global_rank != 0:
            return
        edges = torch.linspace(0, 1, self.bins + 1)
        for i, row in enumerate(stats.cpu()):
            counts, (num, total, squares) = row[: self.bins], row[self.bins :].tolist()
            filled = counts.nonzero().flatten()  # min and max to the resolution of the bins
            writer.add_histogram_raw(
                f"halting/{stage}/router_{i}",
                min=edges[filled[0]].item(),
                max=edges[filled[-1] + 1].item(),
                num=int(num),
                sum=total,
                sum_squares=squares,
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=trainer.global_step,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        halts = outputs.get("halt_probs") if isinstance(outputs, dict) else None
        if halts is not None and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, self._stats(halts), "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        halts = outputs["hard"].halt_probs
        if halts is not None:
            stats = self._stats(halts)
            self._val = stats if self._val is None else self._val + stats

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._val is not None and not trainer.sanity_checking:
            self._write(trainer, self._val, "val")
        self._val = None


class TLOpsMonitor(L.Callback):
    """Per-layer executed fractions and the saved fractions (paper's soft and executed) as scalars.

    At validation and test the model's ComputeMetric already holds the exact, all-rank report;
    during training (soft mode) the monitor logs what hard mode would skip on the current batch.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        halts = outputs.get("halt_probs") if isinstance(outputs, dict) else None
        if halts is None or trainer.global_step % self.every_n_steps:
            return
        executed = ~pl_module.model.skips(halts, pl_module.config.skip_threshold)
        per_layer = trainer.strategy.reduce(executed.float().mean(dim=(0, 1)), reduce_op="mean")
        metrics = {f"tlops/train/executed_layer_{i + 1}": v for i, v in enumerate(per_layer.tolist())}
        metrics["tlops/train/would_save_executed"] = (
            1 - (1 + per_layer.sum().item()) / pl_module.config.n_layer
        )
        self._log(trainer, metrics)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log_report(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._log_report(trainer, pl_module, "test")

    def _log_report(self, trainer, pl_module, stage: str) -> None:
        report = pl_module.compute_reports.get(stage)
        if report is None:
            return
        metrics = {f"tlops/{stage}/executed_layer_{i}": v for i, v in enumerate(report.executed_per_layer)}
        metrics[f"tlops/{stage}/saved_paper"] = report.paper_tlops_saved
        metrics[f"tlops/{stage}/saved_executed"] = report.executed_tlops_saved
        metrics[f"tlops/{stage}/flops_saved"] = report.flops_saved
        metrics[f"tlops/{stage}/paper_alpha"] = report.paper_alpha
        self._log(trainer, metrics)

    @staticmethod
    @rank_zero_only
    def _log(trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class DepthMap(L.Callback):
    """A fixed validation snippet, each character coloured by the number of blocks it ran in hard mode."""

    def __init__(self, n_chars: int = 512, columns: int = 64) -> None:
        self.n_chars, self.columns = n_chars, columns

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        splits = getattr(trainer.datamodule, "splits", {})
        if writer is None or trainer.sanity_checking or "val" not in splits:
            return
        snippet = torch.from_numpy(splits["val"][: self.n_chars].astype("int64")).to(pl_module.device)
        depths = self.depths(pl_module, snippet)
        glyphs = [pl_module.codec.decode([token]) for token in snippet.tolist()]
        figure = self.render(glyphs, depths, pl_module.config.n_layer)
        writer.add_figure("depth_map/val", figure, global_step=trainer.global_step)
        plt.close(figure)

    @staticmethod
    @torch.no_grad()
    def depths(pl_module, snippet: Tensor) -> list[int]:
        """Blocks each token ran in hard mode, reading the snippet in windows of block_size."""
        was_training = pl_module.training
        pl_module.eval()
        depths = []
        for window in snippet.split(pl_module.config.block_size):
            routing: Routing = pl_module.model(window[None], mode="hard")[2]
            depths += routing.executed[0].sum(-1).tolist()
        pl_module.train(was_training)
        return depths

    def render(self, glyphs: list[str], depths: list[int], n_layer: int):
        rows = (len(depths) + self.columns - 1) // self.columns
        figure, ax = plt.subplots(figsize=(self.columns * 0.16 + 1.5, rows * 0.28 + 0.8))
        cmap = plt.get_cmap("viridis", n_layer)
        for i, (char, depth) in enumerate(zip(glyphs, depths, strict=True)):
            row, col = divmod(i, self.columns)
            ax.add_patch(plt.Rectangle((col, -row - 1), 1, 1, color=cmap(depth - 1)))
            glyph = "⏎" if char == "\n" else char
            ax.text(col + 0.5, -row - 0.5, glyph, ha="center", va="center", fontsize=7, family="monospace")
        ax.set_xlim(0, self.columns)
        ax.set_ylim(-rows, 0)
        ax.axis("off")
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0.5, n_layer + 0.5))
        bar = figure.colorbar(mappable, ax=ax, ticks=range(1, n_layer + 1), fraction=0.03, pad=0.01)
        bar.set_label("blocks run")
        ax.set_title(
            f"blocks run per character (hard mode, mean {sum(depths) / len(depths):.2f} of {n_layer})"
        )
        return figure


class PredictionWriter(BasePredictionWriter):
    """`predict`'s output as JSON lines in the run folder: per window, its text, the greedy next
    character at every position, and how many blocks each token ran in hard mode."""

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.filename = filename

    def path(self, trainer: L.Trainer) -> Path:
        name = self.filename if trainer.world_size == 1 else f"rank{trainer.global_rank}_{self.filename}"
        return Path(trainer.log_dir or ".") / name

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self.path(trainer)
        if path.exists():
            raise FileExistsError(f"{path} exists; predict writes a new file (choose another run version)")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        windows = batch_indices or range(len(batch[0]))
        with open(self.path(trainer), "a") as f:
            for window, x, next_token, blocks_run in zip(
                windows, batch[0], prediction["next_token"], prediction["blocks_run"], strict=True
            ):
                line = {
                    "window": int(window),
                    "text": pl_module.codec.decode(x),
                    "next": pl_module.codec.decode(next_token),
                    "blocks_run": blocks_run.tolist(),
                }
                f.write(json.dumps(line) + "\n")
