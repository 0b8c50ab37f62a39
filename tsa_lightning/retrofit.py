"""Retrofitting: routers added to a trained dense model, optionally distilled from it."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from tsa_lightning.errors import ConfigError
from tsa_lightning.model import TSAConfig, TSATransformer
from tsa_lightning.runs import read_checkpoint


def check_teacher(distill_weight: float, init_from: str | None, elastic_budgets: list | None) -> None:
    """Distillation needs a teacher: a dense checkpoint, or an elastic network's own full depth."""
    if distill_weight and init_from is None and elastic_budgets is None:
        raise ConfigError(
            "distill_weight needs a teacher: init_from (a dense checkpoint) or elastic_budgets "
            "(the network at full depth)"
        )


def distillation_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) per token, averaged over tokens: the student keeps the dense model's
    next-token distribution where it skips blocks."""
    target = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    student = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def load_dense_trunk(path: str, config: TSAConfig) -> TSATransformer:
    """The dense model a retrofit starts from, refused in one line unless its trunk is this model's."""
    checkpoint = read_checkpoint(path)
    dense_config = TSAConfig(**checkpoint["hyper_parameters"]["config"])
    if dense_config.routing != "none":
        raise ConfigError(
            f"init_from {path} is a {dense_config.routing!r} model; retrofitting starts from a dense one "
            "(routing: none)"
        )
    different = [
        f"{name}={getattr(dense_config, name)!r} (this model: {getattr(config, name)!r})"
        for name in dense_config.mismatches(config)
        if name not in ("routing", "router_hidden", "mod_every")  # routing fields: the dense model has none
    ]
    if different:
        raise ConfigError(
            f"init_from {path} has another trunk: {', '.join(different)}; retrofit a dense "
            "checkpoint of the same shape"
        )
    dense = TSATransformer(dense_config)
    state = checkpoint["state_dict"]
    dense.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return dense
