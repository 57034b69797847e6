"""The training CLI on current model families: a small random Llama on the causal-LM objective."""

from __future__ import annotations

import json

import yaml

from conftest import TINY_DS, tiny_run_config

# The README's "Training a Llama-style model" run config, at test size.
TINY_LLAMA = {"name_or_path": "llama", "tokenizer": "minilm", "random_init": True,
              "config_overrides": {"vocab_size": 30522, "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "pad_token_id": 0}}


def test_train_cli_trains_a_random_llama_on_causal_lm_and_the_loss_falls(tmp_path):
    from mpomoe_ds.cli.train import run as train_cli

    config = tiny_run_config(tmp_path / "llama", max_steps=10, log_every=5, diversity_tokens=0)
    config["model"] = TINY_LLAMA
    config["moe"].update(ep_size=1, layers="all")
    config["optim"].update(lr=1e-2, warmup_steps=0)
    config["data"] = {"builtin": "toy_lm", "max_seq_len": 32,
                      "tasks": [{"name": "toy_lm", "max_train_examples": 256, "max_eval_examples": 32}]}
    run, ds = tmp_path / "run.yaml", tmp_path / "ds.json"
    run.write_text(yaml.safe_dump(config))
    ds.write_text(json.dumps({**TINY_DS, "train_micro_batch_size_per_gpu": 8}))
    metrics = train_cli(["--config", str(run), "--deepspeed_config", str(ds)])
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5, metrics
    assert metrics["eval"]["toy_lm"]["perplexity"] < 30522 / 10  # far below a uniform guess over the vocabulary
