"""Grouped matmul over variable-sized expert segments (dropless dispatch without padding).

Shape legend: R rows (routed tokens, all local experts together), L local
experts, I / O a matrix's rows / columns. Rows are sorted by local expert:
segment l is ``segments_L[l]`` consecutive rows, all multiplied by ``W[l]``.

``torch._grouped_mm(x_RI, W_LIO, offs=cumsum(segments))`` does it in one call
where it runs: checked on torch 2.13's CPU build for float32 / bfloat16 /
float16, forward and backward, empty segments included (bit-identical to the
loop in float32), with the kernel's requirement that every row stride is a
multiple of 16 bytes. On CUDA only bfloat16 takes it: that is torch's CUTLASS
fast path (sm90+; pytorch#150374), while float32 / float16 there run torch's
own per-group loop with a device-to-host sync (pytorch#162059), no better than
ours. Not run on a GPU yet (no GPU in this project). The inputs are cast to
the weights' dtype first: ``_grouped_mm`` is not autocast-aware
(pytorch#174763). The fallback loops over the L segments: the same rows, no
padding either.
"""

from __future__ import annotations

import torch

GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def grouped_mm_available(x_RI: torch.Tensor, w_LIO: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run this product (dtype, device, 16-byte-aligned rows)."""
    if not hasattr(torch, "_grouped_mm") or x_RI.shape[0] == 0:
        return False
    dtypes = GROUPED_MM_DTYPES.get(x_RI.device.type, ())
    if x_RI.dtype not in dtypes or w_LIO.dtype != x_RI.dtype:
        return False
    item = x_RI.element_size()
    return (x_RI.shape[1] * item) % 16 == 0 and (w_LIO.shape[2] * item) % 16 == 0


def grouped_mm(x_RI: torch.Tensor, w_LIO: torch.Tensor, segments_L: torch.Tensor) -> torch.Tensor:
    """(R, O): rows of segment l times ``w_LIO[l]``; ``segments_L`` (int, (L,)) sums to R."""
    if grouped_mm_available(x_RI, w_LIO):
        offsets_L = torch.cumsum(segments_L, 0).to(device=x_RI.device, dtype=torch.int32)
        return torch._grouped_mm(x_RI.contiguous(), w_LIO.contiguous(), offs=offsets_L)
    parts = x_RI.split(segments_L.tolist())
    return torch.cat([part @ w_IO for part, w_IO in zip(parts, w_LIO)])


def grouped_linear(x_RI: torch.Tensor, w_LIO: torch.Tensor, b_LO: torch.Tensor,
                   segments_L: torch.Tensor) -> torch.Tensor:
    """``x W[l] + b[l]`` per segment: the segment form of ``baddbmm(b, x_LSI, W_LIO)``."""
    expert_R = torch.repeat_interleave(torch.arange(len(segments_L), device=x_RI.device),
                                       segments_L.to(x_RI.device), output_size=x_RI.shape[0])
    return grouped_mm(x_RI, w_LIO, segments_L) + b_LO.index_select(0, expert_R)


def pad_segments(x_RI: torch.Tensor, segments_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, S, I) zero-padded per-expert rows and the (L, S) mask of real ones, S = the largest segment.

    For consumers that read per-expert slots (an expert hook's ``observe_inputs``); the compute never pads.
    """
    num_local = len(segments_L)
    width = max(int(segments_L.max()) if num_local else 0, 1)
    slots_S = torch.arange(width, device=x_RI.device)
    valid_LS = slots_S.unsqueeze(0) < segments_L.to(x_RI.device).unsqueeze(1)
    padded = x_RI.new_zeros(num_local, width, x_RI.shape[1])
    padded[valid_LS] = x_RI
    return padded, valid_LS
