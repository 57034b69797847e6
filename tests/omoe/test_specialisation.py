"""Specialisation metrics: expert-specific energy, router entropy, task-expert mutual information."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
from mpomoe_ds.omoe.diversity import (
    dense_expert_outputs,
    expert_specific_energy,
    router_entropy,
    task_expert_mutual_information,
)


def reference_energy(y: np.ndarray) -> float:
    """The definition, token by token: 1 - sum_n ||mean_e y_en||^2 / mean_e sum_n ||y_en||^2."""
    common = sum(float(np.sum(y[:, n].mean(0) ** 2)) for n in range(y.shape[1]))
    per_expert = np.mean([sum(float(np.sum(y[e, n] ** 2)) for n in range(y.shape[1])) for e in range(y.shape[0])])
    return 1.0 - common / per_expert


def reference_mi(counts: np.ndarray) -> float:
    """I(task; expert) = sum p(t, e) log p(t, e) / (p(t) p(e)) with p(t) uniform over tasks."""
    q = counts / counts.sum(1, keepdims=True)
    joint = q / q.shape[0]
    p_e = joint.sum(0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / (np.outer(np.full(q.shape[0], 1 / q.shape[0]), p_e))[nz])))


def test_identical_experts_have_no_specific_energy():
    y = torch.randn(1, 50, 8).expand(4, -1, -1)
    assert expert_specific_energy(y) == pytest.approx(0.0, abs=1e-12)


def test_copy_upcycled_layer_has_no_specific_energy_and_rotated_one_has_some():
    dense, x = DenseFFN.random(32, 128, seed=0), torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    copies = MPOEMoE.from_dense(dense, MoEConfig(num_experts=4, ep_size=1, expert_init="copy"))
    assert expert_specific_energy(dense_expert_outputs(copies, x)) < 1e-8
    rotated = MPOEMoE.from_dense(dense, MoEConfig(num_experts=4, ep_size=1, expert_init="copy", rotation_angle=1.0))
    assert expert_specific_energy(dense_expert_outputs(rotated, x)) > 0.1


def test_orthogonal_experts_keep_all_but_one_over_e_of_their_energy():
    y = torch.zeros(4, 3, 4)
    for e in range(4):
        y[e, :, e] = 2.0  # expert e writes only coordinate e
    assert expert_specific_energy(y) == pytest.approx(1 - 1 / 4)
    assert expert_specific_energy(torch.stack([y[0], -y[0]])) == pytest.approx(1.0)  # mean exactly zero


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_specific_energy_matches_the_token_by_token_definition(seed):
    y = torch.randn(5, 17, 6, generator=torch.Generator().manual_seed(seed)) + torch.randn(1, 17, 6)
    assert expert_specific_energy(y) == pytest.approx(reference_energy(y.double().numpy()), rel=1e-10)


def test_router_entropy_is_zero_for_one_hot_and_log_e_for_uniform_routing():
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 1]), 4).float()
    assert router_entropy(one_hot) == 0.0
    assert router_entropy(torch.full((6, 4), 0.25)) == pytest.approx(math.log(4))
    probs = torch.softmax(torch.randn(9, 5, generator=torch.Generator().manual_seed(0)), -1)
    want = float(np.mean([-sum(p * math.log(p) for p in row) for row in probs.double().tolist()]))
    assert router_entropy(probs) == pytest.approx(want, rel=1e-12)


def test_mutual_information_is_log_tasks_when_each_task_has_its_own_expert():
    own = torch.tensor([[30, 0, 0, 0], [0, 0, 12, 0], [0, 7, 0, 0]])
    assert task_expert_mutual_information(own) == pytest.approx(math.log(3))
    alike = torch.tensor([[10, 20, 30, 40], [1, 2, 3, 4]])  # same distribution, different token counts
    assert task_expert_mutual_information(alike) == pytest.approx(0.0, abs=1e-12)
    assert task_expert_mutual_information(torch.tensor([[5, 5, 0, 0]])) == 0.0  # one task: nothing to share
    mixed = torch.tensor([[8, 1, 1, 0], [2, 5, 0, 3]])
    assert task_expert_mutual_information(mixed) == pytest.approx(reference_mi(mixed.double().numpy()), rel=1e-10)
