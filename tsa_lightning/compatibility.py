"""Whether a checkpoint fits the options it is loaded with: refused in one line that says what to use.

Lightning replaces every model option with the checkpoint's, silently, and loads weights into any
module whose parameter names match. A resumed `fit` continues the checkpoint's training, so an
option given differently would be dropped: refused. `validate`, `test` and `predict` apply the
given options that leave the weights' shapes alone (a threshold, a budget).
"""

from __future__ import annotations

from dataclasses import fields

from jsonargparse import Namespace

from tsa_lightning.corpus import Codec
from tsa_lightning.errors import ConfigError, RunError
from tsa_lightning.model import TSAConfig

BUDGET_STATE = "budget.running"  # in the state dict of a model trained with a compute budget


def check_checkpoint(
    checkpoint: dict, config: TSAConfig, codec: Codec, budgeted: bool, elastic_range: list[float] | None
) -> None:
    """A checkpoint whose network, budget or vocabulary differs from the module loading it."""
    state = checkpoint["state_dict"]
    if "budget.calibrated" in state or "budget.points.0.running" in state:
        raise ConfigError(
            "the checkpoint holds its budget's thresholds as probabilities, from a version before "
            "thresholds were log-odds; train it again with this version"
        )
    if BUDGET_STATE in state and not budgeted:
        raise ConfigError(
            "the checkpoint was trained with a compute budget; give the run's compute_budget "
            "(its config.yaml has it) or load it with TSALanguageModel.load_from_checkpoint"
        )
    if budgeted and BUDGET_STATE not in state:
        raise ConfigError(
            "the checkpoint was trained without a compute budget, so it has no threshold for one; "
            "drop compute_budget and choose a threshold instead (--model.config.skip_threshold, or "
            "evaluate --thresholds to sweep them)"
        )
    # (kept apart from the hyperparameters, which loading may override)
    trained = checkpoint.get("elastic_budgets", checkpoint["hyper_parameters"].get("elastic_budgets"))
    if trained != elastic_range:
        raise ConfigError(
            f"the checkpoint was trained with elastic_budgets={trained} (this run: {elastic_range}); use "
            "the run's own config.yaml, or load it with TSALanguageModel.load_from_checkpoint"
        )
    different = Codec(checkpoint["hyper_parameters"].get("alphabet")).difference(
        codec, ("the checkpoint", "the data")
    )
    if different:
        raise ConfigError(
            f"the checkpoint's vocabulary differs from the data's ({different}); use the corpus "
            "the checkpoint was trained on"
        )
    # the network as saved: Lightning's load_from_checkpoint(config=...) rewrites the hyperparameters
    saved = TSAConfig(**checkpoint.get("network", checkpoint["hyper_parameters"]["config"]))
    mismatched = [
        f"{key}={getattr(saved, key)!r} (this run: {getattr(config, key)!r})"
        for key in saved.mismatches(config)
    ]
    if mismatched:
        raise ConfigError(
            "the checkpoint was trained with a different model: "
            + ", ".join(mismatched)
            + "; use the run's own config.yaml (and the same data) with this checkpoint"
        )


def options_to_apply(subcommand: str, given: dict, checkpoint: dict, ckpt_path: str) -> dict:
    """The given model options that differ from the checkpoint's, once none of them is refused."""
    saved = checkpoint["hyper_parameters"]
    differing = {
        key: value for key, value in given.items() if normalized(value) != normalized(lookup(saved, key))
    }
    shape_fields = {f"config.{f.name}" for f in fields(TSAConfig) if f.metadata.get("shape")}
    refused = differing if subcommand == "fit" else {k: v for k, v in differing.items() if k in shape_fields}
    if refused:
        listed = ", ".join(
            f"{key}={value!r} (checkpoint: {lookup(saved, key)!r})" for key, value in refused.items()
        )
        advice = (
            "a resumed run continues the checkpoint's training; drop these options to resume it, or "
            "start a new run under another name"
            if subcommand == "fit"
            else "these change the network's shape; use the run's own config.yaml with its checkpoint"
        )
        raise RunError(f"the checkpoint {ckpt_path} was trained with other model options: {listed}; {advice}")
    if "compute_budget" in differing and BUDGET_STATE not in checkpoint["state_dict"]:
        raise ConfigError(
            f"the checkpoint {ckpt_path} was trained without a compute budget, so it has no threshold "
            "for one: drop --model.compute_budget and give --model.config.skip_threshold, or sweep "
            "thresholds with `tsa-lightning evaluate`"
        )
    return differing


def given_model_options(model: Namespace, defaults: Namespace) -> dict:
    """Model options whose value is not the parser's default: those the command line or a config gave."""
    return {key: value for key, value in model.items() if normalized(value) != normalized(defaults.get(key))}


def lookup(hparams: dict, key: str):
    """`config.n_layer` in a checkpoint's nested hyperparameters."""
    for part in key.split("."):
        hparams = hparams.get(part) if isinstance(hparams, dict) else None
    return hparams


def normalized(value):
    return list(value) if isinstance(value, tuple) else value
