"""MPO (matrix product operator / tensor-train matrix) math.

This module owns the decomposition of a weight matrix into MPO cores, the
validated ``MPO`` container and its parameter accounting (reconstruction and
its cost: :mod:`mpomoe_ds.mpo.reconstruction`). It is pure math: no DeepSpeed, no nn.Module.

Shape legend (suffixes on tensor names):
    I, J   rows / columns of the matrix W (W is I x J)
    R      a bond dim d_k
    E      a batch of experts (leading batch dims are allowed everywhere)

A weight ``W`` of shape ``I x J`` with ``I = i_1...i_n`` and ``J = j_1...j_n``
is written as ``n`` cores ``T_k`` of shape ``(d_{k-1}, i_k, j_k, d_k)`` with
``d_0 = d_n = 1``.

Naming conventions:
    factors       the integers i_k (``in_factors``) and j_k (``out_factors``)
    bond dims     the d_k, boundary ones included: ``(1, d_1, ..., d_{n-1}, 1)``
    central core  the core at ``central_index`` (the middle one); in an MPOE
                  layer it is shared by all experts
    auxiliary     every other core; each expert owns its own copies

Canonical form: :func:`decompose` sweeps SVDs from both ends towards the central
core (mixed canonical form), so the cores left of the centre are left-orthonormal,
the cores right of it are right-orthonormal, and the central core carries the
norm. Each bond's index is ordered by the singular values of that bipartition of
W. Truncation happens inside the sweep (TT-SVD, Oseledets 2011), and the reported
bound ``sqrt(sum_k eps_k^2)`` (eps_k the Frobenius norm of the singular values
discarded at bond k) is exact in exact arithmetic; floating point adds roundoff
of order ``machine_eps * ||W||``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from mpomoe_ds.mpo.reconstruction import reconstruct, reconstruction_macs

DEFAULT_NUM_CORES = 5

BondSpec = Union[int, Sequence[int], None]


def _prime_factors(dim: int) -> list[int]:
    primes, p, rest = [], 2, dim
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    return primes


def _centre_out_order(n: int) -> list[int]:
    """Positions from the middle outwards: n=5 -> [2, 3, 1, 4, 0]."""
    centre = n // 2
    order = [centre]
    for step in range(1, n):
        for pos in (centre + step, centre - step):
            if 0 <= pos < n and len(order) < n:
                order.append(pos)
    return order


def factorize(dim: int, n: int = DEFAULT_NUM_CORES) -> list[int]:
    """Split ``dim`` into ``n`` integer factors > 1 whose product is ``dim``.

    The factors are balanced (largest prime first into the smallest bin) and
    placed largest-in-the-middle, so the central core gets the most parameters:
    ``factorize(3072) == [4, 4, 8, 6, 4]`` and ``factorize(768) == [3, 4, 4, 4, 4]``,
    the shapes of the reference T5 implementation. Deterministic.

    Raises:
        ValueError: if ``dim`` has fewer than ``n`` prime factors; the message
            names the dim and a shape that works.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"factorize: dim must be a positive int, got {dim!r}")
    if n < 1:
        raise ValueError(f"factorize: n must be >= 1, got {n}")
    primes = _prime_factors(dim)
    if len(primes) < n:
        hint = (f"use n <= {len(primes)} (e.g. factors {sorted(primes)}), pass explicit factors "
                f"whose product is {dim} (1s allowed), or choose a width with more small prime "
                f"factors such as {_nearest_factorable(dim, n)}")
        raise ValueError(f"cannot split dim {dim} = {' * '.join(map(str, primes)) or '1'} into {n} "
                         f"factors > 1: it has only {len(primes)} prime factors; {hint}")
    bins = [1] * n
    for p in sorted(primes, reverse=True):
        smallest = min(range(n), key=lambda b: (bins[b], b))
        bins[smallest] *= p
    factors = [0] * n
    for pos, value in zip(_centre_out_order(n), sorted(bins, reverse=True)):
        factors[pos] = value
    return factors


def _nearest_factorable(dim: int, n: int) -> int:
    """The nearest multiple of 2**n at or above dim (always splits into n factors)."""
    unit = 2 ** n
    return max(unit, -(-dim // unit) * unit)


def check_factors(dim: int, factors: Sequence[int], what: str) -> list[int]:
    """Validate explicit factors for a dim; returns them as a list of ints."""
    factors = [int(f) for f in factors]
    if any(f < 1 for f in factors):
        raise ValueError(f"{what} {factors} must all be >= 1")
    if math.prod(factors) != dim:
        raise ValueError(f"{what} {factors} multiply to {math.prod(factors)}, not {dim}; "
                         f"for example factorize({dim}, {len(factors)}) gives a valid split")
    return factors


def full_bond_dims(in_factors: Sequence[int], out_factors: Sequence[int]) -> tuple[int, ...]:
    """Lossless bond dims: d_k = min(prod_{m<=k} i_m j_m, prod_{m>k} i_m j_m)."""
    site = [i * j for i, j in zip(in_factors, out_factors)]
    n = len(site)
    return tuple(min(math.prod(site[:k]), math.prod(site[k:])) for k in range(0, n + 1))


@dataclass
class MPO:
    """A validated list of MPO cores plus what the decomposition measured.

    Attributes:
        cores: n tensors ``core_RIJR`` of shape ``(d_{k-1}, i_k, j_k, d_k)``; may
            carry leading batch dims (the same on every core, or absent on some).
        central_index: which core is the central tensor.
        error_bound: Frobenius error bound of the truncation (0.0 when lossless).
        singular_values: per bond k = 1..n-1, the singular values of that
            bipartition seen by the sweep, descending (kept and discarded).
    """

    cores: list[torch.Tensor]
    central_index: int
    error_bound: float = 0.0
    singular_values: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cores:
            raise ValueError("an MPO needs at least one core")
        shapes = [tuple(c.shape[-4:]) for c in self.cores]
        if any(c.dim() < 4 for c in self.cores):
            raise ValueError(f"MPO cores must be (..., d_prev, i, j, d_next); got shapes "
                             f"{[tuple(c.shape) for c in self.cores]}")
        if shapes[0][0] != 1 or shapes[-1][3] != 1:
            raise ValueError(f"MPO boundary bonds must be 1; core shapes {shapes}")
        for k in range(len(shapes) - 1):
            if shapes[k][3] != shapes[k + 1][0]:
                raise ValueError(f"MPO bond {k + 1} mismatch: core {k} ends with {shapes[k][3]}, "
                                 f"core {k + 1} starts with {shapes[k + 1][0]}; shapes {shapes}")
        if not 0 <= self.central_index < len(self.cores):
            raise ValueError(f"central_index {self.central_index} out of range for {len(self.cores)} cores")

    @property
    def core_shapes(self) -> list[tuple[int, int, int, int]]:
        return [tuple(c.shape[-4:]) for c in self.cores]

    @property
    def in_factors(self) -> list[int]:
        return [s[1] for s in self.core_shapes]

    @property
    def out_factors(self) -> list[int]:
        return [s[2] for s in self.core_shapes]

    @property
    def bond_dims(self) -> tuple[int, ...]:
        shapes = self.core_shapes
        return (shapes[0][0],) + tuple(s[3] for s in shapes)

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.in_factors), math.prod(self.out_factors)

    @property
    def central(self) -> torch.Tensor:
        return self.cores[self.central_index]

    @property
    def auxiliary(self) -> list[torch.Tensor]:
        return [c for k, c in enumerate(self.cores) if k != self.central_index]

    @property
    def central_params(self) -> int:
        return math.prod(self.core_shapes[self.central_index])

    @property
    def auxiliary_params(self) -> int:
        return sum(math.prod(s) for k, s in enumerate(self.core_shapes) if k != self.central_index)

    @property
    def num_params(self) -> int:
        return self.central_params + self.auxiliary_params

    def reconstruction_macs(self) -> int:
        return reconstruction_macs(self.core_shapes)

    def reconstruct(self) -> torch.Tensor:
        return reconstruct(self.cores)


def _bond_limits(max_bond: BondSpec, n: int) -> list[Optional[int]]:
    if max_bond is None:
        return [None] * (n - 1)
    if isinstance(max_bond, int):
        if max_bond < 1:
            raise ValueError(f"max_bond must be >= 1, got {max_bond}")
        return [max_bond] * (n - 1)
    limits = [int(b) for b in max_bond]
    if len(limits) != n - 1:
        raise ValueError(f"max_bond as a sequence needs one entry per inner bond ({n - 1}), got {limits}")
    if any(b < 1 for b in limits):
        raise ValueError(f"max_bond entries must be >= 1, got {limits}")
    return limits


def _rank_to_keep(s: torch.Tensor, limit: Optional[int], delta: Optional[float]) -> int:
    """Smallest rank r with discarded norm <= delta, capped by limit (at least 1)."""
    rank = s.numel()
    if delta is not None:
        # tail[r] = ||s[r:]||, the error of keeping r values.
        tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s.square(), [0]), 0), [0]))
        ok = torch.nonzero(tail <= delta)
        rank = int(ok[0]) if ok.numel() else rank
    if limit is not None:
        rank = min(rank, limit)
    return max(rank, 1)


def decompose(weight_IJ: torch.Tensor,
              in_factors: Optional[Sequence[int]] = None,
              out_factors: Optional[Sequence[int]] = None,
              n: int = DEFAULT_NUM_CORES,
              max_bond: BondSpec = None,
              rel_tol: Optional[float] = None,
              central_index: Optional[int] = None) -> MPO:
    """Decompose an ``I x J`` matrix into an MPO in mixed canonical form.

    Args:
        weight_IJ: the matrix; float32/float64 (other floats are accepted and
            decomposed in float64), any device. Cores come back in its dtype.
        in_factors / out_factors: explicit factors of I / J (default:
            :func:`factorize`). Both must have the same length.
        n: number of cores when factors are not given.
        max_bond: cap on every inner bond (int) or per bond (n-1 ints).
        rel_tol: target relative Frobenius error; split evenly over the n-1
            bonds as ``delta = rel_tol * ||W|| / sqrt(n-1)`` (TT-SVD).
        central_index: the core that carries the norm (default: n // 2).

    Returns:
        An :class:`MPO` whose ``reconstruct()`` is ``W`` (lossless) or within
        ``error_bound`` of it in Frobenius norm.
    """
    if weight_IJ.dim() != 2:
        raise ValueError(f"decompose expects a 2-D matrix, got shape {tuple(weight_IJ.shape)}")
    rows, cols = weight_IJ.shape
    if in_factors is None and out_factors is None:
        in_factors, out_factors = factorize(rows, n), factorize(cols, n)
    elif in_factors is None or out_factors is None:
        given = in_factors if in_factors is not None else out_factors
        n = len(given)
        in_factors = in_factors if in_factors is not None else factorize(rows, n)
        out_factors = out_factors if out_factors is not None else factorize(cols, n)
    in_factors = check_factors(rows, in_factors, "in_factors")
    out_factors = check_factors(cols, out_factors, "out_factors")
    if len(in_factors) != len(out_factors):
        raise ValueError(f"in_factors {in_factors} and out_factors {out_factors} must have the same length")
    n = len(in_factors)
    centre = n // 2 if central_index is None else int(central_index)
    if not 0 <= centre < n:
        raise ValueError(f"central_index {centre} out of range for {n} cores")
    limits = _bond_limits(max_bond, n)

    out_dtype = weight_IJ.dtype
    w = weight_IJ.detach().to(torch.float64)
    delta = None
    if rel_tol is not None:
        if rel_tol < 0:
            raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
        delta = rel_tol * float(torch.linalg.norm(w)) / math.sqrt(max(n - 1, 1))

    # (i_1..i_n, j_1..j_n) -> (i_1, j_1, ..., i_n, j_n): site k carries (i_k, j_k).
    w = w.reshape(*in_factors, *out_factors)
    w = w.permute([a for k in range(n) for a in (k, n + k)]).contiguous()
    site = [i * j for i, j in zip(in_factors, out_factors)]

    cores: list[Optional[torch.Tensor]] = [None] * n
    spectra: list[Optional[torch.Tensor]] = [None] * (n - 1)
    discarded_sq = 0.0

    # Left sweep: bonds 1..centre. rest_RM is (d_{k-1} * site_k, rest).
    rest = w.reshape(1, -1)
    bond = 1
    for k in range(centre):
        mat = rest.reshape(bond * site[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = _rank_to_keep(s, limits[k], delta)
        discarded_sq += float(s[r:].square().sum())
        spectra[k] = s
        cores[k] = u[:, :r].reshape(bond, in_factors[k], out_factors[k], r)
        rest = s[:r, None] * vh[:r]
        bond = r
    left_bond = bond

    # Right sweep: bonds n-1 down to centre+1 on the remainder, transposed view.
    rest = rest.reshape(left_bond, -1)  # (d_centre, site_centre * ... * site_n)
    bond = 1
    for k in range(n - 1, centre, -1):
        mat = rest.reshape(-1, site[k] * bond)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = _rank_to_keep(s, limits[k - 1], delta)
        discarded_sq += float(s[r:].square().sum())
        spectra[k - 1] = s
        cores[k] = vh[:r].reshape(r, in_factors[k], out_factors[k], bond)
        rest = u[:, :r] * s[None, :r]
        bond = r
    cores[centre] = rest.reshape(left_bond, in_factors[centre], out_factors[centre], bond)

    return MPO(cores=[c.to(out_dtype).contiguous() for c in cores],
               central_index=centre,
               error_bound=math.sqrt(discarded_sq),
               singular_values=[s.to(out_dtype) for s in spectra])
