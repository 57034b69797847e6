"""Model FLOPs per token: the MoE count against the dense model it was upcycled from."""

from __future__ import annotations

import pytest
import transformers

from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.training.flops import active_params_per_token, mfu, training_flops_per_token


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("expert_type", ["mpo", "ffn"])
@pytest.mark.parametrize("k", [1, 2])
def test_active_parameters_are_the_dense_models_plus_router_and_extra_experts(expert_type, k):
    dense = tiny_gpt2()
    # Independent count: every parameter but the position embeddings (the token embedding is the tied LM head).
    dense_active = sum(p.numel() for p in dense.parameters()) - dense.transformer.wpe.weight.numel()
    assert active_params_per_token(dense) == dense_active
    moe = tiny_gpt2()
    convert_model(moe, MoEConfig(num_experts=4, k=k, layers="all", expert_type=expert_type, expert_init="copy"))
    d, f, layers = 32, 64, 2
    ffn = 2 * d * f + d + f  # one dense FFN: two matrices and two biases
    router = 4 * d
    assert active_params_per_token(moe) == dense_active + layers * (router + (k - 1) * ffn)


def test_flops_per_token_and_mfu_formulas():
    model = tiny_gpt2()
    n = active_params_per_token(model)
    assert training_flops_per_token(model, num_layers=2, seq_len=16, hidden_size=32) == 6 * n + 6 * 2 * 16 * 32
    assert mfu(1000.0, 2e9, peak_tflops_per_rank=1.0, ranks=2) == pytest.approx(1.0)


def test_gated_experts_count_three_matrices():
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    dense = transformers.LlamaForCausalLM(config)
    dense_active = active_params_per_token(dense)
    convert_model(dense, MoEConfig(num_experts=4, k=1, layers="all", expert_init="copy"))
    # k=1: the dense FFN's three matrices, plus per layer the router and the (frozen zero) expert biases.
    extra = active_params_per_token(dense) - dense_active
    assert extra == 2 * (4 * 32 + (32 + 64 + 64))
