"""Every parameter DeepSpeed's engine broadcasts is contiguous, for every model family and expert type.

``DeepSpeedEngine._broadcast_model`` sends ``p.data.view(torch.uint8)``, which
refuses a tensor whose last stride is not 1; pretrained nn.Linear weights read
in x @ W orientation are exactly such transposed views.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mpomoe_ds.models.convert import ACTIVATION_ATTRS, convert_model
from mpomoe_ds.models.hf import load_model
from mpomoe_ds.moe.config import MoEConfig


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2,
                                                          n_head=2))


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          max_position_embeddings=16))


# One builder per convertible family; "minilm" is the packaged pretrained BERT (the layout that crashed).
FAMILY_MODELS = {"gpt2": [tiny_gpt2], "bert": [tiny_bert, lambda: load_model("minilm")]}


def test_every_convertible_family_is_covered():
    assert set(FAMILY_MODELS) == set(ACTIVATION_ATTRS), "add a model builder for the new family here"


# The pretrained MiniLM only with plain experts: decomposing it for MPO experts costs ~30 s on 2 cores, and
# MPO cores come out of the SVD sweep contiguous (the tiny BERT checks that path).
CASES = [(build, expert_type) for builders in FAMILY_MODELS.values() for build in builders
         for expert_type in ("ffn", "mpo")][:-1]


@pytest.mark.parametrize("build, expert_type", CASES,
                         ids=["gpt2-ffn", "gpt2-mpo", "bert-ffn", "bert-mpo", "minilm-ffn"])
def test_converted_model_parameters_are_contiguous_and_byte_viewable(build, expert_type):
    model = build()
    convert_model(model, MoEConfig(num_experts=4, expert_type=expert_type))
    params = dict(model.named_parameters())
    assert any("deepspeed_experts" in name for name in params)
    bad = [name for name, p in params.items() if not p.is_contiguous()]
    assert not bad, f"non-contiguous parameters: {bad[:4]}"
    for p in params.values():
        p.data.view(torch.uint8)  # what _broadcast_model does; raises on a bad stride
