"""What a finished run prints: where everything went, the final metrics, and what to run next."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch import Trainer

from tsa_lightning import names
from tsa_lightning.runs import last_checkpoint, read_checkpoint, where_logged

COLUMNS = {  # the validation history's columns: metric name -> heading
    names.loss("val", "hard"): "val bpc",
    names.of_split("val"): "executed TLOps saved",
    names.of_split("val", "flops_saved"): "executed FLOPs saved",
    names.of_split("val", "tlops_saved_paper"): "paper TLOps saved",
}


class ValidationHistory(L.Callback):
    """What each validation of a fit found, at the step the checkpoint and `validate` name. Kept in
    the checkpoint, so a resumed run's summary shows the validations before the stop as well."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, **{k: float(metrics[k]) for k in COLUMNS if k in metrics}}
        self.rows = [r for r in self.rows if r["step"] != row["step"]] + [row]  # a validation run again

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = state_dict["rows"]

    def table(self) -> str:
        """The history as a markdown table: step, bpc, and the work saved three ways."""
        shown = [k for k in COLUMNS if any(k in row for row in self.rows)]
        lines = [
            "| step | " + " | ".join(COLUMNS[k] for k in shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for row in self.rows:
            cells = [f"{row[k]:.4f}" if k == names.loss("val", "hard") else f"{row[k]:.1%}" for k in shown]
            lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def end_of_run(trainer: Trainer) -> str:
    """The summary printed after `fit`. Under ddp_spawn the process that prints it trained nothing
    itself: the step and the validation history come from the run's last.ckpt."""
    last = last_checkpoint(trainer)
    history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
    step = trainer.global_step
    if step == 0 and last is not None and last.path.is_file():  # trained elsewhere: ddp_spawn's workers
        saved = read_checkpoint(last.path)
        step = saved["global_step"]
        if history is not None:
            history.load_state_dict(saved.get("callbacks", {}).get(history.state_key, {"rows": []}))
    lines = [f"Run finished at step {step}."]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    labels = {
        names.loss("val", "hard"): "hard-mode bpc",
        names.of_split("val"): "TLOps saved",
        names.of_split("val", "flops_saved"): "FLOPs saved",
    }
    shown = [f"{label} {metrics[k]:.4f}" for k, label in labels.items() if k in metrics]
    shares = names.block_shares(metrics, "val")
    if shares:
        shown.append(f"mean blocks per token {sum(shares):.2f} of {len(shares)}")
        shown.append("each block ran for " + " ".join(f"{share:.0%}" for share in shares))
    if shown:
        lines.append("  last validation: " + ", ".join(shown))
    module = trainer.lightning_module
    shown = module.budget.shown() if module.elastic_range else []
    budgets = {b: metrics.get(names.at_budget(b, "bpc")) for b in shown}
    if shown:
        low, high = module.elastic_range
        lines.append(
            f"  elastic depth:   trained for every budget in [{low:g}, {high:g}]; evaluation and sampling "
            f"run at {module.budget.budget:g} unless given --budget"
        )
    if budgets and None not in budgets.values():
        each = ", ".join(f"{b:.2f} {bpc:.4f}" for b, bpc in budgets.items())
        lines.append(f"  bpc by budget:   {each}")
    if history is not None and history.rows:
        lines += ["  validations:", *("    " + line for line in history.table().splitlines())]
    if last is not None and last.path.is_file():
        lines.append(f"  final state:     {last.path}")
    best = trainer.checkpoint_callback
    if best is not None and best.best_model_path and Path(best.best_model_path).is_file():
        score = f" ({best.monitor} {float(best.best_model_score):.4f})" if best.best_model_score else ""
        lines.append(f"  best checkpoint: {best.best_model_path}{score}")
    logged = where_logged(trainer)
    if logged is not None:
        log_dir, board = logged
        lines.append(f"  logs:            {log_dir}  (see them: tensorboard --logdir {board})")
    if last is not None and last.path.is_file():
        at = f" --budget {min(shown):.2f}" if shown else ""
        lines.append(f"  next:            tsa-lightning sample --ckpt_path {last.path}{at}")
    return "\n".join(lines)
