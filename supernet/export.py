"""Export one sub-network of a super-network as a deployable model (``docs/METHODS.md`` section 4).

Three formats, all written from a :class:`~supernet.network.SuperNetwork` and a configuration
``{group: rank}``:

- ``merged``: a plain ``transformers`` model whose target layers hold ``W + Delta W`` at the
  configuration (``Delta W`` from each adapter's ``delta_weight()``), saved with
  ``save_pretrained``; ``AutoModelFor*.from_pretrained`` loads it without this package.
- ``peft``: the sub-adapter as a standard PEFT LoRA adapter (``adapter_config.json`` with
  per-module ``rank_pattern`` / ``alpha_pattern`` and ``adapter_model.safetensors`` with the
  sliced factors and the trained head) that stock ``PeftModel.from_pretrained`` loads.
- ``compressed``: a run trained with ``--adapter-merge sparse`` or ``qa-sparse`` merged and
  stored compressed in the compressed-tensors format (:mod:`supernet.compress.ct`): integer
  layers ``pack-quantized`` (the very integers training evaluated), floating-point pruned
  layers ``sparse-bitmask``.

A merged export keeps what the run trained for: a SparsePEFT run's zeros (exactly the base's),
a QA-SparsePEFT run's grid (every weight ``s (q - z)``). A plain run over a compressed base
merges densely, as any LoRA would: its manifest says so (``sparsity`` per layer).

Every export verifies itself before it succeeds: the written directory is reloaded with
stock ``transformers`` / ``peft`` and its outputs on a few input batches are compared with the
super-network's at the configuration. Exports are written into a temporary sibling directory
and renamed into place at the end, so a failed export leaves nothing behind; ``manifest.json``
marks a directory as an export of ours, and only such a directory is ever replaced.

Every adapter kind plugs in through its own interface (:mod:`supernet.adapters.base`): the
merged formats fold ``merged_weight()`` into a copy of the base layer, the PEFT format asks
``lora_factors()`` (a kind that cannot be written as LoRA says so).

This module holds the merged format and :func:`export`, and re-exports the whole export API;
the rest lives beside it: :mod:`supernet.export_core` (what every format shares: the
sub-network in memory, verification, the manifest), :mod:`supernet.export_peft`,
:mod:`supernet.export_compressed` and :mod:`supernet.export_folders` (staging and replacing
an export folder).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supernet.adapters import ElasticAdapter, LoraFactors  # noqa: F401
from supernet.errors import SupernetError
from supernet.export_compressed import (  # noqa: F401 (the export API is importable from here)
    export_compressed,
    net_structure,
    verify_compressed,
)
from supernet.export_core import (  # noqa: F401
    ADAPTER_NAME,
    DROPPED_INPUTS,
    FORMAT_VERSION,
    FORMATS,
    SUBNET,
    TOLERANCE,
    Batch,
    Staged,
    _checked,
    _device,
    _dtype,
    _manifest,
    _num_params,
    _save,
    _write_meta,
    at_config,
    base_model_copy,
    check_format,
    compare_outputs,
    export_format,
    merge_into,
    merge_lora,
    merged_model,
    reference_outputs,
    shipped_layers,
)
from supernet.export_folders import (  # noqa: F401
    MANIFEST,
    MARKER,
    check_export_target,
    foreign_entries,
    read_manifest,
    staging_dir,
)
from supernet.export_peft import (  # noqa: F401
    SCALE_RTOL,
    check_peft_layers,
    export_peft,
    lora_config,
    pattern_keys,
    peft_factors,
    peft_model,
    target_modules_spec,
    verify_peft,
)
from supernet.network import SuperNetwork
from supernet.space import Config


def _auto_class(model: nn.Module):
    """The ``AutoModelFor*`` class that maps this model's config to its class (else the class itself)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        PreTrainedModel,
    )

    if not isinstance(model, PreTrainedModel):
        raise SupernetError(f"a merged export needs a transformers model, not {type(model).__name__}")
    autos = (AutoModelForSequenceClassification, AutoModelForCausalLM, AutoModelForTokenClassification,
             AutoModelForQuestionAnswering, AutoModelForMaskedLM, AutoModel)
    for auto in autos:
        try:
            if auto._model_mapping[type(model.config)] is type(model):
                return auto
        except (KeyError, AttributeError, ValueError):
            continue
    return type(model)


def verify_merged(directory: Path, model_class, expected_keys: set[str], device: torch.device, dtype: torch.dtype,
                  batches: Sequence[Batch], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """Reload a merged export with plain ``transformers`` and compare it with the super-network."""
    loaded, info = model_class.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise SupernetError(f"the merged export reloads with {kind.replace('_', ' ')}: {sorted(info[kind])[:3]}")
    keys = set(loaded.state_dict())
    if keys != expected_keys:  # no adapter parameter (lora_A, ...) and none of the original's missing
        odd = sorted(keys ^ expected_keys)[:3]
        raise SupernetError(f"the merged export does not have the original model's weights (e.g. {odd})")
    return compare_outputs(loaded.to(device), batches, reference, dtype, "merged")


def export_merged(net: SuperNetwork, config: Mapping[str, object], out_dir: str | os.PathLike, **options: Any) -> dict:
    """Save the sub-network at ``config`` as a plain ``transformers`` model with the adapters merged.

    Verified before it is renamed into ``out_dir``: reloaded with ``AutoModelFor*.from_pretrained``
    (no missing or extra keys, no adapter modules), its outputs on ``batches`` (default: two
    seeded random sequences) must match the super-network's within :data:`TOLERANCE`.
    Also writes ``subnet.json`` and ``manifest.json``; returns the manifest.
    """
    return export_format("merged", net, config, out_dir, _prepare_merged, **options)


def _prepare_merged(net: SuperNetwork, config: Config, tokenizer: Any) -> Staged:
    held = [merged_model(net, config)]  # released once written: verification reloads from disk
    model = held[0]
    model_class = _auto_class(model)
    device, dtype = _device(model), _dtype(model)
    keys, shipped = set(model.state_dict()), _num_params(model)
    layers = shipped_layers(net, model, "merged", config)
    extra = {}
    if net.width is not None:  # elastic width: say how the cut model loads
        from supernet.cut_models import PREFIX

        stock = not model.config.model_type.startswith(PREFIX)
        extra["width"] = {"stock_config": stock, "config": {k: getattr(model.config, k, None) for k in (
            "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")},
            "load": f"{model_class.__name__}.from_pretrained(folder)" if stock else
            f"import supernet.cut_models, then {model_class.__name__}.from_pretrained(folder) (per-block shapes in "
            "config.json cut_shapes)"}
    factored = getattr(model.config, "factored_shapes", None)
    if factored:  # JACTUS: each adapted layer ships as two factors
        extra["factored"] = {"layers": len(factored), "weights": sum(r * (o + i) for o, r, i in factored.values()),
                             "original_weights": sum(o * i for o, _, i in factored.values()),
                             "load": f"import supernet.cut_models, then {model_class.__name__}.from_pretrained(folder) "
                                     "(factored_shapes in config.json)"}
    del model
    return Staged(write=lambda d: _save(held.pop(), tokenizer, d),
                  verify=lambda d, x, ref: verify_merged(d, model_class, keys, device, dtype, x, ref),
                  shipped=lambda d: shipped, layers=layers, extra=extra)


def export(net: SuperNetwork, config: Mapping[str, object], out_dir: str | os.PathLike, fmt: str = "merged",
           **kwargs: Any) -> dict:
    """``export_merged``, ``export_peft`` or ``export_compressed`` by name (``fmt`` in :data:`FORMATS`)."""
    if fmt == "merged":
        return export_merged(net, config, out_dir, **kwargs)
    if fmt == "peft":
        return export_peft(net, config, out_dir, **kwargs)
    if fmt == "compressed":
        return export_compressed(net, config, out_dir, **kwargs)
    raise SupernetError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")

