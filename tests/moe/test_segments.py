"""Dropless dispatch without padding (moe.dropless_impl: segments), one process.

References: a per-segment loop of plain matmuls for the grouped matmul, a
naive Python regrouping for the block swap, and a per-token loop over each
token's routes (the experts' reconstructed weights, no dispatch at all) for
the layer. fp32; differences are summation-order roundoff.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.experts import activation_function
from mpomoe_ds.moe.grouped import grouped_linear, grouped_mm, grouped_mm_available, pad_segments
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.moe.token_dispatcher import SegmentDispatcher, TokenDispatcher, _block_major_swap
from mpomoe_ds.mpo.config import MPOConfig

from conftest import ROOT, run_two_ranks

TOL = 1e-5


def loop_reference(x_RI: torch.Tensor, w_LIO: torch.Tensor, segments: list[int]) -> torch.Tensor:
    return torch.cat([x_RI[s - n:s] @ w_LIO[l] for l, (n, s) in
                      enumerate(zip(segments, torch.cumsum(torch.tensor(segments), 0).tolist()))])


@pytest.mark.parametrize("dtype,width,tol", [(torch.float32, 16, 1e-5), (torch.bfloat16, 16, 5e-2),
                                             (torch.float32, 6, 1e-5)])
def test_grouped_mm_equals_per_segment_matmuls_with_gradients(dtype, width, tol):
    gen = torch.Generator().manual_seed(0)
    segments = [3, 0, 5, 1]  # an empty segment included
    x = torch.randn(9, width, generator=gen)
    w = torch.randn(4, width, 8, generator=gen)
    g = torch.randn(9, 8, generator=gen)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    loop_reference(x_ref, w_ref, segments).backward(g)
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    # width 6 floats = 24 bytes per row: not 16-byte aligned, so the loop fallback runs
    assert grouped_mm_available(xs, ws) == (width * xs.element_size() % 16 == 0)
    y = grouped_mm(xs, ws, torch.tensor(segments))
    y.backward(g.to(dtype))
    assert y.shape == (9, 8)
    ref = loop_reference(x, w, segments)
    assert (y.float() - ref).abs().max() < tol * ref.abs().max()
    assert (xs.grad.float() - x_ref.grad).abs().max() < tol * x_ref.grad.abs().max()
    assert (ws.grad.float() - w_ref.grad).abs().max() < tol * w_ref.grad.abs().max()
    assert torch.all(ws.grad[1] == 0)  # the empty segment's weight gets no gradient


def test_grouped_linear_adds_each_segments_bias():
    x, w, b = torch.randn(5, 16), torch.randn(2, 16, 4), torch.randn(2, 4)
    y = grouped_linear(x, w, b, torch.tensor([2, 3]))
    assert torch.allclose(y[:2], x[:2] @ w[0] + b[0], atol=TOL)
    assert torch.allclose(y[2:], x[2:] @ w[1] + b[1], atol=TOL)


def test_block_major_swap_and_pad_segments_match_a_naive_regrouping():
    counts_PL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rows from source p for local expert l
    rows, start = {}, 0
    for p in range(2):
        for l in range(3):
            rows[p, l] = list(range(start, start + int(counts_PL[p, l])))
            start += int(counts_PL[p, l])
    naive = [r for l in range(3) for p in range(2) for r in rows[p, l]]
    assert _block_major_swap(counts_PL).tolist() == naive
    x = torch.arange(7.0).unsqueeze(1)
    padded, valid = pad_segments(x, counts_PL.sum(0))
    assert valid.tolist() == [[True, True, True], [True, True, True], [True, False, False]]
    assert padded[:, :, 0].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 0.0, 0.0]]


def test_segments_need_dropless():
    with pytest.raises(ConfigError, match="dropless_impl"):
        MoEConfig(dropless=False, dropless_impl="segments")
    with pytest.raises(ConfigError, match="padded"):
        MoEConfig(dropless_impl="ragged")
    assert MoEConfig().dropless_impl == "padded"  # the default run keeps today's padded dispatch


def per_token_reference(layer: MPOEMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Each token through each of its experts, weighted: no slots, no dispatch."""
    experts = layer.deepspeed_moe.experts
    weights, biases = layer.expert_weights(), experts.biases()
    act = activation_function(layer.config.activation)
    routing = layer.deepspeed_moe.gate(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        out = 0
        for k in range(layer.config.k):
            e = int(routing.experts_TK[t, k])
            x = x_TD[t]
            h = act(x @ weights["up"][e] + biases["up"][e])
            if experts.is_gated:
                h = act(x @ weights["gate"][e] + biases["gate"][e]) * (x @ weights["up"][e] + biases["up"][e])
            out = out + routing.weights_TK[t, k] * (h @ weights["down"][e] + biases["down"][e])
        rows.append(out)
    return torch.stack(rows)


def forward_backward(layer: MPOEMoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = x.clone().requires_grad_()
    y, aux, _ = layer(x)
    (y.pow(2).sum() + aux).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("expert_type,gated,k", [("mpo", False, 2), ("ffn", False, 1), ("mpo", True, 2),
                                                 ("ffn", True, 2)])
def test_segments_equal_padded_and_a_per_token_reference(expert_type, gated, k):
    cfg = MoEConfig(num_experts=4, ep_size=1, k=k, expert_type=expert_type, gated=gated, init_noise=0.3,
                    activation="silu" if gated else "gelu", gate_weighting="softmax")
    padded = MPOEMoE(32, 64, cfg, MPOConfig())
    segments = MPOEMoE(32, 64, dataclasses.replace(cfg, dropless_impl="segments"), MPOConfig())
    assert type(padded.deepspeed_moe.dispatcher) is TokenDispatcher
    assert isinstance(segments.deepspeed_moe.dispatcher, SegmentDispatcher)
    seen = []
    segments.deepspeed_moe.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    y_p, gx_p, grads_p = forward_backward(padded, x)
    y_s, gx_s, grads_s = forward_backward(segments, x)
    assert seen == [2 * 9 * k]  # computed rows = routed tokens, no padding
    assert grads_p.keys() == grads_s.keys() and len(grads_s) > 4
    assert (y_p - y_s).abs().max() < TOL
    assert (gx_p - gx_s).abs().max() < TOL
    for name in grads_p:
        assert (grads_p[name] - grads_s[name]).abs().max() < TOL, name
    with torch.no_grad():
        ref = per_token_reference(segments, x.reshape(-1, 32))
    assert ref.abs().max() > 1e-3
    assert (y_s.reshape(-1, 32) - ref).abs().max() < TOL


def test_gradient_accumulation_with_per_step_reconstruction_equals_padded():
    """Two micro-batches, MPO experts rebuilt once per step (the MoE step protocol), gated experts, k = 2."""
    cfg = MoEConfig(num_experts=4, ep_size=1, k=2, gated=True, activation="silu", init_noise=0.3)
    grads = {}
    for impl in ("padded", "segments"):
        layer = MPOEMoE(32, 64, dataclasses.replace(cfg, dropless_impl=impl), MPOConfig())
        step = MoEStep(layer)
        step.begin_step(0)
        for micro in range(2):
            step.begin_micro_batch(micro, is_last=micro == 1)
            x = torch.randn(24, 32, generator=torch.Generator().manual_seed(micro))
            *_, grads[impl] = forward_backward(layer, x)  # .grad tensors: the sum over both micro-batches
        step.end_step(0)
    aux = [n for n in grads["padded"] if "aux" in n]
    assert aux and all(grads["padded"][n].abs().max() > 0 for n in aux)
    for name in grads["padded"]:
        assert (grads["padded"][name] - grads["segments"][name]).abs().max() < TOL, name


class RecordingHooks:
    """Expert hooks that keep what they observe (the protocol the orthogonal optimizer implements)."""

    observing = True

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def transform_weight(self, experts, matrix, weight_LIO):
        return weight_LIO

    def observe_inputs(self, experts, matrix, inputs_LSI, valid_LS):
        self.sums[matrix] = torch.einsum("lsi,ls->li", inputs_LSI.float(), valid_LS.float())


def test_expert_hooks_observe_the_same_per_expert_inputs():
    cfg = MoEConfig(num_experts=4, ep_size=1, k=2, init_noise=0.3)
    recorded = []
    for impl in ("padded", "segments"):
        layer = MPOEMoE(32, 64, dataclasses.replace(cfg, dropless_impl=impl), MPOConfig())
        hooks = RecordingHooks()
        layer.begin_step(0, hooks)
        forward_backward(layer, torch.randn(16, 32, generator=torch.Generator().manual_seed(2)))
        recorded.append(hooks.sums)
    assert recorded[0].keys() == recorded[1].keys() == {"up", "down"}
    for m in ("up", "down"):
        assert recorded[0][m].abs().max() > 0
        assert (recorded[0][m] - recorded[1][m]).abs().max() < TOL


WORKER = ROOT / "tests" / "dist" / "segments_worker.py"


@pytest.mark.distributed
@pytest.mark.parametrize("zero,expert_type,gated", [(0, "mpo", False), (2, "mpo", True), (2, "ffn", False),
                                                    (0, "ffn", True)])
def test_two_rank_segments_equal_padded_and_single_process(tmp_path, zero, expert_type, gated):
    """ep 2 on 2 real ranks, gradient accumulation 2: loss, accumulated gradients, parameters after 3 steps."""
    args = ["--zero", str(zero), "--expert-type", expert_type, "--steps", "3", "--grad-accum", "2"]
    ranks = run_two_ranks(WORKER, args + (["--gated"] if gated else []), tmp_path / "result")
    for r in ranks:
        for impl in ("padded", "segments"):
            assert len(r["loss_diff"][impl]) == 6 and max(r["loss_diff"][impl]) < 1e-5, r["loss_diff"]
            assert len(r["grad_diff"][impl]) == 3 and max(r["grad_diff"][impl]) < 1e-6, r["grad_diff"]
            assert r["param_diff"][impl] < 1e-6
        assert max(r["segments_vs_padded_grad"]) < 1e-6 and r["num_grads"] > 6
        assert r["params_moved"] > 1e-3  # the comparison is over trained parameters
        # computed rows: exactly the routes to this rank's experts without padding, more with it
        assert r["rows"]["segments"] == r["routed_rows"]
        assert all(p > s for p, s in zip(r["rows"]["padded"], r["rows"]["segments"]))
