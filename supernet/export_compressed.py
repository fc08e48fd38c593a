"""``--format compressed``: a SparsePEFT / QA-SparsePEFT run merged and stored compressed
(compressed-tensors: integers ``pack-quantized``, pruned floats ``sparse-bitmask``).
"""

from __future__ import annotations

import copy
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


def export_compressed(net: SuperNetwork, config: Mapping[str, object], out_dir: str | os.PathLike,
                      **options: Any) -> dict:
    """Save the sub-network at ``config`` merged and compressed (compressed-tensors format).

    QA-SparsePEFT layers are stored as the integers training evaluated (``pack-quantized``);
    SparsePEFT layers on a floating-point pruned base as ``sparse-bitmask``. Verified before it is
    renamed into ``out_dir``: reloaded (:func:`supernet.compress.load_compressed`), every adapted
    weight equals the merged model's bit for bit and the outputs match the super-network's.
    The manifest records per layer its sparsity, bits, group size, parameters and bytes, and the
    files' size on disk.
    """
    return export_format("compressed", net, config, out_dir, _prepare_compressed, **options)


def _prepare_compressed(net: SuperNetwork, config: Config, tokenizer: Any) -> Staged:
    from supernet.compress.ct import write_bitmask, write_integers

    model = merged_model(net, config)
    if model.config.model_type.startswith("supernet-cut-"):
        raise SupernetError("--format compressed stores stock architectures only; this sub-network's widths differ "
                            "per block (or cut a BERT's heads): use --format merged or peft")
    integers, masks = _compressed_payload(net, model, config)
    if integers and masks:
        raise SupernetError("cannot store integer and floating-point pruned layers in one compressed checkpoint")
    dtype = _dtype(model)
    layers = shipped_layers(net, model, "compressed", config)
    shipped = _num_params(model)
    check = copy.deepcopy(model)
    held = [model]
    del model

    def write(staging: Path) -> None:
        model = held.pop()
        if integers:
            write_integers(model, integers, staging)
        else:
            write_bitmask(model, masks, staging, net_structure(net))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))

    extra = {"compressed_format": "pack-quantized" if integers else "sparse-bitmask",
             "loader": ("transformers: from_pretrained(dir, quantization_config=CompressedTensorsConfig("
                        "dequantize=True)), or supernet.compress.load_compressed(dir)" if integers
                        else "supernet.compress.load_compressed(dir)")}
    return Staged(write=write,
                  verify=lambda d, x, ref: verify_compressed(d, check, list(net.adapters), x, ref, dtype),
                  shipped=lambda d: shipped, layers=layers, extra=extra)


def net_structure(net: SuperNetwork) -> str:
    """The sparsity structure the bases were pruned with (``unstructured``, ``2:4``, ...)."""
    patterns = {a.base.pattern for a in net.adapters.values() if a.base.pattern is not None}
    return patterns.pop() if len(patterns) == 1 else "unstructured"
