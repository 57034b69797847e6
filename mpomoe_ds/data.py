"""Data: loading, validation, tokenization, multi-task sampling and eval sharding.

This module owns everything between a data config and the tensors a training
or evaluation step consumes:

1. ``DataConfig`` / ``TaskEntry``: which tasks, where their data lives (local
   csv/tsv/json/jsonl/parquet files, a hub data set, or the embedded builtin
   ``toy_glue`` / ``toy_lm``), sequence length, sampling temperature, seed.
2. ``prepare_tasks``: load every task, validate it early with errors that name
   the file/task/column and the fix (``DataError``), tokenize it once.
3. ``TrainBatches``: this rank's infinite stream of single-task training
   batches, mixed across tasks by temperature sampling, resumable.
4. ``eval_batches`` + ``gather_eval``: every validation example exactly once
   across ranks, in full-shape batches with a mask.

The distributed contract (why it looks like this). DeepSpeed's MoE layer
exchanges tokens with an all-to-all whose sizes come from the local batch, so
every rank must run a batch of the *same shape* at the same step, or the
collective hangs. Hence:

- every sequence is padded to exactly ``max_seq_len`` (no dynamic padding);
- every rank yields the same number of batches of ``batch_size`` rows;
- the task of step s depends only on (seed, s), never on the rank, so all
  ranks pick the same task (and task head) at the same step;
- eval pads the last batches with masked dummy rows instead of shrinking them.

Every rank loads and tokenizes all tasks (the data sets this targets fit in
memory: token ids are int32, masks int8) and then reads its own disjoint
shard; nothing is exchanged to build batches.

Shape legend: N examples in a split, L = max_seq_len, B = per-rank micro-batch
(DeepSpeed's ``train_micro_batch_size_per_gpu``), W = data-parallel world
size, G = B * W global batch, K tasks, M eval rows on one rank (with padding).
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from mpomoe_ds.config import ConfigError, from_dict
from mpomoe_ds.data_default import BUILTINS, builtin_task_names, generate
from mpomoe_ds.tasks import METRICS_BY_KIND, TASKS, DataError, TaskSpec, task_names

if TYPE_CHECKING:  # transformers is slow to import and only needed for the type
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataConfig", "DataError", "TaskEntry", "EncodedSplit", "TaskData", "BatchIndex",
    "MultiTaskBatchSampler", "TrainBatches", "prepare_tasks", "resolve_task", "load_task_splits",
    "encode_split", "make_batch", "temperature_probabilities", "train_batches", "eval_batches",
    "num_eval_batches", "merge_eval_shards", "gather_eval", "check_same_plan", "describe_tasks",
    "SUPPORTED_EXTENSIONS", "RawSplit", "file_extension", "pad_token_id",
]

REMAINDERS = ("drop", "wrap")

# File extension -> (datasets builder, builder kwargs). Compression suffixes
# (.gz, .bz2, .xz, .zst) on top are handled by datasets.
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    # keep_default_na=False: a sentence that reads "NA" or "null" stays text.
    ".csv": ("csv", {"keep_default_na": False}),
    # QUOTE_NONE: GLUE-style tsv files contain unbalanced quote characters.
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
SUPPORTED_EXTENSIONS = tuple(_BUILDERS)
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")

_DEFAULT_METRICS = {"classification": ("accuracy",), "regression": ("pearson", "spearman"),
                    "lm": ("perplexity", "loss")}

# --------------------------------------------------------------------------- config


def _fail(name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"data.{name}={value!r}: {fix}")


def file_extension(path: Union[str, Path]) -> str:
    """'a/b.JSONL.gz' -> '.jsonl': the format suffix, ignoring a compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


@dataclass
class TaskEntry:
    """One task in the data config.

    name: a registered task (``mpomoe_ds.tasks.task_names()``) or, with
        ``kind`` set, the name of a custom task described inline.
    train_file / validation_file: local csv, tsv, json, jsonl or parquet files.
    hub_dataset / hub_subset / train_split / validation_split: a Hugging Face
        hub source (needs internet or a filled cache). GLUE tasks default to
        ``nyu-mll/glue``; builtin tasks default to the builtin data set.
    text_columns / label_column: column-name overrides (custom tasks: required
        text_columns; label_column defaults to "label").
    max_train_examples / max_eval_examples: keep only the first n rows.
    kind / num_labels / metrics / primary_metric / label_names: define a
        custom task (not allowed for a registered name).
    """

    name: str
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    hub_dataset: Optional[str] = None
    hub_subset: Optional[str] = None
    train_split: Optional[str] = None
    validation_split: Optional[str] = None
    text_columns: Optional[list[str]] = None
    label_column: Optional[str] = None
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    kind: Optional[str] = None
    num_labels: Optional[int] = None
    metrics: Optional[list[str]] = None
    primary_metric: Optional[str] = None
    label_names: Optional[list[str]] = None


_CUSTOM_FIELDS = ("kind", "num_labels", "metrics", "primary_metric", "label_names")


@dataclass
class DataConfig:
    """The data section of the run config.

    tasks: task entries (a mapping each, or just a task name). Empty = every
        task of ``builtin``. Task ids are positions in this list.
    builtin: embedded data set ("toy_glue": toy_sentiment, toy_topic,
        toy_paraphrase; "toy_lm": toy_lm) that supplies data for builtin
        tasks listed without files; null = none.
    max_seq_len: every sequence is truncated/padded to exactly this length
        (toy_glue fits in 32 MiniLM tokens).
    temperature: T of multi-task sampling p_i ~ n_i^(1/T): 1 = proportional to
        task size, larger = flatter, .inf = uniform.
    seed: seed of task choice and per-task shuffling (>= 0).
    num_workers: DataLoader worker processes building batches (0 = in the
        training process; batches are slices of pre-tokenized arrays, so 0 is
        usually fastest).
    remainder: what a task's last, partial global batch of each pass does:
        "drop" (skipped this pass; the shuffle differs next pass) or "wrap"
        (filled from the start of the same shuffled pass).
    """

    tasks: list[TaskEntry] = field(default_factory=list)
    builtin: Optional[str] = "toy_glue"
    max_seq_len: int = 64
    temperature: float = 1.0
    seed: int = 1234
    num_workers: int = 0
    remainder: str = "drop"

    def __post_init__(self) -> None:
        if self.builtin is not None and self.builtin not in BUILTINS:
            _fail("builtin", self.builtin, f"choose one of {sorted(BUILTINS)} or null")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            _fail("max_seq_len", self.max_seq_len, "use an integer >= 8 (special tokens need room)")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            _fail("temperature", self.temperature, "use T > 0 (1 = proportional, .inf = uniform)")
        if not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", self.seed, "use a non-negative integer seed")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            _fail("num_workers", self.num_workers, "use 0 (no workers) or a positive worker count")
        if self.remainder not in REMAINDERS:
            _fail("remainder", self.remainder, f"choose one of {list(REMAINDERS)}")
        if not self.tasks:
            if self.builtin is None:
                _fail("tasks", self.tasks, "list at least one task, or set data.builtin (e.g. toy_glue)")
            # Spell the builtin tasks out so the saved config says what ran.
            self.tasks = [TaskEntry(name=name) for name in builtin_task_names(self.builtin)]
        self.tasks = [_coerce_entry(entry, i) for i, entry in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            _fail("tasks", names, f"task names must be unique, {duplicates} repeat; rename a custom copy")
        for i, entry in enumerate(self.tasks):
            _validate_entry(entry, i, self.builtin)


def _coerce_entry(entry: Union[TaskEntry, dict, str], index: int) -> TaskEntry:
    if isinstance(entry, TaskEntry):
        return entry
    if isinstance(entry, str):
        return TaskEntry(name=entry)
    if isinstance(entry, dict):
        return from_dict(TaskEntry, entry, f"data.tasks[{index}]")
    _fail(f"tasks[{index}]", entry, "give a task name or a mapping with at least 'name'")
    raise AssertionError  # unreachable: _fail raises


def _validate_entry(entry: TaskEntry, index: int, builtin: Optional[str]) -> None:
    where = f"tasks[{index}]"
    if not isinstance(entry.name, str) or not entry.name:
        _fail(f"{where}.name", entry.name, "give the task a non-empty name")
    for name in ("train_file", "validation_file"):
        path = getattr(entry, name)
        if path is not None and file_extension(path) not in _BUILDERS:
            _fail(f"{where}.{name}", path, f"unsupported extension {file_extension(path)!r}; use one of "
                  f"{list(SUPPORTED_EXTENSIONS)} (optionally compressed: {list(_COMPRESSIONS)})")
    if entry.validation_file and not entry.train_file:
        _fail(f"{where}.train_file", None, "a task with a validation_file also needs a train_file")
    if entry.train_file and entry.hub_dataset:
        _fail(f"{where}.hub_dataset", entry.hub_dataset, "give either local files or a hub data set, not both")
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(entry, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            _fail(f"{where}.{name}", value, "use a positive row count, or null for all rows")
    try:
        spec = resolve_task(entry)
    except DataError as err:
        raise ConfigError(f"data.{where} ({entry.name}): {err}") from None
    if not (entry.train_file or entry.hub_dataset or spec.hub_dataset or _from_builtin(spec, builtin)):
        builtin_hint = next((b for b, tasks in BUILTINS.items() if spec.name in tasks), None)
        fix = f"set data.builtin: {builtin_hint}" if builtin_hint else "give hub_dataset"
        _fail(f"{where}.train_file", None, f"task {spec.name!r} has no data source; give train_file or {fix}")


def resolve_task(entry: TaskEntry) -> TaskSpec:
    """The TaskSpec an entry describes: a registered task with column overrides, or a custom one."""
    custom = {name: getattr(entry, name) for name in _CUSTOM_FIELDS if getattr(entry, name) is not None}
    if entry.name in TASKS:
        if custom:
            raise DataError(f"{entry.name!r} is a registered task, so {sorted(custom)} are fixed; remove them, "
                            f"or give your custom task another name")
        return TASKS[entry.name].with_columns(entry.text_columns, entry.label_column)
    if entry.kind is None:
        raise DataError(f"unknown task {entry.name!r}; registered tasks are {task_names()}. To define a custom "
                        f"task set kind ({'/'.join(METRICS_BY_KIND)}), text_columns and, for classification, "
                        f"num_labels")
    if not entry.text_columns:
        raise DataError(f"custom task {entry.name!r} needs text_columns (one column, or two for a pair)")
    kind = entry.kind
    num_labels = {"regression": 1, "lm": 0}.get(kind, entry.num_labels)
    if kind == "classification" and num_labels is None:
        raise DataError(f"custom classification task {entry.name!r} needs num_labels")
    if entry.num_labels is not None and entry.num_labels != num_labels:
        raise DataError(f"custom {kind} task {entry.name!r}: num_labels={entry.num_labels} must be {num_labels}")
    return TaskSpec(
        name=entry.name, kind=kind, text_columns=tuple(entry.text_columns),
        label_column=None if kind == "lm" else (entry.label_column or "label"),
        num_labels=num_labels, metrics=tuple(entry.metrics or _DEFAULT_METRICS.get(kind, ())),
        primary_metric=entry.primary_metric or "",
        label_names=tuple(entry.label_names) if entry.label_names else None)


def _from_builtin(spec: TaskSpec, builtin: Optional[str]) -> bool:
    return builtin is not None and spec.name in BUILTINS[builtin]


# --------------------------------------------------------------------------- loading


@dataclass
class RawSplit:
    """One loaded, validated split: the columns a task reads, as Python lists.

    source: where it came from, for messages (a file path, hub id or builtin).
    texts: one list per text column (1 or 2). labels_N: class ids (int64),
    scores (float32), or None for lm.
    """

    source: str
    texts: list[list[str]]
    labels_N: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.texts[0])


def _load_file(path_str: str, task: str) -> Any:
    path = Path(path_str)
    ext = file_extension(path)
    if ext not in _BUILDERS:
        raise DataError(f"task {task!r}: {path} has unsupported extension {ext!r}; "
                        f"convert it to one of {list(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"task {task!r}: data file {path} does not exist (resolved: {path.resolve()}); "
                        f"fix the path in data.tasks (relative paths are relative to the working directory)")
    if path.stat().st_size == 0:
        raise DataError(f"task {task!r}: data file {path} is empty; it needs a header/records with the task's columns")
    import datasets  # slow import (~1 s); the builtin data never needs it

    builder, kwargs = _BUILDERS[ext]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # parser errors differ per format; all mean "this file is unreadable"
        if "corresponds to no data" in str(err):  # datasets' wording for a file without data rows
            raise DataError(f"task {task!r}: {path} has no rows; it needs records with the task's columns") from err
        raise DataError(f"task {task!r}: could not read {path} as {ext[1:]}: {type(err).__name__}: {err}; "
                        f"check that the file is valid {ext[1:]}") from err


def _load_hub(name: str, subset: Optional[str], split: str, task: str) -> Any:
    import datasets  # slow import (~1 s); the builtin data never needs it

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, auth, missing split: all mean "this source is unusable"
        raise DataError(f"task {task!r}: could not load hub data set {name!r} (subset {subset!r}, split {split!r}): "
                        f"{type(err).__name__}: {err}. The hub needs internet or a filled Hugging Face cache; "
                        f"for local data set train_file/validation_file") from err


def _dataset_columns(dataset: Any, spec: TaskSpec, source: str, limit: Optional[int]) -> dict[str, list]:
    """The task's columns from a datasets.Dataset, checked to exist and be non-empty."""
    needed = list(spec.text_columns) + ([spec.label_column] if spec.label_column else [])
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataError(f"task {spec.name!r}: {source} has no column(s) {missing}; columns present: "
                        f"{dataset.column_names}. Rename them in the file or set text_columns/label_column "
                        f"in the task entry")
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return {c: list(dataset[c]) for c in needed}


def _check_texts(texts: list, column: str, spec: TaskSpec, source: str) -> list[str]:
    bad = [row for row, t in enumerate(texts) if not isinstance(t, str)]
    # An lm task drops empty rows (corpora such as wikitext have blank lines);
    # a classification row without text is a data error.
    if bad and spec.kind != "lm":
        row = bad[0]
        raise DataError(f"task {spec.name!r}: {source} column {column!r} row {row} (0-based) holds "
                        f"{texts[row]!r}, not text ({len(bad)} such rows); fill or drop those rows")
    return texts


def _check_labels(values: list, spec: TaskSpec, source: str) -> np.ndarray:
    """Labels as int64 class ids / float32 scores; bad values name their row and the fix."""
    where = f"task {spec.name!r}: {source} column {spec.label_column!r}"
    if spec.kind == "classification" and spec.label_names and any(isinstance(v, str) for v in values):
        index = {name: i for i, name in enumerate(spec.label_names)}
        for row, v in enumerate(values):
            if v not in index:
                raise DataError(f"{where} row {row} (0-based): label {v!r} is not one of label_names "
                                f"{list(spec.label_names)}; fix the value or label_names")
        return np.array([index[v] for v in values], dtype=np.int64)
    numbers = np.full(len(values), np.nan)
    for row, v in enumerate(values):
        try:
            numbers[row] = float(v) if v not in (None, "") else np.nan
        except (TypeError, ValueError):
            hint = "; give numeric class ids or set label_names" if spec.kind == "classification" else ""
            raise DataError(f"{where} row {row} (0-based): label {v!r} is not a number{hint}") from None
    bad = ~np.isfinite(numbers)
    if spec.kind == "classification":
        bad |= (numbers != np.round(numbers)) | (numbers < 0) | (numbers >= spec.num_labels)
    if bad.any():
        row = int(np.argmax(bad))
        rule = (f"labels must be integers 0..{spec.num_labels - 1} for num_labels={spec.num_labels}"
                if spec.kind == "classification" else "regression labels must be finite numbers")
        hint = " (a test split's labels are often -1: evaluate on the validation split)" if values[row] == -1 else ""
        raise DataError(f"{where} row {row} (0-based): label {values[row]!r} is out of range: {rule}; "
                        f"{int(bad.sum())} bad row(s) in all. Fix the data or the task's num_labels{hint}")
    return numbers.astype(np.int64 if spec.kind == "classification" else np.float32)


def _raw_split(columns: dict[str, list], spec: TaskSpec, source: str) -> RawSplit:
    if not columns[spec.text_columns[0]]:
        raise DataError(f"task {spec.name!r}: {source} has no rows; check the file (only a header?) or split name")
    texts = [_check_texts(columns[c], c, spec, source) for c in spec.text_columns]
    if spec.kind == "lm":
        texts = [[t for t in texts[0] if isinstance(t, str) and t.strip()]]
        if not texts[0]:
            raise DataError(f"task {spec.name!r}: {source} column {spec.text_columns[0]!r} has no non-empty text")
        return RawSplit(source, texts, None)
    return RawSplit(source, texts, _check_labels(columns[spec.label_column], spec, source))


class _Source(NamedTuple):
    """Where one split comes from: a description for messages and a reader of its columns."""

    description: str
    read: Callable[[Optional[int]], dict[str, list]]  # row limit -> {column: values}


def _split_sources(entry: TaskEntry, spec: TaskSpec, builtin: Optional[str]) -> dict[str, _Source]:
    """The sources of a task's splits, in priority order: files, hub, builtin, the task's hub default."""
    if entry.train_file:
        files = {"train": entry.train_file, "validation": entry.validation_file}
        return {split: _Source(path, lambda limit, p=path: _dataset_columns(_load_file(p, spec.name), spec, p, limit))
                for split, path in files.items() if path}
    if entry.hub_dataset or not _from_builtin(spec, builtin):
        name, subset = entry.hub_dataset or spec.hub_dataset, entry.hub_subset or spec.hub_subset
        hub_splits = {"train": entry.train_split or spec.train_split,
                      "validation": entry.validation_split or spec.validation_split}
        sources = {}
        for split, hub_split in hub_splits.items():
            where = f"hub {name}/{subset}[{hub_split}]"
            sources[split] = _Source(where, lambda limit, s=hub_split, w=where: _dataset_columns(
                _load_hub(name, subset, s, spec.name), spec, w, limit))
        return sources
    return {split: _Source(f"builtin {builtin}/{spec.name}/{split}",
                           lambda limit, s=split: _builtin_columns(spec, s, limit))
            for split in ("train", "validation")}


def load_task_splits(entry: TaskEntry, spec: TaskSpec, builtin: Optional[str]) -> tuple[RawSplit, Optional[RawSplit]]:
    """(train, validation or None) for one task, loaded and validated."""
    limits = {"train": entry.max_train_examples, "validation": entry.max_eval_examples}
    loaded = {split: _raw_split(source.read(limits[split]), spec, source.description)
              for split, source in _split_sources(entry, spec, builtin).items()}
    return loaded["train"], loaded.get("validation")


def _builtin_columns(spec: TaskSpec, split: str, limit: Optional[int]) -> dict[str, list]:
    rows = generate(spec.name, split)[:limit]
    needed = list(spec.text_columns) + ([spec.label_column] if spec.label_column else [])
    present = list(rows[0]) if rows else []
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataError(f"task {spec.name!r}: the builtin data has no column(s) {missing}; columns present: "
                        f"{present}. Remove the column overrides from the task entry")
    return {c: [r[c] for r in rows] for c in needed}


# --------------------------------------------------------------------------- tokenization


@dataclass
class EncodedSplit:
    """One tokenized split, every row padded (right) to exactly L = max_seq_len.

    input_ids_NL int32, attention_mask_NL int8 (1 = real token),
    token_type_ids_NL int8 or None (tokenizers without segment ids),
    labels_N int64 / float32, or None for lm (labels come from input_ids).
    """

    input_ids_NL: np.ndarray
    attention_mask_NL: np.ndarray
    token_type_ids_NL: Optional[np.ndarray]
    labels_N: Optional[np.ndarray]

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
    train: EncodedSplit
    validation: Optional[EncodedSplit]
    train_source: str = ""
    validation_source: str = ""


def prepare_tasks(config: DataConfig, tokenizer: "PreTrainedTokenizerBase") -> list[TaskData]:
    """Load, validate and tokenize every task of the config, in task-id order.

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
            train_source=train.source, validation_source=validation.source if validation else ""))
    return tasks


def make_batch(task: TaskData, split: EncodedSplit, indices_B: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs for rows ``indices_B`` of ``split``, as int64/float32 CPU tensors.

    Keys: input_ids, attention_mask, token_type_ids (when the tokenizer makes
    them), labels, task_id (B,) (all equal: batches are single-task). For lm
    tasks labels = input_ids with -100 on padding (HF causal LMs shift
    internally). Pop task_id before calling a Hugging Face model.
    """
    input_ids = torch.from_numpy(split.input_ids_NL[indices_B].astype(np.int64))
    attention_mask = torch.from_numpy(split.attention_mask_NL[indices_B].astype(np.int64))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if split.token_type_ids_NL is not None:
        batch["token_type_ids"] = torch.from_numpy(split.token_type_ids_NL[indices_B].astype(np.int64))
    if split.labels_N is None:
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = torch.from_numpy(split.labels_N[indices_B])
    batch["task_id"] = torch.full((len(indices_B),), task.task_id, dtype=torch.int64)
    return batch


# --------------------------------------------------------------------------- multi-task sampling


def temperature_probabilities(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T): T = 1 proportional, T -> inf uniform."""
    log_weights = np.log(np.asarray(sizes, dtype=np.float64)) / temperature
    weights = np.exp(log_weights - log_weights.max())  # shift: no overflow for huge n or small T
    return weights / weights.sum()


class BatchIndex(NamedTuple):
    """One step of this rank: the step number, its task, and this rank's rows (B,)."""

    step: int
    task_id: int
    indices: np.ndarray


# Distinct entropy words so the task-choice and shuffle streams never coincide.
_TASK_STREAM, _SHUFFLE_STREAM = 0x7A5C, 0x5F1E
_CHUNK = 1024  # steps of task choices drawn at once


class MultiTaskBatchSampler:
    """Which task and which rows each step uses, for one rank; a pure function of (seed, step).

    Task choice. Step s draws its task from p = temperature_probabilities(n, T)
    with a generator seeded by (seed, s // 1024): it does not depend on rank
    or world size, so every rank picks the same task at the same step.

    Rows. Task i is read in passes; pass q is a permutation of its n_i rows
    seeded by (seed, i, q). Its k-th selected batch is global batch k of that
    stream: G = B * W consecutive rows of the permutation, of which rank r
    takes rows [r B, (r+1) B), so ranks hold disjoint shards of every batch and,
    with remainder "drop", of every pass. A pass has n_i // G batches ("drop":
    the n_i % G leftover rows sit out this pass, others next pass) or
    ceil(n_i / G) ("wrap": the last batch is completed from the start of the
    permutation; a task smaller than G repeats rows, possibly across ranks
    within one batch, which is the price of using it at all). k is the number of earlier steps that chose task i, so the
    state at step s is recomputed from (seed, s) alone: resuming is exact.

    Epochs. The stream is infinite; ``steps_per_epoch`` = sum_i batches per
    pass (one pass over every task in expectation at T = 1).
    """

    def __init__(self, task_sizes: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 temperature: float = 1.0, seed: int = 0, remainder: str = "drop", start_step: int = 0,
                 task_names: Optional[Sequence[str]] = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or remainder not in REMAINDERS or start_step < 0 or not task_sizes:
            raise ValueError(f"need batch_size >= 1 (got {batch_size}), remainder in {REMAINDERS} "
                             f"(got {remainder!r}), start_step >= 0 (got {start_step}) and at least one task")
        self.task_sizes = tuple(int(n) for n in task_sizes)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.temperature, self.seed, self.remainder = float(temperature), int(seed), remainder
        self.start_step = start_step
        self.global_batch_size = batch_size * world_size
        self.probabilities = temperature_probabilities(self.task_sizes, self.temperature)
        names = list(task_names) if task_names else [f"task {i}" for i in range(len(self.task_sizes))]
        G = self.global_batch_size
        self.batches_per_pass = tuple(n // G if remainder == "drop" else -(-n // G) for n in self.task_sizes)
        for name, n, batches in zip(names, self.task_sizes, self.batches_per_pass):
            if batches == 0:
                raise DataError(f"{name}: {n} training rows are fewer than one global batch (micro-batch "
                                f"{batch_size} x {world_size} ranks = {G}); set data.remainder: wrap, "
                                f"use a smaller micro-batch, or add data")

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_pass)

    def fingerprint(self) -> tuple:
        """What must agree on every rank for the plans to line up (rank excluded)."""
        return (self.task_sizes, self.batch_size, self.world_size, self.temperature, self.seed, self.remainder)

    def _chunk_tasks(self, chunk: int) -> np.ndarray:
        """Task ids of steps [chunk * 1024, (chunk + 1) * 1024), by inverse-CDF sampling."""
        uniform = np.random.default_rng([self.seed, _TASK_STREAM, chunk]).random(_CHUNK)
        tasks = np.searchsorted(np.cumsum(self.probabilities), uniform, side="right")
        return np.minimum(tasks, len(self.task_sizes) - 1)  # cumsum may end at 1 - eps

    def task_sequence(self, start: int, stop: int) -> np.ndarray:
        """Task ids of steps [start, stop) (identical on every rank)."""
        chunks = range(start // _CHUNK, -(-stop // _CHUNK))
        tasks = np.concatenate([self._chunk_tasks(c) for c in chunks]) if stop > start else np.zeros(0, np.int64)
        offset = start - (start // _CHUNK) * _CHUNK
        return tasks[offset: offset + stop - start]

    def _global_rows(self, task: int, k: int, cache: dict[int, tuple[int, np.ndarray]]) -> np.ndarray:
        """Rows of the k-th global batch (G,) of ``task``; cache holds each task's current pass."""
        n, batches, G = self.task_sizes[task], self.batches_per_pass[task], self.global_batch_size
        pass_index, j = divmod(k, batches)
        if cache.get(task, (-1,))[0] != pass_index:
            order = np.random.default_rng([self.seed, _SHUFFLE_STREAM, task, pass_index]).permutation(n)
            if self.remainder == "wrap":
                order = np.resize(order, batches * G)  # repeats the permutation cyclically
            cache[task] = (pass_index, order)
        return cache[task][1][j * G:(j + 1) * G]

    def __iter__(self) -> Iterator[BatchIndex]:
        """Infinite: steps start_step, start_step + 1, ..."""
        step = self.start_step
        counts = np.bincount(self.task_sequence(0, step), minlength=len(self.task_sizes))
        cache: dict[int, tuple[int, np.ndarray]] = {}
        chunk, tasks = -1, np.zeros(0, np.int64)
        lo = self.rank * self.batch_size
        while True:
            if step // _CHUNK != chunk:
                chunk = step // _CHUNK
                tasks = self._chunk_tasks(chunk)
            task = int(tasks[step % _CHUNK])
            rows = self._global_rows(task, int(counts[task]), cache)
            counts[task] += 1
            yield BatchIndex(step, task, rows[lo: lo + self.batch_size])
            step += 1


class _BatchFetcher(torch.utils.data.Dataset):
    """Map-style view for a DataLoader whose batch_sampler yields BatchIndex."""

    def __init__(self, tasks: Sequence[TaskData]) -> None:
        self.tasks = list(tasks)

    def __getitems__(self, index: BatchIndex) -> dict[str, torch.Tensor]:
        task = self.tasks[index.task_id]
        return make_batch(task, task.train, index.indices)

    def __getitem__(self, index: BatchIndex) -> dict[str, torch.Tensor]:
        return self.__getitems__(index)


def _passthrough(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # module-level (not a lambda) so worker processes can pickle it


class TrainBatches:
    """This rank's infinite stream of training batches, resumable to the exact step.

    ``for batch in train_batches: ...`` yields ``make_batch`` dicts, one
    task per batch (``int(batch["task_id"][0])``). ``step`` counts batches
    handed out; ``state_dict()`` saves it (with the plan's fingerprint) and
    ``load_state_dict()`` / ``skip()`` move it; call them before iterating:
    a running iterator keeps its position. With num_workers > 0 the workers
    prefetch ahead, but the counted step is the consumer's, so checkpoints
    stay exact.
    """

    def __init__(self, tasks: Sequence[TaskData], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 temperature: float = 1.0, seed: int = 0, remainder: str = "drop", num_workers: int = 0) -> None:
        self.tasks = list(tasks)
        self.num_workers = num_workers
        self._sampler_args = dict(batch_size=batch_size, rank=rank, world_size=world_size,
                                  temperature=temperature, seed=seed, remainder=remainder,
                                  task_names=[t.spec.name for t in self.tasks])
        self.sampler = self._make_sampler(0)  # validates sizes now, not at the first step
        self.step = 0

    def _make_sampler(self, start_step: int) -> MultiTaskBatchSampler:
        return MultiTaskBatchSampler([len(t.train) for t in self.tasks], start_step=start_step,
                                     **self._sampler_args)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler = self._make_sampler(self.step)
        if self.num_workers == 0:
            fetcher = _BatchFetcher(self.tasks)
            batches: Any = map(fetcher.__getitems__, self.sampler)
        else:
            batches = torch.utils.data.DataLoader(_BatchFetcher(self.tasks), batch_sampler=self.sampler,
                                                  collate_fn=_passthrough, num_workers=self.num_workers)
        for batch in batches:
            self.step += 1
            yield batch

    def skip(self, steps: int) -> None:
        """Advance by ``steps`` batches without building them."""
        if steps < 0:
            raise ValueError(f"steps={steps}: cannot skip backwards; use load_state_dict")
        self.step += steps

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": _jsonable(self.sampler.fingerprint())}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue at state["step"]; strict: the saved plan must match (same data, batch, ranks, seed, T)."""
        saved, current = state.get("fingerprint"), _jsonable(self.sampler.fingerprint())
        if strict and saved != current:
            labels = ("task_sizes", "batch_size", "world_size", "temperature", "seed", "remainder")
            diffs = [f"{name}: saved {a} now {b}" for name, a, b in zip(labels, saved or [None] * 6, current)
                     if a != b]
            raise DataError(f"the data plan changed since the checkpoint ({'; '.join(diffs)}), so resuming "
                            f"would not continue the same batches; restore the setting, or pass strict=False "
                            f"to continue at step {state['step']} with the new plan")
        self.step = int(state["step"])


def _jsonable(value: Any) -> Any:
    """Tuples -> lists so a fingerprint compares equal after a JSON/pickle round trip."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def train_batches(tasks: Sequence[TaskData], config: DataConfig, batch_size: int, *, rank: int = 0,
                  world_size: int = 1) -> TrainBatches:
    """This rank's training stream for ``config``; batch_size is DeepSpeed's micro-batch per GPU."""
    return TrainBatches(tasks, batch_size, rank=rank, world_size=world_size, temperature=config.temperature,
                        seed=config.seed, remainder=config.remainder, num_workers=config.num_workers)


def check_same_plan(sampler: MultiTaskBatchSampler, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise DataError on every rank if ranks built different plans (they would hang in all-to-all).

    Different plans come from different data files or settings on different
    nodes. Costs one small all_gather_object; call it once after building
    the training stream. No-op outside torch.distributed.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    plans: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(plans, sampler.fingerprint(), group=group)
    odd = [r for r, plan in enumerate(plans) if plan != plans[0]]
    if odd:
        raise DataError(f"ranks {odd} built a different data plan than rank 0 ({plans[odd[0]]} vs {plans[0]}); "
                        f"every rank must see the same data files and data config")


# --------------------------------------------------------------------------- evaluation


def num_eval_batches(num_examples: int, batch_size: int, world_size: int) -> int:
    """Eval batches per rank: ceil(N / G), the same on every rank."""
    return -(-num_examples // (batch_size * world_size))


def eval_batches(task: TaskData, batch_size: int, *, rank: int = 0, world_size: int = 1
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Every validation example of ``task`` exactly once across ranks, in full (B, L) batches.

    Eval batch j covers examples [j G, (j+1) G); rank r takes its slice
    [j G + r B, j G + (r+1) B). Positions past N are filled with example 0 and
    marked ``eval_mask = False``, so all ranks run the same number of
    same-shape batches. Extra keys: ``example_index`` (B,) and ``eval_mask``
    (B,) bool. For lm tasks padded rows' labels are all -100, so the model's
    loss already ignores them. Gather results with ``gather_eval``.
    """
    if task.validation is None:
        raise DataError(f"task {task.spec.name!r} has no validation split; give validation_file or skip its eval")
    n, G = len(task.validation), batch_size * world_size
    for j in range(num_eval_batches(n, batch_size, world_size)):
        positions_B = j * G + rank * batch_size + np.arange(batch_size)
        mask_B = positions_B < n
        batch = make_batch(task, task.validation, np.where(mask_B, positions_B, 0))
        if task.spec.kind == "lm":
            batch["labels"][torch.from_numpy(~mask_B)] = -100
        batch["example_index"] = torch.from_numpy(positions_B)
        batch["eval_mask"] = torch.from_numpy(mask_B)
        yield batch


def merge_eval_shards(example_index_M: np.ndarray, predictions_M: np.ndarray, labels_M: np.ndarray,
                      mask_M: np.ndarray, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop padded rows, order by example index, and check each example appears exactly once.

    Inputs are the rows of every rank concatenated (any order). Returns
    (predictions, labels) for examples 0..N-1, ready for compute_metrics.
    """
    keep = np.asarray(mask_M).astype(bool)
    index = np.asarray(example_index_M)[keep]
    order = np.argsort(index, kind="stable")
    if len(index) != num_examples or not np.array_equal(index[order], np.arange(num_examples)):
        raise RuntimeError(f"eval shards hold {len(index)} rows covering {len(np.unique(index))} distinct of "
                           f"{num_examples} examples; every rank must run every batch of eval_batches with the "
                           f"same batch_size and world_size")
    return np.asarray(predictions_M)[keep][order], np.asarray(labels_M)[keep][order]


def gather_eval(example_index_M: torch.Tensor, predictions_M: torch.Tensor, labels_M: torch.Tensor,
                mask_M: torch.Tensor, num_examples: int, group: Optional[dist.ProcessGroup] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """All-gather this rank's eval rows and merge them: every rank gets the full, ordered result.

    Pass the concatenation over this rank's eval batches of example_index,
    the model's predictions (logits (M, C) or scores (M,)), labels and
    eval_mask, padded rows included: every rank has the same M (same number
    of same-shape batches), so a plain tensor all_gather works, no pickling.
    Tensors may live on the accelerator (NCCL needs that); results are numpy.
    """
    parts = [example_index_M.to(torch.int64), predictions_M.detach().float(), labels_M.detach(),
             mask_M.to(torch.int64)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        gathered = []
        for tensor in parts:
            tensor = tensor.contiguous()
            pieces = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(pieces, tensor, group=group)
            gathered.append(torch.cat(pieces))
        parts = gathered
    return merge_eval_shards(*(t.cpu().numpy() for t in parts), num_examples=num_examples)


# --------------------------------------------------------------------------- reporting


def describe_tasks(tasks: Sequence[TaskData], sampler: MultiTaskBatchSampler) -> str:
    """A table for the rank-0 log: sizes, sampling probability, batches per pass, truncation."""
    lines = [f"{'id':>2} {'task':<16} {'kind':<14} {'train':>8} {'valid':>6} {'p':>6} {'batches/pass':>12} "
             f"{'at max_len':>10}"]
    for task, p, batches in zip(tasks, sampler.probabilities, sampler.batches_per_pass):
        valid = len(task.validation) if task.validation is not None else 0
        lines.append(f"{task.task_id:>2} {task.spec.name:<16} {task.spec.kind:<14} {len(task.train):>8} "
                     f"{valid:>6} {p:>6.3f} {batches:>12} {task.train.num_at_max_len:>10}")
    return "\n".join(lines)
