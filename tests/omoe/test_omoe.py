"""The orthogonal expert optimizer (mpomoe_ds.omoe): math, orthogonality, resume, EP, diversity.

What is and is not orthogonal (asserted below, E = 2 so P_bar_{-0} = P_1):
    plain experts, projection="gradient", SGD   applied update orthogonal (exact up to alpha)
    plain experts, projection="update", Adam    applied update orthogonal (exact up to alpha)
    plain experts, projection="gradient", Adam  NOT orthogonal: Adam rescales per coordinate
    MPO experts,   projection="gradient", any   gradient of W_e orthogonal; the applied change
                                                of W_e is NOT (cores -> W is multilinear)
"Up to alpha": a direction seen with unit energy s^2 keeps alpha / (s^2 + alpha) of its
component; with alpha = 1e-4 the measured leak is ~2e-4, so the tolerance is 1e-3.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpomoe_ds.config import ConfigError
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.experts import activation_function
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.omoe.config import OMoEConfig
from mpomoe_ds.omoe.diversity import layer_expert_similarity
from mpomoe_ds.omoe.optimizer import OrthogonalExpertOptimizer, check_update_mode_supported
from mpomoe_ds.omoe.projector import mean_other_projector, owm_projector, owm_update


def begin_step(layer: MPOEMoE, omoe, step: int) -> MoEStep:
    """Step ``step`` of ``layer`` through the MoE step protocol (``omoe`` may be None); end it with end_step."""
    moe_step = MoEStep(layer, [omoe] if omoe else [])
    moe_step.begin_step(step)
    return moe_step

D, F = 16, 32
from conftest import ROOT as REPO  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


def make_layer(expert_type: str = "ffn", num_experts: int = 2, seed: int = 0, noise: float = 0.3,
               gated: bool = False) -> MPOEMoE:
    moe = MoEConfig(num_experts=num_experts, expert_type=expert_type, expert_init="perturb", init_noise=noise,
                    seed=seed, aux_loss_coef=0.0, layers="all", gated=gated, activation="silu" if gated else "gelu")
    return MPOEMoE(D, F, moe, MPOConfig(num_cores=3))


def only_layer(omoe: OrthogonalExpertOptimizer):
    (state,) = omoe.layers.values()
    return state


def unit_columns(columns_IK: torch.Tensor) -> torch.Tensor:
    return columns_IK / columns_IK.norm(dim=0, keepdim=True)


# --------------------------------------------------------------------------- config and schedule


@pytest.mark.parametrize("kwargs, field", [
    (dict(acc_steps=0), "omoe.acc_steps"),
    (dict(orth_steps=0), "omoe.orth_steps"),
    (dict(start_step=-1), "omoe.start_step"),
    (dict(alpha=0.0), "omoe.alpha"),
    (dict(alpha_final=-1.0), "omoe.alpha_final"),
    (dict(matrices=["up", "fc"]), "omoe.matrices"),
    (dict(matrices=[]), "omoe.matrices"),
    (dict(reset="sometimes"), "omoe.reset"),
    (dict(projection="adam"), "omoe.projection"),
])
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        OMoEConfig(**kwargs)


def test_phase_schedule_cycles_after_start_step_and_alpha_decays_geometrically() -> None:
    cfg = OMoEConfig(enabled=True, acc_steps=2, orth_steps=3, start_step=1, alpha=1.0, alpha_final=0.01)
    phases = [cfg.phase_at(s) for s in range(12)]
    assert [p[0][0] for p in phases] == list("oaaooo" "aaooo" "a")
    assert phases[3] == ("orthogonal", 0, 0) and phases[6] == ("accumulate", 1, 0)
    assert OMoEConfig(enabled=False).phase_at(500)[0] == "off"
    assert [cfg.alpha_at(i) for i in range(2)] == pytest.approx([1.0, 0.01])
    cfg3 = OMoEConfig(acc_steps=3, alpha=1.0, alpha_final=0.01)
    assert cfg3.alpha_at(1) == pytest.approx(0.1)
    assert OMoEConfig(alpha=0.5).alpha_at(7) == 0.5


# --------------------------------------------------------------------------- projector math


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_owm_recursion_equals_closed_form(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_local, dim, steps = 3, 10, 7
    inputs_KLI = torch.randn(steps, num_local, dim, generator=gen, dtype=torch.float64)
    present_KL = torch.rand(steps, num_local, generator=gen) > 0.25
    alphas = [0.5 * 0.7 ** t for t in range(steps)]
    P = torch.eye(dim, dtype=torch.float64).repeat(num_local, 1, 1)
    for t in range(steps):
        P = owm_update(P, inputs_KLI[t], alphas[t], present_KL[t])
    for e in range(num_local):
        keep = present_KL[:, e]
        A = inputs_KLI[keep, e].T  # (I, K): the inputs this expert saw
        closed = owm_projector(A, torch.tensor(alphas, dtype=torch.float64)[keep])
        assert torch.allclose(P[e], closed, atol=1e-10)
        # and the information-matrix form (I + sum_t r r^T / alpha_t)^{-1}
        info = torch.eye(dim, dtype=torch.float64) + (A / torch.tensor(alphas, dtype=torch.float64)[keep]) @ A.T
        assert torch.allclose(P[e], torch.linalg.inv(info), atol=1e-10)
        assert torch.allclose(P[e], P[e].T, atol=0)
        # P kills what it saw (eigenvalue alpha / (s^2 + alpha)) and keeps the rest.
        eig = torch.linalg.eigvalsh(P[e])
        assert eig.min() > 0 and eig.max() == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(owm_projector(torch.zeros(4, 0), 1.0), torch.eye(4))


def test_mean_other_projector_excludes_own_projector() -> None:
    P = torch.stack([torch.diag(torch.tensor(v)) for v in ([0.0, 1, 1], [1.0, 0, 1], [1.0, 1, 0])])
    pbar = mean_other_projector(P.sum(0), P, 3)
    assert torch.allclose(pbar[0], torch.diag(torch.tensor([1.0, 0.5, 0.5])))
    with pytest.raises(ValueError):
        mean_other_projector(P[0], P[:1], 1)


def test_projectors_of_a_routed_run_equal_the_closed_form_of_routed_mean_inputs() -> None:
    """Real layer + router: P_j = closed form of the (normalised) means of the tokens routed to j."""
    layer = make_layer("mpo", num_experts=4, seed=3, noise=0.2)
    cfg = OMoEConfig(enabled=True, acc_steps=4, orth_steps=2, alpha=0.05, matrices=["up", "down"], reset="never")
    omoe = OrthogonalExpertOptimizer(layer, cfg)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    act = activation_function(layer.config.activation)
    seen = {m: [[] for _ in range(4)] for m in ("up", "down")}
    for step in range(cfg.cycle_steps * 2):
        moe_step = begin_step(layer, omoe, step)
        layer.train()
        x = torch.randn(40, D, generator=gen)
        if omoe.phase == "accumulate":
            with torch.no_grad():
                chosen = layer.deepspeed_moe.gate(x).experts_TK[:, 0]
                weights, biases = layer.expert_weights(), layer.deepspeed_moe.experts.biases()
                for e in range(4):
                    xe = x[chosen == e]
                    if len(xe):
                        he = act(xe @ weights["up"][e] + biases["up"][e])
                        for m, v in (("up", xe.mean(0)), ("down", he.mean(0))):
                            seen[m][e].append((v / v.norm()).double())
        out, aux, _ = layer(x)
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        moe_step.end_step(step)
        if step in (cfg.acc_steps, cfg.cycle_steps + cfg.acc_steps):  # first orthogonal steps
            state = only_layer(omoe)
            for m in ("up", "down"):
                want = torch.stack([owm_projector(torch.stack(seen[m][e], 1), cfg.alpha) for e in range(4)])
                assert torch.allclose(state.projector[m].double(), want, atol=2e-5), m
                pbar = (want.sum(0) - want) / 3
                assert torch.allclose(state.mean_projector[m].double(), pbar, atol=2e-5), m


# --------------------------------------------------------------------------- orthogonality


def run_two_experts(expert_type: str, projection: str, optimizer: str, use_omoe: bool = True,
                    matrices: tuple[str, ...] = ("up", "down"), alpha: float = 1e-4,
                    gated: bool = False) -> dict[str, list[float]]:
    """E = 2 experts on designed inputs: expert 1 sees only span(e0, e1) (one random vector a step),
    expert 0 sees isotropic tokens. Returns, per orthogonal step and matrix, the leak
    ||A^T dW_0|| / ||dW_0|| of expert 0's applied update (and of its W-gradient), A the unit
    mean inputs expert 1 accumulated: how much expert 0's step moves its outputs on them."""
    layer = make_layer(expert_type, num_experts=2, seed=1, gated=gated)
    experts = layer.deepspeed_moe.experts
    cfg = OMoEConfig(enabled=True, acc_steps=6, orth_steps=3, alpha=alpha, matrices=list(matrices),
                     projection=projection)
    omoe = OrthogonalExpertOptimizer(layer, cfg) if use_omoe else None
    params = list(layer.parameters())
    opt = torch.optim.SGD(params, lr=0.05) if optimizer == "sgd" else torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    valid = torch.ones(2, 24, dtype=torch.bool)
    seen = {m: [] for m in matrices}
    grads: dict[str, torch.Tensor] = {}
    if omoe is not None:
        state = only_layer(omoe)
        original = state.transform_weight

        def transform_and_capture(exp, matrix, weight):  # the capture hook runs after the projection
            out = original(exp, matrix, weight)
            if out.requires_grad:
                out.register_hook(lambda g, m=matrix: grads.__setitem__(m, g.detach().clone()))
            return out
        state.transform_weight = transform_and_capture
    leaks: dict[str, list[float]] = {f"{kind}_{m}": [] for kind in ("update", "grad") for m in matrices}
    for step in range(cfg.cycle_steps):
        moe_step = begin_step(layer, omoe, step)
        phase = omoe.phase if omoe else cfg.phase_at(step)[0]
        experts.train()
        x = torch.randn(2, 24, D, generator=gen)
        x[1] = 0.0
        x[1, :, :2] = torch.randn(2, generator=gen)  # the same token 24 times: its mean is itself
        before = {m: w.detach().clone() for m, w in layer.expert_weights().items()}
        biases = experts.biases()
        h1 = activation_function(layer.config.activation)(
            x[1] @ before["gate" if gated else "up"][1] + biases["gate" if gated else "up"][1])
        if gated:  # act(x W_gate) * (x W_up)
            h1 = h1 * (x[1] @ before["up"][1] + biases["up"][1])
        y = experts(x, layer.central_tensors(), valid, hooks=omoe.expert_hooks(layer) if omoe else None)
        loss = (y * torch.randn(y.shape, generator=gen)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe_step.end_step(step)
        after = layer.expert_weights()
        if phase == "accumulate":
            for m, inputs in (("gate", x[1]), ("up", x[1]), ("down", h1)):
                if m in seen:
                    seen[m].append(inputs.detach().mean(0))
            continue
        for m in matrices:
            q = unit_columns(torch.stack(seen[m], 1))
            delta = (after[m] - before[m]).detach()[0]
            leaks[f"update_{m}"].append(float((q.T @ delta).norm() / delta.norm()))
            if m in grads:
                leaks[f"grad_{m}"].append(float((q.T @ grads[m][0]).norm() / grads[m][0].norm()))
    return leaks


@pytest.mark.parametrize("projection, optimizer", [("gradient", "sgd"), ("update", "adam"), ("update", "sgd")])
def test_applied_update_of_plain_expert_is_orthogonal_to_other_experts_inputs(projection: str, optimizer: str) -> None:
    leaks = run_two_experts("ffn", projection, optimizer)
    baseline = run_two_experts("ffn", projection, optimizer, use_omoe=False)
    for m in ("up", "down"):
        assert max(leaks[f"update_{m}"]) < 1e-3, (m, leaks)
        assert min(baseline[f"update_{m}"]) > 0.1, (m, baseline)  # without OMoE it is far from orthogonal


def test_applied_update_of_gated_plain_experts_is_orthogonal_for_every_matrix() -> None:
    """Gated experts (Llama's SwiGLU): "gate" sees the same inputs as "up" and is protected like it."""
    matrices = ("gate", "up", "down")
    leaks = run_two_experts("ffn", "update", "adam", matrices=matrices, gated=True)
    baseline = run_two_experts("ffn", "update", "adam", use_omoe=False, matrices=matrices, gated=True)
    for m in matrices:
        assert max(leaks[f"update_{m}"]) < 1e-3, (m, leaks)
        assert min(baseline[f"update_{m}"]) > 0.1, (m, baseline)


def test_adam_breaks_orthogonality_of_a_projected_gradient_for_plain_experts() -> None:
    leaks = run_two_experts("ffn", "gradient", "adam")
    assert max(leaks["grad_up"]) < 1e-3  # the gradient Adam receives is orthogonal ...
    assert min(leaks["update_up"]) > 0.05  # ... the update Adam applies is not (measured ~0.3)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_mpo_expert_gradient_of_W_is_orthogonal_but_applied_core_update_is_not(optimizer: str) -> None:
    leaks = run_two_experts("mpo", "gradient", optimizer)
    for m in ("up", "down"):
        assert max(leaks[f"grad_{m}"]) < 1e-3, (m, leaks)
    # The cores' update changes W by J J^T (P_bar G) + O(lr^2): measured 0.17-0.35 here.
    assert min(leaks["update_up"]) > 0.01


def test_update_projection_is_refused_for_mpo_experts_and_under_zero() -> None:
    with pytest.raises(ConfigError, match="omoe.projection"):
        OrthogonalExpertOptimizer(make_layer("mpo"), OMoEConfig(enabled=True, projection="update"))

    class Engine:
        def __init__(self, stage: int, bf16: bool) -> None:
            self.stage, self.bf16 = stage, bf16

        def zero_optimization_stage(self) -> int:
            return self.stage

        def fp16_enabled(self) -> bool:
            return False

        def bfloat16_enabled(self) -> bool:
            return self.bf16

    check_update_mode_supported(Engine(0, False))
    for engine in (Engine(1, False), Engine(0, True)):
        with pytest.raises(ConfigError, match="omoe.projection"):
            check_update_mode_supported(engine)
    with pytest.raises(ConfigError, match="num_experts >= 2"):
        OrthogonalExpertOptimizer(make_layer("ffn", num_experts=1), OMoEConfig(enabled=True))


def test_mean_projector_of_four_experts_kills_shared_directions_and_damps_single_ones() -> None:
    """Experts 1-3 each see span(e0, e1) (shared) + two own dims; P_bar_{-0} is ~0 on the shared
    dims, (E-2)/(E-1) = 2/3 on each other expert's own dims, 1 elsewhere: the mean's caveat."""
    layer = make_layer("ffn", num_experts=4)
    experts = layer.deepspeed_moe.experts
    cfg = OMoEConfig(enabled=True, acc_steps=12, orth_steps=1, alpha=1e-5, matrices=["up"])
    omoe = OrthogonalExpertOptimizer(layer, cfg)
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(4, 5, dtype=torch.bool)
    for step in range(cfg.acc_steps + 1):
        moe_step = begin_step(layer, omoe, step)
        x = torch.zeros(4, 5, D)
        x[0] = torch.randn(5, D, generator=gen)
        for j in (1, 2, 3):
            v = torch.zeros(D)
            v[[0, 1, 2 * j, 2 * j + 1]] = torch.randn(4, generator=gen)
            x[j] = v
        experts.train()
        experts(x, None, valid, hooks=omoe.expert_hooks(layer))
        moe_step.end_step(step)
    pbar0 = only_layer(omoe).mean_projector["up"][0]
    want = torch.ones(D)
    want[:2] = 0.0
    want[2:8] = 2.0 / 3.0
    assert torch.allclose(pbar0, torch.diag(want), atol=1e-3)


# --------------------------------------------------------------------------- step API, resume, cost


def train(layer: MPOEMoE, omoe: OrthogonalExpertOptimizer, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        moe_step = begin_step(layer, omoe, step)
        layer.train()
        out, aux, _ = layer(torch.randn(32, D, generator=gen))
        opt.zero_grad()
        (out - torch.randn(32, D, generator=gen)).square().mean().backward()
        opt.step()
        moe_step.end_step(step)


@pytest.mark.parametrize("expert_type, projection", [("mpo", "gradient"), ("ffn", "update")])
@pytest.mark.parametrize("stop", [2, 5])  # inside an accumulating / an orthogonal phase
def test_checkpoint_resume_is_bitwise_exact(expert_type: str, projection: str, stop: int) -> None:
    cfg = OMoEConfig(enabled=True, acc_steps=3, orth_steps=3, alpha=0.01, matrices=["up", "down"],
                     projection=projection)

    def build() -> tuple[MPOEMoE, OrthogonalExpertOptimizer, torch.optim.Optimizer]:
        layer = make_layer(expert_type, num_experts=4, seed=5)
        return layer, OrthogonalExpertOptimizer(layer, cfg), torch.optim.Adam(layer.parameters(), lr=1e-2)

    layer, omoe, opt = build()
    train(layer, omoe, opt, range(10))
    reference = copy.deepcopy(layer.state_dict())

    layer, omoe, opt = build()
    train(layer, omoe, opt, range(stop))
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict(), "omoe": omoe.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    layer, omoe, opt = build()
    layer.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    omoe.load_state_dict(saved["omoe"])
    train(layer, omoe, opt, range(stop, 10))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_resume_refuses_a_different_schedule() -> None:
    layer = make_layer("ffn", num_experts=2)
    state = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=True, acc_steps=3)).state_dict()
    other = OrthogonalExpertOptimizer(make_layer("ffn", num_experts=2), OMoEConfig(enabled=True, acc_steps=4))
    with pytest.raises(ValueError, match="omoe.acc_steps"):
        other.load_state_dict(state)


def test_nothing_is_recorded_or_projected_outside_training_phases() -> None:
    layer = make_layer("ffn", num_experts=2)
    omoe = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=True, acc_steps=2, orth_steps=2, start_step=2))
    state = only_layer(omoe)
    x = torch.randn(16, D)
    moe_step = begin_step(layer, omoe, 0)
    assert omoe.phase == "off" and omoe.expert_hooks(layer) is None
    layer.train()
    layer(x)[0].sum().backward()
    assert float(state.step_sum["up"].abs().sum()) == 0.0
    moe_step.end_step(0)
    moe_step.begin_step(2)
    assert omoe.phase == "accumulate" and omoe.expert_hooks(layer) is state
    layer.eval()
    layer(x)  # eval forward: no recording
    assert float(state.step_count["up"].sum()) == 0.0
    layer.train()
    layer(x)
    assert float(state.step_count["up"].sum()) == 16.0
    with pytest.raises(RuntimeError, match="begin_step"):
        omoe.end_step(3)
    state.clear_step()
    moe_step.end_step(2)
    layer(x)  # between steps the layer runs no hooks, so a training forward records nothing
    assert float(state.step_count["up"].sum()) == 0.0
    disabled = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=False))
    disabled.begin_step(5)
    assert disabled.expert_hooks(layer) is None  # disabled OMoE hands the layer nothing


def test_cost_reports_projector_memory_compute_and_communication() -> None:
    layer = make_layer("ffn", num_experts=4)
    omoe = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=True, acc_steps=10, orth_steps=30,
                                                       matrices=["up", "down"]))
    cost = omoe.cost(slots_per_expert=8)
    L = 4
    assert cost.projector_bytes == L * (D * D + F * F) * 4
    assert cost.per_layer["deepspeed_moe.experts.up"]["projector_bytes"] == L * D * D * 4
    assert cost.orth_step_macs == L * (D * D * F + F * F * D)
    assert cost.record_bytes == 10 * L * (D + 1 + F + 1) * 4
    assert cost.collectives_per_cycle == 0 and cost.comm_bytes_per_step == 0  # one process: no comm
    assert cost.as_dict()["phase_change_macs"] > 0


# --------------------------------------------------------------------------- diversity


def shared_teacher_similarity(seed: int, use_omoe: bool, steps: int = 150) -> float:
    """Clustered tokens, one teacher for all clusters: ordinary training makes every expert learn the
    same function; OMoE stops expert i from learning along directions the others' inputs span."""
    num_experts = 4
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_experts, D, generator=gen)
    centres = 3.0 * centres / centres.norm(dim=1, keepdim=True)
    teacher = torch.randn(D, D, generator=gen) / 4
    layer = make_layer("ffn", num_experts=num_experts, seed=seed, noise=0.05)
    omoe = None
    if use_omoe:
        omoe = OrthogonalExpertOptimizer(layer, OMoEConfig(enabled=True, acc_steps=10, orth_steps=10, alpha=1e-3,
                                                           matrices=["up", "down"]))
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = centres[torch.randint(0, num_experts, (n,), generator=gen)] + torch.randn(n, D, generator=gen)
        return x, torch.tanh(x @ teacher)

    held_out, _ = batch(256)
    for step in range(steps):
        moe_step = begin_step(layer, omoe, step)
        layer.train()
        x, y = batch(64)
        out, _, _ = layer(x)
        opt.zero_grad()
        (out - y).square().mean().backward()
        opt.step()
        moe_step.end_step(step)
    layer.eval()
    return layer_expert_similarity(layer, held_out).cosine


def test_omoe_lowers_expert_output_similarity_on_a_shared_teacher_problem() -> None:
    # Measured (cosine, ordinary -> OMoE): seeds 0-5 all lower, mean -0.031; the per-seed
    # margin is small (seed 1: -0.003), so the assertion is on the count and the mean.
    # Not all of it is OMoE's directions: a control that only shrinks each expert's
    # gradient by trace(P_bar)/d_in in orthogonal phases gets ~60% of this drop
    # (benchmarks/omoe_diversity.py); OMoE is below that control on 6/6 seeds by -0.012.
    diffs = [shared_teacher_similarity(s, True) - shared_teacher_similarity(s, False) for s in range(6)]
    assert sum(d < 0 for d in diffs) >= 5, diffs
    assert sum(diffs) / len(diffs) < -0.01, diffs


# --------------------------------------------------------------------------- two real ranks


@pytest.mark.distributed
def test_two_ranks_match_one_rank_and_communicate_only_at_phase_changes(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None, "torchrun not found: it ships with torch (pip install torch==2.13.0)"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               OMOE_RESULT=str(tmp_path / "result.txt"))
    with socket.socket() as sock:  # a free port (torchrun's port 0 is not reliable here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(REPO / "tests" / "dist" / "omoe_worker.py")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = (tmp_path / "result.txt").read_text().splitlines()
    assert lines and lines[-1] == "OK", lines
