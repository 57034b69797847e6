"""The ``moe`` section: experts, routing, the gradient mask (no torch needed).

The defaults are the embedded default run's: 4 experts in every other block,
top-1, dropless, experts perturbed per global id, expert parallelism over as
many ranks as there are processes (``ep_size: 0``, resolved by
:meth:`MoEConfig.with_ep_size` when layers are built). The Python API and the
training CLI start from the same values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from mpomoe_ds.config import ConfigError, check_choice, fail

# The expert matrices of an FFN, in x @ W orientation: up (D -> F), down (F -> D).
MATRICES = ("up", "down")

# A gated FFN (SwiGLU / GEGLU: Llama, Mistral, Qwen, T5 1.1) adds gate (D -> F):
# h = act(x W_gate) * (x W_up), y = h W_down.
GATED_MATRICES = ("gate", "up", "down")


def ffn_matrices(gated: bool) -> tuple[str, ...]:
    """The expert matrix positions of a plain (up, down) or gated (gate, up, down) FFN."""
    return GATED_MATRICES if gated else MATRICES

# Expert activation name -> (torch.nn.functional function, keyword arguments); the
# experts resolve it, the config only needs the names.
ACTIVATIONS: dict[str, tuple[str, dict[str, str]]] = {
    "gelu": ("gelu", {}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "relu": ("relu", {}),
    "silu": ("silu", {}),
}


NOISY_GATES = ("none", "jitter", "rsample")


GATE_WEIGHTINGS = ("straight_through", "normalized", "softmax")


DROP_POLICIES = ("position", "probs")


DROPLESS_IMPLS = ("padded", "segments")


EXPERT_TYPES = ("mpo", "ffn")


EXPERT_INITS = ("copy", "perturb")


DISPATCH_MODES = ("tokens", "aux_gather", "auto")


@dataclass
class MoEConfig:
    """The MoE layer: experts, routing and the central-tensor gradient mask.

    num_experts: E, experts per MoE layer.
    ep_size: expert-parallel group size; num_experts % ep_size == 0. 0 = automatic:
        the largest divisor of num_experts that divides the number of processes
        (:meth:`with_ep_size`; 1 in a single process).
    k: experts per token (top-k).
    capacity_factor / eval_capacity_factor: slots per expert = ceil(k*T/E * factor);
        ignored when dropless.
    min_capacity: lower bound on slots per expert.
    dropless: no token is dropped; the capacity is the largest per-expert load
        across the expert-parallel group.
    dropless_impl: how dropless routing lays tokens out for the experts.
        "padded" (default): every expert gets C = the group's largest load
        slots per source rank (equal-split all-to-all, batched matmuls; under
        skewed routing most slots are padding). "segments": an all-to-all with
        per-expert split sizes and a grouped matmul over variable-sized expert
        segments, so computed slots equal routed tokens; the same math to
        roundoff, not bit-identical to "padded" (mpomoe_ds.moe.token_dispatcher).
        Needs dropless: true and token dispatch (refused with dispatch:
        aux_gather, which has no all-to-all; ignored where auto picks it).
    drop_policy: which routes survive a full expert: "position" (earlier
        tokens, first choices first) or "probs" (higher router probability).
    aux_loss_coef: weight of the Switch load-balancing loss E * sum_e f_e P_e.
    noisy_gate: "none", "jitter" (multiplicative input noise) or "rsample"
        (Gumbel noise on the logits used to select experts), training only.
    gate_weighting: how router probabilities weight expert outputs:
        "straight_through" w = p / sum_topk(p).detach() (value: the normalised
        top-k probabilities, exactly 1 for k=1, so upcycling is exact),
        "normalized" w = p / sum_topk(p) (full gradient; k>=2 only),
        "softmax" w = p (DeepSpeed's top-1 behaviour).
    expert_type: "mpo" (shared central tensor + per-expert auxiliaries) or
        "ffn" (plain dense experts: the standard-MoE baseline).
    activation: the expert FFN activation.
    gated: gated experts (gate, up, down): h = act(x W_gate) * (x W_up), as
        Llama / Mistral / Qwen / T5 1.1 compute it; conversion sets it from
        the model family (like activation).
    expert_bias: experts train their biases. False = every expert bias stays
        at its initial zero (frozen): conversion sets it for families whose FFN
        has no biases (Llama, Mistral, Qwen, T5), so experts compute the same
        function class and merge into bias-free MoE classes (Mixtral, Qwen-MoE).
    layers: which FFN blocks become MoE: "all", "every_other" (1, 3, 5, ...),
        or a list of layer indices.
    expert_init: "copy" (every expert the pretrained FFN) or "perturb"
        (auxiliary / expert weights get relative noise init_noise, seeded per
        global expert id).
    init_noise: relative std of the "perturb" noise.
    seed: seed for router init and per-expert noise.
    central_grad_keep_prob: p of the Bernoulli mask on the central tensor's
        gradient (1 = no mask, 0 = central tensor frozen).
    central_grad_rescale: multiply kept gradient entries by 1/p.
    aux_grad_keep_prob: the same mask on auxiliary tensors (1 = off).
    shard_central: with ep_size > 1, each rank of the expert-parallel group
        holds 1/ep_size of every central tensor (and of its gradient and
        optimizer state) and all-gathers it to rebuild experts, instead of a
        full replica per rank (mpomoe_ds.moe.central). No effect at ep_size 1.
    enabled: False = no block is converted: the dense pretrained model trains
        through the same CLI, data, loop, metrics and TensorBoard (the dense
        baseline); every other key of this section is then ignored.
    rotation_angle: symmetry breaking at upcycling (MPO experts). Per expert
        and matrix, each auxiliary core next to the central core is multiplied
        on the bond it shares with the central by its own random rotation
        R_e = expm(angle * log(R_haar)), R_haar Haar-distributed on SO(d):
        A_left -> A_left R_e, A_right -> R'_e A_right. The shared central is
        not compensated, so W_e moves away from the pretrained W (same
        function class: auxiliaries are free parameters). 0 = exact upcycling,
        1 = a Haar-random rotation; in between the geodesic fraction of it.
        Seeded per global expert id (independent of ep_size and rank).
        Applied after the gauge (mpo.gauge) and before expert_init noise.
    aux_reinit_fraction: f, partial re-initialisation of every auxiliary core
        A of every expert (MPO experts; biases untouched):
        A -> sqrt(1 - f) * A + sqrt(f) * rms(A) * G, G standard Gaussian
        seeded per global expert id, rms(A) the core's own root mean square,
        so the core's expected RMS is kept. 0 = off, 1 = a fully random core
        of the same scale. Applied after rotation_angle.
    dispatch: how expert parallelism moves data (mpomoe_ds.moe.aux_gather):
        "tokens" (all-to-all of routed tokens to the experts' owners),
        "aux_gather" (every rank all-gathers the experts' auxiliary tensors over
        the expert-parallel group once per optimizer step, rebuilds every
        expert and computes its own tokens; gradients are summed back to the
        owners; MPO experts only), or "auto" (per layer, from the cost model
        mpomoe_ds.moe.dispatch_cost and link_gbps / device_tflops).
    link_gbps: expert-parallel link bandwidth in GB/s (bytes, one direction)
        that "auto" assumes.
    device_tflops: reconstruction FLOP rate in TFLOP/s that "auto" assumes.
    """

    num_experts: int = 4
    ep_size: int = 0
    k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = True
    dropless_impl: str = "padded"
    drop_policy: str = "position"
    aux_loss_coef: float = 0.01
    noisy_gate: str = "none"
    gate_weighting: str = "straight_through"
    expert_type: str = "mpo"
    activation: str = "gelu"
    gated: bool = False
    expert_bias: bool = True
    layers: Union[str, list[int]] = "every_other"
    expert_init: str = "perturb"
    init_noise: float = 0.01
    seed: int = 1234
    central_grad_keep_prob: float = 1.0
    central_grad_rescale: bool = False
    aux_grad_keep_prob: float = 1.0
    shard_central: bool = False
    enabled: bool = True
    rotation_angle: float = 0.0
    aux_reinit_fraction: float = 0.0
    dispatch: str = "tokens"
    link_gbps: float = 25.0
    device_tflops: float = 100.0

    def __post_init__(self) -> None:
        s = "moe"
        if self.num_experts < 1:
            fail(s, "num_experts", self.num_experts, "use at least 1 expert")
        if self.ep_size < 0:
            fail(s, "ep_size", self.ep_size, "use ep_size >= 1, or 0 for automatic (the training CLI picks "
                  "the largest divisor of num_experts that divides the number of processes)")
        if self.ep_size and self.num_experts % self.ep_size:
            divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
            fail(s, "ep_size", self.ep_size,
                  f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                  f"use an ep_size in {divisors} or change num_experts to a multiple of {self.ep_size}")
        if not 1 <= self.k <= self.num_experts:
            fail(s, "k", self.k, f"use 1 <= k <= num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            fail(s, "capacity_factor", (self.capacity_factor, self.eval_capacity_factor),
                  "capacity factors must be > 0 (or set dropless: true)")
        if self.min_capacity < 0:
            fail(s, "min_capacity", self.min_capacity, "use min_capacity >= 0")
        check_choice(s, "drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(s, "dropless_impl", self.dropless_impl, DROPLESS_IMPLS)
        if self.dropless_impl == "segments" and not self.dropless:
            fail(s, "dropless_impl", self.dropless_impl, "segments dispatch is for dropless routing (no capacity); "
                  "set dropless: true, or dropless_impl: padded with a capacity_factor")
        if self.aux_loss_coef < 0:
            fail(s, "aux_loss_coef", self.aux_loss_coef, "use a coefficient >= 0")
        check_choice(s, "noisy_gate", self.noisy_gate, NOISY_GATES)
        check_choice(s, "gate_weighting", self.gate_weighting, GATE_WEIGHTINGS)
        if self.gate_weighting == "normalized" and self.k == 1:
            fail(s, "gate_weighting", self.gate_weighting,
                  "with k=1 normalised weights are constant 1 and the router gets no gradient; "
                  "use 'straight_through' (same value, router trained) or 'softmax'")
        check_choice(s, "expert_type", self.expert_type, EXPERT_TYPES)
        check_choice(s, "activation", self.activation, ACTIVATIONS)
        if isinstance(self.layers, str):
            check_choice(s, "layers", self.layers, ("all", "every_other"))
        elif not all(isinstance(i, int) and i >= 0 for i in self.layers) or not self.layers:
            fail(s, "layers", self.layers, "give 'all', 'every_other' or a non-empty list of layer indices")
        check_choice(s, "expert_init", self.expert_init, EXPERT_INITS)
        if self.init_noise < 0:
            fail(s, "init_noise", self.init_noise, "use a relative noise std >= 0")
        for name in ("central_grad_keep_prob", "aux_grad_keep_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                fail(s, name, p, "a keep probability must be in [0, 1] (1 disables the mask, 0 freezes)")
        if self.shard_central and self.expert_type != "mpo":
            fail(s, "shard_central", True, "plain experts (expert_type 'ffn') have no central tensor; "
                  "set shard_central: false or expert_type: mpo")
        check_choice(s, "dispatch", self.dispatch, DISPATCH_MODES)
        if self.dispatch == "aux_gather" and self.expert_type != "mpo":
            fail(s, "dispatch", self.dispatch, "aux_gather ships auxiliary tensors and rebuilds experts from the "
                  "shared central tensor, which plain experts (expert_type 'ffn') do not have; use "
                  "dispatch: tokens (or auto, which picks tokens for them) or expert_type: mpo")
        if self.dispatch == "aux_gather" and self.dropless_impl == "segments":
            fail(s, "dropless_impl", self.dropless_impl, "segments lays out the token all-to-all, which aux_gather "
                  "does not run (each rank computes its own tokens, padded per expert); set dropless_impl: "
                  "padded, or dispatch: tokens (or auto: segments applies where it picks tokens)")
        for name in ("link_gbps", "device_tflops"):
            if getattr(self, name) <= 0:
                fail(s, name, getattr(self, name), "the auto dispatch cost model needs a positive rate")
        if self.aux_grad_keep_prob == 0.0:
            fail(s, "aux_grad_keep_prob", 0.0, "freezing every expert's auxiliaries leaves nothing to train; "
                  "use a value in (0, 1]")
        self._check_symmetry_breaking()

    def _check_symmetry_breaking(self) -> None:
        s = "moe"
        for name in ("rotation_angle", "aux_reinit_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                fail(s, name, value, "use a value in [0, 1] (0 = exact upcycling / off)")
            if value > 0 and self.expert_type != "mpo":
                fail(s, name, value, "plain experts (expert_type 'ffn') have no auxiliary cores; use "
                      "expert_init: perturb to break their symmetry, or expert_type: mpo")

    def with_ep_size(self, world_size: int) -> "MoEConfig":
        """This config with ``ep_size: 0`` (automatic) resolved for ``world_size`` processes.

        Automatic = the largest divisor of ``num_experts`` that also divides the
        world size, so every rank holds the same number of experts. An explicit
        ep_size is returned unchanged.
        """
        if self.ep_size:
            return self
        ep = max(d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0 and world_size % d == 0)
        return dataclasses.replace(self, ep_size=ep)

    @property
    def matrices(self) -> tuple[str, ...]:
        """The expert matrix positions, in computation order."""
        return ffn_matrices(self.gated)

    @property
    def num_local_experts(self) -> int:
        if not self.ep_size:
            raise ConfigError("moe.ep_size=0 (automatic) must be resolved before building layers: "
                              "use MoEConfig.with_ep_size(world_size), or set an explicit ep_size")
        return self.num_experts // self.ep_size

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """The FFN block indices that become MoE in a model with num_layers blocks."""
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "every_other":
            return list(range(1, num_layers, 2))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            fail("moe", "layers", self.layers, f"indices {bad} do not exist; the model has {num_layers} layers "
                  f"(0..{num_layers - 1})")
        return sorted(set(self.layers))
