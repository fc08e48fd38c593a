"""Elastic low-rank adapters.

An elastic adapter wraps a frozen base layer and keeps its trainable factors at the largest
size of the search space; :meth:`ElasticAdapter.set_active` picks a sub-adapter and
``forward`` only reads that state. Nothing random happens inside a layer.

Shears (Munoz et al., 2024, "Neural Low-rank adapter Search") is the rank-elastic case
implemented here: rank ``r`` uses ``A[:r]`` and ``B[:, :r]``, so every sub-adapter shares the
weights of the largest one. See ``../shared/DESIGN.md`` section 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from supernet.errors import SupernetError

SCALINGS = ("fixed", "lora", "rora")


def lora_scale(mode: str, alpha: float, rank: int, max_rank: int) -> float:
    """The factor ``s`` that multiplies ``B A``.

    ``fixed`` is ``alpha / r_max`` whatever the active rank (what Shears and SQFT do in
    effect), ``lora`` is ``alpha / r`` (Hu et al. 2021) and ``rora`` is ``alpha / sqrt(r)``
    (RoRA, identical to rsLoRA).
    """
    if mode == "fixed":
        return alpha / max_rank
    if mode == "lora":
        return alpha / rank
    if mode == "rora":
        return alpha / math.sqrt(rank)
    raise SupernetError(f"unknown scaling {mode!r}; choose one of {', '.join(SCALINGS)}")


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or GPT-2 style ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features
    raise TypeError(f"cannot wrap {type(layer).__name__}: only nn.Linear and Conv1D")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


class ElasticAdapter(nn.Module):
    """Interface every elastic adapter kind implements.

    The super-network only talks to adapters through this interface: ``set_active`` with
    the adapter's choice, ``reset`` back to the largest sub-adapter, ``delta_weight`` (the
    one place the update ``Delta W`` of shape ``(out, in)`` is formed: merge, export and
    checks go through it), and the cost counters. Later kinds (nested adapters, a subspace
    core, masked or quantized bases, elastic width) override ``base_forward`` and
    ``delta_weight`` and keep the rest.

    Args:
        base: the frozen layer (``nn.Linear`` or ``Conv1D``); its parameters are frozen here.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_shape(base)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    # Inference with the active sub-adapter folded into one dense weight: the forward then
    # costs exactly the base layer's (the search evaluates thousands of configurations).
    _merged: torch.Tensor | None = None

    @torch.no_grad()
    def merge_(self) -> None:
        """Cache ``base_weight() + delta_weight()`` for the active choice; :meth:`forward` uses it
        (no gradients flow then) until :meth:`unmerge_`, ``set_active`` or ``reset``."""
        w = self.base_weight()
        self._merged = (w.float() + self.delta_weight().float()).to(w.dtype)

    def unmerge_(self) -> None:
        self._merged = None

    def merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._merged, self.base.bias)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight in ``nn.Linear`` orientation, shape ``(out, in)``."""
        w = self.base.weight
        return w.t() if isinstance(self.base, Conv1D) else w

    # The adapter-specific part.
    def set_active(self, choice: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adapter_params(self, choice: int | None = None) -> int:  # pragma: no cover
        raise NotImplementedError

    def adapter_macs_per_token(self, choice: int | None = None) -> int:  # pragma: no cover
        raise NotImplementedError


class ElasticLoRA(ElasticAdapter):
    """LoRA whose rank is elastic: ``y = base(x) + s(r) * (x A[:r]^T) B[:, :r]^T``.

    Shears' NLS (Munoz et al. 2024, section 3.2): the factors are kept at ``r_max`` and
    rank ``r`` activates their first ``r`` components. ``A`` is Kaiming-uniform and ``B``
    zero at init, as in PEFT, so the super-network starts as the base model.

    Args:
        base: the frozen layer.
        max_rank: ``r_max``, the largest rank of the search space.
        alpha: LoRA's alpha.
        scaling: ``fixed`` (alpha/r_max), ``lora`` (alpha/r) or ``rora`` (alpha/sqrt(r)).
        dropout: dropout on the adapter's input, as in PEFT.
    """

    def __init__(
        self,
        base: nn.Module,
        max_rank: int,
        alpha: float = 32.0,
        scaling: str = "lora",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base)
        if max_rank <= 0:
            raise SupernetError(f"rank must be positive, got {max_rank}")
        if max_rank > min(self.in_features, self.out_features):
            raise SupernetError(
                f"rank {max_rank} exceeds the layer size {self.out_features}x{self.in_features}"
            )
        if scaling not in SCALINGS:
            raise SupernetError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
        self.max_rank = max_rank
        self.alpha = float(alpha)
        self.scaling_mode = scaling
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active_rank = max_rank

    def set_active(self, choice: int) -> None:
        """Activate rank ``choice`` (``1 <= choice <= r_max``) until the next call or reset."""
        rank = int(choice)
        if not 1 <= rank <= self.max_rank:
            raise SupernetError(f"rank {rank} is outside 1..{self.max_rank} of this adapter")
        self.active_rank = rank
        self._merged = None

    def reset(self) -> None:
        self.active_rank = self.max_rank
        self._merged = None

    @property
    def scaling(self) -> float:
        return lora_scale(self.scaling_mode, self.alpha, self.active_rank, self.max_rank)

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place that slices: ``A[:r]`` of shape ``(r, in)``, ``B[:, :r]`` of ``(out, r)``."""
        r = self.active_rank
        return self.lora_A[:r], self.lora_B[:, :r]

    def delta_weight(self) -> torch.Tensor:
        """``s * B[:, :r] A[:r]``, shape ``(out, in)``: ``nn.Linear`` orientation, always.

        A GPT-2 ``Conv1D`` stores its weight as ``(in, out)``, so a merge into one adds
        ``delta_weight().T`` to ``base.weight`` (or, equivalently, ``delta_weight()`` to
        :meth:`base_weight`). ``tests/test_adapters.py`` checks a square Conv1D, where the
        wrong orientation would still have the right shape.
        """
        a, b = self.active_factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape ``(..., in)``. Returns shape ``(..., out)``."""
        if self._merged is not None:
            return self.merged_forward(x)
        a, b = self.active_factors()
        return self.base_forward(x) + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def adapter_params(self, choice: int | None = None) -> int:
        r = self.active_rank if choice is None else int(choice)
        return r * (self.in_features + self.out_features)

    def adapter_macs_per_token(self, choice: int | None = None) -> int:
        return self.adapter_params(choice)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_max={self.max_rank}, "
            f"active={self.active_rank}, alpha={self.alpha}, scaling={self.scaling_mode}"
        )
