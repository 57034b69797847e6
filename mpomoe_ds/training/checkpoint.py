"""Checkpoint bookkeeping around DeepSpeed's own save/load, and atomic result files.

Owns: where checkpoints live (``<output_dir>/checkpoints/step<N>``), keeping
the last K, finding the one to resume from, per-rank extra state (each rank
writes its own shard), and writing JSON/YAML results atomically.

Why nothing is lost: every rank writes its files, rank 0 then writes the
tag's manifest (:mod:`mpomoe_ds.training.integrity`) and only then updates
``latest``, so a crash mid-save leaves ``latest`` on the previous, complete
checkpoint; older tags are pruned only after the new one is saved and every
rank has passed a barrier, and so are step folders newer than ``latest``
without a manifest (saves that crashed). Result files are written atomically,
readable by the group (the umask applies, not mkstemp's 0600), and never
contain NaN (non-finite floats become null, so they stay valid JSON).
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
from mpomoe_ds.training.guard import finite_or_none

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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON with non-finite floats as null (strict JSON parsers reject NaN)."""
    text = json.dumps(finite_or_none(data), indent=2, sort_keys=True, default=float, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    """A JSON file; ValueError (naming the file) if it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def saved_steps(checkpoint_dir: Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    steps = [int(m.group(1)) for p in checkpoint_dir.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(steps)


def prune(checkpoint_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` step tags (never the latest one), and crashed saves. Rank 0 only.

    A crashed save is a step folder newer than ``latest`` without a manifest.
    """
    keep_latest = latest_tag(checkpoint_dir)
    latest_step = int(TAG_PATTERN.match(keep_latest).group(1)) if keep_latest and TAG_PATTERN.match(keep_latest) else -1
    steps = saved_steps(checkpoint_dir)
    old = set(steps[:-keep_last]) if keep_last > 0 else set()
    crashed = {s for s in steps if s > latest_step and not (checkpoint_dir / tag_for(s) / "manifest.json").is_file()}
    removed = []
    for step in sorted(old | crashed):
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
