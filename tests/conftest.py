"""Shared test helpers: launching real 2-rank jobs on CPU."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# DeepSpeed JIT-compiles its CPU shared-memory comm op in every new process and lets ninja decide whether
# the cached build is current. The venv's pip ninja (1.13) and a system ninja (1.11) hash the same build
# command differently, so processes that find different ninjas on PATH rebuild it in turn (25-100 s each):
# the launcher tests put the venv first, a test run from an unactivated venv did not. One PATH for all.
VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != VENV_BIN:
    os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a launcher (or the trainer's one-process start-up) puts in the environment. A child job must never
# inherit them from the test process: under mpirun every rank would read RANK=0 / WORLD_SIZE=1 and both
# would bind the same MASTER_PORT.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def dist_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(autouse=True)
def no_launcher_variables_leak_between_tests():
    """An in-process Trainer sets RANK / MASTER_PORT / ... for its world of one; later tests must not see them.

    (Its torch.distributed group is kept: DeepSpeed caches process groups module-wide, so later in-process
    runs reuse it.)
    """
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_two_ranks(script: Path, args: list[str], out_prefix: Path, timeout: int = 600,
                  nproc: int = 2) -> list[dict]:
    """Run ``script`` on ``nproc`` (default 2) real ranks with torchrun; return each rank's JSON result.

    The worker writes ``{out_prefix}.rank{r}.json``; a failing worker fails the
    test with the tail of its log.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), *args, "--out", str(out_prefix)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-rank run failed ({proc.returncode}): {' '.join(cmd)}\n"
                    f"{(proc.stdout + proc.stderr)[-6000:]}")
    return [json.loads(Path(f"{out_prefix}.rank{r}.json").read_text()) for r in range(nproc)]


# A tiny training run (random 2-layer BERT on MiniLM's tokenizer, two toy tasks) shared by
# the training and launcher tests.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_DS = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}


def tiny_run_config(output_dir: Path, **train) -> dict:
    return {
        "model": {"name_or_path": "minilm", "random_init": True, "config_overrides": TINY_BERT},
        "moe": {"num_experts": 4, "ep_size": 0, "k": 1, "expert_init": "perturb"},
        "data": {"builtin": "toy_glue", "max_seq_len": 32,
                 "tasks": [{"name": "toy_sentiment", "max_train_examples": 256, "max_eval_examples": 48},
                           {"name": "toy_topic", "max_train_examples": 256, "max_eval_examples": 48}]},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"max_steps": 6, "log_every": 2, "eval_at_start": False, "output_dir": str(output_dir),
                  "diversity_tokens": 64, "progress_bar": False, **train},
    }


@pytest.fixture
def one_thread():
    """Tiny matmuls: extra threads only add contention (up to 10x slower on a loaded 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def minilm_and_batch(texts: list[str]):
    """The packaged all-MiniLM-L6-v2 (eval mode) and ``texts`` tokenized with padding."""
    from mpomoe_ds.models.hf import load_model, load_tokenizer

    model = load_model("minilm").eval()
    return model, dict(load_tokenizer("minilm")(texts, padding=True, return_tensors="pt"))


CORPUS_WORDS = ("expert central tensor router token layer shard rank batch corpus manual page option file "
                "command system user value error default signal process memory").split()


def write_corpus(folder: Path, files: int, docs_per_file: int, seed: int) -> list[str]:
    """jsonl files of random word documents of varied length; returns the documents in file order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for f in range(files):
        lines = []
        for _ in range(docs_per_file):
            text = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 60)))
            docs.append(text)
            lines.append(json.dumps({"text": text}))
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return docs
