"""Model conversion and export: upcycled models equal the originals, aux losses, reports, errors, round trips."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers

from mpomoe_ds.cli.export import main
from mpomoe_ds.config import ConfigError
from mpomoe_ds.models.convert import BertMoEOutput, MoEAuxCollector, MoEMLP, convert_model, moe_wrappers
from mpomoe_ds.models.export import (
    MPOMOE_CONFIG_NAME,
    WEIGHTS_NAME,
    export_deepspeed_checkpoint,
    load_converted,
    load_weights,
    save_converted,
)
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.experts import FFNExpert, MPOExpert
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.mpo import factorize
from mpomoe_ds.mpo.config import MPOConfig

from conftest import ROOT, minilm_and_batch, run_two_ranks

WORKER = ROOT / "tests" / "dist" / "export_worker.py"
VOCAB = 100


def gpt2(cls=transformers.GPT2LMHeadModel, layers: int = 3, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=hidden, n_layer=layers, n_head=4,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return cls(config).eval()


def bert(cls=transformers.BertModel, layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=32,
                                     num_labels=3, **overrides)
    torch.manual_seed(seed)
    return cls(config).eval()


def token_batch(seed: int = 1, batch: int = 3, seq: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)  # 0 is the pad token
    mask = torch.ones_like(ids)
    mask[-1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    if hasattr(model, "moe_aux"):
        model.moe_aux.pop()
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- upcycling is exact


def convert_keeps_outputs(model, moe: MoEConfig, tol: float = 1e-4):
    """Convert ``model`` in place; assert its outputs on a token batch did not move by more than ``tol``."""
    batch = token_batch()
    expected = outputs(model, batch)
    report = convert_model(model, moe)
    assert max_diff(outputs(model, batch), expected) < tol
    return report


@pytest.mark.parametrize("cls,layers,expert_type,k", [
    (transformers.GPT2LMHeadModel, "all", "mpo", 1),
    (transformers.GPT2LMHeadModel, "every_other", "mpo", 2),
    (transformers.GPT2ForSequenceClassification, [0, 2], "mpo", 1),
    (transformers.GPT2Model, "all", "ffn", 2),
])
def test_converted_gpt2_gives_the_original_logits(cls, layers, expert_type, k):
    model = gpt2(cls)
    report = convert_keeps_outputs(model, MoEConfig(num_experts=4, k=k, layers=layers, expert_type=expert_type,
                                                    expert_init="copy"))
    # GPT-2's gelu_new is taken from the model config, and the report says so
    assert report.moe.activation == "gelu_new"
    assert any("gelu_new" in note and "activation_function" in note for note in report.notes)
    assert all(type(w) is MoEMLP for _, w in moe_wrappers(model))


@pytest.mark.parametrize("cls,layers,expert_type,k", [
    (transformers.BertModel, "all", "mpo", 1),
    (transformers.BertForSequenceClassification, "every_other", "mpo", 2),
    (transformers.BertForMaskedLM, [0], "ffn", 2),
])
def test_converted_bert_gives_the_original_logits(cls, layers, expert_type, k):
    model = bert(cls)
    report = convert_keeps_outputs(model, MoEConfig(num_experts=4, k=k, layers=layers, expert_type=expert_type,
                                                    expert_init="copy"))
    assert report.notes == []  # BERT's "gelu" is already the default
    for name, wrapper in moe_wrappers(model):
        block = model.get_submodule(wrapper.block_name)
        assert type(block.intermediate) is torch.nn.Identity and block.output is wrapper
        assert type(wrapper) is BertMoEOutput and wrapper.LayerNorm.eps == 1e-12  # the original LayerNorm kept
        assert name == f"{wrapper.block_name}.output"


@pytest.fixture(scope="module")
def minilm():
    model, batch = minilm_and_batch(["The cat sat on the mat.",
                                     "Experts share one central tensor in MPOE layers, said the paper."])
    return model, batch, outputs(model, batch)


@pytest.mark.parametrize("layers,expert_type,k", [([0, 5], "mpo", 1), ("every_other", "ffn", 2), ("all", "ffn", 1)])
def test_converted_minilm_gives_the_original_hidden_states(minilm, layers, expert_type, k):
    original, batch, expected = minilm
    model = copy.deepcopy(original)
    report = convert_model(model, MoEConfig(num_experts=4, k=k, layers=layers, expert_type=expert_type,
                                            expert_init="copy"))
    chosen = {"all": [0, 1, 2, 3, 4, 5], "every_other": [1, 3, 5]}[layers] if isinstance(layers, str) else layers
    assert [b.index for b in report.blocks] == chosen
    assert max_diff(outputs(model, batch), expected) < 1e-4
    if expert_type == "mpo":  # lossless: nothing discarded
        assert report.max_rel_error_bound == 0.0


# ----------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize("layers,chosen", [("all", [0, 1, 2, 3]), ("every_other", [1, 3]), ([3, 0], [0, 3])])
def test_layer_selection_converts_exactly_the_chosen_blocks(layers, chosen):
    model = gpt2(transformers.GPT2Model, layers=4)
    report = convert_model(model, MoEConfig(num_experts=2, layers=layers, expert_type="ffn", expert_init="copy"))
    converted = [i for i, block in enumerate(model.h) if isinstance(block.mlp, MoEMLP)]
    assert converted == chosen
    assert all(type(model.h[i].mlp).__name__ == "GPT2MLP" for i in range(4) if i not in chosen)
    # layer_id is the order among MoE layers: DeepSpeed names expert files by it
    assert [(b.index, b.layer_id, b.block_name) for b in report.blocks] == [
        (index, order, f"h.{index}") for order, index in enumerate(chosen)]
    assert [layer.layer_id for _, layer in moe_layers(model)] == list(range(len(chosen)))
    assert [b.moe_module for b in report.blocks] == [name for name, _ in moe_layers(model)]


# ----------------------------------------------------------------------------- auxiliary losses


def test_aux_collector_records_what_direct_layer_calls_give():
    model = bert(transformers.BertModel, layers=3)
    convert_model(model, MoEConfig(num_experts=4, k=2, expert_init="perturb", init_noise=0.3, aux_loss_coef=0.5,
                                   layers="all"))
    seen = {}

    def capture(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0]  # returns None: the output is not replaced
        return hook

    for _, wrapper in moe_wrappers(model):
        wrapper.moe.register_forward_hook(capture(wrapper.block_name))
    model(**token_batch())
    records = model.moe_aux.records()
    assert [r.layer for r in records] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    for record, (_, layer) in zip(records, moe_layers(model)):
        _, l_aux, counts = layer(seen[record.layer])
        assert torch.equal(record.counts, counts)
        assert int(record.counts.sum()) == 3 * 9 * 2  # every token, k routes
        assert abs(float(record.l_aux.detach()) - float(l_aux.detach())) < 1e-6
        assert record.l_aux.requires_grad  # a training forward keeps the graph
    total = model.moe_aux.total_aux_loss()
    assert abs(float(total.detach()) - 0.5 * sum(float(r.l_aux.detach()) for r in records)) < 1e-6
    assert abs(float(model.moe_aux.total_aux_loss(coef=2.0).detach()) - 4 * float(total.detach())) < 1e-5
    total.backward()  # the balance loss trains the routers
    assert all(layer.deepspeed_moe.gate.wg.weight.grad.abs().max() > 0 for _, layer in moe_layers(model))
    popped = model.moe_aux.pop()
    assert [r.layer for r in popped] == [r.layer for r in records]
    assert len(model.moe_aux) == 0 and model.moe_aux.pop() == []
    assert float(model.moe_aux.total_aux_loss()) == 0.0


def test_eval_forwards_keep_one_graphless_record_per_layer():
    model = bert(transformers.BertModel, layers=2)
    convert_model(model, MoEConfig(num_experts=4, expert_init="copy", layers="all"))
    for seed in range(5):  # nobody pops: records are replaced, not accumulated
        with torch.no_grad():
            model(**token_batch(seed=seed, batch=seed + 1))
    records = model.moe_aux.records()
    assert len(records) == 2
    assert [int(r.counts.sum()) for r in records] == [5 * 9, 5 * 9]  # the last forward's tokens
    assert not any(r.l_aux.requires_grad for r in records)


def test_collector_is_shared_by_all_wrappers_and_survives_deepcopy():
    model = gpt2(transformers.GPT2Model)
    report = convert_model(model, MoEConfig(num_experts=2, expert_type="ffn", expert_init="copy", layers="all"))
    assert report.aux is model.moe_aux and isinstance(report.aux, MoEAuxCollector)
    assert all(w.aux is model.moe_aux for _, w in moe_wrappers(model))
    twin = copy.deepcopy(model)
    assert all(w.aux is twin.moe_aux for _, w in moe_wrappers(twin)) and twin.moe_aux is not model.moe_aux
    outputs(twin, token_batch())
    assert len(twin.moe_aux) == 0 and len(model.moe_aux) == 0


# ----------------------------------------------------------------------------- report


def test_report_lists_blocks_parameter_counts_and_error_bounds():
    model = gpt2(transformers.GPT2LMHeadModel)
    blocks = model.transformer.h
    originals = {i: (blocks[i].mlp.c_fc.weight.detach().clone(), blocks[i].mlp.c_proj.weight.detach().clone())
                 for i in range(3)}
    ffn_params = sum(p.numel() for p in blocks[1].mlp.parameters())
    before = sum(p.numel() for p in model.parameters())
    report = convert_model(model, MoEConfig(num_experts=4, layers=[1, 2], expert_init="copy"), MPOConfig(max_bond=8))
    assert report.model_class == "GPT2LMHeadModel" and report.family == "gpt2" and report.num_blocks == 3
    assert report.params_before.total_local == before and report.params_before.expert_local == 0
    moe_params = sum(p.numel() for _, layer in moe_layers(model) for p in layer.parameters())
    after = report.params_after
    assert after.total_local == before - 2 * ffn_params + moe_params
    assert after.expert_global == after.expert_local > 0 and after.central_local > 0
    for block, (_, layer) in zip(report.blocks, moe_layers(model)):
        assert (block.hidden_size, block.ffn_size) == (64, 256)
        assert max(block.bond_dims["up"]) == 8
        # the bound holds for the actual reconstruction of every expert (all copies at init)
        with torch.no_grad():
            weights = layer.expert_weights()
        for m, original in zip(("up", "down"), originals[block.index]):
            measured = float(torch.linalg.norm(weights[m][0] - original))
            assert 0 < measured <= block.error_bound[m] * (1 + 1e-4) + 1e-6
            assert block.rel_error_bound[m] == pytest.approx(block.error_bound[m] / float(original.norm()))
    data = json.loads(json.dumps(report.as_dict()))
    assert [b["block_name"] for b in data["blocks"]] == ["transformer.h.1", "transformer.h.2"]
    assert data["params_after"]["central_local"] == after.central_local
    summary = report.summary()
    assert "transformer.h.1" in summary and "transformer.h.2" in summary and "gelu_new" in summary


# ----------------------------------------------------------------------------- errors


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(ValueError, match="Sequential.*GPT-2, BERT-family.*Llama.*T5.*register an adapter"):
        convert_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), MoEConfig(expert_init="copy", layers="all"))


def test_width_that_does_not_factor_names_the_block_and_the_fix():
    model = gpt2(transformers.GPT2Model, hidden=36)  # 36 = 2*2*3*3: only 4 prime factors for 5 cores
    with pytest.raises(ValueError, match=r"block 0 \(h\.0\).*cannot split dim 36.*mpo\.in_factors_up"):
        convert_model(model, MoEConfig(num_experts=2, expert_init="copy", layers="all"))
    # the fix the message names works
    report = convert_model(model, MoEConfig(num_experts=2, expert_init="copy", layers="all"), MPOConfig(num_cores=4))
    assert len(report.blocks) == 3


def test_layer_index_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"indices \[3\] do not exist.*3 layers"):
        convert_model(gpt2(transformers.GPT2Model), MoEConfig(layers=[0, 3], expert_init="copy"))


def test_converting_twice_or_with_chunked_ffn_is_refused():
    model = bert()
    convert_model(model, MoEConfig(layers=[0], expert_type="ffn", expert_init="copy"))
    with pytest.raises(ValueError, match="already has MoE layers"):
        convert_model(model, MoEConfig(layers=[1], expert_type="ffn", expert_init="copy"))
    with pytest.raises(ValueError, match="chunk_size_feed_forward=4.*set it to 0"):
        convert_model(bert(chunk_size_feed_forward=4), MoEConfig(expert_type="ffn", expert_init="copy", layers="all"))


# ----------------------------------------------------------------------------- export round trips


def train_a_little(model: torch.nn.Module, steps: int = 2) -> None:
    """A few SGD steps so central tensors, auxiliaries and routers all move away from the upcycled init."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        out = model(**token_batch(seed=10 + step))
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        loss = logits.square().mean() + model.moe_aux.total_aux_loss()
        model.moe_aux.pop()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("make,mode,tol", [
    (lambda: gpt2(transformers.GPT2LMHeadModel), "mpo", 1e-5),
    (lambda: gpt2(transformers.GPT2LMHeadModel), "merged", 1e-4),
    (lambda: bert(transformers.BertForSequenceClassification, layers=3), "mpo", 1e-5),
    (lambda: bert(transformers.BertForSequenceClassification, layers=3), "merged", 1e-4),
], ids=["gpt2-lm-mpo", "gpt2-lm-merged", "bert-seqcls-mpo", "bert-seqcls-merged"])
def test_save_and_load_round_trip_gives_the_same_logits(tmp_path, make, mode, tol):
    model = make()
    convert_model(model, MoEConfig(num_experts=4, k=2, layers="every_other", expert_init="perturb",
                                   init_noise=0.3))
    train_a_little(model)
    batch = token_batch(seed=3)
    expected = outputs(model, batch)
    save_converted(model, tmp_path, mode)
    meta = json.loads((tmp_path / MPOMOE_CONFIG_NAME).read_text())
    assert meta["mode"] == mode and meta["model_class"] == type(model).__name__ and meta["blocks"] == [1]
    loaded = load_converted(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert max_diff(outputs(loaded, batch), expected) < tol
    experts = [e for _, layer in moe_layers(loaded) for e in layer.experts.deepspeed_experts]
    assert all(type(e) is (FFNExpert if mode == "merged" else MPOExpert) for e in experts)
    assert all(type(e) is MPOExpert for _, layer in moe_layers(model) for e in layer.experts.deepspeed_experts)
    # a plain from_pretrained must fail loudly instead of loading random FFNs
    with pytest.raises(OSError):
        transformers.AutoModel.from_pretrained(tmp_path)


def kronecker_sum(in_factors: list[int], out_factors: list[int], terms: int, gen: torch.Generator) -> torch.Tensor:
    """sum_t A_t1 (x) ... (x) A_tn: an MPO with every bond <= terms (row/column order as decompose reshapes)."""
    total = 0
    for _ in range(terms):
        w = torch.ones(1, 1)
        for i, j in zip(in_factors, out_factors):
            w = torch.kron(w, torch.randn(i, j, generator=gen))
        total = total + w
    return total * 0.1


def test_load_resizes_cores_truncated_by_rel_tol(tmp_path):
    model = gpt2(transformers.GPT2Model, layers=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sums of 2 Kronecker products: MPO bonds of 2, where random matrices have full ones
        for conv in (model.h[0].mlp.c_fc, model.h[0].mlp.c_proj):
            rows, cols = conv.weight.shape
            conv.weight.copy_(kronecker_sum(factorize(rows), factorize(cols), terms=2, gen=gen))
    mpo = MPOConfig(rel_tol=1e-4)
    convert_model(model, MoEConfig(num_experts=2, expert_init="copy", layers="all"), mpo)
    batch = token_batch()
    expected = outputs(model, batch)
    save_converted(model, tmp_path, "mpo")
    fresh = gpt2(transformers.GPT2Model, layers=1)
    convert_model(fresh, MoEConfig(num_experts=2, expert_init="copy", layers="all"), mpo)
    assert fresh.h[0].mlp.moe.central["up"].shape != model.h[0].mlp.moe.central["up"].shape
    loaded = load_converted(tmp_path)
    central = loaded.h[0].mlp.moe.central["up"]
    assert central.shape == model.h[0].mlp.moe.central["up"].shape and (central.shape[0], central.shape[-1]) == (2, 2)
    assert max_diff(outputs(loaded, batch), expected) < 1e-5


def test_save_and_load_refuse_what_they_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="no converted blocks; call convert_model"):
        save_converted(gpt2(transformers.GPT2Model), tmp_path)
    model = gpt2(transformers.GPT2Model, layers=1)
    convert_model(model, MoEConfig(num_experts=2, expert_type="ffn", expert_init="copy", layers="all"))
    with pytest.raises(ValueError, match="mode='dense'"):
        save_converted(model, tmp_path, "dense")
    with pytest.raises(FileNotFoundError, match="not an mpomoe_ds export"):
        load_converted(tmp_path)
    other = gpt2(transformers.GPT2Model, layers=1)
    convert_model(other, MoEConfig(num_experts=4, expert_type="ffn", expert_init="copy", layers="all"))
    with pytest.raises(ValueError, match=r"gate\.wg\.weight: saved shape \(4, 64\) but the model has \(2, 64\)"):
        load_weights(model, other.state_dict())
    partial = {k: v for k, v in model.state_dict().items() if "deepspeed_experts.1." not in k}
    with pytest.raises(ValueError, match=r"missing \['h\.0\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.1\."):
        load_weights(model, partial)


# ----------------------------------------------------------------------------- DeepSpeed checkpoints


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["model", "trainer_sharded"])
def test_two_rank_deepspeed_checkpoint_exports_to_a_single_process_model(tmp_path, layout):
    """A checkpoint of the model itself, or of the training CLI's wrapper with sharded central tensors."""
    extra = ["--trainer-layout", "--shard-central"] if layout == "trainer_sharded" else []
    ranks = run_two_ranks(WORKER, ["--steps", "2", *extra], tmp_path / "result")
    r0 = ranks[0]
    assert r0["logits"] == ranks[1]["logits"]  # every rank sees the full eval batch
    assert r0["expert_moved"] > 0  # training changed the experts
    assert {f"layer_{l}_expert_{g}_mp_rank_00_model_states.pt" for l in range(2) for g in range(4)} <= set(
        r0["checkpoint_files"])
    expected = torch.tensor(r0["logits"])
    batch = {k: torch.tensor(v) for k, v in r0["inputs"].items()}  # the worker's fixed eval batch

    def build() -> torch.nn.Module:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**r0["bert"]))
        convert_model(model, MoEConfig(**{**r0["moe"], "ep_size": 1, "shard_central": False}))
        return model

    exported = export_deepspeed_checkpoint(r0["checkpoint"], r0["tag"], build, tmp_path / "mpo", "mpo")
    model = load_converted(exported)
    assert max_diff(outputs(model, batch), expected) < 1e-5
    # each global expert came from the rank that owned it
    sums = {**ranks[0]["expert_sums"], **ranks[1]["expert_sums"]}
    for layer_id, (_, layer) in enumerate(moe_layers(model)):
        for g, expert in enumerate(layer.experts.deepspeed_experts):
            total = float(sum(p.detach().double().sum() for p in expert.parameters()))
            assert total == pytest.approx(sums[f"{layer_id}.{g}"], abs=1e-9)

    # the command line: config folder + MoE config file, tag from 'latest', merged mode
    assert main(["--checkpoint", r0["checkpoint"], "--out", str(tmp_path / "merged"), "--model",
                 str(tmp_path / "hf_config"), "--moe-config", str(tmp_path / "moe.json")]) == 0
    merged = load_converted(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / MPOMOE_CONFIG_NAME).read_text())["mode"] == "merged"
    assert max_diff(outputs(merged, batch), expected) < 1e-5

    # a checkpoint missing an expert file, or a builder that does not match, fails clearly
    broken = tmp_path / "broken"
    shutil.copytree(r0["checkpoint"], broken)
    (broken / r0["tag"] / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_1_expert_2.*4 experts"):
        export_deepspeed_checkpoint(broken, r0["tag"], build, tmp_path / "x", "mpo")

    def one_layer() -> torch.nn.Module:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**r0["bert"]))
        convert_model(model, MoEConfig(**{**r0["moe"], "ep_size": 1, "shard_central": False, "layers": [1]}))
        return model

    with pytest.raises(ValueError, match="not the checkpoint's|more MoE layers"):
        export_deepspeed_checkpoint(r0["checkpoint"], r0["tag"], one_layer, tmp_path / "y", "mpo")
    assert not (tmp_path / "y" / WEIGHTS_NAME).exists()
