"""The ``nora`` adapter kind: nested LoRA (NoRA) from an activation-aware SVD, elastic inner rank.

NoRA (``docs/METHODS.md`` section 5): an outer pair, frozen, from the activation-aware SVD of the
frozen weight, ``B0 = U_R Sigma_R`` ``(out, R)`` and ``A0 = V_R^T S^{-1}`` ``(R, in)``
(:func:`supernet.compress.subspace.awsvd`, ``R`` the outer rank, ``S`` the root mean square of each
input feature over the calibration tokens), and a trainable inner pair ``B' (R, r')``, ``A' (r', R)``:

    delta = s * B0 B'[:, :r] A'[:r] A0

so the update lives in the weight's activation-aware principal subspace with ``2 R r'`` trained
numbers. The inner rank ``r`` is elastic as LoRA's rank is (a prefix of the inner factors; the
scale is ``alpha/r``, ``alpha/sqrt(r)`` or ``alpha/r_max``, searched or not, exactly as for
``lora``). ``A'`` is Kaiming-uniform and ``B'`` zero, so the super-network starts as the base.

The outer pair is the kind's frozen state: computed once from calibration statistics before
training and saved with the run. A sub-adapter folds into a stock PEFT LoRA adapter of rank ``r``:
``lora_B = B0 B'[:, :r]``, ``lora_A = A'[:r] A0``, and that folded form is what ships unmerged
(``r (in + out)`` numbers, the MACs of an unmerged adapter).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from supernet.adapters.lora import ElasticLoRA
from supernet.errors import SupernetError

#: The outer rank when ``--outer-rank`` is not given.
DEFAULT_OUTER_RANK = 64


class ElasticNoRA(ElasticLoRA):
    """NoRA with an elastic inner rank: ``y = base(x) + s(r) * B0 B'[:, :r] A'[:r] A0 x``.

    Args:
        base: the frozen base (or a layer, wrapped as a dense base).
        outer_rank: ``R``, the rank of the frozen outer pair (at most ``min(in, out)``).
        max_rank: ``r_max``, the largest inner rank (at most ``R``).
        alpha, scaling, dropout, merge, dtype: as for :class:`~supernet.adapters.lora.ElasticLoRA`.
    """

    kind = "nora"
    calibration = ("input_sq_norms",)
    cut_in, cut_out = "outer_A", "outer_B"  # a width cut slices the outer pair; the inner pair is whole

    def __init__(
        self,
        base: nn.Module,
        outer_rank: int,
        max_rank: int,
        alpha: float = 32.0,
        scaling: str = "lora",
        dropout: float = 0.0,
        merge: str = "plain",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super(ElasticLoRA, self).__init__(base, merge, dropout)
        check_ranks(outer_rank, max_rank, self.in_features, self.out_features)
        self.outer_rank = outer_rank
        self._set_scale(max_rank, alpha, scaling)
        device = self.base.layer.weight.device
        self.register_buffer("outer_B", torch.zeros(self.out_features, outer_rank, dtype=dtype, device=device))
        self.register_buffer("outer_A", torch.zeros(outer_rank, self.in_features, dtype=dtype, device=device))
        self.inner_A = nn.Parameter(torch.empty(max_rank, outer_rank, dtype=dtype, device=device))
        self.inner_B = nn.Parameter(torch.zeros(outer_rank, max_rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.inner_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = self.largest()

    @classmethod
    def build(cls, base: nn.Module, options: Any) -> ElasticNoRA:
        outer = getattr(options, "outer_rank", None) or DEFAULT_OUTER_RANK
        return cls(base, outer, options.max_rank, options.alpha, options.scaling, options.dropout, options.merge)

    @torch.no_grad()
    def calibrate(self, stats: Any) -> None:
        """The outer pair from the activation-aware SVD of the frozen weight (dequantised, pruned)."""
        from supernet.compress.subspace import awsvd

        b0, a0 = awsvd(self.base_weight().float(), stats.input_scale(), self.outer_rank)
        self.outer_B.copy_(b0.to(self.outer_B.dtype))
        self.outer_A.copy_(a0.to(self.outer_A.dtype))

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inner pair at the active rank: ``A'[:r]`` ``(r, R)`` and ``B'[:, :r]`` ``(R, r)``."""
        r = self.active_rank
        if r == self.max_rank:
            return self.inner_A, self.inner_B
        return self.inner_A[:r], self.inner_B[:, :r]

    def peft_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A'[:r] A0`` ``(r, in)`` and ``B0 B'[:, :r]`` ``(out, r)``: the update as a rank-``r`` LoRA
        pair, what the PEFT export stores (:meth:`ElasticLoRA.lora_factors` takes the scale as LoRA's)."""
        a, b = self.active_factors()
        return a @ self.outer_A, self.outer_B @ b

    def delta_weight(self) -> torch.Tensor:
        """``s * B0 B'[:, :r] A'[:r] A0`` ``(out, in)``, masked by the base's pattern through the base."""
        a, b = self.active_factors()
        delta = (self.outer_B @ (b @ a) @ self.outer_A) * self.scaling
        return self.base.restrict(delta) if self.through_base else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``plain``: ``base(x) + s * B0 B' A' A0 x`` through the ``R``-dimensional subspace;
        ``sparse`` / ``qa-sparse``: one matmul with :meth:`merged_weight`, as for LoRA."""
        if self._merged is not None or self.through_base:
            return self.folded_forward(x)
        a, b = self.active_factors()
        h = F.linear(self.dropout(x).to(a.dtype), self.outer_A)
        update = F.linear(F.linear(F.linear(h, a), b), self.outer_B) * self.scaling
        return self.base_forward(x) + update.to(x.dtype)

    def adapter_params(self, choice: object = None) -> int:
        """Trained numbers: ``2 R r``."""
        return 2 * self.outer_rank * int(self.choices(choice)["rank"])

    def shipped_params(self, choice: object = None) -> int:
        """Unmerged, the folded rank-``r`` pair ships: ``r (in + out)``; none through the base."""
        return 0 if self.through_base else int(self.choices(choice)["rank"]) * (self.in_features + self.out_features)

    def adapter_macs_per_token(self, choice: object = None) -> int:
        """The folded pair's: ``r (in + out)``."""
        return int(self.choices(choice)["rank"]) * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, outer_rank={self.outer_rank}, "
                f"r_max={self.max_rank}, active={self.active_rank}, alpha={self.alpha}, "
                f"scaling={self.scaling_mode}, merge={self.merge}")


def check_ranks(outer_rank: object, max_rank: int, in_features: int | None = None,
                out_features: int | None = None) -> None:
    """The outer rank is a whole number from the largest inner rank to the layer's smaller side (the
    one validator of ``--outer-rank``: the options check it without a layer, each adapter with its own)."""
    if isinstance(outer_rank, bool) or not isinstance(outer_rank, (int, np.integer)) or outer_rank <= 0:
        raise SupernetError(f"--outer-rank must be a positive whole number, got {outer_rank!r}")
    if max_rank > outer_rank:
        raise SupernetError(f"the largest rank {max_rank} exceeds --outer-rank {outer_rank}; choose ranks "
                            f"of at most {outer_rank}")
    if in_features is not None and outer_rank > min(in_features, out_features):
        raise SupernetError(f"--outer-rank {outer_rank} exceeds the layer size {out_features}x{in_features}; "
                            f"choose at most {min(in_features, out_features)}")
