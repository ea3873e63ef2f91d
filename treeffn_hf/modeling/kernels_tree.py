"""Triton kernels of the tree FFN: routing, path gathers, masked GEMMs and a grouped GEMM.

- `tree_route_triton`: one program per (token, tree) walks the depth, dotting x with the node's
  routing vector, and writes the path (heap index per level) and the leaf. Equals `tree_route`.
  `tree_route_rows_triton` (decode) is the same kernel also writing each token's row list.
- `grouped_block_swiglu`: MoE-style kernels for large batches (taken only when forced, see
  GATHER_MAX_ROW_MULTIPLE). Every (token, block-on-path) pair is an
  item; items are sorted by block and each block's tokens cut into tiles of BLOCK_M. Launch 1:
  per (tile, chunk of the block's width), x_tile @ G_b^T and x_tile @ U_b^T -> SwiGLU, stored
  (fp32, once per element). Launch 2: per (tile, chunk of hidden), act_tile @ D_b summed over
  the whole width in registers, then one atomic add per output element into the fp32 output
  (a fused kernel split over the width needs one atomic per element per width chunk, and the
  atomics dominated). Tiles are laid out on the device without a host sync (an upper bound of
  programs; empty ones read nothing).
- decode (few tokens): the path's rows go to `kernels_gather.gathered_swiglu` (per-neuron
  activation) or `gathered_swiglu_after_sum`.
- `streamed` (decode, taken only when forced until a GPU run times it against `gather`): the
  routing kernel scores every node in one pass and writes the row list, then
  `gathered_swiglu_streamed`: three launches in all, against six for `gather` (routing, two
  zero fills, two split-K launches, a cast).
- `grouped_mm` (large batches, taken only when forced until a GPU run times it): the routing kernel,
  then the leaf blocks through PyTorch's grouped GEMM (`grouped_mm.py`, CUTLASS on Hopper), the
  node rows through the gathers.
- `masked_dense` (batches past the switch point): the routing kernel, then cuBLAS GEMMs over
  every stored row with each token's off-path rows zeroed (`tree_ffn_masked_dense`).

`tree_ffn_triton` chains them for a `TreeFFN` (the variant from `kernel_variant`) and says which
kernels ran. Forward only: training uses the differentiable reference path (see
`dispatch.choose_path`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped_mm import grouped_block_swiglu_mm, grouped_mm_unavailable_reason
from .kernels_gather import (
    gathered_swiglu,
    gathered_swiglu_after_sum,
    gathered_swiglu_naive,
    gathered_swiglu_streamed,
)
from .tree_ffn import tree_ffn_masked_dense, tree_route
from .tree_ffn_torch import routing_bias, routing_matrix

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

VARIANTS = ("gather", "streamed", "grouped_gemm", "grouped_mm", "masked_dense")
# Per-node activation only: the grouped GEMMs' blocks and the streamed gathers' row lists.
PER_NODE_VARIANTS = ("streamed", "grouped_gemm", "grouped_mm")
# Per-token gathers read each token's rows separately, so past about one layer's worth of rows per
# batch (tokens x active units ~ intermediate) they read more weight bytes than the dense GEMMs. On
# the H100 run of benchmarks/bench_mlp.py (results/bench_mlp_cuda.json, CUDA graphs) the gathers
# ran at 1.0-1.1x of cuBLAS at 1.0 layer's worth, 0.65-0.73x at 2, and the grouped GEMM lost to
# cuBLAS at every batch it ran (64 and 2048 tokens: 0.25-0.85x). So past the switch point the batch
# runs cuBLAS over all stored rows with the off-path rows masked (`masked_dense`, a little above
# the dense cost). The grouped GEMM stays (tested, timed by the benchmark) but is taken only when
# forced, until a measured run shows it beating the masked GEMMs.
GATHER_MAX_ROW_MULTIPLE = 1.25
# One variant for every batch (None: by batch size, as above); the benchmark and tests set it.
FORCED_VARIANT = None
# (tokens per tile, rows per step, hidden per step, warps); benchmarks/tune_kernels.py times them.
GROUPED_BLOCK = (32, 64, 64, 8)


def tree_route_naive(x, vectors, bias, num_trees: int, depth: int):
    """Reference of `tree_route_triton`: the layer's own walker on fp32 scores."""
    nodes = vectors.shape[0] // num_trees
    return tree_route(x.float(), vectors.float().view(num_trees, nodes, -1),
                      None if bias is None else bias.float().view(num_trees, nodes), depth)


def grouped_block_swiglu_naive(x, item_tokens, item_blocks, row_offset: int, width: int, gate, up, down):
    """Reference of `grouped_block_swiglu`: item i adds block `item_blocks[i]`'s SwiGLU of
    token `item_tokens[i]` to that token's output."""
    rows = row_offset + item_blocks[:, None] * width + torch.arange(width, device=x.device)
    per_item = gathered_swiglu_naive(x[item_tokens], rows, gate, up, down).float()
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, item_tokens, per_item)


if triton is not None:

    @triton.jit
    def _tree_route_rows_kernel(
        x_ptr, vectors_ptr, bias_ptr, slots_ptr, rows_ptr, leaf_ptr, path_ptr,
        hidden, num_trees, num_nodes, num_leaves, node_rows, shared_start, row_stride,
        DEPTH: tl.constexpr, NODE_WIDTH: tl.constexpr, LEAF_WIDTH: tl.constexpr, SHARED: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
        WRITE_ROWS: tl.constexpr, ALL_NODES: tl.constexpr, BLOCK_NODES: tl.constexpr,
    ):
        """Per (token, tree), walk the depth and write the path and the leaf. With WRITE_ROWS (decode)
        also the path's rows (node blocks, then the leaf block; the shared rows once per token) in
        the order of `path_rows`, so the gather kernels follow with no index arithmetic between.

        The walk either dots one node per level (each level's load waits on the last level's
        choice: DEPTH memory round trips) or, with ALL_NODES, first scores every node of the tree
        in one pipelined pass (2^DEPTH - 1 rows instead of DEPTH) and walks in registers."""
        token = tl.program_id(0)
        tree = tl.program_id(1)
        x_base = token.to(tl.int64) * hidden
        out_base = token.to(tl.int64) * row_stride + tree * (DEPTH * NODE_WIDTH + LEAF_WIDTH)
        if ALL_NODES:
            nodes = tl.arange(0, BLOCK_NODES)
            node_mask = nodes < num_nodes
            node_base = (tree * num_nodes + nodes).to(tl.int64)[:, None] * hidden
            tile = tl.zeros((BLOCK_NODES, BLOCK_D), dtype=tl.float32)
            for d0 in range(0, hidden, BLOCK_D):
                d_off = d0 + tl.arange(0, BLOCK_D)
                d_mask = d_off < hidden
                xv = tl.load(x_ptr + x_base + d_off, mask=d_mask, other=0.0).to(tl.float32)
                vv = tl.load(vectors_ptr + node_base + d_off[None, :], mask=node_mask[:, None] & d_mask[None, :],
                             other=0.0).to(tl.float32)
                tile += vv * xv[None, :]
            node_scores = tl.sum(tile, axis=1)
            if HAS_BIAS:
                node_scores += tl.load(bias_ptr + tree * num_nodes + nodes, mask=node_mask, other=0.0).to(tl.float32)
        position = tl.zeros((), dtype=tl.int32)
        for level in tl.static_range(DEPTH):
            heap = position + ((1 << level) - 1)
            if ALL_NODES:
                score = tl.sum(tl.where(nodes == heap, node_scores, 0.0), axis=0)
            else:
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

    @triton.jit
    def _grouped_gate_up_kernel(
        x_ptr, tokens_ptr, tile_block_ptr, tile_start_ptr, tile_end_ptr, gate_ptr, up_ptr, act_ptr,
        hidden, row_offset,
        WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """act[item, :] = SiLU(x G_b^T) * (x U_b^T) for a tile of sorted items and a chunk of the
        block's width; each element written once (no atomics)."""
        pid = tl.program_id(0)
        start = tl.load(tile_start_ptr + pid)
        end = tl.load(tile_end_ptr + pid)
        # The grid is an upper bound on the tiles: the spare programs must not read any weights.
        if start < end:
            block = tl.load(tile_block_ptr + pid).to(tl.int64)
            m_off = start + tl.arange(0, BLOCK_M)
            m_mask = m_off < end
            tokens = tl.load(tokens_ptr + m_off, mask=m_mask, other=0).to(tl.int64)
            w_off = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
            w_mask = w_off < WIDTH
            rows = row_offset + block * WIDTH + w_off
            g = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
            u = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
            for d0 in range(0, hidden, BLOCK_D):
                d_off = d0 + tl.arange(0, BLOCK_D)
                d_mask = d_off < hidden
                xt = tl.load(x_ptr + tokens[:, None] * hidden + d_off[None, :],
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                wt_mask = d_mask[:, None] & w_mask[None, :]
                wt_off = rows[None, :] * hidden + d_off[:, None]  # (BLOCK_D, BLOCK_W): rows transposed
                gt = tl.load(gate_ptr + wt_off, mask=wt_mask, other=0.0)
                ut = tl.load(up_ptr + wt_off, mask=wt_mask, other=0.0)
                if IEEE:
                    g = tl.dot(xt, gt, g, input_precision="ieee")
                    u = tl.dot(xt, ut, u, input_precision="ieee")
                else:
                    g = tl.dot(xt, gt, g)
                    u = tl.dot(xt, ut, u)
            act = g * tl.sigmoid(g) * u
            tl.store(act_ptr + m_off.to(tl.int64)[:, None] * WIDTH + w_off[None, :], act,
                     mask=m_mask[:, None] & w_mask[None, :])

    @triton.jit
    def _grouped_down_kernel(
        tokens_ptr, tile_block_ptr, tile_start_ptr, tile_end_ptr, act_ptr, down_ptr, out_ptr,
        hidden, row_offset,
        WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """out[token, d-chunk] += act[tile, :] @ D_b[:, d-chunk]: the whole width is summed in
        registers, so each (item, output element) costs one atomic add."""
        pid = tl.program_id(0)
        start = tl.load(tile_start_ptr + pid)
        end = tl.load(tile_end_ptr + pid)
        if start < end:
            block = tl.load(tile_block_ptr + pid).to(tl.int64)
            m_off = start + tl.arange(0, BLOCK_M)
            m_mask = m_off < end
            tokens = tl.load(tokens_ptr + m_off, mask=m_mask, other=0).to(tl.int64)
            d_off = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = d_off < hidden
            y = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for w0 in range(0, WIDTH, BLOCK_W):
                w_off = w0 + tl.arange(0, BLOCK_W)
                w_mask = w_off < WIDTH
                act = tl.load(act_ptr + m_off.to(tl.int64)[:, None] * WIDTH + w_off[None, :],
                              mask=m_mask[:, None] & w_mask[None, :], other=0.0)
                rows = row_offset + block * WIDTH + w_off
                dw = tl.load(down_ptr + rows[:, None] * hidden + d_off[None, :],
                             mask=w_mask[:, None] & d_mask[None, :], other=0.0)
                if IEEE:
                    y = tl.dot(act.to(dw.dtype), dw, y, input_precision="ieee")
                else:
                    y = tl.dot(act.to(dw.dtype), dw, y)
            tl.atomic_add(out_ptr + tokens[:, None] * hidden + d_off[None, :], y,
                          mask=m_mask[:, None] & d_mask[None, :])


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
            WRITE_ROWS=False, ALL_NODES=False, BLOCK_NODES=1, num_warps=8 if hidden >= 2048 else 4,
        )
    return leaf.long(), path.long()


def tree_route_rows_triton(layer, x: torch.Tensor, vectors: torch.Tensor, bias, all_nodes: bool = False):
    """(rows (N, R) int32 as `path_rows` + the shared rows, leaf (N, T), path (N, T, depth)) of a
    `TreeFFN` with per-node activation, from one kernel launch. `all_nodes`: score every node in
    one pass, then walk (see the kernel)."""
    s = layer.spec
    n, hidden = x.shape
    per_tree = s.depth * s.node_width + s.leaf_width
    row_stride = s.num_trees * per_tree + s.shared_width
    rows = torch.empty(n, row_stride, dtype=torch.int32, device=x.device)
    leaf = torch.empty(n, s.num_trees, dtype=torch.int32, device=x.device)
    path = torch.empty(n, s.num_trees, s.depth, dtype=torch.int32, device=x.device)
    block_nodes = triton.next_power_of_2(s.num_nodes) if all_nodes else 1
    block_d = min(4096, triton.next_power_of_2(hidden), max(16, 8192 // block_nodes))  # bounded registers
    if n:
        _tree_route_rows_kernel[(n, s.num_trees)](
            x.contiguous(), vectors, bias.contiguous() if bias is not None else vectors, layer.leaf_slots(x.device),
            rows, leaf, path, hidden, s.num_trees, s.num_nodes, s.num_leaves, layer.node_rows,
            layer.node_rows + layer.leaf_rows,
            row_stride, DEPTH=s.depth, NODE_WIDTH=s.node_width, LEAF_WIDTH=s.leaf_width, SHARED=s.shared_width,
            HAS_BIAS=bias is not None, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(max(s.node_width, 1)),
            BLOCK_L=1024, WRITE_ROWS=True, ALL_NODES=all_nodes, BLOCK_NODES=block_nodes,
            num_warps=8 if hidden >= 2048 else 4,
        )
    return rows, leaf, path


def _tiles(item_blocks: torch.Tensor, num_blocks: int, block_m: int):
    """Sort items by block and lay out BLOCK_M tiles per block, on the device, without a sync."""
    order = torch.argsort(item_blocks, stable=True)
    # Not torch.bincount: on CUDA it waits for the host to size its output (no CUDA graphs).
    counts = torch.zeros(num_blocks, dtype=torch.long, device=item_blocks.device)
    counts.scatter_add_(0, item_blocks, torch.ones_like(item_blocks))
    group_start = torch.cumsum(counts, 0) - counts
    tiles_per_block = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles_per_block, 0)
    max_tiles = item_blocks.numel() // block_m + num_blocks  # sum of ceil(c / m) <= M / m + blocks
    tile = torch.arange(max_tiles, device=item_blocks.device)
    block = torch.searchsorted(tiles_end, tile, right=True).clamp_max(num_blocks - 1)
    within = tile - (tiles_end[block] - tiles_per_block[block])
    valid = tile < tiles_end[-1]
    start = torch.where(valid, group_start[block] + within * block_m, 0)
    end = torch.where(valid, group_start[block] + counts[block], 0)
    return order, block.to(torch.int32), start.to(torch.int32), end.to(torch.int32)


def grouped_block_swiglu(x, item_tokens, item_blocks, num_blocks: int, row_offset: int, width: int,
                         gate, up, down, out: torch.Tensor, block: tuple[int, int, int, int] | None = None
                         ) -> torch.Tensor:
    """Add, for every item i, block `item_blocks[i]`'s SwiGLU of token `item_tokens[i]` into `out`
    (fp32, (N, d)). A block is `width` contiguous rows starting at `row_offset + block * width`.
    `block` overrides `GROUPED_BLOCK`."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package")
    if item_tokens.numel() == 0:
        return out
    block_m, block_w, block_d, warps = block or GROUPED_BLOCK
    order, tile_block, tile_start, tile_end = _tiles(item_blocks, num_blocks, block_m)
    sorted_tokens = item_tokens[order].to(torch.int32).contiguous()
    block_w = max(16, min(block_w, triton.next_power_of_2(width)))  # tl.dot needs >= 16
    tiles = tile_block.numel()
    hidden = x.shape[1]
    act = torch.empty(item_tokens.numel(), width, dtype=torch.float32, device=x.device)
    common = dict(WIDTH=width, BLOCK_M=block_m, BLOCK_W=block_w, BLOCK_D=block_d,
                  IEEE=x.dtype == torch.float32, num_warps=warps)
    _grouped_gate_up_kernel[(tiles, triton.cdiv(width, block_w))](
        x, sorted_tokens, tile_block, tile_start, tile_end, gate, up, act, hidden, row_offset, **common)
    _grouped_down_kernel[(tiles, triton.cdiv(hidden, block_d))](
        sorted_tokens, tile_block, tile_start, tile_end, act, down, out, hidden, row_offset, **common)
    return out


def path_rows(layer, leaf: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """(N, T, depth + 1, width) rows of every block on each token's path (equal-width blocks), or
    for per-node activation (N, T * (depth * node_width + leaf_width)) rows, flattened."""
    s = layer.spec
    trees = torch.arange(s.num_trees, device=leaf.device)
    leaf_start = layer.node_rows + layer.leaf_slots(leaf.device)[trees, leaf] * s.leaf_width  # (N, T)
    leaf_rows = leaf_start[:, :, None] + torch.arange(s.leaf_width, device=leaf.device)
    if not s.node_width:
        return leaf_rows.reshape(leaf.shape[0], -1)
    node_start = (trees[:, None] * s.num_nodes + path) * s.node_width  # (N, T, depth)
    node_rows = node_start[..., None] + torch.arange(s.node_width, device=leaf.device)
    if s.activation == "after_sum":
        return torch.cat([node_rows, leaf_rows[:, :, None]], dim=2)
    return torch.cat([node_rows.flatten(2), leaf_rows], dim=2).reshape(leaf.shape[0], -1)


def variant_unavailable_reason(layer, variant: str) -> str | None:
    """Why `variant` cannot run `layer`, or None when it can."""
    if variant in PER_NODE_VARIANTS and layer.spec.activation == "after_sum" and layer.spec.node_width:
        return f"the {variant} variant implements per-node activation only, not after_sum"
    if variant == "grouped_mm":
        return grouped_mm_unavailable_reason(layer.hidden_size, layer.gate_rows.dtype, layer.gate_rows.device)
    return None


def layer_variants(layer) -> tuple[str, ...]:
    """The `VARIANTS` that can run `layer`."""
    return tuple(v for v in VARIANTS if variant_unavailable_reason(layer, v) is None)


def kernel_variant(layer, tokens: int) -> str:
    """Which of `VARIANTS` runs a batch of `tokens` tokens through `layer` (see GATHER_MAX_ROW_MULTIPLE)."""
    if FORCED_VARIANT is not None:
        if FORCED_VARIANT not in VARIANTS:
            raise ValueError(f"kernels_tree.FORCED_VARIANT must be one of {VARIANTS} or None, got {FORCED_VARIANT!r}")
        reason = variant_unavailable_reason(layer, FORCED_VARIANT)
        if reason is not None:
            raise ValueError(f"kernels_tree.FORCED_VARIANT={FORCED_VARIANT!r} cannot run this layer: {reason}")
        return FORCED_VARIANT
    gathers_fit = tokens * layer.spec.active_units <= GATHER_MAX_ROW_MULTIPLE * layer.intermediate_size
    return "gather" if gathers_fit else "masked_dense"


def tree_ffn_triton(layer, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Forward of a `TreeFFN` on the kernels; returns (output, a name of the kernels that ran)."""
    s = layer.spec
    vectors = routing_matrix(layer)
    bias = routing_bias(layer)
    gate, up, down = layer.gate_rows.detach(), layer.up_rows.detach(), layer.down_rows.detach()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    n = x.shape[0]
    after_sum = s.activation == "after_sum" and s.node_width
    variant = kernel_variant(layer, n)
    if variant == "masked_dense":
        leaf, path = tree_route_triton(x, vectors, bias, s.num_trees, s.depth)
        if layer.usage is not None:
            layer.usage.record(leaf, path)
        return tree_ffn_masked_dense(layer, x, leaf, path), "triton:route+masked_dense"
    grouped = variant in ("grouped_gemm", "grouped_mm")
    if variant == "streamed":  # decode in three launches: no buffers to zero, no atomics, no cast
        rows, leaf, path = tree_route_rows_triton(layer, x, vectors, bias, all_nodes=True)
        if layer.usage is not None:
            layer.usage.record(leaf.long(), path.long())
        return gathered_swiglu_streamed(x.contiguous(), rows, gate, up, down), "triton:route+streamed"
    if variant == "gather" and not after_sum:  # decode: two launches after the routing
        rows, leaf, path = tree_route_rows_triton(layer, x, vectors, bias)
        if layer.usage is not None:
            layer.usage.record(leaf.long(), path.long())
        gathered_swiglu(x, rows, gate, up, down, out=out)
        return out.to(x.dtype), "triton:route+gather"
    leaf, path = tree_route_triton(x, vectors, bias, s.num_trees, s.depth)
    if layer.usage is not None:
        layer.usage.record(leaf, path)
    if after_sum:
        gathered_swiglu_after_sum(x, path_rows(layer, leaf, path), gate, up, down, out=out)
        name = "triton:route+gather_after_sum"
    elif grouped:
        tokens = torch.arange(n, device=x.device)
        trees = torch.arange(s.num_trees, device=x.device)
        if s.node_width:  # a few narrow node rows per token, the same few for many tokens (cached)
            node_start = (trees[:, None] * s.num_nodes + path) * s.node_width  # (N, T, depth)
            node_rows = (node_start[..., None] + torch.arange(s.node_width, device=x.device)).reshape(n, -1)
            gathered_swiglu(x, node_rows.contiguous(), gate, up, down, out=out)
        leaf_blocks = layer.leaf_slots(x.device)[trees[None, :], leaf]
        blocks = grouped_block_swiglu if variant == "grouped_gemm" else grouped_block_swiglu_mm
        blocks(x, tokens[:, None].expand_as(leaf_blocks).reshape(-1), leaf_blocks.reshape(-1),
               s.stored_leaves, layer.node_rows, s.leaf_width, gate, up, down, out)
        name = f"triton:route+{variant}"
    if s.shared_width:
        start = layer.node_rows + layer.leaf_rows  # always-on neurons: a dense GEMM (cuBLAS on a GPU)
        hidden = F.silu(x @ gate[start:].T) * (x @ up[start:].T)
        out += (hidden @ down[start:]).float()
    return out.to(x.dtype), name
