"""Packed multi-corpus pretraining through the training CLI on 2 real ranks: eval per corpus, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, dist_env, free_port, write_corpus

DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
      "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two prepared corpora (MiniLM's tokenizer) and a tiny GPT-2 config folder with its vocabulary."""
    import transformers

    from mpomoe_ds.data.prepare import prepare_corpus
    from mpomoe_ds.models.hf import load_tokenizer

    root = tmp_path_factory.mktemp("pretrain")
    for name, seed in (("a", 0), ("b", 1)):
        write_corpus(root / f"src_{name}", files=1, docs_per_file=80, seed=seed)
        prepare_corpus([str(root / f"src_{name}")], "minilm", root / name, load_tokenizer=load_tokenizer,
                       validation_fraction=0.1, progress=False)
    tokenizer = load_tokenizer("minilm")
    transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            n_inner=64).save_pretrained(root / "model")
    return root


def run_config(root: Path, out: Path, steps: int) -> Path:
    config = {
        "model": {"name_or_path": str(root / "model"), "tokenizer": "minilm", "random_init": True, "pooling": "last"},
        "moe": {"num_experts": 4, "layers": "all"},
        "data": {"max_seq_len": 32, "corpora": [{"name": "a", "path": str(root / "a"), "weight": 0.7,
                                                 "max_eval_sequences": 16},
                                                {"name": "b", "path": str(root / "b"), "weight": 0.3,
                                                 "max_eval_sequences": 16}]},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {"max_steps": steps, "log_every": 2, "save_every": 3, "eval_at_start": True,
                  "output_dir": str(out), "diversity_tokens": 32, "progress_bar": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    ds = config.with_suffix(".ds.json")
    ds.write_text(json.dumps(DS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "mpomoe_ds.cli.train", "--config", str(config), "--deepspeed_config", str(ds), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def assert_split_run_equals(straight: Path, config: Path, split: Path, steps: int) -> None:
    """``config`` (writing to ``split``) trained for half of ``steps``, then --resume: final weights == ``straight``'s."""
    train(config, f"train.max_steps={steps // 2}")
    train(config, "--resume")
    final = f"step{steps}/mp_rank_00_model_states.pt"
    a = torch.load(straight / "checkpoints" / final, weights_only=False)["module"]
    b = torch.load(split / "checkpoints" / final, weights_only=False)["module"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def last_scalars(run: Path, part: str) -> dict[str, float]:
    """The last value of every TensorBoard scalar of ``run`` whose tag contains ``part``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if part in tag}


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """6 steps of ordinary packing (attention across documents) on 2 ranks."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(run_config(setup, out, 6))
    return out


@pytest.mark.distributed
def test_two_rank_pretraining_evaluates_each_corpus_and_resumes_exactly(setup, straight, tmp_path):
    metrics = json.loads((straight / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"a", "b"}
    for corpus in ("a", "b"):
        before, after = metrics["untrained_eval"][corpus], metrics["eval"][corpus]
        assert after["perplexity"] < before["perplexity"]  # per-corpus held-out perplexity falls
    seen = last_scalars(straight, "tokens_seen")
    # 6 steps x 2 micro-batches x 2 ranks x 4 rows x 32 tokens, no padding in these corpora's middle
    assert set(seen) == {"train/tokens_seen/a", "train/tokens_seen/b"}
    assert sum(seen.values()) == pytest.approx(6 * 2 * 2 * 4 * 32, rel=0.02)
    assert seen["train/tokens_seen/a"] > seen["train/tokens_seen/b"]  # weights 0.7 / 0.3

    split = tmp_path / "split"
    assert_split_run_equals(straight, run_config(setup, split, 6), split, steps=6)


@pytest.mark.distributed
def test_two_rank_pretraining_with_document_masking_trains_on_other_attention(setup, straight, tmp_path):
    masked = tmp_path / "masked"
    train(run_config(setup, masked, 4), "data.document_masking=true")
    metrics = json.loads((masked / "metrics.json").read_text())
    ordinary = json.loads((straight / "metrics.json").read_text())
    for corpus in ("a", "b"):
        before, after = metrics["untrained_eval"][corpus], metrics["eval"][corpus]
        assert after["perplexity"] < before["perplexity"]
        # Same initial weights and held-out rows: only the attention pattern differs, so the loss does too.
        assert before["loss"] != pytest.approx(ordinary["untrained_eval"][corpus]["loss"], rel=1e-6)


@pytest.fixture(scope="module")
def t5_setup(tmp_path_factory):
    """A corpus prepared with MiniLM's tokenizer plus 100 T5 sentinels, and a tiny T5 1.1 config folder."""
    import transformers

    from mpomoe_ds.data.prepare import prepare_corpus
    from mpomoe_ds.models.hf import load_tokenizer

    root = tmp_path_factory.mktemp("pretrain_t5")
    tokenizer = load_tokenizer("minilm")
    tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    tokenizer.save_pretrained(root / "tokenizer")
    write_corpus(root / "src", files=1, docs_per_file=80, seed=2)
    prepare_corpus([str(root / "src")], str(root / "tokenizer"), root / "c", load_tokenizer=load_tokenizer,
                   validation_fraction=0.1, progress=False)
    transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                          dropout_rate=0.0).save_pretrained(root / "model")
    return root


@pytest.mark.distributed
def test_two_rank_t5_span_corruption_pretraining_lowers_held_out_perplexity(t5_setup, tmp_path):
    root, out = t5_setup, tmp_path / "t5"
    config = {
        "model": {"name_or_path": str(root / "model"), "tokenizer": str(root / "tokenizer"), "random_init": True},
        "moe": {"num_experts": 4, "layers": "all"},
        "data": {"max_seq_len": 32, "span_corruption": {},
                 "corpora": [{"name": "c", "path": str(root / "c"), "max_eval_sequences": 16}]},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "train": {"max_steps": 8, "log_every": 4, "eval_at_start": True, "output_dir": str(out),
                  "diversity_tokens": 32, "progress_bar": False},
    }
    path = tmp_path / "t5.yaml"
    path.write_text(yaml.safe_dump(config))
    train(path)
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["untrained_eval"]["c"], metrics["eval"]["c"]
    assert after["perplexity"] < 0.5 * before["perplexity"], (before, after)


def mixed_config(root: Path, out: Path, steps: int) -> Path:
    """Corpus "a" and the builtin GLUE-style task toy_sentiment, half the micro-batches each."""
    path = run_config(root, out, steps)
    config = yaml.safe_load(path.read_text())
    config["data"]["corpora"] = [{"name": "a", "path": str(root / "a"), "weight": 0.5, "max_eval_sequences": 16}]
    config["data"]["tasks"] = [{"name": "toy_sentiment", "weight": 0.5, "max_eval_examples": 64}]
    config["train"]["save_every"] = 4
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.distributed
def test_two_rank_run_mixing_a_corpus_with_a_task_trains_both_and_resumes_exactly(setup, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(mixed_config(setup, straight, 8))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"toy_sentiment", "a"}  # per-task and per-corpus eval both run
    for source in ("toy_sentiment", "a"):
        assert metrics["eval"][source]["loss"] < metrics["untrained_eval"][source]["loss"], source
    seen = last_scalars(straight, "tokens_seen")
    assert set(seen) == {"train/tokens_seen/a", "train/tokens_seen/toy_sentiment"} and min(seen.values()) > 0
    assert set(last_scalars(straight, "task_loss")) == {"train/task_loss/a", "train/task_loss/toy_sentiment"}

    assert_split_run_equals(straight, mixed_config(setup, split, 8), split, steps=8)
    assert last_scalars(split, "tokens_seen") == seen  # token counts carried on across the resume
