"""Scaling modes measured on the embedded default (MiniLM-L6 + Rotten Tomatoes), 3 seeds.

Part ``rora``: the RoRA claim (Liu et al. 2025; rsLoRA, Kalajdzievski 2023). Fixed-rank LoRA
(one rank everywhere, no elastic rank) at r in {4, 8, 16, 32, 64, 128}, trained with
``alpha/r`` and with ``alpha/sqrt(r)`` at the same alpha (``--alpha``, 8) and the same recipe
(400 steps of 16, lr 5e-4), then scored on the whole test split. Does ``alpha/sqrt(r)`` keep
improving where ``alpha/r`` stalls? (At alpha 32, the default of training, r = 4 gets a scale of
8 (``alpha/r``) or 16 (``alpha/sqrt(r)``): Adam's steps are multiplied by it, and both runs ended
predicting the majority class of every test example, so they compare nothing; at alpha 8,
r = 4 with ``alpha/r`` (scale 2) trains to 80 % validation accuracy by step 300.)

Part ``searched``: one super-network (ranks 32/24/16) trained with the scaling mode as a
searched dimension (``--scalings lora,rora,fixed``, one mode per group, sampled each step with
the ranks) against the same super-network trained under one fixed mode (``lora``); the max,
mid and min sub-networks of each scored on the test split (the searched run's max/mid/min
take the first / middle / last mode, ``lora`` / ``rora`` / ``fixed``, as its space orders them),
and, for the searched run, each of its three modes applied to every group at the max ranks.

Writes results/scaling.csv (one row per trained model and sub-network; rows already there are
kept, so an interrupted run continues), results/scaling.json and results/scaling.md (mean and
standard deviation over seeds, with the standard error of one accuracy on the test split, so
that a difference inside the noise is read as one).

    python benchmarks/scaling.py [--part rora|searched|all] [--seeds 0,1,2] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time

import pandas as pd
import torch
from _common import RESULTS, append_row, machine, write_json

CSV = RESULTS / "scaling.csv"
RANKS = (4, 8, 16, 32, 64, 128)
MODES = ("lora", "rora")


def load() -> pd.DataFrame:
    return pd.read_csv(CSV) if CSV.exists() else pd.DataFrame(columns=["part", "seed", "run", "subnet"])


def done(df: pd.DataFrame, part: str, seed: int, run: str, subnet: str) -> bool:
    hit = (df["part"] == part) & (df["seed"] == seed) & (df["run"] == run) & (df["subnet"] == subnet)
    return bool(hit.any())


def append(row: dict) -> pd.DataFrame:
    return append_row(CSV, row)


def train_and_score(part: str, seed: int, run: str, subnets: dict, steps: int, workdir: str, **options) -> None:
    """Train one run unless every row it gives is already measured, then score each sub-network."""
    from supernet.commands.eval import eval_run
    from supernet.train import TrainConfig, train

    df = load()
    if all(done(df, part, seed, run, s) for s in subnets):
        return
    cfg = TrainConfig(seed=seed, max_steps=steps, name=f"{part}-{run}-s{seed}", out=workdir,
                      eval_every=steps, save_every=steps, **options)
    t = time.perf_counter()
    train(cfg, overwrite=True)
    seconds = time.perf_counter() - t
    for subnet, target in subnets.items():
        if done(load(), part, seed, run, subnet):
            continue
        res = eval_run(cfg.run_dir(), target, "test")
        append({"part": part, "seed": seed, "run": run, "subnet": subnet, "accuracy": res["accuracy"],
                "loss": res["loss"], "examples": res["examples"], "steps": steps,
                "train_seconds": round(seconds, 1), "config": json.dumps(res["config"], sort_keys=True)})
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)


def part_rora(seeds: list[int], steps: int, workdir: str, alpha: float) -> None:
    for seed in seeds:
        for rank in RANKS:
            for mode in MODES:
                train_and_score("rora", seed, f"{mode}-r{rank}-a{alpha:g}", {"max": "max"}, steps, workdir,
                                ranks=[rank], scaling=mode, alpha=alpha)


def part_searched(seeds: list[int], steps: int, workdir: str) -> None:
    from supernet.dimensions import SCALING_KIND  # noqa: F401  (the feature this part measures)

    for seed in seeds:
        train_and_score("searched", seed, "fixed-lora", {"max": "max", "mid": "mid", "min": "min"}, steps,
                        workdir, scaling="lora")
        subnets = {"max": "max", "mid": "mid", "min": "min"}
        subnets.update({f"max-{mode}": f"max@{mode}" for mode in ("lora", "rora", "fixed")})
        train_and_score("searched", seed, "searched", subnets, steps, workdir,
                        scalings=["lora", "rora", "fixed"])


def summarise() -> dict:
    df = load()
    df = df.drop(columns=["train_seconds"], errors="ignore")  # wall time under load: not a speed result
    rows = []
    for (part, run, subnet), g in df.groupby(["part", "run", "subnet"], sort=False):
        acc = g["accuracy"] * 100
        n = int(g["examples"].iloc[0])
        p = acc.mean() / 100
        rows.append({"part": part, "run": run, "subnet": subnet, "seeds": int(len(g)), "mean": acc.mean(),
                     "std": acc.std() if len(g) > 1 else float("nan"),
                     "se_one_eval": 100 * math.sqrt(p * (1 - p) / n)})
    summary = {"setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes (test split)",
                         "alpha": {"rora": "in each run's name (-aALPHA)", "searched": 32},
                         "head": "classifier (the pooler frozen: measured before the head included it)",
                         "steps": int(df["steps"].iloc[0]) if len(df) else None, "batch": 16, **machine()},
               "rows": rows}
    write_json(RESULTS / "scaling.json", summary)
    lines = []
    rora = [r for r in rows if r["part"] == "rora"]
    if rora:
        by = {(r["run"].split("-r")[0], int(r["run"].split("-r")[1].split("-a")[0])): r for r in rora}
        alpha = rora[0]["run"].split("-a")[1]
        lines += [f"### Fixed-rank LoRA: test accuracy (%) by rank and scaling, alpha {alpha}, mean ± std over seeds",
                  "",
                  "| rank | alpha/r (lora) (seeds) | alpha/sqrt(r) (rora) (seeds) | rora - lora |", "|---|---|---|---|"]
        for rank in RANKS:
            a, b = by.get(("lora", rank)), by.get(("rora", rank))
            if a is None or b is None:
                continue
            lines.append(f"| {rank} | {a['mean']:.2f} ± {a['std']:.2f} ({a['seeds']}) | {b['mean']:.2f} ± "
                         f"{b['std']:.2f} ({b['seeds']}) | {b['mean'] - a['mean']:+.2f} |")
        lines += ["", f"One accuracy on the test split has a standard error of about {rora[0]['se_one_eval']:.2f} "
                  "points.", ""]
    searched = [r for r in rows if r["part"] == "searched"]
    if searched:
        lines += ["### Scaling searched (lora,rora,fixed per group) vs one fixed mode (lora): test accuracy (%)", "",
                  "| run | sub-network | mean ± std | seeds |", "|---|---|---|---|"]
        for r in searched:
            lines.append(f"| {r['run']} | {r['subnet']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['seeds']} |")
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rora", "searched", "all"], default="all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=8.0, help="alpha of the rank sweep (part rora)")
    ap.add_argument("--workdir", default=str(RESULTS.parent / "runs" / "bench-scaling"))
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (two processes of one thread each use two cores "
                                                "better than one of two; they share the table)")
    args = ap.parse_args()
    if not args.summarise_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        RESULTS.mkdir(exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        if args.part in ("rora", "all"):
            part_rora(seeds, args.steps, args.workdir, args.alpha)
        if args.part in ("searched", "all"):
            part_searched(seeds, args.steps, args.workdir)
    summarise()


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
