"""model.objective=text_to_text: T5 trained to write label words, classes predicted by rank classification.

References: the training loss is Hugging Face's seq2seq loss on the gold label
word, built here independently from the label names; each eval score is the
label word's log-likelihood from a separate, unbatched forward per example
and class.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from mpomoe_ds.data.tasks import get_task
from mpomoe_ds.data.tokenize import encode_label_words
from mpomoe_ds.models.hf import load_tokenizer
from mpomoe_ds.models.multitask import MultiTaskModel


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def tiny_t5(vocab: int) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


def test_label_words_become_padded_target_rows(tokenizer):
    spec = get_task("toy_topic")
    targets = encode_label_words(spec, tokenizer)
    assert targets.shape[0] == 4
    for row, word in zip(targets, spec.label_names):
        ids = tokenizer(word)["input_ids"]
        assert row[:len(ids)].tolist() == ids and (row[len(ids):] == -100).all()
    assert encode_label_words(get_task("stsb"), tokenizer) is None  # regression: no label words


def test_text_to_text_loss_and_rank_classification_scores_match_references(tokenizer, one_thread):
    spec = get_task("toy_topic")
    targets = torch.from_numpy(encode_label_words(spec, tokenizer))
    backbone = tiny_t5(len(tokenizer))
    model = MultiTaskModel(backbone, [spec], label_targets={spec.name: targets})
    assert len(model.heads) == 0  # no unused classification head
    batch = tokenizer(["the match ended in a draw", "fresh bread and soup", "a new phone chip"],
                      padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1, 2])
    task_id = torch.zeros(3, dtype=torch.int64)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, task_id=task_id)
    words = [spec.label_names[int(c)] for c in labels]
    gold = tokenizer(words, padding=True, return_tensors="pt")["input_ids"]
    gold = gold.masked_fill(gold == tokenizer.pad_token_id, -100)
    reference = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=gold).loss
    torch.testing.assert_close(out["task_loss"], reference)

    model.eval()
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       task_id=task_id)["logits"]
        assert scores.shape == (3, 4)
        for i in range(3):
            real = batch["attention_mask"][i].bool()
            for c, word in enumerate(spec.label_names):
                target = torch.tensor([tokenizer(word)["input_ids"]])
                logits = backbone(input_ids=batch["input_ids"][i:i + 1, real], labels=target).logits
                log_likelihood = torch.log_softmax(logits[0], -1).gather(1, target[0, :, None]).sum()
                torch.testing.assert_close(scores[i, c], log_likelihood, atol=1e-4, rtol=1e-5)


def test_text_to_text_on_a_decoder_only_or_a_regression_task_is_refused_early(tmp_path, monkeypatch):
    import json

    import yaml

    from mpomoe_ds.cli.train import run as train_cli
    from mpomoe_ds.training import trainer

    from conftest import TINY_DS, tiny_run_config

    def too_late(*args, **kwargs):
        raise AssertionError("data work started before the bad input was reported")

    monkeypatch.setattr(trainer, "prepare_tasks", too_late)
    (tmp_path / "ds.json").write_text(json.dumps(TINY_DS))
    config = tiny_run_config(tmp_path / "out")
    config["model"]["objective"] = "text_to_text"
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=r"model.objective=text_to_text: 'minilm' \(bert\) has no decoder"):
        train_cli(["--config", str(tmp_path / "a.yaml"), "--deepspeed_config", str(tmp_path / "ds.json")])
    config["model"] = {"name_or_path": "t5", "tokenizer": "minilm", "random_init": True, "objective": "text_to_text"}
    (tmp_path / "stsb.csv").write_text("sentence1,sentence2,label\na,b,0.5\n")
    config["data"]["tasks"] = [{"name": "stsb", "train_file": str(tmp_path / "stsb.csv")}]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=r"data.tasks\[0\] \(stsb, regression\): text_to_text trains classification"):
        train_cli(["--config", str(tmp_path / "b.yaml"), "--deepspeed_config", str(tmp_path / "ds.json")])
