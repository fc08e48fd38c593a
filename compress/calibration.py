"""Calibration statistics of target layers' inputs, gathered by forward hooks.

Any Hugging Face model: the layers are given by name (found by pattern, never by attribute
path). Memory is bounded: each layer keeps a running sum of ``(in,)`` (squared norms), never
the activations. Padding tokens are left out when the batch carries an ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
