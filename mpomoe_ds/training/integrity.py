"""Checkpoint integrity: a manifest per checkpoint, verified before anything is loaded.

Owns: ``<tag>/manifest.json`` (every file of the checkpoint with its size and
SHA-256, the run config and the data plan), written and fsynced by rank 0
after every rank has written its files and before ``latest`` moves; and on
``--resume`` the choice of the newest checkpoint that verifies, falling back
(loudly, naming the bad file) past ones that do not.

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


def verify(folder: Path) -> tuple[Optional[dict[str, Any]], list[str]]:
    """(manifest, problems): problems is empty iff every listed file exists with its size and checksum."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, [f"{path}: missing (the save did not complete)"]
    try:
        manifest = checkpoint.read_json(path)
    except ValueError as err:
        return None, [f"{path}: unreadable ({err})"]
    problems = []
    for name, want in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{file}: missing")
            continue
        size = file.stat().st_size
        if size != want["size"]:
            problems.append(f"{file}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif file_entry(file)["sha256"] != want["sha256"]:
            problems.append(f"{file}: SHA-256 differs from the manifest (corrupted)")
    return manifest, problems


def candidate_tags(checkpoint_dir: Path) -> list[str]:
    """``latest`` first, then every step folder newest first."""
    latest = checkpoint.latest_tag(checkpoint_dir)
    tags = [checkpoint.tag_for(s) for s in reversed(checkpoint.saved_steps(checkpoint_dir))]
    return ([latest] if latest else []) + [t for t in tags if t != latest]


def newest_verified(checkpoint_dir: Path, warn: Callable[[str], None]) -> Optional[tuple[str, dict[str, Any]]]:
    """The checkpoint to resume from and its manifest; None if there is no checkpoint at all.

    Raises CheckpointError listing every folder checked when none verifies.
    """
    tags = candidate_tags(checkpoint_dir)
    if not tags:
        return None
    checked = []
    for tag in tags:
        manifest, problems = verify(checkpoint_dir / tag)
        if manifest is not None and not problems:
            if checked:
                warn(f"--resume: falling back to checkpoint {tag}; newer ones failed verification:\n  "
                     + "\n  ".join(checked))
            return tag, manifest
        checked.append(f"{tag}: " + "; ".join(problems))
    raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir} verifies against its manifest:\n  "
                          + "\n  ".join(checked) + "\nRestore a good copy of one of them, or start a new run "
                          "(another train.output_dir, or without --resume)")
