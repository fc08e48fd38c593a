"""Multi-fidelity successive halving against NSGA-II at the same number of scored examples.

On the width super-network of ``benchmarks/fidelity.py`` (MiniLM + Rotten Tomatoes, ranks x
width x heads, uniform sampling, seed 0; ``runs/bench-fidelity/uniform``, trained there first),
per search seed: ``supernet search --objectives acc,macs --eval-samples 300`` with
``--algorithm nsga2 --evaluations 48 --population 16`` and with ``--algorithm halving
--evaluations 48`` (rungs of 33, 100 and 300 examples: 144, 48 and 16 configurations), both within
48 x 300 scored examples. Each search's front is confirmed on the whole validation split
(``rescored.csv``); measured per search:

- the scored examples (the budget check) and the seconds;
- the hypervolume of the confirmed front on whole-validation accuracy and MACs, on common bounds
  (accuracy 0..1, MACs 0..the full model's), the same as ``benchmarks/width.py``;
- how many members of the search's own front the whole split demoted, and how many configurations
  it promoted.

Writes results/multi_fidelity.csv (one row per search), results/multi_fidelity.json and .md.

    python benchmarks/multi_fidelity.py [--seeds 0,1,2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, append_row, machine, markdown_table, write_json, write_markdown

CSV = RESULTS / "multi_fidelity.csv"
RUN = RESULTS.parent / "runs" / "bench-fidelity" / "uniform"
SAMPLES, EVALUATIONS, POPULATION = 300, 48, 16
SEQ = 64


def one(seed: int, algorithm: str) -> dict:
    from supernet.commands.search import run_search_command
    from supernet.search import SearchSettings

    name = f"mf-{algorithm}-s{seed}"
    d = RUN / "search" / name
    start = time.perf_counter()
    finished = (d / "pareto.csv").is_file() and "val_accuracy" in pd.read_csv(d / "pareto.csv").columns
    if not finished:  # a search stopped before its confirmation ended resumes (its history is kept)
        settings = SearchSettings(objectives=("acc", "macs"), algorithm=algorithm, population=POPULATION,
                                  evaluations=EVALUATIONS, seed=seed)
        run_search_command(RUN, settings, name, resume=(d / "search.json").is_file(), eval_samples=SAMPLES)
    seconds = time.perf_counter() - start
    history = pd.read_csv(d / "history.csv")
    rungs = pd.read_csv(d / "rungs.csv") if (d / "rungs.csv").is_file() else pd.DataFrame(columns=["examples"])
    rescored, front = pd.read_csv(d / "rescored.csv"), pd.read_csv(d / "pareto.csv")
    searched = int(rescored["status"].isin(["kept", "demoted"]).sum())
    return {"seed": seed, "algorithm": algorithm, "scored_examples": int(rungs["examples"].sum()) + SAMPLES * len(
        history), "budget_examples": EVALUATIONS * SAMPLES, "full_evaluations": len(history),
            "rung_evaluations": len(rungs), "front": len(front), "searched_front": searched,
            "demoted": int((rescored["status"] == "demoted").sum()),
            "promoted": int((rescored["status"] == "promoted").sum()), "rescored": len(rescored),
            "hypervolume": hv(front), "seconds": seconds, "front_macs": json.dumps(front["macs"].tolist()),
            "front_val_accuracy": json.dumps(front["val_accuracy"].tolist())}


def hv(front: pd.DataFrame) -> float:
    from supernet.loader import load_run
    from supernet.search import hypervolume

    if not hasattr(hv, "full"):
        setup, _ = load_run(RUN, weights=False)
        hv.full = float(setup.net.macs(setup.net.max_config(), SEQ, merged=True))
    F = np.column_stack([1 - front["val_accuracy"].to_numpy(float), front["macs"].to_numpy(float)])
    return hypervolume(F, [0.0, 0.0], [1.0, hv.full])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (RUN / "adapter.safetensors").is_file():
        raise SystemExit(f"train {RUN} first: python benchmarks/fidelity.py")
    done = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame(columns=["seed", "algorithm"])
    for seed in [int(s) for s in args.seeds.split(",")]:
        for algorithm in ("nsga2", "halving"):
            if ((done["seed"] == seed) & (done["algorithm"] == algorithm)).any():
                continue
            append_row(CSV, one(seed, algorithm))
    df = pd.read_csv(CSV)
    summary = []
    for algorithm, g in df.groupby("algorithm", sort=False):
        summary.append({"algorithm": algorithm, "seeds": len(g), "hypervolume": g["hypervolume"].mean(),
                        "hypervolume_std": g["hypervolume"].std(), "scored_examples": g["scored_examples"].mean(),
                        "budget_examples": int(g["budget_examples"].iloc[0]),
                        "demoted": int(g["demoted"].sum()), "searched_front": int(g["searched_front"].sum()),
                        "promoted": int(g["promoted"].sum()), "seconds": g["seconds"].mean()})
    write_json(RESULTS / "multi_fidelity.json", {"setup": {"run": "width super-network (uniform, seed 0)",
                                                           "eval_samples": SAMPLES, "evaluations": EVALUATIONS,
                                                           "population": POPULATION, **machine()},
                                                 "summary": summary, "rows": df.to_dict(orient="records")})
    write_markdown(RESULTS / "multi_fidelity.md", markdown_table(
        ["strategy", "hypervolume (whole validation)", "scored examples (budget)",
         "front members demoted by the whole split", "promoted", "seconds per search", "seeds"],
        [[s["algorithm"], f"{s['hypervolume']:.3f} ± {s['hypervolume_std']:.3f}",
          f"{s['scored_examples']:,.0f} ({s['budget_examples']:,})", f"{s['demoted']} of {s['searched_front']}",
          s["promoted"], f"{s['seconds']:.0f}", s["seeds"]] for s in summary]))

if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
