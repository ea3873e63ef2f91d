"""Fit a tree whose leaves select their own neurons (`TreeSpec(leaf_neurons='selected')`).

A partition tree fits no better than static pruning until its weights are trained: each leaf must
serve every token routed to it with a fixed slice of the MLP. Here each leaf picks, from the whole
MLP, the neurons its own tokens need, so leaves may share neurons (benchmarks/studies/tree_layer_fit.py,
benchmarks/studies/overlap_tree_study.py). The layer is rebuilt from the dense MLP it replaces, on that
MLP's inputs `x` and outputs `y`, with `mass[t, i] = |act(g_i x_t) u_i x_t| * |d_i|`:

- shared (always-on) block: the `shared_width` neurons of largest mean mass;
- the rest is dealt round-robin by mass to the trees, so trees hold different neurons;
- routers: each tree splits the tokens recursively by 2-means, a node's router the perpendicular
  bisector of its two centroids (each tree from its own seed);
- node blocks: the neurons of largest mass on the tokens reaching the node;
- leaves: the neurons of largest mass on the tokens routed there, from its tree's share, none
  already on the path; a leaf that few calibration tokens reach takes its tree's overall top;
- gate and up rows are copies of the dense rows; every leaf's down rows are refitted by ridge
  regression (`ridge_down_rows`) on its tokens, to the dense output less the rest of the path.

`treeffn distill` then trains the layer as it trains any tree.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..modeling.tree_layer import TreeFFN
from .compensation import ridge_down_rows
from .fitting import batched, holdout_split
from .routing_fit import RoutingFitReport, shared_and_tree_shares

KMEANS_ITERATIONS = 15


@torch.no_grad()
def bisect_tokens(x: torch.Tensor, depth: int, generator: torch.Generator,
                  iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Routers (nodes, d) and biases (nodes,) in heap order that split the tokens `x` recursively in
    two by 2-means, each node the perpendicular bisector of its two centroids (right: nearer the
    second). Clustering the tokens' normalised mass profiles instead, with a logistic router of the
    clusters, fitted SmolLM2's layer 4 no better (held-out FVU 0.375 against 0.332 on 8k tokens,
    0.310 both on 32k) at 3x the time."""
    nodes = (1 << depth) - 1
    weight, bias = torch.zeros(nodes, x.shape[1], dtype=x.dtype), torch.zeros(nodes, dtype=x.dtype)
    stack = [(0, 0, torch.arange(x.shape[0]))]
    while stack:
        heap, level, rows = stack.pop()
        if level == depth:
            continue
        z = x[rows]
        if z.shape[0] >= 2:
            centroids = z[torch.randperm(z.shape[0], generator=generator)[:2]].clone()
            for _ in range(iterations):
                side = torch.cdist(z, centroids).argmin(1)
                for k in range(2):
                    if (side == k).any():
                        centroids[k] = z[side == k].mean(0)
            weight[heap] = centroids[1] - centroids[0]
            bias[heap] = -(centroids[1].pow(2).sum() - centroids[0].pow(2).sum()) / 2
        right = z @ weight[heap] + bias[heap] > 0
        stack.append((2 * heap + 1, level + 1, rows[~right]))
        stack.append((2 * heap + 2, level + 1, rows[right]))
    return weight, bias


def _top(values: torch.Tensor, pool: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The `k` members of `pool` with the largest `values` (indexed by neuron), none in `exclude`."""
    if exclude is not None and exclude.numel():
        pool = pool[~torch.isin(pool, exclude)]
    return pool[torch.argsort(values[pool], descending=True)[:k]]


class SelectedLeafFit:
    """Everything a selected-leaf fit computes before it looks at node and leaf widths, kept for
    fitting several widths of one tree shape (the width allocation's grid): the dense MLP's hidden
    activations, masses and outputs on the fit tokens, the shared neurons, each tree's share and
    its routers. `fit` then builds a layer of any width, as `fit_selected_leaves` does."""

    @torch.no_grad()
    def __init__(self, dense_mlp: torch.nn.Module, inputs: torch.Tensor, spec, *, holdout: float = 0.1,
                 seed: int = 0):
        if spec.leaf_neurons != "selected" or spec.is_pruned:
            raise ValueError("fit_selected_leaves fits complete trees with leaf_neurons='selected' (fit before pruning)")
        self.shape = (spec.num_trees, spec.depth, spec.shared_width)
        self.seed = seed
        self.gate_w = dense_mlp.gate_proj.weight.detach().float().cpu()
        self.up_w = dense_mlp.up_proj.weight.detach().float().cpu()
        self.down_rows = dense_mlp.down_proj.weight.detach().float().cpu().T  # (I, d): one row per neuron
        self.act = dense_mlp.act_fn
        generator = torch.Generator().manual_seed(seed)
        x_all = inputs.detach().float().cpu()
        eval_index, fit_index = holdout_split(x_all.shape[0], holdout, generator)
        self.x, self.x_eval = x_all[fit_index], x_all[eval_index]
        self.hidden = self.act(self.x @ self.gate_w.T) * (self.x @ self.up_w.T)
        self.mass = self.hidden.abs() * self.down_rows.norm(dim=1)
        self.y = self.hidden @ self.down_rows
        self.shared, self.pools = shared_and_tree_shares(self.mass, spec)
        routers = [bisect_tokens(self.x, spec.depth, generator) for _ in self.pools]
        self.router_w = torch.stack([w for w, _ in routers])
        self.router_b = torch.stack([b for _, b in routers])

    @torch.no_grad()
    def fit(self, layer: TreeFFN, layer_index: int = 0) -> RoutingFitReport:
        """Rebuild `layer` (in place); see the module doc. The report's captured mass is the share of
        the dense activation mass on the tokens' paths, held out."""
        spec = layer.spec
        if (spec.num_trees, spec.depth, spec.shared_width) != self.shape or spec.leaf_neurons != "selected":
            raise ValueError(f"this fit was prepared for (trees, depth, shared) = {self.shape}, not the layer's "
                             f"{(spec.num_trees, spec.depth, spec.shared_width)}")
        x, hidden, mass, y, down_rows = self.x, self.hidden, self.mass, self.y, self.down_rows
        nodes = torch.zeros(spec.num_trees, spec.num_nodes, spec.node_width, dtype=torch.long)
        leaves = torch.zeros(spec.num_trees, spec.num_leaves, spec.leaf_width, dtype=torch.long)
        token_leaf = torch.zeros(x.shape[0], spec.num_trees, dtype=torch.long)
        few = max(1, spec.leaf_width // 4)  # fewer tokens than this: the leaf's own top is noise
        for t, pool in enumerate(self.pools):
            router_w, router_b = self.router_w[t], self.router_b[t]
            overall = mass[:, pool].mean(0)
            stack = [(0, 0, torch.arange(x.shape[0]), torch.empty(0, dtype=torch.long))]
            while stack:
                heap, level, rows, on_path = stack.pop()
                own = (mass[rows].mean(0) if rows.numel() >= few
                       else torch.zeros(mass.shape[1]).index_copy(0, pool, overall))
                if level == spec.depth:
                    leaves[t, heap - spec.num_nodes] = _top(own, pool, spec.leaf_width, on_path)
                    token_leaf[rows, t] = heap - spec.num_nodes
                    continue
                if spec.node_width:
                    nodes[t, heap] = _top(own, pool, spec.node_width, on_path)
                    on_path = torch.cat([on_path, nodes[t, heap]])
                right = x[rows] @ router_w[heap] + router_b[heap] > 0
                stack.append((2 * heap + 1, level + 1, rows[~right], on_path))
                stack.append((2 * heap + 2, level + 1, rows[right], on_path))

        order = torch.cat(([nodes.reshape(-1)] if spec.node_width else []) + [leaves.reshape(-1), self.shared])
        down = down_rows[order].clone()
        with_dense_rows = {"gate_rows": self.gate_w[order], "up_rows": self.up_w[order], "down_rows": down}
        _load(layer, with_dense_rows, self.router_w, self.router_b)
        out = batched(layer, x.to(layer.gate_rows.dtype)).float()
        for t in range(spec.num_trees):
            for leaf in range(spec.num_leaves):
                mine = (token_leaf[:, t] == leaf).nonzero().squeeze(1)
                if mine.numel() < few:
                    continue
                start = layer.node_rows + (t * spec.num_leaves + leaf) * spec.leaf_width
                rows = slice(start, start + spec.leaf_width)
                h = hidden[mine][:, leaves[t, leaf]]
                fit = ridge_down_rows(h, y[mine] - out[mine] + h @ down[rows], down[rows], seed=self.seed + leaf)
                if fit.rows is not None:
                    out[mine] += h @ (fit.rows - down[rows])
                    down[rows] = fit.rows
        _load(layer, {**with_dense_rows, "down_rows": down}, self.router_w, self.router_b)
        return RoutingFitReport(layer=layer_index, captured_mass_before=None,
                                captured_mass_after=_captured_dense_mass(layer, self.x_eval, self.gate_w, self.up_w,
                                                                         down_rows, order, self.act))


def fit_selected_leaves(layer: TreeFFN, dense_mlp: torch.nn.Module, inputs: torch.Tensor, *, holdout: float = 0.1,
                        seed: int = 0, layer_index: int = 0) -> RoutingFitReport:
    """Rebuild `layer` (in place) from `dense_mlp` on its `inputs`; see the module doc."""
    return SelectedLeafFit(dense_mlp, inputs, layer.spec, holdout=holdout, seed=seed).fit(layer, layer_index)


def _load(layer: TreeFFN, tables: dict[str, torch.Tensor], router_w: torch.Tensor, router_b: torch.Tensor) -> None:
    for name, value in tables.items():
        getattr(layer, name).copy_(value.to(getattr(layer, name).dtype))
    layer.router_weight.copy_(router_w.to(layer.router_weight.dtype))
    layer.router_bias.copy_(router_b.to(layer.router_bias.dtype))


def _captured_dense_mass(layer: TreeFFN, x: torch.Tensor, gate_w, up_w, down_rows, order: torch.Tensor, act) -> float:
    """Share of the dense activation mass of `x` held by the distinct dense neurons on each token's path."""
    mass = (act(x @ gate_w.T) * (x @ up_w.T)).abs() * down_rows.norm(dim=1)
    leaf, path = layer.route(x.to(layer.gate_rows.dtype))
    spec, n = layer.spec, x.shape[0]
    on_path = torch.zeros_like(mass, dtype=torch.bool)
    tokens = torch.arange(n)[:, None]
    slots = layer.slot_table(torch.device("cpu"))
    for t in range(spec.num_trees):
        start = layer.node_rows + slots[t, leaf[:, t].cpu()] * spec.leaf_width
        on_path[tokens, order[start[:, None] + torch.arange(spec.leaf_width)]] = True
        if spec.node_width:
            node_start = (t * spec.num_nodes + path[:, t].cpu()) * spec.node_width  # (N, depth)
            rows = node_start[:, :, None] + torch.arange(spec.node_width)
            on_path[tokens, order[rows.reshape(n, -1)]] = True
    on_path[:, order[layer.node_rows + layer.leaf_rows :]] = True
    return float((mass * on_path).sum() / mass.sum())
