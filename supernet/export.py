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

New adapter kinds plug in through two small registries keyed by adapter class:
:func:`register_merge` (fold the adapter into a copy of its base layer) and
:func:`register_peft` (express the adapter as plain LoRA factors, where possible).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from supernet import files
from supernet.adapters import ElasticAdapter, ElasticLoRA
from supernet.bases import FrozenBase, QuantizedBase, linear_weight, set_linear_weight
from supernet.errors import SupernetError
from supernet.export_folders import (  # noqa: F401 (re-exported: the export API)
    MANIFEST,
    MARKER,
    check_export_target,
    foreign_entries,
    read_manifest,
    staging_dir,
)
from supernet.network import SuperNetwork
from supernet.run import write_json
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
SCALE_RTOL = 1e-6  # PEFT's scaling of a module vs the adapter's trained scale
DROPPED_INPUTS = ("labels", "label")

Batch = Mapping[str, torch.Tensor]
MergeFn = Callable[[ElasticAdapter, nn.Module], None]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter as PEFT LoRA at the active choice: ``Delta W = scale * lora_B @ lora_A``.

    ``alpha`` is what PEFT needs in ``alpha_pattern`` so that its own scaling
    (``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``) equals ``scale``.
    """

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    alpha: float
    rslora: bool
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


PeftFn = Callable[[ElasticAdapter], LoraFactors]
MERGERS: dict[type, MergeFn] = {}
PEFT_EXPORTERS: dict[type, PeftFn] = {}


def register_merge(kind: type) -> Callable[[MergeFn], MergeFn]:
    """Decorator: ``fn(adapter, layer)`` folds an adapter of class ``kind`` into ``layer`` (a copy of its base)."""

    def deco(fn: MergeFn) -> MergeFn:
        MERGERS[kind] = fn
        return fn

    return deco


def register_peft(kind: type) -> Callable[[PeftFn], PeftFn]:
    """Decorator: ``fn(adapter) -> LoraFactors`` expresses an adapter of class ``kind`` as PEFT LoRA."""

    def deco(fn: PeftFn) -> PeftFn:
        PEFT_EXPORTERS[kind] = fn
        return fn

    return deco


def _lookup(registry: Mapping[type, Callable], adapter: ElasticAdapter, what: str) -> Callable:
    """The registry entry of the adapter's class or its nearest registered ancestor."""
    for kind in type(adapter).__mro__:
        if kind in registry:
            return registry[kind]
    raise SupernetError(f"cannot {what} adapters of kind {type(adapter).__name__}")


# --------------------------------------------------------------------------- adapter kinds
@register_merge(ElasticLoRA)
def merge_lora(adapter: ElasticAdapter, layer: nn.Module) -> None:
    """Put the adapter's :meth:`~supernet.adapters.ElasticAdapter.merged_weight` into ``layer`` (a
    copy of its base layer): ``W + delta`` at the active rank, through the base's transform when the
    run trained that way, so a pruned base keeps its zeros and a QA-SparsePEFT base its grid."""
    w = adapter.merged_weight().detach()
    if w.shape != linear_weight(layer).shape:
        raise SupernetError(f"merged weight of shape {tuple(w.shape)} does not fit {tuple(linear_weight(layer).shape)}")
    set_linear_weight(layer, w)


@register_peft(ElasticLoRA)
def lora_factors(adapter: ElasticLoRA) -> LoraFactors:
    """``A[:r]``, ``B[:, :r]`` and the alpha PEFT needs for the trained scale.

    ``lora`` (alpha/r) is PEFT's own scaling; ``rora`` (alpha/sqrt(r)) is rsLoRA; ``fixed``
    (alpha/r_max) becomes ``alpha' = alpha * r / r_max`` so that ``alpha' / r`` is the trained scale.
    """
    a, b = adapter.active_factors()
    r = adapter.active_rank
    mode = adapter.scaling_mode
    if mode == "fixed":
        alpha = adapter.alpha * r / adapter.max_rank
    elif mode in ("lora", "rora"):
        alpha = adapter.alpha
    else:
        raise SupernetError(f"cannot express scaling {mode!r} as PEFT LoRA")
    return LoraFactors(a.detach(), b.detach(), float(alpha), mode == "rora", float(adapter.scaling))


# --------------------------------------------------------------------------- in-memory models
@contextmanager
def at_config(net: SuperNetwork, config: Mapping[str, object]) -> Iterator[Config]:
    """Activate ``config`` in eval mode; restore every adapter's choice and the train flag afterwards."""
    config = net.space.validate(config)
    previous = {name: getattr(ad, "active_rank", None) for name, ad in net.adapters.items()}
    training = net.model.training
    try:
        net.activate(config)
        net.model.eval()
        yield config
    finally:
        for name, choice in previous.items():
            if choice is not None:
                net.adapters[name].set_active(choice)
        net.model.train(training)


def base_model_copy(net: SuperNetwork) -> nn.Module:
    """A deep copy of ``net.model`` with every adapter replaced by (a copy of) its frozen ``.base`` layer.

    That is the original model (with the trained head). The adapters' factors are never copied:
    each adapter is pre-seeded in ``deepcopy``'s memo with the copy of its base.
    """
    memo: dict[int, Any] = {}
    for adapter in net.adapters.values():
        memo[id(adapter)] = copy.deepcopy(adapter.base.layer, memo)
    return copy.deepcopy(net.model, memo)


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
    with at_config(net, config):
        model = base_model_copy(net)
        for name, adapter in net.adapters.items():
            layer = model.get_submodule(name)
            _lookup(MERGERS, adapter, "merge")(adapter, layer)
            _check_finite("merged weight", name, layer.weight)
    _check_heads(net, model)
    return model.eval()


def peft_factors(net: SuperNetwork, config: Mapping[str, object]) -> dict[str, LoraFactors]:
    """Every adapter as PEFT LoRA factors at ``config`` (detached copies), checked finite."""
    with at_config(net, config):
        factors = {}
        for name, adapter in net.adapters.items():
            f = _lookup(PEFT_EXPORTERS, adapter, "export to PEFT")(adapter)
            factors[name] = LoraFactors(f.lora_A.clone(), f.lora_B.clone(), f.alpha, f.rslora, f.scale)
            _check_finite("adapter factor lora_A", name, f.lora_A)
            _check_finite("adapter factor lora_B", name, f.lora_B)
    if len({f.rslora for f in factors.values()}) > 1:
        raise SupernetError("cannot export adapters that mix rsLoRA and plain LoRA scaling to one PEFT config")
    return factors


# --------------------------------------------------------------------------- PEFT config
def _pattern_rule(key: str) -> re.Pattern:
    """How PEFT (``peft.utils.other.get_pattern_key``, 0.21) applies a ``rank_pattern`` key to a module name."""
    return re.compile(rf"(.*\.)?({key})$")


def _resolves_uniquely(keys: Mapping[str, str]) -> bool:
    """Whether every module resolves to its own key and no other, whatever the order of the keys."""
    rules = {n: _pattern_rule(k) for n, k in keys.items()}
    by_leaf: dict[str, list[str]] = {}
    for n in keys:
        by_leaf.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    for n in keys:
        if keys[n] != n and not rules[n].match(n):  # PEFT falls back to the name itself when no key matches
            return False
        for leaf, others in by_leaf.items():
            if re.fullmatch(r"\w+", leaf) and not n.endswith(leaf):
                continue  # a key whose literal last part does not end the name cannot match it
            if any(o != n and rules[o].match(n) for o in others):
                return False
    return True


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


def pattern_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """``rank_pattern`` / ``alpha_pattern`` keyed so that each module is matched by its own key only.

    PEFT treats each key as a regex matching a module name or any dotted suffix of it and takes
    the first key that matches, in the order of ``adapter_config.json`` (which PEFT writes with
    sorted keys). So no order is relied on: the plainest form under which every module is
    matched by its own key and by no other is used: the full names; else ``re.escape``d names
    (a plain dot matches any character); else escaped names anchored with ``^`` (one target's
    name is a dotted suffix of another's). The PEFT model built from them, and the one reloaded
    from disk, are then checked layer by layer (:func:`check_peft_layers`).
    """
    names = list(values)
    for to_key in (str, re.escape, _anchored):
        keys = {n: to_key(n) for n in names}
        if _resolves_uniquely(keys):
            return {keys[n]: values[n] for n in names}
    raise SupernetError(f"the modules {names[:2]} cannot be named unambiguously in a PEFT rank_pattern")


def target_modules_spec(targets: Sequence[str], all_names: Sequence[str]) -> list[str] | str:
    """PEFT ``target_modules`` naming exactly ``targets``.

    A list of full names, which PEFT matches exactly or as a dotted suffix; if another module's
    name ends with ``.<target>``, an anchored regex of the escaped names instead (PEFT fullmatches a string).
    """
    wanted = set(targets)
    for name in all_names:
        parts = name.split(".")
        if name not in wanted and any(".".join(parts[i:]) in wanted for i in range(1, len(parts))):
            return "(?:" + "|".join(re.escape(t) for t in targets) + ")"
    return list(targets)


def _check_head_names(heads: Sequence[str], all_names: Sequence[str]) -> None:
    """PEFT wraps every module whose name ends with a ``modules_to_save`` entry; refuse if that is not only the head."""
    for head in heads:
        for name in all_names:
            if name != head and name.endswith(head) and not name.startswith(head + "."):
                raise SupernetError(
                    f"head module {head!r} cannot be named unambiguously for PEFT ({name!r} ends with it)"
                )


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def lora_config(net: SuperNetwork, base: nn.Module, factors: Mapping[str, LoraFactors], heads: Sequence[str]):
    """A ``peft.LoraConfig`` naming every target and its rank and alpha explicitly."""
    from peft import LoraConfig

    all_names = [n for n, _ in base.named_modules() if n]
    _check_head_names(heads, all_names)
    ranks = {n: f.rank for n, f in factors.items()}
    alphas = {n: f.alpha for n, f in factors.items()}
    first = next(iter(factors.values()))
    conv1d = any(isinstance(base.get_submodule(n), Conv1D) for n in factors)
    return LoraConfig(
        r=max(ranks.values()),
        lora_alpha=float(net.config.alpha),
        target_modules=target_modules_spec(list(factors), all_names),
        rank_pattern=pattern_keys(ranks),
        alpha_pattern=pattern_keys(alphas),
        use_rslora=first.rslora,
        fan_in_fan_out=conv1d,
        lora_dropout=float(net.config.dropout),
        bias="none",
        modules_to_save=list(heads) or None,
        task_type=_task_type(base),
    )


def _lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def check_peft_layers(peft_model: nn.Module, factors: Mapping[str, LoraFactors]) -> None:
    """Every target (and nothing else) has a LoRA layer of the right rank, scale and weights."""
    layers = _lora_layers(peft_model)
    if set(layers) != set(factors):
        odd = sorted(set(layers) ^ set(factors))[0]
        raise SupernetError(f"PEFT adapted a different set of modules than the super-network (e.g. {odd!r})")
    for name, f in factors.items():
        layer = layers[name]
        r = layer.r.get(ADAPTER_NAME)
        scale = layer.scaling.get(ADAPTER_NAME)
        if r != f.rank or scale is None or not math.isclose(scale, f.scale, rel_tol=SCALE_RTOL):
            raise SupernetError(f"PEFT gives {name!r} rank {r} and scale {scale}, expected {f.rank} and {f.scale}")
        a = layer.lora_A[ADAPTER_NAME].weight
        b = layer.lora_B[ADAPTER_NAME].weight
        if not (torch.equal(a.to(f.lora_A), f.lora_A) and torch.equal(b.to(f.lora_B), f.lora_B)):
            raise SupernetError(f"PEFT's LoRA weights of {name!r} differ from the sub-adapter's")


def peft_model(net: SuperNetwork, config: Mapping[str, object], factors: Mapping[str, LoraFactors] | None = None):
    """A stock ``peft.PeftModel`` on a fresh copy of the base model holding the sub-adapter at ``config``."""
    from peft import get_peft_model

    factors = peft_factors(net, config) if factors is None else factors
    base = base_model_copy(net)
    heads = _check_heads(net, base)
    model = get_peft_model(base, lora_config(net, base, factors, heads), adapter_name=ADAPTER_NAME)
    layers = _lora_layers(model)
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers.get(name)
            if layer is None:
                raise SupernetError(f"PEFT did not adapt {name!r}")
            a = layer.lora_A[ADAPTER_NAME].weight
            b = layer.lora_B[ADAPTER_NAME].weight
            if a.shape != f.lora_A.shape or b.shape != f.lora_B.shape:
                raise SupernetError(f"PEFT's LoRA of {name!r} has rank {a.shape[0]}, expected {f.rank}")
            a.copy_(f.lora_A)
            b.copy_(f.lora_B)
    check_peft_layers(model, factors)
    return model.eval()


# --------------------------------------------------------------------------- verification
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
    if keys != expected_keys or any(isinstance(m, ElasticAdapter) for m in loaded.modules()):
        odd = sorted(keys ^ expected_keys)[:3]
        raise SupernetError(f"the merged export does not have the original model's weights (e.g. {odd})")
    return compare_outputs(loaded.to(device), batches, reference, dtype, "merged")


def _blank_heads(model: nn.Module, heads: Sequence[str]) -> None:
    """Zero the head, so that a check of a PEFT export proves the head comes from the adapter file."""
    with torch.no_grad():
        for head in heads:
            for p in model.get_submodule(head).parameters():
                p.zero_()


def verify_peft(directory: Path, net: SuperNetwork, factors: Mapping[str, LoraFactors], heads: Sequence[str],
                dtype: torch.dtype, batches: Sequence[Batch], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """Load a PEFT export with stock ``PeftModel.from_pretrained`` on a fresh base and compare."""
    from peft import PeftModel

    base = base_model_copy(net)
    _blank_heads(base, heads)
    loaded = PeftModel.from_pretrained(base, str(directory), adapter_name=ADAPTER_NAME)
    check_peft_layers(loaded, factors)
    return compare_outputs(loaded, batches, reference, dtype, "PEFT")


# --------------------------------------------------------------------------- directories
# (supernet/export_folders.py: what an export folder holds, checked before it is replaced)

def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SupernetError("a PEFT export needs the peft package (pip install peft)") from None


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


def shipped_layers(net: SuperNetwork, model: nn.Module, fmt: str) -> dict[str, dict]:
    """Per adapted layer of an exported model: its weight's sparsity, bits, group size, parameters
    and bytes as stored in ``fmt`` (``merged``: dense floats; ``compressed``: see compress.ct)."""
    out = {}
    for name, adapter in net.adapters.items():
        base: FrozenBase = adapter.base
        w = linear_weight(model.get_submodule(name)).detach()
        nonzeros, numel = int((w != 0).sum()), w.numel()
        row = {"shape": list(w.shape), "numel": numel, "nonzeros": nonzeros, "sparsity": 1 - nonzeros / numel,
               "bits": None, "group_size": None, "params": numel, "bytes": numel * w.element_size()}
        if fmt == "compressed":
            row.update({"bits": getattr(base, "bits", None), "group_size": getattr(base, "group_size", None),
                        "params": nonzeros if base.mask() is not None else numel,
                        "bytes": base.weight_bytes() if isinstance(base, QuantizedBase) or base.mask() is not None
                        else row["bytes"]})
        elif isinstance(base, QuantizedBase) and adapter.merge == "qa-sparse":
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


# --------------------------------------------------------------------------- the two exports
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


def export_merged(
    net: SuperNetwork,
    config: Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    batches: Sequence[Batch] | None = None,
    tokenizer: Any = None,
    macs: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Save the sub-network at ``config`` as a plain ``transformers`` model with the adapters merged.

    Verified before it is renamed into ``out_dir``: reloaded with ``AutoModelFor*.from_pretrained``
    (no missing or extra keys, no adapter modules), its outputs on ``batches`` (default: two
    seeded random sequences) must match the super-network's within :data:`TOLERANCE`.
    Also writes ``subnet.json`` and ``manifest.json``; returns the manifest.
    """
    config, target, inputs = _checked(net, config, out_dir, batches, macs, metadata, overwrite)
    model = merged_model(net, config)
    reference = reference_outputs(net, config, inputs)
    model_class = _auto_class(model)
    device, dtype = _device(model), _dtype(model)
    keys, shipped = set(model.state_dict()), _num_params(model)
    layers = shipped_layers(net, model, "merged")
    with staging_dir(target) as staging:
        _save(model, tokenizer, staging)
        del model
        verification = verify_merged(staging, model_class, keys, device, dtype, inputs, reference)
        manifest = _manifest("merged", net, config, shipped, verification, macs, metadata, layers, staging)
        _write_meta(staging, manifest)
    return manifest


def export_peft(
    net: SuperNetwork,
    config: Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    batches: Sequence[Batch] | None = None,
    tokenizer: Any = None,
    macs: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Save the sub-adapter at ``config`` as a standard PEFT LoRA adapter directory.

    ``adapter_config.json`` names every target module by its full name with its rank
    (``rank_pattern``) and an alpha that gives exactly its trained scale (``alpha_pattern``,
    ``use_rslora`` for ``rora``); ``adapter_model.safetensors`` holds ``A[:r]``, ``B[:, :r]``
    and the trained head (``modules_to_save``). Verified before it is renamed into ``out_dir``:
    loaded with stock ``PeftModel.from_pretrained`` on a fresh base (head zeroed), every LoRA
    layer must have the right rank, scale and weights and the outputs on ``batches`` must match
    the super-network's within :data:`TOLERANCE`. Returns the manifest.
    """
    _require_peft()
    check_format(net, "peft")
    config, target, inputs = _checked(net, config, out_dir, batches, macs, metadata, overwrite)
    factors = peft_factors(net, config)
    model = peft_model(net, config, factors)
    reference = reference_outputs(net, config, inputs)
    dtype = _dtype(net.model)
    heads = _top_level(net.head_modules)
    with staging_dir(target) as staging:
        _save(model, tokenizer, staging)
        del model
        verification = verify_peft(staging, net, factors, heads, dtype, inputs, reference)
        shipped = _safetensors_params(staging / "adapter_model.safetensors")
        manifest = _manifest("peft", net, config, shipped, verification, macs, metadata, directory=staging)
        _write_meta(staging, manifest)
    return manifest


def check_format(net: SuperNetwork, fmt: str) -> None:
    """Refuse, in one line, a format this super-network cannot produce faithfully."""
    adapters = list(net.adapters.values())
    compressed_base = any(type(a.base) is not FrozenBase for a in adapters)
    folded = net.config.merge != "plain"
    if fmt == "peft" and (folded or compressed_base):
        why = (f"its {net.config.merge} updates are masked by the base, which LoRA factors cannot express"
               if folded else "a PEFT adapter loads onto the original dense model, not this run's compressed base")
        hint = "--format merged or compressed" if folded else "--format merged"
        raise SupernetError(f"this run cannot be exported as --format peft: {why}; use {hint}")
    if fmt == "compressed":
        if not compressed_base:
            raise SupernetError("--format compressed needs a run trained on a pruned or quantised base "
                                "(--sparsity / --bits); this run's base is dense")
        if not folded:
            raise SupernetError("--format compressed needs --adapter-merge sparse or qa-sparse: a plain adapter "
                                "merged into a compressed base makes it dense again (use --format merged)")
        conv = [n for n, a in net.adapters.items() if not isinstance(a.base.layer, nn.Linear)]
        if conv:
            raise SupernetError(f"--format compressed stores nn.Linear layers only; {conv[0]} is a "
                                f"{type(net.adapters[conv[0]].base.layer).__name__}")


def _compressed_payload(net: SuperNetwork, model: nn.Module, config: Config):
    """What the compressed format stores for each adapted layer: integers (QA-SparsePEFT) or a mask."""
    from supernet.compress.ct import IntegerLayer

    integers, masks = {}, {}
    with at_config(net, config):
        for name, adapter in net.adapters.items():
            base = adapter.base
            if isinstance(base, QuantizedBase) and adapter.merge == "qa-sparse":
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


def export_compressed(
    net: SuperNetwork,
    config: Mapping[str, object],
    out_dir: str | os.PathLike,
    *,
    batches: Sequence[Batch] | None = None,
    tokenizer: Any = None,
    macs: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict:
    """Save the sub-network at ``config`` merged and compressed (compressed-tensors format).

    QA-SparsePEFT layers are stored as the integers training evaluated (``pack-quantized``);
    SparsePEFT layers on a floating-point pruned base as ``sparse-bitmask``. Verified before it is
    renamed into ``out_dir``: reloaded (:func:`supernet.compress.load_compressed`), every adapted
    weight equals the merged model's bit for bit and the outputs match the super-network's.
    The manifest records per layer its sparsity, bits, group size, parameters and bytes, and the
    files' size on disk.
    """
    from supernet.compress.ct import write_bitmask, write_integers

    check_format(net, "compressed")
    config, target, inputs = _checked(net, config, out_dir, batches, macs, metadata, overwrite)
    model = merged_model(net, config)
    reference = reference_outputs(net, config, inputs)
    integers, masks = _compressed_payload(net, model, config)
    if integers and masks:
        raise SupernetError("cannot store integer and floating-point pruned layers in one compressed checkpoint")
    dtype = _dtype(model)
    layers = shipped_layers(net, model, "compressed")
    shipped = _num_params(model)
    check = copy.deepcopy(model)
    with staging_dir(target) as staging:
        if integers:
            write_integers(model, integers, staging)
        else:
            write_bitmask(model, masks, staging, net_structure(net))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        del model
        verification = verify_compressed(staging, check, list(net.adapters), inputs, reference, dtype)
        manifest = _manifest("compressed", net, config, shipped, verification, macs, metadata, layers, staging)
        manifest["compressed_format"] = "pack-quantized" if integers else "sparse-bitmask"
        manifest["loader"] = ("transformers: from_pretrained(dir, quantization_config=CompressedTensorsConfig("
                              "dequantize=True)), or supernet.compress.load_compressed(dir)" if integers
                              else "supernet.compress.load_compressed(dir)")
        _write_meta(staging, manifest)
    return manifest


def net_structure(net: SuperNetwork) -> str:
    """The sparsity structure the bases were pruned with (``unstructured``, ``2:4``, ...)."""
    patterns = {a.base.pattern for a in net.adapters.values() if a.base.pattern is not None}
    return patterns.pop() if len(patterns) == 1 else "unstructured"


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
