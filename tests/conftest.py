"""Shared test helpers: launching real 2-rank jobs on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


def run_two_ranks(script: Path, args: list[str], out_prefix: Path, timeout: int = 600) -> list[dict]:
    """Run ``script`` on 2 real ranks with torchrun; return each rank's JSON result.

    The worker writes ``{out_prefix}.rank{r}.json``; a failing worker fails the
    test with the tail of its log.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(script), *args, "--out", str(out_prefix)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"2-rank run failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")
    return [json.loads(Path(f"{out_prefix}.rank{r}.json").read_text()) for r in range(2)]
