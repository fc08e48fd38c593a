"""``--format peft``: a sub-adapter as a standard PEFT LoRA adapter that stock ``peft`` loads.

``adapter_config.json`` names every target with its rank (``rank_pattern``); every adapter kind
expresses itself as LoRA factors through :meth:`~supernet.adapters.ElasticAdapter.lora_factors`,
or says it cannot. Two layouts of the modules' scales (``--peft-scale``):

- ``folded`` (default): each module's trained scale is folded into its ``lora_B``, so that one
  global ``lora_alpha / r`` (``r`` the largest rank, no rsLoRA) is exact for every module. This is
  what serving runtimes need: vLLM's LoRA loader reads ``r`` and ``lora_alpha`` and ignores
  ``rank_pattern`` / ``alpha_pattern`` (each module's rank comes from its tensors' shapes).
  PEFT reads the same files through ``alpha_pattern`` (``lora_alpha * r_m / r``), which gives
  every module that global scale too.
- ``pattern``: the factors as trained, each module's scale in ``alpha_pattern`` (``use_rslora``
  for ``rora``); exact in PEFT, served at the wrong strength by loaders that ignore patterns.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from supernet.adapters import LoraFactors
from supernet.errors import SupernetError
from supernet.export_core import (
    ADAPTER_NAME,
    Batch,
    Staged,
    _check_finite,
    _check_heads,
    _dtype,
    _safetensors_params,
    _save,
    _top_level,
    at_config,
    compare_outputs,
    cut_base_copy,
    export_format,
)
from supernet.network import SuperNetwork
from supernet.space import Config

SCALE_RTOL = 1e-6  # PEFT's scaling of a module vs the adapter's trained scale
SCALE_LAYOUTS = ("folded", "pattern")  # --peft-scale
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
CUT_BASE = "base"  # a cut sub-network's PEFT export: the narrowed base model, saved in this sub-folder


def peft_factors(net: SuperNetwork, config: Mapping[str, object], scale: str = "folded") -> dict[str, LoraFactors]:
    """Every adapter as PEFT LoRA factors at ``config`` (detached copies), checked finite, in the
    ``scale`` layout (:data:`SCALE_LAYOUTS`)."""
    if scale not in SCALE_LAYOUTS:
        raise SupernetError(f"unknown --peft-scale {scale!r}; choose one of {', '.join(SCALE_LAYOUTS)}")
    with at_config(net, config):
        factors, cuts = {}, net.cuts(config)
        for name, adapter in net.adapters.items():
            f = (adapter.cut(*cuts[name]) if name in cuts else adapter).lora_factors()  # on the cut base
            factors[name] = LoraFactors(f.lora_A.clone(), f.lora_B.clone(), f.alpha, f.rslora, f.scale)
            _check_finite("adapter factor lora_A", name, f.lora_A)
            _check_finite("adapter factor lora_B", name, f.lora_B)
    if len({f.rslora for f in factors.values()}) > 1:
        # one PEFT config has one use_rslora: modes mixed across modules (a searched scaling) are
        # all written as plain LoRA, each module with the alpha whose alpha / r is its trained scale
        factors = {n: LoraFactors(f.lora_A, f.lora_B, f.scale * f.rank, False, f.scale) for n, f in factors.items()}
    return fold_scales(factors, float(net.config.alpha)) if scale == "folded" else factors


def fold_scales(factors: Mapping[str, LoraFactors], alpha: float) -> dict[str, LoraFactors]:
    """The same updates with one scale ``alpha / r`` for every module (``r`` the largest rank):
    ``lora_B`` times ``scale_m / (alpha / r)``, and ``alpha_m = alpha * r_m / r`` for PEFT's own
    per-module ``alpha_m / r_m``. A module whose scale already is the global one keeps its ``lora_B``
    bit for bit."""
    r = max(f.rank for f in factors.values())
    scale = alpha / r
    out = {}
    for n, f in factors.items():
        ratio = f.scale / scale
        b = f.lora_B if ratio == 1.0 else f.lora_B * ratio
        _check_finite("adapter factor lora_B (scale folded)", n, b)
        out[n] = LoraFactors(f.lora_A, b, alpha * f.rank / r, False, scale)
    return out


def vllm_rules(factors: Mapping[str, LoraFactors], heads: Sequence[str], scale: str) -> dict:
    """Whether vLLM's LoRA loader serves this adapter as PEFT does, and the ``--max-lora-rank`` it
    needs. vLLM applies one ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) to every module, reads no
    ``rank_pattern`` / ``alpha_pattern``, and serves no ``modules_to_save``."""
    r = max(f.rank for f in factors.values())
    why = []
    if len({f.scale for f in factors.values()}) > 1:
        why.append("the modules' scales differ and vLLM reads no alpha_pattern (export with --peft-scale folded)")
    if heads:
        why.append(f"the trained head ({', '.join(heads)}) ships as modules_to_save, which vLLM does not serve")
    ranks = [v for v in VLLM_RANKS if v >= r]
    if not ranks:
        why.append(f"rank {r} is above vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
    return {"scale": scale, "servable": not why, "why_not": why, "max_lora_rank": ranks[0] if ranks else None}


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
    """A stock ``peft.PeftModel`` on a fresh copy of the base model holding the sub-adapter at
    ``config`` (scales folded, unless ``factors`` are given)."""
    from peft import get_peft_model

    factors = peft_factors(net, config) if factors is None else factors
    base = cut_base_copy(net, config)
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


def _blank_heads(model: nn.Module, heads: Sequence[str]) -> None:
    """Zero the head, so that a check of a PEFT export proves the head comes from the adapter file."""
    with torch.no_grad():
        for head in heads:
            for p in model.get_submodule(head).parameters():
                p.zero_()


def verify_peft(directory: Path, net: SuperNetwork, factors: Mapping[str, LoraFactors], heads: Sequence[str],
                dtype: torch.dtype, batches: Sequence[Batch], reference: Sequence[torch.Tensor],
                config: Mapping[str, object] | None = None, base_class: Any = None) -> dict[str, float]:
    """Load a PEFT export with stock ``PeftModel.from_pretrained`` on a fresh base and compare; a
    cut sub-network's base is the one saved beside the adapter (``base/``), reloaded from disk."""
    from peft import PeftModel

    if base_class is not None:
        base = base_class.from_pretrained(str(directory / CUT_BASE), dtype=dtype)
    else:
        base = cut_base_copy(net, config or net.active_config())
    _blank_heads(base, heads)
    loaded = PeftModel.from_pretrained(base, str(directory), adapter_name=ADAPTER_NAME)
    check_peft_layers(loaded, factors)
    return compare_outputs(loaded, batches, reference, dtype, "PEFT")


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SupernetError("a PEFT export needs the peft package (pip install peft)") from None


def export_peft(net: SuperNetwork, config: Mapping[str, object], out_dir: str | os.PathLike, *,
                scale: str = "folded", **options: Any) -> dict:
    """Save the sub-adapter at ``config`` as a standard PEFT LoRA adapter directory.

    ``adapter_config.json`` names every target module by its full name with its rank
    (``rank_pattern``) and the alpha that gives its scale in PEFT (``alpha_pattern``); with
    ``scale="folded"`` every module's scale is the global ``lora_alpha / r`` and the trained scales
    are folded into ``lora_B`` (what vLLM serves), with ``"pattern"`` the trained scales stay in
    ``alpha_pattern`` (``use_rslora`` for ``rora``). ``adapter_model.safetensors`` holds ``A[:r]``,
    ``B[:, :r]`` and the trained head (``modules_to_save``); the manifest's ``vllm`` entry says
    whether vLLM serves it and with which ``--max-lora-rank``. Verified before it is renamed into ``out_dir``:
    loaded with stock ``PeftModel.from_pretrained`` on a fresh base (head zeroed), every LoRA
    layer must have the right rank, scale and weights and the outputs on ``batches`` must match
    the super-network's within :data:`TOLERANCE`. Returns the manifest.
    """
    _require_peft()
    if scale not in SCALE_LAYOUTS:
        raise SupernetError(f"unknown --peft-scale {scale!r}; choose one of {', '.join(SCALE_LAYOUTS)}")
    return export_format("peft", net, config, out_dir, functools.partial(_prepare_peft, scale=scale), **options)


def _prepare_peft(net: SuperNetwork, config: Config, tokenizer: Any, scale: str = "folded") -> Staged:
    factors = peft_factors(net, config, scale)
    held = [peft_model(net, config, factors)]
    dtype = _dtype(net.model)
    heads = _top_level(net.head_modules)
    vllm = {"vllm": vllm_rules(factors, heads, scale)}
    if not net.cuts(config):
        return Staged(write=lambda d: _save(held.pop(), tokenizer, d),
                      verify=lambda d, x, ref: verify_peft(d, net, factors, heads, dtype, x, ref, config),
                      shipped=lambda d: _safetensors_params(d / "adapter_model.safetensors"), extra=vllm)
    # elastic width: the adapter fits the cut base only, which is saved beside it (base/)
    from supernet.export import _auto_class

    base = cut_base_copy(net, config)
    base_class = _auto_class(base)
    stock = not base.config.model_type.startswith("supernet-cut-")

    def write(d: Path) -> None:
        _save(held.pop(), tokenizer, d)
        _save(base, tokenizer, d / CUT_BASE)

    load = (f"base = {base_class.__name__}.from_pretrained(folder/'{CUT_BASE}'); "
            "PeftModel.from_pretrained(base, folder)")
    return Staged(write=write, verify=lambda d, x, ref: verify_peft(d, net, factors, heads, dtype, x, ref, config,
                                                                   base_class),
                  shipped=lambda d: _safetensors_params(d / "adapter_model.safetensors"),
                  extra={**vllm, "width": {"base": CUT_BASE, "stock_config": stock,
                                   "load": load if stock else "import supernet.cut_models; " + load}})
