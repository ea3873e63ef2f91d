"""Tree blocks through PyTorch's grouped GEMM (the MoE primitive; CUTLASS on a Hopper GPU).

The same computation as `kernels_tree.grouped_block_swiglu` (and the same oracle,
`grouped_block_swiglu_naive`): item i adds block `item_blocks[i]`'s SwiGLU of token
`item_tokens[i]` to that token's output. Items are sorted by block, and each block's gate, up and
down slabs are one group of `grouped_mm`, so a prefill reads each live block once and runs three
GEMM launches in all, whatever the number of leaves, with no host sync.

`grouped_mm` wants 16-byte aligned strides: the hidden size must be a multiple of 8 (every real
model's is); the activations are stored with their width padded to that alignment. On CUDA it
takes bfloat16 only (the CPU runs any float dtype, which the tests use).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

STRIDE_ALIGNMENT_BYTES = 16


def grouped_mm_function() -> Optional[Callable]:
    """`F.grouped_mm` (public in recent torch), the private `torch._grouped_mm` before, or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_unavailable_reason(hidden: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why `grouped_block_swiglu_mm` cannot run on these weights, or None."""
    if grouped_mm_function() is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if hidden % 8:
        return f"grouped_mm needs 16-byte aligned rows; hidden size {hidden} is not a multiple of 8"
    if torch.device(device).type == "cuda" and dtype != torch.bfloat16:
        return f"grouped_mm on CUDA takes bfloat16, not {dtype}"
    return None


def grouped_block_swiglu_mm(x: torch.Tensor, item_tokens: torch.Tensor, item_blocks: torch.Tensor, num_blocks: int,
                            row_offset: int, width: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                            out: torch.Tensor) -> torch.Tensor:
    """Adds every item's block SwiGLU into `out` (fp32, (N, hidden)) and returns it."""
    reason = grouped_mm_unavailable_reason(x.shape[1], gate.dtype, gate.device)
    if reason is not None:
        raise RuntimeError(reason)
    if not item_tokens.numel():
        return out
    grouped_mm = grouped_mm_function()
    hidden = x.shape[1]
    order = torch.argsort(item_blocks, stable=True)
    # Not torch.bincount: on CUDA it waits for the host to size its output (no CUDA graphs).
    counts = torch.zeros(num_blocks, dtype=torch.long, device=x.device).scatter_add_(
        0, item_blocks, torch.ones_like(item_blocks))
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    tokens = item_tokens[order]
    xs = x.index_select(0, tokens)
    slabs = slice(row_offset, row_offset + num_blocks * width)
    # (blocks, width, hidden) slabs; transposed views are the column-major B the kernels prefer.
    g = grouped_mm(xs, gate[slabs].view(num_blocks, width, hidden).transpose(1, 2), offs=offsets)
    u = grouped_mm(xs, up[slabs].view(num_blocks, width, hidden).transpose(1, 2), offs=offsets)
    align = STRIDE_ALIGNMENT_BYTES // x.element_size()
    act = torch.empty(xs.shape[0], -(-width // align) * align, dtype=x.dtype, device=x.device)[:, :width]
    torch.mul(F.silu(g), u, out=act)
    y = grouped_mm(act, down[slabs].view(num_blocks, width, hidden), offs=offsets)
    return out.index_add_(0, tokens, y.float())
