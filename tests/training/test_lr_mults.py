"""Per-kind learning-rate multipliers: the optimizer groups they build and the updates they give (2 real ranks)."""

from __future__ import annotations

import json

import pytest
import yaml

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
from mpomoe_ds.moe.params import optimizer_param_groups, parameter_kind
from mpomoe_ds.training.config import OptimConfig
from mpomoe_ds.training.engine import DeepSpeedConfigError, check_lr_mults

from conftest import ROOT, TINY_DS, run_two_ranks, tiny_run_config

WORKER = ROOT / "tests" / "dist" / "lr_mult_worker.py"
LR = 1e-3


def layer() -> MPOEMoE:
    return MPOEMoE.from_dense(DenseFFN.random(32, 128, seed=0), MoEConfig(num_experts=4, ep_size=1, layers="all"))


def test_default_multipliers_give_the_groups_of_a_run_without_them():
    model = layer()
    plain = optimizer_param_groups(model, weight_decay=0.01)
    with_ones = optimizer_param_groups(model, weight_decay=0.01, lr=LR, lr_mults=OptimConfig().lr_mults)
    assert [g["name"] for g in plain] == [g["name"] for g in with_ones]
    assert all("lr" not in g for g in with_ones)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for p in g["params"]] for g in with_ones]


def test_multipliers_split_groups_by_kind_with_scaled_learning_rates():
    model = layer()
    optim = OptimConfig(lr=LR, central_lr_mult=0.25, aux_lr_mult=2.0)
    groups = optimizer_param_groups(model, weight_decay=0.01, lr=LR, lr_mults=optim.lr_mults)
    want = {"dense": LR, "central": 0.25 * LR, "expert": 2.0 * LR}
    seen = set()
    for group in groups:
        kinds = {parameter_kind(p) for p in group["params"]}
        assert len(kinds) == 1, group["name"]  # one kind per group
        kind = kinds.pop()
        assert group["lr"] == pytest.approx(want[kind])
        assert bool(group.get("moe")) == (kind == "expert")  # DeepSpeed's MoE splitter kept the lr
        # (DeepSpeed renames the expert groups after their expert-parallel group)
        assert group["weight_decay"] == (0.0 if all(p.dim() == 1 for p in group["params"]) else 0.01)
        seen.update(id(p) for p in group["params"])
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}


def test_a_ds_config_scheduler_is_refused_with_multipliers():
    scheduled = {"scheduler": {"type": "WarmupLR", "params": {}}}
    check_lr_mults(scheduled, OptimConfig())  # multipliers 1: fine
    with pytest.raises(DeepSpeedConfigError, match="remove the scheduler block"):
        check_lr_mults(scheduled, OptimConfig(central_lr_mult=0.0))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 2])
def test_frozen_central_and_doubled_aux_lr_after_one_adam_step_on_two_ranks(tmp_path, stage):
    """Adam's first step moves each coordinate by lr_group * g / (|g| + eps), i.e. by ~lr_group at most.

    central_lr_mult 0: central tensors bit-identical; aux_lr_mult 2: expert
    parameters move twice as far as dense ones; under ZeRO 0 and ZeRO 2 with
    2 experts per rank.
    """
    run = tiny_run_config(tmp_path / "run")
    run["optim"] = {"lr": LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                    "central_lr_mult": 0.0, "aux_lr_mult": 2.0}
    run_path, ds_path = tmp_path / "run.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps({**TINY_DS, "zero_optimization": {"stage": stage}}))
    ranks = run_two_ranks(WORKER, ["--run_config", str(run_path), "--ds_config", str(ds_path)], tmp_path / "out")
    for result in ranks:
        assert result["zero_stage"] == stage
        moved = result["moved"]
        assert moved["central"] == 0.0
        assert moved["dense"] == pytest.approx(LR, rel=1e-3)
        assert moved["expert"] == pytest.approx(2 * LR, rel=1e-3)
        assert sorted({round(g["lr"] / LR, 9) for g in result["groups"]}) == [0.0, 1.0, 2.0]
