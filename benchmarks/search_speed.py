"""How fast a search evaluates, and what an exported merged model costs at inference.

On a trained run (default ``runs/demo``, written by ``make demo``), MiniLM + Rotten Tomatoes:

1. Seconds per evaluated configuration (``supernet.evaluator.Evaluator``: ``activate`` + forward
   passes over 500 prepared validation examples) next to the bare forward passes of the very
   same prepared batches through the plain base model (no adapters), alternating in one
   process. Target: evaluation <= 1.10x the bare forward time.
2. The time a search spends outside evaluation: an NSGA-II search's wall time minus the sum
   of its evaluations' seconds (history.csv), as a fraction. Target: <= 1 %. Also
   evaluations per minute.
3. Latency of a merged export (reloaded with plain transformers) vs the plain base model, batch
   16 x 64 tokens, alternating. Target: <= 1.00x (nothing of the adapter is left).

    python benchmarks/search_speed.py [--run runs/demo]   # writes results/search_speed.{json,csv}
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, machine, write_json
from transformers import AutoModelForSequenceClassification

from supernet.commands.export import verification_batches
from supernet.evaluator import Evaluator
from supernet.export import export_merged
from supernet.loader import load_run
from supernet.models import resolve_model
from supernet.search import SearchSettings, run_search
from supernet.tasks import score


@torch.no_grad()
def bare_forward(model, prepared) -> None:
    for batch in prepared.batches:
        model(**batch)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    setup, record = load_run(args.run)
    net = setup.net
    ev = Evaluator(net, setup.enc, "validation", args.samples, 64, "cpu", setup.cfg.max_length)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(setup.cfg.model), num_labels=2).eval()
    rng = np.random.default_rng(0)

    # 1. evaluator vs bare forward of the same prepared batches
    ev(net.max_config())
    bare_forward(base, ev.prepared)  # warm-up
    rows = []
    for r in range(args.rounds):
        config = net.sample(rng)
        pair = [("evaluator", lambda c=config: ev(c)), ("bare_forward", lambda: bare_forward(base, ev.prepared))]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            rows.append({"round": r, "what": name, "seconds": timed(fn)})
    df = pd.DataFrame(rows)
    med = df.groupby("what")["seconds"].median()
    per_round = df.pivot(index="round", columns="what", values="seconds")
    ratio = float(med["evaluator"] / med["bare_forward"])

    # 2. search overhead
    with tempfile.TemporaryDirectory() as tmp:
        settings = SearchSettings(objectives=("acc", "macs"), algorithm="nsga2", population=8, evaluations=32,
                                  seed=0)
        t0 = time.perf_counter()
        result = run_search(net.space, ev, ev.cost, Path(tmp) / "s", settings)
        wall = time.perf_counter() - t0
        evaluating = float(result.history["seconds"].sum())

    # 3. merged export latency vs the base model
    config = net.mid_config()
    with tempfile.TemporaryDirectory() as tmp:
        export_merged(net, config, Path(tmp) / "m", batches=verification_batches(setup))
        merged = AutoModelForSequenceClassification.from_pretrained(Path(tmp) / "m").eval()
    ids = torch.full((16, 64), 1000, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        for m in (merged, base):
            m(**inputs)
        lat = {"merged": [], "base": []}
        for r in range(30):
            order = [("merged", merged), ("base", base)]
            for name, m in (order if r % 2 == 0 else order[::-1]):
                lat[name].append(timed(lambda m=m: m(**inputs)))
    merged_ratio = statistics.median(lat["merged"]) / statistics.median(lat["base"])
    same = float((score(merged, setup.enc, ev.prepared) - ev.scores(config)).abs().max())

    out = {
        "machine": machine(), "run": str(args.run), "examples": ev.examples, "rounds": args.rounds,
        "evaluator_seconds_median": float(med["evaluator"]), "bare_forward_seconds_median": float(med["bare_forward"]),
        "evaluator_vs_bare_forward": ratio,
        "evaluator_vs_bare_forward_per_round_median": float((per_round["evaluator"] / per_round["bare_forward"])
                                                            .median()),
        "search_evaluations": len(result.history), "search_wall_seconds": wall,
        "search_evaluation_seconds": evaluating, "search_overhead_fraction": (wall - evaluating) / wall,
        "evaluations_per_minute": 60 * len(result.history) / wall,
        "merged_latency_seconds_median": statistics.median(lat["merged"]),
        "base_latency_seconds_median": statistics.median(lat["base"]), "merged_vs_base_latency": merged_ratio,
        "merged_vs_supernet_max_abs_logit_diff": same, "latency_batch": "16 x 64 tokens",
        "targets": {"evaluator_vs_bare_forward": "<= 1.10", "search_overhead_fraction": "<= 0.01",
                    "merged_vs_base_latency": "<= 1.00"},
    }
    write_json(RESULTS / "search_speed.json", out)
    df.to_csv(RESULTS / "search_speed.csv", index=False)
    for k in ("evaluator_vs_bare_forward", "search_overhead_fraction", "evaluations_per_minute",
              "merged_vs_base_latency"):
        print(f"{k}: {out[k]:.4f}")


if __name__ == "__main__":
    main()
