"""The one cached evaluation function every strategy goes through.

Budget rule: ``limit`` counts *unique* configurations of this search (new ones and ones found in
a resumed history alike), in the order the strategy first proposes them. A proposal already
counted is answered from the cache and costs nothing; a configuration that violates the
constraint (judged by the cheap cost callable) is never evaluated, never written to history and
costs nothing. When a batch would pass the limit, only its first proposals up to the limit are
evaluated and the search stops there.

Resume: the rows of history.csv form a cache. The seeded strategy runs again from scratch, and
every configuration it proposes that the cache holds is counted without calling the evaluator,
so the resumed history equals an uninterrupted one row for row (seconds included, since old rows
are kept as written).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from supernet.errors import SupernetError
from supernet.space import Config, SearchSpace

from .encoding import Constraint, CostFn, Encoding
from .history import HistoryFile, Record
from .objectives import Objective

EvaluateFn = Callable[[Config], Mapping[str, float]]
# ``map_fn(evaluate, configs)`` yields ``(raw metrics, seconds)`` in the order of ``configs``.
MapFn = Callable[[EvaluateFn, list[Config]], Iterator[tuple[Mapping[str, float], float]]]


def timed_map(evaluate: EvaluateFn, configs: list[Config]) -> Iterator[tuple[Mapping[str, float], float]]:
    """Evaluate one config after another in this process, timing each; lazily, so that each
    result reaches history.csv as soon as it finishes."""
    for config in configs:
        start = time.perf_counter()
        raw = evaluate(dict(config))
        yield raw, time.perf_counter() - start


class SearchContext:
    """What a strategy sees: the space, its encoding, the settings and :meth:`evaluate_many`.

    Args:
        space: the search space.
        encoding: its integer encoding.
        settings: the validated :class:`~supernet.search.settings.SearchSettings`.
        evaluate: ``config -> raw metrics`` (the expensive evaluator).
        cost: ``config -> cheap metrics`` (macs, params, ...), or None.
        objectives: the resolved objectives.
        constraint: the parsed constraint, or None.
        limit: the budget of unique evaluations, or None for no limit.
        history: history.csv; its loaded rows are the resume cache.
        progress: show a tqdm bar.
        map_fn: how a batch of new configs is evaluated (default: in this process, in order).
        evaluate_at: ``(config, examples) -> raw metrics`` on the first ``examples`` validation
            examples (multi-fidelity strategies), or None.
        max_samples: the examples ``evaluate`` scores (the highest fidelity), or None.
    """

    def __init__(self, space: SearchSpace, encoding: Encoding, settings: Any, evaluate: EvaluateFn,
                 cost: CostFn | None, objectives: Sequence[Objective], constraint: Constraint | None,
                 limit: int | None, history: HistoryFile, progress: bool = False,
                 map_fn: MapFn | None = None, evaluate_at: Callable | None = None,
                 max_samples: int | None = None) -> None:
        self.space, self.encoding, self.settings = space, encoding, settings
        self.objectives = tuple(objectives)
        self.constraint, self.limit, self.history = constraint, limit, history
        self._evaluate, self._cost_fn = evaluate, cost
        # multi-fidelity strategies: ``evaluate_at(config, examples)`` scores the first ``examples``
        # of the ``max_samples`` validation examples that ``evaluate`` scores
        self.evaluate_at, self.max_samples = evaluate_at, max_samples
        self._map = map_fn or timed_map
        self._loaded = {encoding.key(r.config): r for r in history.load()}
        self.records: list[Record] = []
        self._by_key: dict[str, Record] = {}
        self._costs: dict[str, dict[str, float]] = {}
        self._infeasible: set[str] = set()
        self.evaluator_calls = 0
        self.selected: dict[str, Any] | None = None  # a strategy's own answer (the allocator's config)
        self._bar = _progress_bar(progress, limit)

    # ------------------------------------------------------------ state

    @property
    def has_cost(self) -> bool:
        return self._cost_fn is not None

    @property
    def count(self) -> int:
        """Unique configurations evaluated (or taken from the resume cache) so far."""
        return len(self.records)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def done(self) -> bool:
        """The budget is spent, or every configuration was evaluated or found infeasible."""
        return self.exhausted or self.count + len(self._infeasible) >= self.encoding.size

    def record(self, config: Config) -> Record | None:
        """The record of a configuration counted in this search, if any."""
        return self._by_key.get(self.encoding.key(config))

    # ------------------------------------------------------------ cost and constraint

    def cost(self, config: Config) -> dict[str, float]:
        """Cheap metrics of ``config`` from the cost callable (cached); SupernetError without one."""
        key = self.encoding.key(config)
        if key not in self._costs:
            if self._cost_fn is None:
                raise SupernetError("this search needs a cost function (macs, params) for its constraint or budget")
            self._costs[key] = {k: float(v) for k, v in self._cost_fn(config).items()}
        return self._costs[key]

    def violation(self, config: Config) -> float:
        """0 for a feasible configuration, else the constraint violation (> 0)."""
        return 0.0 if self.constraint is None else self.constraint.violation(self.cost(config))

    # ------------------------------------------------------------ evaluation

    def evaluate_many(self, configs: Sequence[Config], generation: int) -> list[Record | None]:
        """Evaluate one batch (a generation); one entry per config, None when not evaluated.

        A config is not evaluated when it violates the constraint or the budget ran out. The
        decisions are made in proposal order first; the new configs are then evaluated together
        through ``map_fn`` (one process, or split across processes) and appended to
        history.csv in proposal order.
        """
        out: list[Record | None] = [None] * len(configs)
        plan: list[tuple[int, str, Config]] = []  # (position in batch, key, config), in counting order
        first: dict[str, int] = {}  # key -> position of its first proposal in this batch
        repeats: list[tuple[int, str]] = []
        for i, config in enumerate(configs):
            key = self.encoding.key(config)
            if key in self._by_key:
                out[i] = self._by_key[key]
            elif key in first:
                repeats.append((i, key))
            elif key in self._infeasible or self.violation(config) > 0:
                self._infeasible.add(key)
            elif self.limit is None or self.count + len(plan) < self.limit:
                first[key] = i
                plan.append((i, key, dict(config)))
        new = []
        for j, (_, key, config) in enumerate(plan):
            if key not in self._loaded:
                if self.count + j < len(self._loaded):
                    raise SupernetError(f"{self.history.path} does not match this search: resuming it proposed "
                                        "new configs before the recorded ones")
                new.append(config)
        results = iter(self._map(self._evaluate, new)) if new else iter(())
        for i, key, config in plan:
            record = self._loaded.get(key)
            if record is None:
                raw, seconds = next(results)
                self.evaluator_calls += 1
                metrics = self._metrics(config, raw)
                record = Record(self.count, generation, config, metrics,
                                tuple(o.value(metrics) for o in self.objectives), seconds)
                self.history.append(record)
            out[i] = self._count(key, record)
        for i, key in repeats:
            out[i] = self._by_key[key]
        return out

    def _count(self, key: str, record: Record) -> Record:
        if record.index != self.count:
            raise SupernetError(
                f"{self.history.path} does not match this search (row {record.index} came up as evaluation "
                f"{self.count}); it was written by different settings or a different evaluator"
            )
        self.records.append(record)
        self._by_key[key] = record
        self._bar.update(1)
        return record

    def _metrics(self, config: Config, raw: Mapping[str, float]) -> dict[str, float]:
        if not isinstance(raw, Mapping):
            raise SupernetError(f"the evaluator must return a dict of metrics, got {type(raw).__name__}")
        metrics = {}
        for k, v in raw.items():
            try:
                metrics[str(k)] = float(v)
            except (TypeError, ValueError):
                raise SupernetError(f"the evaluator's metric {k!r} is not a number: {v!r}") from None
        if self._cost_fn is not None:  # cheap metrics the evaluator did not report
            for k, v in self.cost(config).items():
                metrics.setdefault(k, v)
        clash = [k for k in metrics if k in ("index", "generation", "config", "seconds") or k.startswith("obj_")]
        if clash:
            raise SupernetError(f"metric name {clash[0]!r} is reserved for history.csv columns")
        for o in self.objectives:
            if not math.isfinite(o.value(metrics)):
                raise SupernetError(f"objective {o.name!r} is not finite for config {self.encoding.key(config)}")
        return metrics

    def close(self) -> None:
        self._bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool, total: int | None) -> Any:
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="search", unit="eval")
