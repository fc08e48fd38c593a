"""Frozen base layers: the weight an adapter sits on, and what it costs.

A frozen base owns one Hugging Face layer (``nn.Linear`` or GPT-2 ``Conv1D``) and knows

- its effective weight, :meth:`FrozenBase.weight` (``(out, in)``: masked or dequantised),
- how an update reaches it: :meth:`FrozenBase.merge` gives ``W + delta`` either plainly (the
  base's structure is lost, as when PEFT merges into a pruned model) or *through* the base's
  transform (SparsePEFT: ``W + delta ⊙ M``; QA-SparsePEFT: ``fake_quant(W^p + delta ⊙ M)``),
- its cost: MACs per token (non-zeros where sparse), parameters, bytes at its precision.

Three kinds: :class:`FrozenBase` (dense), :class:`MaskedBase` (pruned, Wanda or N:M),
:class:`QuantizedBase` (asymmetric group-wise INT4/INT8, optionally pruned first). Formulas in
``docs/METHODS.md`` §2. Adapter kinds (``supernet.adapters``) are the other axis.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from supernet.compress.quant import dequantize, fake_quantize, quant_params, quantize


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or GPT-2 style ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D stores (in, out)
        return in_features, out_features
    raise TypeError(f"cannot wrap {type(layer).__name__}: only nn.Linear and Conv1D")


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight in ``nn.Linear`` orientation ``(out, in)`` (a view for ``Conv1D``)."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


@torch.no_grad()
def set_linear_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """``layer.weight = w`` with ``w`` ``(out, in)``, in the layer's dtype and orientation."""
    target = layer.weight
    w = w.detach().to(device=target.device, dtype=target.dtype)
    target.copy_(w.t() if isinstance(layer, Conv1D) else w)


@torch.no_grad()
def cut_linear(layer: nn.Linear, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding only the kept input columns and output rows (and bias entries)."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"only nn.Linear layers can be cut, not {type(layer).__name__}")
    w = layer.weight
    if keep_out is not None:
        w = w[keep_out.to(w.device)]
    if keep_in is not None:
        w = w[:, keep_in.to(w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if layer.bias is not None:
        new.bias.copy_(layer.bias if keep_out is None else layer.bias[keep_out.to(w.device)])
    new.requires_grad_(layer.weight.requires_grad)
    return new


class FrozenBase(nn.Module):
    """A dense frozen layer. Subclasses change the weight's structure, never the interface.

    Args:
        layer: the ``nn.Linear`` / ``Conv1D`` to freeze; its parameters stop requiring grad.
    """

    kind = "dense"
    pattern: str | None = None  # how a pruned base was pruned (unstructured, 2:4, ...), for manifests
    bits: int | None = None  # integer bits of a quantised base; None for floating point
    group_size: int | None = None

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = layer_shape(layer)
        self.layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        self.register_buffer("keep", None, persistent=False)  # pruned bases set their mask here

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def weight(self) -> torch.Tensor:
        """The effective frozen weight ``(out, in)`` that the forward pass uses."""
        return linear_weight(self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    @property
    def compressed(self) -> bool:
        """Whether the base is pruned or quantised (not the dense original)."""
        return self.bits is not None or self.keep is not None

    def mask(self) -> torch.Tensor | None:
        """Boolean ``(out, in)`` of the kept weights, or None when nothing was pruned."""
        return self.keep

    def restrict(self, delta: torch.Tensor) -> torch.Tensor:
        """An update restricted to the base's structure (the pruned positions get none)."""
        return delta if self.keep is None else delta * self.keep

    def merge(self, delta: torch.Tensor, through: bool = False) -> torch.Tensor:
        """``W + delta`` in fp32, ``(out, in)``; differentiable in ``delta``.

        ``through``: the update respects the base's transform (SparsePEFT / QA-SparsePEFT),
        so the result keeps the base's zeros (and, quantised, lies on its integer grid).
        """
        return self.weight().float() + (self.restrict(delta) if through else delta).float()

    def cut(self, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> FrozenBase:
        """This base with only the kept input columns and output rows (elastic width): the same
        kind, its buffers (mask, integers, scales and zero points, ``W^p``) sliced alike. A
        quantised base's kept columns must be whole groups."""
        new = copy.copy(self)
        new._parameters, new._buffers, new._modules = {}, {}, {}
        new.layer = cut_linear(self.layer, keep_in, keep_out)
        new.in_features, new.out_features = layer_shape(new.layer)
        for name, t in self._buffers.items():
            new._buffers[name] = None if t is None else self._cut_buffer(t, keep_in, keep_out)
        return new

    def _cut_buffer(self, t: torch.Tensor, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None):
        if keep_out is not None:
            t = t[keep_out.to(t.device)]
        if keep_in is None:
            return t.clone()
        if t.shape[1] == self.in_features:
            return t[:, keep_in.to(t.device)].clone()
        g = self.group_size  # (out, in / g): scale and zero point per group of input columns
        if keep_in.numel() % g:
            raise ValueError(f"kept columns must be whole quantisation groups of {g}")
        groups = keep_in.view(-1, g)
        if not bool((groups == groups[:, :1] + torch.arange(g)).all()) or bool((groups[:, 0] % g).any()):
            raise ValueError(f"kept columns must be whole quantisation groups of {g}")
        return t[:, (groups[:, 0] // g).to(t.device)].clone()

    def column_align(self) -> int:
        """How many consecutive input columns must be kept or cut together: a quantisation group,
        an N:M block (``pattern`` ``N:M``), or 1."""
        align = self.group_size if self.bits is not None and self.group_size else 1
        if self.pattern and ":" in self.pattern:
            align = math.lcm(align, int(self.pattern.split(":")[1]))
        return align

    # ------------------------------------------------------------------ costs
    def nnz(self) -> int:
        m = self.mask()
        return self.in_features * self.out_features if m is None else int(m.sum())

    def macs_per_token(self) -> int:
        """Multiply-accumulates per input row: one per stored (non-zero) weight."""
        return self.nnz()

    def params(self) -> int:
        """Stored weight values (non-zeros where sparse) plus the bias."""
        return self.nnz() + (self.bias.numel() if self.bias is not None else 0)

    def weight_bytes(self) -> int:
        """Bytes of the weight as deployed at this base's precision and structure."""
        return self.nnz() * self.layer.weight.element_size()

    def bias_bytes(self) -> int:
        return self.bias.numel() * self.bias.element_size() if self.bias is not None else 0

    def dense_nbytes(self) -> int:
        """Bytes of the layer stored dense in its float dtype (what a plain merge ships)."""
        return self.layer.weight.numel() * self.layer.weight.element_size() + self.bias_bytes()

    def nbytes(self) -> int:
        return self.weight_bytes() + self.bias_bytes()

    def describe(self) -> dict:
        """What a manifest records about this layer."""
        total = self.in_features * self.out_features
        return {"kind": self.kind, "shape": [self.out_features, self.in_features],
                "sparsity": 1.0 - self.nnz() / total, "bits": self.bits, "group_size": self.group_size,
                "params": self.params(), "bytes": self.nbytes()}

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}"


class MaskedBase(FrozenBase):
    """A pruned layer: ``W ⊙ M`` with a fixed boolean mask ``M`` ``(out, in)``.

    The layer's weight is zeroed in place where the mask is False. Deployed as a sparse
    bitmask: the non-zero values plus one bit per position.
    """

    kind = "sparse"

    def __init__(self, layer: nn.Module, mask: torch.Tensor) -> None:
        super().__init__(layer)
        if mask.shape != (self.out_features, self.in_features):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {(self.out_features, self.in_features)}")
        self.keep = mask.to(device=layer.weight.device, dtype=torch.bool)
        set_linear_weight(layer, linear_weight(layer) * self.keep)

    def weight_bytes(self) -> int:
        """compressed-tensors ``sparse-bitmask``: the non-zero values, one bit per position,
        and an int64 row offset per row."""
        return (self.nnz() * self.layer.weight.element_size() + self.out_features * math.ceil(self.in_features / 8)
                + self.out_features * 8)


class QuantizedBase(FrozenBase):
    """Asymmetric group-wise INT4/INT8 weights with frozen ``(scale, zero)``, optionally pruned first.

    Holds the integers ``q`` (uint8), ``scale`` and ``zero`` (fp32, ``(out, in / g)``) and the
    pre-quantisation weight ``W^p`` (pruned, fp32) that QA-SparsePEFT trains through. The layer's
    own weight is set to ``s (q - z)`` so that the forward pass is a plain dense matmul.

    Args:
        layer: the layer to quantise (its weight is replaced by the dequantised one).
        bits: 4 or 8.
        group_size: input columns per ``(scale, zero)``; must divide the width.
        mask: optional pruning mask applied before quantisation.
        keep_source: keep ``W^p`` (fp32, the size of the weight) for QA-SparsePEFT; without it the
            base serves plain adapters only and takes half the memory.
    """

    kind = "quantized"

    def __init__(self, layer: nn.Module, bits: int, group_size: int, mask: torch.Tensor | None = None,
                 keep_source: bool = True) -> None:
        super().__init__(layer)
        w = linear_weight(layer).detach().float()
        if mask is not None:
            if mask.shape != w.shape:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {tuple(w.shape)}")
            w = w * mask.to(w.device)
        self.bits, self.group_size = int(bits), int(group_size)
        scale, zero = quant_params(w, self.bits, self.group_size)
        self.register_buffer("source", w if keep_source else None, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("qweight", quantize(w, scale, zero, self.bits, self.group_size), persistent=False)
        self.keep = None if mask is None else mask.to(w.device, torch.bool)
        set_linear_weight(layer, dequantize(self.qweight, scale, zero, self.group_size))

    def merge(self, delta: torch.Tensor, through: bool = False) -> torch.Tensor:
        """Plain: ``s (q - z) + delta`` (fp32, off the grid). Through (QA-SparsePEFT):
        ``fake_quant(W^p + delta ⊙ M)`` on the frozen grid, straight-through in the backward pass."""
        if not through:
            return super().merge(delta, through=False)
        if self.source is None:
            raise RuntimeError("this quantised base was built without its pre-quantisation weight (keep_source)")
        return fake_quantize(self.source + self.restrict(delta).float(), self.scale, self.zero, self.bits,
                             self.group_size)

    def integers(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The deployed integers ``q`` (uint8 ``(out, in)``) of ``W^p + delta ⊙ M``; the base's own without delta."""
        if delta is None:
            return self.qweight
        if self.source is None:
            raise RuntimeError("this quantised base was built without its pre-quantisation weight (keep_source)")
        return quantize(self.source + self.restrict(delta).float(), self.scale, self.zero, self.bits, self.group_size)

    def weight_bytes(self) -> int:
        """compressed-tensors ``pack-quantized``: every position's integer (a pruned one is ``z``)
        packed into int32 words along the rows, a scale per group in the layer's dtype, and the
        zero points packed into int32 words along the output axis."""
        groups = self.in_features // self.group_size
        packed = self.out_features * math.ceil(self.in_features * self.bits / 32) * 4
        zeros = math.ceil(self.out_features * self.bits / 32) * groups * 4
        return packed + self.out_features * groups * self.layer.weight.element_size() + zeros

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def frozen_base(layer: nn.Module, mask: torch.Tensor | None = None, bits: int | None = None,
                group_size: int = 128, keep_source: bool = True) -> FrozenBase:
    """The frozen base for a layer: quantised when ``bits`` is given, else masked when a mask is, else dense."""
    if bits is not None:
        return QuantizedBase(layer, bits, group_size, mask, keep_source)
    if mask is not None:
        return MaskedBase(layer, mask)
    return FrozenBase(layer)

