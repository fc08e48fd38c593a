"""Importance re-ordering for elastic width: once, before training, every width becomes a prefix.

Neurons are scored by activation-weighted magnitude, ``mean|x_j| * ||W_down[:, j]||`` at the
down projection's input (the mean is over the calibration tokens, padding left out); heads by
the norm of their output, ``||W_o[:, h] ctx_h||`` summed over the tokens, and ranked within
their KV group. :func:`apply_order` permutes the dense frozen weights (before any pruning or
quantisation, so masks, scales and zero points are computed on the re-ordered weights and need
no permuting of their own); the permutation is saved with the run (:data:`ORDER_FILE`) and
applied again when the run is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from supernet.errors import SupernetError
from supernet.width import Block, find_blocks, head_rows

ORDER_FILE = "width_order.safetensors"


def save_order(path: str | Path, order: Mapping[str, torch.Tensor]) -> None:
    from supernet.runfiles import save_tensors

    save_tensors(Path(path), dict(order))


def load_order(path: str | Path, blocks: list[Block]) -> dict[str, torch.Tensor]:
    """The saved permutations, checked against the model's blocks (one clear error otherwise)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise SupernetError(f"{path} is missing: the run's width order cannot be rebuilt without it")
    try:
        order = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file is one clear line
        raise SupernetError(f"cannot read {path}: {e}") from None
    known = {b.down for b in blocks if b.has_ffn} | {b.o for b in blocks if b.has_attention}
    unknown = sorted(set(order) - known)
    if unknown:
        raise SupernetError(f"{path} orders {unknown[0]!r}, which is no block of this model")
    return order


@torch.no_grad()
def importance_order(model: nn.Module, blocks: list[Block], batches: Iterable[Mapping[str, torch.Tensor]],
                     widths: bool, heads: bool) -> dict[str, torch.Tensor]:
    """The permutation (most important first) of every block's neurons (key: the down projection's
    name) and heads (key: the O projection's name), from calibration batches on the dense model."""
    act: dict[str, torch.Tensor] = {}
    head_out: dict[str, torch.Tensor] = {}
    keep: dict[str, torch.Tensor | None] = {"mask": None}
    hooks = []

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        mask = keep["mask"]
        return x[mask] if mask is not None and mask.numel() == x.shape[0] else x

    for b in blocks:
        if widths and b.has_ffn:
            def ffn_hook(mod, args, name=b.down):
                s = rows_of(args[0]).abs().sum(0)
                act[name] = act.get(name, 0) + s
            hooks.append(model.get_submodule(b.down).register_forward_pre_hook(ffn_hook))
        if heads and b.has_attention:
            o = model.get_submodule(b.o)

            def head_hook(mod, args, name=b.o, block=b, o=o):
                x = rows_of(args[0])  # (tokens, heads * head_dim)
                w = o.weight.double()  # (hidden, heads * head_dim)
                norms = torch.stack([(x[:, h * block.head_dim:(h + 1) * block.head_dim]
                                      @ w[:, h * block.head_dim:(h + 1) * block.head_dim].T).norm(dim=1).sum()
                                     for h in range(block.heads)])
                head_out[name] = head_out.get(name, 0) + norms
            hooks.append(o.register_forward_pre_hook(head_hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
            mask = inputs.get("attention_mask")
            keep["mask"] = mask.reshape(-1).bool() if mask is not None else None
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    order: dict[str, torch.Tensor] = {}
    for b in blocks:
        if widths and b.has_ffn:
            w = model.get_submodule(b.down).weight.double()
            score = act[b.down] * w.norm(dim=0)
            order[b.down] = torch.argsort(score, descending=True, stable=True)
        if heads and b.has_attention:
            score = head_out[b.o]
            size = b.heads // b.kv_heads if b.grouped else b.heads
            perm = [g * size + int(j) for g in range(b.heads // size)
                    for j in torch.argsort(score[g * size:(g + 1) * size], descending=True, stable=True)]
            order[b.o] = torch.tensor(perm)
    return order


@torch.no_grad()
def _permute(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    w = layer.weight
    if rows is not None:
        w.copy_(w[rows])
        if layer.bias is not None:
            layer.bias.copy_(layer.bias[rows])
    if cols is not None:
        w.copy_(w[:, cols])


def apply_order(model: nn.Module, blocks: list[Block], order: Mapping[str, torch.Tensor]) -> None:
    """Permute the dense model's frozen weights by ``order`` (from :func:`importance_order`):
    neurons are rows of up / gate and columns of down; heads are ``head_dim`` rows of Q (and K, V
    without grouped-query attention) and columns of O. The model computes what it did."""
    for b in blocks:
        if b.has_ffn and b.down in order:
            perm = order[b.down]
            if sorted(perm.tolist()) != list(range(b.neurons)):
                raise SupernetError(f"the saved neuron order of {b.down!r} is not a permutation of {b.neurons}")
            for n in b.up:
                _permute(model.get_submodule(n), rows=perm)
            _permute(model.get_submodule(b.down), cols=perm)
        if b.has_attention and b.o in order:
            perm = order[b.o]
            if sorted(perm.tolist()) != list(range(b.heads)):
                raise SupernetError(f"the saved head order of {b.o!r} is not a permutation of {b.heads} heads")
            rows = head_rows(perm.tolist(), b.head_dim)
            for n in [b.q] + ([] if b.grouped else [b.k, b.v]):
                _permute(model.get_submodule(n), rows=rows)
            _permute(model.get_submodule(b.o), cols=rows)




def reorder(model: nn.Module, batches: Callable[[], list], widths: bool, heads: bool,
            run_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Order every block's neurons and heads by importance on ``batches()`` (or read the order a
    recorded run saved in ``run_dir``) and permute the dense weights; returns the order."""
    blocks = find_blocks(model)
    if run_dir is not None:
        order = load_order(Path(run_dir) / ORDER_FILE, blocks)
    else:
        order = importance_order(model, blocks, batches(), widths, heads)
    apply_order(model, blocks, order)
    return order
