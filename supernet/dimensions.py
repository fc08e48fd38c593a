"""Kinds of searchable dimension: what a choice is, how choices are ordered, how one is read.

A configuration is ``{dimension name: choice}``. Every dimension has a *kind* from
:data:`DIMENSION_KINDS`; the kind alone knows what its choices are: ``rank`` (positive
integers, largest first: the first choice is the largest sub-network) and ``scaling`` (the
scaling mode of a low-rank update, in the order the user gave). The order is the one
``max`` / ``mid`` / ``min`` read (first, middle, last) and the one the search encodes (index 0
is the first choice). Nothing outside this file asks what kind a dimension is: the space,
the sampler, the search encoding, the allocator, history files and plots handle choices as
opaque JSON values in this order; the adapters a dimension drives receive ``{kind: choice}``.

``width`` and ``heads`` (fractions of a block's feed-forward neurons and attention heads kept,
larger first) are dimensions of the frozen base, not of an adapter: :mod:`supernet.width`
drives them. A new kind (subspace union, say) is a class here with ``name``, ``parse`` and
``order``, added with :func:`register_dimension_kind`. Torch-free, so the search and the plot
data import it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from supernet.errors import SupernetError

#: The scaling modes of a low-rank update ``s * B A``: ``fixed`` = alpha/r_max, ``lora`` = alpha/r,
#: ``rora`` = alpha/sqrt(r) (``docs/METHODS.md`` section 1).
SCALINGS = ("fixed", "lora", "rora")


class DimensionKind:
    """The interface of a dimension kind (a stateless singleton)."""

    name = ""

    def parse(self, value: object) -> object:
        """``value`` as this kind's canonical JSON choice, or one clear :class:`SupernetError`."""
        raise NotImplementedError

    def order(self, choices: Sequence[object]) -> list:
        """The choices, deduplicated, in canonical order (first = what ``max`` takes)."""
        raise NotImplementedError


class RankKind(DimensionKind):
    """A rank: a positive integer; larger first."""

    name = "rank"

    def parse(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
            raise SupernetError(f"a rank must be a positive integer, got {value!r}")
        return int(value)

    def order(self, choices: Sequence[object]) -> list:
        return sorted({self.parse(c) for c in choices}, reverse=True)


class ScalingKind(DimensionKind):
    """A scaling mode, one of :data:`SCALINGS`; kept in the order given (the first is ``max``'s)."""

    name = "scaling"

    def parse(self, value: object) -> str:
        if not isinstance(value, str) or value not in SCALINGS:
            raise SupernetError(f"unknown scaling {value!r}; choose one of {', '.join(SCALINGS)}")
        return value

    def order(self, choices: Sequence[object]) -> list:
        return list(dict.fromkeys(self.parse(c) for c in choices))


class FractionKind(DimensionKind):
    """A fraction of a structure kept, in ``(0, 1]``; larger first. Which counts it may give (whole
    neurons, whole heads per KV group, whole quantisation groups) the model decides:
    :mod:`supernet.width` checks every choice against the layers it cuts."""

    what = ""

    def parse(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise SupernetError(f"a {self.what} fraction must be a number in (0, 1], got {value!r}")
        f = float(value)
        if not 0.0 < f <= 1.0:
            raise SupernetError(f"a {self.what} fraction must be in (0, 1], got {value!r}")
        return f

    def order(self, choices: Sequence[object]) -> list:
        return sorted({self.parse(c) for c in choices}, reverse=True)


class WidthKind(FractionKind):
    """Elastic width (LoNAS): the fraction of a feed-forward block's intermediate neurons kept."""

    name, what = "width", "width"


class HeadsKind(FractionKind):
    """Elastic heads: the fraction of a block's attention heads kept (within each KV group)."""

    name, what = "heads", "heads"


class CoreKind(FractionKind):
    """The fraction of a JACTUS layer's allocated core rank kept (a prefix of its components)."""

    name, what = "core", "core"


DIMENSION_KINDS: dict[str, DimensionKind] = {}
#: The kind of a dimension a space file names without one (every space written before kinds existed).
DEFAULT_KIND = "rank"
RANK_KIND, SCALING_KIND, WIDTH_KIND, HEADS_KIND = "rank", "scaling", "width", "heads"


def register_dimension_kind(kind: DimensionKind) -> DimensionKind:
    """Add a kind to :data:`DIMENSION_KINDS` (its ``name`` must be new)."""
    if not kind.name or kind.name in DIMENSION_KINDS:
        raise SupernetError(f"dimension kind {kind.name!r} is empty or already registered")
    DIMENSION_KINDS[kind.name] = kind
    return kind


register_dimension_kind(RankKind())
register_dimension_kind(ScalingKind())
register_dimension_kind(WidthKind())
register_dimension_kind(HeadsKind())
register_dimension_kind(CoreKind())


def dimension_kind(name: str) -> DimensionKind:
    if name not in DIMENSION_KINDS:
        raise SupernetError(f"unknown dimension kind {name!r}; known: {', '.join(DIMENSION_KINDS)}")
    return DIMENSION_KINDS[name]


@dataclass
class Dimension:
    """One searchable dimension.

    Args:
        name: its key in a configuration (a rank group keeps its group's name, e.g. ``L3.qkv``).
        kind: a key of :data:`DIMENSION_KINDS`.
        choices: its choices; put in the kind's canonical order.
        modules: the adapted modules whose choice it sets (filled by the super-network; empty in
            a space read from a file).
    """

    name: str
    kind: str
    choices: list
    modules: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SupernetError(f"a dimension needs a name, got {self.name!r}")
        if not self.choices:
            raise SupernetError(f"dimension {self.name!r} has an empty choice list")
        self.choices = dimension_kind(self.kind).order(self.choices)
        self.modules = tuple(self.modules)

    def parse(self, value: object) -> object:
        """``value`` if it is one of the choices (canonical form), else one clear error."""
        try:
            choice = dimension_kind(self.kind).parse(value)
        except SupernetError as e:
            raise SupernetError(f"{self.name!r}: {e}") from None
        if choice not in self.choices:
            raise SupernetError(f"{self.name!r}: choice {value!r} is not one of {self.choices}")
        return choice
