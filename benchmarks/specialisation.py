"""Do upcycled MPO experts specialise? Every issue-17 option against copy init, its control, FFN experts and dense.

The task (where specialisation matters): tokens come from E = 4 clusters
(centres of norm 3 plus unit noise) and each cluster has its own teacher
``y = tanh(x T_c)``. A dense FFN (hidden 32, FFN 128, GELU) is first trained
on the mixture ("pretrained"), then upcycled into one MoE layer with 4 experts
(5-core lossless MPO, learned top-1 router, dropless, no balancing loss) and
trained on with Adam. Ideal experts become one teacher each. All arms of a
seed share the pretrained FFN and the data stream.

Arms (each uses the project's own code path for its option):

    copy            upcycled copies + 1% noise (moe.expert_init="perturb", init_noise 0.01)
    rotation        + moe.rotation_angle = 1 (Haar rotation of the bonds next to the central)
    rotation_0.3    + moe.rotation_angle = 0.3
    reinit_0.5      + moe.aux_reinit_fraction = 0.5
    balanced        mpo.gauge = "balanced"
    central_lr_0.1  optim central_lr_mult 0.1 (optimizer groups from optimizer_param_groups)
    frozen_central  moe.central_grad_keep_prob = 0 (the MPOE reference code's only mode)
    omoe_gradient   OMoE, projection "gradient" (the old one)
    omoe_gradient_shrink   its direction-free control: P_bar replaced by trace(P_bar)/d * I
    omoe_null_space        OMoE, projection "null_space" (the new one)
    omoe_null_space_random its direction-free control: same rank, same central freeze in
                    orthogonal phases, but Q a random orthonormal basis instead of the others' inputs
    rotation+null_space    the two combined
    ffn             plain FFN experts (moe.expert_type="ffn"), copies + 1% noise
    dense           the pretrained dense FFN trained on (no experts)

The built-in multi-task data (``--task multitask``, :mod:`toy_glue_task`): the
project's toy_sentiment and toy_topic tasks, words embedded (token + previous
word, hidden 32), one pre-LN FFN block (FFN 128), mean over words, one head per
task; the dense text model is pretrained on both tasks for 1000 steps (validation
accuracy ~0.94), its FFN upcycled like above and the whole model trained on
for 300 steps (32 sentences per task per step). Arms: copy, reinit_0.05 (the
candidate of the sweep below), ffn, dense. Reported as below plus validation
cross-entropy (the "loss"), accuracy, router entropy and the task-expert mutual
information of the top-1 routes on the validation tokens. 16 seeds: 4.8 min
with 2 processes on the shared 2-core machine (load 5.7).

Reported per arm over seeds (mean and std): mean pairwise cosine and linear CKA
of the experts' outputs on held-out tokens (all experts run densely,
mpomoe_ds.omoe.diversity), expert-specific output energy, held-out MSE, and
for the null-space arms the logged leak. JSON, Markdown table and PNG go to
benchmarks/results/specialisation.*. Single thread.

    python benchmarks/specialisation.py                  # 8 seeds, 100 steps, 2 processes: ~5 min on 2 idle cores
    python benchmarks/specialisation.py --seeds 2 --steps 60 --out /tmp/spec   # smoke run
    python benchmarks/specialisation.py --task multitask --seeds 16      # results/specialisation_multitask.*
    python benchmarks/specialisation.py --paired benchmarks/results/specialisation_sweep.json \
        benchmarks/results/specialisation_sweep300.json    # the README's sweep table (specialisation_sweep_paired.md)

Every .md written is also pasted into README.md between ``<!-- NAME.md -->`` and
``<!-- end NAME.md -->`` where those markers exist (``common.paste_into_readme``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omoe_diversity import shrink_control  # noqa: E402
from toy_glue_task import TextClassifier, ToyGlue  # noqa: E402
from toy_glue_task import evaluate as evaluate_text  # noqa: E402

from mpomoe_ds.moe.config import MoEConfig  # noqa: E402
from mpomoe_ds.moe.experts import activation_function  # noqa: E402
from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE  # noqa: E402
from mpomoe_ds.moe.params import optimizer_param_groups  # noqa: E402
from mpomoe_ds.moe.step import MoEStep  # noqa: E402
from mpomoe_ds.mpo.config import MPOConfig  # noqa: E402
from mpomoe_ds.omoe.config import OMoEConfig  # noqa: E402
from mpomoe_ds.omoe.diversity import dense_expert_outputs, expert_similarity, expert_specific_energy  # noqa: E402
from mpomoe_ds.omoe.hooks import LayerHooks  # noqa: E402
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer  # noqa: E402

import common  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
D, F, E = 32, 128, 4
LR, BATCH, PRETRAIN_STEPS = 3e-3, 128, 200


@dataclass
class Arm:
    name: str
    moe: dict[str, Any] = field(default_factory=dict)
    mpo: dict[str, Any] = field(default_factory=dict)
    lr_mults: Optional[dict[str, float]] = None
    omoe: Optional[dict[str, Any]] = None
    control: Optional[str] = None  # "shrink" (gradient OMoE) or "random_basis" (null-space OMoE)
    dense: bool = False
    # "issue": the arms; "sweep": the small-angle / fraction search; "multitask": on the built-in data
    groups: tuple[str, ...] = ("issue",)


OMOE = dict(enabled=True, acc_steps=20, orth_steps=20, alpha=1e-3, matrices=["up"], cg_iters=10)  # 10: CPU budget
NULL_SPACE = dict(OMOE, projection="null_space")
BOTH = ("issue", "sweep")  # the references every recommendation is measured against
ARMS = [
    Arm("copy", groups=BOTH + ("multitask",)),
    Arm("rotation", moe=dict(rotation_angle=1.0)),
    Arm("rotation_0.3", moe=dict(rotation_angle=0.3)),
    Arm("reinit_0.5", moe=dict(aux_reinit_fraction=0.5)),
    Arm("balanced", mpo=dict(gauge="balanced")),
    Arm("central_lr_0.1", lr_mults={"central": 0.1}),
    Arm("frozen_central", moe=dict(central_grad_keep_prob=0.0)),
    Arm("omoe_gradient", omoe=dict(OMOE, projection="gradient")),
    Arm("omoe_gradient_shrink", omoe=dict(OMOE, projection="gradient"), control="shrink"),
    Arm("omoe_null_space", omoe=NULL_SPACE),
    Arm("omoe_null_space_random", omoe=NULL_SPACE, control="random_basis"),
    Arm("rotation+null_space", moe=dict(rotation_angle=1.0), omoe=NULL_SPACE),
    Arm("ffn", moe=dict(expert_type="ffn"), groups=BOTH + ("multitask",)),
    Arm("dense", dense=True, groups=("issue", "multitask")),
    # The search for an arm below copy's similarity at <= FFN experts' loss + 5%: small moves off the
    # pretrained FFN (angle 1 and fraction 0.5 specialise but cost 37% / 68% loss), alone and combined
    # with the null-space OMoE or a higher expert (auxiliary core) learning rate.
    *[Arm(f"rotation_{a}", moe=dict(rotation_angle=a), groups=("sweep",)) for a in (0.05, 0.1, 0.2)],
    *[Arm(f"reinit_{f}", moe=dict(aux_reinit_fraction=f), groups=("sweep",)) for f in (0.01, 0.02, 0.03)],
    Arm("reinit_0.05", moe=dict(aux_reinit_fraction=0.05), groups=("sweep", "multitask")),  # the candidate
    Arm("reinit_0.1", moe=dict(aux_reinit_fraction=0.1), groups=("sweep",)),
    Arm("aux_lr_3", lr_mults={"expert": 3.0}, groups=("sweep",)),
    Arm("rotation_0.1+aux_lr_3", moe=dict(rotation_angle=0.1), lr_mults={"expert": 3.0}, groups=("sweep",)),
    Arm("rotation_0.1+null_space", moe=dict(rotation_angle=0.1), omoe=NULL_SPACE, groups=("sweep",)),
    Arm("reinit_0.05+null_space", moe=dict(aux_reinit_fraction=0.05), omoe=NULL_SPACE, groups=("sweep",)),
]


class Task:
    """Clustered tokens with one teacher per cluster; one generator, so every arm sees the same stream."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        centres = torch.randn(E, D, generator=gen)
        self.centres = 3.0 * centres / centres.norm(dim=1, keepdim=True)
        self.teachers = torch.randn(E, D, D, generator=gen) / 4
        self.seed = seed
        self.held_out = self.batch(1024, torch.Generator().manual_seed(10_000 + seed))

    def batch(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cluster = torch.randint(0, E, (n,), generator=gen)
        x = self.centres[cluster] + torch.randn(n, D, generator=gen)
        return x, torch.tanh(torch.bmm(x.unsqueeze(1), self.teachers[cluster]).squeeze(1))


def dense_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    act = activation_function(MoEConfig().activation)
    return act(x @ params["up_weight"] + params["up_bias"]) @ params["down_weight"] + params["down_bias"]


def train_dense(task: Task, steps: int, params: Optional[dict[str, torch.Tensor]] = None,
                data_seed: int = 0) -> dict[str, torch.Tensor]:
    """The "pretrained" FFN: Adam on the cluster mixture from DenseFFN.random (or continue ``params``)."""
    if params is None:
        init = DenseFFN.random(D, F, seed=task.seed, std=0.1)
        params = {f"{m}_{k}": getattr(init, f"{m}_{k}") for m in ("up", "down") for k in ("weight", "bias")}
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=LR)
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        x, y = task.batch(BATCH, gen)
        loss = (dense_forward(params, x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def random_basis_control(state: LayerHooks, gen: torch.Generator) -> None:
    """Replace OMoE's protected bases by random orthonormal ones of the same per-expert rank."""
    LayerHooks.set_bases(state)
    for m, basis in state.basis.items():
        if basis is None:
            continue
        rank_L = (basis.norm(dim=1) > 0).sum(-1)
        random = torch.linalg.qr(torch.randn(basis.shape, generator=gen)).Q
        keep = (torch.arange(basis.shape[-1]).unsqueeze(0) < rank_L.unsqueeze(1)).to(random.dtype)
        state.basis[m] = random * keep.unsqueeze(1)


def build_omoe(layer: MPOEMoE, arm: Arm, seed: int) -> Optional[OrthogonalExpertOptimizer]:
    if arm.omoe is None:
        return None
    omoe = OrthogonalExpertOptimizer(layer, OMoEConfig(**arm.omoe))
    gen = torch.Generator().manual_seed(20_000 + seed)
    for state in omoe.layers.values():
        if arm.control == "shrink":
            state.set_mean_projectors = lambda sums, keep, s=state: shrink_control(s, sums, keep)
        elif arm.control == "random_basis":
            state.set_bases = lambda s=state: random_basis_control(s, gen)
    return omoe


def upcycle(ffn: dict[str, torch.Tensor], arm: Arm, seed: int) -> MPOEMoE:
    """One MoE layer with E experts upcycled from the pretrained FFN, the arm's options applied."""
    torch.manual_seed(seed)
    dense = DenseFFN(**{k: v.clone() for k, v in ffn.items()})
    moe = MoEConfig(**{"num_experts": E, "ep_size": 1, "k": 1, "expert_init": "perturb", "init_noise": 0.01,
                       "seed": seed, "aux_loss_coef": 0.0, "layers": "all", **arm.moe})
    return MPOEMoE.from_dense(dense, moe, MPOConfig(num_cores=5, **arm.mpo))


def train_steps(model: nn.Module, steps: int, loss_fn: Callable[[], torch.Tensor], layer: Optional[MPOEMoE] = None,
                arm: Optional[Arm] = None, seed: int = 0) -> list[float]:
    """``steps`` Adam steps on ``loss_fn()``; with an MoE ``layer`` through the MoE step protocol (and the
    arm's OMoE and lr multipliers). Returns the logged null-space leaks of the orthogonal steps."""
    omoe = build_omoe(layer, arm, seed) if layer is not None else None
    moe_step = MoEStep(layer, participants=[omoe] if omoe else []) if layer is not None else None
    opt = torch.optim.Adam(optimizer_param_groups(model, lr=LR, lr_mults=arm.lr_mults if arm else None), lr=LR)
    leaks = []
    for step in range(steps):
        if moe_step is not None:
            moe_step.begin_step(step)
            moe_step.begin_micro_batch(0, is_last=True)
        model.train()
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if moe_step is not None:
            moe_step.end_step(step)
        if omoe is not None and omoe.phase == "orthogonal":
            leaks += [v for k, v in omoe.stats().items() if k.endswith("/leak")]
    return leaks


def run_moe(task: Task, pretrained: dict[str, torch.Tensor], arm: Arm, steps: int) -> dict[str, float]:
    layer = upcycle(pretrained, arm, task.seed)
    gen = torch.Generator().manual_seed(1)

    def loss_fn() -> torch.Tensor:
        x, y = task.batch(BATCH, gen)
        return (layer(x)[0] - y).square().mean()

    leaks = train_steps(layer, steps, loss_fn, layer, arm, task.seed)
    layer.eval()
    x, y = task.held_out
    with torch.no_grad():
        held_out = float((layer(x)[0] - y).square().mean())
        outputs = dense_expert_outputs(layer, x)
    sim = expert_similarity(outputs)
    return {"cosine": sim.cosine, "cka": sim.cka, "specific_energy": expert_specific_energy(outputs),
            "loss": held_out, "leak": statistics.mean(leaks) if leaks else float("nan")}


def run_arm(task: Task, pretrained: dict[str, torch.Tensor], arm: Arm, steps: int) -> dict[str, float]:
    if arm.dense:
        params = train_dense(task, steps, pretrained, data_seed=1)
        x, y = task.held_out
        loss = float((dense_forward(params, x) - y).square().mean())
        return {"cosine": 1.0, "cka": 1.0, "specific_energy": 0.0, "loss": loss, "leak": float("nan")}
    return run_moe(task, pretrained, arm, steps)


# --------------------------------------------------------------------------- the built-in multi-task data

TEXT_PRETRAIN_STEPS, TEXT_BATCH = 1000, 32  # dense pretraining steps (val accuracy ~0.94 by then); sentences per task per step


class DenseFFNModule(nn.Module):
    """A dense FFN's tensors as parameters (the text model's FFN before upcycling, and its dense arm)."""

    def __init__(self, ffn: DenseFFN) -> None:
        super().__init__()
        self.tensors = nn.ParameterDict({k: nn.Parameter(getattr(ffn, k).clone())
                                         for k in ("up_weight", "up_bias", "down_weight", "down_bias")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(self.tensors, x)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors.items()}


def pretrain_text(data: ToyGlue, seed: int) -> TextClassifier:
    """The "pretrained" dense text model: Adam on both tasks from DenseFFN.random and random embeddings."""
    model = TextClassifier(len(data.vocab), D, data.num_labels, DenseFFNModule(DenseFFN.random(D, F, seed, 0.1)),
                           seed)
    gen = torch.Generator().manual_seed(seed)
    train_steps(model, TEXT_PRETRAIN_STEPS, lambda: model.loss(data.batch(TEXT_BATCH, gen)))
    return model


def run_text_arm(data: ToyGlue, pretrained: TextClassifier, arm: Arm, steps: int, seed: int) -> dict[str, float]:
    """Continue from the pretrained text model: dense as it is, or its FFN upcycled with the arm's options."""
    gen = torch.Generator().manual_seed(1)
    if arm.dense:
        model = copy.deepcopy(pretrained)
        train_steps(model, steps, lambda: model.loss(data.batch(TEXT_BATCH, gen)))
        return {**evaluate_text(model, data, None), "leak": float("nan")}
    layer = upcycle(pretrained.ffn.weights(), arm, seed)
    model = TextClassifier(len(data.vocab), D, data.num_labels, layer, seed)
    model.copy_surroundings(pretrained)
    leaks = train_steps(model, steps, lambda: model.loss(data.batch(TEXT_BATCH, gen)), layer, arm, seed)
    return {**evaluate_text(model, data, layer), "leak": statistics.mean(leaks) if leaks else float("nan")}


# --------------------------------------------------------------------------- reporting

COLUMNS = {  # (result key, column header, format) per task
    "clusters": [("cosine", "cosine", ".3f"), ("cka", "CKA", ".3f"), ("specific_energy", "specific energy", ".3f"),
                 ("loss", "held-out MSE", ".4f")],
    "multitask": [("cosine", "cosine", ".3f"), ("cka", "CKA", ".3f"), ("specific_energy", "specific energy", ".3f"),
                  ("loss", "validation CE", ".4f"), ("accuracy", "accuracy", ".3f"),
                  ("mutual_information", "task-expert MI (nats)", ".3f"), ("router_entropy", "router entropy", ".3f")],
}
TITLES = {"clusters": ("Specialisation task", "`python benchmarks/specialisation.py`"),
          "multitask": ("Built-in multi-task data (toy_sentiment + toy_topic)",
                        "`python benchmarks/specialisation.py --task multitask`")}


def summary(rows: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def clear_margin(results: dict[str, list[dict[str, float]]], arm: str, ffn_loss: float) -> bool:
    """Both criteria by more than the seed spread: copy's cosine minus the arm's exceeds the larger of their
    stds, and the loss limit (1.05 x FFN experts) minus the arm's loss exceeds the arm's loss std."""
    (cos, cos_std), (copy_cos, copy_std) = summary(results[arm], "cosine"), summary(results["copy"], "cosine")
    loss, loss_std = summary(results[arm], "loss")
    return copy_cos - cos > max(cos_std, copy_std) and 1.05 * ffn_loss - loss > loss_std


def recommend(results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Lowest mean cosine among MPO arms whose mean loss is within 5% of plain FFN experts and below copy's
    cosine ("eligible"); ``clear``: the eligible ones that pass both by more than the seed spread."""
    ffn_loss, copy_cos = summary(results["ffn"], "loss")[0], summary(results["copy"], "cosine")[0]
    eligible = [a for a in results if a not in ("ffn", "dense", "copy") and
                summary(results[a], "loss")[0] <= 1.05 * ffn_loss and summary(results[a], "cosine")[0] < copy_cos]
    best = min(eligible, key=lambda a: summary(results[a], "cosine")[0]) if eligible else None
    clear = [a for a in eligible if clear_margin(results, a, ffn_loss)]
    return {"arm": best, "ffn_loss": ffn_loss, "copy_cosine": copy_cos, "eligible": eligible, "clear": clear}


def markdown(results: dict[str, list[dict[str, float]]], meta: dict[str, Any]) -> str:
    task = meta.get("task", "clusters")
    title, command = TITLES[task]
    columns = COLUMNS[task]
    with_leak = any(r["leak"] == r["leak"] for rows in results.values() for r in rows)  # NaN: no null-space OMoE
    lines = [f"{title} ({meta['seeds']} seeds, {meta['steps']} steps, mean +- std; {command})", ""]
    if "machine" in meta:
        load = meta["machine"]["load_average_at_start"][0]
        lines += [f"Machine: {common.machine_line(meta['machine'])}; {meta['seconds'] / 60:.1f} min wall, 1-min "
                  f"load average at start {load:.1f}{' (timing indicative)' if load > 2 else ''}.", ""]
    headers = ["arm"] + [h for _, h, _ in columns] + (["leak"] if with_leak else [])
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for arm, rows in results.items():
        cells = []
        for key, _, fmt in columns:
            mean, std = summary(rows, key)
            cells.append(f"{mean:{fmt}} +- {std:{fmt}}")
        if with_leak:
            leaks = [r["leak"] for r in rows if r["leak"] == r["leak"]]
            cells.append(f"{statistics.mean(leaks):.3f}" if leaks else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    rec = meta["recommendation"]
    lines += ["", f"Recommended (lowest cosine with loss <= 1.05 x FFN experts' {rec['ffn_loss']:.4f} and cosine "
              f"below copy's {rec['copy_cosine']:.3f}): **{rec['arm']}**; by more than the seed spread on both: "
              f"{', '.join(rec['clear']) or 'none'}."]
    return "\n".join(lines) + "\n"


def paired(results: dict[str, list[dict[str, float]]], arm: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Per seed: the arm's cosine minus copy's, and its loss / FFN experts' loss - 1; (mean, std) of each."""
    rows, copy_rows, ffn_rows = results[arm], results["copy"], results["ffn"]
    d_cos = [{"v": r["cosine"] - c["cosine"]} for r, c in zip(rows, copy_rows)]
    d_loss = [{"v": r["loss"] / f["loss"] - 1} for r, f in zip(rows, ffn_rows)]
    return summary(d_cos, "v"), summary(d_loss, "v")


def paired_table(runs: list[dict[str, Any]]) -> str:
    """One row per arm, a (d cosine, loss vs FFN) column pair per run (e.g. 100 and 300 steps), paired by seed."""
    arms = sorted(dict.fromkeys(a for run in runs for a in run["results"]), key=lambda a: a == "ffn")  # ffn last
    header = ["arm"] + [f"{run['meta']['steps']} steps: {h}" if i == 0 else h
                        for run in runs for i, h in enumerate(("d cosine", "loss vs FFN"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        cells = []
        for run in runs:
            results = run["results"]
            if arm not in results:
                cells += ["", ""]
                continue
            (dc, dc_std), (dl, dl_std) = paired(results, arm)
            cos = f"0 ({summary(results['copy'], 'cosine')[0]:.3f})" if arm == "copy" else f"{dc:+.3f} +- {dc_std:.3f}"
            cells += [cos, "0" if arm == "ffn" else f"{100 * dl:+.1f}% +- {100 * dl_std:.1f}%"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    sources = ", ".join(f"{run['meta']['seeds']} seeds x {run['meta']['steps']} steps" for run in runs)
    return (f"Paired per seed ({sources}): cosine minus copy's, and loss / FFN experts' loss - 1 (mean +- std "
            f"over seeds).\n\n" + "\n".join(lines) + "\n")


def plot(results: dict[str, list[dict[str, float]]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for arm, rows in results.items():
        (cx, sx), (ly, sy) = summary(rows, "cosine"), summary(rows, "loss")
        ax.errorbar(cx, ly, xerr=sx, yerr=sy, fmt="o", capsize=3, label=arm)
    ax.set_xlabel("mean pairwise expert output cosine (lower = more specialised)")
    task = meta.get("task", "clusters")
    ax.set_ylabel(dict((k, h) for k, h, _ in COLUMNS[task])["loss"])
    ax.set_title(f"{TITLES[task][0]}: 4 experts, hidden 32, FFN 128", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_seed(seed: int, arms: list[Arm], steps: int, task: str = "clusters") -> dict[str, dict[str, float]]:
    """Every arm on one seed's task, from one pretrained model (one process; single thread)."""
    torch.set_num_threads(1)
    if task == "multitask":
        data = ToyGlue()
        pretrained_text = pretrain_text(data, seed)
        rows = {arm.name: run_text_arm(data, pretrained_text, arm, steps, seed) for arm in arms}
    else:
        clusters = Task(seed)
        pretrained = train_dense(clusters, PRETRAIN_STEPS)
        rows = {arm.name: run_arm(clusters, pretrained, arm, steps) for arm in arms}
    print(f"seed {seed} done", flush=True)
    return rows


def run_all(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
    arms = [a for a in ARMS if (a.name in args.only if args.only else args.group in a.groups)]
    machine = common.machine_info()
    start = time.time()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        per_seed = pool.map(functools.partial(run_seed, arms=arms, steps=args.steps, task=args.task), seeds)
    results = {a.name: [rows[a.name] for rows in per_seed] for a in arms}
    sizes = ({"pretrain_steps": TEXT_PRETRAIN_STEPS, "batch_per_task": TEXT_BATCH} if args.task == "multitask"
             else {"pretrain_steps": PRETRAIN_STEPS, "batch": BATCH})
    meta = {"task": args.task, "group": args.group if not args.only else "only", "arms": [a.name for a in arms],
            "seeds": args.seeds, "seed_list": list(seeds), "steps": args.steps, "seconds": time.time() - start,
            "machine": machine, "jobs": args.jobs,
            "sizes": {"hidden": D, "ffn": F, "experts": E, "cores": 5}, "lr": LR, **sizes, "omoe": OMOE}
    return results, meta


def merge_runs(paths: list[Path]) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any]]:
    """Concatenate runs over disjoint seeds (same arms and steps) into one result."""
    runs = [json.loads(p.read_text()) for p in paths]
    meta = dict(runs[0]["meta"])
    if any(r["meta"]["steps"] != meta["steps"] or set(r["results"]) != set(runs[0]["results"]) for r in runs):
        raise ValueError("merge needs runs with the same steps and arms")
    results = {arm: [row for r in runs for row in r["results"][arm]] for arm in runs[0]["results"]}
    meta.update(seeds=len(next(iter(results.values()))), seconds=sum(r["meta"]["seconds"] for r in runs),
                seed_list=[s for r in runs for s in r["meta"].get("seed_list", [])])
    meta.pop("recommendation", None)
    return results, meta


DEFAULT_OUT = {"clusters": "specialisation", "multitask": "specialisation_multitask",
               "paired": "specialisation_sweep_paired"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("clusters", "multitask"), default="clusters",
                        help="clusters: one teacher per input cluster; multitask: the built-in toy_glue tasks")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="training steps after upcycling "
                                                                "(default 100 clusters, 300 multitask)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (seeds run in parallel)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    parser.add_argument("--merge", nargs="*", default=None,
                        help="instead of running: combine these JSON files (runs over different seeds) into --out")
    parser.add_argument("--paired", nargs="*", default=None,
                        help="instead of running: the paired-by-seed table (d cosine vs copy, loss vs FFN experts) "
                             "of these JSON results, one column pair each, to --out .md and the README's markers")
    parser.add_argument("--group", choices=("issue", "sweep", "multitask"), default=None,
                        help="issue: the issue's arms (the table in the README); sweep: small rotation angles / "
                             "re-init fractions alone and with null-space OMoE or aux_lr_mult 3 (+ copy, ffn); "
                             "multitask: copy, reinit_0.05, ffn, dense (default: issue, or multitask with "
                             "--task multitask)")
    parser.add_argument("--only", nargs="*", default=None, help="arm names to run (overrides --group)")
    parser.add_argument("--out", default=None, help="path prefix of .json/.md/.png (default results/"
                                                    "specialisation, _multitask or _sweep_paired)")
    args = parser.parse_args()
    args.group = args.group or ("multitask" if args.task == "multitask" else "issue")
    args.steps = args.steps or (300 if args.task == "multitask" else 100)
    out = Path(args.out or RESULTS / DEFAULT_OUT["paired" if args.paired else args.task])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.paired:
        out.with_suffix(".md").write_text(paired_table([common.read_json(Path(f)) for f in args.paired]))
        common.paste_into_readme(out.with_suffix(".md"))
        return
    if args.merge:
        results, meta = merge_runs([Path(f) for f in args.merge])
    else:
        results, meta = run_all(args)
    if "ffn" in results and "copy" in results:
        meta["recommendation"] = recommend(results)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if "recommendation" in meta:
        table = markdown(results, meta)
        out.with_suffix(".md").write_text(table)
        common.paste_into_readme(out.with_suffix(".md"))
        print(table)
    plot(results, meta, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
