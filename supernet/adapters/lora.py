"""Elastic low-rank adapters.

An elastic adapter wraps a frozen base (:mod:`supernet.bases`: dense, pruned or quantised) and
keeps its trainable factors at the largest size of the search space; :meth:`ElasticAdapter.set_active`
picks a sub-adapter and ``forward`` only reads that state. Nothing random happens inside a layer.

Two independent axes, as PEFT separates base-layer dispatch from its LoRA variants: the frozen
base owns the weight's structure and cost; the adapter kind owns the factors and forms the
update in one place, :meth:`ElasticAdapter.delta_weight`. The ``merge`` flag says how the
update reaches the base (``plain`` beside it; ``sparse``/``qa-sparse`` through its transform).

Shears (Munoz et al., 2024, "Neural Low-rank adapter Search") is the rank-elastic case
implemented here: rank ``r`` uses ``A[:r]`` and ``B[:, :r]``, so every sub-adapter shares the
weights of the largest one. See ``docs/METHODS.md`` sections 1 and 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from supernet.bases import FrozenBase, is_adaptable, layer_shape  # noqa: F401 (re-exported)
from supernet.errors import SupernetError

SCALINGS = ("fixed", "lora", "rora")
# How an adapter's update reaches its frozen base: ``plain`` adds it beside the base (merging it
# densifies a pruned base and leaves the integer grid), ``sparse`` masks it with the base's
# non-zero pattern (SparsePEFT), ``qa-sparse`` also puts ``W^p + delta`` through the base's
# fake quantisation (QA-SparsePEFT). ``docs/METHODS.md`` section 2.
MERGES = ("plain", "sparse", "qa-sparse")


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


class ElasticAdapter(nn.Module):
    """Interface every elastic adapter kind implements.

    The super-network only talks to adapters through this interface: ``set_active`` with
    the adapter's choice, ``reset`` back to the largest sub-adapter, ``delta_weight`` (the
    one place the update ``Delta W`` of shape ``(out, in)`` is formed: merge, export and
    checks go through it), and the cost counters, which ask the base for its share.

    Args:
        base: a :class:`~supernet.bases.FrozenBase`, or an ``nn.Linear`` / ``Conv1D`` (wrapped
            as a dense one); its parameters are frozen.
        merge: ``plain``, ``sparse`` or ``qa-sparse`` (:data:`MERGES`).
    """

    def __init__(self, base: nn.Module, merge: str = "plain") -> None:
        super().__init__()
        if merge not in MERGES:
            raise SupernetError(f"unknown adapter merge {merge!r}; choose one of {', '.join(MERGES)}")
        self.base = base if isinstance(base, FrozenBase) else FrozenBase(base)
        self.in_features, self.out_features = self.base.in_features, self.base.out_features
        self.merge = merge

    @property
    def through_base(self) -> bool:
        """Whether the update passes through the base's transform (in training and at merge)."""
        return self.merge != "plain"

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

    # ------------------------------------------------------------------ costs
    def macs_per_token(self, choice: int | None = None, merged: bool = False) -> int:
        """The base's MACs (non-zeros where pruned) plus the adapter's unless it is merged (an
        update that passes through the base is always folded into it). A plain merge refills a
        pruned base, so the merged layer costs its dense ``in * out``."""
        if merged and not self.through_base:
            return self.in_features * self.out_features
        extra = 0 if self.through_base else self.adapter_macs_per_token(choice)
        return self.base.macs_per_token() + extra

    def nbytes(self, choice: int | None = None, merged: bool = False) -> int:
        """Deployed bytes. Through the base: the base at its precision and structure (the update
        is inside). Plain: merged, a dense weight in the base's float dtype; unmerged, the
        compressed base plus fp32 factors beside it."""
        if self.through_base:
            return self.base.nbytes()
        if merged:
            return self.base.dense_nbytes()
        return self.base.nbytes() + self.adapter_params(choice) * 4

    # ------------------------------------------------------------------ the adapter-specific part
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
        base: the frozen base (or a layer, wrapped as a dense base).
        max_rank: ``r_max``, the largest rank of the search space.
        alpha: LoRA's alpha.
        scaling: ``fixed`` (alpha/r_max), ``lora`` (alpha/r) or ``rora`` (alpha/sqrt(r)).
        dropout: dropout on the adapter's input, as in PEFT (``plain`` merge only: a masked
            or quantised update is folded into the weight, so it has no input of its own).
        merge: ``plain``, ``sparse`` (SparsePEFT) or ``qa-sparse`` (QA-SparsePEFT, quantised base only).
        dtype: the factors' dtype, fp32 by default whatever the base's; the input is cast to
            it and the update back to the input's dtype, as PEFT does.
    """

    def __init__(
        self,
        base: nn.Module,
        max_rank: int,
        alpha: float = 32.0,
        scaling: str = "lora",
        dropout: float = 0.0,
        merge: str = "plain",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base, merge)
        if max_rank <= 0:
            raise SupernetError(f"rank must be positive, got {max_rank}")
        if max_rank > min(self.in_features, self.out_features):
            raise SupernetError(
                f"rank {max_rank} exceeds the layer size {self.out_features}x{self.in_features}"
            )
        if scaling not in SCALINGS:
            raise SupernetError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
        if dropout > 0 and self.through_base:
            raise SupernetError(f"adapter dropout needs --adapter-merge plain (a {merge} update is folded "
                                "into the weight)")
        if merge == "qa-sparse" and not hasattr(self.base, "bits"):
            raise SupernetError("--adapter-merge qa-sparse needs a quantised base (--bits 4 or 8)")
        if merge == "sparse" and hasattr(self.base, "bits"):
            raise SupernetError("--adapter-merge sparse on an integer base would leave its grid: use qa-sparse "
                                "(trained through the quantiser) or plain")
        self.max_rank = max_rank
        self.alpha = float(alpha)
        self.scaling_mode = scaling
        device = self.base.layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, dtype=dtype, device=device))
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
        """The one place that slices: ``A[:r]`` of shape ``(r, in)``, ``B[:, :r]`` of ``(out, r)``.

        At ``r_max`` the parameters themselves, not full-size slices of them: a slice's backward
        allocates a zero gradient of the whole parameter and copies into it.
        """
        r = self.active_rank
        if r == self.max_rank:
            return self.lora_A, self.lora_B
        return self.lora_A[:r], self.lora_B[:, :r]

    def delta_weight(self) -> torch.Tensor:
        """``s * B[:, :r] A[:r]``, shape ``(out, in)``: ``nn.Linear`` orientation, always; masked
        by the base's non-zero pattern when the update passes through the base (SparsePEFT).

        A GPT-2 ``Conv1D`` stores its weight as ``(in, out)``, so a merge into one adds
        ``delta_weight().T`` to ``base.layer.weight`` (or, equivalently, ``delta_weight()`` to
        :meth:`base_weight`). ``tests/test_adapters.py`` checks a square Conv1D, where the
        wrong orientation would still have the right shape.
        """
        a, b = self.active_factors()
        delta = (b @ a) * self.scaling
        return self.base.restrict(delta) if self.through_base else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x of shape ``(..., in)``. Returns shape ``(..., out)``.

        ``plain``: ``base(x) + s * B A x``, as PEFT. ``sparse`` / ``qa-sparse``: one matmul with
        :meth:`merged_weight` (``W + delta ⊙ M`` or its fake quantisation): the weight training
        sees is the weight that ships.
        """
        if self._merged is not None:
            return self.merged_forward(x)
        if self.through_base:
            return F.linear(x, self.merged_weight().to(x.dtype), self.base.bias)
        a, b = self.active_factors()
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling
        return self.base_forward(x) + update.to(x.dtype)

    def adapter_params(self, choice: int | None = None) -> int:
        r = self.active_rank if choice is None else int(choice)
        return r * (self.in_features + self.out_features)

    def adapter_macs_per_token(self, choice: int | None = None) -> int:
        return self.adapter_params(choice)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_max={self.max_rank}, "
            f"active={self.active_rank}, alpha={self.alpha}, scaling={self.scaling_mode}, merge={self.merge}"
        )
