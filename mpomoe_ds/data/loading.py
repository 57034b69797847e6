"""Loading each task's raw splits from files, the hub or the built-in data, validated early.

A split becomes a :class:`RawSplit` (its text columns and labels); every
problem (missing or empty file, unknown column, bad label) is a ``DataError``
naming the task, the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from mpomoe_ds.data.builtin import generate
from mpomoe_ds.data.config import FILE_BUILDERS, SUPPORTED_EXTENSIONS, TaskEntry, file_extension, from_builtin
from mpomoe_ds.data.tasks import DataError, TaskSpec


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
    if ext not in FILE_BUILDERS:
        raise DataError(f"task {task!r}: {path} has unsupported extension {ext!r}; "
                        f"convert it to one of {list(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"task {task!r}: data file {path} does not exist (resolved: {path.resolve()}); "
                        f"fix the path in data.tasks (relative paths are relative to the working directory)")
    if path.stat().st_size == 0:
        raise DataError(f"task {task!r}: data file {path} is empty; it needs a header/records with the task's columns")
    import datasets  # slow import (~1 s); the builtin data never needs it

    builder, kwargs = FILE_BUILDERS[ext]
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
    if entry.hub_dataset or not from_builtin(spec, builtin):
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
