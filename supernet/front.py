"""A search's front, confirmed on the whole validation split before it is called a front.

The search scores each configuration on its first ``--eval-samples`` validation examples; at 82%
accuracy on 300 examples one such estimate is +/- 4.4 points (95%), more than the differences
that decide the front. So, at the end (:func:`confirm`):

1. the candidates are the search's front members and every configuration a member beats *within
   the noise*: dominated by it on the objectives, but with a search accuracy whose 95% Wilson
   interval reaches the member's (``accuracy_high >= member's accuracy_low``);
2. every candidate is re-scored on the whole validation split (or its first ``--final-samples``
   examples);
3. the front is the non-dominated set of the candidates with the whole-validation scores in place
   of the search's (``acc`` and ``loss``; costs, latency and proxies as measured). A member that
   falls out is *demoted*; a candidate that comes in is *promoted*. The front's members are then
   scored on the test split too.

Only the validation split decides; the test split is reported, never used to select.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from supernet.fidelity import accuracy_interval
from supernet.search.pareto import non_dominated

FINAL_COLUMNS = ["val_accuracy", "val_loss", "val_examples", "test_accuracy", "test_loss", "test_examples",
                 "val_accuracy_low", "val_accuracy_high", "test_accuracy_low", "test_accuracy_high"]
#: the objectives a whole-split score replaces, by the column that replaces their metric
RESCORED = {"acc": ("val_accuracy", -1.0), "loss": ("val_loss", 1.0)}


def with_search_interval(frame: pd.DataFrame, examples: int) -> pd.DataFrame:
    """``accuracy_low`` / ``accuracy_high`` after ``accuracy``: the 95% Wilson interval of each
    row's search accuracy, measured on ``examples`` validation examples."""
    if "accuracy" not in frame.columns or "accuracy_low" in frame.columns:
        return frame
    bounds = [accuracy_interval(a, examples) if pd.notna(a) else (math.nan, math.nan) for a in frame["accuracy"]]
    at = frame.columns.get_loc("accuracy") + 1
    frame = frame.copy()
    frame.insert(at, "accuracy_high", [b[1] for b in bounds])
    frame.insert(at, "accuracy_low", [b[0] for b in bounds])
    return frame


SPLITS = {"val": "validation", "test": "test"}


def final_evaluation(setup, rows: pd.DataFrame, batch_size: int, device, progress: bool,
                     samples: int | None = None, splits: Sequence[str] = ("val", "test")) -> pd.DataFrame:
    """``rows`` scored on the whole validation split and on the test split (``splits``; their first
    ``samples`` examples, if given), each accuracy with its 95% Wilson interval."""
    from tqdm.auto import tqdm

    from supernet.evaluator import Evaluator

    evaluators = {SPLITS[s]: Evaluator(setup.net, setup.enc, SPLITS[s], samples, batch_size, device,
                                       setup.cfg.max_length) for s in splits}
    columns = [c for c in FINAL_COLUMNS if c.split("_", 1)[0] in splits]
    out = []
    for config in tqdm(rows["config"], desc="final evaluation", disable=not progress, leave=False):
        row = {}
        for short in splits:
            split = SPLITS[short]
            m = evaluators[split](json.loads(config))
            n = evaluators[split].examples
            low, high = accuracy_interval(m["accuracy"], n)
            row |= {f"{short}_accuracy": m["accuracy"], f"{short}_loss": m["loss"], f"{short}_examples": n,
                    f"{short}_accuracy_low": low, f"{short}_accuracy_high": high}
        out.append(row)
    return pd.concat([rows.reset_index(drop=True), pd.DataFrame(out, columns=columns)], axis=1)


def candidates(history: pd.DataFrame, members: Sequence[int], columns: Sequence[str]) -> list[int]:
    """The members' indices and those of the rows a member beats within the noise (see the module
    docstring); ``history`` carries ``accuracy_low`` / ``accuracy_high``."""
    chosen = list(members)
    if "accuracy_low" not in history.columns:
        return chosen
    F = history[list(columns)].to_numpy(float)
    index = history["index"].to_numpy()
    rows = {int(i): k for k, i in enumerate(index)}
    for k, i in enumerate(index):
        if int(i) in members or not np.isfinite(F[k]).all():
            continue
        for m in members:
            j = rows[int(m)]
            beats = np.all(F[j] <= F[k]) and np.any(F[j] < F[k])
            if beats and history["accuracy_high"].iloc[k] >= history["accuracy_low"].iloc[j]:
                chosen.append(int(i))
                break
    return chosen


def confirm(scored: pd.DataFrame, objectives: Sequence[str], members: Sequence[int]) -> pd.DataFrame:
    """``scored`` (the candidates with :data:`FINAL_COLUMNS`) with a ``status`` column: ``kept``,
    ``demoted``, ``promoted`` or ``beaten``, by the non-dominated set of the objectives where each
    :data:`RESCORED` one takes its whole-validation value."""
    F = np.column_stack([RESCORED[o][1] * scored[RESCORED[o][0]].to_numpy(float) if o in RESCORED
                         else scored[f"obj_{o}"].to_numpy(float) for o in objectives])
    finite = np.isfinite(F).all(axis=1)
    front = np.zeros(len(scored), dtype=bool)
    if finite.any():
        front[np.flatnonzero(finite)] = non_dominated(F[finite])
    was = scored["index"].isin(list(members)).to_numpy()
    status = np.where(front & was, "kept", np.where(front, "promoted", np.where(was, "demoted", "beaten")))
    return scored.assign(status=status)
