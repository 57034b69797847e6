"""T5 span corruption (mpomoe_ds.data.span_corruption) and its place in the packed-corpus pipeline.

Reference: merging an encoder input with its decoder target at the sentinels
gives back the original tokens exactly; the counts are T5's (round(n * 0.15)
noise tokens in round(noise / 3) non-empty spans).
"""

from __future__ import annotations

import numpy as np
import pytest

from mpomoe_ds.data.span_corruption import SpanCorruption, sentinel_ids, train_key, validation_key
from mpomoe_ds.data.tasks import DataError

SENTINELS = tuple(range(1000, 1100))
EOS = 1


def corruption(**kw) -> SpanCorruption:
    return SpanCorruption(kw.get("density", 0.15), kw.get("span", 3.0), SENTINELS, EOS, kw.get("seed", 0))


def uncorrupt(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Put each sentinel's target span back where the input's sentinel stands (an independent inverse)."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans.pop(t) if t in SENTINELS else [t])
    assert not spans  # every target span was placed
    return out


@pytest.mark.parametrize("n", [2, 7, 32, 128, 513])
def test_corruption_is_invertible_with_t5_counts_and_fixed_lengths(n):
    span = corruption()
    rng = np.random.default_rng(n)
    tokens = rng.integers(2, 900, n)
    noise, spans = span.spans(n)
    assert noise == min(max(round(n * 0.15), 1), n - 1) and spans == max(min(round(noise / 3), noise, n - noise), 1)
    for sample in range(5):
        inputs, targets = span.corrupt(tokens, train_key(sample))
        assert uncorrupt(inputs, targets) == tokens.tolist()
        assert (len(inputs), len(targets)) == span.corrupted_lengths(n)
        assert sum(t in SENTINELS for t in targets.tolist()) == spans
        assert len(targets) - spans - 1 == noise


def test_draws_depend_on_the_key_and_seed_alone():
    span, tokens = corruption(), np.arange(10, 138)
    a = span.corrupt(tokens, train_key(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, corruption().corrupt(tokens, train_key(7))))
    for other in (span.corrupt(tokens, train_key(8)), span.corrupt(tokens, validation_key(0, 7)),
                  corruption(seed=1).corrupt(tokens, train_key(7))):
        assert not np.array_equal(a[0], other[0])


def test_batches_pad_to_the_full_row_lengths():
    span = corruption()
    ids = np.arange(2, 2 + 3 * 32).reshape(3, 32)
    mask = np.ones_like(ids)
    mask[2, 20:] = 0  # a corpus's short last sequence
    inputs, inputs_mask, labels = span.batch(ids, mask, [train_key(g) for g in range(3)])
    assert inputs.shape == (3, span.corrupted_lengths(32)[0]) and labels.shape == (3, span.corrupted_lengths(32)[1])
    short_in, short_out = span.corrupted_lengths(20)
    assert inputs_mask[2].sum() == short_in and (labels[2] != -100).sum() == short_out
    assert uncorrupt(inputs[2, :short_in], labels[2, :short_out]) == ids[2, :20].tolist()


def test_a_tokenizer_without_sentinels_is_refused_naming_the_fix():
    from mpomoe_ds.models.hf import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    with pytest.raises(DataError, match="sentinel tokens <extra_id_0>"):
        sentinel_ids(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(4)]})
    assert sentinel_ids(tokenizer) == tuple(tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(4))
