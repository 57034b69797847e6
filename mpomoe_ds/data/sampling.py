"""Multi-task sampling: this rank's resumable stream of single-task training batches.

The task of step s is a function of (seed, s) alone, so every rank trains the
same task (and task head) at the same step; each rank reads its own disjoint
rows of the global batch. A task may be a packed pretraining corpus
(``data.corpora`` together with ``data.tasks``): it is one more source of
whole micro-batches, so every micro-batch still holds one task, as the
multi-task model needs. Shape legend: B per-rank micro-batch, W world size,
G = B * W global batch, K tasks (sources).
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from mpomoe_ds import parallel
from mpomoe_ds.data.config import REMAINDERS, DataConfig
from mpomoe_ds.data.corpus import PackedSequences
from mpomoe_ds.data.mixture import (
    MixtureSampler,
    PackedMixtureBatches,
    carried_tokens_seen,
    epoch_sequences,
    lm_batch,
    packed_rows,
)
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.data.tokenize import TaskData, make_batch


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

    Packed corpora (``packed[i]``). A corpus source's k-th global batch is
    its samples [k G, (k+1) G) of the corpus's endless epoch-permuted sequence
    stream (:func:`mpomoe_ds.data.mixture.epoch_sequences`, O(1) memory): no
    remainder, every epoch visits every packed sequence once.

    Weights. ``probabilities`` (normalised per-source weights) replace the
    temperature rule when given.

    Epochs. The stream is infinite; ``steps_per_epoch`` = sum_i batches per
    pass (one pass over every task in expectation at T = 1).
    """

    def __init__(self, task_sizes: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 temperature: float = 1.0, seed: int = 0, remainder: str = "drop", start_step: int = 0,
                 task_names: Optional[Sequence[str]] = None, probabilities: Optional[Sequence[float]] = None,
                 packed: Optional[Sequence[bool]] = None) -> None:
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
        self.weighted = probabilities is not None
        self.probabilities = (np.asarray(probabilities, dtype=np.float64) if self.weighted
                              else temperature_probabilities(self.task_sizes, self.temperature))
        self.packed = tuple(bool(p) for p in packed) if packed is not None else (False,) * len(self.task_sizes)
        if len(self.probabilities) != len(self.task_sizes) or len(self.packed) != len(self.task_sizes):
            raise ValueError(f"{len(self.task_sizes)} tasks but {len(self.probabilities)} probabilities and "
                             f"{len(self.packed)} packed flags")
        names = list(task_names) if task_names else [f"task {i}" for i in range(len(self.task_sizes))]
        G = self.global_batch_size
        self.batches_per_pass = tuple(-(-n // G) if remainder == "wrap" or is_packed else n // G
                                      for n, is_packed in zip(self.task_sizes, self.packed))
        for name, n, batches in zip(names, self.task_sizes, self.batches_per_pass):
            if batches == 0:
                raise DataError(f"{name}: {n} training rows are fewer than one global batch (micro-batch "
                                f"{batch_size} x {world_size} ranks = {G}); set data.remainder: wrap, "
                                f"use a smaller micro-batch, or add data")

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches_per_pass)

    def fingerprint(self) -> tuple:
        """What fixes the global plan: equal on every rank, and across a resume at another world size.

        The global batch G = B * W counts, not B and W apart: rank r of any
        world reads rows [r B, (r+1) B) of the same G rows, so a resume with
        the same G at another world size continues at the same global sample.
        """
        plan = (self.task_sizes, self.global_batch_size, self.temperature, self.seed, self.remainder)
        if self.weighted or any(self.packed):  # plain task runs keep the fingerprint their checkpoints hold
            plan += ((tuple(float(p) for p in self.probabilities), self.packed),)
        return plan

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
        if self.packed[task]:
            return epoch_sequences(k * G + np.arange(G), n, self.seed, task)
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
    """Map-style view for a DataLoader whose batch_sampler yields BatchIndex (task rows or packed sequences)."""

    def __init__(self, tasks: Sequence[TaskData], document_masking: bool = False) -> None:
        self.tasks = list(tasks)
        self.document_masking = document_masking

    def __getitems__(self, index: BatchIndex) -> dict[str, torch.Tensor]:
        task = self.tasks[index.task_id]
        if isinstance(task.train, PackedSequences):
            return lm_batch(*packed_rows(task.train, index.indices, self.document_masking), task.task_id)
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
    stay exact. ``tokens_seen`` counts, per task, the real (unpadded) tokens
    this rank has consumed; it is saved with the step.

    Tasks whose ``train`` is :class:`PackedSequences` are pretraining
    corpora (whole micro-batches of packed causal-LM rows, with document
    position ids when ``document_masking``); ``probabilities`` fixes the
    per-step task mixture instead of temperature sampling.
    """

    def __init__(self, tasks: Sequence[TaskData], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 temperature: float = 1.0, seed: int = 0, remainder: str = "drop", num_workers: int = 0,
                 probabilities: Optional[Sequence[float]] = None, document_masking: bool = False) -> None:
        self.tasks = list(tasks)
        self.num_workers = num_workers
        self.document_masking = document_masking
        self._sampler_args = dict(batch_size=batch_size, rank=rank, world_size=world_size,
                                  temperature=temperature, seed=seed, remainder=remainder,
                                  task_names=[t.spec.name for t in self.tasks], probabilities=probabilities,
                                  packed=[isinstance(t.train, PackedSequences) for t in self.tasks])
        self.sampler = self._make_sampler(0)  # validates sizes now, not at the first step
        self.step = 0
        self.tokens_seen = {t.spec.name: 0 for t in self.tasks}

    def _make_sampler(self, start_step: int) -> MultiTaskBatchSampler:
        return MultiTaskBatchSampler([len(t.train) for t in self.tasks], start_step=start_step,
                                     **self._sampler_args)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler = self._make_sampler(self.step)
        fetcher = _BatchFetcher(self.tasks, self.document_masking)
        if self.num_workers == 0:
            batches: Any = map(fetcher.__getitems__, self.sampler)
        else:
            batches = torch.utils.data.DataLoader(fetcher, batch_sampler=self.sampler,
                                                  collate_fn=_passthrough, num_workers=self.num_workers)
        for batch in batches:
            self.step += 1
            self.tokens_seen[self.tasks[int(batch["task_id"][0])].spec.name] += int(batch["attention_mask"].sum())
            yield batch

    def skip(self, steps: int) -> None:
        """Advance by ``steps`` batches without building them (their tokens are not counted in tokens_seen)."""
        if steps < 0:
            raise ValueError(f"steps={steps}: cannot skip backwards; use load_state_dict")
        self.step += steps

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": _jsonable(self.sampler.fingerprint()),
                "tokens_seen": dict(self.tokens_seen)}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue at state["step"]; strict: the saved plan must match (same data, global batch, seed, T).

        Any world size with the same global batch (micro-batch x ranks)
        continues at the same global sample. Another global batch cannot: a
        step's task is drawn per step and its rows are the next G of that
        task's permutation, so the steps so far would map to other rows
        (examples skipped or seen twice); that is refused, naming the fix.
        """
        saved, current = state.get("fingerprint"), _jsonable(self.sampler.fingerprint())
        if strict and saved != current:
            labels = ("task_sizes", "global_batch", "temperature", "seed", "remainder", "weights/packed")
            padded = list(saved or []) + [None] * (len(labels) - len(saved or []))
            diffs = [f"{name}: saved {a} now {b}" for name, a, b in zip(labels, padded, current + [None])
                     if a != b]
            hint = ""
            if saved and len(saved) == len(current) and saved[1] != current[1]:
                hint = (f" (the global batch is train_micro_batch_size_per_gpu x ranks = "
                        f"{self.sampler.batch_size} x {self.sampler.world_size}; the task stream continues "
                        f"exactly only at the saved global batch {saved[1]}: set train_micro_batch_size_per_gpu "
                        f"to {saved[1]} / ranks)")
            raise DataError(f"the data plan changed since the checkpoint ({'; '.join(diffs)}){hint}, so resuming "
                            f"would not continue the same batches; restore the setting, or pass strict=False "
                            f"to continue at step {state['step']} with the new plan")
        self.step = int(state["step"])
        self.tokens_seen = carried_tokens_seen(self.tokens_seen, state.get("tokens_seen", {}), self.sampler.rank)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists so a fingerprint compares equal after a JSON/pickle round trip."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def train_batches(tasks: Sequence[TaskData], config: DataConfig, batch_size: int, *, rank: int = 0,
                  world_size: int = 1) -> Union[TrainBatches, PackedMixtureBatches]:
    """This rank's training stream for ``config``; batch_size is DeepSpeed's micro-batch per GPU.

    With only ``data.corpora``: packed causal-LM batches mixed per sample over
    the corpora (``tasks`` are then the corpora, from ``prepare_tasks``).
    With tasks (and maybe corpora): single-task micro-batches, the task drawn
    per step by weight (every task and corpus has one) or by temperature over
    training rows (examples; packed sequences for a corpus).
    """
    if config.corpora and not config.tasks:
        tokens = [len(t.train) * t.train.seq_len for t in tasks]
        probabilities = mixture_probabilities(tokens, [c.weight for c in config.corpora], config.temperature)
        return PackedMixtureBatches([t.train for t in tasks], [t.spec.name for t in tasks],
                                    [t.task_id for t in tasks], probabilities, batch_size, rank=rank,
                                    world_size=world_size, seed=config.seed,
                                    document_masking=config.document_masking,
                                    span_corruption=tasks[0].span_corruption)
    weights = [entry.weight for entry in (*config.tasks, *config.corpora)]  # the order of prepare_tasks
    return TrainBatches(tasks, batch_size, rank=rank, world_size=world_size, temperature=config.temperature,
                        seed=config.seed, remainder=config.remainder, num_workers=config.num_workers,
                        probabilities=None if None in weights else np.asarray(weights) / sum(weights),
                        document_masking=config.document_masking)


def mixture_probabilities(token_counts: Sequence[int], weights: Optional[Sequence[Optional[float]]],
                          temperature: float) -> np.ndarray:
    """Corpus mixture: normalised ``weights`` if every corpus has one, else ``n_c^(1/T)`` over token counts."""
    if weights is not None and all(w is not None for w in weights):
        w = np.asarray(weights, dtype=np.float64)
        return w / w.sum()
    return temperature_probabilities(token_counts, temperature)


def check_same_plan(sampler: Union[MultiTaskBatchSampler, MixtureSampler],
                    group: Optional[parallel.ProcessGroup] = None) -> None:
    """Raise DataError on every rank if ranks built different plans (they would hang in all-to-all).

    Different plans come from different data files or settings on different
    nodes. Costs one small all_gather_object; call it once after building
    the training stream. No-op outside torch.distributed.
    """
    plans = parallel.all_gather_object(sampler.fingerprint(), group)
    odd = [r for r, plan in enumerate(plans) if plan != plans[0]]
    if odd:
        raise DataError(f"ranks {odd} built a different data plan than rank 0 ({plans[odd[0]]} vs {plans[0]}); "
                        f"every rank must see the same data files and data config")


def describe_tasks(tasks: Sequence[TaskData], sampler: MultiTaskBatchSampler) -> str:
    """A table for the rank-0 log: sizes, sampling probability, batches per pass, truncation."""
    lines = [f"{'id':>2} {'task':<16} {'kind':<14} {'train':>8} {'valid':>6} {'p':>6} {'batches/pass':>12} "
             f"{'at max_len':>10}"]
    for task, p, batches in zip(tasks, sampler.probabilities, sampler.batches_per_pass):
        valid = len(task.validation) if task.validation is not None else 0
        lines.append(f"{task.task_id:>2} {task.spec.name:<16} {task.spec.kind:<14} {len(task.train):>8} "
                     f"{valid:>6} {p:>6.3f} {batches:>12} {task.train.num_at_max_len:>10}")
    return "\n".join(lines)
