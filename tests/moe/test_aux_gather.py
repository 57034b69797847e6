"""moe.dispatch aux_gather: real ranks vs a single-process reference, the cost model, config errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.dispatch_cost import DispatchWorkload

from conftest import ROOT, TINY_DS, dist_env, free_port, run_two_ranks, tiny_run_config

WORKER = ROOT / "tests" / "dist" / "moe_worker.py"
# fp32 throughout; the reference sums the same terms in another order (roundoff only).
GRAD_TOL = 1e-6
LOSS_TOL = 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,zero,accumulation,keep,aux_keep", [
    (2, 0, 1, 0.5, 1.0), (2, 2, 3, 0.5, 0.5), (4, 0, 2, 1.0, 0.5), (4, 2, 2, 0.5, 0.5)])
def test_aux_gather_training_equals_single_process(tmp_path, nproc, zero, accumulation, keep, aux_keep):
    args = ["--dispatch", "aux_gather", "--ep-size", "2", "--zero", str(zero), "--accumulation", str(accumulation),
            "--keep-prob", str(keep), "--aux-keep-prob", str(aux_keep), "--steps", "5"]
    ranks = run_two_ranks(WORKER, args, tmp_path / "result", nproc=nproc)
    for r in ranks:
        # loss and every gradient each step (dense after all-reduce, experts on their owner), parameters after 5
        assert len(r["loss_diff"]) == 5
        assert max(r["loss_diff"]) < LOSS_TOL, r["loss_diff"]
        assert max(r["grad_diff"]) < GRAD_TOL, r["grad_diff"]
        assert r["param_diff"] < GRAD_TOL
        assert r["aux_moved"] > 0 and r["replicated_bit_identical"]
        # ownership unchanged: each expert on one rank of its expert-parallel group, checkpoints round-trip
        owners = r["expert_owners"]
        assert owners[:2] == [[0, 1], [2, 3]] and owners == owners[:2] * (nproc // 2)
        assert r["checkpoint_diff_before_load"] > 0.1 and r["checkpoint_diff_after_load"] == 0.0
        if keep < 1.0:
            assert r["mask_violations"] == 0
        for traffic in r["traffic"]:
            # no token all-to-all; cores and biases gathered once per step, whatever the accumulation
            assert "all_to_all" not in traffic and "all_reduce" not in traffic
            assert traffic["all_gather"] == r["expected_gather_bytes"]
            # the adjoint, a reduce-scatter (an all-to-all of blocks on gloo), sends what the gather sent
            assert traffic["reduce_scatter"] == traffic["all_gather"]


@pytest.mark.distributed
def test_token_dispatch_with_accumulation_still_equals_single_process(tmp_path):
    """The worker's accumulation path, on token dispatch (the baseline the aux_gather runs are compared to)."""
    ranks = run_two_ranks(WORKER, ["--zero", "2", "--accumulation", "2", "--steps", "3"], tmp_path / "result")
    for r in ranks:
        assert max(r["loss_diff"]) < LOSS_TOL and max(r["grad_diff"]) < GRAD_TOL and r["param_diff"] < GRAD_TOL
        assert all(t["all_to_all"] > 0 for t in r["traffic"])


def test_aux_gather_at_one_rank_computes_what_token_dispatch_computes():
    from mpomoe_ds.moe.layer import MPOEMoE

    base = MoEConfig(num_experts=4, ep_size=1, k=2, init_noise=0.2)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for mode in ("tokens", "aux_gather"):
        layer = MPOEMoE(32, 64, dataclasses.replace(base, dispatch=mode))
        y, aux, _ = layer(x)
        (y.square().sum() + aux).backward()
        results.append((y.detach(), {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    (y_tok, g_tok), (y_aux, g_aux) = results
    assert torch.equal(y_tok, y_aux)
    assert g_tok.keys() == g_aux.keys() and all(torch.equal(g_tok[n], g_aux[n]) for n in g_tok)


def test_config_refuses_aux_gather_for_plain_experts_and_unknown_modes():
    with pytest.raises(ConfigError, match="expert_type: mpo"):
        MoEConfig(dispatch="aux_gather", expert_type="ffn")
    with pytest.raises(ConfigError, match="choose one of"):
        MoEConfig(dispatch="tokenz")
    with pytest.raises(ConfigError, match="positive"):
        MoEConfig(link_gbps=0.0)
    assert MoEConfig().dispatch == "tokens"


def test_config_refuses_segments_with_aux_gather_naming_the_fix():
    with pytest.raises(ConfigError, match="moe.dropless_impl.*aux_gather.*dropless_impl: padded"):
        MoEConfig(dispatch="aux_gather", dropless_impl="segments")
    # token dispatch, and auto (which may pick tokens), keep segments
    assert MoEConfig(dispatch="tokens", dropless_impl="segments").dropless_impl == "segments"
    assert MoEConfig(dispatch="auto", dropless_impl="segments").dispatch == "auto"


@pytest.mark.parametrize("mode", ["aux_gather", "auto"])
def test_omoe_with_aux_gather_is_refused_before_training_naming_the_fix(mode):
    # the README promises this refusal: OMoE projects per expert from inputs only its owner sees under tokens
    from types import SimpleNamespace

    from mpomoe_ds.training.preflight import check_dispatch

    with pytest.raises(ConfigError, match="moe.dispatch: tokens or omoe.enabled: false"):
        check_dispatch(SimpleNamespace(omoe=SimpleNamespace(enabled=True), moe=MoEConfig(dispatch=mode)))
    check_dispatch(SimpleNamespace(omoe=SimpleNamespace(enabled=True), moe=MoEConfig(dispatch="tokens")))
    check_dispatch(SimpleNamespace(omoe=SimpleNamespace(enabled=False), moe=MoEConfig(dispatch=mode)))


def test_aux_gather_layer_refuses_expert_hooks_in_the_python_api():
    from mpomoe_ds.moe.layer import MPOEMoE

    layer = MPOEMoE(32, 64, MoEConfig(num_experts=4, ep_size=1, dispatch="aux_gather"))
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    layer(x)  # without hooks it runs
    layer.begin_step(0, hooks=object())  # any hook set: the refusal does not depend on its kind
    with pytest.raises(RuntimeError, match="use moe.dispatch: tokens with omoe"):
        layer(x)
    layer.end_step()
    layer(x)


def gpt2_workload(**overrides) -> DispatchWorkload:
    """The issue's example: GPT-2 width, 8 experts, 8192 tokens per rank, k=1, fp32."""
    values = dict(tokens_per_rank=8192, hidden_size=768, k=1, accumulation=4, dtype_bytes=4,
                  aux_per_expert=373_000, bias_per_expert=3072 + 768, num_experts=8, ep_size=8,
                  reconstruction_flops_per_expert=2 * 2.8e9, link_gbps=25.0, device_tflops=100.0)
    values.update(overrides)
    return DispatchWorkload(**values)


def test_cost_model_counts_the_bytes_each_collective_sends():
    w = gpt2_workload()
    # tokens: 4 all-to-alls per micro-batch, 7/8 of each leaves the rank; 4 micro-batches
    assert w.token_bytes() == pytest.approx(4 * 4 * 8192 * 768 * 4 * 7 / 8)
    # aux: all-gather + reduce-scatter of 8 experts' cores and biases, once per step whatever the accumulation
    assert w.aux_bytes() == pytest.approx(2 * 8 * (373_000 + 3840) * 4 * 7 / 8)
    assert gpt2_workload(accumulation=1).aux_bytes() == w.aux_bytes()
    assert w.token_bytes() / w.aux_bytes() > 10
    assert w.extra_reconstruction_flops() == pytest.approx(3 * 7 * 2 * 2.8e9)


def test_auto_picks_the_cheaper_mode():
    assert gpt2_workload().choice() == "aux_gather"  # 25 GB/s, 100 TFLOP/s: bytes dominate
    slow_compute = gpt2_workload(device_tflops=0.01, link_gbps=900.0)
    assert slow_compute.aux_seconds() > slow_compute.token_seconds() and slow_compute.choice() == "tokens"
    assert gpt2_workload(ep_size=1).choice() == "tokens"  # nothing moves at one rank


def test_auto_resolves_in_the_first_forward_from_the_layer_shapes():
    from mpomoe_ds.moe.layer import MPOEMoE

    layer = MPOEMoE(32, 64, MoEConfig(num_experts=4, ep_size=1, dispatch="auto"))
    assert layer.dispatch == "auto"
    layer(torch.randn(2, 3, 32))
    assert layer.dispatch == "tokens"  # one rank: token dispatch moves nothing either
    workload = layer.dispatch_workload(6)
    expert = layer.experts.deepspeed_experts[0]
    assert workload.aux_per_expert + workload.bias_per_expert == sum(p.numel() for p in expert.parameters())
    assert workload.reconstruction_flops_per_expert == 2 * layer.reconstruction_macs() / 4


@pytest.mark.distributed
def test_cli_trains_and_resumes_with_aux_gather_on_two_ranks(tmp_path):
    import subprocess
    import sys

    import yaml

    out = tmp_path / "run"
    config = tiny_run_config(out, max_steps=4, save_every=2, diversity_tokens=0)
    config["moe"]["dispatch"] = "aux_gather"
    run_path, ds_path = tmp_path / "run.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(config))
    ds_path.write_text(json.dumps({**TINY_DS, "gradient_accumulation_steps": 2}))

    def launch(*extra: str) -> str:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "mpomoe_ds.cli.train", "--config", str(run_path),
               "--deepspeed_config", str(ds_path), *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        return proc.stdout + proc.stderr

    launch("train.max_steps=2")
    resumed = launch("--resume")
    assert "resumed from" in resumed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["ep_size"] == 2
    assert torch.isfinite(torch.tensor(metrics["train_loss_last"]))
    assert (out / "checkpoints" / "step4" / "layer_0_expert_3_mp_rank_00_model_states.pt").is_file()
