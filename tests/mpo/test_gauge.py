"""Gauge and bond transformations: the balanced gauge keeps W, rotations are rotations, partial re-init scales."""

from __future__ import annotations

import math

import pytest
import torch

from mpomoe_ds.mpo import decompose, reconstruct
from mpomoe_ds.mpo.gauge import (
    balance,
    core_rms,
    fractional_rotation,
    haar_rotation,
    reinit_partially,
    rotate_central_bonds,
    rotation,
)


def random_mpo(seed: int, shape=(32, 128), n: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return decompose(torch.randn(*shape, generator=gen, dtype=torch.float64), n=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [3, 5])
def test_balanced_gauge_keeps_w_and_equalises_core_rms(seed, n):
    mpo = random_mpo(seed, n=n)
    canonical_rms = core_rms(mpo.cores)
    assert max(canonical_rms) / min(canonical_rms) > 2  # the canonical form is far from balanced
    balanced = balance(mpo)
    assert torch.allclose(reconstruct(balanced.cores), reconstruct(mpo.cores), atol=1e-12, rtol=0)
    rms = core_rms(balanced.cores)
    assert max(rms) - min(rms) < 1e-12 * max(rms)
    # the common RMS is the geometric mean of the canonical ones
    assert rms[0] == pytest.approx(math.exp(sum(math.log(r) for r in canonical_rms) / n), rel=1e-12)


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_fractional_rotations_are_rotations_along_one_geodesic(dim):
    gen = torch.Generator().manual_seed(dim)
    haar = haar_rotation(dim, gen)
    eye = torch.eye(dim, dtype=torch.float64)
    assert torch.allclose(haar.T @ haar, eye, atol=1e-12) and float(torch.linalg.det(haar)) == pytest.approx(1.0)
    assert torch.equal(fractional_rotation(haar, 0.0), eye)
    assert torch.allclose(fractional_rotation(haar, 1.0), haar)
    third, two_thirds = fractional_rotation(haar, 1 / 3), fractional_rotation(haar, 2 / 3)
    for r in (third, two_thirds):
        assert torch.allclose(r.T @ r, eye, atol=1e-10) and float(torch.linalg.det(r)) == pytest.approx(1.0)
    assert torch.allclose(third @ two_thirds, haar, atol=1e-9)  # R^(1/3) R^(2/3) = R
    assert torch.allclose(third @ third, two_thirds, atol=1e-9)
    # distance from I grows with the angle
    dist = [float((fractional_rotation(haar, a) - eye).norm()) for a in (0.1, 0.4, 0.7)]
    assert dist[0] < dist[1] < dist[2]


def test_haar_rotations_average_to_zero():
    """E[R] = 0 under Haar measure on SO(d), d >= 2: the mean of many draws is small (1/sqrt(draws))."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([haar_rotation(4, gen) for _ in range(2000)]).mean(0)
    assert float(mean.abs().max()) < 0.08


@pytest.mark.parametrize("seed", [0, 3])
def test_rotating_the_central_bonds_keeps_the_norm_and_moves_w_by_the_rotation(seed):
    mpo = random_mpo(seed)
    c = mpo.central_index
    aux = mpo.auxiliary
    gen = torch.Generator().manual_seed(seed)
    rotated = rotate_central_bonds(aux, c, 1.0, gen)
    assert all(torch.equal(a, b) for k, (a, b) in enumerate(zip(aux, rotated)) if k not in (c - 1, c))
    # independent reference: the same two draws applied to the central core instead
    gen = torch.Generator().manual_seed(seed)
    left, right = rotation(aux[c - 1].shape[-1], 1.0, gen), rotation(aux[c].shape[0], 1.0, gen)
    central = torch.einsum("ar,rijs,sb->aijb", left, mpo.central, right)
    expected = reconstruct(aux[:c] + [central] + aux[c:])
    got = reconstruct(rotated[:c] + [mpo.central] + rotated[c:])
    assert torch.allclose(got, expected, atol=1e-10)
    w = mpo.reconstruct()
    assert float(got.norm()) == pytest.approx(float(w.norm()), rel=1e-10)  # neighbours stay orthonormal
    assert float((got - w).norm() / w.norm()) > 0.5
    assert torch.allclose(reconstruct(rotate_central_bonds(aux, c, 0.0, gen)[:c] + [mpo.central] + aux[c:]), w,
                          atol=1e-12)


def test_partial_reinit_interpolates_between_the_core_and_fresh_noise():
    core = random_mpo(0).cores[1]
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(reinit_partially(core, 0.0, gen), core)
    fresh = reinit_partially(core, 1.0, torch.Generator().manual_seed(5))
    noise = torch.randn(core.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(fresh, noise * core_rms([core])[0])
    half = reinit_partially(core, 0.5, torch.Generator().manual_seed(5))
    assert torch.allclose(half, math.sqrt(0.5) * core + math.sqrt(0.5) * fresh)
