"""The learning-rate schedule of a run (stretched, continuously, when a resumed run is extended)
and the precision it trains in."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from supernet.errors import SupernetError

if TYPE_CHECKING:
    from supernet.loader import TrainConfig


@dataclass
class Schedule:
    """The learning-rate factor of every step: linear warmup, cosine decay to 0, stretched when a
    resumed run gets a new ``--max-steps``.

    ``warmup`` (``W``) and ``steps`` (``N``) are those the run was first trained with
    (``W = int(warmup_ratio * N)``). Without stretches the factor is transformers'
    ``get_cosine_schedule_with_warmup``: ``f(t) = t / W`` for ``t < W``, then
    ``f(t) = (1 + cos(pi * (t - W) / (N - W))) / 2``, 0 at ``N``.

    A stretch ``(a, N')`` keeps the factor before step ``a`` and from there decays it as a cosine
    from the value it had at ``a`` to 0 at ``N'``::

        f'(t) = f(t)                                          t < a
        f'(t) = f(a) * (1 + cos(pi * (t - a) / (N' - a))) / 2     a <= t <= N'

    ``a`` is the checkpoint's step, or ``W`` when the checkpoint lies inside the first warmup
    (which then runs to its end, so the cosine starts from the full rate). ``f'`` is continuous:
    the step after the checkpoint uses the rate the run was at. Stretches apply in order, each
    to the schedule before it. A run that finished its schedule is at 0 and stays there.
    """

    warmup: int
    steps: int
    stretches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        """The step the factor reaches 0 at: the run's current length."""
        return self.stretches[-1][1] if self.stretches else self.steps

    def __call__(self, step: int) -> float:
        return self._factor(step, len(self.stretches))

    def _factor(self, step: int, n: int) -> float:
        """The factor with the first ``n`` stretches."""
        if n == 0:  # transformers' formula, so that runs keep the rates they always had
            if step < self.warmup:
                return float(step) / float(max(1, self.warmup))
            progress = float(step - self.warmup) / float(max(1, self.steps - self.warmup))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        start, end = self.stretches[n - 1]
        if step < start:
            return self._factor(step, n - 1)
        progress = min(1.0, float(step - start) / float(end - start))
        return self._factor(start, n - 1) * (0.5 * (1.0 + math.cos(math.pi * progress)))

    def stretched(self, step: int, end: int) -> Schedule:
        """This schedule continued from the checkpoint at ``step`` to 0 at ``end`` (> ``step``)."""
        in_warmup = step < self.warmup < end and all(a >= self.warmup for a, _ in self.stretches)
        return Schedule(self.warmup, self.steps, [*self.stretches, (self.warmup if in_warmup else step, end)])

    def to_json(self) -> dict:
        return {"warmup": self.warmup, "steps": self.steps, "stretches": [list(s) for s in self.stretches]}

    @classmethod
    def from_json(cls, d: dict) -> Schedule:
        return cls(int(d["warmup"]), int(d["steps"]), [(int(a), int(b)) for a, b in d["stretches"]])

    @classmethod
    def cosine(cls, cfg: TrainConfig, steps: int | None = None) -> Schedule:
        """The schedule of a run of ``steps`` (default ``cfg.max_steps``) trained from the start."""
        steps = cfg.max_steps if steps is None else steps
        return cls(int(cfg.warmup_ratio * steps), steps)


def mixed_precision(cfg: TrainConfig) -> str:
    """The precision training runs in: ``no`` or ``bf16``.

    ``auto`` takes accelerate's choice from the environment (``accelerate launch
    --mixed_precision`` or its config file set ACCELERATE_MIXED_PRECISION), else bf16 on a GPU
    that has it, else fp32. fp16 (and fp8) are refused: they need a gradient scaler driving the
    optimizer steps, which this trainer does not run through, so scaled and overflowing
    gradients would be applied as they are.
    """
    mp = cfg.mixed_precision
    if mp == "auto":
        env = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mp = env or ("bf16" if cuda_bf16 else "no")
        if mp not in ("no", "bf16"):
            raise SupernetError(f"mixed precision {mp!r} (ACCELERATE_MIXED_PRECISION: accelerate launch or its config) "
                                "is not supported, it needs a gradient scaler: pass --mixed-precision bf16 or no, or "
                                "launch with --mixed_precision bf16 or no")
    return mp
