"""Task registry and evaluation metrics.

This module owns *what a task is*: its kind (classification, regression or
language modelling), which columns hold the text and the label, how many
labels it has, which metrics score it and which one is primary. It also owns
the metric functions themselves (numpy / scipy only) and ``compute_metrics``.

Registered tasks (``TASKS``, read-only):

- GLUE: cola (matthews), sst2 (accuracy), mrpc (accuracy + f1), qqp
  (accuracy + f1), stsb (pearson + spearman, regression), mnli (accuracy, 3
  labels, validated on ``validation_matched``), qnli, rte, wnli (accuracy).
  Their default source is the hub dataset ``nyu-mll/glue`` (needs internet or
  a filled Hugging Face cache).
- ``lm``: causal language modelling on a ``text`` column.
- The embedded ``toy_glue`` / ``toy_lm`` tasks (``mpomoe_ds.data.builtin``):
  toy_sentiment, toy_topic, toy_paraphrase, toy_lm. Their data is generated
  in code; see ``mpomoe_ds.data.DataConfig.builtin``.

A task not in the registry is described inline in the data config (kind,
columns, num_labels, metrics) and built with ``TaskSpec(...)`` directly.

Naming: *predictions* are what the model outputs (logits ``(N, C)``, class
ids ``(N,)`` or regression scores ``(N,)`` / ``(N, 1)``); *labels* are the
gold values. Class ids are 0..num_labels-1; binary F1 treats class 1 as the
positive class (GLUE convention).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

import numpy as np

KINDS = ("classification", "regression", "lm")

# Which metrics make sense for which kind; f1 additionally needs 2 labels.
METRICS_BY_KIND: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "classification": ("accuracy", "f1", "matthews"),
    "regression": ("pearson", "spearman"),
    "lm": ("perplexity", "loss"),
})

GLUE_HUB_DATASET = "nyu-mll/glue"


class DataError(ValueError):
    """A task or data problem; the message names the task/file/column and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything the data pipeline and the task heads need to know about one task.

    name: registry key and the name used in logs and metric keys.
    kind: "classification", "regression" or "lm".
    text_columns: one column (single sentence / LM text) or two (sentence pair).
    label_column: column holding the gold label; None for "lm".
    num_labels: classes for classification, 1 for regression, 0 for "lm".
    metrics: metric names reported for this task (see METRICS_BY_KIND).
    primary_metric: the metric used to pick the best checkpoint; default metrics[0].
    label_names: optional class names; string labels in the data are mapped
        to their index in this tuple.
    hub_dataset / hub_subset: default Hugging Face hub source (None = no default).
    train_split / validation_split: split names used with the hub source.
    """

    name: str
    kind: str
    text_columns: tuple[str, ...]
    label_column: Optional[str] = "label"
    num_labels: int = 2
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = ""
    label_names: Optional[tuple[str, ...]] = None
    hub_dataset: Optional[str] = None
    hub_subset: Optional[str] = None
    train_split: str = "train"
    validation_split: str = "validation"

    def __post_init__(self) -> None:
        # Normalise list inputs (from YAML) to tuples so specs stay hashable.
        for name in ("text_columns", "metrics", "label_names"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.primary_metric and self.metrics:
            object.__setattr__(self, "primary_metric", self.metrics[0])
        self._validate()

    def _validate(self) -> None:
        where = f"task {self.name!r}"
        if self.kind not in KINDS:
            raise DataError(f"{where}: kind={self.kind!r} is unknown; choose one of {list(KINDS)}")
        if not 1 <= len(self.text_columns) <= (1 if self.kind == "lm" else 2):
            raise DataError(f"{where}: text_columns={list(self.text_columns)}: give one column "
                            f"(single text{'' if self.kind == 'lm' else ' or two for a sentence pair'})")
        if self.kind == "lm":
            if self.label_column is not None or self.num_labels != 0:
                raise DataError(f"{where}: an lm task predicts its own text; set label_column=None, num_labels=0")
        elif not self.label_column:
            raise DataError(f"{where}: a {self.kind} task needs a label_column")
        if self.kind == "regression" and self.num_labels != 1:
            raise DataError(f"{where}: num_labels={self.num_labels}: a regression task has num_labels=1")
        if self.kind == "classification" and self.num_labels < 2:
            raise DataError(f"{where}: num_labels={self.num_labels}: classification needs at least 2 labels")
        allowed = METRICS_BY_KIND[self.kind]
        bad = [m for m in self.metrics if m not in allowed]
        if not self.metrics or bad:
            raise DataError(f"{where}: metrics={list(self.metrics)}: a {self.kind} task can report {list(allowed)}")
        if "f1" in self.metrics and self.num_labels != 2:
            raise DataError(f"{where}: f1 is binary F1 (class 1 positive) and needs num_labels=2, "
                            f"got {self.num_labels}; use accuracy or matthews")
        if self.primary_metric not in self.metrics:
            raise DataError(f"{where}: primary_metric={self.primary_metric!r} must be one of {list(self.metrics)}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise DataError(f"{where}: label_names has {len(self.label_names)} names for "
                            f"num_labels={self.num_labels}; give one name per class")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def with_columns(self, text_columns: Optional[Sequence[str]] = None,
                     label_column: Optional[str] = None) -> "TaskSpec":
        """The same task reading its text/label from differently named columns."""
        changes: dict = {}
        if text_columns is not None:
            if len(text_columns) != len(self.text_columns):
                raise DataError(f"task {self.name!r}: text_columns override {list(text_columns)} must name "
                                f"{len(self.text_columns)} column(s) like the task's {list(self.text_columns)}")
            changes["text_columns"] = tuple(text_columns)
        if label_column is not None:
            if self.kind == "lm":
                raise DataError(f"task {self.name!r}: an lm task has no label column; remove label_column")
            changes["label_column"] = label_column
        return dataclasses.replace(self, **changes) if changes else self


def _glue(name: str, columns: tuple[str, ...], metrics: tuple[str, ...], primary: str = "",
          num_labels: int = 2, kind: str = "classification", validation_split: str = "validation",
          label_names: Optional[tuple[str, ...]] = None) -> TaskSpec:
    return TaskSpec(name=name, kind=kind, text_columns=columns, label_column="label", num_labels=num_labels,
                    metrics=metrics, primary_metric=primary, hub_dataset=GLUE_HUB_DATASET, hub_subset=name,
                    validation_split=validation_split, label_names=label_names)


def _registry() -> Mapping[str, TaskSpec]:
    specs = [
        _glue("cola", ("sentence",), ("matthews", "accuracy"), label_names=("unacceptable", "acceptable")),
        _glue("sst2", ("sentence",), ("accuracy",), label_names=("negative", "positive")),
        _glue("mrpc", ("sentence1", "sentence2"), ("accuracy", "f1"), primary="f1",
              label_names=("not_equivalent", "equivalent")),
        _glue("qqp", ("question1", "question2"), ("accuracy", "f1"), primary="f1",
              label_names=("not_duplicate", "duplicate")),
        _glue("stsb", ("sentence1", "sentence2"), ("pearson", "spearman"), num_labels=1, kind="regression"),
        _glue("mnli", ("premise", "hypothesis"), ("accuracy",), num_labels=3, validation_split="validation_matched",
              label_names=("entailment", "neutral", "contradiction")),
        _glue("qnli", ("question", "sentence"), ("accuracy",), label_names=("entailment", "not_entailment")),
        _glue("rte", ("sentence1", "sentence2"), ("accuracy",), label_names=("entailment", "not_entailment")),
        _glue("wnli", ("sentence1", "sentence2"), ("accuracy",), label_names=("not_entailment", "entailment")),
        TaskSpec(name="lm", kind="lm", text_columns=("text",), label_column=None, num_labels=0,
                 metrics=("perplexity", "loss")),
        # The embedded default data set (generated in mpomoe_ds.data.builtin.toy_glue).
        TaskSpec(name="toy_sentiment", kind="classification", text_columns=("sentence",), num_labels=2,
                 metrics=("accuracy", "f1"), label_names=("negative", "positive")),
        TaskSpec(name="toy_topic", kind="classification", text_columns=("sentence",), num_labels=4,
                 metrics=("accuracy", "matthews"), label_names=("sports", "food", "technology", "weather")),
        TaskSpec(name="toy_paraphrase", kind="classification", text_columns=("sentence1", "sentence2"),
                 num_labels=2, metrics=("accuracy", "f1"), label_names=("different", "paraphrase")),
        TaskSpec(name="toy_lm", kind="lm", text_columns=("text",), label_column=None, num_labels=0,
                 metrics=("perplexity", "loss")),
    ]
    return MappingProxyType({s.name: s for s in specs})


TASKS: Mapping[str, TaskSpec] = _registry()


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; unknown names raise DataError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; registered tasks are {task_names()}. For another task, "
                        f"describe it inline (kind, text_columns, label_column, num_labels, metrics)") from None


# --------------------------------------------------------------------------- metrics


def _as_1d(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D (N,) or (N, 1), got shape {values.shape}")
    return values


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of class ids equal to the label."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def binary_f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0 when there are no positives at all."""
    pred_pos, gold_pos = np.asarray(predictions) == positive, np.asarray(labels) == positive
    tp = np.sum(pred_pos & gold_pos)
    fp = np.sum(pred_pos & ~gold_pos)
    fn = np.sum(~pred_pos & gold_pos)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for K classes (Gorodkin's R_K), from the confusion matrix C.

    MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)),
    c = trace(C), s = N, t_k = true count of class k, p_k = predicted count.
    For 2 classes this is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    Returns 0 when a marginal is constant (e.g. one class predicted for everything).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    gold, pred = codes[: len(labels)], codes[len(labels):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (gold, pred), 1.0)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no linear relation measurable)."""
    x = _as_1d(predictions, "predictions").astype(np.float64)
    y = _as_1d(labels, "labels").astype(np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / denom) if denom else 0.0


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman correlation: Pearson of the ranks, ties given their average rank."""
    from scipy.stats import rankdata  # slow import (~1 s), needed by stsb-like tasks only

    return pearson(rankdata(_as_1d(predictions, "predictions")), rankdata(_as_1d(labels, "labels")))


def lm_metrics(nll_sum: float, num_tokens: int) -> dict[str, float]:
    """Mean token loss and perplexity exp(loss) from a summed negative log-likelihood.

    Sum nll and token counts over batches and ranks (an all-reduce of two
    numbers) before calling this, so every token weighs the same.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens={num_tokens}: no target tokens were scored")
    loss = float(nll_sum) / num_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # 700: exp overflows float64 past ~709


_CLASSIFICATION_METRICS = {"accuracy": accuracy, "f1": binary_f1, "matthews": matthews_corrcoef}
_REGRESSION_METRICS = {"pearson": pearson, "spearman": spearman}


def class_predictions(predictions: np.ndarray) -> np.ndarray:
    """Class ids from logits ``(N, C)`` (argmax) or from class ids ``(N,)``."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        return predictions.argmax(axis=1)
    if predictions.ndim == 1:
        return predictions.astype(np.int64)
    raise ValueError(f"classification predictions must be logits (N, C) or class ids (N,), got {predictions.shape}")


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics ``{name: value}`` for predictions vs labels (every example once).

    Classification takes logits (N, C) or class ids (N,); regression takes
    scores (N,) or (N, 1). LM tasks are scored from summed losses: use
    ``lm_metrics``.
    """
    if task.kind == "lm":
        raise ValueError(f"task {task.name!r} is a language-modelling task; sum the token nll and count the "
                         f"target tokens, then call lm_metrics(nll_sum, num_tokens)")
    labels = _as_1d(labels, "labels")
    if len(predictions) != len(labels):
        raise ValueError(f"task {task.name!r}: {len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"task {task.name!r}: no examples to score")
    if task.kind == "classification":
        ids = class_predictions(predictions)
        return {m: _CLASSIFICATION_METRICS[m](ids, labels) for m in task.metrics}
    scores = _as_1d(predictions, "predictions")
    return {m: _REGRESSION_METRICS[m](scores, labels) for m in task.metrics}
