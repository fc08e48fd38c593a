"""``halving``: multi-fidelity successive halving, with the number of validation examples as the fidelity.

With ``--eval-samples S`` and ``--evaluations E`` (the budget of NSGA-II: ``E * S`` scored
examples), :data:`RUNGS` rungs score ``S / ETA**2``, ``S / ETA`` and ``S`` examples. Rung 0 takes
``n = (E // RUNGS) * ETA**2`` distinct feasible configurations (seeded, uniform); each rung keeps the
best ``1 / ETA`` of its configurations for the next by non-dominated sorting and crowding distance
(pymoo) on the objectives at that rung's fidelity. Each rung then costs about ``E * S / RUNGS``
examples, so the whole search stays within ``E * S`` (:func:`plan`). The last rung is scored at
the full ``S`` through ``ctx.evaluate_many``: those are the rows of ``history.csv``, and the front
and its confirmation follow as for every strategy. The lower rungs go to ``rungs.csv`` (rung,
examples, config, metrics, seconds), which a resumed search reads back: it replays the seeded
choices and scores only what the file lacks.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from supernet.errors import SupernetError
from supernet.files import write_atomic

if TYPE_CHECKING:
    from .context import SearchContext

ETA = 3
RUNGS = 3
RUNG_FILE = "rungs.csv"
COLUMNS = ["rung", "examples", "config", "metrics", "seconds"]
EvaluateAt = Callable[[Mapping[str, object], int], Mapping[str, float]]


def plan(evaluations: int, samples: int) -> list[tuple[int, int]]:
    """``(configurations, examples)`` per rung; the total ``sum(n * s)`` is at most ``evaluations * samples``."""
    top = evaluations // RUNGS
    if top < 1:
        raise SupernetError(f"halving needs --evaluations of at least {RUNGS} (its {RUNGS} rungs share the budget)")
    sizes = [max(1, samples // ETA ** (RUNGS - 1 - k)) for k in range(RUNGS)]
    return [(top * ETA ** (RUNGS - 1 - k), sizes[k]) for k in range(RUNGS)]


class RungFile:
    """``rungs.csv``: the lower rungs' scores, appended as they finish; the resume cache."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cache: dict[tuple[str, int], dict[str, float]] = {}
        if self.path.is_file():
            try:
                for row in csv.DictReader(io.StringIO(self.path.read_text())):
                    self.cache[(row["config"], int(row["examples"]))] = json.loads(row["metrics"])
            except (KeyError, ValueError, csv.Error) as e:
                raise SupernetError(f"{str(self.path)!r} is corrupt: {e}") from None

    def append(self, rung: int, examples: int, key: str, metrics: Mapping[str, float], seconds: float) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.path.is_file():
            writer.writerow(COLUMNS)
        writer.writerow([rung, examples, key, json.dumps(dict(metrics), sort_keys=True), f"{seconds:.4f}"])
        old = self.path.read_text() if self.path.is_file() else ""
        write_atomic(self.path, old + buffer.getvalue())
        self.cache[(key, examples)] = dict(metrics)


def _select(F: np.ndarray, keep: int) -> list[int]:
    """The ``keep`` best rows of ``F`` (minimised): whole non-dominated fronts first, the last one cut
    by crowding distance (ties by position, so the choice is deterministic)."""
    from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    chosen: list[int] = []
    for front in NonDominatedSorting().do(F):
        front = sorted(int(i) for i in front)
        if len(chosen) + len(front) <= keep:
            chosen += front
            continue
        crowd = calc_crowding_distance(F[front]) if len(front) > 2 else np.full(len(front), np.inf)
        order = sorted(range(len(front)), key=lambda j: (-crowd[j], front[j]))
        chosen += [front[j] for j in order[: keep - len(chosen)]]
        break
    return chosen


def run_halving(ctx: SearchContext) -> None:
    if ctx.evaluate_at is None or ctx.max_samples is None:
        raise SupernetError("the halving strategy needs an evaluator that scores a chosen number of examples")
    rungs = plan(ctx.settings.evaluations, ctx.max_samples)
    file = RungFile(ctx.history.path.parent / RUNG_FILE)
    configs = _starting_configs(ctx, rungs[0][0])
    for rung, (_, examples) in enumerate(rungs[:-1]):
        F = np.array([[o.value(_scored(ctx, file, rung, examples, c)) for o in ctx.objectives] for c in configs])
        configs = [configs[i] for i in _select(F, rungs[rung + 1][0])]
    ctx.evaluate_many(configs, RUNGS)


def check_halving(ctx: SearchContext) -> None:
    if ctx.evaluate_at is None or ctx.max_samples is None:
        raise SupernetError("the halving strategy needs an evaluator that scores a chosen number of examples")
    plan(ctx.settings.evaluations, ctx.max_samples)


def _starting_configs(ctx: SearchContext, n: int) -> list[dict]:
    from .strategies import _random_configs

    out = []
    for config in _random_configs(ctx):
        if ctx.violation(config) == 0:
            out.append(config)
            if len(out) == n:
                break
    return out


def _scored(ctx: SearchContext, file: RungFile, rung: int, examples: int, config: dict) -> dict[str, float]:
    key = ctx.encoding.key(config)
    metrics = file.cache.get((key, examples))
    if metrics is None:
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in ctx.evaluate_at(dict(config), examples).items()}
        file.append(rung, examples, key, metrics, time.perf_counter() - start)
    return {**ctx.cost(config), **metrics} if ctx.has_cost else metrics


def examples_scored(rows: Sequence[tuple[int, int]]) -> int:
    """Scored examples of a plan (its forward passes, in examples)."""
    return sum(n * s for n, s in rows)
