"""``supernet plot``: figures of a run folder, each PNG with the CSV of exactly what it shows.

Written into ``RUN/plots/`` (or ``--out``), every file atomically (temporary file, then rename):

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

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from supernet import files, validate
from supernet.errors import SupernetError

if TYPE_CHECKING:
    import pandas as pd

    from supernet.search.objectives import Objective

SEARCH_DIR = "search"  # as supernet.searching.SEARCH_DIR (not imported: it pulls in torch)
PLOTS_DIR = "plots"
DPI = 150
SINGLE_POINT = ("midpoint", "allocator")  # strategies whose answer is one configuration
MIDPOINT_COLOR, ALLOCATOR_COLOR = "0.3", "gold"

#: objective name -> (factor from the raw metric to the plotted value, axis label, CSV column)
UNITS: dict[str, tuple[float, str, str]] = {
    "acc": (100.0, "accuracy (%)", "accuracy_percent"),
    "loss": (1.0, "validation loss", "loss"),
    "macs": (1e-6, "MACs per sequence (millions, MMACs)", "macs_millions"),
    "params": (1e-3, "trainable parameters (thousands)", "params_thousands"),
    "latency": (1e3, "latency (ms)", "latency_ms"),
    "size": (1e-6, "deployed size (MB)", "size_mb"),
}
SHORT_UNITS = {"acc": "%", "loss": "", "macs": "MMACs", "params": "k params", "latency": "ms", "size": "MB"}


# ----------------------------------------------------------------------------- reading
def _read_csv(what: str, path: Path, required: Sequence[str], numeric: Sequence[str] = ()) -> pd.DataFrame:
    """A CSV file with at least ``required`` columns, ``numeric`` ones as floats; else SupernetError."""
    import pandas as pd

    text = validate.read_text(what, path)
    try:
        frame = pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:
        raise SupernetError(f"{what} {str(path)!r} is corrupt (empty, no header)") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise SupernetError(f"{what} {str(path)!r} is corrupt: {str(e).strip().splitlines()[-1]}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SupernetError(f"{what} {str(path)!r} is corrupt (no column {missing[0]!r})")
    for c in numeric:
        try:
            frame[c] = frame[c].astype(float)
        except (TypeError, ValueError):
            raise SupernetError(f"{what} {str(path)!r} is corrupt (column {c!r} is not numeric)") from None
    return frame


def _configs(what: str, path: Path, texts: pd.Series) -> list[dict]:
    """The ``config`` column parsed as JSON objects."""
    out = []
    for n, text in enumerate(texts):
        try:
            config = json.loads(text)
        except (TypeError, ValueError):
            config = None
        if not isinstance(config, dict):
            raise SupernetError(f"{what} {str(path)!r} is corrupt (row {n + 1}: config is not a JSON object)")
        out.append(config)
    return out


@dataclass
class Search:
    """One search of a run, as read from ``RUN/search/<name>/``.

    Attributes:
        name: the folder name.
        algorithm: the strategy (``settings.algorithm``).
        objectives: the objectives, in settings order.
        history: history.csv, with ``configs`` (parsed) beside it.
        pareto: the ``index`` values of pareto.csv (recomputed from history when it is missing).
        selected: selected.json (the allocator's answer) or None.
    """

    name: str
    algorithm: str
    objectives: tuple[Objective, ...]
    history: pd.DataFrame
    configs: list[dict] = field(repr=False)
    pareto: set[int]
    selected: dict[str, Any] | None

    @property
    def pair(self) -> tuple[str, str]:
        """The names of the first two objectives (the plotted ones)."""
        return self.objectives[0].name, self.objectives[1].name

    def answer(self) -> pd.DataFrame | None:
        """A single-point search's answer as a one-row frame (None for other searches or no answer)."""
        if self.algorithm == "midpoint":
            return self.history.iloc[:1]
        if self.algorithm == "allocator" and self.selected is not None:
            rows = self.history[self.history["index"] == self.selected.get("index")]
            return rows.iloc[:1] if len(rows) else None
        return None


def load_search(run_dir: Path, name: str, required: bool = True) -> Search | None:
    """Read one search folder; a missing one raises SupernetError, and so does one without
    evaluations yet when ``required`` (else it gives None)."""
    import pandas as pd

    from supernet.search import pareto_front, resolve_objectives

    folder = Path(run_dir) / SEARCH_DIR / name
    manifest_path = folder / "search.json"
    if not manifest_path.is_file():
        raise SupernetError(f"run {str(run_dir)!r} has no search {name!r} (no {SEARCH_DIR}/{name}/search.json)")
    manifest = validate.read_json("search file", manifest_path)
    settings = manifest.get("settings") if isinstance(manifest, dict) else None
    if not isinstance(settings, dict) or not isinstance(settings.get("objectives"), list):
        raise SupernetError(f"search file {str(manifest_path)!r} is corrupt (no settings.objectives)")
    objectives = resolve_objectives(settings["objectives"])
    columns = [o.column for o in objectives]
    history_path = folder / "history.csv"
    if not history_path.is_file():
        if not required:
            return None
        raise SupernetError(f"search {name!r} has no evaluations yet (no history.csv)")
    history = _read_csv("history file", history_path, ["index", "generation", "config", *columns],
                        ["index", "generation", *columns])
    if history.empty:
        if not required:
            return None
        raise SupernetError(f"search {name!r} has no evaluations yet (history.csv is empty)")
    history = history.astype({"index": "int64", "generation": "int64"})
    configs = _configs("history file", history_path, history["config"])
    keys = [json.dumps(c, sort_keys=True) for c in configs]
    first = ~pd.Series(keys).duplicated().to_numpy()  # a configuration recorded twice is one evaluation
    if not first.all():
        history = history[first].reset_index(drop=True)
        configs = [c for c, keep in zip(configs, first, strict=True) if keep]
    pareto_path = folder / "pareto.csv"
    if pareto_path.is_file():
        front = _read_csv("Pareto file", pareto_path, ["index"], ["index"])
    else:  # a search stopped before its end: the front of what it evaluated
        front = pareto_front(history, columns)
    selected = None
    if (folder / "selected.json").is_file():
        selected = validate.read_json("allocator answer", folder / "selected.json")
        if not isinstance(selected, dict) or not isinstance(selected.get("config"), dict):
            raise SupernetError(f"allocator answer {str(folder / 'selected.json')!r} is corrupt")
    return Search(name, str(settings.get("algorithm", "?")), objectives, history, configs,
                  {int(i) for i in front["index"]}, selected)


def search_names(run_dir: Path) -> list[str]:
    """The searches of a run (folders of ``RUN/search`` holding a search.json), sorted."""
    root = Path(run_dir) / SEARCH_DIR
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "search.json").is_file())


def load_searches(run_dir: Path, strict: bool = True) -> list[Search]:
    """Every search of the run that has evaluations (one still without any is skipped).

    With ``strict=False`` a search whose files are corrupt is skipped with a warning instead of
    failing (``plot --search X`` only borrows the other searches' reference markers)."""
    out = []
    for name in search_names(run_dir):
        try:
            found = load_search(run_dir, name, required=False)
        except SupernetError as e:
            if strict:
                raise
            print(f"supernet: warning: skipping search {name!r}: {e}", file=sys.stderr)
            continue
        if found is not None:
            out.append(found)
    return out


def mid_config(record: dict) -> dict | None:
    """The run's heuristic midpoint from config.json's ``choices``: choice ``(len - 1) // 2`` of each
    group's choices sorted largest to smallest; None when the record has no usable choices."""
    choices = record.get("choices")
    if not isinstance(choices, dict) or not choices:
        return None
    try:
        return {g: sorted((int(v) for v in c), reverse=True)[(len(c) - 1) // 2] for g, c in choices.items()}
    except (TypeError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- values
def _metric(frame: pd.DataFrame, objective: Objective) -> np.ndarray | None:
    """The raw metric of ``objective`` for each row (from its ``obj_`` column or its metric column)."""
    if objective.column in frame.columns:
        return objective.raw(frame[objective.column].to_numpy(dtype=float))
    if objective.metric in frame.columns:
        return frame[objective.metric].to_numpy(dtype=float)
    return None


def _shown(frame: pd.DataFrame, objective: Objective) -> np.ndarray | None:
    """The plotted value (readable units, see ``UNITS``) of ``objective`` for each row."""
    raw = _metric(frame, objective)
    return None if raw is None else raw * UNITS[objective.name][0]


def _minimised(frame: pd.DataFrame, objectives: Sequence[Objective]) -> np.ndarray | None:
    """``n x k`` minimised objective values (as in the ``obj_`` columns), or None if a metric is missing."""
    cols = [_metric(frame, o) for o in objectives]
    if any(c is None for c in cols):
        return None
    return np.column_stack([o.sign * c for o, c in zip(objectives, cols, strict=True)])


def axes_of(search: Search) -> tuple[Objective, Objective]:
    """``(x, y)`` objectives of a progress plot: accuracy on y when it is one of the first two."""
    a, b = search.objectives[0], search.objectives[1]
    return (a, b) if b.name == "acc" else (b, a)


def midpoint_row(searches: Sequence[Search], search: Search, mid: dict | None) -> tuple[str, pd.DataFrame] | None:
    """Where the midpoint's value comes from: a midpoint search of the run, else a history row
    (of ``search`` first, then the others) whose config is the run's mid config; else None."""
    for s in searches:
        if s.algorithm == "midpoint":
            return s.name, s.history.iloc[:1]
    if mid is None:
        return None
    for s in [search, *[t for t in searches if t.name != search.name]]:
        for i, config in enumerate(s.configs):
            if config == mid:
                return s.name, s.history.iloc[i:i + 1]
    return None


def progress_frame(search: Search, searches: Sequence[Search], mid: dict | None) -> pd.DataFrame:
    """The data of ``search_progress_<name>``: evaluations, then the midpoint and allocator rows."""
    import pandas as pd

    from supernet.search import non_dominated

    xo, yo = axes_of(search)
    xcol, ycol = UNITS[xo.name][2], UNITS[yo.name][2]
    h = search.history
    in_front = h["index"].isin(search.pareto).to_numpy()
    line = np.zeros(len(h), dtype=bool)
    F = _minimised(h, (xo, yo))
    if in_front.any():
        line[np.flatnonzero(in_front)[non_dominated(F[in_front])]] = True
    frames = [pd.DataFrame({"series": "evaluation", "search": search.name, "index": h["index"],
                            "generation": h["generation"], xcol: _shown(h, xo), ycol: _shown(h, yo),
                            "pareto": in_front, "front_line": line, "config": h["config"]})]
    refs = []
    found = midpoint_row(searches, search, mid)
    if found is not None:
        refs.append(("midpoint", *found))
    refs += [("allocator", s.name, s.answer()) for s in searches if s.algorithm == "allocator"]
    for series, name, row in refs:
        if row is None or _shown(row, yo) is None:
            continue
        x = _shown(row, xo)
        frames.append(pd.DataFrame({
            "series": series, "search": name, "index": row["index"].to_numpy(),
            "generation": row["generation"].to_numpy(),
            xcol: np.nan if x is None else x, ycol: _shown(row, yo), "pareto": False, "front_line": False,
            "config": row["config"].to_numpy()}))
    return pd.concat(frames, ignore_index=True)


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
                   label=f"midpoint ({row[ycol]:.4g}{_suffix(yo)}, from {row['search']})")
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


def _suffix(objective: Objective) -> str:
    unit = SHORT_UNITS[objective.name]
    return "" if not unit else (unit if unit == "%" else f" {unit}")


# ----------------------------------------------------------------------------- (b) hypervolume
def hypervolume_frame(searches: Sequence[Search]) -> pd.DataFrame:
    """One row per plotted hypervolume value: a curve (k = 1..n) per multi-evaluation search and one
    point per midpoint / allocator answer, for each pair of first two objectives of a multi-evaluation
    search. Columns: ``objectives``, ``search``, ``algorithm``, ``kind`` (curve / point),
    ``evaluations``, ``hypervolume``, ``objective_1/2``, ``ideal_1/2``, ``nadir_1/2`` and
    ``reference_1/2`` (minimised units, as the ``obj_`` columns)."""
    import pandas as pd

    from supernet.search import HV_REFERENCE

    pairs = list(dict.fromkeys(s.pair for s in searches if s.algorithm not in SINGLE_POINT))
    frames = [_pair_frame(pair, searches, HV_REFERENCE) for pair in pairs]
    frames = [f for f in frames if f is not None]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _pair_frame(pair: tuple[str, str], searches: Sequence[Search], reference: float) -> pd.DataFrame | None:
    """The hypervolume rows of one objective pair, under bounds common to all its points."""
    import pandas as pd

    from supernet.search import OBJECTIVES, hypervolume, hypervolume_curve

    objectives = (OBJECTIVES[pair[0]], OBJECTIVES[pair[1]])
    columns = [o.column for o in objectives]
    curves = [s for s in searches if s.algorithm not in SINGLE_POINT and s.pair == pair]
    points = []
    for s in searches:
        answer = s.answer() if s.algorithm in SINGLE_POINT else None
        F = None if answer is None else _minimised(answer, objectives)
        if F is not None:
            points.append((s, F, len(s.history)))
    every = [s.history[columns].to_numpy(dtype=float) for s in curves] + [F for _, F, _ in points]
    every = np.vstack(every)
    every = every[np.all(np.isfinite(every), axis=1)]
    if len(every) == 0:
        return None
    ideal, nadir = every.min(axis=0), every.max(axis=0)
    # An objective on which every point is equal normalises to 0 whatever its span (the hypervolume
    # does not depend on it); a span of 1% of the value keeps the reported reference point readable.
    span = np.where(nadir - ideal > 0, nadir - ideal, np.maximum(np.abs(ideal), 1e-12) * 0.01)
    ref = ideal + reference * span
    rows = []
    for s in curves:
        curve = hypervolume_curve(s.history, columns, ideal, nadir, reference)
        rows += [(s.name, s.algorithm, "curve", k + 1, v) for k, v in enumerate(curve)]
    rows += [(s.name, s.algorithm, "point", n, hypervolume(F, ideal, nadir, reference)) for s, F, n in points]
    frame = pd.DataFrame(rows, columns=["search", "algorithm", "kind", "evaluations", "hypervolume"])
    frame.insert(0, "objectives", ",".join(pair))
    for i, o in enumerate(objectives, start=1):
        frame[f"objective_{i}"] = o.column
        frame[f"ideal_{i}"] = ideal[i - 1]
        frame[f"nadir_{i}"] = nadir[i - 1]
        frame[f"reference_{i}"] = ref[i - 1]
    return frame


def _reference_text(row: pd.Series) -> str:
    """The reference point of a panel in readable units, e.g. ``accuracy 61.2 %, 1.35 MMACs``."""
    from supernet.search import OBJECTIVES

    parts = []
    for i in (1, 2):
        o = OBJECTIVES[row[f"objective_{i}"].removeprefix("obj_")]
        value = o.raw(row[f"reference_{i}"]) * UNITS[o.name][0]
        equal = " (every point equal)" if row[f"ideal_{i}"] == row[f"nadir_{i}"] else ""
        parts.append(f"{o.label} {value:.4g}{_suffix(o)}{equal}")
    return ", ".join(parts)


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
        ax.set_title(f"Hypervolume, {names[0]} × {names[1]}\nreference point: {_reference_text(part.iloc[0])} "
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


# ----------------------------------------------------------------------------- (c) training
def smoothing_window(steps: int) -> int:
    """Moving-average window of the training loss: a twentieth of the steps, 5 to 50."""
    return int(min(50, max(5, steps // 20)))


def training_frame(run_dir: Path) -> pd.DataFrame | None:
    """One row per step: ``loss``, ``loss_smoothed`` (trailing moving average, window
    :func:`smoothing_window`) and ``<subnet>_accuracy_percent`` per validated sub-network;
    None when the run has neither log (or both are empty)."""
    import pandas as pd

    parts = []
    train_path, eval_path = Path(run_dir) / "train_log.csv", Path(run_dir) / "eval_log.csv"
    if train_path.is_file():
        log = _read_csv("training log", train_path, ["step", "loss"], ["step", "loss"])
        if len(log):
            loss = log["loss"].replace([np.inf, -np.inf], np.nan)
            smooth = loss.rolling(smoothing_window(len(log)), min_periods=1).mean()
            parts.append(pd.DataFrame({"step": log["step"], "loss": loss, "loss_smoothed": smooth}))
    if eval_path.is_file():
        ev = _read_csv("validation log", eval_path, ["step", "subnet", "accuracy"], ["step", "accuracy"])
        if len(ev):
            wide = ev.pivot_table(index="step", columns="subnet", values="accuracy", aggfunc="last")
            order = [s for s in ("max", "mid", "min") if s in wide.columns]
            order += sorted(str(s) for s in wide.columns if s not in order)
            wide = (100 * wide[order]).rename(columns=lambda s: f"{s}_accuracy_percent").reset_index()
            parts.append(wide.rename_axis(None, axis=1))
    if not parts:
        return None
    frame = parts[0]
    for p in parts[1:]:
        frame = frame.merge(p, on="step", how="outer")
    frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
    return frame.astype({"step": "int64"})


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


# ----------------------------------------------------------------------------- the command
def plot_run(run_dir: str | Path, search: str | None = None, out: str | Path | None = None) -> list[Path]:
    """Write the plots of a run; returns the files written (each PNG followed by its CSV).

    Args:
        run_dir: a run folder (``supernet train``'s output).
        search: only the progress plot of this search (no hypervolume or training plot).
        out: output folder (default ``RUN/plots``), created if needed.

    Raises:
        SupernetError: not a run, an unknown search, nothing to plot, or a corrupt file.
    """
    from supernet.run import read_run_config

    run_dir = Path(run_dir)
    record = read_run_config(run_dir)
    if search is not None:
        validate.run_name(search)
        if search not in search_names(run_dir):
            known = ", ".join(search_names(run_dir)) or "none"
            raise SupernetError(f"run {str(run_dir)!r} has no search {search!r} (its searches: {known})")
    searches = load_searches(run_dir, strict=search is None)
    targets = searches
    if search is not None:
        targets = [s for s in searches if s.name == search] or [load_search(run_dir, search)]
    training = None if search is not None else training_frame(run_dir)
    if not targets and training is None:
        raise SupernetError(f"nothing to plot in {str(run_dir)!r}: no train_log.csv and no searches")
    out_dir = validate.writable_dir("--out", out if out is not None else run_dir / PLOTS_DIR)
    if out is not None and Path(out).resolve() != (run_dir / PLOTS_DIR).resolve():
        from supernet.run import paths_in_use

        files.check_clear_of("--out", out_dir, paths_in_use(run_dir, record), f"run {str(run_dir)!r}")
    mid = mid_config(record)
    # Everything is computed before anything is written: (name, frame, draw) per figure.
    figures = []
    for s in targets:
        frame = progress_frame(s, searches, mid)
        figures.append((f"search_progress_{s.name}", frame, lambda f, p, s=s: plot_progress(f, s, p)))
    if search is None:
        hv = hypervolume_frame(searches)
        if len(hv):
            figures.append(("hypervolume", hv, plot_hypervolume))
    if training is not None:
        figures.append(("training", training, plot_training))
    names = [f"{name}{ext}" for name, _, _ in figures for ext in (".png", ".csv")]
    recorded = files.read_ledger(out_dir) if out_dir.is_dir() else {}
    legacy = not recorded and out_dir.resolve() == (run_dir / PLOTS_DIR).resolve()
    if not legacy:  # RUN/plots from before the ledger held only what supernet wrote there
        files.refuse_foreign("--out", out_dir, names, recorded)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, frame, draw in figures:
        written += [draw(frame, out_dir / f"{name}.png"), write_csv(frame, out_dir / f"{name}.csv")]
    return written


def add_plot_parser(sub) -> argparse.ArgumentParser:
    """Add ``supernet plot`` to the CLI's subparsers."""
    p = sub.add_parser("plot", help="PNG figures (and their CSV data) of a run's training and searches")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--search", help="only the progress plot of this search (a folder name under RUN/search)")
    p.add_argument("--out", help="output folder [RUN/plots]")
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    """``supernet plot``: print one JSON line listing the files written."""
    files = plot_run(args.run, args.search, args.out)
    print(json.dumps({"run": str(args.run), "files": [str(f) for f in files]}))
    return 0
