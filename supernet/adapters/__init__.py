"""Adapter kinds: a registry, one file per kind (as PEFT keeps one folder per tuner).

``supernet train --adapter NAME`` picks a kind from :data:`ADAPTER_KINDS`. Each kind is a
subclass of :class:`ElasticAdapter` (``base.py`` documents the interface); ``lora.py`` is the
elastic-rank LoRA of Shears, ``nora.py`` nested LoRA from an activation-aware SVD (NoRA),
``jactus.py`` a task-aware union of subspaces with a trainable core (JACTUS). A new
kind is a class registered with :func:`register_adapter_kind`, from any module: the library
needs no edit.
"""

from __future__ import annotations

from supernet.adapters.base import ElasticAdapter, LoraFactors
from supernet.adapters.jactus import ElasticJactus
from supernet.adapters.lora import ElasticLoRA, lora_scale
from supernet.adapters.nora import ElasticNoRA
from supernet.dimensions import SCALINGS
from supernet.errors import SupernetError
from supernet.merges import MERGES

ADAPTER_KINDS: dict[str, type[ElasticAdapter]] = {}


def register_adapter_kind(cls: type[ElasticAdapter]) -> type[ElasticAdapter]:
    """Add an :class:`ElasticAdapter` subclass under its ``kind`` name (usable as a class decorator)."""
    if not isinstance(cls, type) or not issubclass(cls, ElasticAdapter) or not cls.kind:
        raise SupernetError("an adapter kind is an ElasticAdapter subclass with a non-empty `kind` name")
    if ADAPTER_KINDS.get(cls.kind, cls) is not cls:
        raise SupernetError(f"adapter kind {cls.kind!r} is already registered")
    ADAPTER_KINDS[cls.kind] = cls
    return cls


def adapter_kind(name: str) -> type[ElasticAdapter]:
    if name not in ADAPTER_KINDS:
        raise SupernetError(f"unknown adapter kind {name!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[name]


register_adapter_kind(ElasticLoRA)
register_adapter_kind(ElasticNoRA)
register_adapter_kind(ElasticJactus)

__all__ = ["ADAPTER_KINDS", "MERGES", "SCALINGS", "ElasticAdapter", "ElasticJactus", "ElasticLoRA", "ElasticNoRA",
           "LoraFactors", "adapter_kind", "lora_scale", "register_adapter_kind"]
