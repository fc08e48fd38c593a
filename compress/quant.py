"""Asymmetric group-wise integer quantisation of a weight (SQFT, QLoRA; ``docs/METHODS.md`` §2).

``q = clamp(round(W / s) + z, 0, 2^n - 1)``, ``W~ = s (q - z)``, with one ``(s, z)`` per group of
``g`` consecutive input columns of each output row. Every function is pure: tensors in,
tensors out. The range of a group always contains 0 and ``z`` is an integer, so an exact zero
(a pruned weight) quantises to ``q = z`` and dequantises to exactly 0: sparsity survives.
"""

from __future__ import annotations

import torch

BITS = (4, 8)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"group size {group_size} does not divide the width {inp}")
    return w.reshape(out, inp // group_size, group_size)


def quant_params(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen ``(scale, zero)`` of ``w`` ``(out, in)``, each ``(out, in // group_size)`` fp32.

    ``s = (max - min) / (2^n - 1)`` over the group's range widened to include 0,
    ``z = round(-min / s)``; an all-zero group gets ``s = 1, z = 0``.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    g = _groups(w.detach().float(), group_size)
    qmax = 2**bits - 1
    lo = g.amin(-1).clamp(max=0.0)
    hi = g.amax(-1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integers ``q`` (uint8, ``(out, in)``) of ``w`` on the frozen grid ``(scale, zero)``."""
    g = _groups(w.detach().float(), group_size)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.to(torch.uint8).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """``s (q - z)`` as fp32, ``(out, in)``."""
    g = _groups(q.float(), group_size)
    return (scale.unsqueeze(-1) * (g - zero.unsqueeze(-1))).reshape(q.shape)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``dequantize(quantize(w))`` in the forward pass, bit for bit, with a straight-through
    estimator in the backward pass: the gradient passes unchanged where ``round(w/s) + z`` lies
    inside ``[0, 2^n - 1]`` and is zero where the clamp cuts it (QA-SparsePEFT, SQFT eq. 3-4).

    Works on ``(out, in / g, g)`` views, so the per-group scales broadcast without being expanded.
    """
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    with torch.no_grad():
        x = torch.round(_groups(w.detach().float(), group_size) / s) + z
        hard = (s * (torch.clamp(x, 0, 2**bits - 1) - z)).reshape(w.shape).to(w.dtype)
        inside = ((x >= 0) & (x <= 2**bits - 1)).reshape(w.shape)
    return hard + (w - w.detach()) * inside  # the second term is exactly 0 forward


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last axis, the even column in the low nibble:
    ``(out, in)`` uint8 in 0..15 -> ``(out, in // 2)`` uint8."""
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even width")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
