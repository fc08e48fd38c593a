"""Subspace-aware adapter kinds against LoRA, over seeds (MiniLM + Rotten Tomatoes).

Variants, each a fixed-rank run (one rank, no elastic sampling) with the recipe of the other
tables (400 steps of 16, lr 5e-4, alpha 32, alpha/r, every block projection adapted, the
classifier and pooler trained whole):

- ``lora-r8`` and ``lora-r32``: LoRA at rank 8 and 32;
- ``nora-R64-r8``: NoRA (``--adapter nora --outer-rank 64 --ranks 8``): the outer pair from the
  activation-aware SVD of each weight (128 calibration sequences), frozen; the inner pair
  trained: ``2 * 64 * 8`` numbers per layer.

Each run is scored on the whole test split (1,066 examples). Reported per variant: test accuracy
mean and standard deviation over the seeds, with one evaluation's binomial standard error; the
adapter's trained parameters (without the head, the same for every variant) and in total; the
training seconds (two runs share the machine's two cores, so these are rough). A run that
predicts one class for at least 95% of the test examples is marked stuck.

Writes results/adapter_kinds.csv (one row per run, resumable), .json and .md.

    python benchmarks/adapter_kinds.py [--variants lora-r8,nora-R64-r8] [--seeds 0,1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time

import pandas as pd
import torch
from _common import RESULTS, append_row, machine, markdown_table, write_json, write_markdown

CSV = RESULTS / "adapter_kinds.csv"
RECIPE = {"alpha": 32.0, "lr": 5e-4, "max_steps": 400, "batch_size": 16, "eval_every": 400, "save_every": 400}
VARIANTS = {
    "lora-r8": {"ranks": [8]},
    "lora-r32": {"ranks": [32]},
    "nora-R64-r8": {"adapter": "nora", "outer_rank": 64, "ranks": [8]},
}


def load() -> pd.DataFrame:
    return pd.read_csv(CSV) if CSV.exists() else pd.DataFrame(columns=["variant", "seed"])


def run_one(variant: str, seed: int, workdir: str) -> None:
    from supernet.commands.eval import eval_run
    from supernet.loader import load_run
    from supernet.train import TrainConfig, train

    df = load()
    if ((df["variant"] == variant) & (df["seed"] == seed)).any():
        return
    cfg = TrainConfig(seed=seed, name=f"{variant}-s{seed}", out=workdir, **RECIPE, **VARIANTS[variant])
    start = time.perf_counter()
    train(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    preds = cfg.run_dir().with_name(cfg.run_dir().name + "-predictions.csv")
    res = eval_run(cfg.run_dir(), "max", "test", predictions=preds)
    share = pd.read_csv(preds)["prediction"].value_counts(normalize=True).iloc[0]
    setup, _ = load_run(cfg.run_dir(), weights=False)
    net = setup.net
    adapter = sum(a.adapter_params() for a in net.adapters.values())
    append_row(CSV, {"variant": variant, "seed": seed, "accuracy": res["accuracy"], "loss": res["loss"],
                     "examples": res["examples"], "top_class_share": float(share), "stuck": bool(share >= 0.95),
                     "adapter_params": int(adapter), "trainable_params": int(net.trainable_params()),
                     "train_seconds": round(seconds, 1)})
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)
    preds.unlink()


def summarise() -> dict:
    df = load()
    rows = []
    lora = df[df["variant"] == "lora-r8"]["adapter_params"]
    for variant, g in df.groupby("variant", sort=False):
        acc = g["accuracy"] * 100
        p = acc.mean() / 100
        rows.append({"variant": variant, "seeds": int(len(g)), "stuck": int(g["stuck"].astype(bool).sum()),
                     "mean": acc.mean(), "std": acc.std() if len(g) > 1 else float("nan"),
                     "se_one_eval": 100 * math.sqrt(p * (1 - p) / int(g["examples"].iloc[0])),
                     "adapter_params": int(g["adapter_params"].iloc[0]),
                     "trainable_params": int(g["trainable_params"].iloc[0]),
                     "adapter_share_of_lora_r8": float(g["adapter_params"].iloc[0] / lora.iloc[0])
                     if len(lora) else float("nan"),
                     "train_seconds": float(g["train_seconds"].median())})
    write_json(RESULTS / "adapter_kinds.json", {
        "setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes (test, 1066)", **RECIPE, **machine(),
                  "variants": VARIANTS}, "rows": rows})
    table = markdown_table(
        ["variant", "test accuracy (%) mean ± std", "one eval's s.e.", "adapter params", "share of LoRA r8",
         "trainable (with head)", "stuck", "seeds", "train s (median)"],
        [[r["variant"], f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['se_one_eval']:.2f}", f"{r['adapter_params']:,}",
          f"{100 * r['adapter_share_of_lora_r8']:.1f}%", f"{r['trainable_params']:,}", r["stuck"], r["seeds"],
          f"{r['train_seconds']:.0f}"] for r in rows])
    write_markdown(RESULTS / "adapter_kinds.md", table)
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", default=str(RESULTS.parent / "runs" / "bench-kinds"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    if not args.summarise_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                run_one(variant, seed, args.workdir)
    summarise()


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
