"""Wanda's calibration order: ``sequential`` (block by block through the blocks already pruned, as
the reference ``prune_wanda`` of Sun et al. 2023) against ``dense`` (every layer's statistics from
the unpruned model, one pass: supernet's only order before ``--calibration-order``).

On the real MiniLM-L6 + Rotten Tomatoes at 50% unstructured Wanda sparsity (the block projections,
128 calibration sequences drawn with the seed), for every calibration seed and both orders:

(a) fidelity: the cosine similarity between the pruned and the dense model's final hidden states
    on a fixed set of validation examples (``--fidelity-examples``, the first N of the split):
    per real token (``last_hidden_state``) and of the pooled vector the classification head reads;
(b) accuracy: the default super-network trained on the pruned base (``train(TrainConfig(
    sparsity=0.5, calibration_order=..., seed=s, max_steps=200, ...))``), its max sub-network
    evaluated on the test split.

Writes results/wanda_order.csv (one row per measurement), .json (summary) and .md (the table).
Rows already in the CSV are kept, so an interrupted run continues where it stopped.

    nice -n 10 python benchmarks/wanda_order.py [--seeds 0,1,2] [--steps 200] [--summarise-only]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time

import pandas as pd
import torch
import torch.nn.functional as F
from _common import RESULTS, append_row, machine, write_json

from supernet.compressed_base import Compression, calibration_batches, compute_masks
from supernet.data import load_task_data
from supernet.loader import TrainConfig
from supernet.models import load_model
from supernet.network import SuperNetConfig, default_targets, target_layers
from supernet.tasks import collate, encode, rows_of
from supernet.train import train

try:
    from supernet.commands.eval import eval_run
except ImportError:  # moved with the command modules
    from supernet.commands.eval import eval_run

CSV = RESULTS / "wanda_order.csv"
ORDERS = ("dense", "sequential")
SPARSITY = 0.5


def done(df: pd.DataFrame, kind: str, order: str, seed: int) -> bool:
    return len(df) > 0 and ((df["kind"] == kind) & (df["order"] == order) & (df["seed"] == seed)).any()


def append(row: dict) -> pd.DataFrame:
    return append_row(CSV, row)


@torch.no_grad()
def hidden_states(model, batches) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(last_hidden_state, pooler_output, attention_mask)`` of each batch (the encoder, no head)."""
    model.eval()
    out = []
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        o = model.base_model(**inputs)
        out.append((o.last_hidden_state, o.pooler_output, inputs["attention_mask"].bool()))
    return out


def fidelity(pruned, dense) -> dict:
    tok = torch.cat([F.cosine_similarity(p[0], d[0], dim=-1)[d[2]] for p, d in zip(pruned, dense, strict=True)])
    pooled = torch.cat([F.cosine_similarity(p[1], d[1], dim=-1) for p, d in zip(pruned, dense, strict=True)])
    return {"cos_tokens": tok.double().mean().item(), "cos_pooled": pooled.double().mean().item(),
            "tokens": int(tok.numel())}


def measure_fidelity(cfg: TrainConfig, order: str, seed: int, examples: int, cache: dict) -> dict:
    """Calibrate as ``build`` does (the same model, targets, batches and masks), prune, compare."""
    data = load_task_data(cfg.dataset)
    model, tok = load_model(cfg.model, "seq-cls", labels=[str(n) for n in data.label_names])
    enc = encode(data, tok, "seq-cls", cfg.max_length)
    val = enc.splits["validation"]
    fixed = [collate(enc, rows_of(val, range(i, min(i + 64, examples)))) for i in range(0, examples, 64)]
    if "dense" not in cache:
        cache["dense"] = hidden_states(model, fixed)
    targets = target_layers(model, SuperNetConfig(target_modules=default_targets(model), ranks=cfg.ranks))
    comp = Compression(sparsity=SPARSITY, prune="wanda", calibration_samples=cfg.calibration_samples,
                       calibration_order=order)
    t = time.perf_counter()
    masks = compute_masks(model, targets, comp, calibration_batches(enc, comp.calibration_samples, seed))
    seconds = time.perf_counter() - t
    with torch.no_grad():
        for name, layer in targets.items():
            layer.weight.mul_(masks[name])  # nn.Linear: (out, in) like the mask
    return {**fidelity(hidden_states(model, fixed), cache["dense"]), "examples": examples,
            "calibration_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fidelity-examples", type=int, default=512)
    ap.add_argument("--workdir", default=str(RESULTS.parent / "runs" / "bench-wanda-order"))
    ap.add_argument("--skip-training", action="store_true", help="only the fidelity part (a)")
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    if args.summarise_only:
        summarise(pd.read_csv(CSV))
        return
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    df = pd.read_csv(CSV) if CSV.exists() else pd.DataFrame()
    seeds = [int(s) for s in args.seeds.split(",")]
    cache: dict = {}
    for seed in seeds:
        for order in ORDERS:
            if not done(df, "fidelity", order, seed):
                res = measure_fidelity(TrainConfig(), order, seed, args.fidelity_examples, cache)
                df = append({"kind": "fidelity", "order": order, "seed": seed, "sparsity": SPARSITY, **res})
    if args.skip_training:
        summarise(pd.read_csv(CSV))
        return
    for seed in seeds:
        for order in ORDERS:
            if done(df, "accuracy", order, seed):
                continue
            cfg = TrainConfig(sparsity=SPARSITY, prune="wanda", calibration_order=order, seed=seed,
                              max_steps=args.steps, eval_every=args.steps, save_every=args.steps,
                              name=f"{order}-s{seed}", out=args.workdir)
            t = time.perf_counter()
            train(cfg, overwrite=True)
            seconds = time.perf_counter() - t
            res = eval_run(cfg.run_dir(), "max", "test")
            df = append({"kind": "accuracy", "order": order, "seed": seed, "sparsity": SPARSITY,
                         "accuracy": res["accuracy"], "loss": res["loss"], "examples": res["examples"],
                         "steps": args.steps, "train_seconds": round(seconds, 1)})
            shutil.rmtree(cfg.run_dir(), ignore_errors=True)
    summarise(pd.read_csv(CSV))


def _paired(df: pd.DataFrame, kind: str, column: str) -> dict:
    """Mean and sample std per order over seeds, and the paired difference sequential - dense
    (same seed: same calibration sequences, same training data order)."""
    out: dict = {}
    if column not in df or not (df["kind"] == kind).any():
        return out
    part = df[df["kind"] == kind].pivot_table(index="seed", columns="order", values=column)
    for order in ORDERS:
        if order in part:
            out[order] = {"mean": part[order].mean(), "std": part[order].std(), "n": int(part[order].count())}
    if all(o in part for o in ORDERS):
        diff = (part["sequential"] - part["dense"]).dropna()
        out["diff"] = {"mean": diff.mean(), "std": diff.std(), "n": int(len(diff)),
                       "per_seed": {int(k): v for k, v in diff.items()}}
    return out


def summarise(df: pd.DataFrame) -> dict:
    df = df.drop(columns=["train_seconds", "calibration_seconds"], errors="ignore")  # wall time under load
    df.to_csv(CSV, index=False)
    tok = _paired(df, "fidelity", "cos_tokens")
    pooled = _paired(df, "fidelity", "cos_pooled")
    acc = _paired(df, "accuracy", "accuracy")
    verdict = {}
    if "diff" in acc:
        n = int(df.loc[df["kind"] == "accuracy", "examples"].iloc[0])
        p = (acc["dense"]["mean"] + acc["sequential"]["mean"]) / 2
        se_one = math.sqrt(p * (1 - p) / n)  # binomial standard error of one accuracy on n examples
        d = acc["diff"]
        # the seed spread of the paired differences; the binomial SE of a difference of two
        # accuracies (sqrt 2 x) as a floor when three seeds happen to agree
        se_diff = max(d["std"] / math.sqrt(d["n"]) if d["n"] > 1 else 0.0, math.sqrt(2) * se_one / math.sqrt(d["n"]))
        verdict = {"test_examples": n, "binomial_se_one_accuracy": se_one, "se_of_mean_difference": se_diff,
                   "difference_over_se": d["mean"] / se_diff, "within_noise": bool(abs(d["mean"]) < 2 * se_diff)}
    summary = {"setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes", "sparsity": SPARSITY,
                         "prune": "wanda unstructured", "calibration_samples": 128, "targets": "block projections",
                         "steps": int(df.loc[df["kind"] == "accuracy", "steps"].iloc[0])
                         if (df["kind"] == "accuracy").any() else None,
                         "fidelity_examples": int(df.loc[df["kind"] == "fidelity", "examples"].iloc[0])
                         if (df["kind"] == "fidelity").any() else None, **machine()},
               "cos_tokens": tok, "cos_pooled": pooled, "accuracy": acc, "accuracy_verdict": verdict}
    write_json(RESULTS / "wanda_order.json", summary)

    def cell(stats: dict, order: str, scale: float, digits: int) -> str:
        s = stats.get(order)
        return "-" if s is None else f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"

    def diff(stats: dict, scale: float, digits: int) -> str:
        d = stats.get("diff")
        return "-" if d is None else f"{d['mean'] * scale:+.{digits}f} ± {d['std'] * scale:.{digits}f}"

    lines = ["| measure (mean ± std over seeds) | dense order | sequential order | sequential - dense (paired) |",
             "|---|---|---|---|",
             f"| cosine to the dense model, per token | {cell(tok, 'dense', 1, 4)} | {cell(tok, 'sequential', 1, 4)} "
             f"| {diff(tok, 1, 4)} |",
             f"| cosine to the dense model, pooled (the head's input) | {cell(pooled, 'dense', 1, 4)} | "
             f"{cell(pooled, 'sequential', 1, 4)} | {diff(pooled, 1, 4)} |",
             f"| test accuracy after training, max sub-network (%) | {cell(acc, 'dense', 100, 2)} | "
             f"{cell(acc, 'sequential', 100, 2)} | {diff(acc, 100, 2)} |"]
    if verdict:
        lines += ["", f"Seeds: {acc['diff']['n']}. Binomial standard error of one accuracy on "
                      f"{verdict['test_examples']} test examples: {verdict['binomial_se_one_accuracy'] * 100:.2f} "
                      f"points; standard error of the mean paired difference: "
                      f"{verdict['se_of_mean_difference'] * 100:.2f} points; the difference is "
                      f"{abs(verdict['difference_over_se']):.1f} of them: "
                      f"{'inside' if verdict['within_noise'] else 'outside'} the noise (2 SE)."]
    if "diff" in tok and tok["diff"]["n"] > 1:
        d = tok["diff"]
        z = d["mean"] / (d["std"] / math.sqrt(d["n"]))
        lines += ["", f"Per-token cosine, sequential - dense: {d['mean']:+.4f}, {abs(z):.1f} standard errors of the "
                      f"paired seed spread ({'outside' if abs(z) >= 2 else 'inside'} the noise of the calibration "
                      "draw), on the unpruned model's outputs before any training."]
    (RESULTS / "wanda_order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
