"""Pretraining data: corpus preparation, memory-mapped packing, multi-corpus mixing (mpomoe_ds.data.prepare,
corpus, mixture)."""

from __future__ import annotations

import numpy as np
import pytest

from mpomoe_ds.data.config import DataConfig
from mpomoe_ds.data.corpus import PreparedCorpus
from mpomoe_ds.data.mixture import MixtureSampler, PackedMixtureBatches, feistel_permute
from mpomoe_ds.data.prepare import prepare_corpus, read_index
from mpomoe_ds.data.sampling import train_batches
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.data.tokenize import prepare_tasks
from mpomoe_ds.models.hf import load_tokenizer

from conftest import write_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root / "src", files=3, docs_per_file=40, seed=0)
    report = prepare_corpus([str(root / "src")], "minilm", root / "prepared", load_tokenizer=load_tokenizer,
                            docs_per_part=25, validation_fraction=0.1, progress=False)
    return root, docs, report


def test_prepared_shards_hold_every_document_tokenized_once_with_eos(corpus, tokenizer):
    root, docs, report = corpus
    index = read_index(root / "prepared", tokenizer)
    eos = index["eos_id"]
    streams = {split: np.concatenate([np.fromfile(root / "prepared" / s["file"], dtype=index["dtype"])
                                      for s in index["splits"][split]["shards"]]).astype(np.int64)
               for split in ("train", "validation")}
    assert report.documents["train"] + report.documents["validation"] == len(docs)
    assert 0 < report.documents["validation"] < 0.3 * len(docs)
    # Every document's token ids, in order, each followed by EOS, across the two splits.
    from mpomoe_ds.data.prepare import is_validation

    for split, stream in streams.items():
        expected = [t for d in docs if is_validation(d, 0.1) == (split == "validation")
                    for t in (*tokenizer(d, add_special_tokens=False)["input_ids"], eos)]
        assert stream.tolist() == expected
    assert report.parts_done == 6 and report.parts_reused == 0  # 3 files x 40 docs in parts of 25


def test_preparation_resumes_and_refuses_another_tokenizer_or_other_sources(corpus, tmp_path):
    root, _, _ = corpus
    (root / "prepared" / "parts" / "part_00002.json").unlink()  # as if killed before part 2 finished
    report = prepare_corpus([str(root / "src")], "minilm", root / "prepared", load_tokenizer=load_tokenizer,
                            docs_per_part=25, validation_fraction=0.1, progress=False)
    assert (report.parts_done, report.parts_reused) == (1, 5)
    with pytest.raises(DataError, match="validation_fraction"):
        prepare_corpus([str(root / "src")], "minilm", root / "prepared", load_tokenizer=load_tokenizer,
                       docs_per_part=25, validation_fraction=0.2, progress=False)
    write_corpus(tmp_path / "other", files=1, docs_per_file=5, seed=1)
    with pytest.raises(DataError, match="source files changed"):
        prepare_corpus([str(tmp_path / "other")], "minilm", root / "prepared", load_tokenizer=load_tokenizer,
                       docs_per_part=25, validation_fraction=0.1, progress=False)
    with pytest.raises(DataError, match="matches no file"):
        prepare_corpus([str(tmp_path / "nothing*.jsonl")], "minilm", tmp_path / "x", load_tokenizer=load_tokenizer)


def test_reading_refuses_a_corpus_of_another_tokenizer(corpus):
    root, _, _ = corpus

    class OtherTokenizer:
        special_tokens_map = {"eos_token": "</s>"}

        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(DataError, match="not with this run's tokenizer"):
        read_index(root / "prepared", OtherTokenizer())
    with pytest.raises(DataError, match="mpomoe-prepare"):
        read_index(root / "missing")


def test_parallel_preparation_equals_serial(corpus, tmp_path):
    root, _, _ = corpus
    prepare_corpus([str(root / "src")], "minilm", tmp_path / "par", load_tokenizer=load_tokenizer, num_workers=2,
                   docs_per_part=25, validation_fraction=0.1, progress=False)
    serial, parallel = read_index(root / "prepared"), read_index(tmp_path / "par")
    for split in ("train", "validation"):
        assert serial["splits"][split]["tokens"] == parallel["splits"][split]["tokens"]
        for a, b in zip(serial["splits"][split]["shards"], parallel["splits"][split]["shards"]):
            assert (root / "prepared" / a["file"]).read_bytes() == (tmp_path / "par" / b["file"]).read_bytes()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    keys = np.array([3, 5, 7, 11], dtype=np.uint64)
    out = feistel_permute(np.arange(n, dtype=np.uint64), n, keys)
    assert sorted(out.tolist()) == list(range(n))
    if n > 100:
        assert np.mean(out == np.arange(n)) < 0.05  # it does shuffle


@pytest.mark.parametrize("world", [1, 2, 4])
def test_packing_covers_every_token_exactly_once_per_epoch_across_ranks(corpus, tokenizer, world):
    root, _, _ = corpus
    packed = PreparedCorpus(str(root / "prepared"), 16, tokenizer).train
    micro = 2
    streams = [iter(PackedMixtureBatches([packed], ["c"], [0], [1.0], micro, rank=r, world_size=world, seed=3))
               for r in range(world)]
    by_position: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(-(-len(packed) // (micro * world))):  # global batches covering the first epoch
        for r, it in enumerate(streams):
            batch = next(it)
            assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # no loss on padding
            for row in range(micro):
                by_position[t * micro * world + r * micro + row] = (batch["input_ids"][row].numpy(),
                                                                    batch["attention_mask"][row].numpy())
    epoch = [by_position[g] for g in range(len(packed))]  # the first len(packed) global samples
    real = [ids[mask == 1] for ids, mask in epoch]
    key = [tuple(r.tolist()) for r in real]
    all_sequences = [tuple(packed.rows(np.array([j]))[0][0][:packed.rows(np.array([j]))[1][0].sum()].tolist())
                     for j in range(len(packed))]
    assert sorted(key) == sorted(all_sequences)  # every sequence exactly once, whatever the world size
    assert sum(len(r) for r in real) == packed.stream.num_tokens  # so every token exactly once
    full = packed.num_at_max_len / len(packed)
    assert full > 0.98 or len(packed) - packed.num_at_max_len == 1  # only the very last sequence is short


def test_mixture_shares_match_the_weights_and_the_global_sequence_ignores_world_size(corpus, tokenizer):
    root, _, _ = corpus
    packed = PreparedCorpus(str(root / "prepared"), 16, tokenizer).train
    sampler = MixtureSampler([len(packed)] * 3, [0.5, 0.3, 0.2], seed=11)
    corpora, _ = sampler.samples(0, 10_000)
    shares = np.bincount(corpora, minlength=3) / 10_000
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.01

    def global_sequence(world: int, micro: int, steps: int) -> list[tuple]:
        streams = [iter(PackedMixtureBatches([packed] * 3, ["a", "b", "c"], [0, 1, 2], [0.5, 0.3, 0.2], micro,
                                             rank=r, world_size=world, seed=11)) for r in range(world)]
        rows = []
        for _ in range(steps):
            for it in streams:
                batch = next(it)
                rows.extend(tuple(r) for r in batch["input_ids"].tolist())
        return rows

    one = global_sequence(1, 8, 6)
    assert global_sequence(2, 4, 6) == one and global_sequence(4, 2, 6) == one


def test_resume_at_another_world_size_continues_the_same_global_sequence(corpus, tokenizer):
    root, _, _ = corpus
    packed = PreparedCorpus(str(root / "prepared"), 16, tokenizer).train

    def stream(rank: int, world: int, micro: int) -> PackedMixtureBatches:
        return PackedMixtureBatches([packed, packed], ["a", "b"], [0, 1], [0.6, 0.4], micro, rank=rank,
                                    world_size=world, seed=5)

    straight = iter(stream(0, 1, 4))
    want = [next(straight)["input_ids"] for _ in range(10)]
    first = [stream(r, 2, 2) for r in range(2)]
    its = [iter(s) for s in first]
    for _ in range(4):
        for it in its:
            next(it)
    state = first[0].state_dict()
    assert state["position"] == 16
    resumed = stream(0, 4, 1), stream(1, 4, 1), stream(2, 4, 1), stream(3, 4, 1)
    rows = []
    for s in resumed:
        s.load_state_dict(state)
    its = [iter(s) for s in resumed]
    for _ in range(6):
        rows.append(np.concatenate([next(it)["input_ids"].numpy() for it in its]))
    assert all(np.array_equal(r, w.numpy()) for r, w in zip(rows, want[4:]))
    other = stream(0, 1, 4)
    other.sampler.seed = 6
    with pytest.raises(ValueError, match="other corpora or mixture"):
        other.load_state_dict(state)


def test_data_config_with_corpora_builds_lm_tasks_and_the_packed_stream(corpus, tokenizer):
    root, _, _ = corpus
    cfg = DataConfig(max_seq_len=16, corpora=[{"name": "en", "path": str(root / "prepared"), "max_eval_sequences": 8},
                                              {"name": "en2", "path": str(root / "prepared")}])
    tasks = prepare_tasks(cfg, tokenizer)
    assert [t.spec.name for t in tasks] == ["en", "en2"] and all(t.spec.kind == "lm" for t in tasks)
    assert len(tasks[0].validation) == 8 and tasks[0].validation.input_ids_NL.shape == (8, 16)
    stream = train_batches(tasks, cfg, 4, rank=0, world_size=1)
    batch = next(iter(stream))
    assert batch["input_ids"].shape == (4, 16) and set(batch) == {"input_ids", "attention_mask", "labels",
                                                                  "task_id"}
    assert sum(stream.tokens_seen.values()) == int(batch["attention_mask"].sum())


def test_prepare_command_writes_a_corpus_and_says_what_it_did(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, dist_env

    write_corpus(tmp_path / "src", files=2, docs_per_file=10, seed=4)
    cmd = [sys.executable, "-m", "mpomoe_ds.cli.prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
           "--tokenizer", "minilm", "--no-progress", "--validation-fraction", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = read_index(tmp_path / "out")
    assert index["splits"]["train"]["documents"] == 20 and index["splits"]["validation"]["documents"] == 0
    assert f"train {index['splits']['train']['tokens']:,} tokens / 20 documents" in proc.stdout
    again = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=300)
    assert "0 part(s) tokenized, 2 reused" in again.stdout


def test_document_masking_adds_position_ids_that_restart_after_each_eos(corpus, tokenizer):
    root, _, _ = corpus
    cfg = DataConfig(max_seq_len=16, document_masking=True,
                     corpora=[{"name": "en", "path": str(root / "prepared"), "max_eval_sequences": 8}])
    tasks = prepare_tasks(cfg, tokenizer)
    eos = read_index(root / "prepared", tokenizer)["eos_id"]
    batch = next(iter(train_batches(tasks, cfg, 8, rank=0, world_size=1)))
    validation = tasks[0].validation
    for ids, positions in ((batch["input_ids"].numpy(), batch["position_ids"].numpy()),
                           (validation.input_ids_NL, validation.position_ids_NL)):
        assert positions.shape == ids.shape and (positions[:, 0] == 0).all()
        after_eos = np.zeros_like(ids, dtype=bool)
        after_eos[:, 1:] = ids[:, :-1] == eos
        assert after_eos.any()  # these rows do cross documents
        np.testing.assert_array_equal(positions[after_eos], 0)
        inside = ~after_eos
        inside[:, 0] = False
        np.testing.assert_array_equal(positions[:, 1:][inside[:, 1:]], (positions[:, :-1] + 1)[inside[:, 1:]])
    with pytest.raises(Exception, match="document masking applies to packed corpora"):
        DataConfig(tasks=["toy_sentiment"], document_masking=True)
