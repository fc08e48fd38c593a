"""The data behind ``supernet plot``: a run's searches and logs read, checked and turned into frames.

Each figure of :mod:`supernet.plots` is drawn from one frame built here, and the same frame is
written as its CSV; nothing here imports matplotlib, so the data are testable without it.
pandas is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from supernet import validate
from supernet.errors import SupernetError
from supernet.space import SearchSpace

if TYPE_CHECKING:
    import pandas as pd

    from supernet.search.objectives import Objective

SEARCH_DIR = "search"  # as supernet.commands.search.SEARCH_DIR (the library never imports the commands)
SINGLE_POINT = ("midpoint", "allocator")  # strategies whose answer is one configuration

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
    """The run's heuristic midpoint from config.json's ``choices`` (and ``kinds``, for dimensions
    that are not ranks): choice ``(len - 1) // 2`` of each dimension's choices in canonical order;
    None when the record has no usable choices."""
    choices = record.get("choices")
    if not isinstance(choices, dict) or not choices:
        return None
    kinds = record.get("kinds")
    try:
        space = SearchSpace.from_json({"choices": choices, "kinds": kinds if isinstance(kinds, dict) else {}})
        return space.mid_config()
    except (TypeError, ValueError, IndexError, AttributeError, SupernetError):
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


def suffix(objective: Objective) -> str:
    unit = SHORT_UNITS[objective.name]
    return "" if not unit else (unit if unit == "%" else f" {unit}")


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


def reference_text(row: pd.Series) -> str:
    """The reference point of a panel in readable units, e.g. ``accuracy 61.2 %, 1.35 MMACs``."""
    from supernet.search import OBJECTIVES

    parts = []
    for i in (1, 2):
        o = OBJECTIVES[row[f"objective_{i}"].removeprefix("obj_")]
        value = o.raw(row[f"reference_{i}"]) * UNITS[o.name][0]
        equal = " (every point equal)" if row[f"ideal_{i}"] == row[f"nadir_{i}"] else ""
        parts.append(f"{o.label} {value:.4g}{suffix(o)}{equal}")
    return ", ".join(parts)


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


