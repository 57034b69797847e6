"""Shared checkpoint verification: ranks split the hashing, and together they still catch every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpomoe_ds.training import integrity


def checkpoint_folder(root: Path, files: int) -> Path:
    folder = root / "step2"
    for i in range(files):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"file{i}.pt").write_bytes(bytes([i]) * (100 + i))
    integrity.write_manifest(folder, {"run": 1}, {"step": 2, "train_batches": {}, "world_size": 2, "ep_size": 2})
    return folder


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_each_file_is_hashed_by_exactly_one_share(tmp_path, monkeypatch, ranks):
    folder = checkpoint_folder(tmp_path, 7)
    hashed: list[str] = []
    real = integrity.file_entry
    monkeypatch.setattr(integrity, "file_entry", lambda p: hashed.append(p.name) or real(p))
    for rank in range(ranks):
        manifest, problems = integrity.verify(folder, (rank, ranks))
        assert manifest["ep_size"] == 2 and problems == []
    assert sorted(hashed) == sorted(f"file{i}.pt" for i in range(7))


def test_a_corrupted_file_is_found_by_the_one_share_that_hashes_it(tmp_path):
    folder = checkpoint_folder(tmp_path, 5)
    bad = folder / "sub1" / "file3.pt"
    bad.write_bytes(b"\xff" * bad.stat().st_size)  # same size: only the checksum can tell
    found = [integrity.verify(folder, (rank, 2))[1] for rank in range(2)]
    assert sum(len(p) for p in found) == 1
    assert f"{bad}: SHA-256 differs" in sum(found, [])[0]
    # A size change is seen by every share (a stat, no hashing).
    bad.write_bytes(b"x")
    assert all(f"{bad}: 1 bytes" in integrity.verify(folder, (rank, 2))[1][0] for rank in range(2))

