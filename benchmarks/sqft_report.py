"""Report phase of ``sqft_table.py``: evaluate the trained runs, export the QA-SparsePEFT ones,
and write results/sqft_table.{csv,json,md}. See sqft_table.py for the recipes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from _common import RESULTS, machine, write_json
from transformers import AutoModelForSequenceClassification

from supernet.bases import QuantizedBase
from supernet.evaluator import Evaluator
from supernet.export import export_compressed
from supernet.loader import load_run
from supernet.tasks import metrics, score

CSV = RESULTS / "sqft_table.csv"
LABELS = {
    "lora": "LoRA r=16 (dense base)",
    "lora-wanda50-naive": "LoRA r=16 on 50% Wanda base, merged naively",
    "nls-sparsepeft50": "NLS + SparsePEFT, 50% Wanda",
    "nls-int4": "NLS on INT4 base (adapter beside it)",
    "nls-qa-sparsepeft-int4": "NLS + QA-SparsePEFT, 50% Wanda INT4, merged",
}


def shipped(net, config) -> dict:
    """Sparsity, bits and bytes of the adapted layers as each recipe ships them: merged (dense or
    pruned floats, or QA integers), except a plain adapter on an integer base, which ships beside it."""
    zeros = total = nbytes = 0
    bits = 32
    for group, names in net.groups.items():
        for n in names:
            ad = net.adapters[n]
            ad.set_active(config[group])
            beside = isinstance(ad.base, QuantizedBase) and ad.merge == "plain"
            w = ad.base.weight() if beside else ad.merged_weight().detach()
            zeros += int((w == 0).sum())
            total += w.numel()
            nbytes += ad.nbytes(config[group], merged=not beside)
            if isinstance(ad.base, QuantizedBase) and ad.merge != "sparse":
                bits = ad.base.bits
    return {"sparsity": zeros / total, "bits": bits, "adapted_bytes": nbytes}


def report(seeds: list[int], recipes: dict, run_dir) -> None:
    rows = []
    for seed in seeds:
        for recipe in recipes:
            d = run_dir(recipe, seed)
            setup, record = load_run(d)
            net = setup.net
            evals = {s: Evaluator(net, setup.enc, s, None, 64) for s in ("validation", "test")}
            subnets = ["max"] if len(net.space.choices[next(iter(net.space.choices))]) == 1 else ["max", "mid"]
            for sub in subnets:
                cfg = net.space.named_config(sub)
                row = {"recipe": recipe, "seed": seed, "subnet": sub,
                       **{f"{s[:4]}_acc": ev(cfg)["accuracy"] for s, ev in evals.items()}, **shipped(net, cfg)}
                if recipe.startswith("nls-qa"):
                    row.update(check_export(net, setup, cfg, evals))
                rows.append(row)
                print(json.dumps(row), flush=True)
    df = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(CSV, index=False)
    summarise(df)


def check_export(net, setup, cfg, evals) -> dict:
    """Export compressed, reload with transformers, score the same prepared batches: equal accuracy?"""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_compressed(net, cfg, Path(tmp) / "c", tokenizer=setup.tokenizer)
        loaded = AutoModelForSequenceClassification.from_pretrained(Path(tmp) / "c").eval()  # as stock users load it
        for split, ev in evals.items():
            ours = ev.scores(cfg)
            theirs = score(loaded, setup.enc, ev.prepared)
            out[f"export_{split[:4]}_acc"] = metrics(theirs, ev.prepared.labels)["accuracy"]
            out[f"export_{split[:4]}_logits_equal"] = bool(torch.equal(ours, theirs))
        out["export_file_bytes"] = manifest["size_on_disk"]["model.safetensors"]
    return out


MAJORITY = 0.5816  # validation accuracy of always answering the majority class (620 of 1066)


def summarise(df: pd.DataFrame) -> None:
    # A run that ends within one point of the majority class never left its start ("stuck"):
    # reported, and the mean over the runs that trained is given beside the mean over all.
    df = df.assign(stuck=(df["vali_acc"] - MAJORITY).abs() < 0.01)
    g = df.groupby(["recipe", "subnet"], sort=False)
    agg = g.agg(val_mean=("vali_acc", "mean"), val_std=("vali_acc", "std"), test_mean=("test_acc", "mean"),
                test_std=("test_acc", "std"), sparsity=("sparsity", "mean"), bits=("bits", "first"),
                adapted_mb=("adapted_bytes", lambda x: x.mean() / 2**20), seeds=("seed", "nunique"),
                stuck=("stuck", "sum")).reset_index()
    trained = df[~df["stuck"]].groupby(["recipe", "subnet"], sort=False)["test_acc"].mean()
    agg["test_trained_mean"] = [trained.get((r, s), float("nan")) for r, s in zip(agg["recipe"], agg["subnet"],
                                                                                    strict=True)]
    qa = df[df["recipe"].str.startswith("nls-qa")]
    summary = {
        "setup": {"model": "all-MiniLM-L6-v2", "data": "rotten-tomatoes (validation 1066, test 1066)",
                  "steps": 400, "batch": 16, "lr": 1e-3, "alpha": 32, "scaling": "alpha/r", **machine()},
        "rows": agg.to_dict(orient="records"),
        "qa_export_accuracy_equal": bool((qa["export_vali_acc"] == qa["vali_acc"]).all()
                                         and (qa["export_test_acc"] == qa["test_acc"]).all()),
        "qa_export_logits_equal": bool(qa["export_vali_logits_equal"].all() and qa["export_test_logits_equal"].all()),
    }
    write_json(RESULTS / "sqft_table.json", summary)
    lines = ["| recipe | sub-network | val acc | test acc | stuck runs | test acc, runs that trained | sparsity | bits "
             "| adapted layers (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in agg.itertuples():
        lines.append(f"| {LABELS.get(r.recipe, r.recipe)} | {r.subnet} | {100 * r.val_mean:.2f} ± {100 * r.val_std:.2f}"
                     f" | {100 * r.test_mean:.2f} ± {100 * r.test_std:.2f} | {r.stuck} of {r.seeds} "
                     f"| {100 * r.test_trained_mean:.2f} | {100 * r.sparsity:.1f}% | {r.bits} | {r.adapted_mb:.1f} |")
    (RESULTS / "sqft_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("qa")}))
