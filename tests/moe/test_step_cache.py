"""Where MPO experts are rebuilt: once per optimizer step, only when they got tokens, fast order.

Every test compares a faster path with the plain one (rebuild every expert in
every forward) and asserts equal outputs and gradients, to fp32 roundoff:

    per-step reconstruction   set_micro_batch(i, is_last) under gradient accumulation
    idle-expert skipping      experts with no token from any rank are not rebuilt
    reconstruct_shared        the layer's contraction vs mpo.reconstruct

This file is also the 2-rank DeepSpeed worker (run under torchrun by
``test_two_rank_zero2_gradient_accumulation_cache_equals_plain``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest, when run as a worker

HIDDEN, FFN = 32, 64
GRAD_TOL = 1e-5  # relative to the largest entry; fp32, different summation order


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def close(a: torch.Tensor, b: torch.Tensor, tol: float = GRAD_TOL) -> bool:
    return float((a - b).abs().max()) <= tol * (1.0 + float(b.abs().max()))


def make_layer(keep_prob: float = 1.0, num_experts: int = 4, k: int = 1, ep_size: int = 1, seed: int = 0,
               shard_central: bool = False):
    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.layer import MPOEMoE
    from mpomoe_ds.mpo.config import MPOConfig

    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=num_experts, k=k, ep_size=ep_size, expert_init="perturb", init_noise=0.3,
                    central_grad_keep_prob=keep_prob, aux_loss_coef=0.05, seed=seed, shard_central=shard_central, layers="all")
    return MPOEMoE(HIDDEN, FFN, cfg, MPOConfig())


def micro_batches(count: int, tokens: int = 24, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, HIDDEN, generator=gen) for _ in range(count)]


def step_loss(layer, x: torch.Tensor) -> torch.Tensor:
    out, aux, _ = layer(x)
    target = torch.sin(x.sum(-1, keepdim=True) + torch.arange(HIDDEN))
    return (out - target).pow(2).mean() + layer.config.aux_loss_coef * aux


def run_step(layer, batches: list[torch.Tensor], cached: bool, step: int = 0, hooks=None,
             checkpointed: bool = False) -> tuple[list[float], dict]:
    """One optimizer step of gradient accumulation; returns the losses and the summed gradients.

    ``cached``: the layer is told each micro-batch's position (per-step
    reconstruction); otherwise it rebuilds in every forward (the plain reference).
    ``checkpointed``: each micro-batch's forward runs under torch's non-reentrant
    activation checkpoint, so the backward re-runs it.
    """
    layer.zero_grad(set_to_none=True)
    layer.begin_step(step, hooks)
    losses = []
    for i, x in enumerate(batches):
        if cached:
            layer.begin_micro_batch(i, i == len(batches) - 1)
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            loss = checkpoint(step_loss, layer, x, use_reentrant=False) / len(batches)
        else:
            loss = step_loss(layer, x) / len(batches)
        loss.backward()
        losses.append(loss.item())
    layer.end_step()
    return losses, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- reconstruct_shared


def all_trees(a: int, b: int):
    if a == b:
        yield a
        return
    for m in range(a, b):
        for left in all_trees(a, m):
            for right in all_trees(m + 1, b):
                yield (left, right)


def tree_macs(tree, shapes) -> tuple[int, tuple[int, int, int]]:
    """MACs of contracting cores in this bracketing; returns (macs, (d_left, sites, d_right))."""
    if isinstance(tree, int):
        d0, i, j, d1 = shapes[tree]
        return 0, (d0, i * j, d1)
    cl, (a, p, m) = tree_macs(tree[0], shapes)
    cr, (_, q, b) = tree_macs(tree[1], shapes)
    return cl + cr + a * p * m * q * b, (a, p * q, b)


def test_layer_contraction_costs_the_brute_force_minimum_at_gpt2_widths():
    from mpomoe_ds.mpo import factorize, full_bond_dims, reconstruction_macs
    from mpomoe_ds.mpo.reconstruction import shared_plan_macs

    for rows, cols in ((768, 3072), (3072, 768)):
        i, j = factorize(rows), factorize(cols)
        bonds = full_bond_dims(i, j)  # lossless
        shapes = [(bonds[k], i[k], j[k], bonds[k + 1]) for k in range(5)]
        brute = min(tree_macs(t, shapes)[0] for t in all_trees(0, len(shapes) - 1))
        assert reconstruction_macs(shapes) == brute  # the DP in mpo.py finds the optimum
        assert shared_plan_macs(shapes, 2) == brute  # so does the layer's fixed order
        # SPEC: about |W| * (d_2 + d_3) multiply-adds, 1.36 GMAC for 3072x768 lossless
        assert abs(brute / (rows * cols * (bonds[2] + bonds[3])) - 1) < 0.01
        assert 1.35e9 < brute < 1.37e9


def test_shared_reconstruction_equals_mpo_reconstruct_values_and_gradients():
    from mpomoe_ds.mpo import decompose, reconstruct
    from mpomoe_ds.mpo.reconstruction import reconstruct_shared

    cases = [((32, 64), dict()), ((64, 32), dict(max_bond=3)), ((48, 40), dict(n=3)), ((64, 32), dict(n=4)),
             ((32, 64), dict(central_index=0)), ((32, 64), dict(central_index=4))]
    for (rows, cols), kw in cases:
        gen = torch.Generator().manual_seed(rows + cols)
        mpo = decompose(torch.randn(rows, cols, generator=gen, dtype=torch.float64), **kw)
        c = mpo.central_index
        aux = [(a.unsqueeze(0) + 0.1 * torch.randn(3, *a.shape, generator=gen, dtype=torch.float64)).requires_grad_()
               for a in mpo.auxiliary]
        central = mpo.central.clone().requires_grad_()
        fast = reconstruct_shared(aux, central, c)
        ref = reconstruct(aux[:c] + [central] + aux[c:])
        assert fast.shape == (3, rows, cols)
        assert (fast - ref).abs().max() < 1e-12, kw
        probe = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
        g_fast = torch.autograd.grad((fast * probe).sum(), aux + [central])
        g_ref = torch.autograd.grad((ref * probe).sum(), aux + [central])
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(g_fast, g_ref)), kw


# ----------------------------------------------------------------------------- per-step reconstruction


def test_per_step_reconstruction_gives_plain_gradients_under_accumulation():
    for keep_prob, k in ((1.0, 1), (0.5, 2), (0.0, 1)):  # no mask, central-gradient mask, frozen central
        plain, cached = make_layer(keep_prob, k=k), make_layer(keep_prob, k=k)
        opt_p = torch.optim.SGD(plain.parameters(), lr=0.5)
        opt_c = torch.optim.SGD(cached.parameters(), lr=0.5)
        for step in range(3):  # the cache lives one step at a time and restarts cleanly
            batches = micro_batches(4, seed=step)
            losses_p, grads_p = run_step(plain, batches, cached=False, step=step)
            losses_c, grads_c = run_step(cached, batches, cached=True, step=step)
            assert max(abs(a - b) for a, b in zip(losses_p, losses_c)) < 1e-6
            assert grads_p.keys() == grads_c.keys() and len(grads_p) == len(list(plain.parameters())) - (
                2 if keep_prob == 0.0 else 0)
            for name in grads_p:
                assert close(grads_c[name], grads_p[name]), (keep_prob, step, name)
            if keep_prob == 0.5:  # the mask zeroes the same entries in both
                assert torch.equal(grads_c["central.up"] == 0, grads_p["central.up"] == 0)
            opt_p.step()
            opt_c.step()
        for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
            assert close(q, p), name


@contextlib.contextmanager
def counting_reconstructions() -> Iterator[list[int]]:
    """Within the block, every batched reconstruction appends its expert count to the yielded list."""
    import mpomoe_ds.moe.experts as experts_mod

    rebuilt: list[int] = []
    original = experts_mod.reconstruct_shared

    def counting(aux, central, index):
        rebuilt.append(aux[0].shape[0])
        return original(aux, central, index)

    experts_mod.reconstruct_shared = counting
    try:
        yield rebuilt
    finally:
        experts_mod.reconstruct_shared = original


def test_per_step_reconstruction_under_activation_checkpointing_gives_plain_gradients_and_rebuilds_once():
    for keep_prob, k in ((1.0, 1), (0.5, 2)):
        plain, cached = make_layer(keep_prob, k=k), make_layer(keep_prob, k=k)
        opt_p = torch.optim.SGD(plain.parameters(), lr=0.5)
        opt_c = torch.optim.SGD(cached.parameters(), lr=0.5)
        for step in range(3):
            batches = micro_batches(4, seed=step)
            losses_p, grads_p = run_step(plain, batches, cached=False, step=step)
            with counting_reconstructions() as calls:
                losses_c, grads_c = run_step(cached, batches, cached=True, step=step, checkpointed=True)
            assert len(calls) == 2  # up and down once for the step: recomputations replay the cached weights
            assert max(abs(a - b) for a, b in zip(losses_p, losses_c)) < 1e-6
            assert grads_p.keys() == grads_c.keys()
            for name in grads_p:
                assert close(grads_c[name], grads_p[name]), (keep_prob, step, name)
            opt_p.step()
            opt_c.step()
        for (name, p), q in zip(plain.named_parameters(), cached.parameters()):
            assert close(q, p), name


def test_per_step_reconstruction_rebuilds_once_per_step():
    layer = make_layer()
    with counting_reconstructions() as calls:
        run_step(layer, micro_batches(4), cached=True)
        per_step = len(calls)
        calls.clear()
        run_step(layer, micro_batches(4), cached=False)
        plain = len(calls)
    assert per_step == 2  # up and down, once for the whole step
    assert plain == 2 * 4  # up and down in every micro-batch


class ProjectingHooks:
    """A linear gradient transform on W (like OMoE's projection), to check hooks see each micro-batch once."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(5)
        self.proj = {m: torch.randn(dim, dim, generator=gen) / math.sqrt(dim) for m, dim in (("up", HIDDEN),
                                                                                              ("down", FFN))}
        self.calls = 0

    def transform_weight(self, experts, matrix, weight_LIO):
        self.calls += 1
        weight_LIO.register_hook(lambda g: self.proj[matrix] @ g)
        return weight_LIO

    def observe_inputs(self, experts, matrix, inputs_LSI, valid_LS):
        pass


def test_per_step_reconstruction_keeps_weight_hooks_exact():
    plain, cached = make_layer(), make_layer()
    hooks_p, hooks_c = ProjectingHooks(), ProjectingHooks()
    batches = micro_batches(3)
    _, grads_p = run_step(plain, batches, cached=False, hooks=hooks_p)
    _, grads_c = run_step(cached, batches, cached=True, hooks=hooks_c)
    assert hooks_c.calls == hooks_p.calls == 6
    for name in grads_p:
        assert close(grads_c[name], grads_p[name]), name


def test_per_step_reconstruction_refuses_a_step_without_its_last_micro_batch():
    layer = make_layer()
    for i, x in enumerate(micro_batches(2)):
        layer.begin_micro_batch(i, False)
        step_loss(layer, x).backward()
    with pytest.raises(RuntimeError, match="is_last=True"):
        layer.begin_micro_batch(0, False)


def test_eval_and_no_grad_forwards_ignore_the_step_cache():
    layer = make_layer()
    x = micro_batches(1)[0]
    reference, _, _ = layer(x)
    layer.begin_micro_batch(0, False)
    with torch.no_grad():
        out, _, _ = layer(x)
    assert layer.experts._step is None and torch.equal(out, reference)


# ----------------------------------------------------------------------------- idle experts


def route_by_coordinate(layer) -> None:
    """Router logits 4 * x[:, e]: lowering x[:, e] idles expert e."""
    with torch.no_grad():
        wg = layer.deepspeed_moe.gate.wg.weight
        wg.zero_()
        wg[:, :wg.shape[0]] += 4.0 * torch.eye(wg.shape[0])


def idle(x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    x = x.clone()
    x[:, experts] -= 6.0
    return x


def test_skipping_idle_experts_gives_identical_results():
    skipping, full = make_layer(), make_layer()
    route_by_coordinate(skipping)
    route_by_coordinate(full)
    full.experts.needs_activity = lambda: False  # the plain path: rebuild every expert
    with counting_reconstructions() as rebuilt:
        x = idle(micro_batches(1, tokens=40)[0], [1, 3])
        out_s, aux_s, counts = skipping(x)
        assert counts[1] == counts[3] == 0 and counts.sum() == 40
        assert rebuilt == [2, 2]  # up and down of the two experts that got tokens
        out_f, aux_f, _ = full(x)
    assert torch.equal(out_s, out_f) and torch.equal(aux_s, aux_f)
    target = torch.randn_like(out_s)
    ((out_s - target).pow(2).sum() + aux_s).backward()
    ((out_f - target).pow(2).sum() + aux_f).backward()
    for (name, p), q in zip(full.named_parameters(), skipping.parameters()):
        assert q.grad is not None, name  # idle experts still get (zero) gradients, as in the plain path
        assert close(q.grad, p.grad), name
        if ".1." in name or ".3." in name:
            assert not q.grad.any(), name


# ----------------------------------------------------------------------------- 2 ranks, DeepSpeed ZeRO-2


@pytest.mark.parametrize("shard", [False, True], ids=["replicated_central", "sharded_central"])
def test_two_rank_zero2_gradient_accumulation_cache_equals_plain(tmp_path, shard):
    from conftest import run_two_ranks

    ranks = run_two_ranks(Path(__file__), ["--steps", "2", "--accum", "3"] + (["--shard-central"] if shard else []),
                          tmp_path / "cache")
    for r in ranks:
        assert r["steps"] == 2
        assert max(r["loss_diff"]) < 1e-6, r["loss_diff"]
        assert max(r["grad_rel_diff"]) < GRAD_TOL, r["grad_rel_diff"]
        assert r["param_rel_diff"] < GRAD_TOL
        assert r["graded_params"] == r["num_params"]  # every parameter, central and experts, got its gradient
        assert r["central_sharded"] == shard
    # the skewed router leaves both of rank 1's experts without tokens in some micro-batches
    assert any(r["idle_rank1"] for r in ranks)


class TinyModel(torch.nn.Module):
    """MoE (residual) -> dense head; the router follows coordinates so tests can idle experts."""

    def __init__(self, keep_prob: float, ep_size: int, shard_central: bool = False) -> None:
        super().__init__()
        self.moe = make_layer(keep_prob, ep_size=ep_size, shard_central=shard_central)
        route_by_coordinate(self.moe)
        torch.manual_seed(1)
        self.head = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux, _ = self.moe(x)
        target = torch.sin(x.sum(-1, keepdim=True) + torch.arange(HIDDEN))
        return (self.head(x + out) - target).pow(2).mean() + self.moe.config.aux_loss_coef * aux


def worker() -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from mpomoe_ds.moe.params import optimizer_param_groups
    from mpomoe_ds.moe.step import MoEStep
    from mpomoe_ds.training.engine import initialize

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--accum", type=int, default=3)
    parser.add_argument("--shard-central", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"train_micro_batch_size_per_gpu": 24, "gradient_accumulation_steps": args.accum,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    engines = []
    for _ in range(2):
        model = TinyModel(keep_prob=0.5, ep_size=world, shard_central=args.shard_central)
        engines.append(initialize(model, config, optimizer=torch.optim.SGD(optimizer_param_groups(model), lr=0.5)))
    plain, cached = engines
    result = {"rank": rank, "steps": 0, "grad_rel_diff": [], "idle_rank1": False, "losses_plain": [],
              "losses_cached": []}
    for step in range(args.steps):
        grads = []
        for engine, use_cache in ((plain, False), (cached, True)):
            moe_step = MoEStep(engine.module)
            moe_step.begin_step(step)
            for i, x in enumerate(micro_batches(args.accum, seed=100 * step + rank)):
                if i % 2 == 1:  # every rank: no token for experts 2 and 3, so rank 1 rebuilds none
                    x = idle(x, [2, 3])
                if use_cache:
                    moe_step.begin_micro_batch(engine.micro_steps % engine.gradient_accumulation_steps(),
                                               engine.is_gradient_accumulation_boundary())
                loss = engine(x)
                engine.backward(loss)
                result["losses_cached" if use_cache else "losses_plain"].append(loss.item())
                if engine.is_gradient_accumulation_boundary():
                    grads.append({n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()})
                engine.step()
            moe_step.end_step(step)
            # the plain engine, skipping idle experts, ran micro-batches where rank 1 had no token at all
            routed = engine.module.moe.deepspeed_moe.gate(idle(x, [2, 3])).experts_TK
            result["idle_rank1"] |= bool(((routed == 2) | (routed == 3)).sum() == 0)
        g_plain, g_cached = grads
        result["graded_params"] = sum(g is not None for g in g_cached.values())
        result["num_params"] = len(g_cached)
        result["grad_rel_diff"].append(max(
            float((g_cached[n] - g).abs().max()) / (1.0 + float(g.abs().max())) for n, g in g_plain.items()))
        result["steps"] += 1
    result["loss_diff"] = [abs(a - b) for a, b in zip(result["losses_plain"], result["losses_cached"])]
    result["central_sharded"] = cached.module.moe.central.sharded
    result["param_rel_diff"] = max(float((p - q).abs().max()) / (1.0 + float(p.abs().max()))
                                   for p, q in zip(plain.module.parameters(), cached.module.parameters()))
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    worker()
