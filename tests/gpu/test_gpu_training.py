"""On one CUDA GPU (``-m gpu``, run by scripts/gpu_check.sh): bf16 and fp16 training steps, 1 process, ep_size 1.

The converted pretrained MiniLM and a GPT-2-shaped LM (random weights from a
config folder) train a few steps through the Trainer on the GPU with
finite, falling loss. Deselected by default (pyproject's addopts); the same
worker runs on CPU in tests/training/test_mixed_precision.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, dist_env

WORKER = ROOT / "tests" / "dist" / "steps_worker.py"
STEPS = 6
DS = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}


def gpu_env() -> dict[str, str]:
    env = dist_env()
    env.pop("DS_ACCELERATOR")  # DeepSpeed picks CUDA (NCCL) by itself
    return env


def gpt2_folder(tmp_path) -> str:
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=768, n_inner=3072, n_layer=4, n_head=12, vocab_size=30522, bos_token_id=0,
                            eos_token_id=0).save_pretrained(folder)
    return str(folder)


def run_steps(tmp_path, model: dict, data: dict, precision: str, lr: float) -> dict:
    run = {"model": model, "moe": {"num_experts": 4, "ep_size": 1}, "data": data,
           "optim": {"lr": lr, "schedule": "constant", "warmup_steps": 0},
           "train": {"max_steps": STEPS, "output_dir": str(tmp_path / "out"), "progress_bar": False,
                     "tensorboard": False, "eval_at_start": False}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "ds.json").write_text(json.dumps({**DS, precision: {"enabled": True}}))
    proc = subprocess.run([sys.executable, str(WORKER), "--run_config", str(tmp_path / "run.yaml"), "--ds_config",
                           str(tmp_path / "ds.json"), "--steps", str(STEPS), "--out", str(tmp_path / "r")],
                          cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((tmp_path / "r.rank0.json").read_text())


def assert_trains(result: dict, dtype: str) -> None:
    losses = result["losses"]
    assert result["device"].startswith("cuda") and result["dtype"] == dtype and result["finite"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


MINILM = ({"name_or_path": "minilm"},
          {"builtin": "toy_glue", "max_seq_len": 64, "tasks": [{"name": "toy_sentiment", "max_train_examples": 64}]})


@pytest.mark.gpu
@pytest.mark.parametrize("precision, dtype", [("bf16", "torch.bfloat16"), ("fp16", "torch.float16")])
def test_converted_minilm_trains_on_one_gpu(tmp_path, precision, dtype):
    assert_trains(run_steps(tmp_path, *MINILM, precision, lr=2e-4), dtype)  # pretrained: a fine-tuning lr


@pytest.mark.gpu
def test_gpt2_shaped_lm_trains_in_bf16_on_one_gpu(tmp_path):
    model = {"name_or_path": gpt2_folder(tmp_path), "random_init": True, "tokenizer": "minilm"}
    data = {"builtin": "toy_lm", "max_seq_len": 64, "tasks": [{"name": "toy_lm", "max_train_examples": 64}]}
    assert_trains(run_steps(tmp_path, model, data, "bf16", lr=1e-3), "torch.bfloat16")
