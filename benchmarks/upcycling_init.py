"""How far each symmetry-breaking option moves the upcycled model at init, and who moves W_e under Adam.

Part 1, init distance: the packaged all-MiniLM-L6-v2 is converted (4 MPO
experts in every other block, lossless) with each option; reported are the
conversion report's mean relative weight distance ||W_e - W|| / ||W|| (over
layers, matrices and experts, with the spread over experts) and the relative
distance of the last hidden states on a fixed batch of sentences.

Part 2, central share: one MPOE layer (D=32, F=128, 4 experts, 5 lossless
cores, the issue's setting) regresses a random teacher with Adam (lr 1e-3,
20 steps; every expert on the same tokens, no routing). Per step and expert,
the change of W_e is split into the part the shared central caused (new
central, old auxiliaries) and the part its auxiliaries caused; reported is
the central's share ||dW_c|| / (||dW_c|| + ||dW_a||), mean over steps,
experts and seeds (+- std over seeds), for the gauges and lr multipliers.
The optimizer groups come from mpomoe_ds.moe.params.optimizer_param_groups.

    python benchmarks/upcycling_init.py            # ~1 min on 1 core
    python benchmarks/upcycling_init.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.models.hf import load_model, load_tokenizer
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
from mpomoe_ds.moe.params import optimizer_param_groups
from mpomoe_ds.mpo import reconstruct
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.training.config import OptimConfig

SENTENCES = ["The experts share one central tensor.", "A router sends every token to one expert.",
             "Upcycling starts from the pretrained feed-forward block.", "Short text.",
             "Gauge freedom leaves the matrix unchanged while moving norm between cores.",
             "Adam moves every coordinate by about the learning rate."]

INIT_ARMS = {
    "copy": {"expert_init": "copy"},
    "perturb 0.01 (default)": {},
    "rotation 0.02": {"expert_init": "copy", "rotation_angle": 0.02},
    "rotation 0.05": {"expert_init": "copy", "rotation_angle": 0.05},
    "rotation 0.2": {"expert_init": "copy", "rotation_angle": 0.2},
    "rotation 1 (Haar)": {"expert_init": "copy", "rotation_angle": 1.0},
    "aux reinit 0.01": {"expert_init": "copy", "aux_reinit_fraction": 0.01},
    "aux reinit 0.1": {"expert_init": "copy", "aux_reinit_fraction": 0.1},
}

SHARE_ARMS = {
    "canonical": ("canonical", 1.0),
    "balanced gauge": ("balanced", 1.0),
    "canonical, central_lr_mult 0.1": ("canonical", 0.1),
    "canonical, central_lr_mult 0 (frozen)": ("canonical", 0.0),
}


def init_distances() -> dict[str, dict[str, float]]:
    batch = dict(load_tokenizer("minilm")(SENTENCES, padding=True, return_tensors="pt"))
    rows = {}
    for name, options in INIT_ARMS.items():
        report = convert_model(load_model("minilm").eval(), MoEConfig(ep_size=1, **options), probe=batch)
        per_expert = [d for b in report.blocks for v in b.init_rel_distance.values() for d in v]
        rows[name] = {"weight_rel_mean": statistics.mean(per_expert), "weight_rel_std": statistics.pstdev(per_expert),
                      "output_rel": report.init_output_rel_distance}
    return rows


def expert_matrix(layer: MPOEMoE, aux: list[torch.Tensor], central: torch.Tensor) -> torch.Tensor:
    cores = list(aux)
    cores.insert(layer.mpo_config.num_cores // 2, central)
    return reconstruct([c.double() for c in cores])


def central_share(gauge: str, central_mult: float, seed: int, steps: int = 20, lr: float = 1e-3) -> float:
    torch.manual_seed(seed)
    layer = MPOEMoE.from_dense(DenseFFN.random(32, 128, seed=seed),
                               MoEConfig(num_experts=4, ep_size=1, expert_init="perturb", init_noise=0.01, seed=seed),
                               MPOConfig(gauge=gauge))
    optim = OptimConfig(lr=lr, central_lr_mult=central_mult)
    groups = optimizer_param_groups(layer, 0.0, lr=lr, lr_mults=optim.lr_mults)
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(256, 32, generator=gen)
    teacher = torch.randn(32, 32, generator=gen) / 32 ** 0.5
    target_ND = torch.tanh(x_ND @ teacher)
    experts = layer.experts.deepspeed_experts
    shares = []
    for _ in range(steps):
        old_aux = [[c.detach().clone() for c in e.aux_cores("up")] for e in experts]
        old_central = layer.central_tensors()["up"].detach().clone()
        x_LND = x_ND.unsqueeze(0).expand(len(experts), -1, -1)
        y_LND = layer.experts(x_LND, layer.central_tensors(), None)
        loss = (y_LND - target_ND).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        new_central = layer.central_tensors()["up"].detach()
        for e, expert in enumerate(experts):
            new_aux = [c.detach() for c in expert.aux_cores("up")]
            before = expert_matrix(layer, old_aux[e], old_central)
            by_central = float((expert_matrix(layer, old_aux[e], new_central) - before).norm())
            by_aux = float((expert_matrix(layer, new_aux, old_central) - before).norm())
            shares.append(by_central / max(by_central + by_aux, 1e-30))
    return statistics.mean(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init = init_distances()
    print("| option (MiniLM, 3 MoE blocks x 2 matrices x 4 experts) | mean ||W_e - W||/||W|| (std over experts) "
          "| output distance |")
    print("|---|---|---|")
    for name, row in init.items():
        print(f"| {name} | {row['weight_rel_mean']:.4f} ({row['weight_rel_std']:.4f}) | {row['output_rel']:.4f} |")
    shares = {name: [central_share(gauge, mult, seed) for seed in range(args.seeds)]
              for name, (gauge, mult) in SHARE_ARMS.items()}
    print(f"\n| gauge / lr (D=32, F=128, 4 experts, Adam, {args.seeds} seeds) | central's share of dW_e (up) |")
    print("|---|---|")
    for name, values in shares.items():
        print(f"| {name} | {statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"init": init, "central_share": shares}, fh, indent=1)


if __name__ == "__main__":
    main()
