"""Does OMoE make experts less alike? Several seeds, ordinary training vs OMoE vs a control.

One MoE layer (E experts, D=16, F=32, top-1 router, dropless) learns a regression on
clustered tokens (E cluster centres of norm 3 plus unit noise), from near-identical
experts (``expert_init="perturb"``, relative noise 0.05), with Adam. Two regimes:

    shared   one teacher ``tanh(x T)`` for every cluster: every expert would learn the same
             function (the "homogeneous experts" situation OMoE targets);
    cluster  one teacher per cluster: routing alone already specialises the experts.

Arms, same seed, data and steps:

    ordinary  no OMoE
    omoe      OMoE (the arm's settings)
    shrink    control: in orthogonal phases each expert's gradient is scaled by
              trace(P_bar_{-i}) / d_in, the same average shrinkage as OMoE but with no
              direction. If OMoE's effect were just "experts learn less half of the time",
              this arm would show it too.

Reported per arm: mean pairwise cosine and linear CKA of the experts' outputs on
held-out tokens (mpomoe_ds.omoe.diversity), final training loss, the mean free fraction
trace(P_bar)/d_in, as mean +- std over seeds and the number of seeds where OMoE is
below ordinary. Single thread (tiny matmuls).

    python benchmarks/omoe_diversity.py                 # default sweep, ~1-2 min on 1 core
    python benchmarks/omoe_diversity.py --seeds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.omoe.diversity import layer_expert_similarity
from mpomoe_ds.omoe.hooks import LayerHooks as _LayerHooks
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer

D, F = 16, 32


@dataclass
class Setting:
    name: str
    regime: str = "shared"
    expert_type: str = "ffn"
    num_experts: int = 4
    steps: int = 150
    alpha: float = 1e-3
    matrices: tuple[str, ...] = ("up", "down")
    projection: str = "gradient"
    acc_steps: int = 10
    orth_steps: int = 10


SETTINGS = [
    Setting("ffn shared a=1e-3 up+down"),
    Setting("ffn shared a=1e-3 up+down update", projection="update"),
    Setting("ffn shared a=0.1 up", alpha=0.1, matrices=("up",)),
    Setting("ffn shared a=1e-3 up", matrices=("up",)),
    Setting("ffn shared E=8", num_experts=8),
    Setting("ffn cluster a=1e-3 up+down", regime="cluster"),
    Setting("mpo shared a=1e-3 up+down", expert_type="mpo"),
]


def shrink_control(state: _LayerHooks, sums, keep) -> None:
    """Replace each P_bar_{-i} by (trace(P_bar_{-i}) / d_in) * I after OMoE computed it."""
    _LayerHooks.set_mean_projectors(state, sums, keep)
    for m, pbar in state.mean_projector.items():
        dim = pbar.shape[-1]
        scale = torch.diagonal(pbar, dim1=-2, dim2=-1).sum(-1) / dim
        state.mean_projector[m] = scale.view(-1, 1, 1) * torch.eye(dim).expand_as(pbar)


def run(setting: Setting, seed: int, arm: str) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num = setting.num_experts
    centres = torch.randn(num, D, generator=gen)
    centres = 3.0 * centres / centres.norm(dim=1, keepdim=True)
    teachers = torch.randn(1 if setting.regime == "shared" else num, D, D, generator=gen) / 4
    moe = MoEConfig(num_experts=num, ep_size=1, expert_type=setting.expert_type, expert_init="perturb",
                    init_noise=0.05, seed=seed, aux_loss_coef=0.0)
    layer = MPOEMoE(D, F, moe, MPOConfig(num_cores=3))
    omoe = None
    if arm != "ordinary":
        cfg = OMoEConfig(enabled=True, acc_steps=setting.acc_steps, orth_steps=setting.orth_steps,
                         alpha=setting.alpha, matrices=list(setting.matrices), projection=setting.projection)
        omoe = OrthogonalExpertOptimizer(layer, cfg)
        if arm == "shrink":
            for state in omoe.layers.values():
                state.set_mean_projectors = lambda sums, keep, s=state: shrink_control(s, sums, keep)
    moe_step = MoEStep(layer, participants=[omoe] if omoe else [])
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cluster = torch.randint(0, num, (n,), generator=gen)
        x = centres[cluster] + torch.randn(n, D, generator=gen)
        t = teachers[torch.zeros_like(cluster) if setting.regime == "shared" else cluster]
        return x, torch.tanh(torch.bmm(x.unsqueeze(1), t).squeeze(1))

    held_out, _ = batch(256)
    free = []
    loss = torch.tensor(0.0)
    for step in range(setting.steps):
        moe_step.begin_step(step)  # OMoE's phase switch happens here
        moe_step.begin_micro_batch(0, is_last=True)
        layer.train()
        x, y = batch(64)
        out, _, _ = layer(x)
        loss = (out - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if omoe and omoe.phase == "orthogonal":
            free += [v for k, v in omoe.stats().items() if k.endswith("free_fraction")]
        moe_step.end_step(step)  # OMoE records this step's inputs here
    layer.eval()
    sim = layer_expert_similarity(layer, held_out)
    return {"cosine": sim.cosine, "cka": sim.cka, "loss": float(loss.detach()),
            "free_fraction": statistics.mean(free) if free else 1.0}


def summarise(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f}+-{std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--only", default=None, help="run settings whose name contains this")
    parser.add_argument("--json", default=None, help="write all per-seed numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for setting in SETTINGS:
        if args.only and args.only not in setting.name:
            continue
        start = time.time()
        rows = {arm: [run(setting, seed, arm) for seed in range(args.seeds)] for arm in ("ordinary", "omoe", "shrink")}
        results[setting.name] = rows
        base = rows["ordinary"]
        print(f"\n{setting.name}  ({args.seeds} seeds, {setting.steps} steps, {time.time() - start:.0f}s)")
        print(f"  {'arm':9s} {'cosine':>16s} {'CKA':>16s} {'loss':>16s} {'free frac':>9s} "
              f"{'cos<ord':>7s} {'cka<ord':>7s}")
        for arm, arm_rows in rows.items():
            below = {k: sum(r[k] < b[k] for r, b in zip(arm_rows, base)) for k in ("cosine", "cka")}
            print(f"  {arm:9s} {summarise([r['cosine'] for r in arm_rows]):>16s} "
                  f"{summarise([r['cka'] for r in arm_rows]):>16s} {summarise([r['loss'] for r in arm_rows]):>16s} "
                  f"{statistics.mean(r['free_fraction'] for r in arm_rows):9.3f} "
                  f"{below['cosine'] if arm != 'ordinary' else '-':>7} {below['cka'] if arm != 'ordinary' else '-':>7}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
