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
from supernet.bases import FrozenBase
from supernet.costs import CostsMixin
from supernet.dimensions import DEFAULT_KIND, HEADS_KIND, SCALINGS, WIDTH_KIND, Dimension, dimension_kind
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
        widths: fractions of each block's FFN neurons searched (elastic width, :mod:`supernet.width`);
            empty: the base keeps its width.
        heads: fractions of each block's attention heads searched; empty: every head.
        width_groups: ``block`` (a width and a heads choice per block) or ``global`` (one each).
        outer_rank: the ``nora`` kind's outer rank (None: its default, 64); no other kind takes one.
        union, thresholds, core_fractions, retain: the ``jactus`` kind's settings (None: its
            defaults, ``W,x,g``, ``0.95,0.9,0.9``, ``1.0`` and 0.8): the parts of each layer's union
            of subspaces, the energy thresholds of ``W``, ``x`` and ``g``, the core fractions
            searched, and the share of the adapted layers' weight numbers kept (``--budget params=F``).
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
    widths: list[float] = field(default_factory=list)
    heads: list[float] = field(default_factory=list)
    width_groups: str = "block"
    outer_rank: int | None = None
    union: list[str] | None = None
    thresholds: list[float] | None = None
    core_fractions: list[float] | None = None
    retain: float | None = None

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
        for kind, attr in ((WIDTH_KIND, "widths"), (HEADS_KIND, "heads")):
            values = getattr(self, attr)
            if isinstance(values, str) or not isinstance(values, (list, tuple)):
                raise SupernetError(f"--{attr} must be a list of fractions, got {values!r}")
            try:
                setattr(self, attr, dimension_kind(kind).order(values) if values else [])
            except SupernetError as e:
                raise SupernetError(f"--{attr}: {e}") from None
        if self.width_groups not in ("block", "global"):
            raise SupernetError(f"unknown --width-groups {self.width_groups!r}; use block or global")
        if self.adapter not in ADAPTER_KINDS:
            adapter_kind(self.adapter)  # the one clear error
        self._check_jactus()
        if self.outer_rank is not None:
            if self.adapter != "nora":
                raise SupernetError(f"--outer-rank applies to --adapter nora only, not {self.adapter!r}")
            from supernet.adapters.nora import check_ranks

            check_ranks(self.outer_rank, max(self.ranks))
        if not 0.0 <= self.dropout < 1.0:
            raise SupernetError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.merge not in MERGES:
            raise SupernetError(f"unknown adapter merge {self.merge!r}; choose one of {', '.join(MERGES)}")
        if isinstance(self.groups, str) and self.groups not in GROUPINGS:
            raise SupernetError(f"unknown grouping {self.groups!r}; use {', '.join(GROUPINGS)} or a JSON file")
        if isinstance(self.groups, Mapping):
            self.groups = validate.groups_mapping("groups", dict(self.groups))

    def _check_jactus(self) -> None:
        """The ``jactus`` settings: refused for another kind, validated and defaulted for it."""
        given = {"--union": self.union, "--thresholds": self.thresholds, "--core-fractions": self.core_fractions,
                 "--budget": self.retain}
        if self.adapter == "jactus" and (self.widths or self.heads):
            raise SupernetError("--adapter jactus replaces each weight by factors of its own rank; it takes no "
                                "--widths / --heads")
        if self.adapter != "jactus":
            for flag, value in given.items():
                if value is not None:
                    raise SupernetError(f"{flag} applies to --adapter jactus only, not {self.adapter!r}")
            return
        from supernet.compress.subspace import UNION_PARTS

        union = list(self.union) if self.union is not None else list(UNION_PARTS)
        bad = [p for p in union if p not in UNION_PARTS]
        if bad or "W" not in union:
            raise SupernetError(f"--union takes W and any of x, g (e.g. W,x,g), got {','.join(map(str, union))}")
        self.union = [p for p in UNION_PARTS if p in union]
        thresholds = list(self.thresholds) if self.thresholds is not None else [0.95, 0.9, 0.9]
        if len(thresholds) != 3 or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1
                                       for t in thresholds):
            raise SupernetError(f"--thresholds takes three energy fractions in (0, 1] for W, x and g, got {thresholds}")
        self.thresholds = [float(t) for t in thresholds]
        try:
            self.core_fractions = dimension_kind("core").order(self.core_fractions or [1.0])
        except SupernetError as e:
            raise SupernetError(f"--core-fractions: {e}") from None
        retain = 0.8 if self.retain is None else self.retain
        if isinstance(retain, bool) or not isinstance(retain, (int, float)) or not 0 < retain <= 1:
            raise SupernetError(f"--budget params=F takes a share F in (0, 1] of the weights kept, got {retain!r}")
        self.retain = float(retain)

    @property
    def global_kinds(self) -> set[str]:
        """Dimension kinds that are one dimension for the whole network rather than one per group."""
        return {"scaling"} if self.scaling_per == "global" else set()

    @property
    def max_rank(self) -> int:
        return self.ranks[0]



class SuperNetwork(CostsMixin):
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
        self.width = None  # elastic width and heads of the base (supernet.width), when searched
        if config.widths or config.heads:
            from supernet.width import WidthPlan

            align = {n: a.base.column_align() for n, a in self.adapters.items()}
            self.width = WidthPlan(model, config.widths, config.heads, config.width_groups, align)
            self.width.install(model)
        self.space = SearchSpace(dimensions=self._dimensions(kind) + (self.width.dimensions if self.width else []))
        self._rows: dict[int, dict[str, int]] = {}
        self._costs: dict[tuple, int] = {}
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
        """``{module: {dimension kind: choice}}`` of a validated config: what each adapter is given
        (the width dimensions drive the base, not the adapters: :meth:`cuts`)."""
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
        if self.width is not None:
            self.width.activate(config, self.model)
        self._active = config
        return config

    def cuts(self, config: Mapping[str, object] | None = None) -> dict:
        """``{module: (kept input columns, kept output rows)}`` of the layers a config narrows
        (elastic width and heads); empty without them or at full width."""
        if self.width is None:
            return {}
        return self.width.cuts(self.active_config() if config is None else self.space.validate(config))

    def strip_masks(self, model: nn.Module) -> None:
        """Remove the width masks from a copy of the model (:func:`supernet.export.base_model_copy`)."""
        if self.width is not None:
            self.width.strip(model)

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

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter's calibrated frozen state (:meth:`ElasticAdapter.frozen_state`), by module.buffer name."""
        return {f"{n}.{k}": t.detach() for n, a in self.adapters.items() for k, t in a.frozen_state().items()}

    def load_frozen_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.frozen_state_dict()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
            raise SupernetError(f"the adapters' frozen state does not fit this super-network ({detail})")
        for n, adapter in self.adapters.items():
            mine = {k.rpartition(".")[2]: t for k, t in state.items() if k.rpartition(".")[0] == n}
            if mine:
                adapter.load_frozen(mine)
        self._costs.clear()

    def describe(self) -> dict:
        """A JSON summary: groups, their modules, and the size of the space."""
        return {
            "groups": self.groups,
            "choices": self.space.choices,
            **({"kinds": self.space.to_json()["kinds"]} if "kinds" in self.space.to_json() else {}),
            "num_adapters": len(self.adapters),
            "space_size": self.space.size(),
        }

