"""The search's engine: score many sub-networks of one super-network, cheaply.

The model is loaded once and the evaluation examples are tokenised, length-sorted, padded
and moved to the device once (:func:`supernet.tasks.prepare`); a configuration then costs one
``activate`` plus the forward passes. Uses the GPU when there is one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

from supernet.network import SuperNetwork
from supernet.tasks import Encoded, metrics, prepare, score


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Evaluator:
    """``evaluator(config) -> {"accuracy", "loss"}`` on a fixed set of examples.

    Args:
        net: the super-network (weights loaded); moved to ``device`` and put in eval mode.
        enc: the tokenised splits.
        split: which split to score.
        samples: its first ``samples`` examples (the splits are a fixed shuffle), or all.
        batch_size: examples per forward pass.
        seq_len: the sequence length MACs and latency are reported for.
        latency_batch: batch size of the latency measurement.
    """

    def __init__(self, net: SuperNetwork, enc: Encoded, split: str = "validation", samples: int | None = None,
                 batch_size: int = 64, device: torch.device | str | None = None, seq_len: int = 64,
                 latency_batch: int = 16) -> None:
        self.net, self.enc, self.split = net, enc, split
        self.device = torch.device(device) if device is not None else default_device()
        self.seq_len, self.latency_batch = seq_len, latency_batch
        net.model.to(self.device).eval()
        self.prepared = prepare(enc, split, batch_size, limit=samples, device=self.device)

    @property
    def examples(self) -> int:
        return self.prepared.examples

    def scores(self, config: Mapping[str, object]) -> torch.Tensor:
        """Logits (or answer scores) ``(N, K)`` of the prepared examples at ``config``."""
        self.net.activate(config)
        with self.net.merged():  # the forward then costs exactly the base model's
            return score(self.net.model, self.enc, self.prepared)

    def __call__(self, config: Mapping[str, object]) -> dict[str, float]:
        out = metrics(self.scores(config), self.prepared.labels)
        return {"accuracy": out["accuracy"], "loss": out["loss"]}

    def cost(self, config: Mapping[str, object]) -> dict[str, float]:
        """Cheap metrics, no forward pass: MACs per sequence of ``seq_len`` tokens (non-zeros of a
        pruned base), the parameters a sub-network ships on top of the base (adapters + head; an
        update folded into a sparse or quantised base ships none), and its deployed size in bytes
        (bases at their precision and sparsity)."""
        return {"macs": float(self.net.macs(config, self.seq_len)), "params": float(self.net.shipped_params(config)),
                "size": float(self.net.size(config))}

    @torch.no_grad()
    def latency(self, config: Mapping[str, object], repeats: int = 5) -> float:
        """Median seconds of one forward pass of ``latency_batch`` sequences of ``seq_len`` tokens
        on this device (one warm-up pass first).

        Of the sub-adapter served as it is (unmerged), or, under elastic width, of the physically
        cut model that ``supernet export`` writes (adapters merged): the narrowing only pays there."""
        self.net.activate(config)
        model = self.net.model
        if self.net.width is not None:
            from supernet.export_core import merged_model

            model = merged_model(self.net, config)
        # Token ids drawn (seeded) from the model's own vocabulary: the cost of a forward pass does not
        # depend on which tokens it sees, but an id past the embedding table would fail.
        vocab = self.net.model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (self.latency_batch, self.seq_len), generator=gen).to(self.device)
        mask = torch.ones_like(ids)
        times = []
        for i in range(repeats + 1):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        return statistics.median(times)


@torch.no_grad()
def compare_speed(model: torch.nn.Module, original: torch.nn.Module, batch: int, seq_len: int,
                  repeats: int = 5) -> dict[str, float]:
    """Median seconds of one forward pass of ``batch`` sequences of ``seq_len`` tokens of ``model``
    and of ``original``, timed alternately (one warm-up each) so that both see the same machine
    load; and the speed-up ``original / model``."""
    vocab = min(m.get_input_embeddings().num_embeddings for m in (model, original))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(repeats + 1):
        for k, m in enumerate((model, original)):
            start = time.perf_counter()
            m(**inputs)
            if i:
                times[k].append(time.perf_counter() - start)
    a, b = statistics.median(times[0]), statistics.median(times[1])
    return {"seconds": a, "original_seconds": b, "speedup": b / a}
