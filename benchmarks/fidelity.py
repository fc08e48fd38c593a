"""Ranking fidelity on MiniLM + Rotten Tomatoes: does the width super-network rank its sub-networks
as they rank trained alone? Uniform sampling against the sandwich rule, in-place distillation
against none, and the zero-cost proxies.

One seed. Three super-networks of the width benchmark's recipe (``benchmarks/width.py``: 400 steps
of 16, lr 5e-4, ranks 32/24/16, widths and heads 1.0/0.75/0.5, one global width and heads):
``uniform``; ``sandwich`` (max, min and one random configuration each step); ``distill`` (the
sandwich with in-place distillation). ``supernet fidelity --configs 10`` on each: ``max``,
``min``, ``mid`` and seven configurations spread over MACs, each trained stand-alone with the same
recipe (a fixed configuration every step). The stand-alone runs do not depend on how the
super-network was trained, so they are trained once (for ``uniform``) and copied into the other
two studies, which then train nothing. Every accuracy is on the whole validation split (1,066).

A super-network run of the width benchmark's seed 0 (``runs/bench-width/<name>-s0``, if kept or
still there) is copied instead of trained again; the runs are otherwise trained here.

Writes results/fidelity.csv (one row per super-network and configuration), results/fidelity.json
(Kendall tau and Spearman rho with bootstrap intervals, per super-network and per proxy) and
results/fidelity.md.

    python benchmarks/fidelity.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from _common import RESULTS, machine, markdown_table, write_json, write_markdown
from width import RECIPE, SANDWICH, WIDTH

SEED = 0
CONFIGS = 10
RUNS = {
    "uniform": {"ranks": [32, 24, 16], **WIDTH},
    "sandwich": {"ranks": [32, 24, 16], **WIDTH, **SANDWICH},
    "distill": {"ranks": [32, 24, 16], **WIDTH, **SANDWICH, "distill": "inplace"},
}
WIDTH_BENCH = {"sandwich": "width-nls-sandwich", "distill": "width-nls-distill", "uniform": "width-nls"}


def super_run(name: str, workdir: Path) -> Path:
    from supernet import runfiles
    from supernet.train import TrainConfig, train

    d = workdir / name
    if (d / runfiles.ADAPTER).is_file():
        return d
    done = RESULTS.parent / "runs" / "bench-width" / f"{WIDTH_BENCH[name]}-s{SEED}"
    if (done / runfiles.ADAPTER).is_file():
        shutil.copytree(done, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("search", "exports", "plots"))
        return d
    train(TrainConfig(seed=SEED, name=name, out=str(workdir), **RECIPE, **RUNS[name]), overwrite=True)
    return d


def study(run: Path, first: Path | None) -> dict:
    """``supernet fidelity`` on ``run``; the stand-alone runs copied from ``first``'s study if given."""
    from supernet.commands.fidelity import FIDELITY_DIR, SETTINGS_FILE, fidelity_command

    name = f"n{CONFIGS}-s{SEED}"
    if first is not None:
        src, dst = first / FIDELITY_DIR / name, run / FIDELITY_DIR / name
        if not (dst / SETTINGS_FILE).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / SETTINGS_FILE, dst / SETTINGS_FILE)
            shutil.copytree(src / "standalone", dst / "standalone", dirs_exist_ok=True)
    return fidelity_command(run, CONFIGS, SEED, None, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(RESULTS.parent / "runs" / "bench-fidelity"))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    rows, summary, first = [], {}, None
    for name in RUNS:
        run = super_run(name, workdir)
        out = study(run, first)
        first = first or run
        df = pd.read_csv(Path(out["dir"]) / "fidelity.csv").assign(supernet=name)
        rows.append(df)
        report = json.loads((Path(out["dir"]) / "fidelity.json").read_text())
        summary[name] = {k: report[k] for k in ("supernet", "proxies", "noise")}
    df = pd.concat(rows)
    df.to_csv(RESULTS / "fidelity.csv", index=False)
    write_json(RESULTS / "fidelity.json", {"setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes",
                                                     "seed": SEED, "configs": CONFIGS, **RECIPE, **WIDTH,
                                                     "split": "validation (whole)", **machine()},
                                           "studies": summary})
    table = []
    for name, s in summary.items():
        t, g = s["supernet"], df[df["supernet"] == name]
        table.append([name, f"{t['kendall_tau']:.2f} [{t['kendall_tau_low']:.2f}, {t['kendall_tau_high']:.2f}]",
                      f"{t['spearman_rho']:.2f} [{t['spearman_rho_low']:.2f}, {t['spearman_rho_high']:.2f}]",
                      f"{100 * g['supernet_accuracy'].min():.1f}-{100 * g['supernet_accuracy'].max():.1f}",
                      f"{100 * g['standalone_accuracy'].min():.1f}-{100 * g['standalone_accuracy'].max():.1f}",
                      f"+/- {50 * s['noise']['mean_interval_width']:.1f}"])
    lines = markdown_table(["super-network", "Kendall tau [95% CI]", "Spearman rho [95% CI]",
                            "super-net acc. range (%)", "stand-alone acc. range (%)", "mean 95% interval (points)"],
                           table)
    lines += [""] + markdown_table(
        ["proxy (on the uniform super-network)", "Kendall tau [95% CI]", "seconds per configuration"],
        [[p, f"{t['kendall_tau']:.2f} [{t['kendall_tau_low']:.2f}, {t['kendall_tau_high']:.2f}]",
          f"{t['seconds_per_config']:.2f}"] for p, t in summary["uniform"]["proxies"].items()])
    write_markdown(RESULTS / "fidelity.md", lines)

if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
