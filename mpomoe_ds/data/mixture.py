"""Multi-corpus mixing for pretraining: one global sample sequence, a function of (seed, sample index) alone.

Global sample g (0, 1, 2, ...) is drawn like this:

* its corpus c(g): inverse-CDF sampling of the mixture weights p with a
  generator seeded by (seed, g // 1024), so draws come 1024 at a time and
  never depend on rank, world size or workers;
* its sequence within corpus c: the k-th sample of corpus c (k = how many
  earlier samples chose c) is sequence ``perm_{c,e}(k mod n_c)`` of epoch
  ``e = k // n_c``, where ``perm_{c,e}`` is a pseudo-random permutation of
  the corpus's n_c packed sequences (a keyed Feistel network with cycle
  walking: O(1) memory whatever n_c), so each epoch visits every sequence of
  every corpus exactly once.

A micro-batch t of B rows per rank and W ranks covers global samples
[t B W, (t+1) B W); rank r reads [t B W + r B, t B W + (r+1) B). The stream's
state is the global sample position, so a run resumed at any world size (with
the same global batch) continues the same global sequence exactly, and at a
different global batch it continues from the same sample without skipping or
repeating any.

Weights: ``p_c ~ weight_c`` when weights are given, else temperature sampling
over corpus sizes in tokens, ``p_c ~ n_c^(1/T)`` (see
:func:`mpomoe_ds.data.sampling.temperature_probabilities`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from mpomoe_ds.data.corpus import PackedSequences, document_position_ids
from mpomoe_ds.data.span_corruption import SpanCorruption, train_key

_CORPUS_STREAM, _PERMUTATION_STREAM = 0x3C0A, 0x9E11  # distinct entropy words per purpose
_CHUNK = 1024  # samples whose corpus is drawn at once


# --------------------------------------------------------------------------- permutation


def _round_keys(seed: int, corpus: int, epoch: int, rounds: int = 4) -> np.ndarray:
    return np.random.default_rng([seed, _PERMUTATION_STREAM, corpus, epoch]).integers(0, 2**31, rounds,
                                                                                      dtype=np.uint64)


def feistel_permute(x: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, n) applied to ``x`` (uint64 array): a balanced Feistel network, cycle-walked into [0, n).

    The network permutes [0, 2^(2h)) with 2^(2h) >= n; values that land
    outside [0, n) are permuted again until they fall inside, which keeps the
    map a bijection on [0, n).
    """
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, math.ceil(math.log2(n) / 2))
    mask = np.uint64((1 << half) - 1)
    out = x.astype(np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        v = out[todo]
        left, right = v >> np.uint64(half), v & mask
        for key in keys:
            f = ((right * np.uint64(0x9E3779B1) + key) ^ (right >> np.uint64(3))) & mask
            left, right = right, left ^ f
        v = (left << np.uint64(half)) | right
        out[todo] = v
        todo[todo] = v >= np.uint64(n)
    return out


def epoch_sequences(k: np.ndarray, n: int, seed: int, corpus: int) -> np.ndarray:
    """Sequence ids of the k-th samples (any int64 array) of a corpus of n packed sequences.

    Sample k is ``perm_{corpus,e}(k mod n)`` of epoch ``e = k // n``: every
    epoch visits each sequence once, and a k is mapped in O(1) memory.
    """
    epochs, positions = np.divmod(np.asarray(k, dtype=np.int64), n)
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        out[in_epoch] = feistel_permute(positions[in_epoch].astype(np.uint64), n,
                                        _round_keys(seed, corpus, int(epoch))).astype(np.int64)
    return out


def packed_rows(corpus: PackedSequences, sequences_B: np.ndarray, document_masking: bool
                ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(input_ids, attention_mask, position_ids or None) (B, L) of packed ``sequences_B`` of one corpus."""
    ids, mask = corpus.rows(sequences_B)
    return ids, mask, document_position_ids(ids, mask, corpus.eos_id) if document_masking else None


def lm_batch(ids_BL: np.ndarray, mask_BL: np.ndarray, positions_BL: Optional[np.ndarray],
             task_id: int) -> dict[str, torch.Tensor]:
    """A packed causal-LM batch: labels are the input ids, -100 on padding (Hugging Face causal LMs shift them)."""
    input_ids, attention_mask = torch.from_numpy(ids_BL), torch.from_numpy(mask_BL)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": input_ids.masked_fill(attention_mask == 0, -100),
             "task_id": torch.full((len(ids_BL),), task_id, dtype=torch.int64)}
    if positions_BL is not None:
        batch["position_ids"] = torch.from_numpy(positions_BL)
    return batch


# --------------------------------------------------------------------------- sampler


class MixtureSampler:
    """Global sample index -> (corpus, sequence), deterministic from (seed, index) alone."""

    def __init__(self, corpus_sizes: Sequence[int], probabilities: Sequence[float], seed: int) -> None:
        self.sizes = np.asarray(corpus_sizes, dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.cdf = np.cumsum(self.probabilities)
        self.seed = int(seed)
        self._counts_before: list[np.ndarray] = [np.zeros(len(self.sizes), dtype=np.int64)]  # per chunk

    def fingerprint(self) -> tuple:
        """Equal on every rank that will read the same global sample sequence."""
        return (tuple(int(n) for n in self.sizes), tuple(float(p) for p in self.probabilities), self.seed)

    def corpora(self, chunk: int) -> np.ndarray:
        """The corpus of every sample of chunk ``chunk`` (samples [chunk * 1024, (chunk + 1) * 1024))."""
        uniform = np.random.default_rng([self.seed, _CORPUS_STREAM, chunk]).random(_CHUNK)
        return np.minimum(np.searchsorted(self.cdf, uniform, side="right"), len(self.sizes) - 1)

    def _counts_at_chunk(self, chunk: int) -> np.ndarray:
        """Samples per corpus before chunk ``chunk`` (cached; computed forward from the last cached chunk)."""
        while len(self._counts_before) <= chunk:
            q = len(self._counts_before) - 1
            self._counts_before.append(self._counts_before[q] + np.bincount(self.corpora(q),
                                                                            minlength=len(self.sizes)))
        return self._counts_before[chunk]

    def samples(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus ids, sequence ids) of global samples [start, stop)."""
        corpus_out = np.empty(stop - start, dtype=np.int64)
        sequence_out = np.empty(stop - start, dtype=np.int64)
        g = start
        while g < stop:
            chunk, offset = divmod(g, _CHUNK)
            take = min(_CHUNK - offset, stop - g)
            chosen = self.corpora(chunk)
            counts = self._counts_at_chunk(chunk).copy()
            for c in range(len(self.sizes)):  # k of each sample: earlier chunks + earlier in this chunk
                counts[c] += int((chosen[:offset] == c).sum())
            window = chosen[offset:offset + take]
            k = np.empty(take, dtype=np.int64)
            for c in range(len(self.sizes)):
                hits = window == c
                k[hits] = counts[c] + np.arange(int(hits.sum()))
            corpus_out[g - start:g - start + take] = window
            sequence_out[g - start:g - start + take] = self._sequences(window, k)
            g += take
        return corpus_out, sequence_out

    def _sequences(self, corpus: np.ndarray, k: np.ndarray) -> np.ndarray:
        out = np.empty_like(k)
        for c in np.unique(corpus):
            hits = corpus == c
            out[hits] = epoch_sequences(k[hits], int(self.sizes[c]), self.seed, int(c))
        return out


# --------------------------------------------------------------------------- training stream


class PackedMixtureBatches:
    """This rank's infinite stream of packed LM micro-batches from several corpora; resumable at any world size.

    Each batch: ``input_ids`` / ``attention_mask`` / ``labels`` (B, L) (labels
    are the input ids, -100 on padding; Hugging Face causal LMs shift them),
    ``task_id`` (B,) = ``task_ids[corpus]`` of the first row (the model's lm
    path does not depend on it); with ``document_masking`` also
    ``position_ids`` (B, L), restarting after every EOS; with
    ``span_corruption`` the rows are T5 encoder inputs and ``labels`` their
    decoder targets (:mod:`mpomoe_ds.data.span_corruption`). ``tokens_seen``
    counts, per corpus, the real tokens this rank has consumed.
    """

    def __init__(self, corpora: Sequence[PackedSequences], names: Sequence[str], task_ids: Sequence[int],
                 probabilities: Sequence[float], batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, document_masking: bool = False,
                 span_corruption: Optional[SpanCorruption] = None) -> None:
        self.corpora = list(corpora)
        self.names = list(names)
        self.task_ids = list(task_ids)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.sampler = MixtureSampler([len(c) for c in corpora], probabilities, seed)
        self.position = 0  # the next global sample
        self.tokens_seen = {name: 0 for name in self.names}
        self.document_masking = document_masking
        self.span_corruption = span_corruption

    def fingerprint(self) -> tuple:
        """What must be equal on every rank (ranks with other corpora or settings would read other samples)."""
        return ("packed", tuple(self.names), *self.sampler.fingerprint(), tuple(c.seq_len for c in self.corpora))

    def batch_at(self, position: int) -> dict[str, torch.Tensor]:
        """This rank's rows of the global micro-batch that starts at global sample ``position``."""
        start = position + self.rank * self.batch_size
        corpus_B, sequence_B = self.sampler.samples(start, start + self.batch_size)
        L = self.corpora[0].seq_len
        ids = np.zeros((self.batch_size, L), dtype=np.int64)
        mask = np.zeros((self.batch_size, L), dtype=np.int64)
        positions = np.zeros((self.batch_size, L), dtype=np.int64)
        for c in np.unique(corpus_B):
            rows = corpus_B == c
            ids[rows], mask[rows], corpus_positions = packed_rows(self.corpora[c], sequence_B[rows],
                                                                  self.document_masking)
            if corpus_positions is not None:
                positions[rows] = corpus_positions
            self.tokens_seen[self.names[c]] += int(mask[rows].sum())
        task_id = self.task_ids[int(corpus_B[0])]
        if self.span_corruption is not None:
            keys = [train_key(g) for g in range(start, start + self.batch_size)]
            inputs, inputs_mask, targets = self.span_corruption.batch(ids, mask, keys)
            return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(inputs_mask),
                    "labels": torch.from_numpy(targets),
                    "task_id": torch.full((self.batch_size,), task_id, dtype=torch.int64)}
        return lm_batch(ids, mask, positions if self.document_masking else None, task_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch_at(self.position)
            self.position += self.batch_size * self.world_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "packed_mixture", "position": self.position, "fingerprint": list(self.fingerprint()),
                "tokens_seen": dict(self.tokens_seen), "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue at the saved global sample position (any world size / micro-batch).

        Raises:
            ValueError: the state is from another stream kind, or other corpora/weights/seed
                (``strict``); the message names what differs.
        """
        if state.get("kind") != "packed_mixture":
            raise ValueError(f"the checkpoint's data state is a {state.get('kind', 'multi-task')!r} stream; this "
                             f"run reads packed corpora: resume with the same data config")
        saved = _as_tuple(state["fingerprint"])
        if strict and saved != self.fingerprint():
            raise ValueError(f"the checkpoint was written with other corpora or mixture settings "
                             f"({saved} vs {self.fingerprint()}); resume with the same data config")
        self.position = int(state["position"])
        self.tokens_seen = carried_tokens_seen(self.tokens_seen, state["tokens_seen"], self.rank)


def carried_tokens_seen(names: dict[str, int], saved: dict[str, int], rank: int) -> dict[str, int]:
    """Token counts after a resume: the saved counts are totals over all ranks (the trainer saves them
    all-reduced), so rank 0 carries them on and the others restart at 0; sums over ranks stay exact at any
    world size. Names missing from the saved state (older checkpoints) start at 0."""
    return {name: int(saved.get(name, 0)) if rank == 0 else 0 for name in names}


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value

