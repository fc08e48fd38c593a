"""Does weight sharing work? One NLS run (ranks 32,24,16) vs separate fixed-rank PEFT LoRAs.

For each seed: train the super-network once with supernet's trainer (the embedded default:
MiniLM-L6 + Rotten Tomatoes, 400 steps of 16, lr 5e-4, alpha 32, alpha/r scaling), then
evaluate its max / mid / min sub-networks (rank 32 / 24 / 16 everywhere) on the full test
split; train PEFT LoRA at r = 32, 24 and 16 with the same recipe (same data order, optimiser,
schedule, clipping, classification head, alpha) for the same number of steps and evaluate it
the same way. Writes results/weight_sharing.csv (one row per model), .json (summary) and
.md (the README table). Rows already in the CSV are kept, so an interrupted run continues
where it stopped. Only accuracy and loss are compared here; step time is compared in
train_step_speed.py.

    python benchmarks/weight_sharing.py [--seeds 0,1,2] [--steps 400]
"""

from __future__ import annotations

import argparse
import shutil
import time

import pandas as pd
import torch
from _common import RESULTS, append_row, machine, peft_lora, train_fixed, write_json
from accelerate.utils import set_seed

from supernet.commands.eval import eval_run
from supernet.data import load_task_data
from supernet.models import load_model
from supernet.tasks import encode, evaluate
from supernet.train import TrainConfig, train

CSV = RESULTS / "weight_sharing.csv"
SUBNETS = {"max": 32, "mid": 24, "min": 16}


def done(df: pd.DataFrame, seed: int, method: str, rank: int) -> bool:
    return len(df) > 0 and ((df["seed"] == seed) & (df["method"] == method) & (df["rank"] == rank)).any()


def append(row: dict) -> pd.DataFrame:
    return append_row(CSV, row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--workdir", default=str(RESULTS.parent / "runs" / "bench-weight-sharing"))
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    if args.summarise_only:
        summarise(pd.read_csv(CSV))
        return
    torch.set_num_threads(2)
    RESULTS.mkdir(exist_ok=True)
    df = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = TrainConfig(seed=seed, max_steps=args.steps, name=f"nls-s{seed}", out=args.workdir,
                          eval_every=args.steps, save_every=args.steps)
        if not all(done(df, seed, "supernet-nls", r) for r in SUBNETS.values()):
            t = time.perf_counter()
            train(cfg, overwrite=True)
            seconds = time.perf_counter() - t
            for sub, rank in SUBNETS.items():
                if done(df, seed, "supernet-nls", rank):
                    continue
                res = eval_run(cfg.run_dir(), sub, "test")
                df = append({"seed": seed, "method": "supernet-nls", "subnet": sub, "rank": rank,
                             "accuracy": res["accuracy"], "loss": res["loss"], "examples": res["examples"],
                             "train_seconds": round(seconds, 1), "steps": args.steps})
            shutil.rmtree(cfg.run_dir(), ignore_errors=True)
        data = load_task_data(cfg.dataset)
        for rank in SUBNETS.values():
            if done(df, seed, "peft-lora", rank):
                continue
            set_seed(seed)
            model, tok = load_model(cfg.model, "seq-cls", num_labels=len(data.label_names))
            model = peft_lora(model, rank, cfg.alpha)
            enc = encode(data, tok, "seq-cls", cfg.max_length)
            seconds = train_fixed(model, enc, cfg, seed)
            res = evaluate(model, enc, "test")
            df = append({"seed": seed, "method": "peft-lora", "subnet": f"r{rank}", "rank": rank,
                         "accuracy": res["accuracy"], "loss": res["loss"], "examples": res["examples"],
                         "train_seconds": round(seconds, 1), "steps": args.steps})
    summarise(pd.read_csv(CSV))


def summarise(df: pd.DataFrame) -> dict:
    df = df.drop(columns=["train_seconds"], errors="ignore")  # wall time under load: not a speed result
    df.to_csv(CSV, index=False)
    rows = []
    for rank in sorted(df["rank"].unique(), reverse=True):
        nls = df[(df["method"] == "supernet-nls") & (df["rank"] == rank)].set_index("seed")["accuracy"]
        peft = df[(df["method"] == "peft-lora") & (df["rank"] == rank)].set_index("seed")["accuracy"]
        gap = (nls - peft).dropna() * 100
        rows.append({"rank": int(rank), "nls_mean": nls.mean() * 100, "nls_std": nls.std() * 100,
                     "peft_mean": peft.mean() * 100, "peft_std": peft.std() * 100,
                     "gap_mean_points": gap.mean(), "gap_min_points": gap.min(), "seeds": int(len(gap)),
                     "within_1.5_points": bool(gap.mean() >= -1.5)})
    summary = {"setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes (test split, 2,562)",
                         "ranks": [32, 24, 16], "steps": int(df["steps"].iloc[0]), "batch": 16, **machine()},
               "by_rank": rows}
    write_json(RESULTS / "weight_sharing.json", summary)
    lines = ["| rank | supernet NLS sub-network | PEFT LoRA, own run | gap (points) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['nls_mean']:.2f} ± {r['nls_std']:.2f} | {r['peft_mean']:.2f} ± "
                     f"{r['peft_std']:.2f} | {r['gap_mean_points']:+.2f} (worst seed {r['gap_min_points']:+.2f}) |")
    (RESULTS / "weight_sharing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
