"""A miniature Shears / SQFT table on the embedded default (MiniLM-L6 + Rotten Tomatoes), 3 seeds.

Five recipes, each trained with supernet's trainer (400 steps of 16, lr 1e-3, alpha 32, alpha/r).
The fixed-rank rows use rank 16, the smallest rank of the NLS space: a rank-32 LoRA on this
recipe never left its start on seed 0 (the majority class, loss 0.68 for 400 steps, at lr
5e-4 and 1e-3, alpha 32 and 64), while rank 16 and NLS trained (measured on 100 steps: 0.74
and 0.73-0.77 validation accuracy).

- ``lora``: dense base, one rank (16): plain LoRA.
- ``lora-wanda50-naive``: LoRA (rank 16) on the 50% Wanda base, merged plainly: the merge
  refills the pruned weights, so the shipped model is dense again.
- ``nls-sparsepeft50``: NLS (ranks 32/24/16) + SparsePEFT on the 50% Wanda base: merged with
  the base's zeros kept.
- ``nls-int4``: NLS on an INT4 base (group 64), adapter kept beside the integer base.
- ``nls-qa-sparsepeft-int4``: NLS + QA-SparsePEFT on the 50% Wanda INT4 base: merged into integers.

Each row reports the largest and the heuristic (mid) sub-network: validation and test
accuracy, the shipped model's sparsity of the adapted layers, bits and size of those layers.
For the QA-SparsePEFT rows the mid sub-network is exported (``--format compressed``),
reloaded, and evaluated again: its accuracy must equal the super-network's exactly.

    python benchmarks/sqft_table.py --phase train     # trains the 15 runs (resumable: finished runs are kept)
    python benchmarks/sqft_table.py --phase report    # evaluates, exports, writes results/sqft_table.{csv,json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LR = 1e-3
RUNS = Path(__file__).resolve().parent.parent / "runs" / "bench-sqft"
RECIPES: dict[str, dict] = {
    "lora": {"ranks": [16]},
    "lora-wanda50-naive": {"ranks": [16], "sparsity": 0.5},
    "nls-sparsepeft50": {"ranks": [32, 24, 16], "sparsity": 0.5, "adapter_merge": "sparse"},
    "nls-int4": {"ranks": [32, 24, 16], "bits": 4, "group_size": 64},
    "nls-qa-sparsepeft-int4": {"ranks": [32, 24, 16], "sparsity": 0.5, "bits": 4, "group_size": 64,
                               "adapter_merge": "qa-sparse"},
}


def run_dir(recipe: str, seed: int) -> Path:
    return RUNS / f"{recipe}-s{seed}"


def train_all(seeds: list[int], steps: int) -> None:
    from supernet import runfiles
    from supernet.train import TrainConfig, train

    for seed in seeds:
        for recipe, opts in RECIPES.items():
            d = run_dir(recipe, seed)
            if runfiles.finished_at(d) == steps:
                print(f"{d.name}: done", flush=True)
                continue
            cfg = TrainConfig(name=d.name, out=str(RUNS), seed=seed, max_steps=steps, lr=LR, **opts)
            summary = train(cfg, overwrite=True)
            print(json.dumps({"run": d.name, "validation": summary.get("validation")}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["train", "report"], required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.phase == "train":
        train_all(seeds, args.steps)
    else:
        from sqft_report import report

        report(seeds, RECIPES, run_dir)


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
