"""``--format compressed``: a SparsePEFT / QA-SparsePEFT run merged and stored as stock loaders
and serving runtimes take it: integers ``pack-quantized`` (compressed-tensors, no
``sparsity_config``); pruned floats dense with their zeros, or ``sparse-bitmask`` on request
(``--sparse-storage bitmask``: only :func:`supernet.compress.load_compressed` reads it).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supernet import merges
from supernet.bases import linear_weight
from supernet.errors import SupernetError
from supernet.export_core import (
    Batch,
    Staged,
    _device,
    _dtype,
    _num_params,
    at_config,
    compare_outputs,
    export_format,
    merged_model,
    shipped_layers,
)
from supernet.network import SuperNetwork
from supernet.space import Config


def _compressed_payload(net: SuperNetwork, model: nn.Module, config: Config):
    """What the compressed format stores for each adapted layer: integers (QA-SparsePEFT) or a mask."""
    from supernet.compress.ct import IntegerLayer

    integers, masks = {}, {}
    with at_config(net, config):
        cuts = net.cuts(config)
        for name, adapter in net.adapters.items():
            adapter = adapter.cut(*cuts[name]) if name in cuts else adapter  # elastic width: the kept part
            base = adapter.base
            if merges.stores_integers(adapter.merge, base.bits is not None):
                q = base.integers(adapter.delta_weight().detach())
                integers[name] = IntegerLayer(q.cpu(), base.scale.cpu(), base.zero.cpu(), base.bits, base.group_size)
            elif base.mask() is not None:
                masks[name] = base.mask().cpu()
            else:  # a dense base (API only: the CLI refuses sparse without pruning)
                raise SupernetError(f"{name} has neither a mask nor integers to compress; use --format merged")
    return integers, masks


def verify_compressed(directory: Path, model: nn.Module, names: Sequence[str], batches: Sequence[Batch],
                      reference: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Reload with :func:`supernet.compress.load_compressed`; every adapted weight must equal the merged
    model's exactly (so the integers and zeros are the trained ones), the outputs the super-network's."""
    from supernet.compress.ct import load_compressed

    loaded = load_compressed(directory)
    for name in names:
        got = linear_weight(loaded.get_submodule(name))
        want = linear_weight(model.get_submodule(name))
        if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            raise SupernetError(f"the compressed export does not reproduce the weights of {name}")
    out = compare_outputs(loaded.to(_device(model)), batches, reference, dtype, "compressed")
    return {**out, "weights_exact": True}


SPARSE_STORAGE = ("dense", "bitmask")  # --sparse-storage, for pruned floating-point layers
LOADERS = {
    "pack-quantized": "transformers: AutoModel...from_pretrained(folder) (config.json asks it to dequantize at load); "
                      "vLLM: LLM(folder), the packed integers as they are",
    "dense": "transformers: AutoModel...from_pretrained(folder); vLLM: LLM(folder) (the zeros are kept as values)",
    "sparse-bitmask": "supernet.compress.load_compressed(folder) only: compressed-tensors >= 0.15 cannot decompress "
                      "it (transformers 5 re-initialises those weights) and vLLM refuses a sparsity_config",
}


def export_compressed(net: SuperNetwork, config: Mapping[str, object], out_dir: str | os.PathLike, *,
                      sparse_storage: str = "dense", **options: Any) -> dict:
    """Save the sub-network at ``config`` merged and compressed (compressed-tensors format).

    QA-SparsePEFT layers are stored as the integers training evaluated (``pack-quantized``);
    SparsePEFT layers on a floating-point pruned base as a standard dense checkpoint whose zeros
    are kept (``sparse_storage="dense"``), or as ``sparse-bitmask`` (``"bitmask"``). The manifest's
    ``loader`` says who loads it. Verified before it is
    renamed into ``out_dir``: reloaded (:func:`supernet.compress.load_compressed`), every adapted
    weight equals the merged model's bit for bit and the outputs match the super-network's.
    The manifest records per layer its sparsity, bits, group size, parameters and bytes, and the
    files' size on disk.
    """
    if sparse_storage not in SPARSE_STORAGE:
        raise SupernetError(f"unknown --sparse-storage {sparse_storage!r}; choose one of {', '.join(SPARSE_STORAGE)}")
    return export_format("compressed", net, config, out_dir,
                         functools.partial(_prepare_compressed, sparse_storage=sparse_storage), **options)


def _prepare_compressed(net: SuperNetwork, config: Config, tokenizer: Any, sparse_storage: str = "dense") -> Staged:
    from supernet.compress.ct import write_bitmask, write_integers

    model = merged_model(net, config)
    if model.config.model_type.startswith("supernet-cut-"):
        raise SupernetError("--format compressed stores stock architectures only; this sub-network's widths differ "
                            "per block (or cut a BERT's heads): use --format merged or peft")
    integers, masks = _compressed_payload(net, model, config)
    if integers and masks:
        raise SupernetError("cannot store integer and floating-point pruned layers in one compressed checkpoint")
    dtype = _dtype(model)
    storage = "pack-quantized" if integers else "sparse-bitmask" if sparse_storage == "bitmask" else "dense"
    layers = shipped_layers(net, model, "merged" if storage == "dense" else "compressed", config)
    shipped = _num_params(model)
    check = copy.deepcopy(model)
    held = [model]
    del model

    def write(staging: Path) -> None:
        model = held.pop()
        if integers:
            write_integers(model, integers, staging)
        elif storage == "sparse-bitmask":
            write_bitmask(model, masks, staging, net_structure(net))
        else:
            model.save_pretrained(str(staging), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    extra = {"compressed_format": storage, "loader": LOADERS[storage]}
    return Staged(write=write,
                  verify=lambda d, x, ref: verify_compressed(d, check, list(net.adapters), x, ref, dtype),
                  shipped=lambda d: shipped, layers=layers, extra=extra)


def net_structure(net: SuperNetwork) -> str:
    """The sparsity structure the bases were pruned with (``unstructured``, ``2:4``, ...)."""
    patterns = {a.base.pattern for a in net.adapters.values() if a.base.pattern is not None}
    return patterns.pop() if len(patterns) == 1 else "unstructured"
