"""Multi-node without a cluster: two torchrun node agents on this machine equal one process with the same global batch.

Node agents ``--nnodes 2 --node_rank 0/1``, 2 ranks each (world 4, ep_size 2,
so each expert lives on two ranks, one per node, and its gradient is reduced
across the "nodes"). Reference: 1 process, micro-batch 4x larger, all experts
local. Dropout and the balance loss (a per-rank statistic) are off so the two
runs optimise the same function; the rows of each global batch are the same
(rank r reads rows [rB, (r+1)B) of it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY_DS, dist_env, free_port, tiny_run_config

WORKER = ROOT / "tests" / "dist" / "steps_worker.py"
STEPS, MICRO = 3, 2


def worker_args(tmp_path, name: str, micro: int, ep_size: int) -> list[str]:
    run = tiny_run_config(tmp_path / name, max_steps=STEPS)
    run["model"]["config_overrides"] = {**run["model"]["config_overrides"], "hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0}
    run["model"]["head_dropout"] = 0.0
    run["moe"].update(ep_size=ep_size, aux_loss_coef=0.0)
    run_path, ds_path = tmp_path / f"{name}.yaml", tmp_path / f"{name}.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps({**TINY_DS, "train_micro_batch_size_per_gpu": micro}))
    return ["--run_config", str(run_path), "--ds_config", str(ds_path), "--steps", str(STEPS),
            "--out", str(tmp_path / name)]


def start_node(node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dist_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.distributed
def test_two_node_agents_train_like_one_process_with_the_same_global_batch(tmp_path):
    port = free_port()
    nodes = [start_node(n, port, worker_args(tmp_path, "nodes", MICRO, ep_size=2)) for n in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-6000:]
    ranks = [json.loads((tmp_path / f"nodes.rank{r}.json").read_text()) for r in range(4)]
    assert [r["world"] for r in ranks] == [4] * 4

    one = subprocess.run([sys.executable, str(WORKER), *worker_args(tmp_path, "one", 4 * MICRO, ep_size=1)],
                         cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    reference = json.loads((tmp_path / "one.rank0.json").read_text())

    # Each rank's loss is the mean over its B rows: their mean is the global-batch loss.
    mean_losses = [sum(r["losses"][s] for r in ranks) / 4 for s in range(STEPS)]
    assert mean_losses == pytest.approx(reference["losses"], rel=1e-5)
    # Measured: 3e-7 relative at worst; abs covers gradients that are zero in exact arithmetic (key biases).
    for step in range(STEPS):
        want = reference["grad_norms"][step]
        for rank in ranks:  # dense gradients everywhere; each rank's two local experts, by global id
            got = rank["grad_norms"][step]
            assert set(got) <= set(want) and any("deepspeed_experts.g" in k for k in got)
            for name, value in got.items():
                assert value == pytest.approx(want[name], rel=1e-5, abs=1e-8), f"step {step} rank {rank['rank']} {name}"
