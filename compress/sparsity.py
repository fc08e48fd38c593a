"""Pruning scores and masks as pure functions (Wanda, Sun et al. 2023; ``docs/METHODS.md`` §2).

A score is ``(out, in)``; a mask is boolean ``(out, in)``, True where the weight is kept.
Ties are broken by position (a stable sort), so a mask is a deterministic function of its scores.
"""

from __future__ import annotations

import torch


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|W_ij|``: Wanda with every input feature's norm taken as 1."""
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||_2`` with ``col_sq_norm[j] = ||X_j||^2`` over the calibration tokens."""
    if col_sq_norm.shape != (w.shape[1],):
        raise ValueError(f"feature norms of shape {tuple(col_sq_norm.shape)} do not fit weight {tuple(w.shape)}")
    return w.detach().float().abs() * col_sq_norm.float().sqrt().unsqueeze(0)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Within each output row, drop the ``floor(sparsity * in)`` lowest-scoring weights."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out, inp = scores.shape
    k = int(sparsity * inp)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of ``m`` consecutive inputs of a row keep the ``n`` highest scores."""
    out, inp = scores.shape
    if not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")
    if inp % m:
        raise ValueError(f"width {inp} is not divisible by M = {m}")
    groups = scores.reshape(out, inp // m, m)
    drop = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, drop, False)
    return mask.reshape(out, inp)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> ``(2, 4)``."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"--pattern must be unstructured or N:M such as 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"--pattern {pattern}: N must be below M and positive")
    return n, m


def prune_mask(w: torch.Tensor, col_sq_norm: torch.Tensor | None, sparsity: float, pattern: str) -> torch.Tensor:
    """The mask of one weight: Wanda scores when feature norms are given, else magnitude."""
    scores = magnitude_scores(w) if col_sq_norm is None else wanda_scores(w, col_sq_norm)
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)
