"""``supernet eval``: one sub-network of a trained run on a split, printed as one JSON line.

:func:`eval_run` is the command as a function (accuracy, loss, MACs, parameters, deployed
bytes); ``--predictions`` writes one CSV row per example, and only ever replaces a file that
``eval --predictions`` wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import pandas as pd

from supernet import files, runfiles, validate
from supernet.errors import SupernetError
from supernet.files import write_atomic
from supernet.loader import Setup, load_run
from supernet.space import load_config_file


def run(args: argparse.Namespace) -> int:
    """``supernet eval``: print :func:`eval_run`'s result as one JSON line."""
    if args.batch_size <= 0:
        raise SupernetError("--batch-size must be positive")
    out = eval_run(args.run, args.subnet, args.split, args.predictions, args.limit, args.batch_size,
                   progress=sys.stderr.isatty())
    print(json.dumps(out))
    return 0


def resolve_subnet(setup: Setup, subnet: str) -> dict:
    """``max``, ``mid``, ``min`` (``NAME@CHOICE``: with every dimension that has ``CHOICE`` at it,
    e.g. ``max@rora``) or a JSON file."""
    if subnet.partition("@")[0] in ("max", "mid", "min"):
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
    from supernet.fidelity import accuracy_interval
    from supernet.tasks import evaluate

    if split not in ("train", "validation", "test"):
        raise SupernetError(f"unknown split {split!r}; use train, validation or test")
    if limit is not None and limit <= 0:
        raise SupernetError("--limit must be positive")
    if predictions is not None:
        predictions = validate.writable_file("--predictions", predictions)
        in_use = runfiles.paths_in_use(run_dir, runfiles.read_run_config(run_dir))
        files.check_clear_of("--predictions", predictions, in_use, f"run {str(run_dir)!r}")
        if os.path.lexists(predictions) and not is_predictions_file(predictions):
            raise SupernetError(f"--predictions {str(predictions)!r} exists and is not a predictions file that "
                                "supernet wrote; it never overwrites other files: choose another name")
    setup, record = load_run(run_dir)
    config = setup.net.activate(resolve_subnet(setup, subnet))
    with setup.net.merged():  # as the search scores it: adapters folded into dense weights
        res = evaluate(setup.net.model, setup.enc, split, batch_size=batch_size, limit=limit,
                       return_logits=predictions is not None, progress=progress)
    low, high = accuracy_interval(res["accuracy"], res["examples"])  # 95% Wilson
    out = {
        "run": str(run_dir),
        "subnet": subnet,
        "split": split,
        "accuracy": res["accuracy"],
        "accuracy_low": low,
        "accuracy_high": high,
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
        write_atomic(predictions, df.to_csv(index=False))
    return out


PREDICTION_COLUMNS = ("index", "label", "prediction")


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` is a regular file whose header is that of ``eval --predictions``
    (``index,label,prediction`` then one ``logit_<label>`` column per class)."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with path.open("rb") as f:
            header = f.readline(1 << 16).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:
        columns = next(csv.reader([header]))
    except (csv.Error, StopIteration):
        return False
    return (tuple(columns[:3]) == PREDICTION_COLUMNS and len(columns) > 3
            and all(c.startswith("logit_") for c in columns[3:]))
