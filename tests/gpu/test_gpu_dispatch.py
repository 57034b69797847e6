"""On one CUDA GPU (``-m gpu``, run by scripts/gpu_check.sh): dropless dispatch without padding.

The CPU suite checks ``torch._grouped_mm`` and the segment dispatch on CPU
(tests/moe/test_segments.py); on CUDA only bfloat16 takes ``_grouped_mm``
(CUTLASS, sm90+) and float32 falls back to the per-segment loop. Here both
run on the GPU against an fp32 per-segment reference, and the MoE layer's
segment dispatch against its padded dispatch on the same weights, forward
and backward, MPO and plain experts. Tolerances are bf16's (8 mantissa bits)
relative to each tensor's largest entry.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.grouped import grouped_mm, grouped_mm_available
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.mpo.config import MPOConfig

BF16_TOL = 3e-2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def grouped_mm_case(device: str, dtype: torch.dtype) -> dict[str, float]:
    """grouped_mm on ``device`` in ``dtype`` vs an fp32 CPU loop: relative errors of y, dx, dW."""
    gen = torch.Generator().manual_seed(0)
    segments = [40, 0, 72, 16]  # an empty segment included; 128 rows
    x, w = torch.randn(128, 64, generator=gen), torch.randn(4, 64, 32, generator=gen)
    g = torch.randn(128, 32, generator=gen)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.cat([part @ w_ref[l] for l, part in enumerate(x_ref.split(segments))]).backward(g)
    y_ref = torch.cat([part @ w[l] for l, part in enumerate(x.split(segments))])
    xs = x.to(device, dtype).requires_grad_()
    ws = w.to(device, dtype).requires_grad_()
    y = grouped_mm(xs, ws, torch.tensor(segments))
    y.backward(g.to(device, dtype))
    assert y.device.type == torch.device(device).type and y.dtype == dtype
    assert torch.all(ws.grad[1] == 0)  # the empty segment's weight gets no gradient
    return {"y": relative_error(y.cpu(), y_ref), "dx": relative_error(xs.grad.cpu(), x_ref.grad),
            "dw": relative_error(ws.grad.cpu(), w_ref.grad)}


def layer_case(device: str, dtype: torch.dtype, expert_type: str) -> dict[str, float]:
    """Segment vs padded dropless dispatch of one MoE layer on ``device``: worst relative error per quantity."""
    cfg = MoEConfig(num_experts=4, ep_size=1, k=2, expert_type=expert_type, init_noise=0.3)
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("padded", "segments"):
        layer = MPOEMoE(64, 128, dataclasses.replace(cfg, dropless_impl=impl), MPOConfig()).to(device, dtype)
        xs = x.to(device, dtype).requires_grad_()
        y, aux, _ = layer(xs)
        (y.float().pow(2).sum() + aux.float()).backward()
        grads = {n: p.grad.cpu() for n, p in layer.named_parameters() if p.grad is not None}
        results[impl] = (y.detach().cpu(), xs.grad.cpu(), grads)
    (y_p, gx_p, g_p), (y_s, gx_s, g_s) = results["padded"], results["segments"]
    assert g_p.keys() == g_s.keys() and len(g_p) > 4
    return {"y": relative_error(y_s, y_p), "dx": relative_error(gx_s, gx_p),
            "grads": max(relative_error(g_s[n], g_p[n]) for n in g_p)}


@pytest.mark.gpu
def test_grouped_mm_on_cuda_takes_the_fast_path_in_bf16_and_equals_the_loop():
    x = torch.zeros(8, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2, 64, 32, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability() >= (9, 0):  # CUTLASS grouped GEMM: Hopper and newer
        assert grouped_mm_available(x, w)
    assert not grouped_mm_available(x.float(), w.float())  # fp32 on CUDA: our loop, not torch's synced one
    errors = grouped_mm_case("cuda", torch.bfloat16)
    assert max(errors.values()) < BF16_TOL, errors
    errors = grouped_mm_case("cuda", torch.float32)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.gpu
@pytest.mark.parametrize("expert_type", ["mpo", "ffn"])
def test_segment_dispatch_equals_padded_on_cuda_in_bf16(expert_type):
    errors = layer_case("cuda", torch.bfloat16, expert_type)
    assert max(errors.values()) < BF16_TOL, errors
