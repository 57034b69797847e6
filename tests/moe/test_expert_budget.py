"""Expert-side parameter budget from shapes alone, checked against built layers and for Llama-7B widths."""

from __future__ import annotations

import tracemalloc

import pytest

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.params import expert_budget
from mpomoe_ds.mpo.config import MPOConfig


def built_expert_side(layer: MPOEMoE) -> int:
    central = sum(shape.numel() for shape in layer.central.full_shapes.values())
    return central + sum(p.numel() for p in layer.experts.parameters())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("max_bond", [None, 3])
def test_budget_counts_what_a_built_layer_holds(gated, max_bond):
    moe = MoEConfig(num_experts=4, ep_size=1, gated=gated)
    budget = expert_budget(32, 64, 4, gated=gated, max_bond=max_bond)
    mpo_layer = MPOEMoE(32, 64, moe, MPOConfig(max_bond=max_bond))
    plain_layer = MPOEMoE(32, 64, MoEConfig(num_experts=4, ep_size=1, gated=gated, expert_type="ffn"))
    assert budget.mpo == built_expert_side(mpo_layer)
    assert budget.plain == built_expert_side(plain_layer)


@pytest.mark.parametrize("experts", [8, 16])
def test_llama_7b_layer_budget_without_allocating(experts):
    tracemalloc.start()
    budget = expert_budget(4096, 11008, experts, gated=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20  # < 1 MiB: shapes only (one 4096 x 11008 fp32 matrix would be 180 MB)
    per_matrix = 4096 * 11008
    assert budget.central == 3 * per_matrix  # lossless: each central core holds exactly I*J
    assert budget.plain == experts * (3 * per_matrix + 2 * 11008 + 4096)
    assert budget.mpo == 3 * per_matrix + experts * (budget.auxiliary_per_expert + 2 * 11008 + 4096)
    assert budget.auxiliary_per_expert < 3 * per_matrix / 100  # < 1% of the expert's three matrices
    assert budget.ratio > experts * 0.85  # plain experts cost ~E times more
