"""``supernet plot``: the figures of a run folder, each PNG with the CSV of exactly what it shows.

:func:`plot_run` reads the run (:mod:`supernet.plot_data`), builds every frame before anything is
written, and draws them (:mod:`supernet.plots`) into ``RUN/plots/`` or ``--out``; a folder it did
not write is refused, and each file is written atomically and recorded in the folder's ledger.
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from supernet import files, validate
from supernet.errors import SupernetError
from supernet.plot_data import (
    hypervolume_frame,
    load_search,
    load_searches,
    mid_config,
    progress_frame,
    search_names,
    training_frame,
)
from supernet.plots import plot_hypervolume, plot_progress, plot_training, write_csv
from supernet.runfiles import paths_in_use, read_run_config

PLOTS_DIR = "plots"


def run(args: argparse.Namespace) -> int:
    """``supernet plot``: print one JSON line listing the files written."""
    written = plot_run(args.run, args.search, args.out)
    print(json.dumps({"run": str(args.run), "files": [str(f) for f in written]}))
    return 0


def plot_run(run_dir: str | Path, search: str | None = None, out: str | Path | None = None) -> list[Path]:
    """Write the plots of a run; returns the files written (each PNG followed by its CSV).

    Args:
        run_dir: a run folder (``supernet train``'s output).
        search: only the progress plot of this search (no hypervolume or training plot).
        out: output folder (default ``RUN/plots``), created if needed.

    Raises:
        SupernetError: not a run, an unknown search, nothing to plot, or a corrupt file.
    """
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
