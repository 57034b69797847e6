"""Activation checkpointing (train.activation_checkpointing) gives the same losses and gradients as without it.

fp32, gradient accumulation 2, dropout on (the recomputation must replay it),
1 process and 2 real ranks with ep_size 2. MPO experts use the per-step
reconstruction either way (a recomputation replays the cached weights).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_DS, dist_env, run_two_ranks, tiny_run_config

WORKER = ROOT / "tests" / "dist" / "steps_worker.py"
STEPS = 3


def worker_args(tmp_path, checkpointing: bool) -> list[str]:
    run = tiny_run_config(tmp_path / f"out{int(checkpointing)}", max_steps=STEPS,
                          activation_checkpointing=checkpointing)
    run["model"]["config_overrides"] = {**run["model"]["config_overrides"], "hidden_dropout_prob": 0.1}
    ds = {**TINY_DS, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    run_path, ds_path = tmp_path / f"run{int(checkpointing)}.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps(ds))
    return ["--run_config", str(run_path), "--ds_config", str(ds_path), "--steps", str(STEPS)]


def assert_same_training(off: dict, on: dict) -> None:
    assert not off["checkpointing"] and on["checkpointing"]
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-6, abs=0)
    assert len(on["grad_norms"]) == len(off["grad_norms"]) == STEPS
    for step, (a, b) in enumerate(zip(off["grad_norms"], on["grad_norms"])):
        assert a.keys() == b.keys() and any("deepspeed_experts" in k for k in a)
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-9), f"step {step} {name}"


def run_one_process(tmp_path, checkpointing: bool) -> dict:
    out = tmp_path / f"one{int(checkpointing)}"
    proc = subprocess.run([sys.executable, str(WORKER), *worker_args(tmp_path, checkpointing), "--out", str(out)],
                          cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((tmp_path / f"one{int(checkpointing)}.rank0.json").read_text())


def test_checkpointing_on_and_off_agree_in_one_process(tmp_path):
    assert_same_training(run_one_process(tmp_path, False), run_one_process(tmp_path, True))


@pytest.mark.distributed
def test_checkpointing_on_and_off_agree_on_two_ranks(tmp_path):
    off = run_two_ranks(WORKER, worker_args(tmp_path, False), tmp_path / "off")
    on = run_two_ranks(WORKER, worker_args(tmp_path, True), tmp_path / "on")
    for rank in range(2):
        assert_same_training(off[rank], on[rank])
