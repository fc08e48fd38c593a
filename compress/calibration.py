"""Calibration statistics of target layers' inputs, gathered by forward hooks.

Any Hugging Face model: the layers are given by name (found by pattern, never by attribute
path). Memory is bounded: each layer keeps a running sum of ``(in,)`` (squared norms), never
the activations. Padding tokens are left out when the batch carries an ``attention_mask``.

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

import torch
from torch import nn
from tqdm.auto import tqdm


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
