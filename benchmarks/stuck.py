"""Why some runs never leave the majority class, and the fix, over 5 seeds (MiniLM + Rotten Tomatoes).

The recipe the SQFT table found stuck: dense LoRA, rank 32, alpha 32, alpha/r, 400 steps of 16,
lr 5e-4 (seed 0 never left the majority class, nor did 4 of 15 compressed runs). The suspect:
MiniLM's classifier reads BERT's pooler (``tanh(W_p h_CLS + b)``), which the default targets
stopped adapting when they were narrowed to the block projections, so it stays frozen; this
checkpoint (a sentence-transformers model, trained with mean pooling) has a pooler whose weights
have a standard deviation of 0.009, so the pooled features are about 6x smaller than the [CLS]
state and every gradient to the adapters passes through that matrix.

Variants, each on seeds 0-4 with the same recipe:

- ``frozen-pooler``: the recipe as it was (head = ``classifier``; ``--trainable-modules classifier,score``);
- ``trained-pooler``: the pooler trained whole with the classifier (the default since this study);
- ``adapted-pooler``: the pooler gets a LoRA adapter like the block projections (the targets
  before they were narrowed).

A run is *stuck* when it predicts one class for at least 95 % of the test examples.
Writes results/stuck.csv (resumable), results/stuck.json and results/stuck.md.

    python benchmarks/stuck.py [--variants frozen-pooler,trained-pooler] [--seeds 0,1,2,3,4] [--threads 1]
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
from _common import RESULTS, TARGETS, append_row, has_row, machine, train_and_score, variants_main, write_json

CSV = RESULTS / "stuck.csv"
VARIANTS = {
    "frozen-pooler": {"trainable_modules": ["classifier", "score"]},
    "trained-pooler": {"trainable_modules": ["classifier", "score", "pooler"]},
    "adapted-pooler": {"target_modules": [*TARGETS, "pooler.dense"], "trainable_modules": ["classifier", "score"]},
}
RECIPE = {"ranks": [32], "alpha": 32.0, "lr": 5e-4, "max_steps": 400, "batch_size": 16}


def load() -> pd.DataFrame:
    return pd.read_csv(CSV) if CSV.exists() else pd.DataFrame(columns=["variant", "seed"])


def run_one(variant: str, seed: int, workdir: str) -> None:
    from supernet.train import TrainConfig

    if has_row(CSV, variant, seed):
        return
    cfg = TrainConfig(seed=seed, name=f"{variant}-s{seed}", out=workdir, eval_every=100, save_every=400,
                      **RECIPE, **VARIANTS[variant])
    summary, res, share, seconds = train_and_score(cfg)
    val = {r["subnet"]: r["accuracy"] for r in summary["validation"]}
    append_row(CSV, {"variant": variant, "seed": seed, "accuracy": res["accuracy"], "loss": res["loss"],
                     "examples": res["examples"], "top_class_share": float(share), "stuck": bool(share >= 0.95),
                     "val_accuracy": val.get("max"), "trainable_params": res.get("trainable_params"),
                     "train_seconds": round(seconds, 1)})
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)


def summarise() -> dict:
    df = load()
    rows = []
    for variant, g in df.groupby("variant", sort=False):
        acc = g["accuracy"] * 100
        trained = acc[~g["stuck"].astype(bool)]
        p = acc.mean() / 100
        rows.append({"variant": variant, "seeds": int(len(g)), "stuck": int(g["stuck"].astype(bool).sum()),
                     "mean": acc.mean(), "std": acc.std() if len(g) > 1 else float("nan"), "min": acc.min(),
                     "max": acc.max(), "mean_trained": trained.mean() if len(trained) else float("nan"),
                     "se_one_eval": 100 * math.sqrt(p * (1 - p) / int(g["examples"].iloc[0]))})
    write_json(RESULTS / "stuck.json", {"setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes (test)",
                                                  **RECIPE, **machine()}, "rows": rows})
    lines = ["| variant | stuck runs | test accuracy (%) mean ± std | min - max | seeds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['stuck']} of {r['seeds']} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{r['min']:.2f} - {r['max']:.2f} | {r['seeds']} |")
    (RESULTS / "stuck.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


def main() -> None:
    variants_main(run_one, summarise, ",".join(VARIANTS), "0,1,2,3,4", str(RESULTS.parent / "runs" / "bench-stuck"))


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
