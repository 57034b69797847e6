"""The ``data`` section: tasks, their sources, sequence length and sampling (no torch needed).

``DataConfig`` validates every task entry when it is built, so a missing file
extension, an unknown task or a task without data fails before any model or
data work, naming ``data.tasks[i].field`` and the fix.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mpomoe_ds.config import ConfigError, fail, from_dict, to_dict
from mpomoe_ds.data.builtin import BUILTINS, builtin_task_names
from mpomoe_ds.data.tasks import METRICS_BY_KIND, TASKS, DataError, TaskSpec, task_names

REMAINDERS = ("drop", "wrap")


# File extension -> (datasets builder, builder kwargs). Compression suffixes
# (.gz, .bz2, .xz, .zst) on top are handled by datasets.
FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    # keep_default_na=False: a sentence that reads "NA" or "null" stays text.
    ".csv": ("csv", {"keep_default_na": False}),
    # QUOTE_NONE: GLUE-style tsv files contain unbalanced quote characters.
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


SUPPORTED_EXTENSIONS = tuple(FILE_BUILDERS)


_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


_DEFAULT_METRICS = {"classification": ("accuracy",), "regression": ("pearson", "spearman"),
                    "lm": ("perplexity", "loss")}


def file_extension(path: Union[str, Path]) -> str:
    """'a/b.JSONL.gz' -> '.jsonl': the format suffix, ignoring a compression suffix."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


@dataclass
class TaskEntry:
    """One task in the data config.

    name: a registered task (``mpomoe_ds.data.tasks.task_names()``) or, with
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
    weight: mixture weight of the task's micro-batches (normalised over all
        tasks and corpora); give every task and corpus one, or none
        (temperature sampling over training rows).
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
    weight: Optional[float] = None


_CUSTOM_FIELDS = ("kind", "num_labels", "metrics", "primary_metric", "label_names")


@dataclass
class CorpusEntry:
    """One prepared pretraining corpus (``mpomoe-prepare`` output) in the data config.

    name: how logs, TensorBoard and metrics.json call it (unique).
    path: the prepared folder (holds index.json).
    weight: mixture weight (normalised over corpora); null for all corpora =
        temperature sampling over their sizes in tokens (data.temperature).
    max_eval_sequences: held-out packed sequences evaluated per corpus.
    """

    name: str
    path: str
    weight: Optional[float] = None
    max_eval_sequences: int = 256


@dataclass
class SpanCorruptionEntry:
    """T5 span corruption of packed corpora (:mod:`mpomoe_ds.data.span_corruption`).

    noise_density: share of each sequence's tokens masked out (T5: 0.15).
    mean_noise_span_length: mean length of a masked span (T5: 3).
    """

    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0


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
    corpora: prepared corpora (:class:`CorpusEntry`) for packed causal-LM
        pretraining, each evaluated on its held-out split. With ``tasks``
        empty, training reads only them, mixed per sample by weight or
        temperature (:mod:`mpomoe_ds.data.mixture`; ``builtin`` is unused).
        With ``tasks`` too, corpora and tasks are mixed per micro-batch (each
        micro-batch holds one task or one corpus, drawn per step by weight,
        or by temperature over training rows: examples, packed sequences);
        decoder models only (span corruption with tasks is refused).
    document_masking: packed corpora only: position ids restart after every
        EOS and attention does not cross document boundaries inside a packed
        sequence (decoders: gpt2, llama, mistral, qwen2, qwen3). False = GPT-style
        packing, attention spans the whole sequence.
    """

    tasks: list[TaskEntry] = field(default_factory=list)
    builtin: Optional[str] = "toy_glue"
    max_seq_len: int = 32
    temperature: float = 1.0
    seed: int = 1234
    num_workers: int = 0
    remainder: str = "drop"
    corpora: list[CorpusEntry] = field(default_factory=list)
    document_masking: bool = False
    span_corruption: Optional[SpanCorruptionEntry] = None

    def __post_init__(self) -> None:
        if self.builtin is not None and self.builtin not in BUILTINS:
            fail("data", "builtin", self.builtin, f"choose one of {sorted(BUILTINS)} or null")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            fail("data", "max_seq_len", self.max_seq_len, "use an integer >= 8 (special tokens need room)")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            fail("data", "temperature", self.temperature, "use T > 0 (1 = proportional, .inf = uniform)")
        if not isinstance(self.seed, int) or self.seed < 0:
            fail("data", "seed", self.seed, "use a non-negative integer seed")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            fail("data", "num_workers", self.num_workers, "use 0 (no workers) or a positive worker count")
        if self.remainder not in REMAINDERS:
            fail("data", "remainder", self.remainder, f"choose one of {list(REMAINDERS)}")
        self.corpora = [_coerce_corpus(entry, i) for i, entry in enumerate(self.corpora)]
        if not isinstance(self.document_masking, bool):
            fail("data", "document_masking", self.document_masking, "use true or false")
        if self.document_masking and not self.corpora:
            fail("data", "document_masking", True, "document masking applies to packed corpora (data.corpora); "
                 "task rows hold one example each: remove it")
        if self.span_corruption is not None:
            self._check_span_corruption()
        if self.corpora:
            self._check_corpora()
            if not self.tasks:
                return
        if not self.tasks:
            if self.builtin is None:
                fail("data", "tasks", self.tasks, "list at least one task, or set data.builtin (e.g. toy_glue)")
            # Spell the builtin tasks out so the saved config says what ran.
            self.tasks = [TaskEntry(name=name) for name in builtin_task_names(self.builtin)]
        self.tasks = [_coerce_entry(entry, i) for i, entry in enumerate(self.tasks)]
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            fail("data", "tasks", names, f"task names must be unique, {duplicates} repeat; rename a custom copy")
        for i, entry in enumerate(self.tasks):
            _validate_entry(entry, i, self.builtin)
        if self.corpora:
            self._check_tasks_with_corpora()

    def _check_span_corruption(self) -> None:
        if isinstance(self.span_corruption, dict):
            self.span_corruption = from_dict(SpanCorruptionEntry, self.span_corruption, "data.span_corruption")
        elif not isinstance(self.span_corruption, SpanCorruptionEntry):
            fail("data", "span_corruption", self.span_corruption,
                 "give a mapping (noise_density, mean_noise_span_length), {} for T5's defaults, or null")
        span = self.span_corruption
        if not self.corpora:
            fail("data", "span_corruption", to_dict(span), "span corruption applies to packed corpora "
                 "(data.corpora); downstream tasks train T5 with model.objective=text_to_text")
        if self.document_masking:
            fail("data", "document_masking", True, "span corruption gives every sequence to the encoder whole; "
                 "document masking is for decoders: remove one of them")
        if not 0.0 < span.noise_density < 1.0:
            fail("data", "span_corruption.noise_density", span.noise_density, "use a share in (0, 1), e.g. 0.15")
        if not span.mean_noise_span_length >= 1.0:
            fail("data", "span_corruption.mean_noise_span_length", span.mean_noise_span_length,
                 "use a mean span length >= 1, e.g. 3")

    def _check_corpora(self) -> None:
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            fail("data", "corpora", names, "corpus names must be unique")
        weights = [c.weight for c in self.corpora]
        if any(w is not None for w in weights) and (None in weights or min(weights) <= 0):
            fail("data", "corpora", weights, "give every corpus a weight > 0, or none (temperature sampling)")
        for i, c in enumerate(self.corpora):
            if c.max_eval_sequences < 0:
                fail("data", f"corpora[{i}].max_eval_sequences", c.max_eval_sequences, "use a count >= 0")

    def _check_tasks_with_corpora(self) -> None:
        """Corpora mixed with tasks: unique names over both, weights for all sources or none, no T5 corruption."""
        if self.span_corruption is not None:
            fail("data", "span_corruption", to_dict(self.span_corruption),
                 "corpora are mixed with data.tasks only as causal-LM packing for decoder models; T5 span "
                 "corruption together with tasks is not supported yet: pretrain with span corruption in one run "
                 "(data.tasks: []) and train the tasks in another")
        names = [t.name for t in self.tasks] + [c.name for c in self.corpora]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            fail("data", "corpora", [c.name for c in self.corpora],
                 f"task and corpus names share {clashes}; logs and eval are keyed by name: rename the corpus")
        weights = [t.weight for t in self.tasks] + [c.weight for c in self.corpora]
        if any(w is not None for w in weights) and None in weights:
            fail("data", "tasks", [f"{n}: {w}" for n, w in zip(names, weights)],
                 "give every task and corpus a weight, or none of them (temperature sampling over training rows)")


def _coerce_corpus(entry: Union[CorpusEntry, dict], index: int) -> CorpusEntry:
    if isinstance(entry, CorpusEntry):
        return entry
    if isinstance(entry, dict):
        return from_dict(CorpusEntry, entry, f"data.corpora[{index}]")
    fail("data", f"corpora[{index}]", entry, "give a mapping with 'name' and 'path'")


def _coerce_entry(entry: Union[TaskEntry, dict, str], index: int) -> TaskEntry:
    if isinstance(entry, TaskEntry):
        return entry
    if isinstance(entry, str):
        return TaskEntry(name=entry)
    if isinstance(entry, dict):
        return from_dict(TaskEntry, entry, f"data.tasks[{index}]")
    fail("data", f"tasks[{index}]", entry, "give a task name or a mapping with at least 'name'")


def _validate_entry(entry: TaskEntry, index: int, builtin: Optional[str]) -> None:
    where = f"tasks[{index}]"
    if not isinstance(entry.name, str) or not entry.name:
        fail("data", f"{where}.name", entry.name, "give the task a non-empty name")
    for name in ("train_file", "validation_file"):
        path = getattr(entry, name)
        if path is not None and file_extension(path) not in FILE_BUILDERS:
            fail("data", f"{where}.{name}", path, f"unsupported extension {file_extension(path)!r}; use one of "
                  f"{list(SUPPORTED_EXTENSIONS)} (optionally compressed: {list(_COMPRESSIONS)})")
    if entry.validation_file and not entry.train_file:
        fail("data", f"{where}.train_file", None, "a task with a validation_file also needs a train_file")
    if entry.train_file and entry.hub_dataset:
        fail("data", f"{where}.hub_dataset", entry.hub_dataset, "give either local files or a hub data set, not both")
    if entry.weight is not None and (not isinstance(entry.weight, (int, float)) or not entry.weight > 0):
        fail("data", f"{where}.weight", entry.weight, "use a weight > 0, or null (temperature sampling)")
    for name in ("max_train_examples", "max_eval_examples"):
        value = getattr(entry, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            fail("data", f"{where}.{name}", value, "use a positive row count, or null for all rows")
    try:
        spec = resolve_task(entry)
    except DataError as err:
        raise ConfigError(f"data.{where} ({entry.name}): {err}") from None
    if not (entry.train_file or entry.hub_dataset or spec.hub_dataset or from_builtin(spec, builtin)):
        builtin_hint = next((b for b, tasks in BUILTINS.items() if spec.name in tasks), None)
        fix = f"set data.builtin: {builtin_hint}" if builtin_hint else "give hub_dataset"
        fail("data", f"{where}.train_file", None, f"task {spec.name!r} has no data source; give train_file or {fix}")


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


def from_builtin(spec: TaskSpec, builtin: Optional[str]) -> bool:
    return builtin is not None and spec.name in BUILTINS[builtin]
