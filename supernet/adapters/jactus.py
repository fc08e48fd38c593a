"""The ``jactus`` adapter kind: a task-aware union of subspaces with a trainable core (JACTUS).

JACTUS (``docs/METHODS.md`` section 5) compresses and adapts at once. Before training, from the
calibration batches (:func:`supernet.compress.calibration.layer_statistics`: the input covariance
``C_x`` and the covariance ``C_g`` of the loss gradient at the layer's output), each layer's frozen
weight ``W`` is replaced by ``left @ core @ right`` inside the union of its top singular
directions with ``C_x``'s (right) and ``C_g``'s (left) top eigenvectors
(:func:`supernet.compress.subspace.union_factors`, with ``--union`` and the energy ``--thresholds``).
Ranks are then allocated across all layers at once by marginal gain per parameter under
``--budget params=F`` (the adapted layers keep at most ``F`` of their parameters): the one greedy
of :func:`supernet.search.allocator.greedy_fill`, with the output energy each component captures
as the gain and ``t (in + out)`` as the cost. Only the ``t x t`` cores train (initialised to the
captured singular values, so the super-network starts as the compressed model, not the original).

The factors are the kind's frozen state (saved with the run; their ranks are the allocation).
With ``--core-fractions 1.0,0.75,0.5`` the core is elastic as a LoRA rank is: fraction ``f`` keeps
the first ``round(f t)`` components (``left[:, :k]``, ``core[:k, :k]``, ``right[:k]``), which share
their weights with every larger choice; the components are ordered by captured energy, so a
prefix keeps the most.

Why the union and the thresholds are training-time settings, not searched dimensions: a trained
core is a matrix in the coordinates of its union bases; another union (or threshold) gives other
bases, and the same core means another weight there. No sub-network of one union's super-network
is a sub-network of another's, so the search could only compare separately trained cores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supernet.adapters.base import ElasticAdapter
from supernet.errors import SupernetError

#: Ranks are allocated in steps of this many components (and each layer has at least one step).
RANK_STEP = 8
DEFAULT_THRESHOLDS = {"W": 0.95, "x": 0.9, "g": 0.9}


class ElasticJactus(ElasticAdapter):
    """A layer replaced by ``y = left[:, :k] core[:k, :k] right[:k] x + b`` (JACTUS).

    Args:
        base: the frozen dense base; its weight is only read at calibration.
        union: the parts of the union, ``W`` and any of ``x``, ``g``.
        thresholds: the energy thresholds ``{"W": .., "x": .., "g": ..}`` (``k_w``, ``k_i``, ``k_o``).
        fractions: the core fractions searched (largest first); ``[1.0]``: none.
        merge: ``plain`` only (the weight is replaced, there is no base to fold into).
    """

    kind = "jactus"
    calibration = ("input_cov", "grad_cov")

    def __init__(self, base: nn.Module, union: tuple[str, ...] = ("W", "x", "g"),
                 thresholds: dict[str, float] | None = None, fractions: list[float] | None = None,
                 merge: str = "plain") -> None:
        super().__init__(base, merge, 0.0)
        if merge != "plain" or self.base.kind != "dense":
            raise SupernetError("--adapter jactus replaces the frozen weight by its own factors: it takes a dense "
                                "base and --adapter-merge plain (no --sparsity, --bits)")
        self.union = tuple(union)
        self.calibration = ("input_cov", "grad_cov") if "g" in self.union else ("input_cov",)  # C_g only for g
        self.thresholds = dict(thresholds or DEFAULT_THRESHOLDS)
        self.fractions = list(fractions or [1.0])
        device = self.base.layer.weight.device
        self.register_buffer("left", torch.zeros(self.out_features, 0, device=device))
        self.register_buffer("right", torch.zeros(0, self.in_features, device=device))
        self.core = nn.Parameter(torch.zeros(0, 0, device=device))
        self.factors = None  # the full factorisation, between calibration and allocation
        self.active = self.largest()

    # ------------------------------------------------------------------ the kind's interface
    @classmethod
    def dimensions(cls, options: Any) -> dict[str, list]:
        return {"core": list(getattr(options, "core_fractions", None) or [1.0])}

    @classmethod
    def build(cls, base: nn.Module, options: Any) -> ElasticJactus:
        return cls(base, tuple(options.union), dict(zip("Wxg", options.thresholds, strict=True)),
                   list(options.core_fractions), options.merge)

    def largest(self) -> dict[str, object]:
        return {"core": max(self.fractions)}

    def activate(self, choices: dict[str, object]) -> None:
        f = choices.get("core", max(self.fractions))
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < float(f) <= 1:
            raise SupernetError(f"core fraction {f!r} is outside (0, 1]")
        self.active = {"core": float(f)}

    @property
    def rank(self) -> int:
        """The allocated rank ``t`` (0 before calibration)."""
        return int(self.core.shape[0])

    def active_rank(self, choice: object = None) -> int:
        f = float(self.choices(choice)["core"])
        return max(1, round(f * self.rank)) if self.rank else 0

    # ------------------------------------------------------------------ calibration and allocation
    @torch.no_grad()
    def calibrate(self, stats: Any) -> None:
        """Steps 1-4 of JACTUS for this layer; the rank is set later by :func:`allocate`."""
        from supernet.compress.subspace import union_factors

        grad_cov = stats.mean_grad_cov() if stats.grad_cov is not None else None
        self.factors = union_factors(self.base_weight(), stats.mean_input_cov(), grad_cov, self.thresholds,
                                     self.union)

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        """Keep the top ``rank`` components of the calibrated factorisation (core = their singular values)."""
        f = self.factors
        self.left = f.left[:, :rank].to(self.left.dtype).contiguous()
        self.right = f.right[:rank].to(self.right.dtype).contiguous()
        self.core = nn.Parameter(torch.diag(f.energy[:rank].sqrt()).to(self.left.dtype))

    @classmethod
    def check_calibration(cls, adapters: dict[str, ElasticAdapter], options: Any, model: nn.Module) -> None:
        """The model's factored export must be loadable (a registered cut type), and the budget must
        fit one rank step per layer (at most ``min(in, out)`` components each)."""
        from supernet.cut_models import CUT_TYPES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in CUT_TYPES:
            raise SupernetError(f"--adapter jactus exports factored layers through supernet's registered model "
                                f"classes, which cover {', '.join(CUT_TYPES)} models, not {model_type!r}")
        check_floor({n: min(RANK_STEP, a.in_features, a.out_features) for n, a in adapters.items()}, adapters,
                    options.retain)

    @classmethod
    def finish_calibration(cls, adapters: dict[str, ElasticAdapter], options: Any) -> None:
        """Step 5: the ranks of every layer at once, under the run's ``--budget params=F``."""
        allocate(adapters, options.retain)

    def load_frozen(self, state: dict[str, torch.Tensor]) -> None:
        """The saved factors; the core takes their rank (its trained values are loaded after)."""
        if state["left"].ndim != 2 or state["right"].ndim != 2:
            raise SupernetError("saved JACTUS factors are not matrices; the run's frozen state is damaged")
        rank = state["left"].shape[1]
        if state["right"].shape != (rank, self.in_features) or state["left"].shape[0] != self.out_features:
            raise SupernetError(f"saved JACTUS factors of shapes {tuple(state['left'].shape)}, "
                                f"{tuple(state['right'].shape)} do not fit a "
                                f"{self.out_features}x{self.in_features} layer")
        self.left, self.right = state["left"].clone(), state["right"].clone()
        self.core = nn.Parameter(torch.zeros(rank, rank, dtype=self.left.dtype))

    # ------------------------------------------------------------------ the update
    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.active_rank()
        if k == self.rank:
            return self.left, self.core, self.right
        return self.left[:, :k], self.core[:k, :k], self.right[:k]

    def factored_weight(self) -> torch.Tensor:
        """``left core right`` at the active fraction, ``(out, in)``: the weight that replaces ``W``."""
        left, core, right = self.active_factors()
        return left @ core @ right

    def delta_weight(self) -> torch.Tensor:
        """``left core right - W``: what turns the frozen weight into the factored one (a merged
        export stores the factored weight, dense)."""
        return self.factored_weight() - self.base_weight().to(self.left.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:  # not calibrated yet: the frozen layer (calibration runs through it)
            return self.base_forward(x)
        if self._merged is not None:
            return self.merged_forward(x)
        left, core, right = self.active_factors()
        h = F.linear(F.linear(x.to(left.dtype), right), core)
        return F.linear(h, left, None if self.base.bias is None else self.base.bias.to(left.dtype)).to(x.dtype)

    def summary(self) -> dict:
        """The allocated rank and the weight numbers it keeps, against the layer's."""
        return {"rank": self.rank, "weights": self.retained_params(self.rank),
                "original_weights": self.in_features * self.out_features}

    @torch.no_grad()
    def export_layer(self, layer: nn.Module) -> nn.Module:
        """A :class:`~supernet.cut_models.FactoredLinear` at the active fraction: ``right[:k]`` and
        ``left[:, :k] @ core[:k, :k]`` (the core folded into the left factor), the layer's bias."""
        from supernet.cut_models import FactoredLinear

        left, core, right = self.active_factors()
        weight = self.base.layer.weight
        new = FactoredLinear(self.in_features, self.out_features, right.shape[0], bias=self.base.bias is not None,
                             device=weight.device, dtype=weight.dtype)
        new.right.weight.copy_(right.to(weight.dtype))
        new.left.weight.copy_((left @ core).to(weight.dtype))
        if self.base.bias is not None:
            new.left.bias.copy_(self.base.bias)
        return new

    # ------------------------------------------------------------------ costs
    def adapter_params(self, choice: object = None) -> int:
        """Trained numbers: the ``k x k`` core."""
        return self.active_rank(choice) ** 2

    def shipped_params(self, choice: object = None) -> int:
        """The factors that replace the weight, folded (``left core`` and ``right``): ``k (in + out)``."""
        return self.active_rank(choice) * (self.in_features + self.out_features)

    def adapter_macs_per_token(self, choice: object = None) -> int:
        return self.active_rank(choice) * (self.in_features + self.out_features)

    def macs_per_token(self, choice: object = None, merged: bool = False) -> int:
        """The factored layer's ``k (in + out)``, merged or not (it ships factored; a dense merge is
        the original's ``in * out``, counted by the merged export itself)."""
        return self.adapter_macs_per_token(choice)

    def nbytes(self, choice: object = None, merged: bool = False) -> int:
        bias = 0 if self.base.bias is None else self.base.bias.numel() * self.base.bias.element_size()
        return self.shipped_params(choice) * self.base.layer.weight.element_size() + bias  # shipped in its dtype

    def retained_params(self, rank: int) -> int:
        """The layer's weight numbers at rank ``rank`` (the budget's unit)."""
        return rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, union={','.join(self.union)}, "
                f"active={self.active_rank()}")


def check_floor(first: dict[str, int], adapters: dict[str, ElasticAdapter], retain: float) -> float:
    """The budget in weight numbers, refused in one line when the first rank step of every layer
    (``first``) does not fit in it."""
    limit = retain * sum(a.in_features * a.out_features for a in adapters.values())
    floor = sum(first[n] * (a.in_features + a.out_features) for n, a in adapters.items())
    if floor > limit:
        raise SupernetError(f"--budget params={retain:g} keeps {limit:,.0f} weight numbers, below the "
                            f"{floor:,.0f} of {RANK_STEP} components per layer; raise it")
    return limit


def allocate(adapters: dict[str, ElasticJactus], retain: float) -> dict[str, int]:
    """JACTUS step 5: every layer's rank, by marginal gain per parameter under one global budget.

    The adapted layers keep at most ``retain`` of their original weight numbers,
    ``sum_l t_l (in_l + out_l) <= retain * sum_l in_l out_l``. Ranks move in steps of
    :data:`RANK_STEP` (the last step of a layer reaches its full union rank); the gain of a step
    is the output energy its components capture; the greedy is
    :func:`supernet.search.allocator.greedy_fill`. Sets each layer's rank and returns them.
    """
    from supernet.search.allocator import greedy_fill

    ladders, gains = {}, {}
    for name, a in adapters.items():
        top = a.factors.energy.numel()
        rungs = list(range(min(RANK_STEP, top), top, RANK_STEP)) + [top]
        rungs = sorted(set(rungs))
        energy = torch.cat([torch.zeros(1, dtype=a.factors.energy.dtype), a.factors.energy.cumsum(0)])
        ladders[name] = rungs
        gains[name] = [float(energy[b] - energy[r]) for r, b in zip(rungs, rungs[1:], strict=False)]
    limit = check_floor({n: ladder[0] for n, ladder in ladders.items()}, adapters, retain)
    widths = {n: a.in_features + a.out_features for n, a in adapters.items()}
    ranks, _ = greedy_fill(ladders, gains, lambda c: sum(c[n] * widths[n] for n in c), limit)
    for name, a in adapters.items():
        a.set_rank(ranks[name])
        a.factors = None
    return ranks
