"""AdamW with linear warmup and cosine decay by step, as nanoGPT trains; its options checked up front."""

from __future__ import annotations

import math

import torch

from tsa_lightning.errors import ConfigError, check_range
from tsa_lightning.model import TSATransformer


def check_optimisation(
    learning_rate: float, min_learning_rate: float, warmup_steps: int, weight_decay: float, betas: tuple
) -> None:
    """The optimiser's options, refused in one line each when AdamW or the schedule cannot use them."""
    if not learning_rate > 0:
        raise ConfigError(f"--model.learning_rate must be > 0, got {learning_rate}")
    check_range("model.min_learning_rate", min_learning_rate, 0, learning_rate)
    check_range("model.warmup_steps", warmup_steps, 0)
    check_range("model.weight_decay", weight_decay, 0)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"--model.betas must be two numbers in [0, 1), got {list(betas)}")


def adamw_warmup_cosine(
    model: TSATransformer,
    learning_rate: float,
    min_learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    betas: tuple[float, float],
    total_steps: int | None,
) -> dict:
    """Lightning's optimizer config: AdamW (decay on matrices only), the rate stepped every step."""
    if total_steps is None or total_steps < 0:
        raise ConfigError("set trainer.max_steps: the learning-rate schedule decays by step")
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=learning_rate, betas=betas)
    floor = min_learning_rate / learning_rate

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
