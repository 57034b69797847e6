"""data.document_masking on every decoder family that claims it: a packed row's documents see only themselves.

Reference: each document run alone (positions from 0, no padding). A packed row
[doc A, EOS, doc B, EOS, doc C] with position ids that restart after every EOS
and no attention mask must give, on doc B's tokens, doc B's own logits; the
control (ordinary packing, attention across documents) must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from mpomoe_ds.data.corpus import document_position_ids
from mpomoe_ds.models.families import PACKED_DOCUMENT_MODEL_TYPES

EOS = 3
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                            n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=8),
}


def test_every_claimed_family_is_checked_here():
    assert set(CONFIGS) == PACKED_DOCUMENT_MODEL_TYPES


def test_position_ids_restart_after_every_eos_and_padding_keeps_counting():
    ids = np.array([[5, 6, EOS, 7, EOS, 8, 9, 0], [EOS, 5, 6, 7, 8, 9, 10, 11]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1] * 8])
    expected = []
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist()):  # an independent loop
        pos, row = 0, []
        for k, (token, real) in enumerate(zip(row_ids, row_mask)):
            row.append(pos)
            pos = 0 if token == EOS and real else pos + 1
        expected.append(row)
    assert document_position_ids(ids, mask, EOS).tolist() == expected
    assert expected[0] == [0, 1, 2, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_packed_documents_get_the_logits_they_get_alone(model_type, one_thread):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()
    docs = [[5, 9, 11, 4, EOS], [7, 8, 20, 21, 22, 6, EOS], [30, 31, 12]]
    row = torch.tensor([sum(docs, [])])
    positions = torch.from_numpy(document_position_ids(row.numpy(), np.ones_like(row.numpy()), EOS))
    start = len(docs[0])
    doc_b = slice(start, start + len(docs[1]))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([docs[1]])).logits[0]
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, doc_b]  # as MultiTaskModel
        ordinary = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0, doc_b]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (ordinary - alone).abs().max() > 1e-3  # the control: attention across documents changes doc B
