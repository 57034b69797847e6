"""Gauge and bond transformations of MPO cores: the balanced gauge, bond rotations, partial re-initialisation.

An MPO's matrix W is invariant under a gauge transformation: any invertible
G on bond k, core_k -> core_k G and core_{k+1} -> G^{-1} core_{k+1}. This
module owns the transformations conversion applies to the cores:

* :func:`balance`: the scalar gauge that gives every core the same RMS
  (W identical). The canonical form of :func:`mpomoe_ds.mpo.decompose` puts the
  whole norm in the central core and leaves the others orthonormal.
* :func:`rotation` / :func:`rotate_central_bonds`: a random rotation R on the
  bonds of the central core's neighbours, applied to the neighbours only (not
  compensated in the central), so W changes; in the mixed canonical form the
  rotated neighbours stay orthonormal, so ``||W||`` is kept.
* :func:`reinit_partially`: shrink a core towards a fresh Gaussian of its own scale.

Shape legend: ``core_RIJR`` = (left bond, in factor, out factor, right bond); d a bond dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mpomoe_ds.mpo.decomposition import MPO


def core_rms(cores: list[torch.Tensor]) -> list[float]:
    """Root mean square of each core's entries."""
    return [float(c.double().square().mean().sqrt()) for c in cores]


def balance(mpo: MPO) -> MPO:
    """The same MPO with every core scaled by a scalar so that all cores have equal RMS.

    core_k -> (g / rms_k) core_k with g = (prod_k rms_k)^(1/n): the scalars
    multiply to 1, so W is unchanged up to rounding, and every core's RMS is g.
    """
    rms = core_rms(mpo.cores)
    if any(r == 0.0 for r in rms):
        raise ValueError(f"cannot balance an MPO with an all-zero core (core RMS {rms})")
    target = math.exp(sum(math.log(r) for r in rms) / len(rms))
    cores = [(c.double() * (target / r)).to(c.dtype) for c, r in zip(mpo.cores, rms)]
    return MPO(cores=cores, central_index=mpo.central_index, error_bound=mpo.error_bound,
               singular_values=mpo.singular_values)


def haar_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed rotation in SO(dim), float64 (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar on O(dim)
    if torch.linalg.det(q) < 0:  # reflect one column: Haar on SO(dim)
        q[:, 0] = -q[:, 0]
    return q


def fractional_rotation(rotation_dd: torch.Tensor, angle: float) -> torch.Tensor:
    """``expm(angle * log(R))`` for R in SO(d): the point at fraction ``angle`` of the geodesic from I to R.

    R is normal, R = V diag(e^{i theta}) V^H with theta in (-pi, pi], so
    R^angle = V diag(e^{i angle theta}) V^H, real up to rounding (eigenvalues
    come in conjugate pairs); the result is re-orthonormalised by its polar factor.
    """
    if angle == 0.0:
        return torch.eye(rotation_dd.shape[0], dtype=rotation_dd.dtype)
    if angle == 1.0:
        return rotation_dd.clone()
    eigvals, vecs = torch.linalg.eig(rotation_dd.double())
    theta = torch.angle(eigvals)
    power = (vecs * torch.exp(1j * angle * theta).unsqueeze(0)) @ torch.linalg.inv(vecs)
    u, _, vh = torch.linalg.svd(power.real)
    return (u @ vh).to(rotation_dd.dtype)


def rotation(dim: int, angle: float, generator: torch.Generator) -> torch.Tensor:
    """A random rotation of SO(dim) at geodesic fraction ``angle`` of a Haar draw (0: I, 1: Haar)."""
    return fractional_rotation(haar_rotation(dim, generator), angle)


def rotate_central_bonds(aux: list[torch.Tensor], central_index: int, angle: float,
                         generator: torch.Generator) -> list[torch.Tensor]:
    """The auxiliary cores with their bonds to the central core rotated, each by its own rotation.

    ``aux`` are the cores other than the central one, in order (so
    ``aux[central_index - 1]`` is the left neighbour, ``aux[central_index]``
    the right one): left neighbour A -> A R (its right bond), right neighbour
    B -> R' B (its left bond), R and R' drawn by :func:`rotation` in that
    order. The central core is not touched, so W changes unless angle is 0.
    """
    out = list(aux)
    if central_index > 0:
        left_RIJR = aux[central_index - 1]
        rot = rotation(left_RIJR.shape[-1], angle, generator).to(left_RIJR)
        out[central_index - 1] = torch.einsum("...ijr,rs->...ijs", left_RIJR, rot)
    if central_index < len(aux):
        right_RIJR = aux[central_index]
        rot = rotation(right_RIJR.shape[-4], angle, generator).to(right_RIJR)
        out[central_index] = torch.einsum("sr,...rijt->...sijt", rot, right_RIJR)
    return out


def reinit_partially(core: torch.Tensor, fraction: float, generator: torch.Generator,
                     scale: Optional[float] = None) -> torch.Tensor:
    """``sqrt(1 - f) * core + sqrt(f) * scale * G``, G standard Gaussian; scale defaults to the core's RMS.

    Independent G keeps the expected mean square of the entries: (1 - f) rms^2 + f scale^2.
    """
    scale = core_rms([core])[0] if scale is None else scale
    noise = torch.randn(core.shape, generator=generator, dtype=torch.float64)
    return (math.sqrt(1.0 - fraction) * core.double() + math.sqrt(fraction) * scale * noise).to(core.dtype)
