"""Mixed precision on 2 real CPU ranks: bf16 ds_configs train the converted model; fp16 is refused early on CPU.

DeepSpeed's CPU accelerator supports float32 and bfloat16, and float16 only
where oneDNN has fp16 kernels (``supported_dtypes()``; e.g. avx512_fp16 Xeons),
so fp16 runs are refused early elsewhere and belong on a GPU: scripts/gpu_check.sh.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, TINY_DS, run_two_ranks, tiny_run_config

WORKER = ROOT / "tests" / "dist" / "steps_worker.py"
STEPS = 6


def memorising_run(output_dir, **moe) -> dict:
    """One task, few examples, a high constant lr: the loss must fall within a few steps."""
    run = tiny_run_config(output_dir, max_steps=STEPS)
    run["data"]["tasks"] = [{"name": "toy_sentiment", "max_train_examples": 32, "max_eval_examples": 16}]
    run["optim"] = {"lr": 3e-3, "schedule": "constant", "warmup_steps": 0}
    run["moe"].update(moe)
    return run


def write(tmp_path, run: dict, ds: dict) -> list[str]:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    return ["--run_config", str(tmp_path / "run.yaml"), "--ds_config", str(tmp_path / "ds.json"), "--steps", str(STEPS)]


@pytest.mark.distributed
@pytest.mark.parametrize("stage, extras", [(0, {}), (2, {"central_grad_keep_prob": 0.5})], ids=["zero0", "zero2-mask"])
def test_bf16_trains_two_ranks_with_finite_falling_loss(tmp_path, stage, extras):
    run = memorising_run(tmp_path / "out", **extras)
    if extras:  # the gradient mask and OMoE under bf16 too
        run["omoe"] = {"enabled": True, "acc_steps": 2, "orth_steps": 2}
    ds = {**TINY_DS, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
    ranks = run_two_ranks(WORKER, write(tmp_path, run, ds), tmp_path / "bf16")
    for out in ranks:
        losses = out["losses"]
        assert out["finite"] and out["dtype"] == "torch.bfloat16" and len(losses) == STEPS
        assert sum(losses[-2:]) < sum(losses[:2]), losses


@pytest.mark.parametrize("has_fp16", [False, True])
def test_fp16_is_refused_before_deepspeed_with_the_fix_only_where_the_accelerator_lacks_it(monkeypatch, has_fp16):
    """DeepSpeed's CPU accelerator has fp16 only where oneDNN does (avx512_fp16 Xeons): both cases, on any host."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from mpomoe_ds.training.engine import DeepSpeedConfigError, validate_ds_config

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: has_fp16)
    config, model = {**TINY_DS, "fp16": {"enabled": True}}, torch.nn.Linear(2, 2)
    if has_fp16:
        validate_ds_config(config, model)
    else:
        with pytest.raises(DeepSpeedConfigError, match=r"fp16.enabled.*bf16.enabled"):
            validate_ds_config(config, model)
