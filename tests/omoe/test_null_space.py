"""OMoE's ``null_space`` projection: the applied change of MPO experts is orthogonal to the others' inputs.

Math against an independent reference (an explicit Jacobian and a least-norm
solve), the must-show leak test (4 MPO experts under Adam), the structural
budget and the refusals, and a real 2-rank ep 2 run through the Trainer under
ZeRO 0 and 2 (master weights must carry the correction).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.mpo.reconstruction import reconstruct_shared
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.omoe.null_space import leak, max_protected_rank, project_aux_step, protected_basis
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer

from conftest import ROOT, TINY_DS, run_two_ranks, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, E = 32, 128, 4  # the sizes: hidden 32, FFN 128, 4 experts, 5-core lossless MPO


def mpo_layer(num_experts: int = E, seed: int = 1) -> MPOEMoE:
    moe = MoEConfig(num_experts=num_experts, expert_type="mpo", expert_init="perturb", init_noise=0.3, seed=seed,
                    aux_loss_coef=0.0, layers="all")
    return MPOEMoE(D, F, moe, MPOConfig(num_cores=5))


def test_projected_step_equals_the_least_norm_correction_of_an_explicit_jacobian() -> None:
    """One Gauss-Newton step with converged CG = d0 - A^+ (A d0), A = Q^T J from torch's jacobian."""
    gen = torch.Generator().manual_seed(0)
    layer = mpo_layer(num_experts=2)
    experts, index = layer.experts, layer.experts.central_index
    central = layer.central["up"].detach().double()
    aux = [torch.stack([c.detach() for c in core]).double()[:1]
           for core in zip(*(e.aux_cores("up") for e in experts.deepspeed_experts))]
    step = [1e-4 * torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in aux]
    q = torch.linalg.qr(torch.randn(D, 2, generator=gen, dtype=torch.float64)).Q.unsqueeze(0)

    def weight_fn(*cores: torch.Tensor) -> torch.Tensor:
        return reconstruct_shared(list(cores), central.to(cores[0].dtype), index)

    fixed = project_aux_step(weight_fn, aux, [a + d for a, d in zip(aux, step)], q.float(), cg_iters=400,
                             newton_iters=1)
    flat = torch.cat([a.flatten() for a in aux])
    sizes = [a.numel() for a in aux]

    def w_of_flat(v: torch.Tensor) -> torch.Tensor:
        parts = torch.split(v, sizes)
        return (q[0].T @ weight_fn(*[p.view_as(a) for p, a in zip(parts, aux)])[0]).flatten()

    jac = torch.autograd.functional.jacobian(w_of_flat, flat)  # (r O, n_aux) = Q^T J
    d0 = torch.cat([d.flatten() for d in step])
    want = d0 - torch.linalg.pinv(jac) @ (jac @ d0)
    got = torch.cat([(f.double() - a).flatten() for f, a in zip(fixed, aux)])
    assert torch.allclose(got, want, atol=1e-3 * want.abs().max(), rtol=0), (got - want).abs().max()


def test_protected_basis_spans_what_the_others_saw_and_pads_with_zeros() -> None:
    eye = torch.eye(6)
    seen = {0: [0], 1: [1, 2], 2: []}  # directions each expert's projector protects
    P = torch.stack([eye - sum((torch.outer(eye[d], eye[d]) for d in dirs), torch.zeros(6, 6))
                     for dirs in seen.values()])
    pbar = (P.sum(0, keepdim=True) - P) / 2
    basis = protected_basis(pbar, num_experts=3, max_rank=3)
    for i, others in ((0, [1, 2]), (1, [0]), (2, [0, 1, 2])):
        span = basis[i] @ basis[i].T
        want = sum((torch.outer(eye[d], eye[d]) for d in others), torch.zeros(6, 6))
        assert torch.allclose(span, want, atol=1e-5), (i, span)


def four_expert_leaks(projection: str | None, steps: int = 12) -> tuple[list[float], dict]:
    """Leak ||Q^T dW_i|| / ||dW_i|| of each expert's applied W_up change in the orthogonal phase, Adam.

    Expert j sees tokens in span(e_2j, e_2j+1); Q_i (reference, independent of OMoE) is the top-6
    left singular vectors of the unit mean inputs the other three experts saw in the accumulating phase.
    """
    torch.manual_seed(0)
    layer = mpo_layer()
    experts = layer.experts
    cfg = OMoEConfig(enabled=True, acc_steps=8, orth_steps=steps - 8, alpha=1e-3, matrices=["up"],
                     projection=projection or "gradient", null_space_rank=6)
    if projection == "gradient":
        with pytest.warns(UserWarning, match="leaked 0.31"):
            omoe = OrthogonalExpertOptimizer(layer, cfg)
    else:
        omoe = OrthogonalExpertOptimizer(layer, cfg) if projection else None
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    valid = torch.ones(E, 24, dtype=torch.bool)
    seen: list[list[torch.Tensor]] = [[] for _ in range(E)]
    leaks, central_moves = [], []
    for step in range(steps):
        moe_step = MoEStep(layer, [omoe] if omoe else [])
        moe_step.begin_step(step)
        experts.train()
        x = torch.zeros(E, 24, D)
        for j in range(E):
            x[j, :, 2 * j:2 * j + 2] = torch.randn(24, 2, generator=gen)
        before, central = layer.expert_weights()["up"].detach().clone(), layer.central["up"].detach().clone()
        y = experts(x, layer.central_tensors(), valid, hooks=omoe.expert_hooks(layer) if omoe else None)
        opt.zero_grad()
        (y * torch.randn(y.shape, generator=gen)).sum().backward()
        opt.step()
        moe_step.end_step(step)
        if cfg.phase_at(step)[0] == "accumulate":
            for j in range(E):
                seen[j].append(x[j].mean(0) / x[j].mean(0).norm())
            continue
        delta = layer.expert_weights()["up"].detach() - before
        central_moves.append(float((layer.central["up"].detach() - central).abs().max()))
        for i in range(E):
            others = torch.stack([r for j in range(E) if j != i for r in seen[j]], 1)
            q = torch.linalg.svd(others, full_matrices=False).U[:, :6]
            leaks.append(float((q.T @ delta[i]).norm() / delta[i].norm()))
    return leaks, {"central_moves": central_moves, "stats": omoe.stats() if omoe else {}}


def test_null_space_projection_makes_the_applied_mpo_update_orthogonal_under_adam() -> None:
    """The must-show test: leak < 0.05 with the null-space OMoE, > 0.2 without OMoE and with the gradient one."""
    with_new, info = four_expert_leaks("null_space")
    without, _ = four_expert_leaks(None)
    old, _ = four_expert_leaks("gradient")
    assert max(with_new) < 0.05, with_new  # measured 0.010-0.031
    assert min(without) > 0.2, without  # measured 0.51-0.71
    assert min(old) > 0.2, old  # the gradient projection does not help the applied change (measured = without)
    assert max(info["central_moves"]) == 0.0  # the shared central is not stepped in orthogonal phases
    stats = info["stats"]
    assert stats["omoe/deepspeed_moe.experts.up/leak_max"] < 0.05  # the logged leak, against OMoE's own basis
    assert stats["omoe/deepspeed_moe.experts.up/protected_rank"] == 6.0


@pytest.mark.parametrize("matrices, cg_iters", [(["up"], 5), (["up", "down"], 3)])
def test_cost_predicts_the_flops_and_the_tensors_of_a_real_null_space_step(matrices: list[str],
                                                                            cg_iters: int) -> None:
    """cost() against FlopCounterMode around one orthogonal step's correction (end_step) and against the
    snapshot and bases the layer really holds. Measured: equal to the MAC (the count is exact, not a fit)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer = mpo_layer()
    omoe = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=True, acc_steps=2, orth_steps=1, matrices=matrices,
                                                       projection="null_space", cg_iters=cg_iters))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    moe_step = MoEStep(layer, [omoe])
    state = next(iter(omoe.layers.values()))
    for step in range(3):  # two accumulating steps, then the orthogonal one
        moe_step.begin_step(step)
        moe_step.begin_micro_batch(0, is_last=True)
        out, _, _ = layer(torch.randn(64, D))
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()
        if omoe.phase == "orthogonal":
            held = sum(t.numel() * t.element_size() for snap in state.snapshot.values()
                       for t in (*snap["aux"], snap["central"]))
            with FlopCounterMode(display=False) as counter:
                moe_step.end_step(step)
        else:
            moe_step.end_step(step)
    cost = omoe.cost()
    measured_macs = counter.get_total_flops() / 2  # FlopCounterMode counts a multiply-add as 2 FLOPs
    assert abs(measured_macs / cost.orth_step_macs - 1) < 0.05, (measured_macs, cost.orth_step_macs)
    assert cost.snapshot_bytes == held > 0
    assert cost.basis_bytes == sum(b.numel() * b.element_size() for b in state.basis.values()) > 0
    assert cost.basis_bytes == sum(4 * E * state.in_dim[m] * state.protected_rank[m] for m in matrices)
    # Far dearer than the gradient projection (L * I^2 * O): ~5 reconstructions of every local expert per CG step.
    assert cost.orth_step_macs > 10 * sum(E * state.in_dim[m] ** 2 * state.out_dim[m] for m in matrices)


def test_budget_and_refusals_name_the_fix() -> None:
    n_aux = sum(c.numel() for c in mpo_layer().experts.deepspeed_experts[0].aux_cores("up"))
    budget = max_protected_rank(n_aux, F)
    assert budget == (n_aux - 1) // F and budget * F < n_aux <= (budget + 1) * F
    with pytest.raises(ConfigError, match=rf"at most r = \(n_aux - 1\) // d_out = {budget}"):
        OrthogonalExpertOptimizer(mpo_layer(), OMoEConfig(enabled=True, projection="null_space",
                                                          null_space_rank=budget + 1))
    default = OrthogonalExpertOptimizer(mpo_layer(), OMoEConfig(enabled=True, projection="null_space"))
    assert next(iter(default.layers.values())).protected_rank == {"up": budget // 2}
    ffn = MPOEMoE(D, F, MoEConfig(num_experts=2, expert_type="ffn", layers="all"), MPOConfig(num_cores=5))
    with pytest.raises(ConfigError, match="moe.expert_type='mpo'"):
        OrthogonalExpertOptimizer(ffn, OMoEConfig(enabled=True, projection="null_space"))
    with pytest.raises(ConfigError, match="omoe.cg_iters"):
        OMoEConfig(cg_iters=0)
    assert leak(torch.zeros(1, D, F), torch.zeros(1, D, 2)).item() == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("stage, bf16", [(0, False), (2, False), (1, True)], ids=["zero0", "zero2", "bf16-zero1"])
def test_two_rank_ep2_trainer_runs_null_space_and_logs_a_small_leak(tmp_path: Path, stage: int, bf16: bool) -> None:
    """Under bf16 the leak is held in the fp32 master weights (< 0.05; measured 0.0002-0.0007): the bf16
    parameters are their rounding, whose change on a 1e-3 step is mostly rounding (leak 0.29-0.39, not
    asserted); before the master was read and written in fp32 the logged leak was 0.34."""
    out = tmp_path / "run"
    run = tiny_run_config(out, max_steps=6, diversity_tokens=0)
    run["moe"]["ep_size"] = 2
    run["omoe"] = {"enabled": True, "acc_steps": 2, "orth_steps": 2, "projection": "null_space"}
    run_path, ds_path = tmp_path / "run.yaml", tmp_path / "ds.json"
    run_path.write_text(yaml.safe_dump(run))
    ds = {**TINY_DS, "zero_optimization": {"stage": stage}, **({"bf16": {"enabled": True}} if bf16 else {})}
    ds_path.write_text(json.dumps(ds))
    ranks = run_two_ranks(ROOT / "tests" / "dist" / "null_space_worker.py",
                          ["--run_config", str(run_path), "--ds_config", str(ds_path)], tmp_path / "result")
    for result in ranks:
        assert result["phases"] == ["accumulate"] * 2 + ["orthogonal"] * 2 + ["accumulate"] * 2
        logged = [v for k, v in result["stats"].items() if k.endswith("/leak_max")]
        assert len(logged) >= 1 and max(logged) < 0.05  # per layer, as TensorBoard / metrics.json get them
        assert max(result["master_leaks"]) < 0.05, result["master_leaks"]
        assert result["dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
        if not bf16:
            assert len(result["leaks"]) == 2 * len(logged) and max(result["leaks"]) < 0.05, result["leaks"]
        assert max(result["central_moves"]) == 0.0
        assert result["has_master"] == (stage > 0 or bf16)
        # The fp32 master holds the corrected values (under bf16 the parameter is its rounding: half an ulp,
        # < 2**-9 for weights below 1).
        assert result["master_gap"] < (2.0 ** -9 if bf16 else 1e-6)
