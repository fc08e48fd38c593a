"""Non-dominated sets and hypervolume, for objective values that are all minimised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from supernet.errors import SupernetError

#: Reference point of :func:`hypervolume`, per objective, in normalised units (ideal 0, nadir 1).
HV_REFERENCE = 1.1


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``F`` (n x m, minimised) that no other row dominates.

    Row j dominates row i when ``F[j] <= F[i]`` everywhere and ``F[j] < F[i]`` somewhere. Rows
    with identical objective vectors do not dominate each other, so every copy of a
    non-dominated vector is kept.
    """
    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise SupernetError("objective values must be a 2-d array (points x objectives)")
    keep = np.ones(len(F), dtype=bool)
    for i in range(len(F)):
        dominates_i = np.all(F <= F[i], axis=1) & np.any(F < F[i], axis=1)
        keep[i] = not dominates_i.any()
    return keep


def pareto_front(history: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The non-dominated rows of ``history`` by ``columns``, sorted by those columns, then by ``index``.

    A row with a non-finite value in ``columns`` is never on the front (NaN compares false both ways,
    so it would otherwise count as non-dominated)."""
    history = history[np.all(np.isfinite(history[list(columns)].to_numpy(dtype=float)), axis=1)]
    if history.empty:
        return history.copy()
    mask = non_dominated(history[list(columns)].to_numpy(dtype=float))
    front = history[mask]
    order = np.lexsort([front["index"].to_numpy()] + [front[c].to_numpy() for c in reversed(columns)])
    return front.iloc[order].reset_index(drop=True)


def _bounds(F: np.ndarray, ideal: Sequence[float] | None, nadir: Sequence[float] | None) -> tuple[np.ndarray, ...]:
    lo = F.min(axis=0) if ideal is None else np.asarray(ideal, dtype=float)
    hi = F.max(axis=0) if nadir is None else np.asarray(nadir, dtype=float)
    if lo.shape != (F.shape[1],) or hi.shape != (F.shape[1],):
        raise SupernetError(f"ideal and nadir need one value per objective ({F.shape[1]})")
    return lo, hi


def hypervolume(
    F: np.ndarray, ideal: Sequence[float] | None = None, nadir: Sequence[float] | None = None,
    reference: float = HV_REFERENCE,
) -> float:
    """Normalised hypervolume of minimised points ``F`` (n x m, m >= 2).

    Each objective is mapped to ``(f - ideal) / (nadir - ideal)`` (a zero range counts as 1);
    the hypervolume is taken against the reference point ``reference`` in every objective (points
    beyond it add nothing) and divided by ``reference ** m``, so it lies in [0, 1]. ``ideal`` and
    ``nadir`` default to the minimum and maximum of ``F``; pass fixed bounds to compare runs.
    """
    from pymoo.indicators.hv import HV

    F = np.atleast_2d(np.asarray(F, dtype=float))
    if F.size == 0:
        return 0.0
    lo, hi = _bounds(F, ideal, nadir)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    normalised = (F - lo) / span
    m = F.shape[1]
    inside = np.all(normalised < reference, axis=1)
    if not inside.any():
        return 0.0
    value = HV(ref_point=np.full(m, float(reference)))(normalised[inside])
    return float(value) / reference**m


def hypervolume_curve(
    history: pd.DataFrame, columns: Sequence[str], ideal: Sequence[float] | None = None,
    nadir: Sequence[float] | None = None, reference: float = HV_REFERENCE,
) -> np.ndarray:
    """Hypervolume of the first k evaluations of ``history`` (in ``index`` order) for k = 1..n.

    ``columns`` are the minimised objective columns (e.g. ``["obj_acc", "obj_macs"]``); bounds
    default to the whole history's minimum and maximum, fixed for the whole curve.
    """
    ordered = history.sort_values("index")
    F = ordered[list(columns)].to_numpy(dtype=float)
    if len(F) == 0:
        return np.zeros(0)
    lo, hi = _bounds(F, ideal, nadir)
    curve = np.zeros(len(F))
    front = np.zeros((0, F.shape[1]))
    value = 0.0
    for k, f in enumerate(F):
        if not np.any(np.all(front <= f, axis=1)):  # f is not weakly dominated: the volume may grow
            front = np.vstack([front[~np.all(f <= front, axis=1)], f])
            value = hypervolume(front, lo, hi, reference)
        curve[k] = value
    return curve
