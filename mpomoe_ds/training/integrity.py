"""Checkpoint integrity: a manifest per checkpoint, verified before anything is loaded.

Owns: ``<tag>/manifest.json`` (every file of the checkpoint with its size and
SHA-256, the run config and the data plan), written and fsynced by rank 0
after every rank has written its files and before ``latest`` moves; and on
``--resume`` the choice of the newest checkpoint that verifies, falling back
(loudly, naming the bad file) past ones that do not.

Ranks verify together: each checks every file's size and hashes its share
of the files, and they combine their findings, so each file is hashed once
per resume, not once per rank, and every rank takes the same decision.

A folder without a manifest is a save that never completed (a crash before
the manifest was written) and is never loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

from mpomoe_ds.training import checkpoint

MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(RuntimeError):
    """No checkpoint could be verified; the message lists what was checked and why each failed."""


def file_entry(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of ``path``; the file is fsynced on the way (so the manifest never outlives its data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(fh.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder, the manifest and temp files excluded."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(folder: Path, run_config: dict[str, Any], client_state: dict[str, Any]) -> None:
    """Rank 0, after every rank has written its files: hash them all and write the manifest durably."""
    manifest = {"format": FORMAT, "step": client_state["step"], "world_size": client_state.get("world_size"),
                "ep_size": client_state.get("ep_size"),
                "data_plan": client_state["train_batches"], "run_config": run_config,
                "files": {str(p.relative_to(folder)): file_entry(p) for p in checkpoint_files(folder)}}
    checkpoint.atomic_write_json(folder / MANIFEST, manifest)
    fd = os.open(folder, os.O_RDONLY)  # the rename into place is durable only once the folder is synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Share = tuple[int, int]  # (this rank, ranks sharing the hashing)


def verify(folder: Path, share: Share = (0, 1)) -> tuple[Optional[dict[str, Any]], list[str]]:
    """(manifest, problems): problems is empty iff every listed file exists with its size and checksum.

    Every caller checks that every file exists with its size (a stat: cheap);
    with ``share = (r, n)`` it hashes only files r, r + n, r + 2n, ... of the
    manifest, so n ranks together hash each file once (combine their problems).
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None, [f"{path}: missing (the save did not complete)"]
    try:
        manifest = checkpoint.read_json(path)
    except ValueError as err:
        return None, [f"{path}: unreadable ({err})"]
    rank, ranks = share
    problems = []
    for index, (name, want) in enumerate(sorted(manifest.get("files", {}).items())):
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"{file}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif index % ranks == rank and file_entry(file)["sha256"] != want["sha256"]:
            problems.append(f"{file}: SHA-256 differs from the manifest (corrupted)")
    return manifest, problems


def candidate_tags(checkpoint_dir: Path) -> list[str]:
    """``latest`` first, then every step folder newest first."""
    latest = checkpoint.latest_tag(checkpoint_dir)
    tags = [checkpoint.tag_for(s) for s in reversed(checkpoint.saved_steps(checkpoint_dir))]
    return ([latest] if latest else []) + [t for t in tags if t != latest]


def _alone(problems: list[str]) -> list[str]:
    return problems


def newest_verified(checkpoint_dir: Path, warn: Callable[[str], None], *, share: Share = (0, 1),
                    combine: Callable[[list[str]], list[str]] = _alone,
                    tags: Optional[list[str]] = None) -> Optional[tuple[str, dict[str, Any]]]:
    """The checkpoint to resume from and its manifest; None if there is no checkpoint at all.

    Ranks that verify together pass the same ``tags`` (rank 0's
    :func:`candidate_tags`), their ``share`` of the hashing, and ``combine``:
    every rank's problems of one checkpoint, the same list on every rank (an
    all-gather), so all of them take the same decision.

    Raises CheckpointError listing every folder checked when none verifies.
    """
    tags = candidate_tags(checkpoint_dir) if tags is None else tags
    if not tags:
        return None
    checked = []
    for tag in tags:
        manifest, problems = verify(checkpoint_dir / tag, share)
        problems = list(dict.fromkeys(combine(problems)))  # every rank sees a missing file: name it once
        if manifest is not None and not problems:
            if checked:
                warn(f"--resume: falling back to checkpoint {tag}; newer ones failed verification:\n  "
                     + "\n  ".join(checked))
            return tag, manifest
        checked.append(f"{tag}: " + "; ".join(problems))
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir} verifies against its manifest:\n  "
                          + "\n  ".join(checked) + "\nRestore a good copy of one of them, or start a new run "
                          "(another train.output_dir, or without --resume)")
