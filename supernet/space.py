"""The search space: named groups, each with a list of choices, and the configs it admits.

A configuration is a plain JSON dict ``{group_name: choice}``. The space knows nothing of
torch; the super-network maps each group to its adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from supernet.errors import SupernetError
from supernet.validate import read_json

Config = dict[str, int]


@dataclass
class SearchSpace:
    """Choices per group, each list sorted from largest to smallest.

    Args:
        choices: ``{group_name: [choice, ...]}``; order of groups is kept.
    """

    choices: dict[str, list[int]]

    def __post_init__(self) -> None:
        if not self.choices:
            raise SupernetError("the search space has no groups")
        clean: dict[str, list[int]] = {}
        for group, values in self.choices.items():
            if not values:
                raise SupernetError(f"group {group!r} has an empty choice list")
            clean[group] = sorted({int(v) for v in values}, reverse=True)
        self.choices = clean

    @property
    def groups(self) -> list[str]:
        return list(self.choices)

    def max_config(self) -> Config:
        return {g: c[0] for g, c in self.choices.items()}

    def min_config(self) -> Config:
        return {g: c[-1] for g, c in self.choices.items()}

    def mid_config(self) -> Config:
        """The heuristic midpoint: every group takes choice ``(len(choices) - 1) // 2``."""
        return {g: c[(len(c) - 1) // 2] for g, c in self.choices.items()}

    def named_config(self, name: str) -> Config:
        table = {"max": self.max_config, "min": self.min_config, "mid": self.mid_config}
        if name not in table:
            raise SupernetError(f"unknown sub-network {name!r}; use max, mid, min or a JSON file")
        return table[name]()

    def sample(self, rng: np.random.Generator) -> Config:
        """One configuration, each group's choice drawn uniformly and independently."""
        return {g: int(c[rng.integers(len(c))]) for g, c in self.choices.items()}

    def size(self) -> int:
        n = 1
        for c in self.choices.values():
            n *= len(c)
        return n

    def validate(self, config: Mapping[str, object]) -> Config:
        """Return ``config`` as ``{group: int}`` or raise one clear :class:`SupernetError`."""
        if not isinstance(config, Mapping):
            raise SupernetError("a sub-network config must be a JSON object {group: choice}")
        missing = [g for g in self.choices if g not in config]
        extra = [g for g in config if g not in self.choices]
        if extra:
            raise SupernetError(f"config names groups this run does not have: {', '.join(map(str, extra[:5]))}")
        if missing:
            raise SupernetError(f"config lacks groups: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        out: Config = {}
        for g, allowed in self.choices.items():
            v = config[g]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) not in allowed:
                raise SupernetError(f"group {g!r}: choice {v!r} is not one of {allowed}")
            out[g] = int(v)
        return out

    def to_json(self) -> dict:
        return {"choices": self.choices}

    @classmethod
    def from_json(cls, data: dict) -> SearchSpace:
        return cls(choices={g: list(v) for g, v in data["choices"].items()})


def load_config_file(path: str | Path) -> dict:
    """Read a sub-network config from a JSON file, failing with one clear line."""
    data = read_json("sub-network file", path)
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # accept the records eval and search write
    return data
