"""Triton kernel: each token's top-k neuron indices, in one launch (the MGS gate's selection).

`torch.topk` on a GPU radix-selects in several launches per call (digit counts, prefix sums,
gathers; more for a long row), and at decode its fixed cost is of the order of the gathers it
feeds. Here one program per token holds the token's whole score row in registers and finds the
k-th largest score by bisection on an order-preserving integer key of the fp32 bits (32 steps,
each one count over the row), then writes the indices of the k largest scores, ties broken
towards the lower index, compacted with a prefix sum: ascending, int32, exactly k per token, the
row list the gather kernels read.

`topk_rows_naive` is the oracle: a stable descending sort. It differs from `torch.topk` only in
which of several tied scores at the k-th place it keeps (`torch.topk` leaves that unspecified).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# One program holds a whole row: beyond this many scores it would spill its registers.
MAX_ROW = 32768


def topk_rows_naive(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) int32 ascending indices of each row's k largest scores (ties: lower index first)."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values.to(torch.int32)


if triton is not None:

    @triton.jit
    def _topk_rows_kernel(scores_ptr, rows_ptr, width, k, BLOCK: tl.constexpr):
        token = tl.program_id(0)
        index = tl.arange(0, BLOCK)
        in_row = index < width
        value = tl.load(scores_ptr + token.to(tl.int64) * width + index, mask=in_row, other=0.0).to(tl.float32)
        bits = tl.where(value == 0.0, 0.0, value).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0, as in a sort
        # Flip the magnitude bits of negatives: signed integer order == float order.
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32: half the registers of int64
        key = tl.where(in_row, key, -2147483648)  # the int32 minimum: counted only at t = minimum
        # Largest t with count(key >= t) >= k, by bisection over the whole int32 range (bounds in
        # int64; every midpoint lies in [-2^31, 2^31 - 1], an int32).
        low = tl.full((), -(1 << 31), tl.int64)  # count >= k holds here (k <= width)
        high = tl.full((), 1 << 31, tl.int64)  # and fails here
        for _ in range(32):
            middle = (low + high) >> 1  # floor, for negative sums too
            enough = tl.sum((key >= middle.to(tl.int32)).to(tl.int32), axis=0) >= k
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        threshold = low.to(tl.int32)
        above = key > threshold  # padding sits at the minimum: never above
        ties = (key == threshold) & in_row
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0)  # 1-based, in index order
        keep = above | (ties & (tie_rank <= k - tl.sum(above.to(tl.int32), axis=0)))
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(rows_ptr + token.to(tl.int64) * k + slot, index, mask=keep)


def topk_rows_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton version of `topk_rows_naive`; scores: (N, H) contiguous, H <= MAX_ROW."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package")
    n, width = scores.shape
    if not 0 < k <= width:
        raise ValueError(f"k must be in 1..{width}, got {k}")
    if width > MAX_ROW:
        raise ValueError(f"the top-k kernel holds one row per program, at most {MAX_ROW} scores, got {width}")
    rows = torch.empty(n, k, dtype=torch.int32, device=scores.device)
    if n:
        block = triton.next_power_of_2(width)
        _topk_rows_kernel[(n,)](scores.contiguous(), rows, width, k, BLOCK=block,
                                num_warps=max(4, min(32, block // 512)))
    return rows
