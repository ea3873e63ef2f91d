"""Triton kernels of the tree FFN: routing, path gathers and masked GEMMs.

- `tree_route_triton`: one program per (token, tree) walks the depth, dotting x with the node's
  routing vector, and writes the path (heap index per level) and the leaf. Equals `tree_route`.
  `tree_route_rows_triton` (decode) is the same kernel also writing each token's row list.
- `gather` (decode, few tokens): the path's rows go to `gather_kernels.gathered_swiglu`
  (per-node activation) or `gathered_swiglu_after_sum`.
- `masked_dense` (batches past the switch point): the routing kernel, then cuBLAS GEMMs over
  every stored row with each token's off-path rows zeroed (`tree_ffn_masked_dense`).

`tree_ffn_triton` chains them for a `TreeFFN` (the variant from `kernel_variant`) and says which
kernels ran. Forward only: training uses the differentiable reference path (see
`dispatch.choose_path`). Variants that never won a measured GPU run were removed (docs/layers.md,
"Implementations and dispatch", says what they did).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather_kernels import gathered_swiglu, gathered_swiglu_after_sum
from .tree_reference import tree_ffn_masked_dense, tree_route
from .tree_torch import routing_bias, routing_matrix

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

VARIANTS = ("gather", "masked_dense")  # the switch point: KernelPolicy.tree_gather_max_row_multiple


def tree_route_naive(x, vectors, bias, num_trees: int, depth: int):
    """Reference of `tree_route_triton`: the layer's own walker on fp32 scores."""
    nodes = vectors.shape[0] // num_trees
    return tree_route(x.float(), vectors.float().view(num_trees, nodes, -1),
                      None if bias is None else bias.float().view(num_trees, nodes), depth)


if triton is not None:

    @triton.jit
    def _tree_route_rows_kernel(
        x_ptr, vectors_ptr, bias_ptr, slots_ptr, rows_ptr, leaf_ptr, path_ptr,
        hidden, num_trees, num_nodes, num_leaves, node_rows, shared_start, row_stride,
        DEPTH: tl.constexpr, NODE_WIDTH: tl.constexpr, LEAF_WIDTH: tl.constexpr, SHARED: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
        WRITE_ROWS: tl.constexpr,
    ):
        """Per (token, tree), walk the depth and write the path and the leaf. With WRITE_ROWS (decode)
        also the path's rows (node blocks, then the leaf block; the shared rows once per token) in
        the order of `path_rows`, so the gather kernels follow with no index arithmetic between.
        The walk dots one node per level (each level's load waits on the last level's choice)."""
        token = tl.program_id(0)
        tree = tl.program_id(1)
        x_base = token.to(tl.int64) * hidden
        out_base = token.to(tl.int64) * row_stride + tree * (DEPTH * NODE_WIDTH + LEAF_WIDTH)
        position = tl.zeros((), dtype=tl.int32)
        for level in tl.static_range(DEPTH):
            heap = position + ((1 << level) - 1)
            v_base = (tree * num_nodes + heap).to(tl.int64) * hidden
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for d0 in range(0, hidden, BLOCK_D):  # one step when BLOCK_D covers hidden
                d_off = d0 + tl.arange(0, BLOCK_D)
                d_mask = d_off < hidden
                xv = tl.load(x_ptr + x_base + d_off, mask=d_mask, other=0.0).to(tl.float32)
                vv = tl.load(vectors_ptr + v_base + d_off, mask=d_mask, other=0.0).to(tl.float32)
                acc += xv * vv
            score = tl.sum(acc, axis=0)
            if HAS_BIAS:
                score += tl.load(bias_ptr + tree * num_nodes + heap).to(tl.float32)
            tl.store(path_ptr + (token * num_trees + tree) * DEPTH + level, heap)
            if WRITE_ROWS and NODE_WIDTH > 0:
                n_off = tl.arange(0, BLOCK_N)
                tl.store(rows_ptr + out_base + level * NODE_WIDTH + n_off,
                         (tree * num_nodes + heap) * NODE_WIDTH + n_off, mask=n_off < NODE_WIDTH)
            position = 2 * position + (score > 0).to(tl.int32)
        tl.store(leaf_ptr + token * num_trees + tree, position)
        if WRITE_ROWS:
            slot = tl.load(slots_ptr + tree * num_leaves + position).to(tl.int32)  # the leaf's stored block
            leaf_start = node_rows + slot * LEAF_WIDTH
            for l0 in range(0, LEAF_WIDTH, BLOCK_L):
                l_off = l0 + tl.arange(0, BLOCK_L)
                tl.store(rows_ptr + out_base + DEPTH * NODE_WIDTH + l_off, leaf_start + l_off,
                         mask=l_off < LEAF_WIDTH)
            if SHARED > 0:
                if tree == 0:
                    shared_base = token.to(tl.int64) * row_stride + num_trees * (DEPTH * NODE_WIDTH + LEAF_WIDTH)
                    for s0 in range(0, SHARED, BLOCK_L):
                        s_off = s0 + tl.arange(0, BLOCK_L)
                        tl.store(rows_ptr + shared_base + s_off, shared_start + s_off, mask=s_off < SHARED)


def tree_route_triton(x: torch.Tensor, vectors: torch.Tensor, bias, num_trees: int, depth: int):
    """x: (N, d); vectors: (trees * nodes, d) contiguous; bias: (trees, nodes) or None.
    Returns (leaf (N, T), path (N, T, depth)) as int64, like `tree_route`."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package")
    n, hidden = x.shape
    num_nodes = vectors.shape[0] // num_trees
    leaf = torch.empty(n, num_trees, dtype=torch.int32, device=x.device)
    path = torch.empty(n, num_trees, depth, dtype=torch.int32, device=x.device)
    if n:
        bias_arg = bias.contiguous() if bias is not None else vectors  # unused when HAS_BIAS is False
        _tree_route_rows_kernel[(n, num_trees)](
            x.contiguous(), vectors.contiguous(), bias_arg, leaf, leaf, leaf, path,  # no rows: `leaf` stands in
            hidden, num_trees, num_nodes, 1, 0, 0, 0, DEPTH=depth, NODE_WIDTH=0, LEAF_WIDTH=0, SHARED=0,
            HAS_BIAS=bias is not None, BLOCK_D=min(4096, triton.next_power_of_2(hidden)), BLOCK_N=1, BLOCK_L=16,
            WRITE_ROWS=False, num_warps=8 if hidden >= 2048 else 4,
        )
    return leaf.long(), path.long()


def tree_route_rows_triton(layer, x: torch.Tensor, vectors: torch.Tensor, bias):
    """(rows (N, R) int32 as `path_rows` + the shared rows, leaf (N, T), path (N, T, depth)) of a
    `TreeFFN` with per-node activation, from one kernel launch."""
    s = layer.spec
    n, hidden = x.shape
    per_tree = s.depth * s.node_width + s.leaf_width
    row_stride = s.num_trees * per_tree + s.shared_width
    rows = torch.empty(n, row_stride, dtype=torch.int32, device=x.device)
    leaf = torch.empty(n, s.num_trees, dtype=torch.int32, device=x.device)
    path = torch.empty(n, s.num_trees, s.depth, dtype=torch.int32, device=x.device)
    if n:
        _tree_route_rows_kernel[(n, s.num_trees)](
            x.contiguous(), vectors, bias.contiguous() if bias is not None else vectors, layer.slot_table(x.device),
            rows, leaf, path, hidden, s.num_trees, s.num_nodes, s.num_leaves, layer.node_rows,
            layer.node_rows + layer.leaf_rows,
            row_stride, DEPTH=s.depth, NODE_WIDTH=s.node_width, LEAF_WIDTH=s.leaf_width, SHARED=s.shared_width,
            HAS_BIAS=bias is not None, BLOCK_D=min(4096, triton.next_power_of_2(hidden)),
            BLOCK_N=triton.next_power_of_2(max(s.node_width, 1)), BLOCK_L=1024, WRITE_ROWS=True,
            num_warps=8 if hidden >= 2048 else 4,
        )
    return rows, leaf, path


def path_rows(layer, leaf: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """(N, T, depth + 1, width) rows of every block on each token's path (equal-width blocks), or
    for per-node activation (N, T * (depth * node_width + leaf_width)) rows, flattened."""
    s = layer.spec
    trees = torch.arange(s.num_trees, device=leaf.device)
    leaf_start = layer.node_rows + layer.slot_table(leaf.device)[trees, leaf] * s.leaf_width  # (N, T)
    leaf_rows = leaf_start[:, :, None] + torch.arange(s.leaf_width, device=leaf.device)
    if not s.node_width:
        return leaf_rows.reshape(leaf.shape[0], -1)
    node_start = (trees[:, None] * s.num_nodes + path) * s.node_width  # (N, T, depth)
    node_rows = node_start[..., None] + torch.arange(s.node_width, device=leaf.device)
    if s.activation == "after_sum":
        return torch.cat([node_rows, leaf_rows[:, :, None]], dim=2)
    return torch.cat([node_rows.flatten(2), leaf_rows], dim=2).reshape(leaf.shape[0], -1)


def kernel_variant(layer, tokens: int) -> str:
    """Which of `VARIANTS` runs a batch of `tokens` tokens through `layer` (its kernel policy's
    `tree_gather_max_row_multiple`)."""
    limit = layer.kernel_policy.tree_gather_max_row_multiple * layer.intermediate_size
    return "gather" if tokens * layer.spec.active_units <= limit else "masked_dense"


def tree_ffn_triton(layer, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Forward of a `TreeFFN` on the kernels; returns (output, a name of the kernels that ran)."""
    s = layer.spec
    vectors = routing_matrix(layer)
    bias = routing_bias(layer)
    gate, up, down = layer.gate_rows.detach(), layer.up_rows.detach(), layer.down_rows.detach()
    if kernel_variant(layer, x.shape[0]) == "masked_dense":
        leaf, path = tree_route_triton(x, vectors, bias, s.num_trees, s.depth)
        if layer.usage is not None:
            layer.usage.record(leaf, path)
        return tree_ffn_masked_dense(layer, x, leaf, path), "triton:route+masked_dense"
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if not (s.activation == "after_sum" and s.node_width):  # two launches after the routing
        rows, leaf, path = tree_route_rows_triton(layer, x, vectors, bias)
        if layer.usage is not None:
            layer.usage.record(leaf.long(), path.long())
        gathered_swiglu(x, rows, gate, up, down, out=out)  # the row list holds the shared rows too
        return out.to(x.dtype), "triton:route+gather"
    leaf, path = tree_route_triton(x, vectors, bias, s.num_trees, s.depth)
    if layer.usage is not None:
        layer.usage.record(leaf, path)
    gathered_swiglu_after_sum(x, path_rows(layer, leaf, path), gate, up, down, out=out)
    if s.shared_width:
        start = layer.node_rows + layer.leaf_rows  # always-on neurons: a dense GEMM (cuBLAS on a GPU)
        hidden = F.silu(x @ gate[start:].T) * (x @ up[start:].T)
        out += (hidden @ down[start:]).float()
    return out.to(x.dtype), "triton:route+gather_after_sum"
