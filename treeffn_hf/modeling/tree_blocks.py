"""The trainable block computation of a tree layer: tokens sorted by block, one gated MLP per block.

`grouped_block_mlp` is what `tree_layer.tree_ffn_blocks` (the training path of trees whose leaves
select their neurons) runs for each set of blocks: a token's leaf, or its node at one level. Its
oracle is `tree_layer.tree_ffn_masked_dense`, which computes every stored row and masks (tests hold
both, forward and backward, to each other).

Autograd over per-block views of the tables cost more than the GEMMs: each view's backward
materialises a gradient of its own, the views' gradients are stacked into one, and a slice's
backward zero-fills the whole table, for each table of each layer at every step. Here the backward
writes each block's gradient into its rows of one gradient per table and zero-fills only the rows no
token reached. Under autocast the GEMMs and the activation run in the autocast dtype, as autograd
would run them; the weights stay in theirs.
"""

from __future__ import annotations

import torch
from torch import nn


class _GroupedBlockMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sorted: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                counts: list[int], start: int, width: int, act_fn: nn.Module) -> torch.Tensor:
        device = x_sorted.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else torch.result_type(x_sorted, gate))
        with torch.autocast(device, enabled=False):
            x = x_sorted.to(dtype)
            out = x.new_empty(x.shape[0], down.shape[1])
            gate_pre, up_pre = x.new_empty(x.shape[0], width), x.new_empty(x.shape[0], width)
            for rows, tokens in _runs(counts, start, width):
                g = torch.matmul(x[tokens], gate[rows].to(dtype).T, out=gate_pre[tokens])
                u = torch.matmul(x[tokens], up[rows].to(dtype).T, out=up_pre[tokens])
                torch.matmul(act_fn(g) * u, down[rows].to(dtype), out=out[tokens])
        ctx.save_for_backward(x, gate, up, down, gate_pre, up_pre)
        ctx.counts, ctx.start, ctx.width, ctx.act_fn, ctx.input_dtype = counts, start, width, act_fn, x_sorted.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate, up, down, gate_pre, up_pre = ctx.saved_tensors
        dtype, device = x.dtype, x.device.type
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        grad_x = torch.zeros_like(x) if need_x else None
        grads = [_unreached_zeroed(table, ctx.counts, ctx.start, ctx.width) if need else None
                 for table, need in ((gate, need_gate), (up, need_up), (down, need_down))]
        grad_gate, grad_up, grad_down = grads
        with torch.autocast(device, enabled=False):
            grad_out = grad_out.to(dtype)
            for rows, tokens in _runs(ctx.counts, ctx.start, ctx.width):
                z, dy = x[tokens], grad_out[tokens]
                with torch.enable_grad():
                    g = gate_pre[tokens].detach().requires_grad_(True)
                    activated = ctx.act_fn(g)
                u = up_pre[tokens]
                d_hidden = dy @ down[rows].to(dtype).T
                if need_down:
                    grad_down[rows] = (activated.detach() * u).T @ dy
                d_up = d_hidden * activated.detach()
                (d_gate,) = torch.autograd.grad(activated, g, d_hidden * u)
                if need_gate:
                    grad_gate[rows] = d_gate.T @ z
                if need_up:
                    grad_up[rows] = d_up.T @ z
                if need_x:
                    grad_x[tokens] = d_gate @ gate[rows].to(dtype) + d_up @ up[rows].to(dtype)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, grad_gate, grad_up, grad_down, None, None, None, None


def _runs(counts: list[int], start: int, width: int):
    """(table rows, sorted-token rows) of each block that has tokens."""
    first = 0
    for block, count in enumerate(counts):
        if count:
            yield slice(start + block * width, start + (block + 1) * width), slice(first, first + count)
        first += count


def _unreached_zeroed(table: torch.Tensor, counts: list[int], start: int, width: int) -> torch.Tensor:
    """A gradient for `table` whose rows outside the reached blocks are zero (the rest is written)."""
    grad = torch.empty_like(table)
    grad[:start].zero_()
    grad[start + len(counts) * width:].zero_()
    for block, count in enumerate(counts):
        if not count:
            grad[start + block * width : start + (block + 1) * width].zero_()
    return grad


def grouped_block_mlp(x: torch.Tensor, block: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, start: int, width: int, num_blocks: int, act_fn: nn.Module) -> torch.Tensor:
    """(N, hidden): for each token i, act(x_i G_b^T) * (x_i U_b^T) D_b with b = block[i], where block
    b holds the table rows start + b * width onwards. Differentiable in x and the three tables."""
    order = torch.argsort(block, stable=True)
    counts = torch.bincount(block, minlength=num_blocks).tolist()
    y = _GroupedBlockMLP.apply(x.index_select(0, order), gate, up, down, counts, start, width, act_fn)
    return torch.empty_like(y).index_copy_(0, order, y)
