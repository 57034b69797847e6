"""The Bernoulli gradient mask on MPO tensors (MPOE's answer to the central tensor's unbalanced updates).

The central tensor receives gradient from every expert and so is updated far
more than any auxiliary tensor. The mask keeps each gradient element with
probability p (optionally rescaling kept entries by 1/p) and zeroes the rest,
drawn fresh each optimizer step.

Rank consistency: the mask is a pure function of (seed, step, tensor key), so
every data-parallel rank draws the same mask for the same step without any
communication, and all micro-batches of one step share it. It is applied by a
tensor hook, i.e. to the gradient as autograd produces it, before DeepSpeed
accumulates and reduces it (ZeRO 0, 1 and 2 alike).

Note that the optimizer still sees masked-out elements: Adam's moments and
weight decay can move them. p = 0 therefore freezes the tensor outright
(``requires_grad=False``) instead of masking.
"""

from __future__ import annotations

from typing import Optional

import torch

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: decorrelates nearby seeds
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic, process-independent seed from integers (no Python hash())."""
    state = 0
    for part in parts:
        state = ((state ^ (int(part) & _MASK64)) * _MIX + 0x632BE59BD9B4E019) & _MASK64
        state ^= state >> 29
    return state & ((1 << 63) - 1)


class GradientMask:
    """Masks the gradients of the tensors attached to it; one instance per MoE layer.

    Call :meth:`set_step` with the optimizer step before each step's backward.
    """

    def __init__(self, keep_prob: float, rescale: bool = False, seed: int = 0) -> None:
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}; use requires_grad=False to freeze")
        self.keep_prob = keep_prob
        self.rescale = rescale
        self.seed = seed
        self.step = 0
        self._cache: dict[int, tuple[int, torch.Tensor]] = {}
        self.kept_elements = 0
        self.total_elements = 0

    @property
    def active(self) -> bool:
        return self.keep_prob < 1.0

    def set_step(self, step: int) -> None:
        if step != self.step:
            self.step = int(step)
            self.kept_elements = self.total_elements = 0

    def mask(self, key: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The keep mask (bool) of tensor ``key`` for the current step."""
        cached = self._cache.get(key)
        if cached is not None and cached[0] == self.step and cached[1].shape == shape:
            return cached[1]
        generator = torch.Generator(device=device).manual_seed(mix_seed(self.seed, self.step, key))
        keep = torch.rand(shape, generator=generator, device=device) < self.keep_prob
        self._cache[key] = (self.step, keep)
        return keep

    def apply(self, key: int, grad: torch.Tensor) -> torch.Tensor:
        keep = self.mask(key, grad.shape, grad.device)
        self.kept_elements += int(keep.sum())
        self.total_elements += keep.numel()
        masked = grad * keep
        return masked / self.keep_prob if self.rescale else masked

    def attach(self, param: torch.nn.Parameter, key: int) -> Optional[torch.utils.hooks.RemovableHandle]:
        """Register the mask on ``param``'s gradient; a no-op when keep_prob == 1."""
        if not self.active:
            return None
        return param.register_hook(lambda grad: self.apply(key, grad))

    def keep_ratio(self) -> float:
        """Fraction of gradient elements kept so far in the current step (nan before any)."""
        return self.kept_elements / self.total_elements if self.total_elements else float("nan")
