"""Resume at another world size and ep_size, Adam moments included (real ranks, through the CLI).

A run at world 2 / ep_size 2 saves at step 2; it is resumed at world 1 and at
world 2 / ep_size 1 with the same global batch (micro-batch x ranks). The
reference is an uninterrupted run at the new layout from the same start:
its per-step losses after step 2 must equal the resumed run's to rtol 1e-5
(dropout and the balance loss are off, so the math is layout-independent and
only float reduction order may differ). After the load, every parameter and
both Adam moments, gathered by global name at the new layout, must equal the
tensors saved at the old one exactly, and the expert weights the ones in
DeepSpeed's own per-expert files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY_BERT, dist_env, free_port, tiny_run_config

FAIL_FAST = 600
SAVED_AT, STEPS = 2, 4
WORKER = ROOT / "tests" / "dist" / "reshard_worker.py"


def layout_free_config(out: Path, expert_type: str, shard_central: bool = False, ep_size: int = 0) -> dict:
    """The tiny run without dropout or balance loss: its steps do not depend on the world size."""
    config = tiny_run_config(out, max_steps=STEPS, save_every=SAVED_AT, keep_last=3, log_every=1,
                             diversity_tokens=0)
    config["model"].update(head_dropout=0.0, config_overrides={**TINY_BERT, "hidden_dropout_prob": 0.0,
                                                               "attention_probs_dropout_prob": 0.0})
    config["moe"].update(aux_loss_coef=0.0, expert_type=expert_type, shard_central=shard_central, ep_size=ep_size)
    return config


def ds_config(zero: int, micro: int) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}


def write(folder: Path, name: str, data: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return path


def train(ranks: int, run: Path, ds: Path, *extra: str) -> str:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "mpomoe_ds.cli.train",
           "--config", str(run), "--deepspeed_config", str(ds), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=FAIL_FAST)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows}


def task_losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("train/task_loss/")} for row in rows}


def merged_entries(files: list[Path]) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for path in files:
        entries.update(torch.load(path, weights_only=False)["entries"])
    return entries


CASES = [  # (expert type, ZeRO stage, shard_central, new world, new ep_size)
    pytest.param("mpo", 0, False, 1, 1, id="mpo-zero0-to-world1", marks=pytest.mark.slow),  # MPO: world2-ep1 below
    pytest.param("mpo", 0, False, 2, 1, id="mpo-zero0-to-world2-ep1"),
    pytest.param("ffn", 2, False, 1, 1, id="ffn-zero2-to-world1"),
    pytest.param("ffn", 2, False, 2, 1, id="ffn-zero2-to-world2-ep1", marks=pytest.mark.slow),
    pytest.param("mpo", 2, True, 1, 1, id="mpo-zero2-shard-central-to-world1", marks=pytest.mark.slow),
    pytest.param("ffn", 0, False, 1, 1, id="ffn-zero0-to-world1", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """World 2 / ep 2 runs of STEPS steps (checkpoint at SAVED_AT), one per (expert type, ZeRO, shard), made once."""
    runs: dict[tuple, Path] = {}

    def get(expert_type: str, zero: int, shard: bool) -> Path:
        key = (expert_type, zero, shard)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"w2-{expert_type}-z{zero}")
            out = root / "run"
            run = write(root, "run.yaml", layout_free_config(out, expert_type, shard))
            train(2, run, write(root, "ds.json", ds_config(zero, 8)))
            runs[key] = out
        return runs[key]

    return get


@pytest.mark.distributed
@pytest.mark.timeout(1800)  # five launches (the saved run, the worker, resumed, reference) on a shared 2-core machine
@pytest.mark.parametrize("expert_type,zero,shard,world,ep_size", CASES)
def test_resume_at_another_world_and_ep_size_continues_like_an_uninterrupted_run(saved_runs, tmp_path, expert_type,
                                                                                  zero, shard, world, ep_size):
    saved = saved_runs(expert_type, zero, shard)
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    shutil.copytree(saved / "checkpoints", resumed / "checkpoints",
                    ignore=shutil.ignore_patterns(f"step{STEPS}"))
    (resumed / "checkpoints" / "latest").write_text(f"step{SAVED_AT}")
    ds = write(tmp_path, "ds.json", ds_config(zero, 16 // world))  # the same global batch of 16
    run = write(tmp_path, "run.yaml", layout_free_config(reference, expert_type, shard, ep_size))

    # What the loader placed, gathered back by global name at the new layout (a start-up-only --resume).
    resume_run = write(tmp_path, "resume.yaml", layout_free_config(resumed, expert_type, shard, ep_size))
    _launch_worker(world, resume_run, ds, tmp_path / "loaded")
    loaded = merged_entries(sorted(tmp_path.glob("loaded.rank*.pt")))
    folder = saved / "checkpoints" / f"step{SAVED_AT}"
    written = merged_entries(sorted((folder / "global").glob("rank*.pt")))
    assert sorted(loaded) == sorted(written)
    moments = 0
    for name, want in written.items():
        got = loaded[name]
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert (got[key] is None) == (want[key] is None), (name, key)
            if want[key] is not None:
                assert torch.equal(got[key], want[key]), (name, key)
                moments += key != "param"
        assert got["step"] == want["step"], name
    assert moments > 0
    experts_checked = 0
    for path in folder.glob("layer_*_expert_*_model_states.pt"):  # DeepSpeed's own files: global expert ids
        for name, tensor in torch.load(path, weights_only=False).items():
            assert torch.equal(loaded[name]["param"], tensor.float()), name
            experts_checked += 1
    assert experts_checked > 0
    meta = torch.load(tmp_path / "loaded.rank0.pt", weights_only=False)
    assert meta["start_step"] == SAVED_AT and meta["data_step"] == SAVED_AT

    # The continued run against an uninterrupted one at the new layout.
    log = train(world, resume_run, ds, "--resume")
    assert "resharding parameters and Adam moments by global name" in log
    train(world, run, ds)
    got, want = losses(resumed), losses(reference)
    assert sorted(got) == list(range(SAVED_AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # Per-task train losses are over all ranks: world 2's before the save equal the new layout's.
    for step in range(1, SAVED_AT + 1):
        before, after = task_losses(saved)[step], task_losses(reference)[step]
        assert before.keys() == after.keys() and before
        assert all(before[t] == pytest.approx(after[t], rel=1e-5) for t in before), step


def _launch_worker(world: int, run: Path, ds: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(free_port()), str(WORKER), "--run_config", str(run), "--ds_config", str(ds), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=FAIL_FAST)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_resume_at_another_global_batch_is_refused_naming_the_micro_batch(saved_runs, tmp_path):
    """World 1 with micro-batch 8 (global batch 8, saved 16): the task stream cannot continue exactly."""
    saved = saved_runs("mpo", 0, False)
    resumed = tmp_path / "resumed"
    shutil.copytree(saved / "checkpoints", resumed / "checkpoints")
    run = write(tmp_path, "run.yaml", layout_free_config(resumed, "mpo"))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    proc = subprocess.run([launcher, "--num_gpus", "1", "--master_port", str(free_port()), "--module",
                           "mpomoe_ds.cli.train", "--config", str(run), "--deepspeed_config",
                           str(write(tmp_path, "ds.json", ds_config(0, 8))), "moe.ep_size=1", "--resume"],
                          cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=FAIL_FAST)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "planned for a global batch of 16" in output and "set train_micro_batch_size_per_gpu to 16" in output
    assert "DeepSpeed info: version" not in output  # refused before the engine (and the model) was built
