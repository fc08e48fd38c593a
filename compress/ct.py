"""Compressed checkpoints in the **compressed-tensors** format (what transformers and vLLM load).

- Integer layers: ``pack-quantized``, asymmetric group-wise INT4 / INT8 (``weight_packed`` int32,
  ``weight_scale``, ``weight_zero_point`` packed, ``weight_shape``), written by the
  ``compressed-tensors`` library itself from our integers, scales and zero points. A pruned
  weight is the integer ``z``, which dequantises to exactly 0, so sparsity survives inside, and
  no ``sparsity_config`` is written (vLLM refuses a non-empty one). ``quantization_config`` also
  says ``"dequantize": true``, which transformers reads as a loading option: compressed-tensors
  0.18 to 0.20.1 cannot run asymmetric packed zero points compressed in transformers (0.15 to
  0.17 can; measured), so a plain ``from_pretrained(folder)`` dequantises at load instead of
  failing. vLLM ignores the key and runs the packed integers.
- Floating-point sparse layers: ``sparse-bitmask`` (``compressed`` non-zero values, ``bitmask``
  one bit per position, ``row_offsets``, ``shape``), the layout compressed-tensors used up to
  0.14, written only on request. Version 0.15 removed its sparse decompression, transformers 5.x
  then *silently* re-initialises those weights, and vLLM refuses any ``sparsity_config``, so
  :func:`load_compressed` is the loader for them.

:func:`load_compressed` rebuilds a runnable ``transformers`` model from either (and from a plain
checkpoint): integer checkpoints go through transformers' own loader, bitmask layers are
expanded here.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from supernet.compress.quant import dequantize

WEIGHTS = "model.safetensors"
PACKED = "pack-quantized"
BITMASK = "sparse-bitmask"


@dataclass
class IntegerLayer:
    """One layer's integers on its frozen grid: ``W = scale * (q - zero)`` per group of inputs."""

    q: torch.Tensor  # uint8 (out, in), 0 .. 2^bits - 1
    scale: torch.Tensor  # (out, in / group_size)
    zero: torch.Tensor  # (out, in / group_size), integral values
    bits: int
    group_size: int


def _targets(names: list[str]) -> str:
    """One ``re:`` target matching exactly these module names (compressed-tensors applies ``re.match``)."""
    return "re:^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def write_integers(model: nn.Module, layers: Mapping[str, IntegerLayer], directory: Path) -> None:
    """Save ``model`` (a transformers model whose ``layers`` hold ``s (q - z)``) as ``pack-quantized``.

    The library attaches the scheme, takes our scales and zero points (signed, as it stores
    them internally), packs, saves and writes ``quantization_config`` into ``config.json``.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    for name in layers:  # the packer re-quantises s (q - z) / s: exact in fp32, not in a half type
        model.get_submodule(name).float()
    groups = {}
    for key in sorted({(lay.bits, lay.group_size) for lay in layers.values()}):
        names = [n for n, lay in layers.items() if (lay.bits, lay.group_size) == key]
        args = QuantizationArgs(num_bits=key[0], type="int", symmetric=False, strategy="group", group_size=key[1])
        groups[f"group_{len(groups)}"] = QuantizationScheme(targets=[_targets(names)], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups))
    for name, lay in layers.items():
        module = model.get_submodule(name)
        half = 2 ** (lay.bits - 1)
        with torch.no_grad():
            module.weight.copy_(dequantize(lay.q, lay.scale, lay.zero, lay.group_size))
            module.weight_scale.copy_(lay.scale.to(module.weight_scale.dtype))
            module.weight_zero_point.copy_((lay.zero - half).to(module.weight_zero_point.dtype))
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=PACKED)
    compressor.compress_model(model)
    model.save_pretrained(str(directory), safe_serialization=True)
    compressor.update_config(str(directory))
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    if qc.get("sparsity_config"):
        raise ValueError("compressed-tensors wrote a sparsity_config, which vLLM refuses")
    qc.pop("sparsity_config", None)
    qc["dequantize"] = True  # transformers' loading option (see the module docstring); vLLM ignores it
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_bitmask(model: nn.Module, masks: Mapping[str, torch.Tensor], directory: Path, structure: str) -> None:
    """Save ``model`` with ``masks``' layers as ``sparse-bitmask`` (values outside a mask must be 0)."""
    model.save_pretrained(str(directory), safe_serialization=True)
    path = directory / WEIGHTS
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    for name, mask in masks.items():
        w = state.pop(f"{name}.weight")
        if (w[~mask] != 0).any():
            raise ValueError(f"{name} has non-zero weights outside its mask")
        bits = np.packbits(mask.numpy(), axis=1, bitorder="little")
        counts = mask.sum(1).long()
        state[f"{name}.compressed"] = w[mask].contiguous()
        state[f"{name}.bitmask"] = torch.from_numpy(bits)
        state[f"{name}.row_offsets"] = torch.cumsum(counts, 0) - counts
        state[f"{name}.shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    save_file(state, str(path), metadata=meta)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    total = sum(m.numel() for m in masks.values())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": BITMASK, "quantization_status": "compressed",
        "config_groups": {}, "ignore": [],
        "sparsity_config": {"format": BITMASK, "targets": [_targets(list(masks))], "ignore": [],
                            "sparsity_structure": structure,
                            "global_sparsity": 1 - sum(int(m.sum()) for m in masks.values()) / total},
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _expand_bitmask(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key in [k for k in state if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        rows, cols = (int(v) for v in state.pop(f"{name}.shape"))
        mask = torch.from_numpy(np.unpackbits(state.pop(key).numpy(), axis=1, count=cols, bitorder="little")
                                .astype(bool))
        values = state.pop(f"{name}.compressed")
        state.pop(f"{name}.row_offsets", None)
        w = torch.zeros(rows, cols, dtype=values.dtype)
        w[mask] = values
        state[f"{name}.weight"] = w
    return state


def load_compressed(directory: str | Path, **kwargs) -> nn.Module:
    """A runnable ``transformers`` model from a compressed-tensors checkpoint written here.

    ``pack-quantized`` loads through transformers (dequantised to the checkpoint's float dtype);
    ``sparse-bitmask`` layers are expanded to dense weights with exactly their zeros; a checkpoint
    without ``quantization_config`` (pruned floats stored dense) is a plain ``from_pretrained``.
    ``kwargs`` go to ``from_pretrained``.
    """
    import transformers
    from transformers import AutoConfig, CompressedTensorsConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    qc = getattr(config, "quantization_config", None) or {}
    fmt = qc.get("format") if isinstance(qc, dict) else None
    cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    if not qc:
        return cls.from_pretrained(str(directory), **kwargs).eval()
    if fmt == PACKED:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": as intended
            warnings.filterwarnings("ignore", message=".*quantization_config.*", category=UserWarning)
            return cls.from_pretrained(str(directory), quantization_config=CompressedTensorsConfig(dequantize=True),
                                       **kwargs).eval()
    if fmt != BITMASK:
        raise ValueError(f"{str(directory)!r} is not a compressed-tensors checkpoint written by supernet "
                         f"(format {fmt!r})")
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        state = _expand_bitmask({k: f.get_tensor(k) for k in f.keys()})
    del config.quantization_config
    return cls.from_pretrained(None, config=config, state_dict=state, **kwargs).eval()
