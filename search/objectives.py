"""Objectives by name. Every objective is minimised internally: ``value = sign * metrics[metric]``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from supernet.errors import SupernetError


@dataclass(frozen=True)
class Objective:
    """A named objective over one raw metric of the evaluator.

    Attributes:
        name: the name used in ``--objectives``.
        metric: the key in the evaluator's (or cost function's) metrics.
        sign: +1 to minimise the metric, -1 to maximise it (minimise its negation).
        unit: unit of the raw metric, for plots ("" when none).
        label: a readable axis label.
    """

    name: str
    metric: str
    sign: float
    unit: str
    label: str

    @property
    def column(self) -> str:
        """The column of the minimised value in history.csv and pareto.csv."""
        return f"obj_{self.name}"

    def value(self, metrics: Mapping[str, float]) -> float:
        """The minimised value of this objective for one evaluation's metrics."""
        if self.metric not in metrics:
            raise SupernetError(
                f"objective {self.name!r} needs metric {self.metric!r}, which the evaluator does not return "
                f"(it returns {', '.join(sorted(metrics)) or 'nothing'})"
            )
        return self.sign * float(metrics[self.metric])

    def raw(self, value: float) -> float:
        """Back from the minimised value to the raw metric."""
        return self.sign * value


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("acc", "accuracy", -1.0, "", "accuracy"),
        Objective("loss", "loss", 1.0, "", "validation loss"),
        Objective("macs", "macs", 1.0, "MACs", "MACs per sequence"),
        Objective("params", "params", 1.0, "", "trainable parameters"),
        Objective("latency", "latency", 1.0, "s", "latency"),
        Objective("size", "size", 1.0, "bytes", "deployed size"),
        # zero-cost proxies (supernet.fidelity.proxies), from one training batch and no evaluation
        Objective("grad_norm", "grad_norm", -1.0, "", "adapter gradient norm (proxy)"),
        Objective("snip", "snip", -1.0, "", "SNIP saliency (proxy)"),
        Objective("batch_loss", "batch_loss", 1.0, "", "loss on one training batch (proxy)"),
    )
}
#: the objectives that :func:`supernet.fidelity.proxies` computes, by metric
PROXY_METRICS = {"grad_norm": "grad_norm", "snip": "snip", "batch_loss": "loss"}


def resolve_objectives(names: str | Sequence[str]) -> tuple[Objective, ...]:
    """``"acc,macs"`` or ``["acc", "macs"]`` -> objectives; fewer than two, duplicates or unknown names raise."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    unknown = [n for n in items if n not in OBJECTIVES]
    if unknown:
        raise SupernetError(f"unknown objective {unknown[0]!r}; use two or more of {', '.join(OBJECTIVES)}")
    duplicates = sorted({n for n in items if items.count(n) > 1})
    if duplicates:
        raise SupernetError(f"objective {duplicates[0]!r} is given more than once")
    if len(items) < 2:
        raise SupernetError(f"a search needs at least two objectives (got {len(items)}); e.g. acc,macs")
    return tuple(OBJECTIVES[n] for n in items)
