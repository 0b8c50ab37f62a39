"""TensorBoard views of routing that scalars cannot show: halting histograms and a depth map of real text.

The scalars (losses, work saved, each block's executed share) are logged by the module through
`self.log`. These callbacks are registered by the CLI, so every run has them. Statistics are
reduced over DDP ranks before rank 0 writes them (the TensorBoard experiment is a no-op elsewhere).
A router is named by the block it gates, as the executed shares are.
"""

from __future__ import annotations

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from tsa_lightning.accounting import gated_blocks
from tsa_lightning.model import Routing, TSAConfig


def _tensorboard(trainer: L.Trainer):
    """The TensorBoard SummaryWriter, or None when the run logs elsewhere."""
    for logger in trainer.loggers:
        if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
            return logger.experiment
    return None


class HaltingHistograms(L.Callback):
    """Per router, the distribution of halting probabilities p: every N training steps and per validation.

    Tagged `halting/<stage>/block_<l>` by the block l the router gates (it reads the state after block l - 1).
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

    def _write(self, trainer: L.Trainer, config: TSAConfig, stats: Tensor, stage: str) -> None:
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        writer = _tensorboard(trainer)
        if writer is None or trainer.global_rank != 0:
            return
        edges = torch.linspace(0, 1, self.bins + 1)
        for block, row in zip(gated_blocks(config), stats.cpu(), strict=True):
            counts, (num, total, squares) = row[: self.bins], row[self.bins :].tolist()
            filled = counts.nonzero().flatten()  # min and max to the resolution of the bins
            writer.add_histogram_raw(
                f"halting/{stage}/block_{block}",
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
            self._write(trainer, pl_module.config, self._stats(halts), "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        halts = outputs["hard"].halt_probs
        if halts is not None:
            stats = self._stats(halts)
            self._val = stats if self._val is None else self._val + stats

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._val is not None and not trainer.sanity_checking:
            self._write(trainer, pl_module.config, self._val, "val")
        self._val = None


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
