"""Expert-diversity metrics against independent formulas (mpomoe_ds.diversity)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.experts import activation_function
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.omoe.diversity import (
    dense_expert_outputs,
    expert_similarity,
    linear_cka,
    model_expert_similarity,
    pairwise_cka,
    pairwise_cosine,
)


def hsic_cka(x_ND: torch.Tensor, y_ND: torch.Tensor) -> float:
    """Independent oracle: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(K H L H)."""
    x, y = x_ND.double(), y_ND.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def loop_cosine(y_END: torch.Tensor) -> torch.Tensor:
    num = y_END.shape[0]
    out = torch.zeros(num, num, dtype=torch.float64)
    for e in range(num):
        for f in range(num):
            out[e, f] = F.cosine_similarity(y_END[e].double(), y_END[f].double(), dim=-1).mean()
    return out


def random_orthogonal(dim: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_identical_experts_have_similarity_one() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(1, 50, 8, generator=gen).expand(4, -1, -1)
    sim = expert_similarity(y)
    assert sim.cosine == pytest.approx(1.0, abs=1e-12)
    assert sim.cka == pytest.approx(1.0, abs=1e-12)
    assert sim.cosine_EE.shape == (4, 4) and sim.num_tokens == 50


def test_orthogonal_outputs_have_similarity_zero() -> None:
    # Expert e writes only coordinates [4e, 4e+4), so per-token outputs are orthogonal
    # (cosine 0); its 4 features are columns of an orthonormal, centred token basis U
    # disjoint from the other experts' columns, so centred X_e^T X_f = 0 (CKA 0).
    gen = torch.Generator().manual_seed(1)
    n = 40
    centred = torch.randn(n, 12, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(centred - centred.mean(0))
    y = torch.zeros(3, n, 12, dtype=torch.float64)
    for e in range(3):
        y[e, :, 4 * e:4 * e + 4] = u[:, 4 * e:4 * e + 4] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    sim = expert_similarity(y)
    assert sim.cosine == pytest.approx(0.0, abs=1e-12)
    assert sim.cka == pytest.approx(0.0, abs=1e-12)
    shifted = expert_similarity(y + torch.randn(3, 1, 12, generator=gen, dtype=torch.float64))
    assert shifted.cka == pytest.approx(0.0, abs=1e-12)  # CKA ignores per-expert constant offsets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cka_matches_hsic_formula_on_both_paths(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Few tokens, wide features -> token-Gram path; many tokens, narrow -> feature path.
    for n, d in ((12, 40), (200, 5)):
        y = torch.randn(3, n, d, generator=gen, dtype=torch.float64)
        y[1] += 0.7 * y[0]  # correlated pair, so values are away from 0 and 1
        got = pairwise_cka(y)
        for e in range(3):
            for f in range(3):
                assert float(got[e, f]) == pytest.approx(hsic_cka(y[e], y[f]), abs=1e-10)


def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(10, 10, generator=gen, dtype=torch.float64) * 0.3 + torch.randn(64, 10, generator=gen,
                                                                                       dtype=torch.float64)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95
    q1, q2 = random_orthogonal(10, gen), random_orthogonal(10, gen)
    assert linear_cka(3.0 * x @ q1, 0.01 * y @ q2) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 5.0 * x @ q1) == pytest.approx(1.0, abs=1e-10)
    # Not invariant to a non-isotropic scaling (a sanity check that the test can fail).
    assert abs(linear_cka(x, y * torch.linspace(0.1, 3.0, 10, dtype=torch.float64)) - base) > 1e-3


def test_cosine_matches_loop_formula_and_is_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(4, 30, 6, generator=gen)
    y[2] = y[1] + 0.1 * torch.randn(30, 6, generator=gen)
    got = pairwise_cosine(y)
    assert torch.allclose(got, loop_cosine(y), atol=1e-12)
    scaled = y * torch.rand(4, 30, 1, generator=gen).add(0.5)  # per expert and token
    assert torch.allclose(pairwise_cosine(scaled), got, atol=1e-12)
    sim = expert_similarity(y)
    assert sim.cosine == pytest.approx(float(got[torch.triu_indices(4, 4, 1).unbind()].mean()), abs=1e-7)


@pytest.mark.parametrize("expert_type", ["ffn", "mpo"])
def test_dense_expert_outputs_equal_each_expert_applied_to_every_token(expert_type: str) -> None:
    moe = MoEConfig(num_experts=4, expert_type=expert_type, expert_init="perturb", init_noise=0.2, seed=7, layers="all")
    layer = MPOEMoE(16, 32, moe, MPOConfig(num_cores=3))
    tokens = torch.randn(2, 9, 16)
    got = dense_expert_outputs(layer, tokens)
    weights, biases = layer.expert_weights(), layer.deepspeed_moe.experts.biases()
    x = tokens.reshape(-1, 16)
    act = activation_function(moe.activation)
    for e in range(4):
        want = act(x @ weights["up"][e] + biases["up"][e]) @ weights["down"][e] + biases["down"][e]
        assert torch.allclose(got[e], want, atol=1e-5)
    sim = expert_similarity(got)
    assert 0.0 < sim.cosine < 1.0 and 0.0 < sim.cka < 1.0


def test_upcycled_copies_are_identical_and_model_similarity_reports_each_layer() -> None:
    class TwoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = MPOEMoE(16, 32, MoEConfig(num_experts=4, expert_init="copy", layers="all"),
                             MPOConfig(num_cores=3), layer_id=0)
            self.b = MPOEMoE(16, 32, MoEConfig(num_experts=4, expert_init="perturb", init_noise=0.5, layers="all"),
                             MPOConfig(num_cores=3), layer_id=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x + self.a(x)[0])[0]

    model = TwoLayers()
    sims = model_expert_similarity(model, lambda: model(torch.randn(3, 5, 16)))
    assert set(sims) == {"a", "b"}
    assert sims["a"].cosine == pytest.approx(1.0, abs=1e-6) and sims["a"].cka == pytest.approx(1.0, abs=1e-6)
    assert sims["b"].cosine < 0.999 and sims["b"].num_tokens == 15
    assert math.isfinite(sims["b"].cka)
