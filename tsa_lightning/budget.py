"""Holding a TSA model to compute budgets: the share of routed token-blocks hard mode runs.

`Budgets` owns the skip thresholds of a grid of budgets: one budget (`compute_budget`) is a grid of
one point; a range (`elastic_budgets`, elastic depth) is a grid every 0.05 of budget, and any budget
between its points is served too. Training's thresholds follow each budget's quantile of the
routers' scores batch by batch; validation calibrates the ones evaluation and sampling use.
Thresholds are held in log-odds, where float32 splits any two tokens whose router logits differ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tsa_lightning.errors import ConfigError
from tsa_lightning.metrics import pooled
from tsa_lightning.model import TSATransformer, skip_logit


class HaltQuantile(Metric):
    """A quantile of the routers' scores over a whole split and all ranks, read exactly from a sample.

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

    def update(self, halt_logits: Tensor, valid: Tensor) -> None:
        """`valid` (B, T): real positions; padding enters no count."""
        values = halt_logits[valid].flatten().float()
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
        """The score at or below which a share q of the sampled scores lie, pooled over every rank
        (torchmetrics gathers them); NaN when none was sampled."""
        values = dim_zero_cat(self.values).cpu() if len(self.values) else torch.empty(0)
        return order_statistic(values, self.q) if values.numel() else torch.tensor(math.nan)


def order_statistic(values: Tensor, q: float) -> Tensor:
    """The value at or below which a share q of `values` lie: one of them, never an interpolation,
    so a threshold set here splits the values exactly, however many there are."""
    return torch.kthvalue(values.flatten(), max(1, round(q * values.numel()))).values


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
    if model.config.gate == "soft":
        raise ConfigError(
            f"{option} needs gate: unit or straight_through (a soft gate never skips in training, so "
            "the budget would steer nothing); set --model.config.gate=unit"
        )
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"budget_momentum must be in (0, 1] (a share of the way per step), got {momentum}")
    if depth_loss_weight:
        raise ConfigError(f"give {option} or depth_loss_weight, not both: the budget sets the depth term")


GRID_STEP = 0.05  # an elastic model's thresholds are trained and scored every GRID_STEP of budget
TABLE_STEP = 0.01  # ... and calibrated every TABLE_STEP, the precision a budget is named to
START_LIMIT = 30.0  # log-odds: a training threshold starts at most this far out
REFINEMENTS = 10  # at most this many per-batch steps towards a budget's threshold in a thorough calibration
SETTLED = 0.002  # ... which stop once the batch runs its budget's share within this
THOROUGH_BATCHES = 8  # a thorough calibration reads this many batches, spread over the split
GRID_EVERY = 4  # while training, an elastic validation scores its grid on every GRID_EVERY-th batch
SHOWN = (1.0, 0.85, 0.7, 0.5)  # the budgets an elastic run's chart and summary show, besides its ends


def budgets_for(
    model: TSATransformer,
    compute_budget: float | None,
    elastic_budgets: list[float] | None,
    top_share: float,
    shrink_steps: list[int] | None,
    momentum: float,
    depth_loss_weight: float,
) -> Budgets | None:
    """The budgets a module's options ask for (None: none), each impossible option refused in one line."""
    initial = model.config.skip_threshold
    if elastic_budgets is None:
        if top_share or shrink_steps is not None:
            option = "elastic_top_share" if top_share else "elastic_shrink_steps"
            raise ConfigError(
                f"{option} shapes how a batch shares the budgets of elastic_budgets; set "
                f"--model.elastic_budgets too, or leave {option} out"
            )
        if compute_budget is None:
            return None
        check_budget(model, compute_budget, momentum, depth_loss_weight)
        return Budgets([compute_budget], momentum, initial)
    low, high = check_elastic(elastic_budgets, compute_budget)
    check_budget(model, low, momentum, depth_loss_weight, option="elastic_budgets")
    if not 0.0 <= top_share < 1.0:
        raise ConfigError(f"elastic_top_share must be in [0, 1), got {top_share}")
    if shrink_steps is not None and not (len(shrink_steps) == 2 and 0 <= shrink_steps[0] <= shrink_steps[1]):
        raise ConfigError(
            f"elastic_shrink_steps must be [start, end] steps with 0 <= start <= end, got {shrink_steps}"
        )
    return Budgets.elastic(
        low, high, momentum, initial, default=compute_budget, top_share=top_share, shrink_steps=shrink_steps
    )


def budget_grid(low: float, high: float) -> list[float]:
    """`low`, `high` and the multiples of GRID_STEP between them."""
    inner = range(math.floor(low / GRID_STEP + 1e-9) + 1, math.ceil(high / GRID_STEP - 1e-9))
    return [low, *(round(k * GRID_STEP, 10) for k in inner), high]


def table_grid(budgets: list[float]) -> list[float]:
    """The budgets of a calibrated table: the grid's, and every TABLE_STEP between."""
    low, high = budgets[0], budgets[-1]
    steps = range(math.floor(low / TABLE_STEP + 1e-9) + 1, math.ceil(high / TABLE_STEP - 1e-9))
    return sorted({*budgets, *(round(k * TABLE_STEP, 10) for k in steps)})


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


class Budgets(nn.Module):
    """The skip thresholds (log-odds) of a model trained to run shares `budgets` of its routed blocks.

    Training's thresholds are running statistics, as BatchNorm's mean is: after every step each
    moves a share `momentum` of the way to its budget-quantile of its rows' router logits, so the
    gate skips the tokens the routers rank highest. A quantile follows the routers wherever the task
    loss drives them (a fixed-rate controller fell behind as p collapsed towards 0, and lost the
    budget). Budget 1.0's threshold is +inf: nothing skips, whatever p is.

    Rows: each step spreads the grid over the global batch's rows, row r training grid point
    (r + step) mod G, a share `top_share` of the rows the highest budget (`rows`); progressive
    shrinking (`shrink_steps`, as Once-for-All trains elastic depth) first trains only the highest,
    then opens the grid downwards. When the global
    batch has at least G rows every step trains the smallest and the largest budget beside the ones
    between (the sandwich rule, in one pass). Rows are numbered as one process's batch would hold
    them (DDP deals a batch's windows to the ranks in turn), so DDP trains what one process would.

    Validation calibrates in hard mode a threshold every TABLE_STEP of budget (`table`), since p
    without dropout need not sit where it did in training: budget b's is the b-quantile of the
    scores a hard pass at b saw (while training only the grid's budgets run, and the table between
    them is interpolated). Evaluation uses the calibrated table, moved as training's thresholds have
    moved since (`validation_thresholds`). All are buffers: checkpoints carry them, resumes
    continue exactly.
    """

    def __init__(
        self,
        budgets: list[float],
        momentum: float,
        initial: float,
        default: float | None = None,
        top_share: float = 0.0,
        shrink_steps: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.budgets, self.momentum, self.top_share = budgets, momentum, top_share
        self.shrink_steps = shrink_steps
        self.budget = budgets[-1] if default is None else default
        self.table_budgets = table_grid(budgets)
        first = min(max(skip_logit(initial), -START_LIMIT), START_LIMIT)  # a threshold of 0 or 1 can move
        start = [math.inf if b >= 1.0 else first for b in budgets]
        self.register_buffer("running", torch.tensor(start))
        self.register_buffer("calibrated_from", torch.full((len(budgets),), math.nan))  # running, then
        self.register_buffer(
            "table", torch.full((len(self.table_budgets),), math.nan)
        )  # none before a validation
        # one sample per table budget; an elastic model's are smaller, as it keeps one per 0.01
        per_batch = 16384 if len(budgets) == 1 else 4096
        self.quantiles = nn.ModuleList(HaltQuantile(b, per_batch) for b in self.table_budgets)
        self.grid_index = [self.table_budgets.index(b) for b in budgets]  # grid point -> table entry

    @classmethod
    def elastic(cls, low: float, high: float, momentum: float, initial: float, **kwargs) -> Budgets:
        return cls(budget_grid(low, high), momentum, initial, **kwargs)

    @property
    def elastic_range(self) -> list[float] | None:
        """[lowest, highest] of an elastic model; None for one budget."""
        return [self.budgets[0], self.budgets[-1]] if len(self.budgets) > 1 else None

    def shown(self) -> list[float]:
        """The budgets a run's chart and summary show, highest first: SHOWN's inside the range, and
        both ends."""
        inside = {b for b in self.budgets if round(b, 2) in SHOWN}
        return sorted(inside | {self.budgets[0], self.budgets[-1]}, reverse=True)

    def check_schedule(self, max_steps: int) -> None:
        """Progressive shrinking (`shrink_steps`) must end by the last step, or the lowest budgets
        never train."""
        end = self.shrink_steps[1]
        if end > max_steps:
            raise ConfigError(
                f"elastic_shrink_steps ends at step {end}, after trainer.max_steps {max_steps}: the "
                "lowest budgets would never train; end it by max_steps"
            )

    # -- training --

    def rows(self, batch_size: int, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """The grid point each row of a rank's share of this step's global batch trains."""
        row = torch.arange(batch_size) * world_size + rank  # DDP deals windows to ranks in turn
        tops_so_far = torch.floor((row + 1) * self.top_share)  # top rows up to this one, itself included
        top = tops_so_far > torch.floor(row * self.top_share)
        others_before = (row - tops_so_far).long()
        drawn = self.drawn(step)  # the highest `drawn` grid points
        highest = len(self.budgets) - 1
        return torch.where(top, highest, highest + 1 - drawn + (others_before + step) % drawn)

    def drawn(self, step: int) -> int:
        """How many grid points, from the highest down, the rows of a step take: all of them, or under
        progressive shrinking (`shrink_steps` [start, end]) only the highest before `start`, then a
        lowest budget that falls linearly to the range's by `end`."""
        if self.shrink_steps is None or step >= self.shrink_steps[1]:
            return len(self.budgets)
        start, end = self.shrink_steps
        low, high = self.budgets[0], self.budgets[-1]
        lowest = high - (high - low) * max(step - start + 1, 0) / (end - start + 1)
        return sum(b >= lowest - 1e-9 for b in self.budgets)

    def row_thresholds(self, batch_size: int, step: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """Training's threshold for each row (B,) of a rank's batch."""
        return self.running[self.rows(batch_size, step, rank, world_size).to(self.running.device)]

    def follow(self, halt_logits: Tensor, step: int) -> float:
        """Each budget's threshold moves towards the quantile of its rows' router logits in the global
        batch (a budget progressive shrinking has not opened yet, of all rows'): `halt_logits`
        (B, T, L-1), or (ranks, B, T, L-1) as gathered. Returns the mean budget the batch trained."""
        if halt_logits.dim() == 4:  # the global batch in one process's row order
            halt_logits = halt_logits.transpose(0, 1).flatten(0, 1)
        trained = self.rows(len(halt_logits), step)
        rows = trained.to(halt_logits.device)
        unopened = len(self.budgets) - self.drawn(step)  # progressive shrinking: points no row takes yet
        for g, budget in enumerate(self.budgets):
            mine = halt_logits[rows == g] if (rows == g).any() else halt_logits if g < unopened else None
            if budget < 1.0 and mine is not None:  # an unopened point follows every row, to open warm
                target = order_statistic(mine, budget).to(self.running)
                self.running[g] = self.running[g] + self.momentum * (target - self.running[g])
        return float(torch.tensor(self.budgets)[trained].mean())

    # -- validation --

    def validation_passes(
        self, batch_size: int, batch_idx: int, thorough: bool, rank: int = 0, world_size: int = 1
    ) -> list[Tensor]:
        """The hard-mode passes that score and calibrate a validation batch: for each, the table
        entry (B,) each row runs at. While training, on every GRID_EVERY-th batch one pass whose rows
        take the grid's budgets in turn (so that a validation costs about 1.5x a dense one); a
        thorough calibration, one pass per table budget over every row."""
        if thorough:
            return [torch.full((batch_size,), k) for k in range(len(self.table_budgets))]
        if batch_idx % GRID_EVERY:
            return []
        row = torch.arange(batch_size) * world_size + rank
        grid = torch.tensor(self.grid_index)
        scored = batch_idx // GRID_EVERY  # one more than a global batch on: every rank meets every budget
        return [grid[(row + scored * (batch_size * world_size + 1)) % len(self.budgets)]]

    def validation_thresholds(self) -> Tensor:
        """Each table budget's threshold for validation's first pass: training's, moved by the gap
        between the last calibrated table and training's thresholds then (without dropout the
        routers' logits sit away from training's). Routers drift while training, and the table
        alone, hundreds of steps old, ran budget 0.35 at 0.9 of the routed blocks."""
        running = torch.stack([self.interpolated(b, self.budgets, self.running) for b in self.table_budgets])
        if self.table.isnan().any():
            return running
        then = torch.stack(
            [self.interpolated(b, self.budgets, self.calibrated_from) for b in self.table_budgets]
        )
        return torch.where(torch.isfinite(self.table), self.table + (running - then), self.table)

    def batch_thresholds(self, halt_logits: Tensor, valid: Tensor, points: Tensor) -> Tensor:
        """Each row's threshold refined on one validation batch: its budget's quantile of the router
        logits its budget's rows produced. A threshold moved changes which blocks earlier tokens
        ran, and so the logits later routers give: a step or two of this settles where the share
        is the budget."""
        thresholds = torch.full((len(points),), math.inf, device=halt_logits.device)
        points = points.to(halt_logits.device)
        for k in points.unique().tolist():
            rows = points == k
            if self.table_budgets[k] < 1.0 and valid[rows].any():
                thresholds[rows] = order_statistic(halt_logits[rows][valid[rows]], self.table_budgets[k])
        return thresholds

    def settled(self, run: Tensor, valid: Tensor, points: Tensor) -> bool:
        """Whether each budget's rows ran (`run` (B, T, L-1): hard mode's decisions, as
        `TSATransformer.skips` makes them) within SETTLED of its share."""
        points = points.to(run.device)
        for k in points.unique().tolist():
            rows = points == k
            if (
                valid[rows].any()
                and abs(float(run[rows][valid[rows]].float().mean()) - self.table_budgets[k]) > SETTLED
            ):
                return False
        return True

    def observe(self, halt_logits: Tensor, valid: Tensor, points: Tensor | None = None) -> None:
        """A validation batch's scores in hard mode, each row at table entry `points` (B,) (None: 0)."""
        points = torch.zeros(len(halt_logits), dtype=torch.long) if points is None else points.cpu()
        for k in points.unique().tolist():
            self.quantiles[k].update(halt_logits[points == k], valid[points == k])

    def calibrate(self) -> list[float]:
        """Each table budget's threshold: the quantile of the scores its own pass saw; a budget that
        had no pass (while training, only the grid's run) is interpolated between the grid's. Returns
        the grid's thresholds, as probabilities."""
        seen = [float(pooled(quantile)) for quantile in self.quantiles]  # every rank's, in one order
        table = self.table.tolist()
        for k, b in enumerate(self.table_budgets):
            if b >= 1.0:
                table[k] = math.inf
            elif not math.isnan(seen[k]):
                table[k] = seen[k]
            elif k in self.grid_index:
                table[k] = float(self.running[self.grid_index.index(k)])
        grid = torch.tensor([table[k] for k in self.grid_index])
        for k, b in enumerate(self.table_budgets):
            if math.isnan(seen[k]) and k not in self.grid_index:
                table[k] = float(self.interpolated(b, self.budgets, grid))
        self.table.copy_(torch.tensor(table))
        self.calibrated_from.copy_(self.running)
        self.reset()
        return [probability(self.table[k]) for k in self.grid_index]

    def reset(self) -> None:
        for quantile in self.quantiles:
            quantile.reset()

    # -- evaluation and sampling --

    def threshold_at(self, budget: float | None = None) -> Tensor:
        """Hard mode's threshold (log-odds) for any budget in the trained range (None: the default):
        the calibrated table's, interpolated between its points, moved as training's thresholds
        have moved since (`validation_thresholds`); before any calibration, training's."""
        budget = self.budget if budget is None else budget
        low, high = self.budgets[0], self.budgets[-1]
        if not low - 1e-9 <= budget <= high + 1e-9:
            raise ConfigError(f"budget {budget} is outside the trained range [{low}, {high}] of this model")
        return self.interpolated(budget, self.table_budgets, self.validation_thresholds())

    @staticmethod
    def interpolated(budget: float, budgets: list[float], thresholds: Tensor) -> Tensor:
        """The threshold at `budget` from thresholds at sorted `budgets`: linear in log-odds between
        neighbours; below an infinite one (budget 1.0), the last finite one."""
        upper = next(i for i, b in enumerate(budgets) if b >= budget - 1e-9)
        if upper == 0 or abs(budgets[upper] - budget) < 1e-9:
            return thresholds[upper].clone()
        if not torch.isfinite(thresholds[upper]):
            return thresholds[upper - 1].clone()
        share = (budget - budgets[upper - 1]) / (budgets[upper] - budgets[upper - 1])
        return thresholds[upper - 1].lerp(thresholds[upper], share)

    @property
    def threshold(self) -> Tensor:
        """The default budget's threshold (log-odds)."""
        return self.threshold_at(self.budget)


def probability(threshold: float | Tensor) -> float:
    """A threshold in log-odds as the probability users read (rounded to 1 above ~36.7)."""
    return float(torch.sigmoid(torch.as_tensor(threshold, dtype=torch.float64)))
