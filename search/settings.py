"""The settings of one search, validated on construction and stored in search.json."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supernet import validate
from supernet.errors import SupernetError

from .encoding import parse_constraint
from .objectives import resolve_objectives

_BUDGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:<=|=)\s*(\S+)\s*$")


def parse_budget(text: str | tuple | list | None) -> tuple[str, float] | None:
    """``"macs=7.6e8"``, ``"macs<=7.6e8"`` or ``("macs", 7.6e8)`` -> ``("macs", 7.6e8)``; ``None`` stays None."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):
        if len(text) != 2 or not isinstance(text[0], str):
            raise SupernetError(f"malformed budget {text!r}: expected (METRIC, NUMBER), e.g. ('macs', 7.6e8)")
        key, raw = text[0], text[1]
    else:
        m = _BUDGET.match(str(text))
        if m is None:
            raise SupernetError(f"malformed budget {text!r}: expected METRIC=NUMBER, e.g. macs=7.6e8")
        key, raw = m.group(1), m.group(2)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or isinstance(raw, bool):
        raise SupernetError(f"malformed budget {text!r}: the limit must be a finite number")
    return key, value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SupernetError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SearchSettings:
    """Every setting of a search; two searches with equal settings (and space) are the same search.

    The field defaults are ``supernet search``'s defaults too (its ``--help`` text is built from
    them, and a test checks the README against them): change them here and nowhere else.

    Attributes:
        objectives: two or more names from ``OBJECTIVES`` (a comma-separated string is accepted).
        algorithm: a name from ``STRATEGIES``.
        population: individuals per generation (pymoo) or evaluations per batch (random, grid), >= 2.
        evaluations: budget of unique evaluations, >= population (ignored by grid, midpoint, allocator).
        seed: seeds the stochastic strategies (pymoo algorithms, random).
        constraint: e.g. ``"macs<=7.6e8,params<=1e6"`` on the cost callable's metrics, or None.
        budget: ``(metric, limit)`` for the allocator, e.g. ``("macs", 7.6e8)``; only with ``allocator``.
        extra: opaque JSON settings stored and compared on resume (e.g. run, split, eval_samples).
    """

    objectives: tuple[str, ...] = ("acc", "macs")
    algorithm: str = "nsga2"
    population: int = 16
    evaluations: int = 96
    seed: int = 0
    constraint: str | None = None
    budget: tuple[str, float] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .strategies import STRATEGIES

        objectives = tuple(o.name for o in resolve_objectives(self.objectives))
        object.__setattr__(self, "objectives", objectives)
        if self.algorithm not in STRATEGIES:
            raise SupernetError(f"unknown algorithm {self.algorithm!r}; use one of {', '.join(STRATEGIES)}")
        population = _integer("population", self.population)
        evaluations = _integer("evaluations", self.evaluations)
        seed = _integer("seed", self.seed)
        validate.seed("--seed", seed)  # the one seed rule, as train's
        for name, value in (("population", population), ("evaluations", evaluations), ("seed", seed)):
            object.__setattr__(self, name, value)
        if population < 2:
            raise SupernetError(f"population must be at least 2, got {population}")
        if evaluations < population:
            raise SupernetError(f"evaluations ({evaluations}) must be at least the population ({population})")
        parse_constraint(self.constraint)
        object.__setattr__(self, "budget", parse_budget(self.budget))
        self._check_budget()
        try:
            extra = json.loads(json.dumps(dict(self.extra), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise SupernetError(f"extra search settings must be JSON values: {e}") from None
        object.__setattr__(self, "extra", extra)

    def _check_budget(self) -> None:
        if self.algorithm == "allocator":
            if self.budget is None:
                raise SupernetError("the allocator needs a budget, e.g. macs=7.6e8 or params=1e6")
            if self.constraint:
                raise SupernetError("the allocator takes a budget, not a constraint")
        elif self.budget is not None:
            raise SupernetError(f"a budget applies only to the allocator, not to {self.algorithm!r}")

    def to_json(self) -> dict[str, Any]:
        """A plain JSON object (as written into search.json)."""
        return {
            "objectives": list(self.objectives), "algorithm": self.algorithm, "population": self.population,
            "evaluations": self.evaluations, "seed": self.seed, "constraint": self.constraint,
            "budget": None if self.budget is None else [self.budget[0], self.budget[1]], "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SearchSettings:
        """Inverse of :meth:`to_json`; unknown or ill-typed fields raise SupernetError."""
        known = {"objectives", "algorithm", "population", "evaluations", "seed", "constraint", "budget", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SupernetError(f"unknown search settings: {', '.join(unknown)}")
        return cls(**{k: (tuple(v) if k == "objectives" else v) for k, v in data.items()})
