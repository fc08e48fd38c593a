"""Turning examples into batches, and scoring a model on a split.

``seq-cls``: the model's classification head; loss is cross-entropy over the classes.
``causal-lm``: the text is put into a prompt and each label has answer words; training
minimises the answer tokens' negative log-likelihood (prompt tokens are masked with -100),
and evaluation scores every answer by the sum of its tokens' log-probabilities and predicts
the best. The reported loss is then cross-entropy over those answer scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm

from supernet.data import TaskData
from supernet.errors import SupernetError

IGNORE = -100


@dataclass
class Encoded:
    """Tokenised splits plus what batching and scoring need."""

    task: str
    splits: dict[str, Dataset]
    pad_id: int
    answer_ids: list[list[int]]  # causal-lm only: token ids of each label's answer
    num_classes: int  # classes, or the most answers any multiple-choice example has


def encode(data: TaskData, tokenizer, task: str, max_length: int) -> Encoded:
    if task == "seq-cls":

        def fn(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return dict(enc)

        splits = {k: v.map(fn, batched=True, remove_columns=v.column_names) for k, v in data.splits.items()}
        return Encoded(task, splits, tokenizer.pad_token_id, [], len(data.label_names))

    answers = [] if data.has_choices else [
        tokenizer(a, add_special_tokens=False)["input_ids"] for a in data.answer_words()
    ]

    longest_answer = max((len(a) for a in answers), default=0)
    if longest_answer >= max_length:
        raise SupernetError(f"--max-length {max_length} leaves no room for the prompt before the answer")

    def fn_lm(batch):
        prompts = [data.prompt.format(text=t) for t in batch["text"]]
        ids = tokenizer(prompts)["input_ids"]
        out = {"labels": batch["label"]}
        if data.has_choices:  # per-example answers
            out["choice_ids"] = [
                [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] for c in cs]
                for cs in batch["choices"]
            ]
            longest = [max(len(a) for a in cs) for cs in out["choice_ids"]]
            if max(longest) >= max_length:
                raise SupernetError(f"--max-length {max_length} leaves no room for the prompt before an answer")
        else:
            longest = [max(len(a) for a in answers)] * len(ids)
        out["prompt_ids"] = [p[-(max_length - n):] for p, n in zip(ids, longest, strict=True)]  # keep the end
        return out

    splits = {k: v.map(fn_lm, batched=True, remove_columns=v.column_names) for k, v in data.splits.items()}
    return Encoded(task, splits, tokenizer.pad_token_id, answers, len(data.label_names))


def rows_of(ds: Dataset, indices) -> list[dict]:
    """Rows ``indices`` of a dataset in one columnar read (much faster than row by row)."""
    cols = ds[[int(i) for i in indices]]
    keys = list(cols)
    return [dict(zip(keys, vals, strict=True)) for vals in zip(*(cols[k] for k in keys), strict=True)]


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(enc: Encoded, rows: list[dict]) -> dict[str, torch.Tensor]:
    """A training batch: right-padded inputs and labels (answer tokens only for causal-LM)."""
    if enc.task == "seq-cls":
        batch = {k: _pad([r[k] for r in rows], enc.pad_id if k == "input_ids" else 0) for k in rows[0] if k != "labels"}
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
        return batch
    seqs, labels = [], []
    for r in rows:
        answer = _answers(enc, r)[r["labels"]]
        seqs.append(list(r["prompt_ids"]) + answer)
        labels.append([IGNORE] * len(r["prompt_ids"]) + answer)
    mask = [[1] * len(s) for s in seqs]
    return {"input_ids": _pad(seqs, enc.pad_id), "attention_mask": _pad(mask, 0), "labels": _pad(labels, IGNORE)}


def _answers(enc: Encoded, row: dict) -> list[list[int]]:
    return row["choice_ids"] if "choice_ids" in row else enc.answer_ids


def _choice_scores(model: nn.Module, enc: Encoded, rows: list[dict], device, width: int) -> torch.Tensor:
    """Sum of log-probabilities of each answer after each prompt, shape ``(B, width)``;
    examples with fewer answers than ``width`` get ``-inf`` in the missing places."""
    seqs, spans, owner = [], [], []
    for b, r in enumerate(rows):
        p = list(r["prompt_ids"])
        for k, answer in enumerate(_answers(enc, r)):
            spans.append((len(p), len(answer)))
            seqs.append(p + answer)
            owner.append((b, k))
    ids = _pad(seqs, enc.pad_id).to(device)
    mask = _pad([[1] * len(s) for s in seqs], 0).to(device)
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = torch.full((len(rows), width), float("-inf"), device=device)
    for i, (start, n) in enumerate(spans):
        targets = ids[i, start : start + n]
        scores[owner[i]] = logp[i, start - 1 : start - 1 + n].gather(-1, targets[:, None]).sum()
    return scores


@torch.no_grad()
def evaluate(
    model: nn.Module,
    enc: Encoded,
    split: str,
    batch_size: int = 64,
    limit: int | None = None,
    device=None,
    return_logits: bool = False,
    progress: bool = False,
) -> dict:
    """Accuracy and loss of ``model`` (at whatever sub-network is active) on a split.

    Returns a dict with ``accuracy``, ``loss``, ``examples`` and, with ``return_logits``,
    ``logits`` (``(N, K)`` numpy) and ``labels``.
    """
    ds = enc.splits[split]
    n = len(ds) if limit is None else min(limit, len(ds))
    device = device or next(model.parameters()).device
    # Batches of similar length waste little on padding; results go back to dataset order.
    length_col = "input_ids" if enc.task == "seq-cls" else "prompt_ids"
    order = np.argsort([-len(x) for x in ds.select(range(n))[length_col]], kind="stable")
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        starts = range(0, n, batch_size)
        for start in tqdm(starts, desc=f"eval {split}", disable=not progress, leave=False):
            rows = rows_of(ds, order[start : start + batch_size])
            labels = torch.tensor([r["labels"] for r in rows], device=device)
            if enc.task == "seq-cls":
                batch = {k: v.to(device) for k, v in collate(enc, rows).items() if k != "labels"}
                logits = model(**batch).logits.float()
            else:
                logits = _choice_scores(model, enc, rows, device, enc.num_classes)
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    inverse = torch.from_numpy(np.argsort(order, kind="stable"))
    logits = torch.cat(all_logits)[inverse]
    labels = torch.cat(all_labels)[inverse]
    out = {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
        "examples": int(n),
    }
    if return_logits:
        out["logits"] = logits.numpy()
        out["labels"] = labels.numpy()
    return out


class BatchOrder:
    """Which training examples micro-batch ``m`` holds on process ``rank`` of ``world``.

    Each epoch is a permutation drawn from ``(seed, epoch)`` alone, and the ``world``
    processes take consecutive slices of it, so together they see what one process with a
    ``world`` times larger batch sees. Random access: a resumed run picks up exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, world: int = 1, rank: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.world, self.rank = n, batch_size, seed, world, rank
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise SupernetError(
                f"the train split has {n} examples, fewer than one batch of {batch_size} x {world} processes"
            )
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_of(self, m: int) -> int:
        return m // self.per_epoch

    def indices(self, m: int) -> np.ndarray:
        epoch, j = divmod(m, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        start = (j * self.world + self.rank) * self.batch_size
        return self._epoch[1][start : start + self.batch_size]
