"""Tree-structured FFN: hard hierarchical routing over blocks of SwiGLU neurons.

Weights are stored block-contiguous: `leaf_gate[t, leaf]` is one `(leaf_width, hidden)` slab, so a
token's leaf block is a single contiguous read. `*_down` tensors hold `down_proj` transposed (one
row per neuron) for the same reason. The math, for one tree and the path's blocks `b`:

    per_node:   y = sum_b  D_b^T (act(G_b x) * U_b x)
    after_sum:  y = sum_b  D_b^T (act(sum_b' G_b' x) * sum_b' U_b' x)     (all blocks equally wide)

plus `shared` always-on neurons. A node branches right when its routing score is positive: the
gate pre-activation of its first neuron (`routing='self'`) or a router hyperplane
(`routing='hyperplane'`). The branch choice carries no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layer_spec import TreeSpec
from .sparse_cost import SparseCost


def tree_route(
    x: torch.Tensor, routing_vectors: torch.Tensor, routing_bias: Optional[torch.Tensor], depth: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk every tree for every token.

    x: (N, d); routing_vectors: (T, nodes, d); routing_bias: (T, nodes) or None.
    Returns `leaf` (N, T), the leaf index per tree, and `path` (N, T, depth), the heap index of
    the internal node visited at each level.
    """
    num_trees = routing_vectors.shape[0]
    scores = torch.einsum("nd,tjd->ntj", x, routing_vectors.to(x.dtype))
    if routing_bias is not None:
        scores = scores + routing_bias.to(x.dtype)
    scores = scores.detach()
    position = torch.zeros(x.shape[0], num_trees, dtype=torch.long, device=x.device)
    path = []
    for level in range(depth):
        heap = position + ((1 << level) - 1)
        path.append(heap)
        go_right = scores.gather(2, heap.unsqueeze(-1)).squeeze(-1) > 0
        position = 2 * position + go_right.long()
    return position, torch.stack(path, dim=-1)


class SharedSwiGLU(nn.Module):
    """Always-on neurons, laid out like the Hugging Face MLP so PEFT can target them."""

    def __init__(self, hidden_size: int, width: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TreeFFN(nn.Module):
    """Drop-in replacement for a gated MLP block (`LlamaMLP` and its twins)."""

    sparse_method = "tree"

    def __init__(self, hidden_size: int, intermediate_size: int, spec: TreeSpec, act_fn: nn.Module) -> None:
        super().__init__()
        spec = spec.resolve(hidden_size, intermediate_size)
        self.spec = spec
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn
        trees, nodes, leaves = spec.num_trees, spec.num_nodes, spec.num_leaves
        if spec.node_width > 0:
            node_shape = (trees, nodes, spec.node_width, hidden_size)
            self.node_gate = nn.Parameter(torch.empty(node_shape))
            self.node_up = nn.Parameter(torch.empty(node_shape))
            self.node_down = nn.Parameter(torch.empty(node_shape))
        else:
            self.node_gate = self.node_up = self.node_down = None
        leaf_shape = (trees, leaves, spec.leaf_width, hidden_size)
        self.leaf_gate = nn.Parameter(torch.empty(leaf_shape))
        self.leaf_up = nn.Parameter(torch.empty(leaf_shape))
        self.leaf_down = nn.Parameter(torch.empty(leaf_shape))
        if spec.routing == "hyperplane":
            self.router_weight = nn.Parameter(torch.empty(trees, nodes, hidden_size))
            self.router_bias = nn.Parameter(torch.empty(trees, nodes))
        else:
            self.router_weight = self.router_bias = None
        self.shared = SharedSwiGLU(hidden_size, spec.shared_width, act_fn) if spec.shared_width else None
        self.usage: Optional["TreeUsage"] = None

    # -- routing ---------------------------------------------------------------------------
    def routing_vectors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.spec.routing == "self":
            return self.node_gate[:, :, 0, :], None
        return self.router_weight, self.router_bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, bias = self.routing_vectors()
        return tree_route(x, vectors, bias, self.spec.depth)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        leaf, path = self.route(x)
        if self.usage is not None:
            self.usage.record(leaf, path)
        out = tree_ffn_masked_dense(self, x, leaf, path)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    # -- accounting --------------------------------------------------------------------------
    def cost(self) -> SparseCost:
        spec = self.spec
        rows_read = spec.num_trees * (spec.depth * spec.node_width + spec.leaf_width) + spec.shared_width
        router_elems = spec.num_trees * spec.depth * (self.hidden_size + 1) if spec.routing == "hyperplane" else 0
        return SparseCost(
            active_units=float(rows_read),
            total_units=self.intermediate_size,
            active_weight_elems=float(3 * rows_read * self.hidden_size + router_elems),
            dense_weight_elems=3 * self.intermediate_size * self.hidden_size,
        )

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"trees={s.num_trees}, depth={s.depth}, node_width={s.node_width}, leaf_width={s.leaf_width}, "
            f"shared_width={s.shared_width}, routing={s.routing}, activation={s.activation}"
        )


def tree_ffn_masked_dense(
    layer: TreeFFN, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor
) -> torch.Tensor:
    """Reference computation: every block's pre-activation is computed, then masked to the path.

    It costs as much as the dense MLP and is the oracle the fast paths are tested against. It is
    also the training path: off-path neurons get exactly zero gradient.
    """
    spec = layer.spec
    n_tok, trees = x.shape[0], spec.num_trees
    act = layer.act_fn
    leaf_index = leaf[:, :, None, None].expand(n_tok, trees, 1, spec.leaf_width)
    leaf_g = torch.einsum("nd,tlwd->ntlw", x, layer.leaf_gate).gather(2, leaf_index).squeeze(2)
    leaf_u = torch.einsum("nd,tlwd->ntlw", x, layer.leaf_up).gather(2, leaf_index).squeeze(2)
    has_nodes = layer.node_gate is not None
    if has_nodes:
        node_index = path.unsqueeze(-1).expand(n_tok, trees, spec.depth, spec.node_width)
        node_g = torch.einsum("nd,tjwd->ntjw", x, layer.node_gate).gather(2, node_index)
        node_u = torch.einsum("nd,tjwd->ntjw", x, layer.node_up).gather(2, node_index)

    if spec.activation == "after_sum" and has_nodes:
        leaf_a = act(leaf_g + node_g.sum(2)) * (leaf_u + node_u.sum(2))
        node_a = leaf_a.unsqueeze(2).expand_as(node_g)
    else:
        leaf_a = act(leaf_g) * leaf_u
        node_a = act(node_g) * node_u if has_nodes else None

    leaf_full = x.new_zeros(n_tok, trees, spec.num_leaves, spec.leaf_width)
    leaf_full = leaf_full.scatter(2, leaf_index, leaf_a.unsqueeze(2))
    out = torch.einsum("ntlw,tlwd->nd", leaf_full, layer.leaf_down)
    if has_nodes:
        node_full = x.new_zeros(n_tok, trees, spec.num_nodes, spec.node_width)
        node_full = node_full.scatter(2, node_index, node_a)
        out = out + torch.einsum("ntjw,tjwd->nd", node_full, layer.node_down)
    return out


class TreeUsage:
    """Counts of routing decisions, accumulated while attached to a `TreeFFN` (`layer.usage`)."""

    def __init__(self, spec: TreeSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.leaf_counts = torch.zeros(spec.num_trees, spec.num_leaves, dtype=torch.long, device=device)
        self.node_visits = torch.zeros(spec.num_trees, spec.num_nodes, dtype=torch.long, device=device)
        self.node_right = torch.zeros(spec.num_trees, spec.num_nodes, dtype=torch.long, device=device)

    @torch.no_grad()
    def record(self, leaf: torch.Tensor, path: torch.Tensor) -> None:
        spec = self.spec
        for t in range(spec.num_trees):
            self.leaf_counts[t] += torch.bincount(leaf[:, t], minlength=spec.num_leaves).to(self.leaf_counts.device)
            visited = path[:, t, :]
            self.node_visits[t] += torch.bincount(visited.reshape(-1), minlength=spec.num_nodes).to(
                self.node_visits.device
            )
            # The child index at the next level (or the leaf) tells which way each node went.
            children = torch.cat([visited[:, 1:], leaf[:, t : t + 1] + spec.num_nodes], dim=1)
            went_right = (children % 2 == 0).reshape(-1)
            self.node_right[t] += torch.bincount(
                visited.reshape(-1)[went_right], minlength=spec.num_nodes
            ).to(self.node_right.device)
