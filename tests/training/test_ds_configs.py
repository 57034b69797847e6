"""The DeepSpeed JSON configs in ds_configs/ are valid for DeepSpeed 0.19.8 and are
what their names say.

Each file goes through DeepSpeed's own parser
(``deepspeed.runtime.config.DeepSpeedConfig``; without an initialised process group
it parses for world size 1), and every config the CPU can run (fp32, bf16) builds a
real engine around a native-MoE model and takes optimizer steps, in one subprocess
so this process never joins a process group. fp16 needs a GPU: those files are
parsed and checked, not run.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT  # noqa: E402

CONFIG_DIR = ROOT / "ds_configs"
STAGES = (0, 1, 2)
PRECISIONS = ("fp32", "bf16", "fp16")
EXPECTED = {f"zero{stage}_{precision}.json" for stage in STAGES for precision in PRECISIONS} | {"cpu_debug.json"}
ALL_CONFIGS = sorted(EXPECTED)
# (stage, precision) each file name claims
CLAIMS = {f"zero{s}_{p}.json": (s, p) for s in STAGES for p in PRECISIONS} | {"cpu_debug.json": (0, "fp32")}


def _raw(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text())


@pytest.fixture(scope="module")
def parsed() -> dict:
    from deepspeed.runtime.config import DeepSpeedConfig

    return {name: DeepSpeedConfig(str(CONFIG_DIR / name), mpu=None) for name in ALL_CONFIGS}


def test_config_dir_holds_exactly_the_documented_configs():
    assert {p.name for p in CONFIG_DIR.glob("*.json")} == EXPECTED


def test_readme_documents_every_config():
    readme = (CONFIG_DIR / "README.md").read_text()
    missing = [name for name in ALL_CONFIGS if f"`{name}`" not in readme]
    assert not missing, f"ds_configs/README.md has no row for {missing}"


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_parses_to_the_stage_and_precision_its_name_claims(parsed, name):
    cfg = parsed[name]
    stage, precision = CLAIMS[name]
    assert cfg.zero_optimization_stage == stage
    assert cfg.zero_enabled == (stage > 0)
    assert cfg.bfloat16_config.enabled == (precision == "bf16")
    assert cfg.float16_config.enabled == (precision == "fp16")
    if precision == "fp16":
        assert cfg.float16_config.loss_scale == 0  # dynamic loss scaling


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_has_the_common_training_fields(parsed, name):
    cfg, raw = parsed[name], _raw(name)
    assert cfg.optimizer_name == "adamw"
    assert cfg.scheduler_name in ("WarmupLR", "WarmupDecayLR")
    assert cfg.gradient_clipping == pytest.approx(1.0)
    assert cfg.wall_clock_breakdown is False
    assert cfg.steps_per_print >= 1
    assert cfg.train_micro_batch_size_per_gpu >= 1 and cfg.gradient_accumulation_steps >= 1
    # train_batch_size is derived, so one file works at any world size
    assert "train_batch_size" not in raw
    assert cfg.train_batch_size == (cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps *
                                    cfg.world_size)
    # the peak of the schedule is the optimizer's lr (the CLI overrides both together)
    assert cfg.scheduler_params["warmup_max_lr"] == pytest.approx(cfg.optimizer_params["lr"])
    if cfg.scheduler_name == "WarmupDecayLR":
        assert cfg.scheduler_params["total_num_steps"] > cfg.scheduler_params["warmup_num_steps"]


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_logs_to_tensorboard_under_its_own_job_name(parsed, name):
    tb = parsed[name].monitor_config.tensorboard
    assert tb.enabled is True
    assert tb.output_path == "runs/tensorboard"
    assert tb.job_name == name.removesuffix(".json")


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_holds_concrete_numbers_not_auto(name):
    text = (CONFIG_DIR / name).read_text()
    assert not re.search(r'"auto"', text), f"{name}: use concrete numbers, the CLI overrides what it owns"


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_no_config_enables_zero3_or_any_offload(parsed, name):
    zero = parsed[name].zero_config
    assert zero.stage < 3, "native MoE refuses ZeRO-3"
    assert zero.offload_optimizer is None or zero.offload_optimizer.device == "none"
    assert zero.offload_param is None or zero.offload_param.device == "none"
    # also no offload block at all in the file (MoE + ZeRO-2 offload + DeepSpeedCPUAdam crashes)
    assert "offload" not in (CONFIG_DIR / name).read_text()


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if CLAIMS[n][0] in (1, 2)])
def test_zero_1_2_configs_meet_deepspeed_moe_requirements(parsed, name):
    zero = parsed[name].zero_config
    assert zero.contiguous_gradients is True
    assert zero.reduce_scatter is True


def test_cpu_debug_uses_pytorch_adamw_and_tiny_batches(parsed):
    cfg = parsed["cpu_debug.json"]
    assert cfg.optimizer_params.get("torch_adam") is True
    assert cfg.train_micro_batch_size_per_gpu <= 4


# Runs in a subprocess: a 1-rank gloo group, a model with one native DeepSpeed MoE
# layer, 3 optimizer steps per config. FusedAdam is swapped for PyTorch's AdamW
# (torch_adam) because FusedAdam is a C++ op that takes minutes to JIT-compile on CPU;
# everything else in the file is used as written, except the TensorBoard path.
_ENGINE_SCRIPT = r"""
import json, sys
import torch, deepspeed
from deepspeed.moe.layer import MoE

out_dir, paths = sys.argv[1], sys.argv[2:]
deepspeed.init_distributed(dist_backend="gloo")

class TinyMoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        expert = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.moe = MoE(hidden_size=16, expert=expert, num_experts=4, ep_size=1, k=1)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x):
        h, l_aux, _ = self.moe(self.inp(x))
        return self.out(h).float().pow(2).mean() + 0.01 * l_aux

results = {}
for path in paths:
    cfg = json.load(open(path))
    cfg["optimizer"]["params"]["torch_adam"] = True
    cfg["tensorboard"]["output_path"] = out_dir
    dtype = torch.bfloat16 if cfg["bf16"]["enabled"] else torch.float32
    torch.manual_seed(0)
    model = TinyMoE()
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    losses, lrs = [], []
    for _ in range(3):
        loss = engine(torch.randn(cfg["train_micro_batch_size_per_gpu"], 8, 16, dtype=dtype))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        lrs.append(sched.get_last_lr()[0])
    results[path] = {"stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
                     "moe": engine.has_moe_layers, "losses": losses, "lrs": lrs,
                     "tensorboard": engine.monitor.enabled}
print("RESULTS " + json.dumps(results))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_runnable_configs_train_a_native_moe_model(tmp_path):
    runnable = [n for n in ALL_CONFIGS if CLAIMS[n][1] != "fp16"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    tb_dir = tmp_path / "tb"
    # generous timeout: a fresh machine JIT-compiles DeepSpeed's CPU shm op once
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, str(tb_dir), *[str(CONFIG_DIR / n) for n in runnable]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads(line.removeprefix("RESULTS "))

    for name in runnable:
        res, raw = results[str(CONFIG_DIR / name)], _raw(name)
        stage, precision = CLAIMS[name]
        assert res["moe"] is True
        assert res["stage"] == stage
        assert res["bf16"] == (precision == "bf16")
        assert res["tensorboard"] is True
        assert all(math.isfinite(v) and v > 0 for v in res["losses"]), (name, res["losses"])
        # linear warm-up: lr after step k is min + (max - min) * k / warmup_num_steps, k = 0, 1, 2
        sp = raw["scheduler"]["params"]
        expected = [sp["warmup_min_lr"] + (sp["warmup_max_lr"] - sp["warmup_min_lr"]) * k / sp["warmup_num_steps"]
                    for k in range(3)]
        assert res["lrs"] == pytest.approx(expected, abs=1e-12), name
        # the TensorBoard monitor wrote an event file under <output_path>/<job_name>
        assert list((tb_dir / raw["tensorboard"]["job_name"]).glob("events.out.tfevents.*")), name


def test_hostfile_example_parses_with_deepspeed_launcher():
    # launch/hostfile.example is the other file the DeepSpeed launcher reads; its
    # comments must not break DeepSpeed's parser.
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(ROOT / "launch" / "hostfile.example"))
    assert dict(pool) == {"node1": 8, "node2": 8}
