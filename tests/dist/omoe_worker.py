"""2-rank OMoE worker: real processes, real all-to-all, compared with a 1-rank run.

Launched by tests/omoe/test_omoe.py as ``torchrun --nproc_per_node 2 tests/dist/omoe_worker.py``
(DS_ACCELERATOR=cpu, gloo). For (expert type, projection) in {(mpo, gradient), (ffn, update)}
and ep_size in {2, 1}:

* every rank also builds the same layer with ep_size 1 and no process group and trains it
  on the whole global batch (the 1-rank reference);
* the distributed layer trains on this rank's half; gradients are synchronised by hand the
  way DeepSpeed's engine does it (dense + central: SUM over all ranks; expert parameters:
  SUM over the expert-data-parallel group), the loss is normalised by the global token
  count, so the 1-rank run is the exact target;
* after every step the local experts' parameters and mean projectors must equal the
  reference's for the same global expert ids (atol 2e-5: fp32 summation order in the
  all-to-all / all-reduce, through 12 Adam steps);
* the diversity metrics of the EP layer (each rank passing its own tokens) must equal
  the 1-rank layer's on the whole batch (1e-5; ep_size 1: on the rank's own tokens);
* every torch.distributed collective is counted by context: OMoE's own calls
  (begin_step / end_step) must be exactly one all-reduce at each switch to the
  orthogonal phase and nothing else; forward + backward may not gain collectives in the
  orthogonal phase.

Rank 0 writes the measurements and a final "OK" line to $OMOE_RESULT.
"""

from __future__ import annotations

import collections
import os
import sys
import traceback

import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from mpomoe_ds import parallel
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.omoe.diversity import layer_expert_similarity
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer

D, F, E, TOKENS_PER_RANK, STEPS = 16, 32, 4, 24, 12
ATOL = 2e-5
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all",
               "broadcast", "reduce_scatter_tensor", "reduce", "barrier")

context = ["other"]
counts: collections.Counter = collections.Counter()


def install_counters() -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[context[0], _name] += 1
            return _original(*args, **kwargs)
        setattr(dist, name, counted)


def counted_in(ctx: str) -> dict[str, int]:
    return {op: n for (c, op), n in counts.items() if c == ctx and n}


def run(expert_type: str, projection: str, ep_size: int, log: list[str]) -> list[str]:
    failures = []
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = MoEConfig(num_experts=E, ep_size=ep_size, expert_type=expert_type, expert_init="perturb", init_noise=0.2,
                    seed=11, aux_loss_coef=0.0, layers="all")
    ep_group = parallel.expert_parallel_group(ep_size)
    edp_group = parallel.expert_data_parallel_group(ep_size)
    omoe_cfg = OMoEConfig(enabled=True, acc_steps=3, orth_steps=3, alpha=0.01, matrices=["up", "down"],
                          projection=projection)
    layer = MPOEMoE(D, F, moe, MPOConfig(num_cores=3), ep_group=ep_group)
    ref = MPOEMoE(D, F, MoEConfig(**{**moe.__dict__, "ep_size": 1}), MPOConfig(num_cores=3), ep_group=None)
    omoe = OrthogonalExpertOptimizer(layer, omoe_cfg, ep_group=ep_group, expert_dp_group=edp_group)
    ref_omoe = OrthogonalExpertOptimizer(ref, omoe_cfg)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    local_ids = layer.global_expert_ids
    expert_params = {id(p) for p in layer.deepspeed_moe.experts.parameters()}
    tag = f"{expert_type}/{projection}/ep{ep_size}"
    worst_param = worst_proj = 0.0
    per_step_fwd = []
    omoe_calls = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(500 + step)
        x = torch.randn(world * TOKENS_PER_RANK, D, generator=gen)
        target = torch.randn(world * TOKENS_PER_RANK, D, generator=gen)
        mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

        before = sum(counted_in("omoe").values())
        context[0] = "omoe"
        moe_step = MoEStep(layer, [omoe])
        moe_step.begin_step(step)
        phase = omoe.phase
        context[0] = "other"
        ref_step = MoEStep(ref, [ref_omoe])
        ref_step.begin_step(step)

        context[0] = "fwd_bwd"
        start = sum(counted_in("fwd_bwd").values())
        layer.train()
        out, _, _ = layer(x[mine])
        loss = (out - target[mine]).square().sum() / target.numel()
        opt.zero_grad()
        loss.backward()
        per_step_fwd.append((phase, sum(counted_in("fwd_bwd").values()) - start))

        context[0] = "grad_sync"  # what DeepSpeed's engine would do
        for p in layer.parameters():
            if p.grad is None:
                continue
            group = edp_group if id(p) in expert_params else None
            if group is None or dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
        context[0] = "other"
        opt.step()
        context[0] = "omoe"
        moe_step.end_step(step)
        context[0] = "other"
        omoe_calls.append((step, phase, sum(counted_in("omoe").values()) - before))

        ref.train()
        ref_out, _, _ = ref(x)
        ref_opt.zero_grad()
        ((ref_out - target).square().sum() / target.numel()).backward()
        ref_opt.step()
        ref_step.end_step(step)

        ref_experts = ref.deepspeed_moe.experts.deepspeed_experts
        for local, global_id in enumerate(local_ids):
            mine_sd = layer.deepspeed_moe.experts.deepspeed_experts[local].state_dict()
            for key, value in ref_experts[global_id].state_dict().items():
                worst_param = max(worst_param, float((mine_sd[key] - value).abs().max()))
        for key, value in ref.central.items():
            worst_param = max(worst_param, float((layer.central[key] - value).abs().max()))
        worst_param = max(worst_param, float((layer.deepspeed_moe.gate.wg.weight -
                                              ref.deepspeed_moe.gate.wg.weight).abs().max()))
        if phase == "orthogonal":
            (state,), (ref_state,) = omoe.layers.values(), ref_omoe.layers.values()
            for m in omoe_cfg.matrices:
                diff = state.mean_projector[m] - ref_state.mean_projector[m][local_ids]
                worst_proj = max(worst_proj, float(diff.abs().max()))

    switches = [s for s in range(STEPS) if omoe_cfg.phase_at(s)[0] == "orthogonal"
                and omoe_cfg.phase_at(s - 1)[0] == "accumulate"]
    expected_per_switch = int(ep_size > 1) + int(parallel.group_size(edp_group) > 1)
    for step, phase, n in omoe_calls:
        want = expected_per_switch if step in switches else 0
        if n != want:
            failures.append(f"{tag}: step {step} ({phase}) OMoE made {n} collectives, expected {want}")
    fwd_acc = {n for p, n in per_step_fwd if p == "accumulate"}
    fwd_orth = {n for p, n in per_step_fwd if p == "orthogonal"}
    if max(fwd_orth) > min(fwd_acc):
        failures.append(f"{tag}: forward+backward collectives grew in the orthogonal phase: {per_step_fwd}")
    if worst_param > ATOL:
        failures.append(f"{tag}: parameters differ from the 1-rank run by {worst_param:.3e} > {ATOL}")
    if worst_proj > ATOL:
        failures.append(f"{tag}: mean projectors differ from the 1-rank run by {worst_proj:.3e} > {ATOL}")
    # Diversity metrics under EP: each rank passes its own tokens; the gathered result must
    # equal the 1-rank metric on the whole batch (all E experts, same token order). Without
    # an EP group (ep_size 1) every rank holds all experts and measures its own tokens.
    sim = layer_expert_similarity(layer, x[mine])
    ref_sim = layer_expert_similarity(ref, x if ep_size > 1 else x[mine])
    sim_err = max(float((sim.cosine_EE - ref_sim.cosine_EE).abs().max()),
                  float((sim.cka_EE - ref_sim.cka_EE).abs().max()))
    if sim.num_tokens != ref_sim.num_tokens or sim_err > 1e-5:
        failures.append(f"{tag}: EP diversity metrics differ from 1 rank: {sim_err:.3e}, "
                        f"{sim.num_tokens} vs {ref_sim.num_tokens} tokens")
    cost = omoe.cost()
    log.append(f"{tag}: max|param - 1rank|={worst_param:.2e} max|P_bar - 1rank|={worst_proj:.2e} "
               f"omoe collectives per step={[n for _, _, n in omoe_calls]} (switches at {switches}) "
               f"fwd+bwd collectives per step acc={sorted(fwd_acc)} orth={sorted(fwd_orth)} "
               f"diversity cos={sim.cosine:.4f} cka={sim.cka:.4f} (|EP - 1rank|={sim_err:.1e}) "
               f"cost: collectives/cycle={cost.collectives_per_cycle} comm bytes/cycle={cost.comm_bytes_per_cycle} "
               f"counters={omoe.counters}")
    return failures


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    install_counters()
    log: list[str] = []
    failures: list[str] = []
    try:
        for expert_type, projection in (("mpo", "gradient"), ("ffn", "update")):
            for ep_size in (2, 1):
                failures += run(expert_type, projection, ep_size, log)
    except Exception:  # report, then fail the launch
        failures.append(traceback.format_exc())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failures)
    failures = [f"rank {r}: {f}" for r, fs in enumerate(gathered) for f in fs]
    if dist.get_rank() == 0:
        lines = log + failures + (["OK"] if not failures else [])
        print("\n".join(lines), flush=True)
        with open(os.environ.get("OMOE_RESULT", "omoe_result.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    dist.barrier()
    return 1 if failures else 0


if __name__ == "__main__":
    status = main()
    parallel.shutdown()
    sys.exit(status)
