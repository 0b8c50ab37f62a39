"""TensorBoard views that scalars alone cannot give: charts, the HParams table, histograms, a depth map.

The scalars (losses, work saved, each block's executed share) are logged by the module through
`self.log`. These callbacks are registered by the CLI, so every run has them. Statistics are
reduced over DDP ranks before rank 0 writes them (the TensorBoard experiment is a no-op elsewhere).
A router is named by the block it gates, as the executed shares are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from tsa_lightning import names
from tsa_lightning.budget import probability
from tsa_lightning.evaluation import curve_figure
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import TSAConfig, skip_logit
from tsa_lightning.runs import logged_step


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger without its `epoch` chart: a run here is counted in steps, and
    the chart would head two tabs."""

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({name: value for name, value in metrics.items() if name != "epoch"}, step)


def _tensorboard(trainer: L.Trainer):
    """The TensorBoard SummaryWriter, or None when the run logs elsewhere."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


SAVED_TITLES = {  # names.SAVED, as chart titles say them
    "tlops_saved_executed": "executed TLOps saved",
    "flops_saved": "executed FLOPs saved (routers counted)",
    "tlops_saved_paper": "paper TLOps saved (its soft formula)",
}


def layout(n_layer: int, budgets: list[float] | None = None) -> dict:
    """Custom Scalars charts, each holding one quantity of one stage: TensorBoard colours a chart's
    series by run and tells a run's tags apart only by marker, so a chart with one tag per run reads
    without hovering, and runs (a training run, its validate and test runs) get their own colours.
    Tags are regular expressions matched from the tag's start. Every block's executed share has
    its own chart; an elastic model's `budgets` add one chart of validation bpc per budget."""
    stages = {"train": "train", "val / test": "(val|test)"}
    saved = {
        f"{title}, {stage}": ["Multiline", [rf"{pattern}/{name}$"]]
        for name, title in SAVED_TITLES.items()
        for stage, pattern in stages.items()
    }
    quality = {
        "bits per character, train": ["Multiline", [r"train/bpc$"]],
        "bits per character, hard mode, val / test": ["Multiline", [r"(val|test)/hard/bpc$"]],
        "bits per character, soft mode, val / test": ["Multiline", [r"(val|test)/soft/bpc$"]],
    }
    for budget in budgets or []:
        quality[f"bits per token at budget {budget:g}, val"] = [
            "Multiline",
            [re.escape(names.at_budget(budget, "bpc")) + "$"],
        ]
    return {
        "compute saved": saved,
        "quality": quality,
        **{
            f"each block, {stage} (executed share)": {
                f"block {l}, {stage}": ["Multiline", [rf"executed/{pattern}/block_{l}$"]]
                for l in range(n_layer)
            }
            for stage, pattern in stages.items()
        },
    }


def operating_point(pl_module) -> tuple[float | Tensor, str]:
    """The threshold that depth maps and samples run at, and how to name it: an elastic model's
    budget asked for (`validate --model.compute_budget`), else its lowest (its highest skips
    nothing); else the model's own threshold."""
    if pl_module.elastic_range:
        low, high = pl_module.elastic_range
        shown = pl_module.budget.budget if pl_module.budget.budget < high else low
        threshold = pl_module.threshold_at(shown)
        return threshold, f"budget {shown:g} (threshold {probability(threshold):.3g})"
    threshold = pl_module.skip_threshold
    return threshold, f"threshold {probability(skip_logit(threshold)):.3g}"


# the HParams table's columns: the step reached, final hard-mode quality and compute, of validation and test
HPARAM_METRICS = tuple(
    name
    for stage in names.STAGES
    for name in (
        names.of_split(stage, "step"),
        names.loss(stage, "hard"),
        *(names.of_split(stage, s) for s in names.SAVED),
    )
)
# what tells runs apart leads the HParams table (TensorBoard shows the first five at first): the command
# that made the run (fit; validate or test of a checkpoint, whose names the table cuts to the training
# run's), then the options that tell variants apart, an elastic run's range among them
HPARAM_LEAD = ("command", "routing", "gate", "compute_budget", "elastic_budgets")


class Dashboard(L.Callback):
    """Arranges the logged scalars in TensorBoard, once per run.

    Custom Scalars: one chart per quantity and stage (`layout`): the work saved three ways, bpc, and
    each block's executed share.
    HParams: the model's hyperparameters beside its final hard-mode quality and compute. The
    experiment names its metrics by the tags the module logs, so the table reads their latest
    values (even of an interrupted run); every run names the same metrics, because TensorBoard
    takes the columns from the first run it finds.
    """

    def __init__(self) -> None:
        self._written: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _tensorboard(trainer)
        if writer is None or writer.log_dir in self._written:
            return
        self._written.add(writer.log_dir)
        shown = pl_module.budget.shown() if pl_module.elastic_range else None
        writer.add_custom_scalars(layout(pl_module.config.n_layer, shown))
        # TensorBoard takes numbers, strings and booleans; the alphabet is the corpus's, not a choice,
        # and names with an underscore are LightningCLI's own
        flat: dict = {"command": trainer.state.fn.value}
        for name, value in pl_module.hparams.items():
            flat.update(value if isinstance(value, dict) else {name: value})  # model.config's fields by name
        order = sorted(flat, key=lambda name: (name not in HPARAM_LEAD, name))
        params = {
            name: flat[name] if isinstance(flat[name], bool | int | float | str) else str(flat[name])
            for name in order
            if name != "alphabet" and not name.startswith("_")
        }
        # only the metric names are written; their values are the scalars the module logs
        experiment, *session = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (lead_with_variant_options(experiment), *session):
            writer.file_writer.add_summary(summary)


def lead_with_variant_options(experiment):
    """TensorBoard lists hyperparameters alphabetically, those marked as differing between runs
    first: mark the ones that tell variants apart."""
    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in HPARAM_LEAD
    value.metadata.plugin_data.content = data.SerializeToString()
    return experiment


class HaltingHistograms(L.Callback):
    """Per router, the distribution of halting probabilities p: every N training steps and per validation.

    Tagged `halting/<stage>/block_<l>` by the block l the router gates (it reads the state after block l - 1).
    Counts go into fixed bins so that ranks can be summed with one all-reduce of equal shapes.

    Args:
        every_n_steps: training steps between two histograms of the training batch.
        bins: bins over [0, 1] of each histogram.
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

    def _write(self, trainer: L.Trainer, blocks: list[int], stats: Tensor, stage: str) -> None:
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        writer = _tensorboard(trainer)
        if writer is None or trainer.global_rank != 0:
            return
        edges = torch.linspace(0, 1, self.bins + 1)
        for block, row in zip(blocks, stats.cpu(), strict=True):
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
                global_step=trainer.global_step if stage == "train" else logged_step(trainer),
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        halts = outputs.get("halt_probs") if isinstance(outputs, dict) else None
        if halts is not None and trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module.model.gated_blocks(), self._stats(halts), "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        halts = outputs["hard"].halt_probs
        if halts is not None:
            stats = self._stats(halts)
            self._val = stats if self._val is None else self._val + stats

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._val is not None and not trainer.sanity_checking:
            self._write(trainer, pl_module.model.gated_blocks(), self._val, "val")
        self._val = None


@contextmanager
def _evaluating(pl_module: L.LightningModule) -> Iterator[None]:
    """Eval mode without gradients, the module's own mode restored afterwards."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        pl_module.train(was_training)


def blocks_run(pl_module, tokens: Tensor, threshold: float | Tensor) -> list[int]:
    """Blocks each token runs in hard mode, reading the tokens (T,) in windows of block_size."""
    depths = []
    with _evaluating(pl_module):
        for window in tokens.split(pl_module.config.block_size):
            _, _, routing = pl_module.model(window[None], mode="hard", threshold=threshold)
            depths += routing.executed[0].sum(-1).tolist()
    return depths


def visible(char: str) -> str:
    """One printable cell per token, so that glyphs and their annotations stay aligned."""
    return "¶" if char == "\n" else char if char.isprintable() else "·"


def _validation_tokens(trainer: L.Trainer, pl_module, n: int) -> Tensor | None:
    """The first n tokens of the validation split: the same text at every validation."""
    splits = getattr(trainer.datamodule, "splits", {})
    if "val" not in splits:
        return None
    return torch.from_numpy(splits["val"][:n].astype("int64")).to(pl_module.device)


GLYPH = {"fontsize": 8, "family": "monospace"}


class DepthMap(L.Callback):
    """A fixed validation snippet, each character coloured by the number of blocks it ran in hard mode.

    Sized to be read whole in TensorBoard's default image card (about 500 px wide); each glyph is
    black or white by the brightness of its cell, so the shallow, dark cells stay legible.

    Args:
        n_chars: characters of the snippet.
        columns: characters per line of the image.
    """

    def __init__(self, n_chars: int = 256, columns: int = 32) -> None:
        self.n_chars, self.columns = n_chars, columns

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        snippet = _validation_tokens(trainer, pl_module, self.n_chars)
        if writer is None or trainer.sanity_checking or snippet is None:
            return
        glyphs = [visible(pl_module.codec.decode([token])) for token in snippet.tolist()]
        threshold, label = operating_point(pl_module)
        figure = self.render(glyphs, blocks_run(pl_module, snippet, threshold), pl_module.config, label)
        writer.add_figure("depth_map/val", figure, global_step=logged_step(trainer))
        plt.close(figure)

    def render(self, glyphs: list[str], depths: list[int], config: TSAConfig, label: str):
        rows = (len(depths) + self.columns - 1) // self.columns
        cell = 0.14  # inches per character (14 px at TensorBoard's 100 dpi)
        figure, ax = plt.subplots(
            figsize=(self.columns * cell + 1.1, rows * cell * 1.35 + 0.7), dpi=100, layout="constrained"
        )
        cmap = plt.get_cmap("viridis", config.n_layer)
        for i, (char, depth) in enumerate(zip(glyphs, depths, strict=True)):
            row, col = divmod(i, self.columns)
            r, g, b, _ = cmap(depth - 1)
            ax.add_patch(plt.Rectangle((col, -row - 1), 1, 1, color=(r, g, b)))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(col + 0.5, -row - 0.5, char, ha="center", va="center", color=ink, **GLYPH)
        ax.set_xlim(0, self.columns)
        ax.set_ylim(-rows, 0)
        ax.axis("off")
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0.5, config.n_layer + 0.5))
        bar = figure.colorbar(mappable, ax=ax, ticks=range(1, config.n_layer + 1), fraction=0.05, pad=0.02)
        bar.set_label("blocks run")
        ax.set_title(
            f"hard mode, {label}: mean {sum(depths) / len(depths):.2f} of {config.n_layer} blocks run",
            fontsize=9,
        )
        return figure


class BudgetCurve(L.Callback):
    """An elastic model's validation bpc against executed FLOPs, one point per grid budget, drawn at
    each validation: every operating point of the one network, as it trains."""

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        writer = _tensorboard(trainer)
        if writer is None or trainer.sanity_checking or not pl_module.elastic_range:
            return
        metrics = trainer.callback_metrics
        budgets = [b for b in pl_module.budget.budgets if names.at_budget(b, "bpc") in metrics]
        points = [
            {
                "budget": b,
                "bpc": float(metrics[names.at_budget(b, "bpc")]),
                "flops_saved": float(metrics[names.at_budget(b, "flops_saved")]),
            }
            for b in budgets
        ]
        step = logged_step(trainer)
        title = f"every budget, validation at step {step}"
        figure = curve_figure({"elastic": points}, title=title, unit=pl_module.codec.unit)
        writer.add_figure("budgets/val", figure, global_step=step)
        plt.close(figure)


class HardSample(L.Callback):
    """At each validation, a short greedy sample in hard mode as text, each character over the blocks it ran.

    The prompt is the start of the validation split. Decoding uses the KV cache (`generate_cached`);
    the blocks of each character are those of a hard forward over the whole sample, which the
    cached decoder reproduces (tests/test_inference.py). Greedy decoding draws no random numbers,
    so the sample leaves training unchanged.

    Args:
        prompt_chars: characters of the prompt.
        new_chars: characters to generate.
        columns: characters per line of the image.
    """

    DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # one character per count, up to 35 blocks

    def __init__(self, prompt_chars: int = 16, new_chars: int = 48, columns: int = 64) -> None:
        self.prompt_chars, self.new_chars, self.columns = prompt_chars, new_chars, columns

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        config = pl_module.config
        n_prompt = min(self.prompt_chars, config.block_size // 2)
        writer = _tensorboard(trainer)
        prompt = _validation_tokens(trainer, pl_module, n_prompt)
        if writer is None or trainer.sanity_checking or prompt is None:
            return
        threshold, label = operating_point(pl_module)
        with _evaluating(pl_module):
            new = min(self.new_chars, config.block_size - n_prompt)
            tokens = generate_cached(
                pl_module.model, [prompt], new, temperature=0, threshold=threshold, mode="hard"
            )[0]
        glyphs = [visible(pl_module.codec.decode([token])) for token in tokens.tolist()]
        text = self.markdown(glyphs, blocks_run(pl_module, tokens, threshold), n_prompt, config, label)
        writer.add_text("sample/val", text, global_step=logged_step(trainer))

    def markdown(
        self, glyphs: list[str], depths: list[int], n_prompt: int, config: TSAConfig, label: str
    ) -> str:
        """The sample in rows of `columns` characters, each row over a row of digits: blocks run."""
        digits = "".join(self.DIGITS[d] if d < len(self.DIGITS) else "+" for d in depths)
        text = "".join(glyphs)
        rows = [
            f"    {text[i : i + self.columns]}\n    {digits[i : i + self.columns]}\n"
            for i in range(0, len(text), self.columns)
        ]
        return (
            f"**Greedy sample in hard mode** ({label}, mean "
            f"{sum(depths) / len(depths):.2f} of {config.n_layer} blocks run). The first {n_prompt} "
            "characters are the prompt, from the validation text; under each character, the number of "
            "blocks it ran.\n\n" + "\n".join(rows)
        )


class PredictionWriter(BasePredictionWriter):
    """`predict`'s output as JSON lines in the run folder: per window, its text, the greedy next
    character at every position, and how many blocks each token ran in hard mode.

    Args:
        filename: the file's name, in the run's log folder; an existing one is never overwritten.
    """

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


class RunProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps, not one per epoch, with a short postfix.

    After a resume it starts at the step reached, so its rate and time left are this process's.
    """

    SHOWN: ClassVar[dict[str, str]] = {
        "train/loss": "loss",
        names.loss("val", "hard"): "val bpc",
        names.of_split("val"): "skipped",
    }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar, step = self.train_progress_bar, trainer.global_step
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = bar.last_print_n = step
        bar.set_description("step")

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # the bar counts steps across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """An elastic model also shows its lowest budget: its default, the highest, skips nothing."""
        logged = trainer.progress_bar_metrics
        shown = {short: f"{float(logged[name]):.3f}" for name, short in self.SHOWN.items() if name in logged}
        if pl_module.elastic_range:
            low, metrics = pl_module.elastic_range[0], trainer.callback_metrics
            if names.at_budget(low, "bpc") in metrics:
                shown[f"bpc@{low:g}"] = f"{float(metrics[names.at_budget(low, 'bpc')]):.3f}"
                shown[f"skipped@{low:g}"] = (
                    f"{1 - float(metrics[names.at_budget(low, 'routed_executed')]):.3f}"
                )
        return shown
