"""Remote-code exports load in plain transformers, without mpomoe_ds, and give the converted model's outputs.

Every family without a native MoE class (BERT as the real MiniLM, RoBERTa, XLM-R and ELECTRA, GPT-2 and its
classification head, DistilBERT, T5 1.0 / 1.1 with and without the decoder), tiny random models from
``tests/dist/family_zoo.py``.
One fresh interpreter (no PYTHONPATH, mpomoe_ds asserted absent from ``sys.modules``) loads every folder
with ``<Auto class>.from_pretrained(folder, trust_remote_code=True)``; outputs must match to 1e-4 (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import family_zoo

from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.models.export import save_converted
from mpomoe_ds.models.remote_export import save_remote_code
from mpomoe_ds.moe.config import MoEConfig

TOL = 1e-4  # fp32, max |loaded - converted|

# Loads each (folder, Auto class) given as argv pairs; saves its output beside the batch; prints what it saw.
FRESH_REMOTE_LOAD = """
import json, sys, torch, transformers
seen = {}
for folder, auto in zip(sys.argv[1::2], sys.argv[2::2]):
    model, info = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True,
                                                              output_loading_info=True)
    batch = torch.load(folder + "/batch.pt")
    with torch.no_grad():
        out = model.eval()(**batch)
    out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    torch.save(out, folder + "/fresh_out.pt")
    seen[folder] = {"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                    "unexpected": sorted(info["unexpected_keys"])}
print(json.dumps({"models": seen, "mpomoe_ds_imported": any(m.split(".")[0] == "mpomoe_ds" for m in sys.modules)}))
"""


def load_in_fresh_process(folders: dict[Path, str], tmp_path: Path) -> dict:
    """Run FRESH_REMOTE_LOAD on ``{folder: Auto class}``; returns its report (asserting the process succeeded)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(a) for folder, auto in folders.items() for a in (folder, auto)]
    proc = subprocess.run([sys.executable, "-c", FRESH_REMOTE_LOAD, *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# case -> (Auto class the fresh process uses, conversion overrides): top-k 1 and 2, every weighting, some
# blocks only, so routing and block placement have to match expert by expert.
CASES = {
    "gpt2": ("AutoModelForCausalLM", dict(k=2)),
    "gpt2-seq-cls": ("AutoModelForSequenceClassification", dict(k=1, layers=[1])),
    "distilbert": ("AutoModelForSequenceClassification", dict(k=2, gate_weighting="normalized")),
    "t5-relu": ("AutoModelForSeq2SeqLM", dict(k=2, gate_weighting="softmax")),
    "t5-gated-gelu": ("AutoModelForSeq2SeqLM", dict(k=2, layers="every_other")),
    "t5-encoder": ("AutoModel", dict(k=2)),
    "minilm": ("AutoModel", dict(k=2, layers="every_other")),
    "roberta-seq-cls": ("AutoModelForSequenceClassification", dict(k=2)),
    "xlm-roberta": ("AutoModel", dict(k=1, layers=[1])),
    "electra-mlm": ("AutoModelForMaskedLM", dict(k=2, gate_weighting="normalized")),
}


def test_remote_code_exports_load_without_mpomoe_ds_and_give_the_converted_outputs(tmp_path, one_thread):
    folders, converted, classes = {}, {}, {}
    for case, (auto, overrides) in CASES.items():
        model = family_zoo.build(case)
        batch = family_zoo.inputs(case)
        original = family_zoo.outputs(model, batch)
        # experts made to differ (MPO cores, merged at export), so a misrouted token changes the output
        convert_model(model, MoEConfig(**{"num_experts": 4, "ep_size": 1, "expert_init": "perturb",
                                          "init_noise": 0.3, "layers": "all", **overrides}))
        converted[case] = family_zoo.outputs(model, batch)
        assert (converted[case] - original).abs().max() > 10 * TOL, case  # the experts matter
        folder = save_converted(model, tmp_path / case, mode="remote")
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "modeling_mpomoe.py"]
        torch.save(batch, folder / "batch.pt")
        folders[folder], classes[case] = auto, "MPOE" + type(model).__name__
    report = load_in_fresh_process(folders, tmp_path)
    assert report["mpomoe_ds_imported"] is False
    for case in CASES:
        folder = str(tmp_path / case)
        assert report["models"][folder] == {"class": classes[case], "missing": [], "unexpected": []}
        diff = float((torch.load(tmp_path / case / "fresh_out.pt") - converted[case]).abs().max())
        assert diff < TOL, (case, diff)


def test_the_modeling_file_is_the_shared_source_plus_a_small_family_part(tmp_path):
    from mpomoe_ds.models.export import load_converted
    from mpomoe_ds.models.remote_export import SHARED_SOURCE

    model = family_zoo.build("t5-relu")
    convert_model(model, MoEConfig(num_experts=4, ep_size=1, expert_type="ffn", layers=[0]))
    folder = save_remote_code(model, tmp_path / "t5")
    source = (folder / "modeling_mpomoe.py").read_text()
    shared = SHARED_SOURCE.read_text()
    assert source.startswith(shared)
    family_part = source[len(shared):]
    assert len(family_part.strip().splitlines()) < 20
    assert "class MPOET5ForConditionalGeneration(MPOEModelMixin, T5ForConditionalGeneration)" in family_part
    imports = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "typing", "torch", "torch.nn.functional", "transformers"}, imports
    with pytest.raises(FileNotFoundError, match=r"remote-code export .*trust_remote_code=True"):
        load_converted(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mpomoe_t5" and config["mpomoe"]["blocks"] == ["encoder.block.0.layer.1"]
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_mpomoe.MPOET5ForConditionalGeneration"


def test_remote_export_refuses_what_the_file_cannot_compute(tmp_path):
    model = family_zoo.build("llama-causal-lm")
    convert_model(model, MoEConfig(num_experts=4, ep_size=1, expert_type="ffn"))
    with pytest.raises(ValueError, match=r"remote-code export covers .*GPT2LMHeadModel.*not LlamaForCausalLM.*"
                                         r"export natively with mode 'merged'"):
        save_remote_code(model, tmp_path / "llama")
    model = family_zoo.build("gpt2")
    convert_model(model, MoEConfig(num_experts=4, ep_size=1, expert_type="ffn", dropless=False))
    with pytest.raises(ValueError, match=r"needs dropless routing .*moe.dropless=False"):
        save_converted(model, tmp_path / "gpt2", mode="remote")
    assert not (tmp_path / "gpt2").exists() and not (tmp_path / "llama").exists()


# A random GPT-2 in the shape a user would train first; the minilm tokenizer's vocabulary.
TINY_GPT2 = {"name_or_path": "gpt2", "tokenizer": "minilm", "random_init": True,
             "config_overrides": {"vocab_size": 30522, "n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4,
                                  "n_positions": 64, "pad_token_id": 0}}


def test_cli_exports_a_trained_gpt2_run_as_remote_code_that_plain_transformers_loads(tmp_path):
    """mpomoe-export --mode remote on a training run's checkpoint (model and head read from its run_config.json);
    the reference is the same checkpoint exported as MPO cores and rebuilt by load_converted."""
    import yaml

    from mpomoe_ds.cli.export import main as export_cli
    from mpomoe_ds.cli.train import run as train_cli
    from mpomoe_ds.models.export import load_converted

    from conftest import TINY_DS, tiny_run_config

    config = tiny_run_config(tmp_path / "gpt2", max_steps=3, log_every=3, diversity_tokens=0)
    config["model"] = TINY_GPT2
    config["moe"].update(ep_size=1, layers="all", k=2)
    config["data"] = {"builtin": "toy_lm", "max_seq_len": 32,
                      "tasks": [{"name": "toy_lm", "max_train_examples": 64, "max_eval_examples": 8}]}
    (tmp_path / "ds.json").write_text(json.dumps(TINY_DS))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    train_cli(["--config", str(tmp_path / "run.yaml"), "--deepspeed_config", str(tmp_path / "ds.json")])

    run_dir = tmp_path / "gpt2"
    common = ["--checkpoint", str(run_dir / "checkpoints"), "--moe-config", str(run_dir / "run_config.json")]
    assert export_cli([*common, "--out", str(tmp_path / "remote"), "--mode", "remote"]) == 0
    assert export_cli([*common, "--out", str(tmp_path / "mpo"), "--mode", "mpo"]) == 0
    reference = load_converted(tmp_path / "mpo")
    assert type(reference).__name__ == "GPT2LMHeadModel"  # the run trained the causal-LM head
    batch = family_zoo.inputs("gpt2")
    torch.save(batch, tmp_path / "remote" / "batch.pt")
    with torch.no_grad():
        expected = reference(**batch).logits

    report = load_in_fresh_process({tmp_path / "remote": "AutoModelForCausalLM"}, tmp_path)
    assert report["mpomoe_ds_imported"] is False
    assert report["models"][str(tmp_path / "remote")] == {"class": "MPOEGPT2LMHeadModel", "missing": [],
                                                          "unexpected": []}
    assert (torch.load(tmp_path / "remote" / "fresh_out.pt") - expected).abs().max() < TOL
