"""Which layers get an adapter, and how adapters are grouped into one choice.

Target layers are found by name pattern and type, never by attribute path, so BERT
(``query,key,value,dense``), Llama (``q_proj,...,down_proj``) and GPT-2 (``c_attn,...``)
layouts all work. Adapters are grouped; every adapter of a group takes the group's choices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from supernet.bases import is_adaptable, layer_shape
from supernet.errors import SupernetError

# Default targets by the module names a layout has: every projection inside the blocks.
DEFAULT_TARGETS = (
    ("q_proj", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("query", ["query", "key", "value", "dense"]),
    ("c_attn", ["c_attn", "c_proj", "c_fc"]),
)
# Within one block, modules whose last name is in one of these sets share one group, as in
# Shears (Q/K/V take one rank, gate/up another); every other target is a group of its own.
SHARED_ROLES = {
    "qkv": {"query", "key", "value", "q_proj", "k_proj", "v_proj"},
    "up": {"gate_proj", "up_proj"},
}
GROUPINGS = ("block", "module", "global")
_BLOCK = re.compile(r"\.(\d+)\.")


def matches(name: str, pattern: str) -> bool:
    """PEFT-style match: ``re:<regex>`` matches the full name, else a dotted-suffix match."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def default_targets(model: nn.Module) -> list[str]:
    """One ``re:`` pattern for the layout's projections *inside numbered blocks*: a pooler or a
    head that happens to share a leaf name (BERT's ``pooler.dense``) is not a block projection
    and acts on one token, so it is left out (target it explicitly if you want it)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for key, targets in DEFAULT_TARGETS:
        if key in leaves:
            return [r"re:.*\.\d+\.(?:.*\.)?(?:" + "|".join(targets) + ")"]
    raise SupernetError("cannot guess target modules for this architecture; pass --target-modules")


def _block_group(name: str, short: bool) -> str:
    """``L3.qkv`` style names; with several stacks of blocks (encoder and decoder, say) the
    stack's path is kept: ``model.decoder.layers.3.qkv``."""
    m = _BLOCK.search(name)
    if m is None:
        return name
    block = f"L{m.group(1)}" if short else name[: m.end() - 1]
    leaf = name.rsplit(".", 1)[-1]
    for role, leaves in SHARED_ROLES.items():
        if leaf in leaves:
            return f"{block}.{role}"
    return f"{block}.{name[m.end():]}"


def assign_groups(names: list[str], groups: str | Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Map each group name to its module names (order of ``names`` kept)."""
    out: dict[str, list[str]] = {}
    if groups == "module":
        return {n: [n] for n in names}
    if groups == "global":
        return {"all": list(names)}
    if groups == "block":
        stacks = {n[: m.start()] for n in names if (m := _BLOCK.search(n))}
        for n in names:
            out.setdefault(_block_group(n, short=len(stacks) <= 1), []).append(n)
        return out
    owner: dict[str, str] = {}
    for g, patterns in groups.items():
        hit = [n for n in names if any(matches(n, p) for p in patterns)]
        if not hit:
            raise SupernetError(f"group {g!r} names no target module (patterns {list(patterns)})")
        for n in hit:
            if n in owner:
                raise SupernetError(f"module {n!r} is in two groups: {owner[n]!r} and {g!r}")
            owner[n] = g
        out[g] = hit
    orphans = [n for n in names if n not in owner]
    if orphans:
        raise SupernetError(f"target module {orphans[0]!r} is in no group ({len(orphans)} such)")
    return out


def target_layers(model: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The layers that get an adapter, by name: linear layers matching the target patterns,
    outside the trained head, each wide enough for ``r_max``."""

    def in_head(name: str) -> bool:  # the module or one of its parents is trained whole
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(matches(q, p) for q in prefixes for p in config.trainable_modules)

    targets = {
        n: m
        for n, m in model.named_modules()
        if n and is_adaptable(m) and any(matches(n, p) for p in config.target_modules) and not in_head(n)
    }
    if not targets:
        linear = [n for n, m in model.named_modules() if is_adaptable(m)][:4]
        raise SupernetError(
            f"target patterns {config.target_modules} match no linear module "
            f"(this model has e.g. {', '.join(linear)})"
        )
    from supernet.adapters import adapter_kind

    ranked = "rank" in adapter_kind(getattr(config, "adapter", "lora")).dimensions(config)  # not JACTUS' cores
    for n, m in targets.items():
        fan_in, fan_out = layer_shape(m)
        if ranked and config.max_rank > min(fan_in, fan_out):
            raise SupernetError(f"rank {config.max_rank} exceeds the size of {n} ({fan_out}x{fan_in})")
    return targets


