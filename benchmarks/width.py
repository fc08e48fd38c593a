"""A miniature LoNAS table: elastic width and heads against rank-only NLS and LoRA (MiniLM + Rotten Tomatoes).

Per seed, with one recipe (400 steps of 16, lr 5e-4, alpha 32, alpha/r, ranks 32/24/16, the head
of ``supernet train``):

- ``lora``: LoRA at rank 32 (one fixed network);
- ``rank-nls``: the rank-only super-network, its heuristic midpoint (rank 24 everywhere);
- ``width-nls``: the super-network over ranks x width x heads (``--widths 1.0,0.75,0.5
  --heads 1.0,0.75,0.5 --width-groups global``): its midpoint (width 0.75, 9 of 12 heads), and
  two sub-networks found by NSGA-II on (validation accuracy, MACs) with ``--evaluations``
  evaluations of ``--search-samples`` validation examples: the most accurate front member (on the
  whole validation split) under 75 % and under 60 % of the full model's MACs.

Each row is scored on the whole test split and exported as ``supernet export`` writes it
(adapters merged; a cut model when it is narrower). Columns: test accuracy, relative accuracy
(against ``lora`` of the same seed), total and non-embedding parameters of the exported model,
MACs of one sequence of 64 tokens, and the exported model's CPU speed-up over the original
MiniLM at batch 1 and batch 32 (sequences of 64 tokens), both models timed alternately in one
process (median of ``--repeats`` forward passes each).

Also, per seed, the two searches' fronts: MACs span and hypervolume against the rank-only
search (``rank-nls`` searched with the same budget and seed), on common bounds. With
``--extras``: per-block widths (``--width-groups block``), and in-place distillation
(``--distill inplace``) against none, both with the sandwich rule (max, min and one random
configuration each step, the same number of steps: three times a uniform run's compute): their
midpoints, fronts and searched rows at the same MACs budgets.

``--model smollm2``: the same on SmolLM2-135M-Instruct (Llama, grouped-query attention: 9 heads
in 3 KV groups, so ``--heads 1.0,0.67,0.33`` keeps 3, 2 or 1 per group), Rotten Tomatoes as a
prompt scored by the answers' log-likelihood, 150 steps of 8; rows scored on the first 1,000 test
examples, the search's front re-scored on the first 400 validation and test examples, and the
rank-only network not searched (a CPU budget). Written to ``results/width_smollm2.*``.

Writes results/width.csv (one row per seed and sub-network; rows already there are kept, so an
interrupted run continues), results/width_fronts.csv, results/width.json and results/width.md.

    python benchmarks/width.py [--seeds 0,1,2] [--threads 1] [--extras]
    python benchmarks/width.py --model smollm2 --seeds 0 --evaluations 32 --search-samples 200
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, append_row, machine, write_json

CSV = RESULTS / "width.csv"
FRONTS = RESULTS / "width_fronts.csv"
SPEED = RESULTS / "width_speed.csv"
STEP = RESULTS / "width_step.json"
RECIPE = {"max_steps": 400, "batch_size": 16, "lr": 5e-4, "alpha": 32.0, "eval_every": 400, "save_every": 400}
WIDTH = {"widths": [1.0, 0.75, 0.5], "heads": [1.0, 0.75, 0.5], "width_groups": "global"}
MODEL_NAME = "all-MiniLM-L6-v2"
SEARCH_RANK_ONLY = True  # also search the rank-only network (its front's hypervolume)
# SmolLM2-135M (Llama, 9 heads in 3 KV groups: 3, 2 or 1 per group) on Rotten Tomatoes as a prompt,
# scored by the answers' log-likelihood; one seed, fewer and smaller steps (a step costs ~6x MiniLM's)
SMOLLM2 = {"recipe": {"model": "smollm2", "max_steps": 150, "batch_size": 8, "eval_every": 150, "save_every": 150},
           "heads": [1.0, 0.67, 0.33], "name": "SmolLM2-135M-Instruct", "suffix": "_smollm2",
           "test_limit": 1000, "final_samples": 400}
NO_SEARCH = False  # --no-search: the midpoints only
TEST_LIMIT = None  # test examples of each row (None: the whole split)
FINAL_SAMPLES = None  # validation / test examples that re-score a search's front (None: whole splits)
RUNS = {
    "lora": {"ranks": [32]},
    "rank-nls": {"ranks": [32, 24, 16]},
    "width-nls": {"ranks": [32, 24, 16], **WIDTH},
}
SANDWICH = {"sampler": "sandwich", "sandwich_random": 1}  # max, min and one random each step: 3x a uniform step
EXTRAS = {
    "width-nls-block": {"ranks": [32, 24, 16], **WIDTH, "width_groups": "block"},
    "width-nls-sandwich": {"ranks": [32, 24, 16], **WIDTH, **SANDWICH},
    "width-nls-distill": {"ranks": [32, 24, 16], **WIDTH, **SANDWICH, "distill": "inplace"},
}
BUDGETS = (0.75, 0.60)  # fractions of the full model's MACs for the two searched rows
SEQ = 64


def load(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["seed", "run", "row"])


def done(path: Path, seed: int, run: str) -> bool:
    df = load(path)
    return bool(((df["seed"] == seed) & (df["run"] == run)).any())


def run_dir(workdir: str, run: str, seed: int) -> Path:
    return Path(workdir) / f"{run}-s{seed}"


def train_run(run: str, options: dict, seed: int, workdir: str) -> Path:
    from supernet.train import TrainConfig, train

    d = run_dir(workdir, run, seed)
    if not (d / "adapter.safetensors").exists():
        train(TrainConfig(seed=seed, name=d.name, out=workdir, **RECIPE, **options), overwrite=True)
    return d


def search(d: Path, seed: int, evaluations: int, samples: int) -> pd.DataFrame:
    from supernet.commands.search import run_search_command
    from supernet.search import SearchSettings

    name = f"nsga2-acc-macs-e{evaluations}"
    front = d / "search" / name / "pareto.csv"
    finished = front.is_file() and "val_accuracy" in pd.read_csv(front).columns
    if not finished:  # a search stopped during its front's confirmation resumes (its history is kept)
        settings = SearchSettings(objectives=("acc", "macs"), algorithm="nsga2", population=16,
                                  evaluations=evaluations, seed=seed)
        run_search_command(d, settings, name, resume=(d / "search" / name / "search.json").exists(),
                           eval_samples=samples, final_samples=FINAL_SAMPLES)
    return pd.read_csv(front)


def measure(seed: int, run: str, d: Path, rows: dict) -> None:
    """Score each named sub-network of run ``d`` on the test split and count its exported model."""
    from supernet.commands.eval import eval_run
    from supernet.export_core import merged_model
    from supernet.loader import load_run

    setup, _ = load_run(d)
    net = setup.net
    for row, config in rows.items():
        df = load(CSV)
        if ((df["seed"] == seed) & (df["run"] == run) & (df["row"] == row)).any():
            continue
        res = eval_run(d, json_file(d, row, config), "test", limit=TEST_LIMIT)
        model = merged_model(net, config)
        total = sum(p.numel() for p in model.parameters())
        embed = sum(p.numel() for n, p in model.named_parameters()  # BERT's embeddings; Llama's (tied) embed_tokens
                    if "embeddings" in n or "embed_tokens" in n or n.startswith("lm_head"))
        append_row(CSV, {"seed": seed, "run": run, "row": row, "accuracy": res["accuracy"],
                         "examples": res["examples"], "params": total, "non_embedding_params": total - embed,
                         "macs": net.macs(config, SEQ, merged=True), "config": json.dumps(config, sort_keys=True)})


def time_rows(repeats: int) -> None:
    """The exported models' CPU speed-up over the original MiniLM, measured after every training (a
    speed depends on the shapes only, so the cut models are rebuilt from the recorded configurations
    on an untrained width super-network), each against the original, alternately, in this one process."""
    from supernet.evaluator import compare_speed
    from supernet.export_core import merged_model
    from supernet.loader import TrainConfig, build

    df, speed = load(CSV), load(SPEED)
    todo = [r for r in df.to_dict(orient="records")
            if not ((speed["seed"] == r["seed"]) & (speed["run"] == r["run"]) & (speed["row"] == r["row"])).any()]
    if not todo:
        return
    net = build(TrainConfig(**RECIPE, ranks=[32, 24, 16], **{**WIDTH, "width_groups": "block"})).net
    full = {k: (1.0 if net.space.dimension(k).kind in ("width", "heads") else 32) for k in net.space.groups}
    original = merged_model(net, full)
    for r in todo:
        config = dict(full)
        for k, v in json.loads(r["config"]).items():  # a global width is every block's
            for name in net.space.groups:
                if name == k or name.endswith(":" + k):
                    config[name] = v
        model = merged_model(net, config)
        out = {"seed": r["seed"], "run": r["run"], "row": r["row"]}
        for batch in (1, 32):
            t = compare_speed(model, original, batch, SEQ, repeats)
            out.update({f"speedup_b{batch}": t["speedup"], f"ms_b{batch}": 1e3 * t["seconds"],
                        f"ms_original_b{batch}": 1e3 * t["original_seconds"]})
        append_row(SPEED, out)


def step_cost(rounds: int = 15) -> dict:
    """One training step (forward, backward, AdamW) of the width super-network at uniformly sampled
    configurations against the rank-only one at the same rank choices (its own samples), the two
    alternating in one process; the ratio is the median over rounds of width / rank-only."""

    from supernet.loader import TrainConfig, build

    nets = {}
    for name, options in (("rank", {}), ("width", WIDTH)):
        setup = build(TrainConfig(**RECIPE, ranks=[32, 24, 16], **options))
        params = [p for p in setup.net.model.parameters() if p.requires_grad]
        batch = calibration_batch(setup)
        nets[name] = (setup.net, torch.optim.AdamW(params, lr=1e-6), batch)
    times = {k: [] for k in nets}
    rng = np.random.default_rng(0)
    for i in range(rounds + 1):
        for name, (net, opt, batch) in nets.items():
            net.activate(net.sample(rng))
            t = time.perf_counter()
            net.model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times[name].append(time.perf_counter() - t)
    ratio = statistics.median(w / r for w, r in zip(times["width"], times["rank"], strict=True))
    return {"step_seconds_rank": statistics.median(times["rank"]),
            "step_seconds_width": statistics.median(times["width"]), "ratio": ratio, "rounds": rounds}


def calibration_batch(setup) -> dict:
    from supernet.compressed_base import calibration_batches

    return calibration_batches(setup.enc, 16, 0)[0]


def json_file(d: Path, row: str, config: dict) -> str:
    path = d.parent / f"{d.name}-{row}.json"
    path.write_text(json.dumps(config))
    return str(path)


def searched_rows(front: pd.DataFrame, full_macs: float) -> dict:
    rows = {}
    for share in BUDGETS:
        ok = front[front["macs"] <= share * full_macs]
        if not ok.empty:
            best = ok.sort_values(["val_accuracy", "index"], ascending=[False, True]).iloc[0]
            rows[f"searched-{int(share * 100)}"] = json.loads(best["config"])
    return rows


def one_seed(seed: int, workdir: str, evaluations: int, samples: int, extras: bool) -> None:
    from supernet.loader import load_run

    for run, options in {**RUNS, **(EXTRAS if extras else {})}.items():
        if done(CSV, seed, run) and (run == "lora" or done(FRONTS, seed, run)):
            continue  # measured by an earlier call (its run folder may be gone)
        d = train_run(run, options, seed, workdir)
        setup, _ = load_run(d)
        net = setup.net
        rows = {"max": net.max_config()} if run == "lora" else {"mid": net.mid_config()}
        if run != "lora" and (SEARCH_RANK_ONLY or run != "rank-nls") and not NO_SEARCH:
            front = search(d, seed, evaluations, samples)
            if not done(FRONTS, seed, run):
                for r in front.to_dict(orient="records"):
                    append_row(FRONTS, {"seed": seed, "run": run, "row": int(r["index"]), "macs": r["macs"],
                                        "accuracy": r["accuracy"], "val_accuracy": r["val_accuracy"],
                                        "test_accuracy": r["test_accuracy"], "config": r["config"]})
            if run.startswith("width-nls") and not NO_SEARCH:  # the extras too: compared at the same MACs budgets
                rows.update(searched_rows(front, net.macs(net.max_config(), SEQ, merged=True)))
        del setup, net
        measure(seed, run, d, rows)


def summarise() -> dict:
    df = load(CSV)
    if df.empty:
        return {}
    speed = load(SPEED)
    df = df.drop(columns=[c for c in df.columns if c.startswith(("speedup_", "ms_"))])
    df = df.merge(speed, on=["seed", "run", "row"], how="left") if not speed.empty else df.assign(
        speedup_b1=math.nan, speedup_b32=math.nan)
    lora = df[df["run"] == "lora"].set_index("seed")["accuracy"]
    df["relative"] = df.apply(lambda r: r["accuracy"] / lora.get(r["seed"], math.nan), axis=1)
    base = df[df["run"] == "lora"][["params", "non_embedding_params", "macs"]].iloc[0]
    out = []
    for (run, row), g in df.groupby(["run", "row"], sort=False):
        acc = 100 * g["accuracy"]
        out.append({"run": run, "row": row, "seeds": len(g), "accuracy": acc.mean(),
                    "accuracy_std": acc.std() if len(g) > 1 else math.nan, "relative": 100 * g["relative"].mean(),
                    "params_m": g["params"].mean() / 1e6, "non_embedding_m": g["non_embedding_params"].mean() / 1e6,
                    "non_embedding_cut": 1 - g["non_embedding_params"].mean() / base["non_embedding_params"],
                    "macs_g": g["macs"].mean() / 1e9, "speedup_b1": g["speedup_b1"].mean(),
                    "speedup_b1_std": g["speedup_b1"].std(), "speedup_b32": g["speedup_b32"].mean(),
                    "speedup_b32_std": g["speedup_b32"].std()})
    fronts = load(FRONTS)
    hv = []
    if not fronts.empty:
        from supernet.search import hypervolume

        ideal = [0.0, 0.0]
        nadir = [1.0, float(base["macs"])]
        for (seed, run), g in fronts.groupby(["seed", "run"]):
            F = np.column_stack([1 - g["val_accuracy"].to_numpy(float), g["macs"].to_numpy(float)])
            hv.append({"seed": seed, "run": run, "members": len(g), "hypervolume": hypervolume(F, ideal, nadir),
                       "macs_span": float(g["macs"].max() / g["macs"].min())})
    summary = {"setup": {"model": MODEL_NAME, "dataset": "rotten-tomatoes", **RECIPE, **WIDTH,
                         "test_examples": TEST_LIMIT or "all", "front_rescored_on": FINAL_SAMPLES or "all",
                         "seq": SEQ, **machine()}, "rows": out, "fronts": hv}
    if STEP.exists():
        summary["train_step"] = json.loads(STEP.read_text())
    write_json(CSV.with_suffix(".json"), summary)
    lines = ["| sub-network | test acc. (%) | relative (%) | params (M) | non-emb. params (M) | non-emb. cut | "
             "MACs (G) | speed-up b1 | speed-up b32 | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['run']} {r['row']} | {r['accuracy']:.2f} ± {r['accuracy_std']:.2f} | {r['relative']:.1f} | "
                     f"{r['params_m']:.2f} | {r['non_embedding_m']:.2f} | {100 * r['non_embedding_cut']:.0f}% | "
                     f"{r['macs_g']:.3f} | {r['speedup_b1']:.2f}x | {r['speedup_b32']:.2f}x | {r['seeds']} |")
    if hv:
        lines += ["", "| seed | super-network searched | front members | MACs span (max/min) | hypervolume |",
                  "|---|---|---|---|---|"]
        for h in hv:
            lines.append(f"| {h['seed']} | {h['run']} | {h['members']} | {h['macs_span']:.2f}x | "
                         f"{h['hypervolume']:.3f} |")
    if "train_step" in summary:
        t = summary["train_step"]
        lines += ["", f"Training step (batch 16 x 64, forward + backward + AdamW, sampled configurations): width "
                  f"super-network {1e3 * t['step_seconds_width']:.0f} ms, rank-only {1e3 * t['step_seconds_rank']:.0f} "
                  f"ms, ratio {t['ratio']:.2f}x (median of {t['rounds']} alternating rounds)."]
    CSV.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def use_smollm2() -> None:
    """Switch the module's settings to the SmolLM2 profile (:data:`SMOLLM2`); the rank-only network is
    not searched (its midpoint is measured), to fit one seed on a CPU."""
    global CSV, FRONTS, SPEED, STEP, MODEL_NAME, SEARCH_RANK_ONLY, TEST_LIMIT, FINAL_SAMPLES
    suffix = SMOLLM2["suffix"]
    CSV, FRONTS, SPEED = (RESULTS / f"{p.stem}{suffix}.csv" for p in (CSV, FRONTS, SPEED))
    STEP = RESULTS / f"width_step{suffix}.json"
    MODEL_NAME, SEARCH_RANK_ONLY = SMOLLM2["name"], False
    TEST_LIMIT, FINAL_SAMPLES = SMOLLM2["test_limit"], SMOLLM2["final_samples"]
    RECIPE.update(SMOLLM2["recipe"])
    WIDTH["heads"] = SMOLLM2["heads"]
    for options in (*RUNS.values(), *EXTRAS.values()):
        if "heads" in options:
            options["heads"] = SMOLLM2["heads"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", help="where the runs are trained [runs/bench-width, runs/bench-width-smollm2]")
    ap.add_argument("--steps", type=int, help="training steps [400; smollm2 150]")
    ap.add_argument("--evaluations", type=int, default=64)
    ap.add_argument("--search-samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--extras", action="store_true", help="also in-place distillation and per-block widths")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--timing", action="store_true", help="time the exported models (run alone, after training: "
                                                          "timings taken beside another job mean nothing)")
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--no-search", action="store_true",
                    help="measure the midpoints only (no searched rows): a CPU budget for SmolLM2")
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                    help="smollm2: SmolLM2-135M (GQA), the causal-LM task, 150 steps of 8, written to *_smollm2 files")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        use_smollm2()
    global NO_SEARCH
    NO_SEARCH = args.no_search
    # one folder per model: a process deletes its seed's runs when done, and names repeat across models
    args.workdir = args.workdir or str(RESULTS.parent / "runs" / ("bench-width" + SMOLLM2["suffix"].replace(
        "_", "-") if args.model == "smollm2" else "bench-width"))
    if not args.summarise_only:
        if args.steps:
            RECIPE.update(max_steps=args.steps, eval_every=args.steps, save_every=args.steps)
        for seed in [int(s) for s in args.seeds.split(",")]:
            one_seed(seed, args.workdir, args.evaluations, args.search_samples, args.extras)
            if not args.keep:  # this seed's runs only: another process may be training its own
                for d in Path(args.workdir).glob(f"*-s{seed}*"):
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
    if args.timing:
        time_rows(args.repeats)
        if args.model == "minilm":  # a SmolLM2 step costs minutes on one core: not measured
            write_json(STEP, {**step_cost(), **machine()})
    summarise()


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
