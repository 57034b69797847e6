"""MPO reconstruction: contracting cores back into matrices, and what it costs.

This module owns the contraction of MPO cores into the dense matrix, in the
cheapest order a small dynamic programme finds (:func:`reconstruct`), the
batched contraction of many experts' auxiliary cores with one shared central
core (:func:`reconstruct_shared`, what an MPOE layer runs every step), and the
multiply-add accounting of both. Pure math: no DeepSpeed, no nn.Module.

Shape legend: I, J rows / columns of a matrix; R a bond dim; L (or E) a batch
of experts (leading batch dims are allowed in :func:`reconstruct`). A core is
``(d_{k-1}, i_k, j_k, d_k)``; see :mod:`mpomoe_ds.mpo.decomposition`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch


@functools.lru_cache(maxsize=256)
def _contraction_plan(shapes: tuple[tuple[int, int, int, int], ...]) -> tuple[int, tuple]:
    """Matrix-chain DP over the cores: (min MACs, split tree).

    A group of adjacent cores a..b contracts to shape (d_{a-1}, P(a..b), d_b)
    where P is the product of i_k * j_k. Merging [a..m] with [m+1..b] costs
    d_{a-1} * P(a..m) * d_m * P(m+1..b) * d_b multiply-adds.
    """
    n = len(shapes)
    bonds = [shapes[0][0]] + [s[3] for s in shapes]
    site = [s[1] * s[2] for s in shapes]
    prefix = [1]
    for p in site:
        prefix.append(prefix[-1] * p)

    def sites(a: int, b: int) -> int:  # product over a..b inclusive
        return prefix[b + 1] // prefix[a]

    cost = [[0] * n for _ in range(n)]
    split = [[None] * n for _ in range(n)]
    for length in range(2, n + 1):
        for a in range(0, n - length + 1):
            b = a + length - 1
            best = None
            for m in range(a, b):
                c = (cost[a][m] + cost[m + 1][b] +
                     bonds[a] * sites(a, m) * bonds[m + 1] * sites(m + 1, b) * bonds[b + 1])
                if best is None or c < best:
                    best, split[a][b] = c, m
            cost[a][b] = best

    def tree(a: int, b: int):
        if a == b:
            return a
        m = split[a][b]
        return (tree(a, m), tree(m + 1, b))

    return cost[0][n - 1], tree(0, n - 1)


def reconstruction_macs(core_shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of the cheapest contraction of cores with these shapes."""
    return _contraction_plan(tuple(tuple(int(d) for d in s[-4:]) for s in core_shapes))[0]


def _merge(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(.., a, P, m) x (.., m, Q, b) -> (.., a, P*Q, b); batch dims broadcast."""
    a, p, m = left.shape[-3:]
    _, q, b = right.shape[-3:]
    out = torch.matmul(left.reshape(*left.shape[:-3], a * p, m), right.reshape(*right.shape[:-3], m, q * b))
    return out.reshape(*out.shape[:-2], a, p * q, b)


def reconstruct(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract MPO cores back into the ``I x J`` matrix (differentiable).

    Uses the cheapest pairwise contraction order (matrix-chain DP). Leading
    batch dims broadcast, so auxiliary cores of shape ``(E, d, i, j, d')`` and a
    shared central core ``(d, i, j, d')`` give ``(E, I, J)`` in one pass.
    """
    n = len(cores)
    shapes = tuple(tuple(int(d) for d in c.shape[-4:]) for c in cores)
    _, plan = _contraction_plan(shapes)
    # Each core as (.., d_prev, i*j, d_next): site index order is (i_k, j_k).
    flat = [c.reshape(*c.shape[:-4], s[0], s[1] * s[2], s[3]) for c, s in zip(cores, shapes)]

    def contract(node):
        if isinstance(node, int):
            return flat[node]
        return _merge(contract(node[0]), contract(node[1]))

    full = contract(plan)  # (.., 1, i_1 j_1 ... i_n j_n, 1)
    batch = full.shape[:-3]
    in_factors = [s[1] for s in shapes]
    out_factors = [s[2] for s in shapes]
    full = full.reshape(*batch, *[d for k in range(n) for d in (in_factors[k], out_factors[k])])
    nb = len(batch)
    perm = list(range(nb)) + [nb + 2 * k for k in range(n)] + [nb + 2 * k + 1 for k in range(n)]
    return full.permute(perm).reshape(*batch, math.prod(in_factors), math.prod(out_factors))


def dense_matmul_macs(rows: int, cols: int, tokens: int) -> int:
    """MACs of pushing ``tokens`` vectors through a dense rows x cols matrix."""
    return rows * cols * tokens


# --------------------------------------------------------------------------- shared central core


def _merge_split(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(L, a, I1, J1, m) x (L, m, I2, J2, b) -> (L, a, I1*I2, J1*J2, b): small cores, rows stay split."""
    num, a, i1, j1, m = left.shape
    _, _, i2, j2, b = right.shape
    out = torch.bmm(left.reshape(num, a * i1 * j1, m), right.reshape(num, m, i2 * j2 * b))
    out = out.view(num, a, i1, j1, i2, j2, b).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(num, a, i1 * i2, j1 * j2, b)


def shared_plan_macs(core_shapes: Sequence[Sequence[int]], central_index: int) -> int:
    """MACs of :func:`reconstruct_shared`'s order for one expert (cores as (d, i, j, d'))."""
    shapes = [tuple(int(d) for d in s[-4:]) for s in core_shapes]
    c = central_index
    total = 0
    rows = shapes[0][1] * shapes[0][2]  # left aux block, merged left to right: (1, rows, bond)
    for d0, i, j, d1 in shapes[1:c]:
        total += rows * d0 * i * j * d1
        rows *= i * j
    cols = shapes[-1][1] * shapes[-1][2]  # right aux block, merged right to left: (bond, cols, 1)
    for d0, i, j, d1 in reversed(shapes[c + 1:-1]):
        total += d0 * i * j * d1 * cols
        cols *= i * j
    d0, i, j, d1 = shapes[c]
    total += rows * d0 * i * j * d1  # (left block) x central
    total += rows * i * j * d1 * cols  # x (right block)
    return total


def _shared_plan_applies(shapes: Sequence[Sequence[int]], central_index: int) -> bool:
    """Whether :func:`reconstruct_shared` takes its own order (else it falls back to :func:`reconstruct`)."""
    c = central_index
    return 0 < c < len(shapes) - 1 and shared_plan_macs(shapes, c) <= 1.05 * reconstruction_macs(shapes)


def shared_reconstruction_macs(core_shapes: Sequence[Sequence[int]], central_index: int) -> tuple[int, int]:
    """(all MACs, MACs of the one contraction with the bare central core) of :func:`reconstruct_shared`, per expert.

    In the order :func:`reconstruct_shared` really takes (its own or the
    fallback's). The second number matters for derivatives in the auxiliary
    cores only: a VJP skips the central's gradient in that one contraction.
    """
    shapes = [tuple(int(d) for d in s[-4:]) for s in core_shapes]
    c = central_index
    if _shared_plan_applies(shapes, c):
        rows = math.prod(i * j for _, i, j, _ in shapes[:c])
        d0, i, j, d1 = shapes[c]
        return shared_plan_macs(shapes, c), rows * d0 * i * j * d1
    total, tree = _contraction_plan(tuple(shapes))
    bonds = [shapes[0][0]] + [s[3] for s in shapes]
    site = [s[1] * s[2] for s in shapes]

    def walk(node) -> tuple[int, int, int]:  # (first core, last core, MACs of the merge with the bare central)
        if isinstance(node, int):
            return node, node, 0
        (a, m, left), (_, b, right) = walk(node[0]), walk(node[1])
        here = bonds[a] * math.prod(site[a:m + 1]) * bonds[m + 1] * math.prod(site[m + 1:b + 1]) * bonds[b + 1]
        return a, b, left + right + (here if c in node else 0)

    return total, walk(tree)[2]


def reconstruct_shared(aux_cores: Sequence[torch.Tensor], central: torch.Tensor, central_index: int) -> torch.Tensor:
    """Contract a shared central core with a batch of auxiliary cores into (L, I, J) weights.

    Same result as :func:`reconstruct` on the same cores, built for
    speed with a shared central tensor:

    1. left block: cores ``0..c-1`` per expert (small), rows ordered (i's, j's);
       right block: cores ``c+1..n-1`` (small), likewise;
    2. (left block) x central: one GEMM with the experts folded into the rows,
       so the unbatched central tensor is never expanded or copied, and its
       gradient is one GEMM with the experts in the reduction dim;
    3. x (right block): one batched GEMM, the big one (``|W| * d_{c+1}`` per expert);
    4. one permutation into (I, J) whose inner runs are the right block's j
       factors (not single j factors).

    For lossless MPOs of balanced factors this order costs the matrix-chain
    optimum ``|W| * (d_c + d_{c+1})`` per expert (checked against
    :func:`mpomoe_ds.mpo.reconstruction_macs`); where the DP finds a clearly
    cheaper order (unusual truncations, a central core at an end) this falls
    back to :func:`reconstruct`.

    Args:
        aux_cores: the n-1 auxiliary cores in core order without the central
            one, each (L, d, i, j, d').
        central: the central core (d_c, i_c, j_c, d_{c+1}), no batch dim.
        central_index: its position c among the n cores.
    """
    c = central_index
    before, after = list(aux_cores[:c]), list(aux_cores[c:])
    shapes = [tuple(t.shape[-4:]) for t in before] + [tuple(central.shape)] + [tuple(t.shape[-4:]) for t in after]
    if not _shared_plan_applies(shapes, c):
        return reconstruct(before + [central] + after)
    num = before[0].shape[0]
    left = before[0]
    for core in before[1:]:
        left = _merge_split(left, core)  # (L, 1, IL, JL, d_c)
    right = after[-1]
    for core in reversed(after[:-1]):
        right = _merge_split(core, right)  # (L, d_{c+1}, IR, JR, 1)
    _, _, il, jl, dc = left.shape
    _, ic, jc, dn = central.shape
    _, _, ir, jr, _ = right.shape
    lc = torch.mm(left.reshape(num * il * jl, dc), central.reshape(dc, ic * jc * dn))
    full = torch.bmm(lc.view(num, il * jl * ic * jc, dn), right.reshape(num, dn, ir * jr))
    full = full.view(num, il, jl, ic, jc, ir, jr).permute(0, 1, 3, 5, 2, 4, 6)
    return full.reshape(num, il * ic * ir, jl * jc * jr)
