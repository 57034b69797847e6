"""The MPOE layer in one process: upcycling exactness, an independent routing reference, masks, params."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
from mpomoe_ds.moe.params import classify_parameters, optimizer_param_groups, parameter_report
from mpomoe_ds.training.engine import DeepSpeedConfigError, validate_ds_config

from conftest import minilm_and_batch

HIDDEN, FFN = 32, 64


def random_dense(seed: int = 0, hidden: int = HIDDEN, ffn: int = FFN) -> DenseFFN:
    gen = torch.Generator().manual_seed(seed)
    return DenseFFN(up_weight=torch.randn(hidden, ffn, generator=gen) * 0.3,
                    up_bias=torch.randn(ffn, generator=gen) * 0.1,
                    down_weight=torch.randn(ffn, hidden, generator=gen) * 0.3,
                    down_bias=torch.randn(hidden, generator=gen) * 0.1)


def dense_ffn(x: torch.Tensor, d: DenseFFN) -> torch.Tensor:
    return F.gelu(x @ d.up_weight + d.up_bias) @ d.down_weight + d.down_bias


# ----------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("expert_type", ["mpo", "ffn"])
def test_upcycled_layer_equals_dense_ffn(k, expert_type):
    dense = random_dense()
    layer = MPOEMoE.from_dense(dense, MoEConfig(num_experts=4, k=k, expert_type=expert_type, expert_init="copy",
                                                layers="all"))
    x = torch.randn(3, 7, HIDDEN)
    out, aux, counts = layer(x)
    assert out.shape == x.shape
    assert (out - dense_ffn(x, dense)).abs().max() < 1e-5
    assert int(counts.sum()) == 3 * 7 * k
    assert 0.0 < aux.item() <= 4.0  # E * sum f_e P_e lies in (0, E]


def test_upcycled_layer_equals_real_minilm_ffn():
    model, batch = minilm_and_batch(["The cat sat on the mat.", "Experts share one central tensor in MPOE layers."])
    for index in (0, 3, 5):
        block = model.encoder.layer[index]
        seen = {}

        def capture(module, inputs, output, seen=seen):
            seen["x"] = inputs[0]  # returns None: the hook must not replace the output

        handle = block.intermediate.register_forward_hook(capture)
        with torch.no_grad():
            model(**batch)
        handle.remove()
        x = seen["x"]  # the real post-attention hidden states this FFN sees
        dense = DenseFFN(up_weight=block.intermediate.dense.weight.detach().T,
                         up_bias=block.intermediate.dense.bias.detach(),
                         down_weight=block.output.dense.weight.detach().T,
                         down_bias=block.output.dense.bias.detach())
        layer = MPOEMoE.from_dense(dense, MoEConfig(num_experts=4, k=1, expert_init="copy", layers="all"))
        with torch.no_grad():
            expected = block.output.dense(block.intermediate(x))
            out, _, _ = layer(x)
        # 1e-5 absolute, scaled where outputs exceed 10: layer 0 has an outlier channel of
        # magnitude ~194 where one fp32 ulp alone is 1.5e-5 (fp64 reconstruction gives the same).
        tolerance = 1e-5 * max(1.0, expected.abs().max().item() / 10)
        assert (out - expected).abs().max() < tolerance, (index, expected.abs().max().item())


# ----------------------------------------------------------------------------- independent reference


def naive_reconstruct(cores: list[torch.Tensor]) -> torch.Tensor:
    """Contract cores left to right with one einsum: independent of mpo.reconstruct's plan."""
    n = len(cores)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(n + 1)]
    ins = [next(letters) for _ in range(n)]
    outs = [next(letters) for _ in range(n)]
    spec = ",".join(f"{bonds[k]}{ins[k]}{outs[k]}{bonds[k + 1]}" for k in range(n))
    full = torch.einsum(f"{spec}->{bonds[0]}{''.join(ins)}{''.join(outs)}{bonds[n]}", *cores)
    rows = math.prod(c.shape[1] for c in cores)
    return full.reshape(rows, -1)


def reference_forward(layer: MPOEMoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Route by hand, run each chosen expert's reconstructed dense FFN token by token."""
    cfg = layer.config
    probs = torch.softmax(x_TD @ layer.deepspeed_moe.gate.wg.weight.T, dim=-1)
    top = torch.topk(probs, cfg.k, dim=-1).indices
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    dense = []
    for e in experts:
        w = {}
        for m in ("up", "down"):
            cores = list(e.aux_cores(m))
            cores.insert(layer.mpo_config.num_cores // 2, layer.central[m])
            w[m] = naive_reconstruct(cores)
        dense.append(w)
    capacity = None
    if not cfg.dropless:
        capacity = max(math.ceil(cfg.k * x_TD.shape[0] / cfg.num_experts * cfg.capacity_factor), cfg.min_capacity)
    used = [0] * cfg.num_experts
    kept = torch.zeros_like(top, dtype=torch.bool)
    for j in range(cfg.k):  # "position" policy: first choices first, then token order
        for t in range(x_TD.shape[0]):
            e = int(top[t, j])
            if capacity is None or used[e] < capacity:
                used[e] += 1
                kept[t, j] = True
    rows = []
    for t in range(x_TD.shape[0]):
        chosen = probs[t, top[t]]
        weights = chosen / chosen.sum().detach()  # straight-through weighting
        y = torch.zeros(x_TD.shape[1])
        for j in range(cfg.k):
            if kept[t, j]:
                e = experts[int(top[t, j])]
                w = dense[int(top[t, j])]
                h = F.gelu(x_TD[t] @ w["up"] + e.up_bias)
                y = y + weights[j] * (h @ w["down"] + e.down_bias)
        rows.append(y)
    counts = torch.bincount(top.reshape(-1), minlength=cfg.num_experts).float()
    aux = cfg.num_experts * torch.sum(counts / top.numel() * probs.mean(0))
    return torch.stack(rows), aux


@pytest.mark.parametrize("dropless,k", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_forward_and_backward_match_hand_routed_reference(dropless, k):
    cfg = MoEConfig(num_experts=4, k=k, dropless=dropless, capacity_factor=0.75, min_capacity=1,
                    expert_init="perturb", init_noise=0.3, seed=3, layers="all")
    layer = MPOEMoE.from_dense(random_dense(1), cfg)
    with torch.no_grad():  # a sharper router so routing is uneven and capacity drops happen
        layer.deepspeed_moe.gate.wg.weight.mul_(50)
    x = torch.randn(24, HIDDEN, requires_grad=True)
    out, aux, _ = layer(x)
    ref_out, ref_aux = reference_forward(layer, x)
    assert (out - ref_out).abs().max() < 1e-5
    assert abs(aux.item() - ref_aux.item()) < 1e-6
    if not dropless:
        assert (out.abs().sum(-1) == 0).any() or k == 2  # some top-1 tokens were dropped
    target = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad(((out - target) ** 2).sum() + aux, params)
    ref_grads = torch.autograd.grad(((ref_out - target) ** 2).sum() + ref_aux, params, allow_unused=True)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        r = torch.zeros_like(g) if r is None else r
        assert (g - r).abs().max() < 1e-4 * (1 + r.abs().max()), name


def test_perturbed_experts_differ_and_are_seeded_by_global_id():
    cfg = MoEConfig(num_experts=4, expert_init="perturb", init_noise=0.1, layers="all")
    a = MPOEMoE.from_dense(random_dense(), cfg)
    b = MPOEMoE.from_dense(random_dense(), cfg)
    wa, wb = a.expert_weights(), b.expert_weights()
    assert torch.equal(wa["up"], wb["up"])  # deterministic
    assert (wa["up"][0] - wa["up"][1]).abs().max() > 1e-3  # experts differ


# ----------------------------------------------------------------------------- gradient mask


def central_grads(layer: MPOEMoE, step: int) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    layer.begin_step(step)
    out, _, _ = layer(torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(step)))
    out.pow(2).sum().backward()
    layer.end_step()
    return {m: layer.central[m].grad.clone() for m in ("up", "down")}


@pytest.mark.parametrize("keep_prob", [0.3, 0.8])
def test_gradient_mask_zeroes_one_minus_p_fresh_each_step(keep_prob):
    layer = MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=4, central_grad_keep_prob=keep_prob,
                                                         expert_init="copy", layers="all"))
    unmasked = MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=4, expert_init="copy", layers="all"))
    g0, g0_again, g1 = central_grads(layer, 0), central_grads(layer, 0), central_grads(layer, 1)
    full = central_grads(unmasked, 0)
    for m in ("up", "down"):
        zeroed = (g0[m] == 0).float().mean().item()
        n = g0[m].numel()
        assert abs(zeroed - (1 - keep_prob)) < 4 * math.sqrt(keep_prob * (1 - keep_prob) / n) + 1e-3
        assert torch.equal(g0[m] == 0, g0_again[m] == 0)  # same step, same mask
        assert not torch.equal(g0[m] == 0, g1[m] == 0)  # next step, fresh mask
        kept = g0[m] != 0
        assert torch.allclose(g0[m][kept], full[m][kept])  # kept entries untouched (no rescale)


def test_gradient_mask_rescale_divides_kept_entries_by_p():
    cfg = MoEConfig(num_experts=4, central_grad_keep_prob=0.5, central_grad_rescale=True, expert_init="copy",
                    layers="all")
    masked = central_grads(MPOEMoE.from_dense(random_dense(), cfg), 0)
    full = central_grads(MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=4, expert_init="copy",
                                                                      layers="all")), 0)
    kept = masked["up"] != 0
    assert torch.allclose(masked["up"][kept], full["up"][kept] / 0.5)


def test_keep_prob_zero_freezes_central_and_trains_auxiliaries():
    layer = MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=4, central_grad_keep_prob=0.0,
                                                         expert_init="copy", layers="all"))
    assert not any(p.requires_grad for p in layer.central.values())
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad()
        out, aux, _ = layer(torch.randn(16, HIDDEN))
        (out.pow(2).sum() + aux).backward()
        opt.step()
    for n, p in layer.named_parameters():
        if n.startswith("central."):
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in layer.named_parameters() if "aux" in n)


# ----------------------------------------------------------------------------- parameters


def test_parameter_classification_and_optimizer_groups():
    layer = MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=4, expert_init="copy", layers="all"))
    kinds = classify_parameters(layer)
    assert kinds["central.up"] == kinds["central.down"] == "central"
    assert kinds["deepspeed_moe.gate.wg.weight"] == "dense"
    assert kinds["deepspeed_moe.experts.deepspeed_experts.3.up_aux.0"] == "expert"
    assert all(("expert" in n) == (k == "expert") for n, k in kinds.items())  # DeepSpeed's key contract
    groups = optimizer_param_groups(layer, weight_decay=0.01)
    assert all("name" in g for g in groups)
    moe_groups = [g for g in groups if g.get("moe")]
    assert sum(len(g["params"]) for g in moe_groups) == sum(k == "expert" for k in kinds.values())
    assert sum(len(g["params"]) for g in groups) == len(kinds)


def test_parameter_report_gpt2_widths_sixteen_experts_is_over_6_5x_smaller():
    dense = DenseFFN.random(768, 3072, seed=0)
    mpo = parameter_report(MPOEMoE.from_dense(dense, MoEConfig(num_experts=16, expert_init="copy", layers="all")))
    ffn = parameter_report(MPOEMoE.from_dense(dense, MoEConfig(num_experts=16, expert_type="ffn",
                                                               expert_init="copy", layers="all")))
    assert ffn.expert_side_global == 16 * (2 * 768 * 3072 + 768 + 3072)
    assert mpo.central_local == 2 * 768 * 3072  # lossless: the central core holds I*J for these factors
    ratio = ffn.expert_side_global / mpo.expert_side_global
    assert ratio >= 6.5, ratio


# ----------------------------------------------------------------------------- errors


def test_bad_configurations_fail_early_with_the_fix():
    with pytest.raises(ConfigError, match="not divisible by ep_size=3"):
        MoEConfig(num_experts=4, ep_size=3, expert_init="copy", layers="all")
    with pytest.raises(ConfigError, match="moe.k"):
        MoEConfig(num_experts=4, k=5, expert_init="copy", layers="all")
    with pytest.raises(ConfigError, match="moe.shard_central.*no central tensor"):
        MoEConfig(num_experts=4, expert_type="ffn", shard_central=True, expert_init="copy", layers="all")
    with pytest.raises(ValueError, match="cannot split dim 30"):
        MPOEMoE(30, 64, MoEConfig(num_experts=2, expert_init="copy", layers="all"))
    layer = MPOEMoE.from_dense(random_dense(), MoEConfig(num_experts=2, expert_init="copy", layers="all"))
    with pytest.raises(DeepSpeedConfigError, match="ZeRO stage 3"):
        validate_ds_config({"zero_optimization": {"stage": 3}}, layer)
    validate_ds_config({"zero_optimization": {"stage": 2}}, layer)


def test_shard_central_in_one_process_is_the_replicated_layer():
    """ep_size 1: nothing to shard, the layer and its state dict are the ordinary ones."""
    dense = random_dense()
    plain = MPOEMoE.from_dense(dense, MoEConfig(num_experts=2, expert_init="copy", layers="all"))
    sharded = MPOEMoE.from_dense(dense, MoEConfig(num_experts=2, shard_central=True, expert_init="copy", layers="all"))
    assert not sharded.central.sharded
    assert {k: v.shape for k, v in sharded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    x = torch.randn(5, HIDDEN)
    assert torch.equal(sharded(x)[0], plain(x)[0])


EP_WITHOUT_DISTRIBUTED = """
import torch
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
dense = DenseFFN.random(32, 128, seed=0)
try:
    MPOEMoE.from_dense(dense, MoEConfig(num_experts=4, expert_init="copy", layers="all", ep_size=2))
except RuntimeError as err:
    print("ERROR:", err)
"""


def test_expert_parallel_layer_without_distributed_names_the_fix():
    # A fresh interpreter: in-process training tests leave torch.distributed initialised (world 1) behind.
    import subprocess
    import sys

    from conftest import ROOT, dist_env

    proc = subprocess.run([sys.executable, "-c", EP_WITHOUT_DISTRIBUTED], cwd=ROOT, env=dist_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: ep_size=2 needs torch.distributed: call deepspeed.init_distributed()" in proc.stdout
