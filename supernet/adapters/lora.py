"""The ``lora`` adapter kind: LoRA with elastic rank and, optionally, a searched scaling mode.

Shears (Munoz et al., 2024, "Neural Low-rank adapter Search") is the rank-elastic case: rank
``r`` uses ``A[:r]`` and ``B[:, :r]``, so every sub-adapter shares the weights of the largest
one. The scale ``s`` that multiplies ``B A`` is ``alpha/r_max`` (``fixed``), ``alpha/r``
(``lora``) or ``alpha/sqrt(r)`` (``rora``); with ``--scalings`` the mode is a dimension of its
own, sampled with the ranks: the factors are shared by every mode (a mode only rescales the
update), so one set of weights serves all of them. ``docs/METHODS.md`` sections 1 and 2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supernet.adapters.base import ElasticAdapter, LoraFactors
from supernet.dimensions import SCALINGS
from supernet.errors import SupernetError


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


class ElasticLoRA(ElasticAdapter):
    """LoRA whose rank is elastic: ``y = base(x) + s(r) * (x A[:r]^T) B[:, :r]^T``.

    Shears' NLS (Munoz et al. 2024, section 3.2): the factors are kept at ``r_max`` and
    rank ``r`` activates their first ``r`` components. ``A`` is Kaiming-uniform and ``B``
    zero at init, as in PEFT, so the super-network starts as the base model.

    Args:
        base: the frozen base (or a layer, wrapped as a dense base).
        max_rank: ``r_max``, the largest rank of the search space.
        alpha: LoRA's alpha.
        scaling: ``fixed`` (alpha/r_max), ``lora`` (alpha/r) or ``rora`` (alpha/sqrt(r)): the
            mode when it is not searched, and the first choice when it is.
        dropout: dropout on the adapter's input, as in PEFT (``plain`` merge only: a masked
            or quantised update is folded into the weight, so it has no input of its own).
        merge: ``plain``, ``sparse`` (SparsePEFT) or ``qa-sparse`` (QA-SparsePEFT, quantised base only).
        dtype: the factors' dtype, fp32 by default whatever the base's; the input is cast to
            it and the update back to the input's dtype, as PEFT does.
    """

    kind = "lora"
    #: the tensors an elastic-width cut slices: by their input columns, and by their output rows
    cut_in, cut_out = "lora_A", "lora_B"

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
        super().__init__(base, merge, dropout)
        if max_rank <= 0:
            raise SupernetError(f"rank must be positive, got {max_rank}")
        if max_rank > min(self.in_features, self.out_features):
            raise SupernetError(
                f"rank {max_rank} exceeds the layer size {self.out_features}x{self.in_features}"
            )
        self._set_scale(max_rank, alpha, scaling)
        device = self.base.layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = self.largest()

    def _set_scale(self, max_rank: int, alpha: float, scaling: str) -> None:
        """``r_max``, alpha and the scaling mode (checked): what :attr:`scaling` reads."""
        if scaling not in SCALINGS:
            raise SupernetError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
        self.max_rank, self.alpha, self.default_scaling = max_rank, float(alpha), scaling

    # ------------------------------------------------------------------ the kind's interface
    @classmethod
    def dimensions(cls, options: Any) -> dict[str, list]:
        dims: dict[str, list] = {"rank": list(options.ranks)}
        if getattr(options, "scalings", None):
            dims["scaling"] = list(options.scalings)
        return dims

    @classmethod
    def build(cls, base: nn.Module, options: Any) -> ElasticLoRA:
        return cls(base, options.max_rank, options.alpha, options.scaling, options.dropout, options.merge)

    def largest(self) -> dict[str, object]:
        return {"rank": self.max_rank, "scaling": self.default_scaling}

    def activate(self, choices: dict[str, object]) -> None:
        """Rank ``1 <= r <= r_max`` and a scaling mode, until the next call or reset."""
        rank = choices.get("rank", self.max_rank)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise SupernetError(f"rank {rank} is outside 1..{self.max_rank} of this adapter")
        mode = choices.get("scaling", self.default_scaling)
        if mode not in SCALINGS:
            raise SupernetError(f"unknown scaling {mode!r}; choose one of {', '.join(SCALINGS)}")
        self.active = {"rank": int(rank), "scaling": mode}

    @property
    def active_rank(self) -> int:
        return int(self.active["rank"])

    @property
    def scaling_mode(self) -> str:
        return str(self.active["scaling"])

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
        if self._merged is not None or self.through_base:
            return self.folded_forward(x)
        a, b = self.active_factors()
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling
        return self.base_forward(x) + update.to(x.dtype)

    def adapter_params(self, choice: object = None) -> int:
        r = int(self.choices(choice)["rank"])
        return r * (self.in_features + self.out_features)

    def adapter_macs_per_token(self, choice: object = None) -> int:
        return self.adapter_params(choice)

    def cut_param(self, name: str, value: torch.Tensor, keep_in: torch.Tensor | None,
                  keep_out: torch.Tensor | None) -> torch.Tensor:
        """``A`` keeps its kept input columns, ``B`` its kept output rows (:attr:`cut_in`, :attr:`cut_out`)."""
        if name == self.cut_in and keep_in is not None:
            return value[:, keep_in.to(value.device)]
        if name == self.cut_out and keep_out is not None:
            return value[keep_out.to(value.device)]
        return value

    def peft_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-``r`` pair ``(A, B)`` a PEFT LoRA adapter stores: the active factors."""
        return self.active_factors()

    def lora_factors(self) -> LoraFactors:
        """``A[:r]``, ``B[:, :r]`` and the alpha PEFT needs for the trained scale.

        ``lora`` (alpha/r) is PEFT's own scaling; ``rora`` (alpha/sqrt(r)) is rsLoRA; ``fixed``
        (alpha/r_max) becomes ``alpha' = alpha * r / r_max`` so that ``alpha' / r`` is the trained scale.
        """
        a, b = self.peft_pair()
        r, mode = self.active_rank, self.scaling_mode
        alpha = self.alpha * r / self.max_rank if mode == "fixed" else self.alpha
        return LoraFactors(a.detach(), b.detach(), float(alpha), mode == "rora", float(self.scaling))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r_max={self.max_rank}, "
            f"active={self.active_rank}, alpha={self.alpha}, scaling={self.scaling_mode}, merge={self.merge}"
        )
