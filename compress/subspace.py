"""Subspaces of a weight from calibration statistics (``docs/METHODS.md`` section 5).

:func:`awsvd` is the activation-aware SVD of NoRA: with ``S = diag(a)``, ``a_j`` the scale of input
feature ``j``, ``W S = U Sigma V^T`` and ``W ~ U_r Sigma_r V_r^T S^{-1}``. Its error in the spectral
norm is at most ``sigma_{r+1}(W S) * ||S^{-1}||_2``, which is ``sigma_{r+1}(W S) * kappa(S)`` here:
the scales are divided by their largest, so ``||S||_2 = 1`` (the factors' product does not change).

:func:`union_factors` is JACTUS' task-aware union of subspaces: the weight's top singular
directions joined with the input covariance's (right) and the output-gradient covariance's (left)
top eigenvectors, each truncated by an energy threshold, and the weight projected inside the union.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- JACTUS
#: The parts a union of subspaces may take besides the weight's own: ``x`` (the input
#: covariance's top eigenvectors, on the right) and ``g`` (the output-gradient covariance's, on the left).
UNION_PARTS = ("W", "x", "g")


def energy_rank(values: torch.Tensor, threshold: float) -> int:
    """The smallest ``k`` whose top-``k`` values (sorted descending, non-negative energies such as
    squared singular values or covariance eigenvalues) reach ``threshold`` of their sum; at least 1."""
    v = values.double().clamp_min(0).sort(descending=True).values
    total = float(v.sum())
    if total <= 0:
        return 1
    k = int(torch.searchsorted(torch.cumsum(v, 0) / total, torch.tensor(threshold, dtype=v.dtype)).item()) + 1
    return max(1, min(k, v.numel()))


def top_eigenvectors(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric covariance, fp64."""
    vals, vecs = torch.linalg.eigh(cov.double())
    return vals.flip(0), vecs.flip(1)


def union_basis(parts: list[torch.Tensor], tol: float = 1e-8) -> torch.Tensor:
    """An orthonormal basis of the span of the parts' columns, in the parts' order: the first
    part's span first, then each next part's directions that are new (projected off the basis so
    far; directions whose residual is below ``tol`` of their norm are dropped)."""
    basis = torch.zeros(parts[0].shape[0], 0, dtype=torch.float64)
    for part in parts:
        p = part.double()
        residual = p - basis @ (basis.T @ p)
        residual = residual - basis @ (basis.T @ residual)  # twice: orthogonality to rounding
        u, s, _ = torch.linalg.svd(residual, full_matrices=False)
        keep = s > tol * max(1.0, float(p.norm(dim=0).max()))
        basis = torch.cat([basis, u[:, keep]], dim=1)
    return basis


@dataclass
class UnionFactors:
    """A layer's JACTUS factorisation inside its union of subspaces, ordered by captured energy.

    ``left @ diag(energy.sqrt()) @ right`` approximates ``W``; a rank-``t`` layer keeps ``left[:, :t]``
    ``(out, t)``, a ``t x t`` core (initialised to the diagonal) and ``right[:t]`` ``(t, in)``.
    ``energy[j]`` is the output energy ``E||.||^2`` over the calibration inputs that component ``j``
    carries (activation-weighted: comparable across layers). ``k_w, k_i, k_o`` are the energy ranks
    of the parts and ``k_left, k_right`` the union bases' sizes.
    """

    left: torch.Tensor
    right: torch.Tensor
    energy: torch.Tensor
    k_w: int
    k_i: int
    k_o: int
    k_left: int
    k_right: int


def union_factors(weight: torch.Tensor, input_cov: torch.Tensor, grad_cov: torch.Tensor | None,
                  thresholds: dict[str, float], union: tuple[str, ...] = UNION_PARTS,
                  eps: float = 1e-6) -> UnionFactors:
    """JACTUS' steps 1-4 for one layer (``docs/METHODS.md`` section 5).

    ``U_w, V_w`` from the SVD of ``W`` truncated at the energy threshold ``thresholds["W"]`` (``k_w``);
    ``V_x`` from ``C_x`` at ``thresholds["x"]`` (``k_i``) and ``U_g`` from ``C_g`` at
    ``thresholds["g"]`` (``k_o``), each only if ``union`` names it. ``Q_L = orth([U_w U_g])``,
    ``Q_R = orth([V_w V_x])`` (:func:`union_basis`), core ``C = Q_L^T W Q_R``. The core is then
    factored activation-weighted: with ``M = (Q_R^T C_x Q_R)^{1/2}`` (eigenvalues floored at ``eps``
    of the largest), ``C M = P Lambda R^T``, so that truncating to the top ``t`` components keeps
    the most output energy ``E||C z||^2`` over the calibration inputs; ``left = Q_L P`` and
    ``right = R^T M^{-1} Q_R^T``. At full rank, with ``C_x`` well conditioned and the union spanning
    everything, ``left @ diag(Lambda) @ right == W``.
    """
    w = weight.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k_w = energy_rank(s.pow(2), thresholds["W"])
    left_parts, right_parts = [u[:, :k_w]], [vh[:k_w].T]
    k_i = k_o = 0
    if "x" in union:
        vals, vecs = top_eigenvectors(input_cov)
        k_i = energy_rank(vals, thresholds["x"])
        right_parts.append(vecs[:, :k_i])
    if "g" in union:
        if grad_cov is None:
            raise ValueError("the union with g needs the output-gradient covariance")
        vals, vecs = top_eigenvectors(grad_cov)
        k_o = energy_rank(vals, thresholds["g"])
        left_parts.append(vecs[:, :k_o])
    q_left, q_right = union_basis(left_parts), union_basis(right_parts)
    core = q_left.T @ w @ q_right
    cz = q_right.T @ input_cov.double() @ q_right
    vals, vecs = torch.linalg.eigh((cz + cz.T) / 2)
    vals = vals.clamp_min(eps * float(vals.max().clamp_min(1e-30)))
    m = vecs @ torch.diag(vals.sqrt()) @ vecs.T
    m_inv = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    p, lam, rh = torch.linalg.svd(core @ m, full_matrices=False)
    return UnionFactors(left=q_left @ p, right=rh @ m_inv @ q_right.T, energy=lam.pow(2), k_w=k_w, k_i=k_i, k_o=k_o,
                        k_left=q_left.shape[1], k_right=q_right.shape[1])
