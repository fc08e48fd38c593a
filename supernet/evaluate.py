"""Evaluate one sub-network of a trained run: ``supernet eval``."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from supernet import validate
from supernet.errors import SupernetError
from supernet.loader import Setup, load_run
from supernet.space import load_config_file


def resolve_subnet(setup: Setup, subnet: str) -> dict:
    if subnet in ("max", "mid", "min"):
        return setup.net.space.named_config(subnet)
    return setup.net.space.validate(load_config_file(subnet))


def eval_run(
    run_dir: str | Path,
    subnet: str = "max",
    split: str = "test",
    predictions: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Accuracy, loss, MACs, trainable parameters and deployed bytes of one sub-network on a split.

    With ``predictions``, writes one CSV row per example: index, label, prediction and one
    logit (or answer score, for causal-LM) column per class.
    """
    from supernet.tasks import evaluate

    if split not in ("train", "validation", "test"):
        raise SupernetError(f"unknown split {split!r}; use train, validation or test")
    if limit is not None and limit <= 0:
        raise SupernetError("--limit must be positive")
    if predictions is not None:
        predictions = validate.writable_file("--predictions", predictions)
    setup, record = load_run(run_dir)
    config = setup.net.activate(resolve_subnet(setup, subnet))
    with setup.net.merged():  # as the search scores it: adapters folded into dense weights
        res = evaluate(setup.net.model, setup.enc, split, batch_size=batch_size, limit=limit,
                       return_logits=predictions is not None, progress=progress)
    out = {
        "run": str(run_dir),
        "subnet": subnet,
        "split": split,
        "accuracy": res["accuracy"],
        "loss": res["loss"],
        "macs": setup.net.macs(config, setup.cfg.max_length),
        "seq_len": setup.cfg.max_length,
        "trainable_params": setup.net.trainable_params(config),
        "size": setup.net.size(config),
        "examples": res["examples"],
        "config": config,
    }
    if predictions is not None:
        logits = res["logits"]
        names = setup.label_names
        df = pd.DataFrame({"index": range(len(logits)),
                           "label": [names[i] for i in res["labels"]],
                           "prediction": [names[i] for i in logits.argmax(-1)]})
        for j, n in enumerate(names):
            df[f"logit_{n}"] = logits[:, j]
        predictions.parent.mkdir(parents=True, exist_ok=True)
        tmp = predictions.with_name(predictions.name + ".tmp")
        df.to_csv(tmp, index=False)
        os.replace(tmp, predictions)
    return out
