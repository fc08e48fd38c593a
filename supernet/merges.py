"""How an adapter's update reaches its frozen base: the merge modes, and every rule about them.

``plain`` adds the update beside the base (merging it densifies a pruned base and leaves the
integer grid); ``sparse`` (SparsePEFT) masks it with the base's non-zero pattern, in training and
at merge; ``qa-sparse`` (QA-SparsePEFT) also puts ``W^p + delta`` through the base's fake
quantisation. ``docs/METHODS.md`` section 2. This file is the one place these rules live:
which base each mode needs, what it allows (input dropout), which export formats can carry it,
and what the compressed format stores for a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from supernet.errors import SupernetError


@dataclass(frozen=True)
class Merge:
    """One merge mode.

    Attributes:
        name: its ``--adapter-merge`` value.
        through_base: the update passes through the base's transform (mask, quantiser), so it is
            folded into the weight in training, at evaluation and at export.
        needs_integers: only on a quantised base (``True``), never on one (``False``), or either (None).
    """

    name: str
    through_base: bool
    needs_integers: bool | None
    hint: str


MODES: dict[str, Merge] = {
    m.name: m for m in (
        Merge("plain", False, None, ""),
        Merge("sparse", True, False, "--adapter-merge sparse on an integer base would leave its grid: use qa-sparse "
                                     "(trained through the quantiser) or plain"),
        Merge("qa-sparse", True, True, "--adapter-merge qa-sparse trains through the quantiser: it needs a quantised "
                                       "base (needs --bits 4 or 8)"),
    )
}
MERGES = tuple(MODES)


def merge_mode(name: str) -> Merge:
    if name not in MODES:
        raise SupernetError(f"unknown adapter merge {name!r}; choose one of {', '.join(MERGES)}")
    return MODES[name]


def check_layer(name: str, integer_base: bool, dropout: float) -> Merge:
    """The merge mode ``name`` for one adapted layer, or one clear error."""
    mode = merge_mode(name)
    if dropout > 0 and mode.through_base:
        raise SupernetError(f"--dropout needs --adapter-merge plain (a {name} update is folded into the weight, "
                            "with no input of its own)")
    if mode.needs_integers is not None and mode.needs_integers != integer_base:
        raise SupernetError(mode.hint)
    return mode


def check_options(name: str, integer_base: bool, pruned: bool, dropout: float) -> Merge:
    """The merge mode of a run's options (``--adapter-merge``), or one clear error: the layer rules,
    and a ``sparse`` update needs a pruned base to take its zeros from."""
    mode = check_layer(name, integer_base, dropout)
    if name == "sparse" and not pruned:
        raise SupernetError("--adapter-merge sparse masks the update with the base's zeros: it needs --sparsity "
                            "or an N:M --pattern")
    return mode


def check_format(fmt: str, name: str, compressed_base: bool) -> None:
    """Refuse, in one line, an export format a run with merge ``name`` cannot produce faithfully."""
    folded = merge_mode(name).through_base
    if fmt == "peft" and (folded or compressed_base):
        why = (f"its {name} updates are masked by the base, which LoRA factors cannot express"
               if folded else "a PEFT adapter loads onto the original dense model, not this run's compressed base")
        hint = "--format merged or compressed" if folded else "--format merged"
        raise SupernetError(f"this run cannot be exported as --format peft: {why}; use {hint}")
    if fmt == "compressed":
        if not compressed_base:
            raise SupernetError("--format compressed needs a run trained on a pruned or quantised base "
                                "(--sparsity / --bits); this run's base is dense")
        if not folded:
            raise SupernetError("--format compressed needs --adapter-merge sparse or qa-sparse: a plain adapter "
                                "merged into a compressed base makes it dense again (use --format merged)")


def stores_integers(name: str, integer_base: bool) -> bool:
    """Whether the merged layer is the base's integers (QA-SparsePEFT on a quantised base): the
    compressed format stores them packed, and a merged float export holds exactly ``s (q - z)``."""
    return integer_base and merge_mode(name).needs_integers is True
