"""supernet: weight-sharing super-networks of elastic low-rank adapters for Hugging Face models."""

from __future__ import annotations

from supernet.adapters import ElasticAdapter, ElasticLoRA, lora_scale
from supernet.bases import FrozenBase, MaskedBase, QuantizedBase
from supernet.errors import SupernetError
from supernet.network import SuperNetConfig, SuperNetwork
from supernet.space import SearchSpace

__all__ = [
    "ElasticAdapter",
    "ElasticLoRA",
    "FrozenBase",
    "MaskedBase",
    "QuantizedBase",
    "SearchSpace",
    "SuperNetConfig",
    "SuperNetwork",
    "SupernetError",
    "lora_scale",
]
__version__ = "0.1.0"
