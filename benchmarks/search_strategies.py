"""Search strategies compared at the same evaluation budget, on real trained super-networks.

Two NLS runs of MiniLM on Rotten Tomatoes (ranks 32/24/16/...):

* ``--run`` (default ``runs/demo``): the default block grouping, 24 rank groups (3^24 configs);
  every strategy gets ``--budget`` distinct evaluations, seeds 0, 1, 2.
* ``--small-run`` (default ``runs/grid4``, trained by this script if missing with
  ``benchmarks/grid4_groups.json``: 4 groups x 4 ranks = 256 configs): ``grid`` evaluates every
  configuration, so its front is the ground truth; each strategy gets 25 % of the grid's
  evaluations.

Objectives: validation accuracy on ``--eval-samples`` examples (maximised) and MACs per
64-token sequence (minimised). Hypervolume is normalised per space: the ideal and nadir are
the best and worst accuracy and MACs over every point any strategy evaluated (the grid's, on
the small space), the reference point is 1.1 in each normalised objective, and the value is
divided by 1.1^2 (1.0 = a single point at the ideal). Evaluations are cached across strategies
and seeds (a configuration's score does not depend on who asks), which saves time, not
evaluations: each search still counts every distinct configuration it asks for.

    python benchmarks/search_strategies.py    # writes results/search_strategies.{csv,json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import RESULTS, machine, write_json

from supernet.evaluator import Evaluator
from supernet.loader import load_run
from supernet.search import SearchSettings, hypervolume, hypervolume_curve, run_search

HERE = Path(__file__).resolve().parent
POPULATION_STRATEGIES = ["nsga2", "nsga3", "smsemoa", "spea2", "morea", "tpe", "random", "local"]
COLUMNS = ["obj_acc", "obj_macs"]


class Cached:
    """The evaluator behind a dict: repeated configurations cost nothing (wall time only)."""

    def __init__(self, ev: Evaluator):
        self.ev, self.table, self.calls = ev, {}, 0

    def __call__(self, config):
        key = json.dumps(config, sort_keys=True)
        if key not in self.table:
            self.calls += 1
            self.table[key] = self.ev(config)
        return self.table[key]


def searches(space, cached, cost, budget, seeds, population, out, tag, allocator_budget):
    """Every strategy into ``out/bench-<strategy>-s<seed>`` (a run's search folder: resumable,
    and ``supernet plot`` draws them)."""
    rows, histories = [], {}
    jobs = [(s, seed) for s in POPULATION_STRATEGIES for seed in seeds] + [("midpoint", 0), ("allocator", 0)]
    for strategy, seed in jobs:
        kw = {"objectives": ("acc", "macs"), "algorithm": strategy, "seed": seed, "population": population,
              "evaluations": budget}
        if strategy == "allocator":
            kw["budget"] = ("macs", allocator_budget)
        t0 = time.perf_counter()
        d = Path(out) / f"bench-{strategy}-s{seed}"
        result = run_search(space, cached, cost, d, SearchSettings(**kw), resume=(d / "search.json").is_file())
        histories[(strategy, seed)] = result.history
        rows.append({"space": tag, "strategy": strategy, "seed": seed, "evaluations": len(result.history),
                     "front_size": len(result.pareto), "seconds": time.perf_counter() - t0,
                     "selected_index": result.selected["index"] if result.selected else None})
        print(f"{tag} {strategy} seed {seed}: {len(result.history)} evaluations", file=sys.stderr)
    return rows, histories


def score_rows(rows, histories, ideal, nadir, ground_truth=None):
    for row in rows:
        h = histories[(row["strategy"], row["seed"])]
        if row["strategy"] == "allocator":  # its answer is one configuration, not the evaluations it measured
            pts = h[h["index"] == row["selected_index"]][COLUMNS].to_numpy()
        else:
            pts = h[COLUMNS].to_numpy()
        row["hypervolume"] = hypervolume(pts, ideal=ideal, nadir=nadir)
        row["best_accuracy"] = float((-pts[:, 0]).max())
        if ground_truth:
            row["hv_fraction_of_grid"] = row["hypervolume"] / ground_truth
    return rows


def curves(histories, ideal, nadir, tag):
    out = []
    for (strategy, seed), h in histories.items():
        if strategy in ("midpoint", "allocator"):
            continue
        c = hypervolume_curve(h, COLUMNS, ideal=ideal, nadir=nadir)
        out.append(pd.DataFrame({"space": tag, "strategy": strategy, "seed": seed,
                                 "evaluations": np.arange(1, len(c) + 1), "hypervolume": np.asarray(c)}))
    return out


def markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def figures(run: str, small_run: str) -> None:
    """The README's figures, drawn by ``supernet plot`` from the benchmark's searches alone (a copy
    of the run folder without its other searches, which may score other validation subsets)."""
    import shutil

    from supernet.commands.plot import plot_run

    for tag, path in (("default", Path(run)), ("small", Path(small_run))):
        with tempfile.TemporaryDirectory() as tmp:
            view = Path(tmp) / "run"
            (view / "search").mkdir(parents=True)
            for f in ("config.json", "train_log.csv", "eval_log.csv"):
                shutil.copy(path / f, view / f)
            for d in (path / "search").glob("bench-*"):
                shutil.copytree(d, view / "search" / d.name)
            plot_run(view, out=Path(tmp) / "plots")
            for name in ("search_progress_bench-nsga2-s0", "hypervolume"):
                for ext in ("png", "csv"):
                    shutil.copy(Path(tmp) / "plots" / f"{name}.{ext}", RESULTS / f"{tag}_{name}.{ext}")


def ensure_small_run(path: Path) -> None:
    if (path / "adapter.safetensors").is_file():
        return
    cmd = [sys.executable, "-m", "supernet", "train", "--name", path.name, "--out", str(path.parent),
           "--ranks", "32,24,16,8", "--groups", str(HERE / "grid4_groups.json")]
    print("training the 4-group run:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--small-run", default="runs/grid4")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every strategy on the small space")
    ap.add_argument("--default-seeds", default="0,1,2", help="seeds of every strategy on the default space")
    ap.add_argument("--eval-samples", type=int, default=200)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ensure_small_run(Path(args.small_run))
    all_rows, all_curves, summary = [], [], {"machine": machine(), "eval_samples": args.eval_samples,
                                             "seeds": seeds, "reference_point": "1.1 per normalised objective"}
    # the small space: grid is the ground truth
    setup, _ = load_run(args.small_run)
    ev = Evaluator(setup.net, setup.enc, "validation", args.eval_samples, 64, "cpu", setup.cfg.max_length)
    cached = Cached(ev)
    space = setup.net.space
    small_dir = Path(args.small_run) / "search"
    grid_dir = small_dir / "bench-grid"
    grid = run_search(space, cached, ev.cost, grid_dir,
                      SearchSettings(objectives=("acc", "macs"), algorithm="grid", evaluations=space.size()),
                      resume=(grid_dir / "search.json").is_file())
    pts = grid.history[COLUMNS].to_numpy()
    ideal, nadir = pts.min(0), pts.max(0)
    truth = hypervolume(grid.pareto[COLUMNS].to_numpy(), ideal=ideal, nadir=nadir)
    small_budget = space.size() // 4
    mid_macs = ev.cost(space.mid_config())["macs"]
    rows, hist = searches(space, cached, ev.cost, small_budget, seeds, 8, small_dir, "small", mid_macs)
    all_rows += score_rows(rows, hist, ideal, nadir, truth)
    all_rows.append({"space": "small", "strategy": "grid", "seed": 0, "evaluations": len(grid.history),
                     "front_size": len(grid.pareto), "hypervolume": truth, "hv_fraction_of_grid": 1.0,
                     "best_accuracy": float((-pts[:, 0]).max())})
    all_curves += curves(hist, ideal, nadir, "small")
    summary["small"] = {"run": args.small_run, "space_size": space.size(), "budget": small_budget,
                        "grid_hypervolume": truth, "grid_front": len(grid.pareto),
                        "distinct_evaluations": cached.calls}
    # the default space: 24 groups
    setup, _ = load_run(args.run)
    ev = Evaluator(setup.net, setup.enc, "validation", args.eval_samples, 64, "cpu", setup.cfg.max_length)
    cached = Cached(ev)
    space = setup.net.space
    mid_macs = ev.cost(space.mid_config())["macs"]
    default_seeds = [int(s) for s in args.default_seeds.split(",")]
    rows, hist = searches(space, cached, ev.cost, args.budget, default_seeds, args.population,
                          Path(args.run) / "search", "default", mid_macs)
    pts = np.concatenate([h[COLUMNS].to_numpy() for h in hist.values()])
    ideal, nadir = pts.min(0), pts.max(0)
    all_rows += score_rows(rows, hist, ideal, nadir)
    all_curves += curves(hist, ideal, nadir, "default")
    summary["default"] = {"run": args.run, "space_size": space.size(), "budget": args.budget, "seeds": default_seeds,
                          "distinct_evaluations": cached.calls}
    df = pd.DataFrame(all_rows)
    df.to_csv(RESULTS / "search_strategies.csv", index=False)
    pd.concat(all_curves).to_csv(RESULTS / "search_strategies_curves.csv", index=False)
    table = (df.groupby(["space", "strategy"])
             .agg(hv_mean=("hypervolume", "mean"), hv_std=("hypervolume", "std"), evaluations=("evaluations", "mean"),
                  best_accuracy=("best_accuracy", "mean"), runs=("seed", "count")).reset_index())
    for space_name in ("small", "default"):
        sub = table[table["space"] == space_name].set_index("strategy")
        summary[space_name]["hv_mean"] = sub["hv_mean"].to_dict()
        if "nsga2" in sub.index and "random" in sub.index:
            summary[space_name]["nsga2_beats_random_on_mean"] = bool(sub.loc["nsga2", "hv_mean"] >
                                                                     sub.loc["random", "hv_mean"])
    small = df[(df["space"] == "small") & (df["strategy"] == "nsga2")]
    summary["small"]["nsga2_fraction_of_grid_hv"] = {int(r.seed): float(r.hv_fraction_of_grid)
                                                     for r in small.itertuples()}
    write_json(RESULTS / "search_strategies.json", summary)
    figures(args.run, args.small_run)
    (RESULTS / "search_strategies.md").write_text(markdown(table))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
