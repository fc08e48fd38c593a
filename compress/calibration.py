"""Calibration statistics of target layers' inputs, gathered by forward hooks.

Any Hugging Face model: the layers are given by name (found by pattern, never by attribute
path). Memory is bounded: each layer keeps a running sum of ``(in,)`` (squared norms), never
the activations. Padding tokens are left out when the batch carries an ``attention_mask``.

:func:`layer_statistics` gathers more, for the subspace-aware adapter kinds (NoRA, JACTUS;
``docs/METHODS.md`` section 5), in the same bounded way: besides the squared input norms, the
input covariance ``C_x = E[x x^T]`` (``in x in``) from the same forward hooks, and the covariance
of the gradient at the layer's output ``C_g = E[g g^T]`` (``out x out``) from hooks on the output
tensors during a backward pass of the model's own loss (the batches then carry ``labels``).

Two orders (``--calibration-order``):

* :func:`input_sq_norms` alone, ``dense``: one pass over the unpruned model; every layer's
  statistics are those of the dense network.
* :func:`sequential_sq_norms`, ``sequential`` (the order of the reference Wanda, Sun et al. 2023,
  ``prune_wanda``): block by block, each block's statistics gathered with the blocks before it
  already pruned, so that a layer is scored on the inputs the pruned network will give it. It is
  generic: one full forward pass per block with hooks on that block's layers only (no per-
  architecture code, no cached hidden states), which costs ``blocks x`` the dense pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

#: What :func:`layer_statistics` can gather: squared input norms, input covariance, output-gradient covariance.
STATISTICS = ("input_sq_norms", "input_cov", "grad_cov")


@dataclass
class LayerStats:
    """One layer's calibration statistics, as sums over ``tokens`` real (non-padding) tokens (fp64).

    ``input_sq_norms``: ``sum_t x_tj^2`` ``(in,)``; ``input_cov``: ``sum_t x_t x_t^T`` ``(in, in)``;
    ``grad_cov``: ``sum_t g_t g_t^T`` ``(out, out)``, ``g_t`` the loss gradient at the output of
    token ``t``. What was not asked for is None.
    """

    tokens: int
    input_sq_norms: torch.Tensor | None = None
    input_cov: torch.Tensor | None = None
    grad_cov: torch.Tensor | None = None

    def input_scale(self) -> torch.Tensor:
        """The root mean square of each input feature over the tokens, ``(in,)``."""
        return (self.input_sq_norms / max(self.tokens, 1)).sqrt()

    def mean_input_cov(self) -> torch.Tensor:
        """``C_x = E[x x^T]``."""
        return self.input_cov / max(self.tokens, 1)

    def mean_grad_cov(self) -> torch.Tensor:
        """``C_g = E[g g^T]``."""
        return self.grad_cov / max(self.tokens, 1)


def layer_statistics(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
    statistics: Iterable[str] = ("input_sq_norms",), progress: bool = False,
) -> dict[str, LayerStats]:
    """The asked-for :data:`STATISTICS` of every layer, streamed over ``batches`` (running sums of
    fixed size: ``in``, ``in^2`` and ``out^2`` numbers per layer, never the activations).

    ``grad_cov`` runs a backward pass of the model's loss (``model(**batch).loss``, so the batches
    must carry ``labels``); the gradient reaches the layers' outputs because the input embeddings'
    output is made to require gradients (no weight gradient is computed; a model without
    ``get_input_embeddings`` has its target layers' parameters require gradients for the pass
    instead, restored afterwards). The model is in eval mode throughout (no dropout); any ``.grad``
    the pass leaves is dropped. Padding tokens are left out of every sum when the batch carries an
    ``attention_mask``.
    """
    wanted = set(statistics)
    unknown = sorted(wanted - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistic {unknown[0]!r}; choose from {', '.join(STATISTICS)}")
    grads = "grad_cov" in wanted
    stats = {name: LayerStats(0) for name in layers}
    keep: dict[str, torch.Tensor | None] = {"mask": None}

    def real_tokens(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, t.shape[-1])
        mask = keep["mask"]
        return t[mask] if mask is not None and mask.numel() == t.shape[0] else t

    def add(name: str, field: str, value: torch.Tensor) -> None:
        current = getattr(stats[name], field)
        setattr(stats[name], field, value if current is None else current + value)

    hooks = []
    for name, layer in layers.items():

        def pre_hook(mod, inputs, name=name):
            x = real_tokens(inputs[0].detach()).double()
            stats[name].tokens += x.shape[0]
            if "input_sq_norms" in wanted:
                add(name, "input_sq_norms", x.pow(2).sum(0))
            if "input_cov" in wanted:
                add(name, "input_cov", x.T @ x)

        def grad_hook(g, name=name):
            g = real_tokens(g.detach()).double()
            add(name, "grad_cov", g.T @ g)

        def post_hook(mod, inputs, output, name=name):
            if output.requires_grad:
                output.register_hook(lambda g, name=name: grad_hook(g, name))

        hooks.append(layer.register_forward_pre_hook(pre_hook))
        if grads:
            hooks.append(layer.register_forward_hook(post_hook))
    flags = {}
    embeddings = model.get_input_embeddings() if grads and hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:  # the activations carry the gradient: no weight gradient is formed
        hooks.append(embeddings.register_forward_hook(
            lambda mod, inputs, output: output.requires_grad_() if not output.requires_grad else None))
    elif grads:
        for layer in layers.values():
            for p in layer.parameters():
                flags.setdefault(p, p.requires_grad)
                p.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="calibration", unit="batch", disable=not progress, leave=False):
            inputs = {k: v for k, v in batch.items() if k != "labels" or grads}
            if grads and "labels" not in inputs:
                raise ValueError("the gradient covariance needs batches with labels")
            mask = inputs.get("attention_mask")
            keep["mask"] = mask.reshape(-1).bool() if mask is not None else None
            if grads:
                with torch.enable_grad():
                    model(**inputs).loss.backward()
            else:
                with torch.no_grad():
                    model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if grads:
            for p in model.parameters():
                p.grad = None
        model.train(was_training)
    missing = [n for n, s in stats.items() if s.tokens == 0]
    if missing:
        raise RuntimeError(f"layer {missing[0]!r} saw no calibration input")
    return stats


@torch.no_grad()
def input_sq_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """``{name: ||X_j||^2 over every calibration token}`` (fp64, shape ``(in,)``) and the token count.

    Args:
        model: the model to run (its forward takes the batches' keys).
        layers: the target layers by name; each must take ``(..., in)`` inputs.
        batches: model inputs; ``labels`` are dropped, ``attention_mask`` selects real tokens.
    """
    sums: dict[str, torch.Tensor] = {}
    keep: dict[str, torch.Tensor | None] = {"mask": None}
    hooks = []
    for name, layer in layers.items():

        def hook(mod, inputs, name=name):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            mask = keep["mask"]
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask]
            s = x.double().pow(2).sum(0)
            sums[name] = s if name not in sums else sums[name] + s

        hooks.append(layer.register_forward_pre_hook(hook))
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="calibration", unit="batch", disable=not progress, leave=False):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask = inputs.get("attention_mask")
            keep["mask"] = mask.reshape(-1).bool() if mask is not None else None
            tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if n not in sums]
    if missing:
        raise RuntimeError(f"layer {missing[0]!r} saw no calibration input")
    return sums, tokens


_BLOCK = re.compile(r"\.(\d+)\.")  # the first ``.<n>.`` of a name: ``bert.encoder.layer.3.attention...``


def blocks_in_order(names: Iterable[str]) -> list[list[str]]:
    """The names grouped by the numbered block they sit in, blocks in the order of their first
    name (the model's order when the names come from ``named_modules``); the names outside any
    numbered block (a targeted pooler or head) form one last group, as they run after the blocks.

    A block is named by its path up to its number (``model.layers.3``), so two stacks of blocks
    (an encoder and a decoder) stay apart.
    """
    blocks: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in names:
        m = _BLOCK.search(name)
        if m is None:
            rest.append(name)
        else:
            blocks.setdefault(name[: m.end() - 1], []).append(name)
    return list(blocks.values()) + ([rest] if rest else [])


@torch.no_grad()
def sequential_sq_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
    prune: Callable[[dict[str, torch.Tensor]], None], progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Wanda's block-by-block order: the squared input norms of every layer, each block's gathered
    on the model with the blocks before it already pruned.

    For each group of :func:`blocks_in_order`: one calibration pass over ``batches`` with hooks
    on that group's layers, then ``prune(norms of the group)``, which must prune those layers in
    place (and may undo it once this returns) before the next pass. Within a block every layer
    sees the unpruned block, as in the reference, where a block is pruned after its pass.

    Args:
        model, layers, batches: as for :func:`input_sq_norms`.
        prune: called once per group, in order, with ``{name: ||X_j||^2}`` of the group's layers.
        progress: a bar over the blocks.

    Returns:
        ``{name: ||X_j||^2}`` of every layer (fp64, shape ``(in,)``), as the calls to ``prune`` saw them.
    """
    batches = list(batches)
    norms: dict[str, torch.Tensor] = {}
    for group in tqdm(blocks_in_order(layers), desc="calibration (block by block)", unit="block",
                      disable=not progress, leave=False):
        sums, _ = input_sq_norms(model, {n: layers[n] for n in group}, batches)
        prune(sums)
        norms.update(sums)
    return norms
