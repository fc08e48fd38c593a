"""The super-network: elastic adapters injected into any Hugging Face model.

The layers that get one and their groups come from :mod:`supernet.targets`; the adapter kind
from :mod:`supernet.adapters`. Each group gets one dimension per dimension kind its adapter
kind has (:mod:`supernet.dimensions`): a configuration ``{dimension: choice}`` sets every
adapter a dimension drives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from supernet import validate
from supernet.adapters import ADAPTER_KINDS, ElasticAdapter, adapter_kind
from supernet.bases import FrozenBase, is_adaptable, layer_shape
from supernet.dimensions import DEFAULT_KIND, SCALINGS, Dimension
from supernet.errors import SupernetError
from supernet.merges import MERGES
from supernet.space import Config, SearchSpace
from supernet.targets import (  # noqa: F401 (re-exported: the targeting API predates its own module)
    DEFAULT_TARGETS,
    GROUPINGS,
    SHARED_ROLES,
    assign_groups,
    default_targets,
    matches,
    target_layers,
)

#: How a dimension other than the rank spreads: one per group, or one for the whole network.
SPREADS = ("group", "global")


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
            ``qa-sparse`` (QA-SparsePEFT), see :mod:`supernet.merges`.
        adapter: the adapter kind, a name in :data:`supernet.adapters.ADAPTER_KINDS`.
        scalings: the scaling modes searched (two or more; ``scaling`` is then the first);
            empty: the one mode ``scaling``.
        scaling_per: ``group`` (each group its own mode) or ``global`` (one mode for the network).
    """

    target_modules: list[str]
    ranks: list[int] = field(default_factory=lambda: [32, 24, 16])
    alpha: float = 32.0
    scaling: str = "lora"
    dropout: float = 0.0
    groups: str | dict[str, list[str]] = "block"
    trainable_modules: list[str] = field(default_factory=list)
    merge: str = "plain"
    adapter: str = "lora"
    scalings: list[str] = field(default_factory=list)
    scaling_per: str = "group"

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
        if isinstance(self.scalings, str) or not isinstance(self.scalings, (list, tuple)):
            raise SupernetError(f"scalings must be a list of modes, got {self.scalings!r}")
        for mode in self.scalings:
            if mode not in SCALINGS:
                raise SupernetError(f"unknown scaling {mode!r} in --scalings; choose from {', '.join(SCALINGS)}")
        self.scalings = list(dict.fromkeys(self.scalings))
        if len(self.scalings) == 1:  # one mode is no dimension
            self.scaling, self.scalings = self.scalings[0], []
        elif self.scalings:
            self.scaling = self.scalings[0]
        if self.scaling_per not in SPREADS:
            raise SupernetError(f"unknown --scaling-per {self.scaling_per!r}; use {' or '.join(SPREADS)}")
        if self.adapter not in ADAPTER_KINDS:
            adapter_kind(self.adapter)  # the one clear error
        if not 0.0 <= self.dropout < 1.0:
            raise SupernetError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.merge not in MERGES:
            raise SupernetError(f"unknown adapter merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        if isinstance(self.groups, str) and self.groups not in GROUPINGS:
            raise SupernetError(f"unknown grouping {self.groups!r}; use {', '.join(GROUPINGS)} or a JSON file")
        if isinstance(self.groups, Mapping):
            self.groups = validate.groups_mapping("groups", dict(self.groups))

    @property
    def global_kinds(self) -> set[str]:
        """Dimension kinds that are one dimension for the whole network rather than one per group."""
        return {"scaling"} if self.scaling_per == "global" else set()

    @property
    def max_rank(self) -> int:
        return self.ranks[0]



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
        kind = adapter_kind(config.adapter)
        for n, m in targets:
            base = bases.get(n, m)
            if base is not m and getattr(base, "layer", None) is not m:
                raise SupernetError(f"the frozen base given for {n!r} wraps another layer")
            adapter = kind.build(base, config)
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
        self.space = SearchSpace(dimensions=self._dimensions(kind))
        self._rows: dict[int, dict[str, int]] = {}
        self._active = self.space.max_config()

    def _dimensions(self, kind) -> list[Dimension]:
        """Per group, one dimension for each dimension kind the adapter kind has: the primary one
        (a rank) named after the group, as every run before kinds existed; the others
        ``GROUP:KIND``, or one ``KIND`` for the whole network (``SuperNetConfig.global_kinds``)."""
        dims: dict[str, Dimension] = {}
        for group, names in self.groups.items():
            for i, (dim_kind, choices) in enumerate(kind.dimensions(self.config).items()):
                if i == 0 and dim_kind == DEFAULT_KIND:
                    name = group
                elif dim_kind in self.config.global_kinds:
                    name = dim_kind
                else:
                    name = f"{group}:{dim_kind}"
                if name in dims:
                    dims[name].modules += tuple(names)
                else:
                    dims[name] = Dimension(name, dim_kind, list(choices), tuple(names))
        return list(dims.values())

    def adapter_choices(self, config: Mapping[str, object]) -> dict[str, dict[str, object]]:
        """``{module: {dimension kind: choice}}`` of a validated config: what each adapter is given."""
        out: dict[str, dict[str, object]] = {n: {} for n in self.adapters}
        for dim in self.space.dimensions:
            for n in dim.modules:
                out[n][dim.kind] = config[dim.name]
        return out

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
        for n, choices in self.adapter_choices(config).items():
            self.adapters[n].set_active(choices)
        self._active = config
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
        self.activate(self.space.max_config())

    def active_config(self) -> Config:
        """The configuration last activated (the largest until one is)."""
        return dict(self._active)

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
        """Parameters a sub-network trains on top of the base: each adapter's at its choice
        (LoRA: ``r * (in + out)``) plus the head (shared by every sub-network)."""
        config = self.active_config() if config is None else self.space.validate(config)
        choices = self.adapter_choices(config)
        return self.head_params() + sum(a.adapter_params(choices[n]) for n, a in self.adapters.items())

    def shipped_params(self, config: Mapping[str, object] | None = None) -> int:
        """Parameters a sub-network ships beside the base (the ``params`` objective): as
        :meth:`trainable_params`, but an update folded into its base (``sparse``, ``qa-sparse``)
        ships no factors of its own."""
        config = self.active_config() if config is None else self.space.validate(config)
        choices = self.adapter_choices(config)
        return self.head_params() + sum(a.shipped_params(choices[n]) for n, a in self.adapters.items())

    def _inside_adapter(self, name: str) -> bool:
        return any(name.startswith(a + ".") for a in self.adapters)

    def _linear_rows(self, seq_len: int) -> dict[str, int]:
        """Rows (tokens) each linear layer and each adapter sees for one sequence of ``seq_len`` tokens."""
        if seq_len in self._rows:
            return self._rows[seq_len]
        rows: dict[str, int] = {}
        hooks = []
        for name, module in self.model.named_modules():
            if name in self.adapters or is_adaptable(module) and not self._inside_adapter(name):
                fan_in = module.in_features if name in self.adapters else layer_shape(module)[0]

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
        for n, choices in self.adapter_choices(config).items():
            total += rows.get(n, 0) * self.adapters[n].macs_per_token(choices, merged=merged)
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
        for n, choices in self.adapter_choices(config).items():
            total += self.adapters[n].nbytes(choices, merged=merged)
        return int(total)

    def describe(self) -> dict:
        """A JSON summary: groups, their modules, and the size of the space."""
        return {
            "groups": self.groups,
            "choices": self.space.choices,
            **({"kinds": self.space.to_json()["kinds"]} if "kinds" in self.space.to_json() else {}),
            "num_adapters": len(self.adapters),
            "space_size": self.space.size(),
        }

