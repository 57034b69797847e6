"""Null-space projection of MPO experts' auxiliary-core steps (``omoe.projection="null_space"``).

Pure math on tensors, no DeepSpeed. Shape legend: L local experts, I / O
input / output dim of a projected matrix, r protected directions per expert.

Why. Projecting dL/dW_e (``projection="gradient"``) does not make the *applied*
change of an MPO expert's W_e orthogonal: the map cores -> W_e is multilinear
and Adam rescales every coordinate. Measured on MPO experts under Adam (E = 4,
hidden 32, FFN 128): leak ``||Q^T dW|| / ||dW||`` 0.31 with the gradient
projection vs 0.33 without OMoE (issue 17). Here the optimizer's step is
corrected afterwards, in the auxiliary cores, so that the change of W_e does
not touch the other experts' inputs.

The method. ``W(a)`` is W_e as a function of its auxiliary cores ``a`` (the
central fixed: it is not stepped in orthogonal phases), ``J`` its Jacobian,
``Q`` (I, r) an orthonormal basis of the inputs the other experts saw. The
optimizer proposed ``a + d0``; we want the nearest step ``d`` (Euclidean in the
cores) with ``Q^T (W(a + d) - W(a)) = 0``. One Gauss-Newton iteration at the
current ``d``::

    c = Q^T (W(a + d) - W(a))                 (r, O) residual constraint
    A v = Q^T (J v)     A^T y = J^T (Q y)     (J at a + d: JVP / VJP)
    solve (A A^T) y = c by conjugate gradients; d <- d - A^T y

``newton_iters`` = 2 iterations handle the O(|d|^2) curvature of the
multilinear map; the CG is the limit: ``A A^T`` is ill-conditioned, and on 4
MPO experts (32 x 128, r = 6: 768 constraints) the leak was 0.09 after 10 CG
iterations, 0.017 after 30 (the default), 0.0012 after 100. Cost per step and
matrix: :func:`correction_macs`, about ``newton_iters * (5 cg_iters + 3) + 3``
reconstructions of the local experts plus the products with Q. ``A A^T`` is (r O) x (r O): the correction is
possible only while r * O < n_aux, the expert's number of auxiliary
parameters of that matrix (:func:`max_protected_rank`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.func import jvp, vjp

PROTECT_THRESHOLD = 0.5
"""An input direction is protected when the other experts' summed protection
``sum_{j != i} (I - P_j)`` has eigenvalue above this: at least half a unit of
"seen" along it (an OWM projector's ``I - P`` is ~1 on seen directions)."""


NEWTON_ITERS = 2
"""Gauss-Newton corrections per step (see the module doc)."""


def correction_macs(weight_macs: int, central_step_macs: int, basis_macs: int, cg_iters: int,
                    newton_iters: int = NEWTON_ITERS) -> int:
    """Multiply-adds of one orthogonal step's correction of one matrix (:meth:`LayerHooks.project_null_space`).

    Counted from the code, in units of the local experts' reconstruction
    ``F = weight_macs`` (all L experts), its contraction with the bare central
    ``K = central_step_macs`` and one product with the basis ``B = basis_macs``
    (``Q^T X`` or ``Q Y``: L * I * r * O)::

        VJP pullback  2F - K   (the central's own gradient is not needed)
        JVP           3F       (primal + tangent: torch.func.jvp gives the constant
                                central a zero tangent, so every product is doubled)
        per CG iteration:  A^T y (pullback + Q y) and A (JVP + Q^T)   = 5F - K + 2B
        per Gauss-Newton:  vjp's primal F, Q^T residual B, final A^T y = 3F - K + 2B
        around them:       W before, W before / after for the leak, its Q^T = 3F + B

    Elementwise work (CG's dot products, the step update) is left out. Checked
    against torch's FlopCounterMode in tests/omoe/test_null_space.py.
    """
    per_cg = 5 * weight_macs - central_step_macs + 2 * basis_macs
    per_newton = 3 * weight_macs - central_step_macs + 2 * basis_macs + cg_iters * per_cg
    return 3 * weight_macs + basis_macs + newton_iters * per_newton


def max_protected_rank(num_aux_params: int, out_dim: int) -> int:
    """Largest r with r * out_dim < num_aux_params: how many input directions can be held exactly."""
    return max((num_aux_params - 1) // out_dim, 0)


def protected_basis(mean_projector_LII: torch.Tensor, num_experts: int, max_rank: int) -> torch.Tensor:
    """(L, I, r) orthonormal bases of the directions the other experts protect, zero-padded columns.

    From the mean projector of the others ``P_bar_{-i}``: ``(E - 1)(I - P_bar_{-i})``
    is the others' summed protection; its eigenvectors with eigenvalue above
    :data:`PROTECT_THRESHOLD`, the ``max_rank`` strongest, form Q_i. Experts with
    fewer directions get zero columns (they constrain nothing).
    """
    num_local, dim, _ = mean_projector_LII.shape
    eye = torch.eye(dim, dtype=torch.float64, device=mean_projector_LII.device)
    protection = (num_experts - 1) * (eye - mean_projector_LII.double())
    protection = (protection + protection.transpose(-1, -2)) / 2
    values_LI, vectors_LII = torch.linalg.eigh(protection)  # ascending
    values_LI, vectors_LII = values_LI.flip(-1)[:, :max_rank], vectors_LII.flip(-1)[..., :max_rank]
    keep_Lr = (values_LI > PROTECT_THRESHOLD).to(vectors_LII.dtype)
    return (vectors_LII * keep_Lr.unsqueeze(1)).float()


def leak(delta_LIO: torch.Tensor, basis_LIr: torch.Tensor) -> torch.Tensor:
    """(L,) ``||Q^T dW|| / ||dW||`` per expert (0 where dW = 0)."""
    inside = torch.bmm(basis_LIr.transpose(1, 2).to(delta_LIO.dtype), delta_LIO)
    norm = delta_LIO.flatten(1).norm(dim=1)
    return inside.flatten(1).norm(dim=1) / norm.clamp_min(1e-30)


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert inner product of two lists of (L, ...) tensors: (L,)."""
    return sum((x * y).flatten(1).sum(1) for x, y in zip(xs, ys))


def _conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                        iters: int) -> torch.Tensor:
    """Batched CG for PSD ``apply(y) = rhs`` (one system per expert, leading dim L), from y = 0."""
    y = torch.zeros_like(rhs)
    res, direction = rhs.clone(), rhs.clone()
    rr = _dot([res], [res])
    for _ in range(iters):
        ad = apply(direction)
        curvature = _dot([direction], [ad])
        step = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr))
        shape = (-1,) + (1,) * (rhs.dim() - 1)
        y = y + step.view(shape) * direction
        res = res - step.view(shape) * ad
        rr_new = _dot([res], [res])
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        direction = res + beta.view(shape) * direction
        rr = rr_new
    return y


def project_aux_step(weight_fn: Callable[..., torch.Tensor], aux_before: Sequence[torch.Tensor],
                     aux_after: Sequence[torch.Tensor], basis_LIr: torch.Tensor, cg_iters: int = 30,
                     newton_iters: int = NEWTON_ITERS) -> list[torch.Tensor]:
    """Corrected auxiliary cores ``a + d`` whose W change is (nearly) orthogonal to Q (see module doc).

    ``weight_fn(*aux)`` maps the stacked (L, ...) auxiliary cores to (L, I, O)
    (the central fixed); it must be a pure function (JVP / VJP run through it).
    Computed and returned in float32 whatever the cores' dtype.
    """
    before = [a.detach().float() for a in aux_before]
    step = [(b.detach().float() - a) for a, b in zip(before, aux_after)]
    q = basis_LIr.float()
    w_before = weight_fn(*before)
    for _ in range(newton_iters):
        point = [a + d for a, d in zip(before, step)]
        w_now, pullback = vjp(weight_fn, *point)
        constraint = torch.bmm(q.transpose(1, 2), w_now - w_before)  # (L, r, O)

        def a_at(y_LrO: torch.Tensor) -> list[torch.Tensor]:
            return list(pullback(torch.bmm(q, y_LrO)))

        def aat(y_LrO: torch.Tensor) -> torch.Tensor:
            _, jv = jvp(weight_fn, tuple(point), tuple(a_at(y_LrO)))
            return torch.bmm(q.transpose(1, 2), jv)

        y = _conjugate_gradient(aat, constraint, cg_iters)
        step = [d - c for d, c in zip(step, a_at(y))]
    # float32, not the cores' dtype: rounding the result to bf16 here would undo the orthogonality
    # (the caller writes it to the fp32 master weights and rounds only the parameter itself).
    return [a + d for a, d in zip(before, step)]
