"""The tree FFN's plain references: the routing walk and the masked-dense computation.

They are the oracle every fast path and kernel is tested against (tree_torch.py, tree_blocks.py,
tree_kernels.py), and the training path of partition trees. tree_layer.py holds the layer; its
module docstring gives the math.
"""

from __future__ import annotations

from typing import Optional

import torch


def node_scores(x: torch.Tensor, routing_vectors: torch.Tensor, routing_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, T, nodes) routing score of every node of every tree for each token (> 0: go right)."""
    scores = torch.einsum("nd,tjd->ntj", x, routing_vectors.to(x.dtype))
    return scores if routing_bias is None else scores + routing_bias.to(x.dtype)


def tree_route(
    x: torch.Tensor, routing_vectors: torch.Tensor, routing_bias: Optional[torch.Tensor], depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk every tree for every token, level by level (the plain reference).

    x: (N, d); routing_vectors: (T, nodes, d); routing_bias: (T, nodes) or None.
    Returns `leaf` (N, T), the leaf index per tree, and `path` (N, T, depth), the heap index of
    the internal node visited at each level.
    """
    num_trees = routing_vectors.shape[0]
    scores = node_scores(x, routing_vectors, routing_bias).detach()
    position = torch.zeros(x.shape[0], num_trees, dtype=torch.long, device=x.device)
    path = []
    for level in range(depth):
        heap = position + ((1 << level) - 1)
        path.append(heap)
        go_right = scores.gather(2, heap.unsqueeze(-1)).squeeze(-1) > 0
        position = 2 * position + go_right.long()
    return position, torch.stack(path, dim=-1)


def tree_ffn_masked_dense(
    layer, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Reference computation: every neuron's pre-activation is computed, then masked to the path.

    It costs as much as the stored rows and is the oracle the fast paths are tested against. It is
    also the training path of partition trees (selected leaves train on `tree_ffn_blocks`):
    off-path neurons get exactly zero gradient. `scale` (N, trees), if
    given, multiplies each tree's path activations (the straight-through routing factor).
    """
    return tree_hidden(layer, x, leaf, path, scale) @ layer.down_rows


def tree_hidden(
    layer, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(N, rows) activations of every stored neuron in `down_rows` order, zero off each token's
    path: the masked reference's hidden layer (its output is this times `down_rows`)."""
    spec = layer.spec
    n_tok, trees = x.shape[0], spec.num_trees
    act = layer.act_fn
    gate = x @ layer.gate_rows.T
    up = x @ layer.up_rows.T
    node_end, leaf_end = layer.node_rows, layer.node_rows + layer.leaf_rows

    slot = layer.slot_table(x.device)[torch.arange(trees, device=x.device), leaf]  # (N, T) stored leaf blocks
    leaf_index = slot[:, :, None].expand(n_tok, trees, spec.leaf_width)
    leaf_shape = (n_tok, spec.stored_leaves, spec.leaf_width)
    leaf_g = gate[:, node_end:leaf_end].reshape(leaf_shape).gather(1, leaf_index)
    leaf_u = up[:, node_end:leaf_end].reshape(leaf_shape).gather(1, leaf_index)
    has_nodes = spec.node_width > 0
    if has_nodes:
        node_index = path.unsqueeze(-1).expand(n_tok, trees, spec.depth, spec.node_width)
        node_shape = (n_tok, trees, spec.num_nodes, spec.node_width)
        node_g = gate[:, :node_end].reshape(node_shape).gather(2, node_index)
        node_u = up[:, :node_end].reshape(node_shape).gather(2, node_index)

    if spec.activation == "after_sum" and has_nodes:
        leaf_a = act(leaf_g + node_g.sum(2)) * (leaf_u + node_u.sum(2))
        node_a = leaf_a.unsqueeze(2).expand_as(node_g)
    else:
        leaf_a = act(leaf_g) * leaf_u
        node_a = act(node_g) * node_u if has_nodes else None
    if scale is not None:
        leaf_a = leaf_a * scale[:, :, None].to(leaf_a.dtype)
        node_a = node_a * scale[:, :, None, None].to(node_a.dtype) if has_nodes else None

    parts = []
    if has_nodes:
        parts.append(node_a.new_zeros(node_shape).scatter(2, node_index, node_a).reshape(n_tok, -1))
    parts.append(leaf_a.new_zeros(leaf_shape).scatter(1, leaf_index, leaf_a).reshape(n_tok, -1))
    parts.append(act(gate[:, leaf_end:]) * up[:, leaf_end:])
    return torch.cat(parts, dim=1)
