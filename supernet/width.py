"""Elastic width of the frozen base (LoNAS Mode B): feed-forward neurons and attention heads.

Two dimension kinds (:mod:`supernet.dimensions`): ``width``, the fraction of a block's FFN
intermediate neurons kept (rows of up / gate, columns of down), and ``heads``, the fraction of
its attention heads kept (rows of Q / K / V, columns of O, one head's ``head_dim`` at a time).
With grouped-query attention every KV head stays and each KV group keeps the same number of
its query heads, so no head is split from its group.

The blocks are found by name pattern, like every target: ``intermediate.dense`` /
``output.dense`` and ``attention.self.{query,key,value}`` / ``attention.output.dense`` (BERT
layouts), ``mlp.{gate,up,down}_proj`` and ``self_attn.{q,k,v,o}_proj`` (Llama layouts).

How it works:

- :func:`importance_order`, once before training (and before any pruning or quantisation, so
  that masks, scales and zero points are computed on the re-ordered weights): neurons are
  scored by activation-weighted magnitude, ``mean|x_j| * ||W_down[:, j]||`` at the down
  projection's input; heads by the norm of their output, ``||W_o[:, h] ctx_h||`` summed over the
  calibration tokens, within their KV group. :func:`apply_order` permutes the frozen weights so
  that every width is a prefix: the full-width model computes what it computed before.
- In the super-network a kept set is a mask on the input of the down and O projections: a cut
  neuron or head then contributes nothing, exactly as if its rows and columns were gone (the
  rows of up / Q / K / V it would have used feed only that input). Training is not faster at a
  narrow width; the exported model is (:func:`cut_model` slices the layers).
- Costs follow the cut (:meth:`WidthPlan.cuts` gives each layer's kept input and output indices).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from supernet.bases import cut_linear
from supernet.dimensions import HEADS_KIND, WIDTH_KIND, Dimension
from supernet.errors import SupernetError

SPREADS = ("block", "global")
_BLOCK = re.compile(r"\.(\d+)\.")
_HEAD_TOL = 0.02  # a heads fraction may be typed rounded (0.67 for 2 of 3 heads): this many heads off


def _role(rest: str) -> str | None:
    """The role of a linear layer by its name inside a block (``attention.self.query`` -> ``q``)."""
    leaf = rest.rsplit(".", 1)[-1]
    if leaf in ("up_proj", "gate_proj") or rest.endswith("intermediate.dense"):
        return "up"
    if leaf == "down_proj" or rest == "output.dense":
        return "down"
    if leaf in ("query", "q_proj"):
        return "q"
    if leaf in ("key", "k_proj"):
        return "k"
    if leaf in ("value", "v_proj"):
        return "v"
    if leaf == "o_proj" or rest.endswith("attention.output.dense"):
        return "o"
    return None


@dataclass
class Block:
    """One transformer block's cuttable structure (module names are the model's)."""

    name: str  # ``L3`` (or the block's path when the model has several stacks)
    up: list[str] = field(default_factory=list)
    down: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    neurons: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def has_ffn(self) -> bool:
        return bool(self.up) and self.down is not None

    @property
    def has_attention(self) -> bool:
        return None not in (self.q, self.k, self.v, self.o)

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: fewer KV heads than query heads (K and V are never cut)."""
        return self.kv_heads < self.heads


def find_blocks(model: nn.Module) -> list[Block]:
    """Every numbered block with a recognised FFN or attention (``nn.Linear`` layers only)."""
    cfg = getattr(model, "config", None)
    found: dict[str, Block] = {}
    stacks = set()
    for name, module in model.named_modules():
        m = _BLOCK.search(name)
        if m is None or not isinstance(module, nn.Linear) and not hasattr(module, "base"):
            continue
        role = _role(name[m.end():])
        if role is None:
            continue
        prefix = name[: m.end() - 1]
        stacks.add(name[: m.start()])
        block = found.setdefault(prefix, Block(name=f"L{m.group(1)}"))
        if role == "up":
            block.up.append(name)
        else:
            setattr(block, role, name)
    if len(stacks) > 1:
        for prefix, block in found.items():
            block.name = prefix
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads and hidden else None)
    blocks = []
    for block in found.values():
        if block.has_ffn:
            block.neurons = _features(model.get_submodule(block.down))[0]
        if block.has_attention:
            if not heads or not head_dim:
                raise SupernetError("elastic heads need num_attention_heads and head_dim (or hidden_size) in the "
                                    "model's config")
            block.heads, block.kv_heads, block.head_dim = int(heads), int(kv), int(head_dim)
            if block.heads % block.kv_heads:
                raise SupernetError(f"{block.heads} attention heads do not split into {block.kv_heads} KV groups")
        blocks.append(block)
    return blocks


def _features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear layer or of an adapter wrapping one."""
    return int(module.in_features), int(module.out_features)


def _fraction_text(f: float) -> str:
    return f"{f:g}"


def neuron_count(block: Block, fraction: float, align: int = 1) -> int:
    """The neurons kept at ``fraction``: a whole number, a multiple of ``align`` (a quantisation
    group or an N:M block of the down projection's columns), else one clear error."""
    n = block.neurons
    k = round(n * fraction)
    if abs(k - n * fraction) > 1e-6 * n or k <= 0 or k % align:
        step = n // math.gcd(n, align) if align > 1 else n
        unit = align if align > 1 else 1
        valid = [f"{q / 8:g}" for q in range(1, 9) if (n * q) % 8 == 0 and (n * q // 8) % unit == 0]
        raise SupernetError(
            f"width {_fraction_text(fraction)} keeps {n * fraction:g} of {block.name}'s {n} neurons, which is not "
            f"a positive multiple of {unit}; valid widths are k*{unit}/{n} (e.g. {', '.join(valid) or 'none'})"
            if unit > 1 else
            f"width {_fraction_text(fraction)} keeps {n * fraction:g} of {block.name}'s {n} neurons; valid widths "
            f"are k/{step} (e.g. {', '.join(valid)})")
    return k


def heads_count(block: Block, fraction: float) -> int:
    """Query heads kept per KV group at ``fraction`` (MHA: one group of every head)."""
    per = block.heads // block.kv_heads if block.grouped else block.heads
    k = round(per * fraction)
    if abs(k - per * fraction) > _HEAD_TOL or k <= 0:
        valid = ", ".join(f"{j / per:.3g}" for j in range(1, per + 1))
        where = f"{per} per KV group" if block.grouped else f"{per}"
        raise SupernetError(f"heads {_fraction_text(fraction)} keeps {per * fraction:.3g} of {block.name}'s {where} "
                            f"heads; valid fractions are {valid}")
    return k


def kept_heads(block: Block, per_group: int) -> list[int]:
    """The query heads kept: the first ``per_group`` of every KV group (heads are importance-
    ordered within their group)."""
    if not block.grouped:
        return list(range(per_group))
    size = block.heads // block.kv_heads
    return [g * size + j for g in range(block.kv_heads) for j in range(per_group)]


def head_rows(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


Cut = tuple[torch.Tensor | None, torch.Tensor | None]  # kept (input columns, output rows); None: all


class WidthPlan:
    """The width and heads dimensions of a model, and what each configuration cuts.

    Args:
        model: the Hugging Face model (before or after adapters are injected).
        widths: the FFN fractions searched (empty: none).
        heads: the attention-head fractions searched (empty: none).
        per: ``block`` (one dimension per block) or ``global`` (one for the whole model).
        align: ``{module name: a multiple its kept input columns must keep}`` (quantisation groups,
            N:M blocks); checked for every choice now, so a bad one fails before training.
    """

    def __init__(self, model: nn.Module, widths: list[float], heads: list[float], per: str = "block",
                 align: Mapping[str, int] | None = None) -> None:
        if per not in SPREADS:
            raise SupernetError(f"unknown --width-groups {per!r}; use {' or '.join(SPREADS)}")
        self.per = per
        self.blocks = find_blocks(model)
        self.align = dict(align or {})
        self.dimensions: list[Dimension] = []
        self._dim_of: dict[tuple[str, str], str] = {}  # (block, kind) -> dimension name
        for kind, fractions, test in ((WIDTH_KIND, widths, "has_ffn"), (HEADS_KIND, heads, "has_attention")):
            if not fractions:
                continue
            blocks = [b for b in self.blocks if getattr(b, test)]
            if not blocks:
                what = "feed-forward (up/down)" if kind == WIDTH_KIND else "attention (q/k/v/o)"
                raise SupernetError(f"--{kind}s: this model has no {what} layers that supernet recognises by name")
            for b in blocks:
                name = kind if per == "global" else f"{b.name}:{kind}"
                self._dim_of[(b.name, kind)] = name
                if per == "block" or not any(d.name == name for d in self.dimensions):
                    self.dimensions.append(Dimension(name, kind, list(fractions)))
        for dim in self.dimensions:  # every choice checked against every block it cuts
            for choice in dim.choices:
                for b in self.blocks:
                    if self._dim_of.get((b.name, dim.kind)) == dim.name:
                        self._block_cut(b, dim.kind, choice)
        self.modules = sorted({n for b in self.blocks for n in self._block_modules(b)})

    def _block_modules(self, b: Block) -> list[str]:
        out = []
        if (b.name, WIDTH_KIND) in self._dim_of:
            out += [*b.up, b.down]
        if (b.name, HEADS_KIND) in self._dim_of:
            out += [b.q, b.o] + ([] if b.grouped else [b.k, b.v])
        return out

    def _block_cut(self, b: Block, kind: str, choice: float) -> dict[str, Cut]:
        if choice == 1.0:
            return {}
        if kind == WIDTH_KIND:
            k = neuron_count(b, choice, self.align.get(b.down, 1))
            keep = torch.arange(k)
            return {**{n: (None, keep) for n in b.up}, b.down: (keep, None)}
        rows = head_rows(kept_heads(b, heads_count(b, choice)), b.head_dim)
        align = self.align.get(b.o, 1)
        if align > 1 and _breaks_groups(rows, align):
            raise SupernetError(f"heads {choice:g} cuts {b.name}'s attention output projection inside a quantisation "
                                f"group or N:M block of {align} columns (one head is {b.head_dim}); choose fractions "
                                "that keep whole groups")
        cut = {b.q: (None, rows), b.o: (rows, None)}
        if not b.grouped:
            cut.update({b.k: (None, rows), b.v: (None, rows)})
        return cut

    def cuts(self, config: Mapping[str, object]) -> dict[str, Cut]:
        """``{module: (kept input columns, kept output rows)}`` of every layer the config cuts."""
        out: dict[str, Cut] = {}
        for b in self.blocks:
            for kind in (WIDTH_KIND, HEADS_KIND):
                name = self._dim_of.get((b.name, kind))
                if name is not None:
                    out.update(self._block_cut(b, kind, float(config[name])))
        return out

    def kept_heads(self, config: Mapping[str, object]) -> dict[str, int]:
        """Query heads each block keeps (every block with attention)."""
        out = {}
        for b in self.blocks:
            if not b.has_attention:
                continue
            name = self._dim_of.get((b.name, HEADS_KIND))
            per = heads_count(b, float(config[name])) if name else None
            out[b.name] = b.heads if per is None else per * (b.kv_heads if b.grouped else 1)
        return out

    # ------------------------------------------------------------------ masks in the super-network
    def install(self, model: nn.Module) -> None:
        """Mask the inputs of every down and O projection a dimension drives (after adapters are injected)."""
        self._masks: dict[str, torch.Tensor | None] = {}
        self._handles: dict[str, object] = {}
        for b in self.blocks:
            for kind, name in ((WIDTH_KIND, b.down), (HEADS_KIND, b.o)):
                if (b.name, kind) not in self._dim_of:
                    continue
                module = model.get_submodule(name)
                self._masks[name] = None
                self._handles[name] = module.register_forward_pre_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, args):
            mask = self._masks.get(name)
            if mask is None:
                return None
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype), *args[1:])
        return hook

    def strip(self, model: nn.Module) -> None:
        """Remove the masks from a deep copy of the model (hooks are copied with their modules)."""
        for name, handle in getattr(self, "_handles", {}).items():
            try:
                model.get_submodule(name)._forward_pre_hooks.pop(handle.id, None)
            except AttributeError:
                continue

    def attention_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.has_attention]

    def activate(self, config: Mapping[str, object], model: nn.Module) -> None:
        """Set the input masks of the down and O projections for ``config``."""
        cuts = self.cuts(config)
        for name in self._masks:
            keep_in = cuts.get(name, (None, None))[0]
            if keep_in is None:
                self._masks[name] = None
            else:
                mask = torch.zeros(_features(model.get_submodule(name))[0])
                mask[keep_in] = 1.0
                self._masks[name] = mask


def _breaks_groups(keep: torch.Tensor, align: int) -> bool:
    """Whether a kept index set cuts through a block of ``align`` consecutive columns."""
    kept = set(keep.tolist())
    hi = max(kept) + align
    return any(len({g * align + i for i in range(align)} & kept) not in (0, align) for g in range(hi // align + 1))


# ---------------------------------------------------------------------- the physical cut
def cut_model(model: nn.Module, plan: WidthPlan, config: Mapping[str, object]) -> bool:
    """Slice ``model`` (a plain copy: no adapters, no masks) to ``config`` in place.

    When every block keeps one width and one head count that the architecture's config can
    hold, the config's ``intermediate_size`` / ``num_attention_heads`` (``num_key_value_heads``,
    ``head_dim``) are set and the model stays stock: returns True. Otherwise (per-block widths, or
    fewer heads in a BERT, whose head size is ``hidden_size / num_attention_heads``) the model
    becomes its registered cut variant (:mod:`supernet.cut_models`): returns False.
    """
    cuts = plan.cuts(config)
    shapes = {}
    for name, (keep_in, keep_out) in cuts.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = cut_linear(model.get_submodule(name), keep_in, keep_out)
        setattr(parent, child, new)
        shapes[name] = [new.out_features, new.in_features]
    cfg = model.config
    widths = {int(model.get_submodule(b.down).in_features) for b in plan.blocks if b.has_ffn}
    heads = set(plan.kept_heads(config).values())
    attn = plan.attention_blocks()
    cut_heads = bool(attn) and heads != {attn[0].heads}
    head_dim_in_config = "head_dim" in cfg.to_dict()
    if len(widths) > 1 or len(heads) > 1 or cut_heads and not head_dim_in_config:
        from supernet.cut_models import to_cut_class

        to_cut_class(model, shapes)
        return False
    if widths and hasattr(cfg, "intermediate_size"):
        cfg.intermediate_size = widths.pop()
    if cut_heads:
        kept, b = heads.pop(), attn[0]
        cfg.head_dim = b.head_dim
        cfg.num_attention_heads = kept
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = b.kv_heads if b.grouped else kept
        for module in model.modules():  # attention modules cache the group count
            if hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = kept // (b.kv_heads if b.grouped else kept)
    return True
