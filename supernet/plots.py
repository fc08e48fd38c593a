"""The figures of ``supernet plot`` (:mod:`supernet.commands.plot`), each PNG with the CSV of exactly what it shows.

Each is drawn from one frame of :mod:`supernet.plot_data` and written atomically (temporary file,
then rename) into ``RUN/plots/`` (or ``--out``):

- ``search_progress_<search>.png/.csv`` per search: every evaluation in the space of the search's
  first two objectives (accuracy in % on the y axis when ``acc`` is one of them), coloured by
  generation, the Pareto front highlighted and drawn as a step line, the heuristic midpoint's
  value as a dashed horizontal line and the allocator's choice as a distinct marker (both taken
  from the other searches of the run, when there are any). CSV: one ``evaluation`` row per
  history row (with ``pareto``: the row is in pareto.csv, and ``front_line``: it is on the
  drawn two-objective step line), plus one ``midpoint`` row and one ``allocator`` row per
  reference marker shown.
- ``hypervolume.png/.csv``: normalised hypervolume against the number of evaluations, one panel
  per pair of first two objectives, one line per multi-evaluation search of that pair and one
  marker per midpoint / allocator search (its answer, at the evaluations it spent). The ideal and
  nadir are the minimum and maximum over every point of the panel (in minimised units, as in the
  ``obj_`` columns: ``obj_acc = -accuracy``); the reference point is ``ideal + 1.1 * (nadir -
  ideal)`` (see :func:`supernet.search.hypervolume`). CSV: one row per plotted value, with the
  bounds and the reference point in its columns.
- ``training.png/.csv``: training loss per step (raw and a moving average) and the periodic
  validation accuracy (%) of the max / mid / min sub-networks. CSV: one row per step.

matplotlib and pandas are imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from supernet import files
from supernet.plot_data import (  # noqa: F401 (the data API, re-exported)
    SEARCH_DIR,
    SINGLE_POINT,
    UNITS,
    Search,
    axes_of,
    hypervolume_frame,
    load_search,
    load_searches,
    mid_config,
    progress_frame,
    reference_text,
    search_names,
    smoothing_window,
    suffix,
    training_frame,
)

if TYPE_CHECKING:
    import pandas as pd

DPI = 150
MIDPOINT_COLOR, ALLOCATOR_COLOR = "0.3", "gold"


# ----------------------------------------------------------------------------- writing
def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """``frame`` to ``path`` without the index, atomically, recorded in the folder's ledger."""
    return files.write_owned(path.parent, path.name, frame.to_csv(index=False))


def write_png(fig, path: Path) -> Path:
    """Save and close a figure as a PNG at ``DPI``, atomically, recorded in the folder's ledger."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return files.write_owned(path.parent, path.name, buffer.getvalue())


def _pyplot():
    """pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- (a) search progress
def plot_progress(frame: pd.DataFrame, search: Search, path: Path) -> Path:
    """Draw :func:`progress_frame`'s data: evaluations by generation, front, midpoint, allocator."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm
    from matplotlib.ticker import MaxNLocator

    xo, yo = axes_of(search)
    xcol, ycol = UNITS[xo.name][2], UNITS[yo.name][2]
    ev = frame[frame["series"] == "evaluation"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    g = ev["generation"].to_numpy(dtype=int)
    points = ax.scatter(ev[xcol], ev[ycol], c=g, cmap=plt.get_cmap("viridis", g.max() - g.min() + 1),
                        norm=BoundaryNorm(np.arange(g.min(), g.max() + 2) - 0.5, g.max() - g.min() + 1),
                        s=22, alpha=0.85, edgecolors="none", label=f"evaluations ({len(ev)})", zorder=2)
    bar = fig.colorbar(points, ax=ax, pad=0.02)
    bar.set_label("generation")
    ticks = MaxNLocator(integer=True, nbins=10).tick_values(g.min(), g.max())
    bar.set_ticks([t for t in ticks if g.min() <= t <= g.max()])
    front = ev[ev["pareto"]]
    ax.scatter(front[xcol], front[ycol], s=70, facecolors="none", edgecolors="crimson", linewidths=1.4,
               label=f"Pareto front ({len(front)})", zorder=3)
    line = ev[ev["front_line"]].sort_values([xcol, ycol])
    ax.plot(line[xcol], line[ycol], drawstyle="steps-post", color="crimson", lw=1.3, zorder=3)
    for _, row in frame[frame["series"] == "midpoint"].iterrows():
        ax.axhline(row[ycol], color=MIDPOINT_COLOR, ls="--", lw=1.1, zorder=1,
                   label=f"midpoint ({row[ycol]:.4g}{suffix(yo)}, from {row['search']})")
        if math.isfinite(row[xcol]):
            ax.scatter([row[xcol]], [row[ycol]], marker="s", s=45, color=MIDPOINT_COLOR, zorder=4)
    for _, row in frame[frame["series"] == "allocator"].iterrows():
        ax.scatter([row[xcol]], [row[ycol]], marker="*", s=220, color=ALLOCATOR_COLOR, edgecolors="black",
                   linewidths=0.7, zorder=5, label=f"allocator ({row['search']})")
    ax.set_xlabel(UNITS[xo.name][1])
    ax.set_ylabel(UNITS[yo.name][1])
    ax.set_title(f"Search {search.name} ({search.algorithm}): {yo.label} vs {xo.label}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return write_png(fig, path)


def plot_hypervolume(frame: pd.DataFrame, path: Path) -> Path:
    """Draw :func:`hypervolume_frame`'s data: one panel per objective pair."""
    from supernet.search import HV_REFERENCE, OBJECTIVES

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    pairs = list(dict.fromkeys(frame["objectives"]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(7.5 * len(pairs), 5), squeeze=False)
    style = {"midpoint": ("s", 60, MIDPOINT_COLOR), "allocator": ("*", 220, ALLOCATOR_COLOR)}
    for ax, pair in zip(axes[0], pairs, strict=True):
        part = frame[frame["objectives"] == pair]
        for name, rows in part[part["kind"] == "curve"].groupby("search", sort=False):
            ax.plot(rows["evaluations"], rows["hypervolume"], drawstyle="steps-post", lw=1.6,
                    label=f"{name} ({rows['algorithm'].iloc[0]})")
        for _, row in part[part["kind"] == "point"].iterrows():
            marker, size, color = style.get(row["algorithm"], ("D", 60, "0.5"))
            n = int(row["evaluations"])
            ax.scatter([row["evaluations"]], [row["hypervolume"]], marker=marker, s=size, color=color,
                       edgecolors="black", linewidths=0.7, zorder=4,
                       label=f"{row['search']} ({row['algorithm']}, {n} evaluation{'s' * (n != 1)})")
        names = [OBJECTIVES[n].label for n in pair.split(",")]
        ax.set_title(f"Hypervolume, {names[0]} × {names[1]}\nreference point: {reference_text(part.iloc[0])} "
                     f"(ideal + {HV_REFERENCE:g} × range)", fontsize=10)
        ax.set_xlabel("evaluations (distinct configurations scored)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("normalised hypervolume (0 to 1)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(ax.get_legend_handles_labels()[1]) > 12:  # many searches: the legend goes beside the axes
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        else:
            ax.legend(loc="lower right", fontsize=8)
    return write_png(fig, path)


def plot_training(frame: pd.DataFrame, path: Path) -> Path:
    """Draw :func:`training_frame`'s data: loss on the left, validation accuracy on the right."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if "loss" in frame.columns:
        rows = frame.dropna(subset=["loss"])
        left.plot(rows["step"], rows["loss"], color="C0", alpha=0.25, lw=0.8, label="loss per step")
        left.plot(rows["step"], rows["loss_smoothed"], color="C0", lw=1.8,
                  label=f"moving average ({smoothing_window(len(rows))} steps)")
        left.legend(loc="upper right", fontsize=8)
    else:
        left.text(0.5, 0.5, "no training log", ha="center", va="center", transform=left.transAxes)
    left.set_title("Training loss (sampled sub-network per step)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (cross-entropy)")
    left.grid(True, alpha=0.3)
    accuracy = [c for c in frame.columns if c.endswith("_accuracy_percent")]
    for i, c in enumerate(accuracy):
        rows = frame.dropna(subset=[c])
        right.plot(rows["step"], rows[c], marker="o", ms=4, color=f"C{i + 1}", label=c.split("_")[0])
    if accuracy:
        right.legend(title="sub-network", loc="lower right", fontsize=8)
    else:
        right.text(0.5, 0.5, "no validation log", ha="center", va="center", transform=right.transAxes)
    right.set_title("Validation accuracy of the max / mid / min sub-networks")
    right.set_xlabel("optimizer step")
    right.set_ylabel("accuracy (%)")
    right.grid(True, alpha=0.3)
    return write_png(fig, path)
