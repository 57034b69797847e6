"""Reading a prepared corpus on demand, and packing its token stream into fixed-length sequences.

A split of a prepared corpus (:mod:`mpomoe_ds.data.prepare`) is one token
stream: its shards in order, each document followed by EOS. Packing cuts the
stream into consecutive, non-overlapping sequences of ``L`` tokens; sequence
j holds tokens [j L, (j+1) L), so every token of the split is in exactly one
sequence per epoch, and only the last sequence can be short (its tail is
padding: attention mask 0, label -100, no loss). Documents are concatenated
across sequence boundaries as in GPT-style pretraining; the EOS between them
tells the model a new document starts. With document masking
(:func:`document_position_ids`) the position ids restart after every EOS, and
the model's attention keeps each document to itself.

Nothing is read at start-up but the index, and a sequence is read from (at
most two) shard files with ``pread`` when a batch needs it, so start-up time
and resident memory do not grow with the corpus; the operating system's page
cache keeps what was read recently, shared by all ranks of a node. (A memory
map would do the same I/O, but the kernel maps whole large folios around each
fault, so a mapped corpus's resident set grew with what the random sampler had
touched: 1.9 GiB after 200 batches of a 0.8 GiB corpus in benchmarks/data.py.)

Shape legend: L sequence length, B rows of a batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mpomoe_ds.data.prepare import read_index
from mpomoe_ds.data.tasks import DataError


class TokenStream:
    """One split of a prepared corpus as a single token sequence, read from its shard files on demand."""

    def __init__(self, corpus_dir: Path, split: str, index: dict[str, Any]) -> None:
        self.corpus_dir = Path(corpus_dir)
        self.split = split
        info = index["splits"][split]
        self.files = [s["file"] for s in info["shards"]]
        self.dtype = np.dtype(index["dtype"])
        self.starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in info["shards"]])]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_documents = int(info["documents"])
        self.eos_id = int(index["eos_id"])
        self._files: dict[int, int] = {}

    def _file(self, k: int) -> int:
        """The open file descriptor of shard k (opened on first use, size checked against the index)."""
        if k not in self._files:
            path = self.corpus_dir / self.files[k]
            expected = int(self.starts[k + 1] - self.starts[k])
            if not path.is_file() or path.stat().st_size != expected * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not {expected} tokens long (the index says so); the corpus "
                                f"folder is damaged: prepare it again")
            self._files[k] = os.open(path, os.O_RDONLY)
        return self._files[k]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int64 (read with pread; spans shard boundaries)."""
        stop = min(stop, self.num_tokens)
        pieces = []
        k = int(np.searchsorted(self.starts, start, side="right") - 1)
        position = start
        while position < stop:
            lo = position - int(self.starts[k])
            take = min(int(self.starts[k + 1]) - position, stop - position)
            raw = os.pread(self._file(k), take * self.dtype.itemsize, lo * self.dtype.itemsize)
            pieces.append(np.frombuffer(raw, dtype=self.dtype))
            position += take
            k += 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, dtype=np.int64)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        self.close()


def document_position_ids(input_ids_BL: np.ndarray, attention_mask_BL: np.ndarray, eos_id: int) -> np.ndarray:
    """Position ids (B, L) that restart at 0 on the token after every EOS (and at each row's start).

    The EOS ends its document (it keeps the document's positions); padding
    continues counting, which is harmless: it comes after every real token and
    has no loss. Hugging Face decoders turn position ids like these into a
    block-diagonal causal mask when no attention mask is passed.
    """
    B, L = input_ids_BL.shape
    starts_BL = np.zeros((B, L), dtype=bool)
    starts_BL[:, 0] = True
    starts_BL[:, 1:] = (input_ids_BL[:, :-1] == eos_id) & (attention_mask_BL[:, :-1] == 1)
    index_BL = np.broadcast_to(np.arange(L), (B, L))
    last_start_BL = np.maximum.accumulate(np.where(starts_BL, index_BL, 0), axis=1)
    return (index_BL - last_start_BL).astype(np.int64)


class PackedSequences:
    """A split packed into sequences of ``seq_len`` tokens: ``len()`` sequences, ``rows(indices)`` batches."""

    def __init__(self, stream: TokenStream, seq_len: int) -> None:
        if seq_len < 2:
            raise DataError(f"seq_len={seq_len}: packed sequences need at least 2 tokens")
        self.stream = stream
        self.seq_len = seq_len
        self.num_sequences = -(-stream.num_tokens // seq_len)

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def num_at_max_len(self) -> int:
        """Full sequences (all but a short last one)."""
        return self.stream.num_tokens // self.seq_len

    def rows(self, indices_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (B, L) int64, attention_mask (B, L) int64) of sequences ``indices_B``; padding is 0/0."""
        L = self.seq_len
        ids = np.zeros((len(indices_B), L), dtype=np.int64)
        mask = np.zeros((len(indices_B), L), dtype=np.int64)
        for row, j in enumerate(np.asarray(indices_B, dtype=np.int64)):
            if not 0 <= j < self.num_sequences:
                raise IndexError(f"sequence {j} of {self.num_sequences}")
            tokens = self.stream.tokens(int(j) * L, (int(j) + 1) * L)
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask

    @property
    def eos_id(self) -> int:
        return self.stream.eos_id


class PreparedCorpus:
    """A prepared corpus folder: its index and both splits, packed for training and evaluation."""

    def __init__(self, corpus_dir: str, seq_len: int, tokenizer: Optional[Any] = None) -> None:
        self.corpus_dir = Path(corpus_dir)
        self.index = read_index(corpus_dir, tokenizer)
        self.train = PackedSequences(TokenStream(self.corpus_dir, "train", self.index), seq_len)
        if len(self.train) == 0:
            raise DataError(f"{corpus_dir}: the train split has no tokens; give the corpus more text "
                            f"(or a smaller validation_fraction)")
        validation = TokenStream(self.corpus_dir, "validation", self.index)
        self.validation = PackedSequences(validation, seq_len) if validation.num_tokens else None

    @property
    def eos_id(self) -> int:
        return int(self.index["eos_id"])
