"""Tokenization: every task's splits tokenized once into fixed-length arrays, and batches cut from them.

Shape legend: N examples in a split, L = max_seq_len, B rows of a batch.
Every sequence is padded to exactly ``max_seq_len`` (see the distributed
contract in :mod:`mpomoe_ds.data`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from mpomoe_ds.data.config import DataConfig, resolve_task
from mpomoe_ds.data.corpus import PackedSequences, PreparedCorpus, document_position_ids
from mpomoe_ds.data.loading import RawSplit, load_task_splits
from mpomoe_ds.data.span_corruption import SpanCorruption, sentinel_ids, validation_key
from mpomoe_ds.data.tasks import DataError, TaskSpec

if TYPE_CHECKING:  # transformers is slow to import and only needed for the type
    from transformers import PreTrainedTokenizerBase


@dataclass
class EncodedSplit:
    """One tokenized split, every row padded (right) to exactly L = max_seq_len.

    input_ids_NL int32, attention_mask_NL int8 (1 = real token),
    token_type_ids_NL int8 or None (tokenizers without segment ids),
    labels_N int64 / float32, or None for lm (labels come from input_ids);
    (N, T) int64 decoder targets for span-corrupted corpora.
    position_ids_NL int64 or None: packed documents with document masking
    (:func:`mpomoe_ds.data.corpus.document_position_ids`).
    """

    input_ids_NL: np.ndarray
    attention_mask_NL: np.ndarray
    token_type_ids_NL: Optional[np.ndarray]
    labels_N: Optional[np.ndarray]
    position_ids_NL: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.input_ids_NL.shape[0]

    @property
    def num_at_max_len(self) -> int:
        """Rows that fill all L positions: an upper bound on rows truncated by max_seq_len."""
        return int((self.attention_mask_NL[:, -1] == 1).sum())


def _pad(sequences: list[list[int]], length: int, value: int, dtype: type) -> np.ndarray:
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    out = np.full((len(sequences), length), value, dtype=dtype)
    # Row-major boolean assignment fills each row's first len(row) slots in order.
    out[np.arange(length) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(sequences), dtype=dtype, count=int(lengths.sum()))
    return out


def pad_token_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The id written at padded positions: pad, else eos (GPT-2 has no pad token), else 0.

    Padded positions are masked out of attention and loss, so any valid id
    works; choosing one here avoids mutating the caller's tokenizer.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_split(raw: RawSplit, tokenizer: "PreTrainedTokenizerBase", max_seq_len: int) -> EncodedSplit:
    """Tokenize one split (pairs truncated longest-first) and pad every row to max_seq_len."""
    enc = tokenizer(*raw.texts, truncation=True, max_length=max_seq_len, padding=False)
    ids = enc["input_ids"]
    token_types = enc.get("token_type_ids")
    return EncodedSplit(
        input_ids_NL=_pad(ids, max_seq_len, pad_token_id(tokenizer), np.int32),
        attention_mask_NL=_pad([[1] * len(x) for x in ids], max_seq_len, 0, np.int8),
        token_type_ids_NL=None if token_types is None else _pad(token_types, max_seq_len, 0, np.int8),
        labels_N=raw.labels_N)


@dataclass
class TaskData:
    """A ready task: its id (position in DataConfig.tasks), spec, and encoded splits."""

    task_id: int
    spec: TaskSpec
    train: Union[EncodedSplit, PackedSequences]  # packed: a pretraining corpus
    validation: Optional[EncodedSplit]
    train_source: str = ""
    validation_source: str = ""
    label_word_ids_CT: Optional[np.ndarray] = None  # text-to-text targets per class, -100 padded
    span_corruption: Optional[SpanCorruption] = None  # packed corpora under T5 span corruption


def encode_label_words(spec: TaskSpec, tokenizer: "PreTrainedTokenizerBase") -> Optional[np.ndarray]:
    """(C, T) int64 token ids of each class's label word as a target sequence (the tokenizer's own special
    tokens, e.g. T5's closing </s>), right-padded with -100; None for tasks without ``label_names``."""
    if spec.kind != "classification" or not spec.label_names:
        return None
    encoded = [tokenizer(word.replace("_", " "))["input_ids"] for word in spec.label_names]
    if len(set(map(tuple, encoded))) != len(encoded):
        raise DataError(f"task {spec.name!r}: label_names {list(spec.label_names)} tokenize to equal targets; "
                        f"give distinct label_names")
    targets = np.full((len(encoded), max(map(len, encoded))), -100, dtype=np.int64)
    for c, ids in enumerate(encoded):
        targets[c, :len(ids)] = ids
    return targets


def prepare_tasks(config: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> list[TaskData]:
    """Load, validate and tokenize every task of the config, in task-id order: ``data.tasks``, then
    ``data.corpora`` (one lm task each, :func:`corpus_tasks`).

    Raises DataError on the first problem, before any training starts. Every
    rank calls this and gets identical arrays (loading is deterministic).
    """
    tasks = []
    for task_id, entry in enumerate(config.tasks):
        spec = resolve_task(entry)
        train, validation = load_task_splits(entry, spec, config.builtin)
        tasks.append(TaskData(
            task_id=task_id, spec=spec,
            train=encode_split(train, tokenizer, config.max_seq_len),
            validation=None if validation is None else encode_split(validation, tokenizer, config.max_seq_len),
            train_source=train.source, validation_source=validation.source if validation else "",
            label_word_ids_CT=encode_label_words(spec, tokenizer)))
    return tasks + corpus_tasks(config, tokenizer, first_id=len(tasks))


def corpus_tasks(config: DataConfig, tokenizer: "PreTrainedTokenizerBase", first_id: int = 0) -> list[TaskData]:
    """One lm task per prepared corpus: train = its packed sequences, validation = held-out packed sequences.

    Only the indexes are read (and the first ``max_eval_sequences`` held-out
    sequences); training reads shard files on demand. A corpus tokenized with
    another tokenizer is refused.
    """
    tasks = []
    for task_id, entry in enumerate(config.corpora, start=first_id):
        corpus = PreparedCorpus(entry.path, config.max_seq_len, tokenizer)
        spec = TaskSpec(name=entry.name, kind="lm", text_columns=("text",), label_column=None, num_labels=0,
                        metrics=("perplexity", "loss"), primary_metric="perplexity")
        span = None
        if config.span_corruption is not None:
            span = SpanCorruption(config.span_corruption.noise_density, config.span_corruption.mean_noise_span_length,
                                  sentinel_ids(tokenizer), corpus.eos_id, config.seed)
        validation = None
        if corpus.validation is not None and entry.max_eval_sequences:
            ids, mask = corpus.validation.rows(np.arange(min(len(corpus.validation), entry.max_eval_sequences)))
            validation = _held_out_split(ids, mask, corpus.eos_id, config.document_masking, span, task_id)
        tasks.append(TaskData(task_id=task_id, spec=spec, train=corpus.train, validation=validation,
                              train_source=f"{entry.path} (train)", validation_source=f"{entry.path} (validation)",
                              span_corruption=span))
    return tasks


def _held_out_split(ids_NL: np.ndarray, mask_NL: np.ndarray, eos_id: int, document_masking: bool,
                    span: Optional[SpanCorruption], corpus: int) -> EncodedSplit:
    """A corpus's held-out packed rows as the model reads them: plain, with document positions, or corrupted
    (encoder inputs, decoder targets as 2-D labels)."""
    if span is not None:
        inputs, mask, targets = span.batch(ids_NL, mask_NL, [validation_key(corpus, r) for r in range(len(ids_NL))])
        return EncodedSplit(inputs.astype(np.int32), mask.astype(np.int8), None, targets)
    positions = document_position_ids(ids_NL, mask_NL, eos_id) if document_masking else None
    return EncodedSplit(ids_NL.astype(np.int32), mask_NL.astype(np.int8), None, None, positions)


def make_batch(task: TaskData, split: EncodedSplit, indices_B: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs for rows ``indices_B`` of ``split``, as int64/float32 CPU tensors.

    Keys: input_ids, attention_mask, token_type_ids (when the tokenizer makes
    them), position_ids (document masking), labels, task_id (B,) (all equal:
    batches are single-task). For lm
    tasks labels = input_ids with -100 on padding (HF causal LMs shift
    internally). Pop task_id before calling a Hugging Face model.
    """
    input_ids = torch.from_numpy(split.input_ids_NL[indices_B].astype(np.int64))
    attention_mask = torch.from_numpy(split.attention_mask_NL[indices_B].astype(np.int64))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if split.token_type_ids_NL is not None:
        batch["token_type_ids"] = torch.from_numpy(split.token_type_ids_NL[indices_B].astype(np.int64))
    if split.position_ids_NL is not None:
        batch["position_ids"] = torch.from_numpy(split.position_ids_NL[indices_B])
    if split.labels_N is None:
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = torch.from_numpy(split.labels_N[indices_B])
    batch["task_id"] = torch.full((len(indices_B),), task.task_id, dtype=torch.int64)
    return batch
