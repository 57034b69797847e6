"""Projector math of OMoE: the OWM recursion, its closed form, the mean projector of the others.

Pure functions on tensors; the formulas are in each docstring and the method
in :mod:`mpomoe_ds.omoe`. Shape legend: L local experts, I input dim of a
projected matrix, O its output dim, K recorded inputs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def owm_update(P_LII: torch.Tensor, r_LI: torch.Tensor, alpha: float,
               present_L: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One OWM step per expert: ``k = P r; P <- P - k k^T / (alpha + r^T k)`` (out of place).

    ``present_L`` (bool) skips experts without an input this step. The update
    is exactly symmetric (an outer product), so symmetric P stay symmetric.
    """
    k_LI = torch.bmm(P_LII, r_LI.unsqueeze(-1)).squeeze(-1)
    denom_L = alpha + (r_LI * k_LI).sum(-1)
    step_LII = k_LI.unsqueeze(-1) * k_LI.unsqueeze(-2) / denom_L.view(-1, 1, 1)
    if present_L is not None:
        step_LII = step_LII * present_L.to(step_LII.dtype).view(-1, 1, 1)
    return P_LII - step_LII


def owm_projector(A_IK: torch.Tensor, alpha: Any) -> torch.Tensor:
    """Closed form ``P = I - A (A^T A + diag(alpha))^{-1} A^T`` for inputs as the columns of A.

    ``alpha`` is a scalar or one value per column (the per-step alphas of the
    recursion). Equals K applications of :func:`owm_update` in exact arithmetic.
    """
    dim, count = A_IK.shape
    eye_I = torch.eye(dim, dtype=A_IK.dtype, device=A_IK.device)
    if count == 0:
        return eye_I
    alpha_K = torch.as_tensor(alpha, dtype=A_IK.dtype, device=A_IK.device).expand(count)
    gram_KK = A_IK.T @ A_IK + torch.diag(alpha_K)
    return eye_I - A_IK @ torch.linalg.solve(gram_KK, A_IK.T)


def mean_other_projector(sum_II: torch.Tensor, P_LII: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``P_bar_{-i} = (sum_j P_j - P_i) / (E - 1)`` for each local expert i."""
    if num_experts < 2:
        raise ValueError("the mean projector of the other experts needs at least 2 experts")
    return (sum_II.unsqueeze(0) - P_LII) / (num_experts - 1)


def project_input_dim(P_LII: torch.Tensor, G_LIO: torch.Tensor) -> torch.Tensor:
    """``P_i G_i`` per expert (x @ W orientation: the projection acts on the input dim)."""
    return torch.bmm(P_LII.to(device=G_LIO.device, dtype=G_LIO.dtype), G_LIO)
