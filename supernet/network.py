"""The super-network: elastic adapters injected into any Hugging Face model.

Target layers are found by name pattern and type, never by attribute path, so BERT
(``query,key,value,dense``), Llama (``q_proj,...,down_proj``) and GPT-2 (``c_attn,...``)
layouts all work. Adapters are grouped; every adapter of a group takes the group's choice.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from supernet import validate
from supernet.adapters import MERGES, SCALINGS, ElasticAdapter, ElasticLoRA
from supernet.bases import FrozenBase, is_adaptable, layer_shape
from supernet.errors import SupernetError
from supernet.space import Config, SearchSpace

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


@dataclass
class SuperNetConfig:
    """What to inject and how the choices are grouped; saved in every run's ``config.json``.

    Args:
        target_modules: name patterns of the layers that get an adapter (``re:`` for regex).
        ranks: the rank choices of every group, e.g. ``[32, 24, 16]``; ``r_max`` is the largest.
        alpha: LoRA alpha; the scale is ``alpha/r_max``, ``alpha/r`` or ``alpha/sqrt(r)``.
        scaling: ``fixed``, ``lora`` or ``rora``.
        dropout: adapter input dropout.
        groups: ``block`` (Q/K/V share a choice per block, gate/up share one, other targets
            one each), ``module`` (every adapter its own group), ``global`` (one group), or
            an explicit ``{group: [patterns]}`` mapping.
        trainable_modules: patterns of whole modules trained alongside the adapters (the
            new classification head); they are shared by all sub-networks.
        merge: how updates reach the frozen bases: ``plain``, ``sparse`` (SparsePEFT) or
            ``qa-sparse`` (QA-SparsePEFT), see :data:`supernet.adapters.MERGES`.
    """

    target_modules: list[str]
    ranks: list[int] = field(default_factory=lambda: [32, 24, 16])
    alpha: float = 32.0
    scaling: str = "lora"
    dropout: float = 0.0
    groups: str | dict[str, list[str]] = "block"
    trainable_modules: list[str] = field(default_factory=list)
    merge: str = "plain"

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise SupernetError("no target modules given")
        self.target_modules = validate.patterns("target_modules", self.target_modules)
        self.trainable_modules = validate.patterns("trainable_modules", self.trainable_modules) \
            if self.trainable_modules else []
        if not self.ranks:
            raise SupernetError("the rank choice list is empty")
        bad = [r for r in self.ranks if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0]
        if bad:
            raise SupernetError(f"ranks must be positive integers, got {bad[0]!r}")
        self.ranks = sorted({int(r) for r in self.ranks}, reverse=True)
        if self.scaling not in SCALINGS:
            raise SupernetError(f"unknown scaling {self.scaling!r}; choose one of {', '.join(SCALINGS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise SupernetError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.merge not in MERGES:
            raise SupernetError(f"unknown adapter merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        if isinstance(self.groups, str) and self.groups not in GROUPINGS:
            raise SupernetError(f"unknown grouping {self.groups!r}; use {', '.join(GROUPINGS)} or a JSON file")
        if isinstance(self.groups, Mapping):
            self.groups = validate.groups_mapping("groups", dict(self.groups))

    @property
    def max_rank(self) -> int:
        return self.ranks[0]


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


def target_layers(model: nn.Module, config: SuperNetConfig) -> dict[str, nn.Module]:
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
    for n, m in targets.items():
        fan_in, fan_out = layer_shape(m)
        if config.max_rank > min(fan_in, fan_out):
            raise SupernetError(f"rank {config.max_rank} exceeds the size of {n} ({fan_out}x{fan_in})")
    return targets


class SuperNetwork:
    """A Hugging Face model with elastic adapters in its target layers.

    The three verbs: :meth:`sample` (a seeded config), :meth:`activate` (set every adapter),
    and the config helpers ``max/min/mid_config``. The wrapped model is an ordinary
    ``nn.Module`` (``self.model``): train it, wrap it in DDP, save its adapter weights.

    Args:
        model: any ``transformers`` model (or plain ``nn.Module``); modified in place.
        config: what to inject and how to group it.
        bases: the frozen base of each target layer by name (pruned or quantised, built by
            :mod:`supernet.compress`); a target not named here keeps a dense base.
    """

    def __init__(self, model: nn.Module, config: SuperNetConfig,
                 bases: Mapping[str, FrozenBase] | None = None) -> None:
        self.model = model
        self.config = config
        targets = list(target_layers(model, config).items())
        bases = dict(bases or {})
        unknown = sorted(set(bases) - {n for n, _ in targets})
        if unknown:
            raise SupernetError(f"a frozen base was given for {unknown[0]!r}, which is not a target layer")
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapters: dict[str, ElasticAdapter] = {}
        for n, m in targets:
            base = bases.get(n, m)
            if isinstance(base, FrozenBase) and base.layer is not m:
                raise SupernetError(f"the frozen base given for {n!r} wraps another layer")
            adapter = ElasticLoRA(base, config.max_rank, config.alpha, config.scaling, config.dropout, config.merge)
            parent_name, _, child = n.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, adapter)
            self.adapters[n] = adapter
        self.head_modules = [
            n for n, m in model.named_modules() if n and any(matches(n, p) for p in config.trainable_modules)
        ]
        for n in self.head_modules:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
        self.groups = assign_groups(list(self.adapters), config.groups)
        self.space = SearchSpace({g: list(config.ranks) for g in self.groups})
        self._rows: dict[int, dict[str, int]] = {}

    # ----------------------------------------------------------------- configs
    def sample(self, rng: np.random.Generator) -> Config:
        return self.space.sample(rng)

    def max_config(self) -> Config:
        return self.space.max_config()

    def min_config(self) -> Config:
        return self.space.min_config()

    def mid_config(self) -> Config:
        return self.space.mid_config()

    def activate(self, config: Mapping[str, object]) -> Config:
        """Set every adapter to its group's choice; returns the validated config."""
        config = self.space.validate(config)
        for group, names in self.groups.items():
            for n in names:
                self.adapters[n].set_active(config[group])
        return config

    @contextlib.contextmanager
    def merged(self):
        """Inside: every adapter's active sub-adapter is folded into a dense weight, so a forward
        pass costs what the base model's does (no gradients reach the adapters). For
        evaluation; leaves the super-network as it was."""
        try:
            for adapter in self.adapters.values():
                adapter.merge_()
            yield self
        finally:
            for adapter in self.adapters.values():
                adapter.unmerge_()

    def reset(self) -> None:
        """Back to the largest sub-network."""
        for adapter in self.adapters.values():
            adapter.reset()

    def active_config(self) -> Config:
        return {g: int(self.adapters[names[0]].active_rank) for g, names in self.groups.items()}

    # ----------------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor (adapter factors at ``r_max``, the head), by parameter name."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise SupernetError(f"adapter weights do not fit this super-network ({detail})")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise SupernetError(
                        f"adapter weight {n!r} has shape {tuple(t.shape)}, expected {tuple(own[n].shape)}"
                    )
                own[n].copy_(t)

    # ----------------------------------------------------------------- costs
    def head_params(self) -> int:
        return sum(p.numel() for n in self.head_modules for p in self.model.get_submodule(n).parameters())

    def trainable_params(self, config: Mapping[str, object] | None = None) -> int:
        """Parameters a sub-network trains and ships on top of the base.

        ``sum over adapters of r * (in + out)`` plus the head (shared by every sub-network).
        """
        config = self.active_config() if config is None else self.space.validate(config)
        total = self.head_params()
        for group, names in self.groups.items():
            total += sum(self.adapters[n].adapter_params(config[group]) for n in names)
        return total

    def _inside_adapter(self, name: str) -> bool:
        return any(name.startswith(a + ".") for a in self.adapters)

    def _linear_rows(self, seq_len: int) -> dict[str, int]:
        """Rows (tokens) each linear layer and each adapter sees for one sequence of ``seq_len`` tokens."""
        if seq_len in self._rows:
            return self._rows[seq_len]
        rows: dict[str, int] = {}
        hooks = []
        for name, module in self.model.named_modules():
            if isinstance(module, ElasticAdapter) or is_adaptable(module) and not self._inside_adapter(name):
                fan_in = module.in_features if isinstance(module, ElasticAdapter) else layer_shape(module)[0]

                def hook(mod, inputs, output, name=name, fan_in=fan_in):
                    rows[name] = rows.get(name, 0) + inputs[0].numel() // fan_in

                hooks.append(module.register_forward_hook(hook))
        device = next(self.model.parameters()).device
        ids = torch.ones(1, seq_len, dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        self._rows[seq_len] = rows
        return rows

    def macs(self, config: Mapping[str, object] | None = None, seq_len: int = 64, merged: bool = False) -> int:
        """Multiply-accumulates of one forward pass over one sequence of ``seq_len`` tokens.

        ``docs/METHODS.md`` section 3: a linear layer costs ``rows * in * out`` (rows = the
        tokens it sees, measured once with hooks: all ``seq_len`` for block layers, one for a
        pooler or classifier on the first token); an adapted layer asks its adapter, which counts
        its base's non-zeros (a pruned base costs ``rows * nnz(W)``) and, unless merged,
        ``rows * r * (in + out)``; attention adds ``2 * T^2 * d`` per layer (scores and
        weighted sum). Embeddings, norms and softmax are not counted. ``merged``: the adapters
        are folded into the base weights (an exported merged model), so they add nothing.
        """
        config = self.active_config() if config is None else self.space.validate(config)
        rows = self._linear_rows(seq_len)
        total = 0
        for name, module in self.model.named_modules():
            if is_adaptable(module) and not self._inside_adapter(name):
                fan_in, fan_out = layer_shape(module)
                total += rows.get(name, 0) * fan_in * fan_out
        for group, names in self.groups.items():
            for n in names:
                total += rows.get(n, 0) * self.adapters[n].macs_per_token(config[group], merged=merged)
        cfg = getattr(self.model, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        layers = getattr(cfg, "num_hidden_layers", None)
        if hidden and layers:
            total += 2 * seq_len * seq_len * hidden * layers
        return int(total)

    def size(self, config: Mapping[str, object] | None = None, merged: bool | None = None) -> int:
        """Deployed bytes of the sub-network: every parameter outside the adapted layers at its
        dtype, plus each adapted layer as it ships (its base at its precision and sparsity, and
        the adapter merged into it or beside it). ``merged`` None: merged when the updates pass
        through the bases (they are always folded in), else the compressed base with the factors."""
        config = self.active_config() if config is None else self.space.validate(config)
        merged = self.config.merge != "plain" if merged is None else merged
        total = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                    if not self._inside_adapter(n))
        for group, names in self.groups.items():
            for n in names:
                total += self.adapters[n].nbytes(config[group], merged=merged)
        return int(total)

    def describe(self) -> dict:
        """A JSON summary: groups, their modules, and the size of the space."""
        return {
            "groups": self.groups,
            "choices": self.space.choices,
            "num_adapters": len(self.adapters),
            "space_size": self.space.size(),
        }

