"""Cost model for the expert-parallel dispatch modes (``moe.dispatch``); no torch needed.

Per rank and per optimizer step, for one MoE layer with E experts over an
expert-parallel group of P ranks (L = E / P local experts), T tokens per
micro-batch, k routes per token, hidden size D, G micro-batches per step and
b bytes per value, counting the bytes a rank sends (it receives as many) with
bandwidth-optimal collectives:

* tokens: dispatch and combine are one all-to-all each in the forward and
  again in the backward, each sending the (P-1)/P of ``T * k * D`` values that
  leave the rank: ``4 * G * T * k * D * b * (P-1)/P``. (Dropless padding to the
  largest load only adds to it; it is left out, so this is a lower bound.)
* aux_gather: one all-gather of every expert's auxiliary tensors and biases
  per step (the per-step reconstruction holds both, so G drops out) and its
  adjoint reduce-scatter: ``2 * E * (A + B) * b * (P-1)/P`` for A auxiliary
  and B bias values per expert. (On gloo the reduce-scatter is an all-to-all
  of blocks, which sends the same (P-1)/P; mpomoe_ds.parallel counts both
  kinds this way.) Its price is compute: each rank rebuilds all E experts
  instead of its L, once per step, forward and backward (about 3x the
  forward's FLOPs).

Time = bytes / link bandwidth (+ extra reconstruction FLOPs / FLOP rate for
aux_gather); the expert FFN compute itself is the same in both modes (each
token is computed once) and drops out. ``auto`` picks the cheaper mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Reconstruction backward costs about twice its forward (two GEMMs per contraction).
RECONSTRUCTION_PASSES = 3.0


@dataclass(frozen=True)
class DispatchWorkload:
    """What the cost model needs about one MoE layer and its run (see the module docstring)."""

    tokens_per_rank: int
    hidden_size: int
    k: int
    accumulation: int
    dtype_bytes: int
    aux_per_expert: int
    bias_per_expert: int
    num_experts: int
    ep_size: int
    reconstruction_flops_per_expert: float
    link_gbps: float
    device_tflops: float

    def __post_init__(self) -> None:
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}")
        if self.link_gbps <= 0 or self.device_tflops <= 0:
            raise ValueError("link_gbps and device_tflops must be positive")

    @property
    def _leaving(self) -> float:
        """The fraction of a collective's payload that leaves the rank."""
        return (self.ep_size - 1) / self.ep_size

    def token_bytes(self) -> float:
        """Bytes a rank sends per optimizer step with token dispatch."""
        per_micro_batch = 4 * self.tokens_per_rank * self.k * self.hidden_size * self.dtype_bytes
        return self.accumulation * per_micro_batch * self._leaving

    def aux_bytes(self) -> float:
        """Bytes a rank sends per optimizer step with aux_gather."""
        per_expert = self.aux_per_expert + self.bias_per_expert
        return 2 * self.num_experts * per_expert * self.dtype_bytes * self._leaving

    def extra_reconstruction_flops(self) -> float:
        """FLOPs aux_gather adds per step: rebuilding the E - L experts this rank does not own."""
        remote = self.num_experts - self.num_experts // self.ep_size
        return RECONSTRUCTION_PASSES * remote * self.reconstruction_flops_per_expert

    def token_seconds(self) -> float:
        return self.token_bytes() / (self.link_gbps * 1e9)

    def aux_seconds(self) -> float:
        communication = self.aux_bytes() / (self.link_gbps * 1e9)
        return communication + self.extra_reconstruction_flops() / (self.device_tflops * 1e12)

    def choice(self) -> str:
        """"aux_gather" when it is cheaper, else "tokens" (also for ep_size 1: nothing moves)."""
        if self.ep_size == 1:
            return "tokens"
        return "aux_gather" if self.aux_seconds() < self.token_seconds() else "tokens"

    def report(self) -> dict:
        """The inputs and every derived number, for logs and benchmark tables."""
        return {**asdict(self), "token_bytes": self.token_bytes(), "aux_bytes": self.aux_bytes(),
                "extra_reconstruction_flops": self.extra_reconstruction_flops(),
                "token_seconds": self.token_seconds(), "aux_seconds": self.aux_seconds(), "choice": self.choice()}
