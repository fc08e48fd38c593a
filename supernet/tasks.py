"""Turning examples into batches, and scoring a model on a split.

``seq-cls``: the model's classification head; loss is cross-entropy over the classes.
``causal-lm``: the text is put into a prompt and each label has answer words; training
minimises the answer tokens' negative log-likelihood (prompt tokens are masked with -100),
and evaluation scores every answer by the sum of its tokens' log-probabilities and predicts
the best. The reported loss is then cross-entropy over those answer scores.
"""

from __future__ import annotations

import copy
import inspect
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
    if not data.has_choices:
        check_distinct_answers(data.answer_words(), answers, "answers")

    longest_answer = max((len(a) for a in answers), default=0)
    if longest_answer >= max_length:
        raise SupernetError(f"--max-length {max_length} leaves no room for the prompt before the answer")

    def fn_lm(batch, indices, split):
        prompts = [data.prompt.format(text=t) for t in batch["text"]]
        ids = tokenizer(prompts)["input_ids"]
        out = {"labels": batch["label"]}
        if data.has_choices:  # per-example answers
            out["choice_ids"] = [
                [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] for c in cs]
                for cs in batch["choices"]
            ]
            for i, text, cs, cids in zip(indices, batch["text"], batch["choices"], out["choice_ids"], strict=True):
                # a file's examples are shuffled into the splits: the text helps find the row
                quoted = repr(text if len(text) <= 40 else text[:40] + "...")
                check_distinct_answers(cs, cids, "choices", f"example {i} of the {split} split ({quoted}): ")
            longest = [max(len(a) for a in cs) for cs in out["choice_ids"]]
            if max(longest) >= max_length:
                raise SupernetError(f"--max-length {max_length} leaves no room for the prompt before an answer")
        else:
            longest = [max(len(a) for a in answers)] * len(ids)
        out["prompt_ids"] = [p[-(max_length - n):] for p, n in zip(ids, longest, strict=True)]  # keep the end
        return out

    splits = {k: v.map(fn_lm, batched=True, with_indices=True, fn_kwargs={"split": k}, remove_columns=v.column_names)
              for k, v in data.splits.items()}
    return Encoded(task, splits, tokenizer.pad_token_id, answers, len(data.label_names))


def check_distinct_answers(words: list[str], ids: list[list[int]], kind: str, where: str = "") -> None:
    """Refuse answers that a causal LM could not tell apart.

    Answers are scored by the log-likelihood of their tokens, so two answers with the same
    token ids (words outside the vocabulary both become ``[UNK]``) always tie, the tie going
    to the first, and training on them cannot lower the loss below ln 2; an answer with no
    tokens at all has nothing to score.

    Args:
        words: the answers as written.
        ids: the token ids of each answer.
        kind: what the answers are, in the message: ``answers`` or ``choices``.
        where: prefix naming the example, for per-example choices.

    Raises:
        SupernetError: naming the answer(s) and their ids.
    """
    seen: dict[tuple[int, ...], int] = {}
    for k, (word, tokens) in enumerate(zip(words, ids, strict=True)):
        if not tokens:
            raise SupernetError(f"{where}{kind.removesuffix('s')} {word.strip()!r} tokenizes to no tokens; "
                                "choose answer words the tokenizer can read")
        first = seen.setdefault(tuple(tokens), k)
        if first != k:
            raise SupernetError(f"{where}{kind} {words[first].strip()!r} and {word.strip()!r} both tokenize to "
                                f"{list(tokens)}; choose answer words the tokenizer tells apart")


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


def _takes(model: nn.Module, arg: str) -> bool:
    base = getattr(model, "module", model)  # DDP
    try:
        return arg in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _shared_answers(enc: Encoded) -> bool:
    """Every example scores the same answers: the prompt is run once per example and every
    answer continues it (one token: read at the prompt's last position; longer: through the
    key/value cache, cropped back to the prompt after each answer)."""
    return enc.task == "causal-lm" and bool(enc.answer_ids)


def _prompt_batch(enc: Encoded, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Prompts left-padded so that every last token sits at position -1, with explicit
    position ids so that padding does not shift positions."""
    seqs = [list(r["prompt_ids"]) for r in rows]
    width = max(len(x) for x in seqs)
    ids = torch.tensor([[enc.pad_id] * (width - len(x)) + x for x in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _answer_batch(enc: Encoded, rows: list[dict]) -> dict:
    """Prompt + answer sequences (one per example and answer), right-padded, with the
    positions whose logits predict each answer token."""
    seqs, rows_idx, cols_idx, targets, owner = [], [], [], [], []
    for b, r in enumerate(rows):
        p = list(r["prompt_ids"])
        for k, answer in enumerate(_answers(enc, r)):
            i = len(seqs)
            seqs.append(p + answer)
            for j, t in enumerate(answer):
                rows_idx.append(i)
                cols_idx.append(len(p) - 1 + j)
                targets.append(t)
                owner.append(b * enc.num_classes + k)
    return {"input_ids": _pad(seqs, enc.pad_id), "attention_mask": _pad([[1] * len(x) for x in seqs], 0),
            "gather": (torch.tensor(rows_idx), torch.tensor(cols_idx)), "targets": torch.tensor(targets),
            "owner": torch.tensor(owner), "examples": len(rows)}


@dataclass
class Prepared:
    """One split's evaluation examples, tokenised, padded and batched once (length-sorted, on
    the device), so that scoring a sub-network is only forward passes."""

    batches: list[dict]
    labels: torch.Tensor  # in the order the examples were asked in
    restore: torch.Tensor  # batch-order rows -> asked order
    examples: int


def prepare(enc: Encoded, split: str, batch_size: int = 64, limit: int | None = None,
            indices=None, device=None) -> Prepared:
    """Batches of ``split`` (its first ``limit`` rows, or the rows ``indices``) for :func:`score`."""
    ds = enc.splits[split]
    if indices is None:
        indices = np.arange(len(ds) if limit is None else min(limit, len(ds)))
    indices = np.asarray(indices, dtype=np.int64)
    length_col = "input_ids" if enc.task == "seq-cls" else "prompt_ids"
    lengths = [len(x) for x in ds.select(indices)[length_col]] if len(indices) else []
    perm = np.argsort([-n for n in lengths], kind="stable")  # similar lengths share a batch
    order = indices[perm]
    batches, labels = [], []
    for start in range(0, len(order), batch_size):
        rows = rows_of(ds, order[start : start + batch_size])
        labels.extend(r["labels"] for r in rows)
        if enc.task == "seq-cls":
            batch = {k: v for k, v in collate(enc, rows).items() if k != "labels"}
        elif _shared_answers(enc):
            batch = _prompt_batch(enc, rows)
        else:
            batch = _answer_batch(enc, rows)
        batches.append(_to(batch, device))
    restore = torch.as_tensor(np.argsort(perm, kind="stable"))
    return Prepared(batches, torch.tensor(labels, dtype=torch.long)[restore], restore, len(indices))


def _to(batch: dict, device) -> dict:
    if device is None:
        return batch
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) if
                isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _forward_scores(model: nn.Module, enc: Encoded, batch: dict) -> torch.Tensor:
    """Logits (seq-cls) or answer log-likelihoods (causal-LM) of one prepared batch, ``(B, K)``."""
    if enc.task == "seq-cls":
        return model(**batch).logits.float()
    if "position_ids" in batch:  # answers shared by every example: the prompt runs once
        return _shared_answer_scores(model, enc, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = logits[batch["gather"]].float()  # only the positions that predict answer tokens
    token_logp = F.log_softmax(picked, dim=-1).gather(-1, batch["targets"][:, None])[:, 0]
    flat = torch.zeros(batch["examples"] * enc.num_classes, device=token_logp.device)
    flat.index_add_(0, batch["owner"], token_logp)
    present = torch.zeros_like(flat, dtype=torch.bool)
    present[batch["owner"]] = True
    flat[~present] = float("-inf")  # examples with fewer answers than the widest
    return flat.view(batch["examples"], enc.num_classes)


def _shared_answer_scores(model: nn.Module, enc: Encoded, batch: dict) -> torch.Tensor:
    """Log-likelihood of each shared answer after each (left-padded) prompt, ``(B, K)``."""
    multi = any(len(a) > 1 for a in enc.answer_ids)
    keep = {"logits_to_keep": 1} if _takes(model, "logits_to_keep") else {}
    out = model(**batch, **keep, use_cache=multi)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every answer's first token
    scores = first[:, [a[0] for a in enc.answer_ids]].clone()
    if not multi:
        return scores
    cache, b = out.past_key_values, batch["input_ids"].shape[0]
    for k, answer in enumerate(enc.answer_ids):
        if len(answer) == 1:
            continue
        fed = torch.tensor(answer[:-1], device=scores.device).expand(b, -1)  # predicts answer[1:]
        steps = torch.arange(1, len(answer), device=scores.device)
        past = cache if hasattr(cache, "crop") else copy.deepcopy(cache)
        o = model(input_ids=fed, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(fed)], 1),
                  position_ids=batch["position_ids"][:, -1:] + steps, past_key_values=past, use_cache=True)
        targets = torch.tensor(answer[1:], device=scores.device).expand(b, -1)
        logp = F.log_softmax(o.logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        scores[:, k] += logp.sum(-1)
        if past is cache:
            cache.crop(-fed.shape[1])  # drop the answer again: back to the prompt for the next one
    return scores


@torch.no_grad()
def score(model: nn.Module, enc: Encoded, prepared: Prepared, progress: bool = False,
          desc: str = "eval") -> torch.Tensor:
    """Scores ``(N, K)`` of the prepared examples, in dataset order, at the active sub-network."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in tqdm(prepared.batches, desc=desc, disable=not progress, leave=False):
            out.append(_forward_scores(model, enc, batch).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, enc.num_classes)
    return torch.cat(out)[prepared.restore]  # back to the order the examples were asked in


def metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits, labels)), "examples": int(len(labels))}


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
    device = device or next(model.parameters()).device
    prepared = prepare(enc, split, batch_size, limit, device=device)
    logits = score(model, enc, prepared, progress=progress, desc=f"eval {split}")
    out = metrics(logits, prepared.labels)
    if return_logits:
        out["logits"] = logits.numpy()
        out["labels"] = prepared.labels.numpy()
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
