"""Subspace-aware adapter kinds against LoRA, over seeds (MiniLM + Rotten Tomatoes).

Variants, each a fixed run (no elastic sampling) with the recipe of the other tables (400 steps
of 16, lr 5e-4, alpha 32, alpha/r, every block projection adapted, the classifier and pooler
trained whole, 128 calibration sequences where a kind calibrates):

- ``lora-r8``: LoRA at rank 8 on the whole base (100% of its weights);
- ``nora-R64-r8``: NoRA (``--adapter nora --outer-rank 64 --ranks 8``): the outer pair from the
  activation-aware SVD of each weight, frozen; the inner pair trained: ``2 * 64 * 8`` per layer;
- ``jactus-80``: JACTUS (``--adapter jactus --budget params=0.8``, union ``W,x,g``, thresholds
  0.95/0.9/0.9): every adapted weight replaced inside its union of subspaces, 80% of the adapted
  weights kept, ranks allocated globally, the cores trained;
- ``svd80-lora-r8``: compress then adapt at the same budget: each adapted weight truncated by a
  plain SVD to the rank that keeps 80% of its numbers (``t = floor(0.8 in out / (in + out))``,
  written as a model folder), then LoRA at rank 8 on it;
- ``jactus-80-W``, ``jactus-80-Wx``, ``jactus-80-Wg``: the union ablation (training-time settings,
  each a separately trained network: a core does not transfer between unions);
- ``lora-r8-lr2e-3``, ``nora-R64-r8-lr2e-3``: both at 4x the learning rate (whether NoRA's gap is
  the shared rate).

Each run is scored on the whole test split (2,562 examples). Reported per variant: test accuracy
mean and standard deviation over the seeds, with one evaluation's binomial standard error; the
adapter's trained parameters (without the head, the same for every variant) and in total; the
training seconds (two runs share the machine's two cores, so these are rough). A run that
predicts one class for at least 95% of the test examples is marked stuck.

Writes results/adapter_kinds.csv (one row per run, resumable), .json and .md; ``--timing`` (on a
machine left alone) writes results/adapter_kinds_speed.json: the JACTUS export's CPU speed-up and
size against the original model.

    python benchmarks/adapter_kinds.py [--variants lora-r8,nora-R64-r8] [--seeds 0,1,2] [--threads 1]
    python benchmarks/adapter_kinds.py --timing --threads 1
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import torch
from _common import (
    RESULTS,
    append_row,
    has_row,
    machine,
    markdown_table,
    train_and_score,
    variants_main,
    write_json,
    write_markdown,
)

CSV = RESULTS / "adapter_kinds.csv"
RECIPE = {"alpha": 32.0, "lr": 5e-4, "max_steps": 400, "batch_size": 16, "eval_every": 400, "save_every": 400}
JACTUS = {"adapter": "jactus", "budget": "params=0.8"}
VARIANTS = {
    "lora-r8": {"ranks": [8]},
    "nora-R64-r8": {"adapter": "nora", "outer_rank": 64, "ranks": [8]},
    "jactus-80": JACTUS,
    "svd80-lora-r8": {"ranks": [8], "model": "svd80"},
    "jactus-80-W": {**JACTUS, "union": ["W"]},
    "jactus-80-Wx": {**JACTUS, "union": ["W", "x"]},
    "jactus-80-Wg": {**JACTUS, "union": ["W", "g"]},
    # a learning-rate check: both kinds at 4x the rate (NoRA trains 9x fewer numbers than LoRA r8)
    "lora-r8-lr2e-3": {"ranks": [8], "lr": 2e-3},
    "nora-R64-r8-lr2e-3": {"adapter": "nora", "outer_rank": 64, "ranks": [8], "lr": 2e-3},
}
SVD_SHARE = 0.8


def svd_model(workdir: str) -> str:
    """MiniLM with every adapted weight truncated by a plain SVD to 80% of its numbers (a model folder)."""
    from pathlib import Path

    from supernet.models import load_model
    from supernet.network import default_targets, matches

    out = Path(workdir) / "minilm-svd80"
    if (out / "config.json").is_file():
        return str(out)
    model, tokenizer = load_model("minilm", "seq-cls", labels=["neg", "pos"])
    patterns = default_targets(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(matches(name, p) for p in patterns):
                w = module.weight.double()
                out_f, in_f = w.shape
                rank = int(SVD_SHARE * in_f * out_f // (in_f + out_f))
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                module.weight.copy_((u[:, :rank] * sv[:rank] @ vh[:rank]).to(module.weight.dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def load() -> pd.DataFrame:
    return pd.read_csv(CSV) if CSV.exists() else pd.DataFrame(columns=["variant", "seed"])


def run_one(variant: str, seed: int, workdir: str) -> None:
    from supernet.loader import load_run
    from supernet.train import TrainConfig

    if has_row(CSV, variant, seed):
        return
    options = dict(VARIANTS[variant])
    if options.get("model") == "svd80":
        options["model"] = svd_model(workdir)
    cfg = TrainConfig(seed=seed, name=f"{variant}-s{seed}", out=workdir, **{**RECIPE, **options})
    _, res, share, seconds = train_and_score(cfg)
    setup, _ = load_run(cfg.run_dir(), weights=False)
    net = setup.net
    adapter = sum(a.adapter_params() for a in net.adapters.values())
    original = sum(a.in_features * a.out_features for a in net.adapters.values())
    kept = sum(a.summary().get("weights", a.in_features * a.out_features) for a in net.adapters.values())
    if options.get("model", "").endswith("svd80"):
        kept = sum(int(SVD_SHARE * a.in_features * a.out_features // (a.in_features + a.out_features))
                   * (a.in_features + a.out_features) for a in net.adapters.values())
    append_row(CSV, {"variant": variant, "seed": seed, "accuracy": res["accuracy"], "loss": res["loss"],
                     "retained_weights": kept / original, "macs": res.get("macs"),
                     "examples": res["examples"], "top_class_share": float(share), "stuck": bool(share >= 0.95),
                     "adapter_params": int(adapter), "trainable_params": int(net.trainable_params()),
                     "train_seconds": round(seconds, 1)})
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)


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
                     "retained_weights": float(g["retained_weights"].iloc[0]), "macs": float(g["macs"].iloc[0]),
                     "train_seconds": float(g["train_seconds"].median())})
    write_json(RESULTS / "adapter_kinds.json", {
        "setup": {"model": "all-MiniLM-L6-v2", "dataset": "rotten-tomatoes (test, 2562)", **RECIPE, **machine(),
                  "variants": VARIANTS}, "rows": rows})
    table = markdown_table(
        ["variant", "test accuracy (%) mean ± std", "one eval's s.e.", "adapter params", "share of LoRA r8",
         "trainable (with head)", "adapted weights kept", "MACs (M)", "stuck", "seeds", "train s (median)"],
        [[r["variant"], f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['se_one_eval']:.2f}", f"{r['adapter_params']:,}",
          f"{100 * r['adapter_share_of_lora_r8']:.1f}%", f"{r['trainable_params']:,}",
          f"{100 * r['retained_weights']:.0f}%", f"{r['macs'] / 1e6:.0f}", r["stuck"], r["seeds"],
          f"{r['train_seconds']:.0f}"] for r in rows])
    write_markdown(RESULTS / "adapter_kinds.md", table)
    return {"rows": rows}


def timing(repeats: int = 20) -> None:
    """The JACTUS export's CPU speed and size against the original MiniLM: the factored model of a
    ``jactus-80`` network (seed 0's allocation; a speed depends on the shapes only, so the cores
    are left untrained), each against the original, alternately, in this one process; batch 1 and
    32 of 64 tokens. Writes results/adapter_kinds_speed.json."""
    from supernet.evaluator import compare_speed
    from supernet.export_core import merged_model
    from supernet.loader import TrainConfig, build
    from supernet.models import load_model

    net = build(TrainConfig(**RECIPE, **JACTUS)).net
    model = merged_model(net, net.max_config())
    original, _ = load_model("minilm", "seq-cls", labels=["neg", "pos"])
    original.eval()
    out = {"params": sum(p.numel() for p in model.parameters()),
           "original_params": sum(p.numel() for p in original.parameters()),
           "adapted_weights": sum(r * (o + i) for o, r, i in model.config.factored_shapes.values()),
           "original_adapted_weights": sum(o * i for o, _, i in model.config.factored_shapes.values()),
           "threads": torch.get_num_threads(), "repeats": repeats}
    with torch.no_grad():
        for batch in (1, 32):
            t = compare_speed(model.eval(), original, batch, 64, repeats)
            out.update({f"speedup_b{batch}": t["speedup"], f"ms_b{batch}": 1e3 * t["seconds"],
                        f"ms_original_b{batch}": 1e3 * t["original_seconds"]})
    write_json(RESULTS / "adapter_kinds_speed.json", {"setup": machine(), **out})
    print(out)


def main() -> None:
    variants_main(run_one, summarise, "lora-r8,nora-R64-r8,jactus-80,svd80-lora-r8", "0,1,2",
                  str(RESULTS.parent / "runs" / "bench-kinds"), timing=timing)


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
