"""Every model family through the adapter registry: converted logits equal the original's.

Tiny random models come from transformers' config classes (``tests/dist/family_zoo.py``);
BERT is the real packaged MiniLM. Lossless conversion must match to 1e-4 (fp32)
with MPO and plain experts, in one process and on 2 expert-parallel ranks;
truncated bonds must stay within each matrix's reported Frobenius bound.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from dist import family_zoo

from mpomoe_ds.models import families
from mpomoe_ds.models.convert import MoEMLP, convert_model
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.mpo.config import MPOConfig

from conftest import ROOT, run_two_ranks

WORKER = ROOT / "tests" / "dist" / "families_worker.py"
TOL = 1e-4  # fp32, max |converted - original| over the logits


def copy_moe(**overrides) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "ep_size": 1, "k": 1, "expert_init": "copy", "layers": "all", **overrides})


@pytest.mark.parametrize("expert_type", ["mpo", "ffn"])
@pytest.mark.parametrize("case", sorted(family_zoo.CASES))
def test_lossless_conversion_keeps_the_logits(case, expert_type, one_thread):
    model = family_zoo.build(case)
    batch = family_zoo.inputs(case)
    reference = family_zoo.outputs(model, batch)
    report = convert_model(model, copy_moe(expert_type=expert_type))
    assert report.family == family_zoo.FAMILY_OF[case]
    assert report.moe.gated == families.family(report.family).gated
    assert len(report.blocks) == report.num_blocks > 0
    assert (family_zoo.outputs(model, batch) - reference).abs().max() < TOL


@pytest.mark.parametrize("case", ["llama-causal-lm", "qwen3", "t5-gated-gelu", "t5-relu", "gpt2"])
def test_truncated_bonds_stay_within_the_reported_bound(case, one_thread):
    model = family_zoo.build(case)
    originals = {name: {m: families.family(family_zoo.FAMILY_OF[case]).match(model.get_submodule(name))[m]
                        for m in families.family(family_zoo.FAMILY_OF[case]).projections}
                 for name, _, _ in families.find_ffn_linears(model)}
    originals = {name: {m: _in_out(p) for m, p in projs.items()} for name, projs in originals.items()}
    batch = family_zoo.inputs(case)
    reference = family_zoo.outputs(model, batch)
    report = convert_model(model, copy_moe(), MPOConfig(max_bond=3))
    assert report.max_rel_error_bound > 1e-3  # the bonds really were cut
    checked = 0
    for block, (_, layer) in zip(report.blocks, moe_layers(model)):
        weights = layer.expert_weights()
        assert set(weights) == set(layer.config.matrices)
        for m, w_LIO in weights.items():
            error = float((w_LIO[0].detach().double() - originals[block.block_name][m].double()).norm())
            assert error <= block.error_bound[m] * (1 + 1e-4) + 1e-6, (block.block_name, m, error)
            checked += 1
    assert checked == len(report.blocks) * len(report.moe.matrices)
    assert (family_zoo.outputs(model, batch) - reference).abs().max() > TOL  # truncation is visible


def _in_out(module: torch.nn.Module) -> torch.Tensor:
    from mpomoe_ds.models.hf import linear_weight_in_out

    return linear_weight_in_out(module).clone()


def test_gated_experts_hold_three_matrices_and_share_one_central_tensor_each(one_thread):
    model = family_zoo.build("llama-causal-lm")
    convert_model(model, copy_moe())
    wrapper = model.model.layers[0].mlp
    assert type(wrapper) is MoEMLP and wrapper.family == "llama"
    layer = wrapper.moe
    assert set(layer.central) == {"gate", "up", "down"}
    expert = layer.experts.deepspeed_experts[0]
    names = {n.split(".")[0] for n, _ in expert.named_parameters()}
    assert names == {f"{m}_{kind}" for m in ("gate", "up", "down") for kind in ("aux", "bias")}
    assert all(len(expert.aux_cores(m)) == 4 for m in ("gate", "up", "down"))  # 5 cores, the central one shared
    # Llama has no biases: the experts' are zero and frozen (moe.expert_bias false), so they stay bias-free
    assert float(expert.gate_bias.detach().abs().sum()) == 0.0 and not expert.gate_bias.requires_grad
    assert layer.config.expert_bias is False and expert.gate_aux[0].requires_grad
    # the gate uses its own cores: a gate-only change moves the output
    x = torch.randn(5, 32)
    before = layer(x)[0]
    with torch.no_grad():
        for e in layer.experts.deepspeed_experts:
            e.gate_aux[0].mul_(2.0)
    assert (layer(x)[0] - before).abs().max() > 1e-4


@pytest.mark.parametrize("expert_type", ["mpo", "ffn"])
def test_two_expert_parallel_ranks_keep_every_familys_logits(tmp_path, expert_type):
    cases = ["llama-causal-lm", "mistral", "qwen2", "qwen3", "t5-relu", "t5-gated-gelu", "t5-encoder", "gpt2",
             "roberta-seq-cls", "electra-mlm"]
    if expert_type == "mpo":
        cases.append("minilm")
    ranks = run_two_ranks(WORKER, ["--cases", ",".join(cases), "--expert-type", expert_type], tmp_path / "r")
    for result in ranks:
        assert set(result["max_abs_diff"]) == set(cases)
        for case, diff in result["max_abs_diff"].items():
            assert diff < TOL, (result["rank"], case, diff)
    # each rank holds half of the experts
    single = {}
    for case in ("llama-causal-lm", "t5-gated-gelu"):
        model = family_zoo.build(case)
        single[case] = convert_model(model, copy_moe(expert_type=expert_type, k=2)).params_after.expert_local
        assert ranks[0]["local_experts"][case] * 2 == single[case]


# ----------------------------------------------------------------------------- errors


def test_an_ffn_that_is_already_moe_is_refused():
    config = transformers.MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    with pytest.raises(ValueError, match=r"MixtralForCausalLM: its FFNs are already MoE.*Upcycle the dense model"):
        convert_model(transformers.MixtralForCausalLM(config), copy_moe())


def test_an_unknown_activation_is_named():
    config = transformers.LlamaConfig(**{**family_zoo.LLAMA_LIKE, "hidden_act": "gelu_fast"})
    with pytest.raises(ValueError, match=r"config.hidden_act='gelu_fast' has no expert equivalent.*silu"):
        convert_model(transformers.LlamaForCausalLM(config), copy_moe())


def test_tied_ffns_are_refused():
    model = family_zoo.build("llama-causal-lm")
    model.model.layers[1].mlp = model.model.layers[0].mlp
    with pytest.raises(ValueError, match=r"gate projection of model.layers.0 is shared by .*tied or shared FFNs"):
        convert_model(model, copy_moe())


def test_every_registered_family_is_covered_here():
    assert set(family_zoo.FAMILY_OF.values()) == {a.name for a in families.FAMILIES}


TRAIN_WORKER = ROOT / "tests" / "dist" / "family_training_worker.py"


@pytest.mark.distributed
@pytest.mark.parametrize("case, shard_central", [("llama-causal-lm", False), ("t5-gated-gelu", False),
                                                 ("llama-causal-lm", True)])
def test_two_rank_expert_parallel_training_equals_one_process(tmp_path, case, shard_central):
    """Same global batch, 2 accumulation micro-batches per rank, central-gradient mask p=0.5, SGD, 3 steps;
    gated experts, with replicated and (Llama) sharded central tensors.

    fp32 tolerance: 1e-5 on the loss, 1e-6 on every parameter (summation-order roundoff).
    """
    extra = ["--shard-central"] if shard_central else []
    ranks = run_two_ranks(TRAIN_WORKER, ["--case", case, "--steps", "3", *extra], tmp_path / "r")
    for r in ranks:
        assert r["gated"] and r["central_sharded"] == shard_central
        assert len(r["loss_diff"]) == 3 and max(r["loss_diff"]) < 1e-5, r["loss_diff"]
        assert r["param_diff"] < 1e-6
        assert r["central_moved"] > 1e-5  # the masked central tensors still trained


# ----------------------------------------------------------------------------- merged export to native MoE classes

# Run in a fresh interpreter: load the export with plain transformers, save one output, say what was imported.
FRESH_PROCESS_LOAD = """
import json, sys, torch, transformers
folder = sys.argv[1]
model = transformers.{auto}.from_pretrained(folder{kwargs}).eval()
batch = torch.load(folder + "/batch.pt")
with torch.no_grad():
    out = model(**batch).{output}
torch.save(out, folder + "/fresh_{output}.pt")
print(json.dumps({{"class": type(model).__name__,
                  "mpomoe_ds_imported": any(m.split(".")[0] == "mpomoe_ds" for m in sys.modules)}}))
"""
FRESH_LOAD = FRESH_PROCESS_LOAD.format(auto="AutoModelForCausalLM", kwargs="", output="logits")


@pytest.mark.parametrize("case,layers,target", [("llama-causal-lm", "all", "MixtralForCausalLM"),
                                                ("mistral", "all", "MixtralForCausalLM"),
                                                ("qwen2", "all", "Qwen2MoeForCausalLM"),
                                                ("qwen3", "every_other", "Qwen3MoeForCausalLM")])
def test_merged_export_loads_in_plain_transformers_with_the_converted_logits(tmp_path, case, layers, target):
    import json
    import os
    import subprocess
    import sys

    from mpomoe_ds.models.export import save_converted

    model = family_zoo.build(case)
    # experts made to differ, top-2: the fused layout and router weights must map expert by expert
    convert_model(model, copy_moe(k=2, expert_init="perturb", init_noise=0.3, layers=layers))
    batch = family_zoo.inputs(case)
    converted = family_zoo.outputs(model, batch)
    folder = save_converted(model, tmp_path / "export", mode="merged")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    torch.save(batch, folder / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(folder)], capture_output=True, text=True,
                          cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {"class": target, "mpomoe_ds_imported": False}
    assert (torch.load(folder / "fresh_logits.pt") - converted).abs().max() < TOL


def test_merged_export_refuses_what_mixtral_cannot_compute():
    from mpomoe_ds.models.native_moe import save_native_moe

    model = family_zoo.build("llama-causal-lm")
    convert_model(model, copy_moe(k=2, layers=[1], gate_weighting="softmax"))
    with pytest.raises(ValueError, match=r"exactly as MixtralForCausalLM: .*'softmax'.*renormalises.*"
                                         r"moe.layers: all"):
        save_native_moe(model, "/nonexistent")
    model = family_zoo.build("llama-seq-cls")
    convert_model(model, copy_moe())
    with pytest.raises(ValueError, match="no native transformers MoE target"):
        save_native_moe(model, "/nonexistent")
