"""Downstream tasks and pretraining corpora mixed in one stream: one source per micro-batch, by weight,
the same global sequence at any world size, exact resume (mpomoe_ds.data.sampling with packed sources)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpomoe_ds.config import ConfigError
from mpomoe_ds.data.config import DataConfig
from mpomoe_ds.data.prepare import prepare_corpus
from mpomoe_ds.data.sampling import TrainBatches, train_batches
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.data.tokenize import prepare_tasks
from mpomoe_ds.models.hf import load_tokenizer

from conftest import write_corpus

WEIGHTS = {"toy_sentiment": 0.5, "toy_topic": 0.2, "en": 0.3}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixcorpus")
    write_corpus(root / "src", files=1, docs_per_file=60, seed=3)
    prepare_corpus([str(root / "src")], "minilm", root / "en", load_tokenizer=load_tokenizer,
                   validation_fraction=0.1, progress=False)
    return root / "en"


def mixed_config(corpus_dir, weights: bool = True, **extra) -> DataConfig:
    tasks = [{"name": n, "weight": WEIGHTS[n] if weights else None} for n in ("toy_sentiment", "toy_topic")]
    corpora = [{"name": "en", "path": str(corpus_dir), "weight": WEIGHTS["en"] if weights else None,
                "max_eval_sequences": 8}]
    return DataConfig(max_seq_len=16, seed=7, tasks=tasks, corpora=corpora, **extra)


@pytest.fixture(scope="module")
def mixed(corpus_dir, tokenizer):
    config = mixed_config(corpus_dir)
    return config, prepare_tasks(config, tokenizer)


def test_mixed_config_lists_tasks_then_corpora_with_held_out_rows_for_each(mixed):
    _, tasks = mixed
    assert [(t.task_id, t.spec.name, t.spec.kind) for t in tasks] == [
        (0, "toy_sentiment", "classification"), (1, "toy_topic", "classification"), (2, "en", "lm")]
    assert all(t.validation is not None and len(t.validation) > 0 for t in tasks)
    assert tasks[2].validation.input_ids_NL.shape == (8, 16)


def test_mixing_refuses_partial_weights_clashing_names_and_span_corruption(corpus_dir):
    with pytest.raises(ConfigError, match="every task and corpus a weight"):
        DataConfig(tasks=[{"name": "toy_sentiment", "weight": 1.0}],
                   corpora=[{"name": "en", "path": str(corpus_dir)}])
    with pytest.raises(ConfigError, match="share \\['toy_sentiment'\\]"):
        DataConfig(tasks=["toy_sentiment"], corpora=[{"name": "toy_sentiment", "path": str(corpus_dir)}])
    with pytest.raises(ConfigError, match="span corruption together with tasks is not supported"):
        DataConfig(tasks=["toy_sentiment"], corpora=[{"name": "en", "path": str(corpus_dir)}], span_corruption={})
    with pytest.raises(ConfigError, match="weight > 0"):
        DataConfig(tasks=[{"name": "toy_sentiment", "weight": 0}])


def test_each_micro_batch_holds_one_source_and_shares_match_the_weights(mixed):
    config, tasks = mixed
    stream = train_batches(tasks, config, 4)
    chosen = stream.sampler.task_sequence(0, 20_000)
    shares = np.bincount(chosen, minlength=3) / len(chosen)
    assert np.abs(shares - list(WEIGHTS.values())).max() < 0.01, shares
    kinds = set()
    for _, batch in zip(range(30), stream):
        task_id = batch["task_id"]
        assert bool((task_id == task_id[0]).all())  # one source per micro-batch: one head per step
        if int(task_id[0]) == 2:  # packed corpus rows: causal-LM labels, every row full but maybe the last
            assert set(batch) == {"input_ids", "attention_mask", "labels", "task_id"}
            assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        else:
            assert batch["labels"].shape == (4,)
        kinds.add(int(task_id[0]))
    assert kinds == {0, 1, 2}
    assert sum(stream.tokens_seen.values()) > 0 and stream.tokens_seen["en"] > 0


def test_temperature_mixing_without_weights_counts_training_rows(corpus_dir, tokenizer):
    config = mixed_config(corpus_dir, weights=False, temperature=2.0)
    tasks = prepare_tasks(config, tokenizer)
    rows = np.array([len(t.train) for t in tasks], dtype=np.float64)  # examples, packed sequences
    expected = rows ** 0.5 / (rows ** 0.5).sum()
    assert np.allclose(train_batches(tasks, config, 4).sampler.probabilities, expected)


def test_a_corpus_source_visits_every_packed_sequence_once_per_epoch(mixed):
    config, tasks = mixed
    sampler = train_batches(tasks, config, 4, rank=0, world_size=2).sampler
    n, G = len(tasks[2].train), 8
    cache: dict = {}
    rows = np.concatenate([sampler._global_rows(2, k, cache) for k in range(-(-2 * n // G))])
    assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:2 * n]) == list(range(n))


def global_rows(tasks, config, world: int, micro: int, steps: int, state=None) -> list[dict[str, torch.Tensor]]:
    streams = [train_batches(tasks, config, micro, rank=r, world_size=world) for r in range(world)]
    for s in streams:
        if state is not None:
            s.load_state_dict(state)
    out = []
    for parts in zip(range(steps), *[iter(s) for s in streams]):
        out.append({k: torch.cat([p[k] for p in parts[1:]]) for k in ("input_ids", "labels", "task_id")})
    return out


def test_the_mixed_sequence_is_the_same_at_world_1_and_2(mixed):
    config, tasks = mixed
    one, two = global_rows(tasks, config, 1, 8, 40), global_rows(tasks, config, 2, 4, 40)
    assert len({int(b["task_id"][0]) for b in one}) == 3
    for a, b in zip(one, two):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_mixed_stream_resumes_exactly_at_another_world_size(mixed):
    config, tasks = mixed
    straight = [train_batches(tasks, config, 4, rank=r, world_size=2) for r in range(2)]
    its = [iter(s) for s in straight]
    for _ in range(11):
        [next(it) for it in its]
    state = json.loads(json.dumps(straight[0].state_dict()))
    want = [{k: torch.cat([p[k] for p in step]) for k in ("input_ids", "labels", "task_id")}
            for step in [[next(it) for it in its] for _ in range(15)]]
    got = global_rows(tasks, config, 1, 8, 15, state)
    for a, b in zip(want, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # The saved counts are totals (the trainer stores them summed over ranks): rank 0 carries them on.
    carried = [train_batches(tasks, config, 4, rank=r, world_size=2) for r in range(2)]
    for s in carried:
        s.load_state_dict(state)
    assert carried[0].tokens_seen == state["tokens_seen"] and sum(carried[1].tokens_seen.values()) == 0
    reweighted = mixed_config(config.corpora[0].path, weights=False)
    other = train_batches(tasks, reweighted, 8)
    with pytest.raises(DataError, match="weights/packed"):
        other.load_state_dict(state)


def test_task_only_streams_keep_their_checkpoint_fingerprint(tokenizer):
    tasks = prepare_tasks(DataConfig(tasks=["toy_sentiment"]), tokenizer)
    stream = TrainBatches(tasks, 8, seed=1)
    assert len(stream.state_dict()["fingerprint"]) == 5  # checkpoints from before mixing still resume


def test_an_encoder_decoder_with_tasks_and_corpora_is_refused_before_any_work(corpus_dir):
    from types import SimpleNamespace

    from mpomoe_ds.training.preflight import check_corpus_objective

    data = DataConfig(tasks=["toy_sentiment"], corpora=[{"name": "en", "path": str(corpus_dir)}])
    config = SimpleNamespace(data=data, model=SimpleNamespace(name_or_path="t5"))
    with pytest.raises(ConfigError, match="only as causal-LM packing for decoder models"):
        check_corpus_objective(config, SimpleNamespace(is_encoder_decoder=True, model_type="t5"))
    check_corpus_objective(config, SimpleNamespace(is_encoder_decoder=False, model_type="gpt2"))  # decoders mix


def test_worker_processes_build_the_same_mixed_batches(mixed):
    config, tasks = mixed
    inline = [b for _, b in zip(range(12), train_batches(tasks, config, 4))]
    probabilities = [WEIGHTS[t.spec.name] for t in tasks]
    workers = TrainBatches(tasks, 4, seed=config.seed, num_workers=1, probabilities=probabilities)
    built = [b for _, b in zip(range(12), workers)]
    assert len({int(b["task_id"][0]) for b in inline}) > 1
    for a, b in zip(inline, built):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert workers.step == 12
    assert sum(workers.tokens_seen.values()) == sum(int(b["attention_mask"].sum()) for b in built)
