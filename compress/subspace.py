"""Subspaces of a weight from calibration statistics (``docs/METHODS.md`` section 3).

:func:`awsvd` is the activation-aware SVD of NoRA: with ``S = diag(a)``, ``a_j`` the scale of input
feature ``j``, ``W S = U Sigma V^T`` and ``W ~ U_r Sigma_r V_r^T S^{-1}``. Its error in the spectral
norm is at most ``sigma_{r+1}(W S) * ||S^{-1}||_2``, which is ``sigma_{r+1}(W S) * kappa(S)`` here:
the scales are divided by their largest, so ``||S||_2 = 1`` (the factors' product does not change).
"""

from __future__ import annotations

import torch

#: Feature scales below this fraction of the largest are raised to it: a feature the calibration
#: never activated would make ``S^{-1}`` unbounded (and the error bound with it).
MIN_RELATIVE_SCALE = 1e-3


def normalised_scales(scale: torch.Tensor) -> torch.Tensor:
    """The activation scales divided by their largest and floored at :data:`MIN_RELATIVE_SCALE`
    (fp64), so that ``1 = ||S||_2`` and ``kappa(S) = ||S^{-1}||_2 <= 1 / MIN_RELATIVE_SCALE``."""
    scale = scale.double()
    top = scale.max()
    if not torch.isfinite(top) or top <= 0:
        return torch.ones_like(scale)
    return (scale / top).clamp_min(MIN_RELATIVE_SCALE)


def awsvd(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` activation-aware SVD of ``weight`` ``(out, in)``.

    Args:
        weight: the frozen weight in ``nn.Linear`` orientation.
        scale: ``(in,)`` activation scales (e.g. the root mean square of each input feature over
            the calibration tokens); normalised by :func:`normalised_scales`.
        rank: ``r``, at most ``min(out, in)``.

    Returns:
        ``B0 = U_r Sigma_r`` ``(out, r)`` and ``A0 = V_r^T S^{-1}`` ``(r, in)``, fp64, with
        ``B0 @ A0`` the approximation of ``weight``.
    """
    s = normalised_scales(scale)
    u, sigma, vh = torch.linalg.svd(weight.double() * s, full_matrices=False)
    return u[:, :rank] * sigma[:rank], vh[:rank] / s


def awsvd_bound(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> float:
    """``sigma_{r+1}(W S) * kappa(S)``: the bound on ``||W - B0 A0||_2`` of :func:`awsvd`."""
    s = normalised_scales(scale)
    sigma = torch.linalg.svdvals(weight.double() * s)
    tail = float(sigma[rank]) if rank < sigma.numel() else 0.0
    return tail * float(s.max() / s.min())
