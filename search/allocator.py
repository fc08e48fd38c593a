"""Marginal-gain rank allocator: fill a macs or params budget greedily by loss gain per unit cost.

Measurement (once per group and step, not re-measured after each accepted step):

1. generation 1 evaluates the minimum configuration (every group at its smallest choice);
2. generation 2 evaluates, for every group and each of its larger choices, the minimum
   configuration with only that group raised to that choice. The gain of a group's step
   ``c_k -> c_(k+1)`` is ``loss(c_k) - loss(c_(k+1))``, both measured with every other group at
   its minimum (gains are assumed additive across groups);
3. greedy: from the minimum configuration, repeatedly take, among the groups' next steps with a
   positive gain that keep the configuration within the budget, the one with the largest gain
   per unit of cost (its cost is the cost callable's increase at the current configuration;
   ties go to the earlier group). A group whose next step has no positive gain stops growing;
4. generation 3 evaluates the allocated configuration (no evaluation when it was measured above).

So it spends ``1 + sum_g (len(choices_g) - 1)`` evaluations, plus one for the result unless the
result is the minimum configuration or has a single group raised (see
:func:`allocator_evaluations`). The budget is never exceeded: every accepted step is checked
with the cost callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from supernet.errors import SupernetError
from supernet.space import Config, SearchSpace

if TYPE_CHECKING:
    from .context import SearchContext

#: The metric whose decrease is the gain of a rank step.
GAIN_METRIC = "loss"


@dataclass(frozen=True)
class Step:
    """One accepted rank step."""

    group: str
    before: int
    after: int
    gain: float
    cost: float
    ratio: float


def ladders(space: SearchSpace) -> dict[str, list[int]]:
    """Each group's choices from smallest to largest: the order its steps are taken in."""
    return {g: list(reversed(c)) for g, c in space.choices.items()}


def sweep_configs(space: SearchSpace) -> list[Config]:
    """The measured configurations after the minimum: per group, the minimum with that group raised."""
    base = space.min_config()
    return [{**base, g: v} for g, ladder in ladders(space).items() for v in ladder[1:]]


def allocator_evaluations(space: SearchSpace, result: Config) -> int:
    """Exactly how many unique evaluations the allocator spends when it ends at ``result``."""
    measured = [space.min_config(), *sweep_configs(space)]
    return len(measured) + (0 if result in measured else 1)


def greedy_allocation(
    space: SearchSpace, gains: Mapping[str, list[float]], cost: Callable[[Config], float], limit: float,
) -> tuple[Config, list[Step]]:
    """Greedy fill of ``limit`` from the minimum config of ``space`` (:func:`greedy_fill` on its ladders).

    Args:
        gains: per group, the gain of each step up its ladder (``len(choices) - 1`` values).
        cost: the budgeted cost of a configuration.
        limit: the budget; ``cost(result) <= limit`` always holds.
    """
    return greedy_fill(ladders(space), gains, cost, limit)


def greedy_fill(
    ladders: Mapping[str, Sequence], gains: Mapping[str, Sequence[float]], cost: Callable[[dict], float],
    limit: float,
) -> tuple[dict, list[Step]]:
    """The one greedy of marginal gain per unit of cost, whatever provides the gains and the cost.

    From every key at the first rung of its ladder, repeatedly take, among the keys' next steps
    with a positive gain that keep ``cost`` within ``limit``, the one with the largest gain per
    unit of cost (its cost is ``cost``'s increase at the current configuration; ties go to the
    earlier key). A key whose next step has no positive gain stops growing. The search's rank
    allocator (gains: measured loss decreases) and JACTUS' global rank allocation (gains: the
    output energy each component captures, :mod:`supernet.adapters.jactus`) both call it.

    Args:
        ladders: per key, its rungs from the smallest to the largest.
        gains: per key, the gain of each step up its ladder (``len(ladder) - 1`` values).
        cost: the budgeted cost of a ``{key: rung}`` configuration.
        limit: the budget; ``cost(result) <= limit`` always holds.
    """
    config = {k: ladder[0] for k, ladder in ladders.items()}
    if cost(config) > limit:
        raise SupernetError(f"the budget {limit:g} is below the minimum configuration's cost {cost(config):g}")
    position = dict.fromkeys(ladders, 0)
    steps: list[Step] = []
    while True:
        best: Step | None = None
        current = cost(config)
        for g, k in position.items():
            if k + 1 >= len(ladders[g]) or gains[g][k] <= 0:
                continue
            candidate = {**config, g: ladders[g][k + 1]}
            total = cost(candidate)
            if total > limit:
                continue
            delta = total - current
            ratio = float("inf") if delta <= 0 else gains[g][k] / delta
            if best is None or ratio > best.ratio:
                best = Step(g, config[g], ladders[g][k + 1], gains[g][k], delta, ratio)
        if best is None:
            return config, steps
        config = {**config, best.group: best.after}
        position[best.group] += 1
        steps.append(best)


def check_allocator(ctx: SearchContext) -> None:
    """The budget's metric is a cost metric and the minimum configuration fits in it."""
    key, limit = ctx.settings.budget
    costs = ctx.cost(ctx.space.min_config())
    if key not in costs:
        raise SupernetError(f"unknown budget metric {key!r}; the cost function gives {', '.join(sorted(costs))}")
    if costs[key] > limit:
        raise SupernetError(f"budget {key}={limit:g} is below the minimum configuration's {key} ({costs[key]:g})")


def run_allocator(ctx: SearchContext) -> None:
    """Measure, allocate, evaluate the result; ``ctx.selected`` gets the allocation and its steps."""
    check_allocator(ctx)
    key, limit = ctx.settings.budget
    space = ctx.space
    (base,) = ctx.evaluate_many([space.min_config()], 1)
    sweep = ctx.evaluate_many(sweep_configs(space), 2)
    losses = iter(_loss(r) for r in sweep)
    gains: dict[str, list[float]] = {}
    for g, ladder in ladders(space).items():
        previous = _loss(base)
        gains[g] = []
        for _ in ladder[1:]:
            loss = next(losses)
            gains[g].append(previous - loss)
            previous = loss
    config, steps = greedy_allocation(space, gains, lambda c: ctx.cost(c)[key], limit)
    (record,) = ctx.evaluate_many([config], 3)
    ctx.selected = {
        "index": record.index, "config": config, "budget": [key, limit], "cost": ctx.cost(config)[key],
        "gain_metric": GAIN_METRIC, "gains": gains, "steps": [asdict(s) for s in steps],
        "evaluations": allocator_evaluations(space, config),
    }


def _loss(record) -> float:
    if record is None or GAIN_METRIC not in record.metrics:
        raise SupernetError(f"the allocator needs the evaluator to return {GAIN_METRIC!r}")
    return record.metrics[GAIN_METRIC]
