"""Tree-structured FFN: hard hierarchical routing over blocks of SwiGLU neurons.

All neurons live in three row tables of shape (intermediate, hidden): `gate_rows`, `up_rows` and
`down_rows` (`down_proj` transposed, one row per neuron). Rows are ordered by block: every tree's
internal nodes in heap order (children of `j` are `2j+1`, `2j+2`), then every tree's leaves, then
the shared always-on neurons. So each block is a contiguous slab, and one token's path is one
gather from one table. `node_gate`, `leaf_gate`, ... are views of those slabs.

With `spec.leaf_neurons == "selected"` the leaf blocks are copies of dense neurons that leaves may
share, so the tables can hold more rows than the dense MLP has neurons; nothing below depends on
which dense neuron a row came from.

A pruned tree (`spec.live_leaves`) stores only its live leaf blocks: leaf `l` of tree `t` lives in
stored block `leaf_slots[t, l]`, and a node whose one subtree has no live leaf always branches
to the other, through a routing bias of +-inf, so no path reaches a pruned leaf.

For one tree and the blocks `b` on a token's path:

    per_node:   y = sum_b  D_b^T (act(G_b x) * U_b x)
    after_sum:  y = sum_b  D_b^T (act(sum_b' G_b' x) * sum_b' U_b' x)     (all blocks equally wide)

plus the shared neurons, always computed per neuron. A node branches right when its routing score
is positive: the gate pre-activation of its first neuron (`routing='self'`) or a router hyperplane
(`routing='hyperplane'`). The branch choice carries no gradient (the paper's form), so hyperplane
routers get none by default; they are fitted by the conversion tools. Fine-tuning can set
`routing_gradient = "straight_through"`: each tree's path output is multiplied by P / stop_grad(P),
P the product of sigmoid(+-score / routing_temperature) of the branches taken. The forward value
is unchanged, and the routers receive the gradient of the taken path's probability.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .dispatch import KernelPolicyMixin, choose_path, initial_policy
from .layer_spec import TreeSpec
from .sparse_cost import SERVED_BYTES_PER_WEIGHT, SparseCost
from .tree_blocks import grouped_block_mlp
from .tree_reference import node_scores, tree_ffn_masked_dense, tree_hidden, tree_route
from .tree_torch import tree_torch_path

__all__ = ["TreeFFN", "TreeUsage", "node_scores", "tree_ffn_blocks", "tree_ffn_masked_dense", "tree_hidden",
           "tree_route"]


class TreeFFN(KernelPolicyMixin, nn.Module):
    """Drop-in replacement for a gated MLP block (`LlamaMLP` and its twins)."""

    sparse_method = "tree"

    def __init__(self, hidden_size: int, intermediate_size: int, spec: TreeSpec, act_fn: nn.Module) -> None:
        super().__init__()
        spec = spec.resolve(hidden_size, intermediate_size)
        self.spec = spec
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act_fn = act_fn
        self.gate_rows = nn.Parameter(torch.empty(spec.stored_units, hidden_size))
        self.up_rows = nn.Parameter(torch.empty(spec.stored_units, hidden_size))
        self.down_rows = nn.Parameter(torch.empty(spec.stored_units, hidden_size))
        if spec.routing == "hyperplane":
            self.router_weight = nn.Parameter(torch.empty(spec.num_trees, spec.num_nodes, hidden_size))
            self.router_bias = nn.Parameter(torch.empty(spec.num_trees, spec.num_nodes))
        else:
            self.router_weight = self.router_bias = None
        self.usage: Optional["TreeUsage"] = None
        self.routing_gradient: Optional[str] = None  # None (stop-gradient) or "straight_through"
        self.routing_temperature: float = 1.0
        self.masked_training = False  # True: train on `tree_ffn_masked_dense`, the reference, whatever the spec
        self.kernel_policy = initial_policy()
        self.last_path: Optional[str] = None
        self._tables: dict = {}  # leaf slots and forced-branch bias per device (derived from the spec)

    # -- block views -------------------------------------------------------------------------
    @property
    def node_rows(self) -> int:
        return self.spec.num_trees * self.spec.num_nodes * self.spec.node_width

    @property
    def leaf_rows(self) -> int:
        return self.spec.stored_leaves * self.spec.leaf_width

    def _nodes(self, table: torch.Tensor) -> Optional[torch.Tensor]:
        s = self.spec
        if not s.node_width:
            return None
        return table[: self.node_rows].view(s.num_trees, s.num_nodes, s.node_width, self.hidden_size)

    def _leaves(self, table: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.is_pruned:
            raise ValueError("a pruned tree stores only its live leaves: use leaf_block(table, tree, leaf)")
        block = table[self.node_rows : self.node_rows + self.leaf_rows]
        return block.view(s.num_trees, s.num_leaves, s.leaf_width, self.hidden_size)

    def _shared(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.node_rows + self.leaf_rows :]

    def leaf_block(self, table: torch.Tensor, tree: int, leaf: int) -> torch.Tensor:
        """(leaf_width, hidden) view of one live leaf's rows of `table`."""
        if self.spec.is_pruned:
            if "slot_list" not in self._tables:
                self._tables["slot_list"] = self.spec.leaf_slots()
            slot = self._tables["slot_list"][tree][leaf]
        else:
            slot = tree * self.spec.num_leaves + leaf
        if slot < 0:
            raise IndexError(f"leaf {leaf} of tree {tree} was pruned")
        start = self.node_rows + slot * self.spec.leaf_width
        return table[start : start + self.spec.leaf_width]

    def slot_table(self, device: torch.device) -> torch.Tensor:
        """(trees, leaves) int64: the stored block of each leaf (a pruned leaf, which no path
        reaches, points at a live block of its tree)."""
        key = ("slots", str(device))
        if key not in self._tables:
            self._tables[key] = torch.tensor(self.spec.leaf_slots(pruned_to_live=True), dtype=torch.long, device=device)
        return self._tables[key]

    def forced_bias(self, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """(trees, nodes): +-inf where a pruned tree's branch is closed, else 0; None if not pruned."""
        if not self.spec.is_pruned:
            return None
        key = ("forced", str(device), dtype)
        if key not in self._tables:
            branch = torch.tensor(self.spec.forced_branches(), dtype=torch.float32)
            self._tables[key] = torch.where(branch == 0, 0.0, branch * math.inf).to(device, dtype)
        return self._tables[key]

    node_gate = property(lambda self: self._nodes(self.gate_rows))
    node_up = property(lambda self: self._nodes(self.up_rows))
    node_down = property(lambda self: self._nodes(self.down_rows))
    leaf_gate = property(lambda self: self._leaves(self.gate_rows))
    leaf_up = property(lambda self: self._leaves(self.up_rows))
    leaf_down = property(lambda self: self._leaves(self.down_rows))
    shared_gate = property(lambda self: self._shared(self.gate_rows))
    shared_up = property(lambda self: self._shared(self.up_rows))
    shared_down = property(lambda self: self._shared(self.down_rows))

    # -- routing -----------------------------------------------------------------------------
    def routing_vectors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(trees, nodes, hidden) vectors and (trees, nodes) bias (or None) of the routing scores; a
        pruned tree's forced branches are a bias of +-inf."""
        vectors = self.node_gate[:, :, 0, :] if self.spec.routing == "self" else self.router_weight
        bias = self.router_bias
        forced = self.forced_bias(vectors.device, vectors.dtype)
        if forced is not None:
            bias = forced if bias is None else bias + forced
        return vectors, bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors, bias = self.routing_vectors()
        return tree_route(x, vectors, bias, self.spec.depth)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        self.last_path = choose_path(self, x)
        if self.last_path == "triton":
            from .tree_kernels import tree_ffn_triton  # imports triton only when the kernels run

            out, self.last_path = tree_ffn_triton(self, x)
        elif self.last_path == "torch":
            out = tree_torch_path(self, x)
        else:
            leaf, path = self.route(x)
            if self.usage is not None:
                self.usage.record(leaf, path)
            scale = None
            if self.routing_gradient == "straight_through" and torch.is_grad_enabled():
                probability = self.path_probability(x, leaf, path)
                scale = probability / probability.detach()
            elif self.routing_gradient not in (None, "straight_through"):
                raise ValueError(f"routing_gradient must be None or 'straight_through', got {self.routing_gradient!r}")
            out = (tree_ffn_blocks(self, x, leaf, path, scale) if self.computes_blocks_in_training
                   else tree_ffn_masked_dense(self, x, leaf, path, scale))
        return out.reshape(shape)

    @property
    def computes_blocks_in_training(self) -> bool:
        """Whether the differentiable path computes only the tokens' blocks (`tree_ffn_blocks`)
        rather than every stored row, masked: where leaves select their neurons, the stored rows
        are several times the MLP (a 25% tree of 16 leaves stores it 4 times), and `after_sum`
        needs the path's sums, which the masked form takes. `masked_training` forces the masked form."""
        return (not self.masked_training and self.spec.leaf_neurons == "selected"
                and self.spec.activation == "per_node")

    def path_probability(self, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """(N, trees): product over levels of sigmoid(+-score / temperature) of the branches taken."""
        # Every node's score, then the path's: a GEMM and a gather, whose backward is a small
        # scatter, where indexing the vectors by path costs an accumulating index_put of (N, T, depth, d).
        scores = node_scores(x, *self.routing_vectors()).gather(2, path)
        children = torch.cat([path[:, :, 1:], (leaf + self.spec.num_nodes)[:, :, None]], dim=2)
        went_right = children % 2 == 0
        signed = torch.where(went_right, scores, -scores) / self.routing_temperature
        return torch.sigmoid(signed).prod(dim=2)

    # -- accounting --------------------------------------------------------------------------
    def cost(self) -> SparseCost:
        spec = self.spec
        rows_read = spec.num_trees * (spec.depth * spec.node_width + spec.leaf_width) + spec.shared_width
        router_elems = spec.num_trees * spec.depth * (self.hidden_size + 1) if spec.routing == "hyperplane" else 0
        return SparseCost(
            active_units=float(rows_read),
            total_units=self.intermediate_size,
            active_weight_bytes=float(SERVED_BYTES_PER_WEIGHT * (3 * rows_read * self.hidden_size + router_elems)),
            dense_weight_bytes=SERVED_BYTES_PER_WEIGHT * 3 * self.intermediate_size * self.hidden_size,
        )

    @property
    def stored_multiple(self) -> float:
        """Stored rows per dense neuron: 1 for a complete partition tree, more where selected leaves
        share neurons, less once pruned."""
        return self.spec.stored_units / self.intermediate_size

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"trees={s.num_trees}, depth={s.depth}, node_width={s.node_width}, leaf_width={s.leaf_width}, "
            f"shared_width={s.shared_width}, routing={s.routing}, activation={s.activation}"
            + (f", selected leaves: {self.stored_multiple:.2f}x the MLP's rows stored"
               if s.leaf_neurons == "selected" else "")
            + (f", pruned: {s.stored_leaves} of {s.num_trees * s.num_leaves} leaves stored" if s.is_pruned else "")
        )


def tree_ffn_blocks(
    layer: TreeFFN, x: torch.Tensor, leaf: torch.Tensor, path: torch.Tensor, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`tree_ffn_masked_dense` (per_node), computing only what each token's path reads: the tokens
    grouped by visited block, one GEMM each (`tree_blocks.grouped_block_mlp`). Differentiable, with
    the same gradients (off-path rows get exactly zero); it costs the active rows, not the stored ones."""
    spec = layer.spec
    if spec.activation != "per_node":
        raise ValueError("tree_ffn_blocks computes per_node trees; after_sum takes tree_ffn_masked_dense")
    tables = (layer.gate_rows, layer.up_rows, layer.down_rows)
    slots = layer.slot_table(x.device)[torch.arange(spec.num_trees, device=x.device), leaf]  # (N, T)
    out = None
    for tree in range(spec.num_trees):
        # the tree's leaf, then its node at each level (node j of tree t is block t * nodes + j)
        visits = [(slots[:, tree], layer.node_rows, spec.leaf_width, spec.stored_leaves)]
        if spec.node_width:
            visits += [(path[:, tree, level] + tree * spec.num_nodes, 0, spec.node_width,
                        spec.num_trees * spec.num_nodes) for level in range(spec.depth)]
        for block, start, width, count in visits:
            y = grouped_block_mlp(x, block, *tables, start, width, count, layer.act_fn)
            if scale is not None:
                y = y * scale[:, tree, None].to(y.dtype)
            out = y if out is None else out + y
    if spec.shared_width:
        shared = slice(layer.node_rows + layer.leaf_rows, spec.stored_units)
        act = layer.act_fn
        out = out + (act(x @ layer.gate_rows[shared].T) * (x @ layer.up_rows[shared].T)) @ layer.down_rows[shared]
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
