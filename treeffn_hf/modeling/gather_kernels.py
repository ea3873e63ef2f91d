"""Triton kernels: SwiGLU over a per-token list of gathered neuron rows (decode / small batches).

Both sparse layers end in the same computation: for token n and its selected neurons r,

    y_n = sum_r  act(G_r . x_n) * (U_r . x_n) * D_r          (per-neuron activation)

with `G`, `U`, `D` three (neurons, hidden) row tables (`D` is `down_proj` transposed), so every
gathered row is contiguous. At decode sizes a GEMV is bound by memory latency, not bandwidth:
a program that walks the hidden dimension in a loop waits on one load after another, whatever
the density. So the work is cut into independent tiles, each loaded once, in two launches:

1. gate/up: one program per (token, block of rows, block of hidden) dots its tile with x and
   adds the partial g and u to fp32 buffers (split-K over hidden);
2. down: one program per (token, block of rows, block of hidden) forms act(g)*u for its rows and
   adds its tile's contribution to the fp32 output (split-K over rows).

Every sum is in fp32 (correct in fp16/bf16); the atomics make the summation order, not the
result beyond rounding, vary from run to run.

`gathered_swiglu_after_sum` is the tree's `activation='after_sum'` variant: a token's blocks of
equal width are summed before the activation, per tree.

Each kernel has its plain PyTorch reference beside it (`*_naive`), the oracle of the tests.
Only the SiLU activation (every supported architecture's) is implemented in the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the checkpoint still runs, on the PyTorch paths
    triton = None


def gathered_swiglu_naive(
    x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """x: (N, d); rows: (N, R) neuron indices, -1 = none; gate/up/down: (H, d). Returns (N, d)."""
    valid = rows >= 0
    safe = rows.clamp_min(0)
    xf = x.float()
    g = torch.einsum("nd,nrd->nr", xf, gate[safe].float())
    u = torch.einsum("nd,nrd->nr", xf, up[safe].float())
    a = F.silu(g) * u * valid
    return torch.einsum("nr,nrd->nd", a, down[safe].float()).to(x.dtype)


def gathered_swiglu_after_sum_naive(
    x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """rows: (N, T, B, W): per tree, B blocks of W neurons summed before the activation."""
    xf = x.float()
    g = torch.einsum("nd,ntbwd->ntw", xf, gate[rows].float())
    u = torch.einsum("nd,ntbwd->ntw", xf, up[rows].float())
    a = F.silu(g) * u
    return torch.einsum("ntw,ntbwd->nd", a, down[rows].float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _gathered_gate_up_kernel(
        x_ptr, rows_ptr, gate_ptr, up_ptr, g_ptr, u_ptr,
        hidden, num_rows,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        r_off = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        d_off = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_rows = r_off < num_rows
        rows = tl.load(rows_ptr + token * num_rows + r_off, mask=in_rows, other=-1)
        d_mask = d_off < hidden
        w_mask = (rows >= 0)[:, None] & d_mask[None, :]
        w_off = rows.to(tl.int64)[:, None] * hidden + d_off[None, :]
        xv = tl.load(x_ptr + token.to(tl.int64) * hidden + d_off, mask=d_mask, other=0.0).to(tl.float32)
        g = tl.sum(tl.load(gate_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * xv[None, :], axis=1)
        u = tl.sum(tl.load(up_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * xv[None, :], axis=1)
        tl.atomic_add(g_ptr + token * num_rows + r_off, g, mask=in_rows)
        tl.atomic_add(u_ptr + token * num_rows + r_off, u, mask=in_rows)

    @triton.jit
    def _gathered_down_kernel(
        rows_ptr, g_ptr, u_ptr, down_ptr, out_ptr,
        hidden, num_rows,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        r_off = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        d_off = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_rows = r_off < num_rows
        rows = tl.load(rows_ptr + token * num_rows + r_off, mask=in_rows, other=-1)
        r_mask = rows >= 0
        g = tl.load(g_ptr + token * num_rows + r_off, mask=in_rows, other=0.0)
        u = tl.load(u_ptr + token * num_rows + r_off, mask=in_rows, other=0.0)
        a = tl.where(r_mask, g * tl.sigmoid(g) * u, 0.0)
        d_mask = d_off < hidden
        dw = tl.load(down_ptr + rows.to(tl.int64)[:, None] * hidden + d_off[None, :],
                     mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(out_ptr + token.to(tl.int64) * hidden + d_off, tl.sum(a[:, None] * dw, axis=0), mask=d_mask)

    @triton.jit
    def _gathered_swiglu_after_sum_kernel(
        x_ptr, rows_ptr, gate_ptr, up_ptr, down_ptr, out_ptr,
        hidden, num_trees,
        BLOCKS: tl.constexpr, WIDTH: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)
        tree = tl.program_id(1)
        b_off = tl.arange(0, BLOCK_B)
        base = (token * num_trees + tree) * BLOCKS * WIDTH
        x_base = token.to(tl.int64) * hidden
        # Column j of the summed blocks is independent of the others: walk the width in chunks
        # (bounded registers for wide blocks), summing over blocks before the activation.
        for w0 in range(0, WIDTH, BLOCK_W):
            w_off = w0 + tl.arange(0, BLOCK_W)
            bw_mask = (b_off[:, None] < BLOCKS) & (w_off[None, :] < WIDTH)
            rows = tl.load(rows_ptr + base + b_off[:, None] * WIDTH + w_off[None, :], mask=bw_mask, other=0)
            row_base = rows.to(tl.int64) * hidden
            g = tl.zeros((BLOCK_W,), dtype=tl.float32)
            u = tl.zeros((BLOCK_W,), dtype=tl.float32)
            for d0 in range(0, hidden, BLOCK_D):
                d_off = d0 + tl.arange(0, BLOCK_D)
                d_mask = d_off < hidden
                xv = tl.load(x_ptr + x_base + d_off, mask=d_mask, other=0.0).to(tl.float32)
                w_mask = bw_mask[:, :, None] & d_mask[None, None, :]
                w_ptr = row_base[:, :, None] + d_off[None, None, :]
                gw = tl.load(gate_ptr + w_ptr, mask=w_mask, other=0.0).to(tl.float32)
                uw = tl.load(up_ptr + w_ptr, mask=w_mask, other=0.0).to(tl.float32)
                g += tl.sum(tl.sum(gw * xv[None, None, :], axis=2), axis=0)
                u += tl.sum(tl.sum(uw * xv[None, None, :], axis=2), axis=0)
            a = g * tl.sigmoid(g) * u
            for d0 in range(0, hidden, BLOCK_D):
                d_off = d0 + tl.arange(0, BLOCK_D)
                d_mask = d_off < hidden
                w_mask = bw_mask[:, :, None] & d_mask[None, None, :]
                dw = tl.load(down_ptr + row_base[:, :, None] + d_off[None, None, :], mask=w_mask, other=0.0)
                partial = tl.sum(tl.sum(a[None, :, None] * dw.to(tl.float32), axis=1), axis=0)
                tl.atomic_add(out_ptr + x_base + d_off, partial, mask=d_mask)


def _check(x: torch.Tensor, *tables: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package")
    for t in (x, *tables):
        if not t.is_contiguous():
            raise ValueError("Triton kernels expect contiguous row tables and inputs")


# (rows, hidden) tile of one program in each launch; set from benchmarks/tune_kernels.py.
GATE_UP_BLOCK = (32, 256)
DOWN_BLOCK = (64, 64)


def gathered_swiglu(
    x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    out: torch.Tensor | None = None, gate_up_block: tuple[int, int] | None = None,
    down_block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton version of `gathered_swiglu_naive`. With `out` (fp32, (N, d)) it accumulates into it
    and returns it; otherwise it returns a new tensor in x's dtype. The blocks override the tiles."""
    _check(x, rows, gate, up, down)
    n, hidden = x.shape
    num_rows = rows.shape[1]
    acc = out if out is not None else torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    if n and num_rows:
        rows = rows.to(torch.int32)
        g = torch.zeros(2, n, num_rows, dtype=torch.float32, device=x.device)
        block_r, block_d = gate_up_block or GATE_UP_BLOCK
        grid = (n, triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_d))
        _gathered_gate_up_kernel[grid](x, rows, gate, up, g[0], g[1], hidden, num_rows,
                                       BLOCK_R=block_r, BLOCK_D=block_d)
        block_r, block_d = down_block or DOWN_BLOCK
        grid = (n, triton.cdiv(num_rows, block_r), triton.cdiv(hidden, block_d))
        _gathered_down_kernel[grid](rows, g[0], g[1], down, acc, hidden, num_rows, BLOCK_R=block_r, BLOCK_D=block_d)
    return acc if out is not None else acc.to(x.dtype)


def gathered_swiglu_after_sum(
    x: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `gathered_swiglu_after_sum_naive`; `out` as in `gathered_swiglu`."""
    rows = rows.to(torch.int32).contiguous()
    _check(x, rows, gate, up, down)
    n, hidden = x.shape
    _, trees, blocks, width = rows.shape
    acc = out if out is not None else torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    if n:
        _gathered_swiglu_after_sum_kernel[(n, trees)](
            x, rows, gate, up, down, acc, hidden, trees, BLOCKS=blocks, WIDTH=width,
            BLOCK_B=triton.next_power_of_2(blocks), BLOCK_W=min(16, triton.next_power_of_2(width)), BLOCK_D=64,
        )
    return acc if out is not None else acc.to(x.dtype)

