"""T5 span corruption of packed sequences: the encoder-decoder pretraining objective on prepared corpora.

As in T5 (Raffel et al., ``random_spans_noise_mask`` in the T5 code): of a
sequence's n real tokens, ``round(n * noise_density)`` are noise, cut into
``round(num_noise / mean_noise_span_length)`` spans; noise and non-noise
tokens are each split into that many non-empty runs at random and
interleaved, starting with non-noise. The encoder input keeps the non-noise
tokens and puts sentinel i where noise span i was; the decoder target is
sentinel i followed by span i, for every span, then EOS::

    tokens   a b c d e f g h
    input    a <s0> d e <s1> h EOS
    target   <s0> b c <s1> f g EOS

Lengths depend on n alone, so every full sequence of ``L`` tokens gives an
input of ``L - noise + spans + 1`` and a target of ``noise + spans + 1``
tokens (:meth:`SpanCorruption.corrupted_lengths`). The random draw of a
training sequence is a function of (seed, global sample index), so the
corruption, like the mixture, does not depend on the world size or the
micro-batch split; a held-out sequence's of (seed, corpus, row).

Sentinels are the tokenizer's ``<extra_id_0>``, ``<extra_id_1>``, ...
(T5 tokenizers have 100).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mpomoe_ds.data.tasks import DataError

_SPAN_STREAM = 0x5350414E  # separates the corruption draws from every other stream of the same seed


@dataclass(frozen=True)
class SpanCorruption:
    """Span-corruption settings of a run (validated by :class:`mpomoe_ds.data.config.DataConfig`)."""

    noise_density: float
    mean_noise_span_length: float
    sentinel_ids: tuple[int, ...]
    eos_id: int
    seed: int

    def spans(self, n: int) -> tuple[int, int]:
        """(noise tokens, noise spans) of a sequence of ``n`` real tokens."""
        if n < 2:
            return 0, 0
        noise = min(max(int(round(n * self.noise_density)), 1), n - 1)
        spans = max(min(int(round(noise / self.mean_noise_span_length)), noise, n - noise), 1)
        return noise, spans

    def corrupted_lengths(self, n: int) -> tuple[int, int]:
        """(encoder input length, decoder target length) for ``n`` real tokens, EOS included."""
        noise, spans = self.spans(n)
        return n - noise + spans + 1, noise + spans + 1

    def corrupt(self, tokens: np.ndarray, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(encoder input, decoder target) of one sequence's real tokens; ``key`` names the draw:
        ``train_key(global sample)`` or ``validation_key(corpus, row)``."""
        n = len(tokens)
        noise, spans = self.spans(n)
        if spans > len(self.sentinel_ids):
            raise DataError(f"a sequence of {n} tokens needs {spans} sentinels but the tokenizer has "
                            f"{len(self.sentinel_ids)}; lower data.max_seq_len or raise "
                            f"data.span_corruption.mean_noise_span_length")
        if spans == 0:
            return np.append(tokens, self.eos_id), np.array([self.eos_id], dtype=np.int64)
        rng = np.random.default_rng([self.seed, _SPAN_STREAM, *key])
        noise_runs = _random_partition(noise, spans, rng)
        keep_runs = _random_partition(n - noise, spans, rng)
        inputs, targets, at = [], [], 0
        for span, (keep, drop) in enumerate(zip(keep_runs, noise_runs)):
            sentinel = self.sentinel_ids[span]
            inputs.extend(tokens[at:at + keep])
            inputs.append(sentinel)
            at += keep
            targets.append(sentinel)
            targets.extend(tokens[at:at + drop])
            at += drop
        inputs.append(self.eos_id)
        targets.append(self.eos_id)
        return np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)

    def batch(self, ids_BL: np.ndarray, mask_BL: np.ndarray,
              keys_B: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids (B, Li), attention_mask (B, Li), labels (B, Lt)) of packed rows; padding 0 / 0 / -100.

        Li, Lt are the lengths of a full row of L tokens, so every batch of a
        run has the same shapes.
        """
        L = ids_BL.shape[1]
        full_in, full_out = self.corrupted_lengths(L)
        inputs = np.zeros((len(ids_BL), full_in), dtype=np.int64)
        mask = np.zeros((len(ids_BL), full_in), dtype=np.int64)
        labels = np.full((len(ids_BL), full_out), -100, dtype=np.int64)
        for row, (ids, real, key) in enumerate(zip(ids_BL, mask_BL, keys_B)):
            x, y = self.corrupt(ids[real.astype(bool)], key)
            inputs[row, :len(x)], mask[row, :len(x)], labels[row, :len(y)] = x, 1, y
        return inputs, mask, labels


def train_key(sample: int) -> tuple[int, ...]:
    return (0, int(sample))


def validation_key(corpus: int, row: int) -> tuple[int, ...]:
    return (1, int(corpus), int(row))


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items cut into ``parts`` non-empty runs at uniformly random cut points."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([])
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def sentinel_ids(tokenizer: Any, count: int = 100) -> tuple[int, ...]:
    """The ids of ``<extra_id_0>`` ... ``<extra_id_{count-1}>`` that the tokenizer has (in order).

    Raises:
        DataError: the tokenizer has no ``<extra_id_0>`` (not a T5 tokenizer).
    """
    vocab = tokenizer.get_vocab()
    ids = []
    for i in range(count):
        token = f"<extra_id_{i}>"
        if token not in vocab:
            break
        ids.append(int(vocab[token]))
    if not ids:
        raise DataError("data.span_corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... in the "
                        "tokenizer (T5 tokenizers have 100); use the model's T5 tokenizer, or add them with "
                        "tokenizer.add_special_tokens and prepare the corpora with that tokenizer")
    return tuple(ids)
