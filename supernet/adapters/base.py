"""The interface every adapter kind implements, and what all kinds share.

An elastic adapter wraps a frozen base (:mod:`supernet.bases`: dense, pruned or quantised) and
keeps its trainable state at the largest size of the search space; :meth:`ElasticAdapter.set_active`
picks a sub-adapter and ``forward`` only reads that state. Nothing random happens inside a layer.

Two independent axes, as PEFT separates base-layer dispatch from its LoRA variants: the frozen
base owns the weight's structure and cost; the adapter kind owns its parameters and forms the
update in one place, :meth:`ElasticAdapter.delta_weight`. The merge mode
(:mod:`supernet.merges`) says how the update reaches the base.

A kind says, through this class only:

- its dimensions: :meth:`ElasticAdapter.dimensions` gives ``{dimension kind: choices}`` from the
  run's options (LoRA: ``rank``, and ``scaling`` when it is searched);
- how it forms its update: :meth:`ElasticAdapter.delta_weight`;
- how it folds into a PEFT LoRA adapter, or that it cannot: :meth:`ElasticAdapter.lora_factors`;
- its costs: :meth:`ElasticAdapter.adapter_params` and :meth:`ElasticAdapter.adapter_macs_per_token`;
- its state: its ``nn.Parameter`` objects (trained, saved and loaded by name), and its own
  persistent buffers, frozen state a kind computes once from calibration statistics
  (:attr:`ElasticAdapter.calibration`, :meth:`ElasticAdapter.calibrate`) and that is saved with
  the run so that a rebuild never calibrates again.

The network, trainer, evaluator, search and every export talk to kinds through it; a new kind
is one file that subclasses it and calls :func:`supernet.adapters.register_adapter_kind`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supernet import merges
from supernet.bases import FrozenBase
from supernet.errors import SupernetError

Choice = Mapping[str, object] | object


@dataclass(frozen=True)
class LoraFactors:
    """An adapter as PEFT LoRA at its active choice: ``Delta W = scale * lora_B @ lora_A``.

    ``alpha`` is what PEFT needs in ``alpha_pattern`` so that its own scaling (``alpha / r``, or
    ``alpha / sqrt(r)`` with ``rslora``) equals ``scale``.
    """

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    alpha: float
    rslora: bool
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


class ElasticAdapter(nn.Module):
    """Interface of every elastic adapter kind (see the module docstring).

    Args:
        base: a :class:`~supernet.bases.FrozenBase`, or an ``nn.Linear`` / ``Conv1D`` (wrapped
            as a dense one); its parameters are frozen.
        merge: ``plain``, ``sparse`` or ``qa-sparse`` (:data:`supernet.merges.MERGES`).
        dropout: input dropout of the adapter (``plain`` merge only).
    """

    #: the kind's name in the registry (``supernet train --adapter NAME``)
    kind = ""
    #: the calibration statistics the kind needs before training
    #: (:data:`supernet.compress.calibration.STATISTICS`); none for most kinds
    calibration: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, merge: str = "plain", dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base if isinstance(base, FrozenBase) else FrozenBase(base)
        self.in_features, self.out_features = self.base.in_features, self.base.out_features
        merges.check_layer(merge, self.base.bits is not None, dropout)
        self.merge = merge
        self.active: dict[str, object] = {}

    # ------------------------------------------------------------------ what a kind defines
    @classmethod
    def dimensions(cls, options: Any) -> dict[str, list]:  # pragma: no cover - interface
        """``{dimension kind: choices}`` that every group of this kind gets from the run's options
        (a :class:`~supernet.network.SuperNetConfig`); the first is the kind's primary dimension."""
        raise NotImplementedError

    @classmethod
    def build(cls, base: nn.Module, options: Any) -> ElasticAdapter:  # pragma: no cover - interface
        """One adapter on ``base`` at the largest size the options allow."""
        raise NotImplementedError

    def activate(self, choices: dict[str, object]) -> None:  # pragma: no cover - interface
        """Take ``choices`` (``{dimension kind: choice}``, every kind of :meth:`dimensions` that is
        searched) until the next call; raise SupernetError for a choice outside the adapter."""
        raise NotImplementedError

    def largest(self) -> dict[str, object]:  # pragma: no cover - interface
        """The choices of the largest sub-adapter (what :meth:`reset` activates)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - interface
        """The update ``Delta W`` ``(out, in)`` at the active choice: the one place it is formed."""
        raise NotImplementedError

    def adapter_params(self, choice: Choice | None = None) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def adapter_macs_per_token(self, choice: Choice | None = None) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def calibrate(self, stats: Any) -> None:
        """Compute the kind's frozen state (its persistent buffers) from this layer's
        :class:`~supernet.compress.calibration.LayerStats`; called once, before training, for a kind
        whose :attr:`calibration` is not empty."""
        raise NotImplementedError  # pragma: no cover - a kind that asks for statistics defines it

    @classmethod
    def check_calibration(cls, adapters: Mapping[str, ElasticAdapter], options: Any, model: nn.Module) -> None:
        """Before the calibration pass: refuse settings that cannot work, while nothing has run yet."""

    @classmethod
    def finish_calibration(cls, adapters: Mapping[str, ElasticAdapter], options: Any) -> None:
        """After every adapter of the kind has calibrated: a kind-wide step (JACTUS allocates its
        ranks across all layers here). Nothing by default."""

    def load_frozen(self, state: Mapping[str, torch.Tensor]) -> None:
        """Set the frozen state from a saved copy (same names and shapes as :meth:`frozen_state`)."""
        own = self.frozen_state()
        with torch.no_grad():
            for key, t in state.items():
                if own[key].shape != t.shape:
                    raise SupernetError(f"frozen adapter state {key!r} has shape {tuple(t.shape)}, expected "
                                        f"{tuple(own[key].shape)}")
                own[key].copy_(t)

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The kind's own persistent buffers (not the base's): what :meth:`calibrate` computed."""
        return {n: b for n, b in self._buffers.items() if b is not None and n not in self._non_persistent_buffers_set}

    def summary(self) -> dict:
        """What a run's ``config.json`` records of this adapter beyond the options (JACTUS: its
        allocated rank); empty by default."""
        return {}

    def export_layer(self, layer: nn.Module) -> nn.Module | None:
        """The layer a merged export ships in place of ``layer`` (a copy of the base layer) at the
        active choice; None (every kind but JACTUS): the update is merged into ``layer``'s weight."""
        return None

    def lora_factors(self) -> LoraFactors:
        """This adapter as PEFT LoRA factors at the active choice; a kind that cannot says so."""
        raise SupernetError(f"adapters of kind {self.kind or type(self).__name__!r} cannot be written as a PEFT "
                            "LoRA adapter; use --format merged")

    def cut_param(self, name: str, value: torch.Tensor, keep_in: torch.Tensor | None,
                  keep_out: torch.Tensor | None) -> torch.Tensor:
        """Parameter ``name`` restricted to the kept input columns / output rows of a narrower base
        (elastic width); a kind whose state cannot be cut says so."""
        raise SupernetError(f"adapters of kind {self.kind or type(self).__name__!r} cannot follow an elastic width "
                            "cut; train without --widths / --heads")

    # ------------------------------------------------------------------ shared by every kind
    def cut(self, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> ElasticAdapter:
        """A copy of this adapter on its base cut to the kept columns and rows (elastic width), its
        parameters sliced by :meth:`cut_param`: what the cut sub-network ships and costs."""
        new = copy.copy(self)
        new._parameters, new._buffers, new._modules = {}, dict(self._buffers), dict(self._modules)
        new.base = self.base.cut(keep_in, keep_out)
        new.in_features, new.out_features = new.base.in_features, new.base.out_features
        new._merged = None
        with torch.no_grad():
            for name, p in self._parameters.items():
                value = self.cut_param(name, p.detach(), keep_in, keep_out).clone()
                new._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
            for name in self.frozen_state():  # frozen state with a layer's shape is cut the same way
                new._buffers[name] = self.cut_param(name, self._buffers[name], keep_in, keep_out).clone()
        return new

    @property
    def primary(self) -> str:
        """The kind's first dimension: a bare choice (not a mapping) is a choice of it."""
        return next(iter(self.largest()))

    def choices(self, choice: Choice | None = None) -> dict[str, object]:
        """``choice`` as a full ``{dimension kind: choice}`` over the active one (None: the active)."""
        if choice is None:
            return dict(self.active)
        if isinstance(choice, Mapping):
            return {**self.active, **choice}
        return {**self.active, self.primary: choice}

    def set_active(self, choice: Choice) -> None:
        """Activate ``choice``: a ``{dimension kind: choice}`` mapping, or a choice of the primary dimension."""
        self.activate(self.choices(choice))
        self._merged = None

    def reset(self) -> None:
        """Back to the largest sub-adapter."""
        self.set_active(self.largest())

    @property
    def through_base(self) -> bool:
        """Whether the update passes through the base's transform (in training and at merge)."""
        return merges.merge_mode(self.merge).through_base

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in ``nn.Linear`` orientation, shape ``(out, in)``."""
        return self.base.weight()

    def merged_weight(self) -> torch.Tensor:
        """``W + delta`` at the active choice, fp32 ``(out, in)``: what a merged model stores.

        Differentiable. With ``sparse`` it keeps exactly the base's zeros; with ``qa-sparse``
        it lies on the base's integer grid (``s (q - z)``).
        """
        return self.base.merge(self.delta_weight(), through=self.through_base)

    # Inference with the active sub-adapter folded into one weight: the forward then costs
    # exactly the base layer's (the search evaluates thousands of configurations).
    _merged: torch.Tensor | None = None

    @torch.no_grad()
    def merge_(self) -> None:
        """Cache :meth:`merged_weight` for the active choice; :meth:`forward` uses it (no gradients
        flow then) until :meth:`unmerge_`, ``set_active`` or ``reset``."""
        self._merged = self.merged_weight().to(self.base.weight().dtype)

    def unmerge_(self) -> None:
        self._merged = None

    def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._merged.to(x.dtype), self.base.bias)

    def folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of an update folded into the weight (merged, or through the base): one matmul."""
        if self._merged is not None:
            return self.merged_forward(x)
        return F.linear(x, self.merged_weight().to(x.dtype), self.base.bias)

    def macs_per_token(self, choice: Choice | None = None, merged: bool = False) -> int:
        """The base's MACs (non-zeros where pruned) plus the adapter's unless it is merged (an
        update that passes through the base is always folded into it). A plain merge refills a
        pruned base, so the merged layer costs its dense ``in * out``."""
        if merged and not self.through_base:
            return self.in_features * self.out_features
        extra = 0 if self.through_base else self.adapter_macs_per_token(choice)
        return self.base.macs_per_token() + extra

    def nbytes(self, choice: Choice | None = None, merged: bool = False) -> int:
        """Deployed bytes. Through the base: the base at its precision and structure (the update
        is inside). Plain: merged, a dense weight in the base's float dtype; unmerged, the
        compressed base plus fp32 adapter parameters beside it."""
        if self.through_base:
            return self.base.nbytes()
        if merged:
            return self.base.dense_nbytes()
        return self.base.nbytes() + self.shipped_params(choice) * 4

    def shipped_params(self, choice: Choice | None = None) -> int:
        """Adapter parameters that ship beside the base: none when the update is folded into it;
        else the trained ones (a kind that ships another form, e.g. folded factors, says so)."""
        return 0 if self.through_base else self.adapter_params(choice)
