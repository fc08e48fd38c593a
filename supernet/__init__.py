"""supernet: weight-sharing super-networks of elastic low-rank adapters for Hugging Face models.

The package imports nothing heavy by itself: ``from supernet import SuperNetwork`` (or
``supernet.SuperNetwork``) imports the module that defines it on first use (PEP 562), so
``import supernet.search``, ``supernet.plot_data`` or ``supernet.compress`` never loads
transformers (nor torch, for the first two) through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module that defines it
_EXPORTS = {
    "ElasticAdapter": "supernet.adapters",
    "ElasticLoRA": "supernet.adapters",
    "lora_scale": "supernet.adapters",
    "FrozenBase": "supernet.bases",
    "MaskedBase": "supernet.bases",
    "QuantizedBase": "supernet.bases",
    "SupernetError": "supernet.errors",
    "SuperNetConfig": "supernet.network",
    "SuperNetwork": "supernet.network",
    "SearchSpace": "supernet.space",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'supernet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
