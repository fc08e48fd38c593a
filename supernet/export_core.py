"""What every export format shares: the in-memory sub-network, verification, the manifest.

The formats (:mod:`supernet.export`, :mod:`supernet.export_peft`, :mod:`supernet.export_compressed`)
build on these: :func:`at_config` activates a configuration, :func:`merged_model` folds it into a
plain copy of the model, :func:`compare_outputs` checks an export against the super-network within
:data:`TOLERANCE`, and :func:`_manifest` / :func:`_write_meta` record what was written.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supernet import files, merges
from supernet.adapters import ElasticAdapter
from supernet.bases import FrozenBase, linear_weight, set_linear_weight
from supernet.errors import SupernetError
from supernet.export_folders import (
    MANIFEST,
    MARKER,
    check_export_target,
    staging_dir,
)
from supernet.network import SuperNetwork
from supernet.runfiles import write_json
from supernet.space import Config

SUBNET = "subnet.json"


FORMAT_VERSION = 1


FORMATS = ("merged", "peft", "compressed")


ADAPTER_NAME = "default"


# Verification: max |exported - super-network| over all outputs (logits) must be
# <= TOLERANCE[dtype] * max(1, max |reference|): in fp32 an absolute 1e-4 for logits up to 1 in size, relative beyond.
# The half-precision bounds are sanity bounds (about 10x what realistic adapters give on tiny models: merging rounds
# W + Delta W to the half type once); the exact check is an fp32 export.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


DROPPED_INPUTS = ("labels", "label")


Batch = Mapping[str, torch.Tensor]


def merge_into(adapter: ElasticAdapter, layer: nn.Module) -> None:
    """Put the adapter's :meth:`~supernet.adapters.ElasticAdapter.merged_weight` into ``layer`` (a
    copy of its base layer): ``W + delta`` at the active choice, through the base's transform when
    the run trained that way, so a pruned base keeps its zeros and a QA-SparsePEFT base its grid.
    Every adapter kind merges this way: its update comes from its ``delta_weight``."""
    w = adapter.merged_weight().detach()
    if w.shape != linear_weight(layer).shape:
        raise SupernetError(f"merged weight of shape {tuple(w.shape)} does not fit {tuple(linear_weight(layer).shape)}")
    set_linear_weight(layer, w)


merge_lora = merge_into  # the name before adapter kinds had one interface


@contextmanager
def at_config(net: SuperNetwork, config: Mapping[str, object]) -> Iterator[Config]:
    """Activate ``config`` in eval mode; restore every adapter's choice and the train flag afterwards."""
    config = net.space.validate(config)
    previous = net.active_config()
    training = net.model.training
    try:
        net.activate(config)
        net.model.eval()
        yield config
    finally:
        net.activate(previous)
        net.model.train(training)


def base_model_copy(net: SuperNetwork) -> nn.Module:
    """A deep copy of ``net.model`` with every adapter replaced by (a copy of) its frozen ``.base`` layer.

    That is the original model (with the trained head). The adapters' factors are never copied:
    each adapter is pre-seeded in ``deepcopy``'s memo with the copy of its base.
    """
    memo: dict[int, Any] = {}
    for adapter in net.adapters.values():
        memo[id(adapter)] = copy.deepcopy(adapter.base.layer, memo)
    model = copy.deepcopy(net.model, memo)
    net.strip_masks(model)  # the elastic-width masks are the super-network's, not the copy's
    return model


def cut_base_copy(net: SuperNetwork, config: Mapping[str, object]) -> nn.Module:
    """:func:`base_model_copy`, cut to ``config``'s widths and heads (elastic width); the base
    model itself without them."""
    model = base_model_copy(net)
    if net.width is not None and net.cuts(config):
        from supernet.width import cut_model

        cut_model(model, net.width, net.space.validate(config))
    return model


def _check_finite(what: str, name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise SupernetError(f"{what} of {name!r} has NaN or inf values; refusing to export")


def _top_level(names: Sequence[str]) -> list[str]:
    """Drop names that lie inside another name of the list."""
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _check_heads(net: SuperNetwork, model: nn.Module) -> list[str]:
    """The trained head modules (top level only), after checking that their values are finite."""
    heads = _top_level(net.head_modules)
    for head in heads:
        for pname, p in model.get_submodule(head).named_parameters():
            _check_finite("head weight", f"{head}.{pname}", p)
    return heads


def merged_model(net: SuperNetwork, config: Mapping[str, object]) -> nn.Module:
    """A plain copy of the model with every adapter folded into its base weight at ``config``.

    The super-network is left as it was. Raises ``SupernetError`` if a merged weight is not finite.
    """
    with at_config(net, config) as config:
        model = base_model_copy(net)
        replaced = {}  # layers a kind ships in place of its weight (JACTUS' factors)
        for name, adapter in net.adapters.items():
            layer = model.get_submodule(name)
            replaced[name] = adapter.export_layer(layer)
            if replaced[name] is None:
                merge_into(adapter, layer)
            for pname, p in (replaced[name] or layer).named_parameters():
                _check_finite("merged weight", f"{name}.{pname}", p)
        if net.width is not None:  # elastic width: the kept rows and columns only, in a stock config
            from supernet.width import cut_model

            cut_model(model, net.width, config)
        if any(replaced.values()):  # the registered variant that builds the factored layers
            from supernet.cut_models import install_factored

            install_factored(model, {n: m for n, m in replaced.items() if m is not None})
    _check_heads(net, model)
    return model.eval()


def _outputs(out: Any) -> torch.Tensor:
    """The logits (or hidden states) of a model's output, as a CPU fp32 tensor."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu()
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].detach().float().cpu()
    raise SupernetError(f"cannot read logits from a model output of type {type(out).__name__}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _prepare_batches(net: SuperNetwork, batches: Sequence[Batch] | None) -> list[dict[str, torch.Tensor]]:
    """Model inputs to verify on; without any, two seeded random token sequences over the vocabulary."""
    if batches is None:
        vocab = getattr(getattr(net.model, "config", None), "vocab_size", None)
        if not vocab:
            raise SupernetError("pass input batches to verify the export on (the model has no vocab_size)")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(vocab), (2, 16), generator=gen)
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    out = []
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise SupernetError(f"a verification batch must be a mapping of model inputs, got {type(batch).__name__}")
        out.append({k: v for k, v in batch.items() if k not in DROPPED_INPUTS and isinstance(v, torch.Tensor)})
    if not out:
        raise SupernetError("no input batches to verify the export on")
    return out


def _run(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    device = _device(model)
    with torch.no_grad():
        return [_outputs(model(**{k: v.to(device) for k, v in b.items()})) for b in batches]


def reference_outputs(net: SuperNetwork, config: Mapping[str, object], batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The super-network's outputs at ``config`` (its state is restored afterwards)."""
    with at_config(net, config):
        outs = _run(net.model, batches)
    if not all(torch.isfinite(o).all() for o in outs):
        raise SupernetError("the super-network's outputs at this config are not finite; refusing to export")
    return outs


def compare_outputs(
    model: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor], dtype: torch.dtype, what: str
) -> dict[str, float]:
    """Max |model - reference| over all batches; ``SupernetError`` beyond the tolerance of ``dtype``."""
    outs = _run(model.eval(), batches)
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    tol = TOLERANCE.get(dtype, max(TOLERANCE.values())) * scale
    diff = 0.0
    for out, ref in zip(outs, reference, strict=True):
        if out.shape != ref.shape:
            raise SupernetError(
                f"the {what} export gives outputs of shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
            )
        d = float((out - ref).abs().max())
        diff = d if math.isnan(d) else max(diff, d)
        if math.isnan(diff):
            break
    if not diff <= tol:
        hint = "" if dtype in (torch.float32, torch.float64) else " (an fp32 super-network gives a tight check)"
        raise SupernetError(f"the {what} export differs from the super-network: max |diff| {diff:.3g} > {tol:.3g}"
                            + hint)
    return {"max_abs_diff": diff, "tolerance": tol, "batches": len(batches), "dtype": str(dtype).replace("torch.", "")}


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _manifest(fmt: str, net: SuperNetwork, config: Config, shipped: int, verification: dict, macs: int | None,
              metadata: Mapping[str, Any] | None, layers: Mapping[str, dict] | None = None,
              directory: Path | None = None) -> dict:
    base = getattr(getattr(net.model, "config", None), "_name_or_path", None) or None
    data = {
        MARKER: FORMAT_VERSION,
        "format": fmt,
        "config": dict(config),
        "base_model": base,
        "architecture": type(net.model).__name__,
        "scaling": net.config.scaling,
        "alpha": net.config.alpha,
        "max_rank": net.config.max_rank,
        "trainable_params": int(net.trainable_params(config)),
        "shipped_params": int(shipped),
        "verification": verification,
        "versions": _versions(),
        "metadata": dict(metadata or {}),
    }
    if macs is not None:
        data["macs"] = int(macs)
    if layers is not None:
        data["layers"] = dict(layers)
        data["adapted_layers"] = {
            "params": sum(v["params"] for v in layers.values()), "bytes": sum(v["bytes"] for v in layers.values()),
            "sparsity": 1 - sum(v["nonzeros"] for v in layers.values()) / sum(v["numel"] for v in layers.values()),
        }
    if directory is not None:
        data["size_on_disk"] = {p.name: p.stat().st_size for p in sorted(directory.glob("*.safetensors"))}
    return data


def shipped_layers(net: SuperNetwork, model: nn.Module, fmt: str,
                   config: Mapping[str, object] | None = None) -> dict[str, dict]:
    """Per adapted layer of an exported model: its weight's sparsity, bits, group size, parameters
    and bytes as stored in ``fmt`` (``merged``: dense floats; ``compressed``: see compress.ct)."""
    out = {}
    cuts = net.cuts(config)
    for name, adapter in net.adapters.items():
        base: FrozenBase = (adapter.cut(*cuts[name]) if name in cuts else adapter).base
        layer = model.get_submodule(name)
        if hasattr(layer, "factored_row"):  # a factored layer (JACTUS)
            out[name] = layer.factored_row()
            continue
        w = linear_weight(layer).detach()
        nonzeros, numel = int((w != 0).sum()), w.numel()
        row = {"shape": list(w.shape), "numel": numel, "nonzeros": nonzeros, "sparsity": 1 - nonzeros / numel,
               "bits": None, "group_size": None, "params": numel, "bytes": numel * w.element_size()}
        if fmt == "compressed":
            row.update({"bits": base.bits, "group_size": base.group_size,
                        "params": nonzeros if base.mask() is not None else numel,
                        "bytes": base.weight_bytes() if base.bits is not None or base.mask() is not None
                        else row["bytes"]})
        elif merges.stores_integers(adapter.merge, base.bits is not None):
            row["grid_bits"] = base.bits  # floats that are exactly s (q - z)
        out[name] = row
    return out


def _write_meta(directory: Path, manifest: dict) -> None:
    """``subnet.json``, then ``manifest.json`` last: it lists every file of the export with its size
    and SHA-256 (what a later ``--overwrite`` may replace) and marks the folder as complete."""
    write_json(directory / SUBNET, manifest["config"])
    manifest["files"] = files.fingerprints(directory, [n for n in files.tree(directory) if n != MANIFEST])
    write_json(directory / MANIFEST, manifest)


def _check_meta(macs: int | None, metadata: Mapping[str, Any] | None) -> None:
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, int) or macs < 0):
        raise SupernetError(f"macs must be a non-negative integer, got {macs!r}")
    try:
        json.dumps(dict(metadata or {}))
    except (TypeError, ValueError):
        raise SupernetError("export metadata must be a JSON-serialisable mapping") from None


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _safetensors_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _checked(net: SuperNetwork, config: Mapping[str, object], out_dir, batches, macs, metadata,
             overwrite: bool) -> tuple[Config, Path, list]:
    """What both exports check before any work: the config, the metadata, the target folder and
    the verification inputs."""
    config = net.space.validate(config)
    _check_meta(macs, metadata)
    target = check_export_target(out_dir, overwrite, "export folder")
    return config, target, _prepare_batches(net, batches)


def _save(model: nn.Module, tokenizer: Any, staging: Path) -> None:
    model.save_pretrained(str(staging), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))


def check_format(net: SuperNetwork, fmt: str) -> None:
    """Refuse, in one line, a format this super-network cannot produce faithfully (the merge
    rules are :func:`supernet.merges.check_format`'s)."""
    compressed_base = any(a.base.compressed for a in net.adapters.values())
    merges.check_format(fmt, net.config.merge, compressed_base)
    if fmt == "compressed":
        conv = [n for n, a in net.adapters.items() if not isinstance(a.base.layer, nn.Linear)]
        if conv:
            raise SupernetError(f"--format compressed stores nn.Linear layers only; {conv[0]} is a "
                                f"{type(net.adapters[conv[0]].base.layer).__name__}")


@dataclass
class Staged:
    """One format's export, prepared in memory: how it writes itself into a folder, how the written
    folder is checked against the reference outputs (``verify(folder, inputs, reference)`` gives
    the measured differences), and what it ships."""

    write: Callable[[Path], None]
    verify: Callable[[Path, list, list], dict]
    shipped: Callable[[Path], int]
    layers: dict[str, dict] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Prepare = Callable[[SuperNetwork, Config, Any], Staged]


def export_format(fmt: str, net: SuperNetwork, config: Mapping[str, object], out_dir, prepare: Prepare, *,
                  batches: Sequence[Batch] | None = None, tokenizer: Any = None, macs: int | None = None,
                  metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict:
    """The one template every format follows: refuse what the run cannot produce, check the inputs
    and the target, compute the super-network's reference outputs, let the format build its model
    (``prepare(net, config, tokenizer) -> Staged``; it refuses a non-finite weight, naming the
    module, before anything runs), write it into a staging
    folder, verify the written folder, write ``subnet.json`` and ``manifest.json`` last, and swap
    the folder into ``out_dir`` atomically (:func:`~supernet.export_folders.staging_dir`); a failure
    at any step leaves nothing behind. Returns the manifest.

    Args:
        batches: verification inputs (default: two small batches of token ids).
        tokenizer: saved beside the model when given.
        macs: the sub-network's MACs, recorded in the manifest.
        metadata: JSON recorded in the manifest (the search's accuracy, say).
        overwrite: replace an earlier export of ours at ``out_dir``.
    """
    check_format(net, fmt)
    config, target, inputs = _checked(net, config, out_dir, batches, macs, metadata, overwrite)
    staged = prepare(net, config, tokenizer)
    reference = reference_outputs(net, config, inputs)
    with staging_dir(target) as staging:
        staged.write(staging)
        verification = staged.verify(staging, inputs, reference)
        manifest = _manifest(fmt, net, config, staged.shipped(staging), verification, macs, metadata, staged.layers,
                             staging)
        manifest.update(staged.extra)
        _write_meta(staging, manifest)
    return manifest
