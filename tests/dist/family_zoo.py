"""Tiny random models of every supported family, built offline from transformers' config classes.

Shared by the single-process family tests (``tests/models/test_families.py``)
and the 2-rank worker (``tests/dist/families_worker.py``), so both convert the
same models. Widths 32 / 64 factor into 5 MPO cores (2^5, 2^6); ``minilm`` is
the real packaged all-MiniLM-L6-v2; RoBERTa, XLM-R and ELECTRA are the other
BERT-family encoders the ``bert`` adapter claims.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers

VOCAB, SEQ = 100, 8

LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)

T5 = dict(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
          decoder_start_token_id=0, pad_token_id=0)

# BERT-family encoders (hidden 32, FFN 64); RoBERTa-style position ids start after padding_idx 1
BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 initializer_range=0.2)  # large enough weights that a misrouted token shows in the logits

GPT2 = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, bos_token_id=0,
            eos_token_id=0)


def _build(config: transformers.PretrainedConfig, cls: type, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(config).eval()
    for module in model.modules():  # random init leaves some norms at 1: vary them, so they count
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
    return model


def _minilm(seed: int) -> torch.nn.Module:
    from mpomoe_ds.models.hf import load_model

    return load_model("minilm").eval()


# case name -> (builder(seed), whether the forward needs decoder_input_ids)
CASES: dict[str, tuple[Callable[[int], torch.nn.Module], bool]] = {
    "llama-causal-lm": (lambda s: _build(transformers.LlamaConfig(**LLAMA_LIKE), transformers.LlamaForCausalLM, s),
                        False),
    "llama-seq-cls": (lambda s: _build(transformers.LlamaConfig(**LLAMA_LIKE, num_labels=3),
                                       transformers.LlamaForSequenceClassification, s), False),
    "mistral": (lambda s: _build(transformers.MistralConfig(**LLAMA_LIKE), transformers.MistralForCausalLM, s), False),
    "qwen2": (lambda s: _build(transformers.Qwen2Config(**LLAMA_LIKE), transformers.Qwen2ForCausalLM, s), False),
    "qwen3": (lambda s: _build(transformers.Qwen3Config(**LLAMA_LIKE, head_dim=8), transformers.Qwen3ForCausalLM, s),
              False),
    "t5-relu": (lambda s: _build(transformers.T5Config(**T5, feed_forward_proj="relu"),
                                 transformers.T5ForConditionalGeneration, s), True),
    "t5-gated-gelu": (lambda s: _build(transformers.T5Config(**T5, feed_forward_proj="gated-gelu"),
                                       transformers.T5ForConditionalGeneration, s), True),
    "t5-encoder": (lambda s: _build(transformers.T5Config(**T5, feed_forward_proj="gated-gelu"),
                                    transformers.T5EncoderModel, s), False),
    "gpt2": (lambda s: _build(transformers.GPT2Config(**GPT2), transformers.GPT2LMHeadModel, s), False),
    "gpt2-seq-cls": (lambda s: _build(transformers.GPT2Config(**GPT2, num_labels=3, pad_token_id=0),
                                      transformers.GPT2ForSequenceClassification, s), False),
    "distilbert": (lambda s: _build(transformers.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=64,
                                                                  n_layers=2, n_heads=4, dim=32, hidden_dim=64,
                                                                  num_labels=3, initializer_range=0.2),
                                    transformers.DistilBertForSequenceClassification, s), False),
    "minilm": (_minilm, False),
    "roberta-seq-cls": (lambda s: _build(transformers.RobertaConfig(**BERT_LIKE, num_labels=3, pad_token_id=1),
                                         transformers.RobertaForSequenceClassification, s), False),
    "xlm-roberta": (lambda s: _build(transformers.XLMRobertaConfig(**BERT_LIKE, pad_token_id=1),
                                     transformers.XLMRobertaModel, s), False),
    # embedding_size 16 < hidden 32: ELECTRA's embeddings_project runs before the encoder
    "electra-mlm": (lambda s: _build(transformers.ElectraConfig(**BERT_LIKE, embedding_size=16),
                                     transformers.ElectraForMaskedLM, s), False),
}

# family adapter each case must be converted with
FAMILY_OF = {"llama-causal-lm": "llama", "llama-seq-cls": "llama", "mistral": "llama", "qwen2": "llama",
             "qwen3": "llama", "t5-relu": "t5", "t5-gated-gelu": "t5-gated", "t5-encoder": "t5-gated", "gpt2": "gpt2",
             "gpt2-seq-cls": "gpt2", "distilbert": "distilbert", "minilm": "bert", "roberta-seq-cls": "bert",
             "xlm-roberta": "bert", "electra-mlm": "bert"}


def build(case: str, seed: int = 0) -> torch.nn.Module:
    return CASES[case][0](seed)


def inputs(case: str, seed: int = 0, batch: int = 3) -> dict[str, torch.Tensor]:
    """A batch with one padded row (ids below MiniLM's and the tiny models' vocabularies)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch_inputs = {"input_ids": ids, "attention_mask": mask}
    if CASES[case][1]:
        batch_inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, 5), generator=gen)
    return batch_inputs


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits (or last hidden state for a bare encoder), with the MoE records dropped."""
    with torch.no_grad():
        out = model(**batch)
    if hasattr(model, "moe_aux"):
        model.moe_aux.pop()
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
