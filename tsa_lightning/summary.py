"""What a finished run prints: where everything went, the final metrics, and what to run next."""

from __future__ import annotations

from lightning.pytorch import Trainer

from tsa_lightning import names
from tsa_lightning.runs import last_checkpoint, where_logged


def end_of_run(trainer: Trainer) -> str:
    lines = [f"Run finished at step {trainer.global_step}."]
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
    last = last_checkpoint(trainer)
    if last is not None and last.path.is_file():
        lines.append(f"  final state:     {last.path}")
    best = trainer.checkpoint_callback
    if best is not None and best.best_model_path:
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
