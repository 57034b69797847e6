"""mpomoe-prepare from a data set read with ``datasets`` streaming (mpomoe_ds.data.hub_source): offline, through
load_dataset's json builder and a local folder, checked against the local-file path on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mpomoe_ds.cli.prepare import main as prepare_main
from mpomoe_ds.data.hub_source import HubSource
from mpomoe_ds.data.prepare import prepare_corpus, read_index
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.models.hf import load_tokenizer

from conftest import write_corpus


def prepare(sources, out, **kwargs):
    return prepare_corpus(sources, "minilm", out, load_tokenizer=load_tokenizer, docs_per_part=25,
                          validation_fraction=0.1, progress=False, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two jsonl files of 50 documents: parts of 25 fall on the same documents for files and for the stream."""
    root = tmp_path_factory.mktemp("hub")
    write_corpus(root / "src", files=2, docs_per_file=50, seed=9)
    local = prepare([str(root / "src")], root / "local")
    return root, sorted(str(p) for p in (root / "src").glob("*.jsonl")), local


def shard_bytes(folder) -> dict[str, bytes]:
    index = read_index(folder)
    return {s["file"]: (folder / s["file"]).read_bytes() for split in ("train", "validation")
            for s in index["splits"][split]["shards"]}


def split_stream(folder, split: str) -> np.ndarray:
    index = read_index(folder)
    return np.concatenate([np.fromfile(folder / s["file"], dtype=index["dtype"])
                           for s in index["splits"][split]["shards"]])


def test_a_streamed_json_data_set_prepares_the_same_shards_as_the_files(files):
    root, paths, local = files
    streamed = prepare(HubSource("json", data_files=tuple(paths)), root / "streamed")
    assert streamed.tokens == local.tokens and streamed.documents == local.documents
    assert (streamed.parts_done, streamed.parts_reused) == (4, 0) and streamed.documents["validation"] > 0
    assert shard_bytes(root / "streamed") == shard_bytes(root / "local")  # byte for byte, shard by shard
    index = read_index(root / "streamed")
    assert index["sources"] == [{"hf_dataset": "json", "hf_config": None, "hf_split": "train", "text_field": "text",
                                 "data_files": paths}]


def test_a_local_folder_streams_in_file_order_in_parallel(files, tmp_path):
    root, _, _ = files
    report = prepare(HubSource(str(root / "src")), tmp_path / "folder", num_workers=2)
    assert report.parts_done == 4
    for split in ("train", "validation"):
        assert np.array_equal(split_stream(tmp_path / "folder", split), split_stream(root / "local", split))


def test_a_stream_resumes_by_document_count_and_refuses_a_changed_stream(files, tmp_path):
    root, paths, _ = files
    out = tmp_path / "resumed"
    prepare(HubSource("json", data_files=tuple(paths)), out)
    (out / "parts" / "part_00002.json").unlink()  # as if killed before part 2 finished
    report = prepare(HubSource("json", data_files=tuple(paths)), out)
    assert (report.parts_done, report.parts_reused) == (1, 3)
    assert shard_bytes(out) == shard_bytes(root / "local")
    with pytest.raises(DataError, match="data set changed"):
        prepare(HubSource("json", data_files=tuple(paths[:1])), out)
    # Same files, other content: the skipped parts no longer hash as prepared.
    copies = []
    for i, path in enumerate(paths):
        lines = open(path).read().splitlines()
        copy = tmp_path / f"copy{i}.jsonl"
        copy.write_text("\n".join(lines) + "\n")
        copies.append(str(copy))
    prepare(HubSource("json", data_files=tuple(copies)), tmp_path / "copy")
    first = json.loads(open(copies[0]).readline())
    edited = open(copies[0]).read().replace(json.dumps(first), json.dumps({"text": first["text"] + " changed"}), 1)
    open(copies[0], "w").write(edited)
    with pytest.raises(DataError, match="the stream changed"):
        prepare(HubSource("json", data_files=tuple(copies)), tmp_path / "copy")


def test_a_bad_name_or_a_missing_text_field_fails_before_any_work(files, tmp_path):
    root, paths, _ = files
    with pytest.raises(DataError, match="could not open hub:no-such-owner/no-such-data-set"):
        prepare(HubSource("no-such-owner/no-such-data-set"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": f"document {i}", "id": i}) + "\n" for i in range(30)))
    with pytest.raises(DataError, match=r"no field 'text'; its fields are \['body', 'id'\]: pass --text-field"):
        prepare(HubSource("json", data_files=(str(body),)), tmp_path / "nofield")
    report = prepare(HubSource("json", data_files=(str(body),), text_field="body"), tmp_path / "body")
    assert sum(report.documents.values()) == 30


def test_prepare_command_streams_with_hf_flags_and_reports_errors_plainly(files, tmp_path, capsys):
    root, paths, local = files
    code = prepare_main(["--hf-dataset", "json", "--hf-data-files", *paths, "--out", str(tmp_path / "cli"),
                         "--tokenizer", "minilm", "--no-progress", "--docs-per-part", "25",
                         "--validation-fraction", "0.1"])
    assert code == 0 and f"train {local.tokens['train']:,} tokens" in capsys.readouterr().out
    code = prepare_main(["--hf-dataset", "json", "--hf-data-files", *paths, "--text-field", "body",
                         "--out", str(tmp_path / "cli2"), "--tokenizer", "minilm", "--no-progress"])
    assert code == 2 and "pass --text-field" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_main([paths[0], "--hf-dataset", "json", "--out", str(tmp_path / "x"), "--tokenizer", "minilm"])
    assert "not both" in capsys.readouterr().err
