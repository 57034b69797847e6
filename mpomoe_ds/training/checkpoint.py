"""Checkpoint bookkeeping around DeepSpeed's own save/load, and atomic result files.

Owns: where checkpoints live (``<output_dir>/checkpoints/step<N>``), keeping
the last K, finding the one to resume from, per-rank extra state (each rank
writes its own shard), and writing JSON/YAML results atomically.

Why nothing is lost: DeepSpeed writes a tag's files and only then updates the
``latest`` file, so a crash mid-save leaves ``latest`` on the previous,
complete checkpoint; older tags are pruned only after the new one is saved
and every rank has passed a barrier.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from mpomoe_ds.models.export import latest_tag

TAG_PATTERN = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def saved_steps(checkpoint_dir: Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    steps = [int(m.group(1)) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(steps)


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` step tags (never the latest one). Rank 0 only."""
    keep_latest = latest_tag(checkpoint_dir)
    steps = saved_steps(checkpoint_dir)
    removed = []
    for step in steps[:-keep_last] if keep_last > 0 else []:
        tag = tag_for(step)
        if tag != keep_latest:
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
            removed.append(tag)
    return removed


def rank_state_path(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    return checkpoint_dir / tag / f"mpomoe_rank{rank}_state.pt"


def save_rank_state(checkpoint_dir: Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    """This rank's own extra state (e.g. its experts' OMoE projectors), written atomically."""
    path = rank_state_path(checkpoint_dir, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_rank_state(checkpoint_dir: Path, tag: str, rank: int) -> Optional[dict[str, Any]]:
    path = rank_state_path(checkpoint_dir, tag, rank)
    return torch.load(path, weights_only=False) if path.is_file() else None
