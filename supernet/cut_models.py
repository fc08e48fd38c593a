"""Models whose blocks have their own FFN widths and head counts: what a stock config cannot hold.

A stock ``config.json`` has one ``intermediate_size`` and one ``num_attention_heads`` for every
block, and BERT derives its head size from ``hidden_size / num_attention_heads``, so a sub-network
with per-block widths (``--width-groups block``), or a BERT with fewer heads, is saved as its
stock architecture with two changes to ``config.json``:

- ``model_type`` is ``supernet-cut-<type>`` (``supernet-cut-bert``, ``supernet-cut-llama``, ...);
- ``cut_shapes`` holds ``{module name: [out_features, in_features]}`` of every narrowed layer.

A JACTUS export (:mod:`supernet.adapters.jactus`) replaces each adapted layer by two factors:
``factored_shapes`` holds ``{module name: [out_features, rank, in_features]}``, and the layer is a
:class:`FactoredLinear` (``right``: ``rank x in``, no bias; ``left``: ``out x rank`` with the layer's
bias), so the weights ``name.right.weight``, ``name.left.weight`` and ``name.left.bias`` load.

``import supernet.cut_models`` registers, for each model type of :data:`CUT_TYPES`, a config class
and, for every auto class that maps the stock config, a model class; after it,
``AutoModelFor...from_pretrained(folder)`` loads such an export (no remote code). The model class
is the stock one: its ``__init__`` builds the stock layers, then replaces each layer named in
``cut_shapes`` by an ``nn.Linear`` of that shape and sets each attention module's
``num_key_value_groups`` from its Q and K widths; the weights then load as usual.
"""

from __future__ import annotations

from torch import nn

#: stock model types whose cut variants are registered on import
CUT_TYPES = ("bert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
PREFIX = "supernet-cut-"
_CLASSES: dict[str, tuple[type, dict[type, type]]] = {}  # model type -> (config class, {stock: cut model class})


def _auto_classes() -> list:
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    return [AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
            AutoModelForMaskedLM]


class FactoredLinear(nn.Module):
    """A linear layer stored as two factors: ``y = left(right(x))``, ``right`` of ``rank x in`` (no
    bias) and ``left`` of ``out x rank`` (the layer's bias): ``rank (in + out)`` weight numbers
    instead of ``in * out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.right = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.left = nn.Linear(self.rank, self.out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.left(self.right(x))

    def factored_row(self) -> dict:
        """What an export manifest says of this layer (as of a dense one: shape, numbers, bytes)."""
        numel = self.right.weight.numel() + self.left.weight.numel()
        return {"shape": [self.out_features, self.in_features], "rank": self.rank, "numel": numel,
                "nonzeros": numel, "sparsity": 0.0, "bits": None, "group_size": None, "params": numel,
                "bytes": numel * self.left.weight.element_size()}


def install_factored(model: nn.Module, layers: dict[str, FactoredLinear]) -> None:
    """Put factored layers into a stock model by name and turn it into its registered variant
    (``factored_shapes`` in its config), so that ``from_pretrained`` rebuilds them."""
    for name, new in layers.items():
        _replace(model, name, lambda old, bias, device, dtype, new=new: new)
    to_cut_class(model, {}, {n: [m.out_features, m.rank, m.in_features] for n, m in layers.items()})


def _replace(model: nn.Module, name: str, make) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, make(old, old.bias is not None, old.weight.device, old.weight.dtype))


def apply_cut_shapes(model: nn.Module, shapes: dict, factored: dict | None = None) -> None:
    """Replace every layer named in ``shapes`` by an ``nn.Linear`` of ``[out, in]`` (its bias kept
    or not as the stock layer's), every layer named in ``factored`` by a :class:`FactoredLinear`
    of ``[out, rank, in]``, and set each attention module's KV group count."""
    for name, (out_features, in_features) in shapes.items():
        _replace(model, name, lambda old, bias, device, dtype, o=out_features, i=in_features: nn.Linear(
            int(i), int(o), bias=bias, device=device, dtype=dtype))
    for name, (out_features, rank, in_features) in (factored or {}).items():
        _replace(model, name, lambda old, bias, device, dtype, o=out_features, r=rank, i=in_features: FactoredLinear(
            int(i), int(o), int(r), bias=bias, device=device, dtype=dtype))
    set_kv_groups(model)


def set_kv_groups(model: nn.Module) -> None:
    """Each attention module's query heads per KV head, from its Q and K widths (heads may differ per block)."""
    for module in model.modules():
        q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        if hasattr(module, "num_key_value_groups") and q is not None and k is not None:
            module.num_key_value_groups = q.out_features // k.out_features


def register(model_type: str) -> tuple[type, dict[type, type]] | None:
    """Register the cut variant of ``model_type`` (None when transformers does not know the type)."""
    if model_type in _CLASSES:
        return _CLASSES[model_type]
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    stock_config = CONFIG_MAPPING[model_type]
    config_cls = type(f"Cut{stock_config.__name__}", (stock_config,),
                      {"model_type": PREFIX + model_type, "__module__": __name__})
    AutoConfig.register(PREFIX + model_type, config_cls)
    models: dict[type, type] = {}
    for auto in _auto_classes():
        try:
            stock = auto._model_mapping[stock_config]
        except (KeyError, ValueError):
            continue
        if stock in models:
            auto.register(config_cls, models[stock])
            continue

        def __init__(self, config, *args, _stock=stock, **kwargs):
            _stock.__init__(self, config, *args, **kwargs)
            apply_cut_shapes(self, getattr(config, "cut_shapes", None) or {},
                             getattr(config, "factored_shapes", None) or {})

        cls = type(f"Cut{stock.__name__}", (stock,), {"config_class": config_cls, "__init__": __init__,
                                                      "__module__": __name__})
        auto.register(config_cls, cls)
        models[stock] = cls
    _CLASSES[model_type] = (config_cls, models)
    return _CLASSES[model_type]


def to_cut_class(model: nn.Module, shapes: dict, factored: dict | None = None) -> None:
    """Turn a stock model whose layers were cut (or factored) in place into its registered cut
    variant, so that ``save_pretrained`` writes ``model_type`` ``supernet-cut-<type>`` and
    ``cut_shapes`` (and ``factored_shapes``)."""
    from supernet.errors import SupernetError

    model_type = model.config.model_type
    found = register(model_type)
    if found is None or type(model) not in found[1]:
        raise SupernetError(f"per-block widths or factored layers of a {type(model).__name__} cannot be exported: "
                            f"supernet registers cut variants of {', '.join(CUT_TYPES)} models only")
    config_cls, models = found
    data = model.config.to_dict()
    data.pop("model_type", None)
    config = config_cls(**data)
    config.cut_shapes = {n: [int(s) for s in shape] for n, shape in shapes.items()}
    if factored:
        config.factored_shapes = {n: [int(s) for s in shape] for n, shape in factored.items()}
    config._attn_implementation = model.config._attn_implementation
    model.config = config
    model.__class__ = models[type(model)]
    set_kv_groups(model)


for _type in CUT_TYPES:
    register(_type)
