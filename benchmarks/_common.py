"""Shared pieces of the benchmark scripts: the real MiniLM, PEFT LoRA built like ours, and a
PEFT training loop that follows our trainer step for step (same data order, optimiser,
schedule, clipping), so that a comparison differs only in the adapter."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from supernet.tasks import BatchOrder, collate, rows_of

RESULTS = Path(__file__).resolve().parent.parent / "results"
# Every projection inside MiniLM's blocks (what supernet's default targets give), not the pooler:
# ours as an ``re:`` pattern, PEFT's as the same regex string (PEFT full-matches a string target).
BLOCK_REGEX = r".*\.\d+\.(?:.*\.)?(?:query|key|value|dense)"
TARGETS = ["re:" + BLOCK_REGEX]


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}


def peft_lora(model, rank: int, alpha: float, rank_pattern: dict | None = None):
    """PEFT LoRA on the block projections; ``rank_pattern`` (``{module name: rank}``) gives each
    module its own rank, keyed the way supernet's PEFT export keys it."""
    from peft import LoraConfig, get_peft_model

    from supernet.export import pattern_keys

    pattern = pattern_keys(rank_pattern) if rank_pattern else {}
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=BLOCK_REGEX,
                                            modules_to_save=["classifier", "pooler"], lora_dropout=0.0,
                                            rank_pattern=pattern))


def train_fixed(model, enc, cfg, seed: int) -> float:
    """Train any model with our trainer's recipe (single process); returns seconds.

    Follows supernet.train.Trainer for the options this benchmark uses; refuses the others
    rather than comparing unlike recipes.
    """
    if cfg.grad_accum != 1 or cfg.scaling != "lora" or cfg.dropout != 0 or cfg.train_samples is not None:
        raise ValueError("train_fixed mirrors the default recipe only (grad_accum 1, alpha/r, no dropout)")
    set_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps)
    ds = enc.splits["train"]
    order = BatchOrder(len(ds), cfg.batch_size, seed)  # the trainer's data order
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.max_steps):
        batch = collate(enc, rows_of(ds, order.indices(step)))
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
    return time.perf_counter() - t0


def append_row(csv: Path, row: dict):
    """Append one result row to ``csv`` (written whole each time, so an interrupted benchmark keeps
    every row it finished and continues from them); returns the table."""
    import fcntl

    import pandas as pd

    with open(csv.with_name(csv.name + ".lock"), "w") as lock:  # several benchmark processes may share the table
        fcntl.flock(lock, fcntl.LOCK_EX)
        df = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
        df = pd.concat([df, pd.DataFrame([row])], ignore_index=True)
        df.to_csv(csv, index=False)
    print(json.dumps(row), flush=True)
    return df


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_markdown(path: Path, lines: list[str]) -> None:
    """Write a benchmark's markdown summary and print it."""
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def train_and_score(cfg) -> tuple[dict, dict, float, float]:
    """Train ``cfg`` (from scratch), score its largest sub-network on the whole test split with a
    predictions file; returns the training summary, the evaluation, the share of the most
    predicted class (a run stuck at the majority class predicts one class for >= 95%) and the
    training seconds. The predictions file is removed; the run folder is left to the caller."""
    import pandas as pd

    from supernet.commands.eval import eval_run
    from supernet.train import train

    start = time.perf_counter()
    summary = train(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    preds = cfg.run_dir().with_name(cfg.run_dir().name + "-predictions.csv")
    res = eval_run(cfg.run_dir(), "max", "test", predictions=preds)
    share = float(pd.read_csv(preds)["prediction"].value_counts(normalize=True).iloc[0])
    preds.unlink()
    return summary, res, share, seconds


def variants_main(run_one, summarise, variants: str, seeds: str, workdir: str, timing=None) -> None:
    """The command line of a benchmark of variants over seeds: ``--variants``, ``--seeds``,
    ``--workdir``, ``--threads``, ``--summarise-only`` (and ``--timing`` when ``timing`` is given:
    ``timing()`` instead of training, on a machine left alone); every (seed, variant) is
    ``run_one``'s (which skips what the results table holds), then ``summarise()``."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=variants)
    ap.add_argument("--seeds", default=seeds)
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--summarise-only", action="store_true")
    if timing is not None:
        ap.add_argument("--timing", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "timing", False):
        timing()
    elif not args.summarise_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                run_one(variant, seed, args.workdir)
    summarise()


def has_row(csv: Path, variant: str, seed: int) -> bool:
    """Whether a variants-over-seeds table already holds ``(variant, seed)`` (a resumed benchmark skips it)."""
    import pandas as pd

    df = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=["variant", "seed"])
    return bool(((df["variant"] == variant) & (df["seed"] == seed)).any())
