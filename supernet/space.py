"""The search space: named, typed dimensions, each with ordered choices, and the configs it admits.

A configuration is a plain JSON dict ``{dimension: choice}``. A dimension
(:class:`~supernet.dimensions.Dimension`) has a kind (``rank``, ``scaling``, ...) that alone
knows what its choices are; the space treats choices as opaque values in their canonical order
(first = the largest sub-network, read by :meth:`SearchSpace.max_config`). The space knows
nothing of torch; the super-network maps each dimension to the adapters it drives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from supernet.dimensions import DEFAULT_KIND, Dimension
from supernet.errors import SupernetError
from supernet.validate import read_json

Config = dict[str, object]


class SearchSpace:
    """An ordered set of dimensions.

    Args:
        choices: ``{name: [choice, ...]}``: rank dimensions (every space before typed
            dimensions existed was this), sorted largest first.
        dimensions: typed :class:`~supernet.dimensions.Dimension` objects (instead of ``choices``).
    """

    def __init__(self, choices: Mapping[str, Sequence[object]] | None = None, *,
                 dimensions: Sequence[Dimension] | None = None) -> None:
        if (choices is None) == (dimensions is None):
            raise SupernetError("a search space takes either choices or dimensions")
        if dimensions is None:
            dimensions = [Dimension(str(g), DEFAULT_KIND, list(v)) for g, v in choices.items()]
        if not dimensions:
            raise SupernetError("the search space has no groups")
        names = [d.name for d in dimensions]
        if len(set(names)) != len(names):
            raise SupernetError(f"duplicate dimension names in the search space: {names}")
        self.dimensions: list[Dimension] = list(dimensions)
        self._by_name = {d.name: d for d in self.dimensions}

    def __repr__(self) -> str:
        return f"SearchSpace({self.to_json()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_json() == other.to_json()

    @property
    def choices(self) -> dict[str, list]:
        """``{name: choices}`` in canonical order."""
        return {d.name: list(d.choices) for d in self.dimensions}

    @property
    def groups(self) -> list[str]:
        """The dimension names, in order (the name predates kinds: every dimension was a rank group)."""
        return list(self._by_name)

    def dimension(self, name: str) -> Dimension:
        return self._by_name[name]

    def max_config(self) -> Config:
        return {d.name: d.choices[0] for d in self.dimensions}

    def min_config(self) -> Config:
        return {d.name: d.choices[-1] for d in self.dimensions}

    def mid_config(self) -> Config:
        """The heuristic midpoint: every dimension takes choice ``(len(choices) - 1) // 2``."""
        return {d.name: d.choices[(len(d.choices) - 1) // 2] for d in self.dimensions}

    def named_config(self, name: str) -> Config:
        """``max``, ``mid`` or ``min``; ``NAME@CHOICE`` sets every dimension whose choices include
        ``CHOICE`` (a scaling mode, say) to it on top of that config, e.g. ``max@rora``."""
        base, _, override = name.partition("@")
        table = {"max": self.max_config, "min": self.min_config, "mid": self.mid_config}
        if base not in table:
            raise SupernetError(f"unknown sub-network {name!r}; use max, mid, min or a JSON file")
        config = table[base]()
        if override:
            hit = [d.name for d in self.dimensions if override in map(str, d.choices)]
            if not hit:
                raise SupernetError(f"no dimension of this space has the choice {override!r}")
            for n in hit:
                config[n] = next(c for c in self._by_name[n].choices if str(c) == override)
        return config

    def sample(self, rng: np.random.Generator) -> Config:
        """One configuration, each dimension's choice drawn uniformly and independently."""
        return {d.name: d.choices[int(rng.integers(len(d.choices)))] for d in self.dimensions}

    def size(self) -> int:
        n = 1
        for d in self.dimensions:
            n *= len(d.choices)
        return n

    def validate(self, config: Mapping[str, object]) -> Config:
        """Return ``config`` with canonical choices, or raise one clear :class:`SupernetError`."""
        if not isinstance(config, Mapping):
            raise SupernetError("a sub-network config must be a JSON object {group: choice}")
        missing = [g for g in self._by_name if g not in config]
        extra = [g for g in config if g not in self._by_name]
        if extra:
            raise SupernetError(f"config names groups this run does not have: {', '.join(map(str, extra[:5]))}")
        if missing:
            raise SupernetError(f"config lacks groups: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        return {d.name: d.parse(config[d.name]) for d in self.dimensions}

    def to_json(self) -> dict:
        """``{"choices": {...}}``, plus ``"kinds"`` for the dimensions that are not ranks: a rank-only
        space is written exactly as before kinds existed, so old searches resume unchanged."""
        data: dict = {"choices": self.choices}
        kinds = {d.name: d.kind for d in self.dimensions if d.kind != DEFAULT_KIND}
        if kinds:
            data["kinds"] = kinds
        return data

    @classmethod
    def from_json(cls, data: dict) -> SearchSpace:
        kinds = data.get("kinds") or {}
        return cls(dimensions=[Dimension(g, kinds.get(g, DEFAULT_KIND), list(v)) for g, v in data["choices"].items()])


def load_config_file(path: str | Path) -> dict:
    """Read a sub-network config from a JSON file, failing with one clear line."""
    data = read_json("sub-network file", path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # accept the records eval and search write
    return data
