"""Symmetry-breaking upcycling: angle 0 stays exact, and the report's init distances are what they say."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.models.hf import linear_weight_in_out
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.mpo import reconstruct
from mpomoe_ds.mpo.config import MPOConfig

VOCAB = 100


def bert(seed: int = 0) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def probe() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    if hasattr(model, "moe_aux"):
        model.moe_aux.pop()
    return out


def pretrained_weights(model: torch.nn.Module, block: int) -> dict[str, torch.Tensor]:
    layer = model.encoder.layer[block]
    return {"up": linear_weight_in_out(layer.intermediate.dense).detach().clone(),
            "down": linear_weight_in_out(layer.output.dense).detach().clone()}


def expert_matrix(layer, expert: int, matrix: str) -> torch.Tensor:
    """W_e rebuilt with the plain contraction from the expert's own cores and the central core."""
    cores = [c.detach().double() for c in layer.experts.deepspeed_experts[expert].aux_cores(matrix)]
    cores.insert(layer.mpo_config.num_cores // 2, layer.central_tensors()[matrix].detach().double())
    return reconstruct(cores)


@pytest.mark.parametrize("gauge", ["canonical", "balanced"])
@pytest.mark.parametrize("expert_init", ["copy", "perturb"])
def test_rotation_angle_zero_stays_exact_upcycling(gauge, expert_init):
    model, batch = bert(), probe()
    expected = hidden_states(model, batch)
    moe = MoEConfig(layers="all", expert_init=expert_init, init_noise=0.0, rotation_angle=0.0)
    report = convert_model(model, moe, MPOConfig(gauge=gauge), probe=batch)
    assert float((hidden_states(model, batch) - expected).abs().max()) < 1e-4
    assert report.init_output_rel_distance < 1e-5
    for b in report.blocks:
        assert all(d < 1e-5 for v in b.init_rel_distance.values() for d in v)


@pytest.mark.parametrize("options", [{"rotation_angle": 0.2}, {"rotation_angle": 1.0},
                                     {"aux_reinit_fraction": 0.3},
                                     {"rotation_angle": 0.1, "init_noise": 0.05}])
def test_reported_init_distances_equal_an_independent_recomputation(options):
    model, batch = bert(), probe()
    dense_out = hidden_states(model, batch)
    weights = {b: pretrained_weights(model, b) for b in range(2)}
    report = convert_model(model, MoEConfig(layers="all", **{"expert_init": "perturb", "init_noise": 0.0, **options}),
                           probe=batch)
    converted_out = hidden_states(model, batch)
    keep = batch["attention_mask"].bool()
    want = float((converted_out[keep] - dense_out[keep]).norm() / dense_out[keep].norm())
    assert report.init_output_rel_distance == pytest.approx(want, rel=1e-4)
    assert want > 1e-3  # the options did move the model
    for block, (_, layer) in zip(report.blocks, moe_layers(model)):
        assert set(block.init_rel_distance) == {"up", "down"}
        for m, per_expert in block.init_rel_distance.items():
            w = weights[block.index][m].double()
            recomputed = [float((expert_matrix(layer, e, m) - w).norm() / w.norm()) for e in range(4)]
            assert per_expert == pytest.approx(recomputed, rel=1e-4, abs=1e-7)
            assert len(set(per_expert)) == 4  # every expert moved differently
        assert block.mean_init_distance["up"] == pytest.approx(sum(block.init_rel_distance["up"]) / 4)
    assert report.init_distance()["output_rel"] == report.init_output_rel_distance


def test_haar_rotation_moves_experts_to_sqrt2_and_smaller_angles_less():
    """A Haar-random R has mean 0, so E||R C R' - C||^2 = 2||C||^2: relative distance ~sqrt(2) (lossless MPO)."""
    distances = {}
    for angle in (0.05, 0.3, 1.0):
        report = convert_model(bert(), MoEConfig(layers="all", expert_init="copy", rotation_angle=angle))
        distances[angle] = [d for b in report.blocks for v in b.init_rel_distance.values() for d in v]
    assert sum(distances[1.0]) / len(distances[1.0]) == pytest.approx(math.sqrt(2), abs=0.1)
    means = [sum(v) / len(v) for v in distances.values()]
    assert means[0] < means[1] < means[2]


def test_symmetry_breaking_is_seeded_per_global_expert_id():
    """The same config gives the same experts; another seed other ones (per-id seeds: see MPOEMoE._break_symmetry)."""
    def expert_cores(seed: int) -> list[torch.Tensor]:
        model = bert()
        convert_model(model, MoEConfig(layers=[0], expert_init="copy", rotation_angle=0.5, aux_reinit_fraction=0.1,
                                       seed=seed))
        layer = next(layer for _, layer in moe_layers(model))
        return [c.detach().clone() for e in layer.experts.deepspeed_experts for c in e.aux_cores("up")]

    first, again, other = expert_cores(7), expert_cores(7), expert_cores(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
