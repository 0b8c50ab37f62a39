"""Holding a straight-through TSA model to a compute budget: the share of routed token-blocks it runs.

`BudgetThreshold` owns the skip thresholds of one budget. Training's follows the budget-quantile of
p batch by batch; validation calibrates the one that evaluation and sampling use on the whole split.
`ElasticBudget` trains a whole range of budgets at once (elastic depth) and serves any budget in it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tsa_lightning.errors import ConfigError
from tsa_lightning.model import TSATransformer


class HaltQuantile(Metric):
    """A quantile of the routers' p over a whole split and all ranks, read exactly from a sample of p.

    Every batch contributes the same share of its values, set by the first batch so that it gives
    at most `per_batch` (a short last batch weighs no more than its size). The k-th batch of a split
    is sampled with seed k: validation never shifts the run's random stream, a resumed run samples
    alike, and a stride would alias with the blocks or positions. (A seed, not a held
    `torch.Generator`: a generator cannot travel to `ddp_spawn`'s processes.)
    """

    full_state_update = False

    def __init__(self, q: float, per_batch: int = 16384) -> None:
        super().__init__()
        self.q, self.per_batch = q, per_batch
        self.share: float | None = None
        self.batches = 0
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def reset(self) -> None:
        super().reset()
        self.share, self.batches = None, 0

    def update(self, halt_probs: Tensor, valid: Tensor) -> None:
        """`valid` (B, T): real positions; padding enters no count."""
        values = halt_probs[valid].flatten().float()
        if self.share is None:
            self.share = min(1.0, self.per_batch / max(1, values.numel()))
        count = round(self.share * values.numel())
        if count < values.numel():
            generator = torch.Generator().manual_seed(self.batches)
            chosen = torch.randperm(values.numel(), generator=generator, device="cpu")[:count]
            values = values[chosen.to(values.device)]
        self.batches += 1
        self.values.append(values)

    def compute(self) -> Tensor:
        """The p at or below which a share q of the sampled p lie."""
        return order_statistic(dim_zero_cat(self.values).cpu(), self.q)


def order_statistic(values: Tensor, q: float) -> Tensor:
    """The value at or below which a share q of `values` lie: one of them, never an interpolation,
    so a threshold set here splits the values exactly, however many there are."""
    return torch.kthvalue(values.flatten(), max(1, round(q * values.numel()))).values


def toward(threshold: Tensor, target: Tensor, share: float) -> Tensor:
    """`threshold` moved a share of the way to `target` in log-odds, where p's drift into the
    sigmoid's tails is a steady walk, not a vanishing one."""
    # the top clamp is float32's last step below 1, so that a threshold held in float32 can leave 1
    odds = [torch.logit(t.double().clamp(1e-12, 1 - 2**-24)) for t in (threshold, target)]
    return torch.sigmoid(odds[0].lerp(odds[1], share))


def check_budget(
    model: TSATransformer,
    budget: float,
    momentum: float,
    depth_loss_weight: float,
    option: str = "compute_budget",
) -> None:
    """`option`: the option that asked for the budget, as the messages name it."""
    if not model.steerable:
        raise ConfigError(
            f"{option} steers TSA routers; routing {model.config.routing!r} sets its depth otherwise "
            "(early exit: skip_threshold; Mixture-of-Depths: mod_capacity)"
        )
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"compute_budget must be in (0, 1] (a share of routed token-blocks), got {budget}")
    if model.config.gate != "straight_through":
        raise ConfigError(
            f"{option} needs gate: straight_through (a soft gate never skips in training, so the "
            "budget would steer nothing); set --model.config.gate=straight_through"
        )
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"budget_momentum must be in (0, 1] (a share of the way per step), got {momentum}")
    if depth_loss_weight:
        raise ConfigError(f"give {option} or depth_loss_weight, not both: the budget sets the depth term")


class BudgetThreshold(nn.Module):
    """The skip threshold of a model trained to run a share `budget` of its routed token-blocks.

    Training's threshold is a running statistic, as BatchNorm's mean is: after every step it moves
    a share `momentum` of the way (in log-odds) to the global batch's budget-quantile of p, so the
    straight-through gate skips the tokens the routers rank highest. A quantile follows p wherever
    the task loss drives it (a fixed-rate controller fell behind as p collapsed towards 0, and lost
    the budget). Validation calibrates the threshold on the whole split in hard mode, since p
    without dropout need not sit where it did in training; evaluation uses the calibrated one until
    training moves on. All three are buffers: checkpoints carry them, resumes continue exactly.
    """

    def __init__(self, budget: float, momentum: float, initial: float) -> None:
        super().__init__()
        self.budget, self.momentum = budget, momentum
        self.register_buffer("running", torch.tensor(initial))
        self.register_buffer("calibrated", torch.tensor(math.nan))  # none before a validation
        self.register_buffer("calibrated_from", torch.tensor(math.nan))  # the running one it was made under
        self.val_quantile = HaltQuantile(budget)

    @property
    def calibrated_now(self) -> bool:
        """Calibrated, and no training step since."""
        return float(self.calibrated_from) == float(self.running)

    @property
    def threshold(self) -> float:
        """Evaluation's and sampling's: the calibrated one, unless training has moved on since."""
        return float(self.calibrated if self.calibrated_now else self.running)

    def follow(self, halt_probs: Tensor) -> None:
        """One training step: move towards the budget-quantile of the global batch's p."""
        if self.budget >= 1.0:  # the whole network: nothing skips, whatever p is
            self.running.fill_(1.0)
            return
        self.running.copy_(toward(self.running, order_statistic(halt_probs, self.budget), self.momentum))

    def calibrate(self) -> float:
        """Skip at the validation split's quantile; validating again without training refines it.

        Moving the threshold changes which blocks earlier tokens ran, and so the p that later
        routers see: a second and third validation of a finished model step half-way (in log-odds)
        from the last threshold to the new quantile, which settles where the share is the budget.
        """
        quantile = torch.tensor(1.0) if self.budget >= 1.0 else self.val_quantile.compute()
        if self.calibrated_now and self.budget < 1.0:
            quantile = toward(self.calibrated, quantile, 0.5)
        self.calibrated.fill_(float(quantile))
        self.calibrated_from.copy_(self.running)
        self.val_quantile.reset()
        return float(self.calibrated)


GRID_STEP = 0.05  # an elastic model's thresholds are calibrated every GRID_STEP of budget


def budget_grid(low: float, high: float) -> list[float]:
    """`low`, `high` and the multiples of GRID_STEP between them."""
    inner = range(math.floor(low / GRID_STEP + 1e-9) + 1, math.ceil(high / GRID_STEP - 1e-9))
    return [low, *(round(k * GRID_STEP, 10) for k in inner), high]


def check_elastic(budgets: list[float], default: float | None) -> tuple[float, float]:
    """The trained range (low, high) of `elastic_budgets`, refused in one line when it is not one."""
    if len(budgets) != 2 or not 0.0 < budgets[0] < budgets[1] <= 1.0:
        raise ConfigError(
            f"elastic_budgets must be [lowest, highest] budget with 0 < lowest < highest <= 1, got {budgets}"
        )
    if any(abs(b * 100 - round(b * 100)) > 1e-9 for b in budgets):  # budgets are named to 0.01
        raise ConfigError(f"elastic_budgets must be multiples of 0.01, got {budgets}")
    if default is not None and not budgets[0] <= default <= budgets[1]:
        raise ConfigError(
            f"compute_budget {default} is outside elastic_budgets {budgets}: it is the budget evaluation "
            "and sampling use by default, so it must be one the model was trained for"
        )
    return budgets[0], budgets[1]


class ElasticBudget(nn.Module):
    """The skip thresholds of a model trained for every budget in a range at once (elastic depth).

    Each training step spreads the grid's budgets over the global batch's rows (row r trains grid
    point (r + step) mod G, counting the rows of lower ranks first): when the global batch has at
    least G rows, every step trains the smallest and the largest budget beside the ones between
    (the sandwich rule, in one pass; smaller batches take turns), every rank
    knows every row's budget without talking to the others, DDP trains the budgets one process
    would, and no random stream is touched. Each grid point is a `BudgetThreshold` that follows the
    quantile of its own rows' p and is calibrated on the validation split in its own hard-mode
    pass; a budget between grid points interpolates the neighbours' thresholds (linearly: log-odds
    would crowd towards budget 1.0's threshold of 1). `budget` is the one evaluation and sampling
    use unless asked for another.
    """

    def __init__(
        self,
        low: float,
        high: float,
        momentum: float,
        initial: float,
        budget: float | None,
        top_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.budgets = budget_grid(low, high)
        self.budget = high if budget is None else budget
        self.top_share = top_share
        self.points = nn.ModuleList(BudgetThreshold(b, momentum, initial) for b in self.budgets)

    def rows(self, batch_size: int, step: int, rank: int = 0) -> Tensor:
        """The grid point each row of a rank's share of this step's global batch trains: a share
        `top_share` of the rows (spread evenly) the highest budget, the others the grid in turn."""
        row = torch.arange(batch_size) + rank * batch_size
        tops_so_far = torch.floor((row + 1) * self.top_share)  # top rows up to this one, itself included
        top = tops_so_far > torch.floor(row * self.top_share)
        others_before = (row - tops_so_far).long()
        return torch.where(top, len(self.budgets) - 1, (others_before + step) % len(self.budgets))

    def row_thresholds(self, batch_size: int, step: int, rank: int = 0) -> Tensor:
        """Training's threshold for each row (B,) of a rank's batch."""
        running = torch.stack([point.running for point in self.points])
        return running[self.rows(batch_size, step, rank).to(running.device)]

    def mean_budget(self, batch_size: int, step: int) -> float:
        """The mean budget a global batch of `batch_size` rows trains at this step."""
        return float(torch.tensor(self.budgets)[self.rows(batch_size, step)].mean())

    def follow(self, halt_probs: Tensor, step: int) -> None:
        """Each grid point moves towards the quantile of its rows' p in the global batch: `halt_probs`
        (B, T, L-1), or (ranks, B, T, L-1) as gathered."""
        halt_probs = halt_probs.reshape(-1, *halt_probs.shape[-2:])
        rows = self.rows(len(halt_probs), step).to(halt_probs.device)
        for g, point in enumerate(self.points):
            if (rows == g).any():
                point.follow(halt_probs[rows == g])

    def threshold_at(self, budget: float) -> float:
        """Hard mode's threshold for any budget in the trained range."""
        low, high = self.budgets[0], self.budgets[-1]
        if not low - 1e-9 <= budget <= high + 1e-9:
            raise ConfigError(f"budget {budget} is outside the trained range [{low}, {high}] of this model")
        upper = next(g for g, b in enumerate(self.budgets) if b >= budget - 1e-9)
        if upper == 0 or abs(self.budgets[upper] - budget) < 1e-9:
            return self.points[upper].threshold
        lower = upper - 1
        share = (budget - self.budgets[lower]) / (self.budgets[upper] - self.budgets[lower])
        return (1 - share) * self.points[lower].threshold + share * self.points[upper].threshold

    @property
    def threshold(self) -> float:
        return self.threshold_at(self.budget)

    def calibrate(self) -> list[float]:
        return [point.calibrate() for point in self.points]
