"""Integer encoding of a search space, and constraints on cheap metrics.

Every searchable dimension is a :class:`Variable`: a name and an ordered tuple of choices. A
point of the encoding is an integer vector holding, per variable, the index of its choice. For
a :class:`~supernet.space.SearchSpace` there is one variable per group, its choices sorted
largest to smallest, so index 0 is the largest rank. Later dimensions (scaling mode, subspace
settings, widths) are more variables; no code here looks at what a variable means.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from supernet.errors import SupernetError
from supernet.space import Config, SearchSpace

#: A cost callable: configuration -> cheap metrics computed without the model (e.g. macs, params).
CostFn = Callable[[Config], Mapping[str, float]]


@dataclass(frozen=True)
class Variable:
    """One searchable dimension: a name and its choices, in encoding order."""

    name: str
    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise SupernetError(f"variable {self.name!r} has no choices")

    @property
    def size(self) -> int:
        return len(self.choices)

    def index(self, value: object) -> int:
        """The position of ``value`` among the choices, or one clear error."""
        try:
            return self.choices.index(value)  # type: ignore[arg-type]
        except ValueError:
            raise SupernetError(f"{self.name!r}: choice {value!r} is not one of {list(self.choices)}") from None


@dataclass(frozen=True)
class Encoding:
    """Configurations <-> integer vectors (one index per variable)."""

    variables: tuple[Variable, ...]

    @classmethod
    def from_space(cls, space: SearchSpace, extra: Sequence[Variable] = ()) -> Encoding:
        """One variable per group of ``space`` (choices largest first), then ``extra`` variables."""
        variables = tuple(Variable(g, tuple(c)) for g, c in space.choices.items()) + tuple(extra)
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise SupernetError(f"duplicate variable names in the search encoding: {names}")
        return cls(variables)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variables]

    @property
    def n_var(self) -> int:
        return len(self.variables)

    @property
    def lower(self) -> np.ndarray:
        """Inclusive lower bounds of the integer vector (all zero)."""
        return np.zeros(self.n_var, dtype=np.int64)

    @property
    def upper(self) -> np.ndarray:
        """Inclusive upper bounds: the last choice index of each variable."""
        return np.array([v.size - 1 for v in self.variables], dtype=np.int64)

    @property
    def size(self) -> int:
        """Number of configurations (an exact Python int)."""
        return math.prod(v.size for v in self.variables)

    def encode(self, config: Mapping[str, object]) -> np.ndarray:
        """``{name: choice}`` -> integer vector of choice indices."""
        missing = [v.name for v in self.variables if v.name not in config]
        extra = [k for k in config if k not in set(self.names)]
        if missing or extra:
            raise SupernetError(f"config does not fit the search space (missing {missing[:5]}, unknown {extra[:5]})")
        return np.array([v.index(config[v.name]) for v in self.variables], dtype=np.int64)

    def decode(self, x: Sequence[float] | np.ndarray) -> Config:
        """Integer (or integral float) vector -> ``{name: choice}``; out-of-range indices are an error."""
        values = np.asarray(x, dtype=float).reshape(-1)
        if values.size != self.n_var:
            raise SupernetError(f"expected {self.n_var} variables, got {values.size}")
        config: Config = {}
        for v, raw in zip(self.variables, values, strict=True):
            i = int(round(float(raw)))
            if not 0 <= i < v.size:
                raise SupernetError(f"{v.name!r}: index {i} is outside 0..{v.size - 1}")
            config[v.name] = v.choices[i]
        return config

    def key(self, config: Mapping[str, object]) -> str:
        """Canonical JSON of a configuration (variables in encoding order): the cache key."""
        return json.dumps({v.name: config[v.name] for v in self.variables}, separators=(",", ":"))

    def config_at(self, flat: int) -> Config:
        """The ``flat``-th configuration of :meth:`all_configs` (mixed radix, first variable slowest)."""
        x = []
        for v in reversed(self.variables):
            flat, i = divmod(int(flat), v.size)
            x.append(i)
        return self.decode(x[::-1])

    def all_configs(self) -> Iterator[Config]:
        """Every configuration in a fixed order: ``itertools.product`` of the choice indices."""
        for x in itertools.product(*(range(v.size) for v in self.variables)):
            yield self.decode(x)

    def neighbours(self, config: Mapping[str, object]) -> list[Config]:
        """Configurations that move one variable by one step: per variable, the larger choice then the smaller."""
        x = self.encode(config)
        out = []
        for j in range(self.n_var):
            for step in (-1, 1):
                y = x.copy()
                y[j] += step
                if 0 <= y[j] <= self.upper[j]:
                    out.append(self.decode(y))
        return out


# ---------------------------------------------------------------- constraints

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}
_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(\S+)\s*$")
_FORMAT = "expected METRIC<=NUMBER (or <, >=, >), several joined by ',', e.g. 'macs<=7.6e8,params<=1e6'"


@dataclass(frozen=True)
class Bound:
    """One term ``metric op value`` of a constraint."""

    metric: str
    op: str
    value: float

    def violation(self, metrics: Mapping[str, float]) -> float:
        """0 when satisfied, else the excess relative to ``|value|`` (at least 1e-12)."""
        if self.metric not in metrics:
            raise SupernetError(
                f"constraint on {self.metric!r}, which the cost function does not give "
                f"(it gives {', '.join(sorted(metrics)) or 'nothing'})"
            )
        got = float(metrics[self.metric])
        if _OPS[self.op](got, self.value):
            return 0.0
        return max(abs(got - self.value) / max(abs(self.value), 1e-12), 1e-12)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Constraint:
    """A conjunction of bounds on cheap metrics (from the cost callable)."""

    bounds: tuple[Bound, ...]

    @property
    def metrics(self) -> list[str]:
        return [b.metric for b in self.bounds]

    def violation(self, metrics: Mapping[str, float]) -> float:
        """Sum of the relative violations of every bound: 0 exactly when the constraint holds."""
        return float(sum(b.violation(metrics) for b in self.bounds))

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)


def parse_constraint(text: str | None) -> Constraint | None:
    """Parse ``"macs<=7.6e8,params<1e6"``; ``None`` or blank gives ``None``; bad text raises SupernetError."""
    if text is None or not str(text).strip():
        return None
    bounds = []
    for part in str(text).split(","):
        m = _TERM.match(part)
        value = _number(m.group(3)) if m else None
        if m is None or value is None:
            raise SupernetError(f"malformed constraint {text!r}: {_FORMAT}")
        bounds.append(Bound(m.group(1), m.group(2), value))
    return Constraint(tuple(bounds))


def _number(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
