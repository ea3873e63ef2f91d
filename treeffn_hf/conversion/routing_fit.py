"""Fit a tree layer's neuron partition and routing to calibration data.

The data-free initial partition groups neurons by the geometry of their gate rows. With the
layer's inputs at hand we can do better: every neuron's contribution to every token,
`mass[t, i] = |act(g_i x_t) u_i x_t| * |d_i|`, says which neurons a token needs. The fit
re-lays the layer top-down so that tokens reach the neurons that carry their dense activation
mass:

- shared (always-on) neurons: the largest mean mass;
- each node: its block takes the neurons most used by the tokens reaching it, then the rest is
  split in two equal halves together with a token split, chosen to maximise the mass the tokens
  find on their side. With `routing='self'` the split is the sign of one of the node's own
  neurons (the best of the most-used candidates; it goes first in the block). With
  `routing='hyperplane'` it alternates between a router on x and the neuron halves. The router
  is a linear classifier of the side that holds more of each token's mass, weighted by the mass
  at stake: `router_fit='logistic'` (weighted logistic regression, a few Newton steps from the
  ridge solution) or `'ridge'` (weighted least squares of +-1 labels, one solve; far tokens on
  the right side pull its boundary, see the tests).

Only rows are permuted (and routers set): the layer computes exactly the same neurons, and the
captured-mass fraction (on held-out tokens) measures how much of the dense MLP the paths keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..modeling.tree_layer import TreeFFN
from .partition import principal_direction

SELF_ROUTING_CANDIDATES = 24
HYPERPLANE_ROUNDS = 3
RIDGE = 1e-3
ROUTER_FITS = ("ridge", "logistic")
DEFAULT_ROUTER_FIT = "ridge"
NEWTON_STEPS = 8


@dataclass
class RoutingFitReport:
    layer: int
    captured_mass_before: Optional[float]  # None where the fit rebuilds the layer (selected leaves)
    captured_mass_after: float


@torch.no_grad()
def neuron_mass(layer: TreeFFN, x: torch.Tensor, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass, gate pre-activation), both (tokens, neurons) in the layer's current row order."""
    gate_rows, up_rows = layer.gate_rows.float(), layer.up_rows.float()
    down_norm = layer.down_rows.float().norm(dim=1)
    masses, pre = [], []
    for chunk in x.float().split(batch):
        g = chunk @ gate_rows.T
        masses.append((layer.act_fn(g) * (chunk @ up_rows.T)).abs() * down_norm)
        pre.append(g)
    return torch.cat(masses), torch.cat(pre)


def path_masses(layer: TreeFFN, mass: torch.Tensor) -> torch.Tensor:
    """(tokens, trees, leaves): the mass of each complete root-to-leaf path's neurons, its node
    blocks and its leaf, from `mass` (tokens, neurons) in the layer's row order."""
    spec, tokens = layer.spec, mass.shape[0]
    leaf_rows = mass[:, layer.node_rows : layer.node_rows + layer.leaf_rows]
    paths = leaf_rows.reshape(tokens, spec.num_trees, spec.num_leaves, spec.leaf_width).sum(-1)
    if spec.node_width:
        nodes = mass[:, : layer.node_rows].reshape(tokens, spec.num_trees, spec.num_nodes, spec.node_width).sum(-1)
        leaves = torch.arange(spec.num_leaves)
        # Leaves are numbered by their path bits, first level first: tree_route's heap walk.
        on_path = torch.stack([(leaves >> (spec.depth - level)) + (1 << level) - 1 for level in range(spec.depth)], 1)
        paths = paths + nodes[:, :, on_path].sum(-1)
    return paths


@torch.no_grad()
def captured_mass(layer: TreeFFN, x: torch.Tensor, *, oracle: bool = False) -> float:
    """Fraction of the dense activation mass that lies on the tokens' paths (shared included).
    With `oracle`, every token takes, in every tree, the path that holds the most of its mass: the
    bound that no router of these leaves can pass."""
    mass, _ = neuron_mass(layer, x)
    paths = path_masses(layer, mass)
    if oracle:
        chosen = paths.max(dim=-1).values
    else:
        leaf, _ = layer.route(x.to(layer.gate_rows.dtype))
        chosen = paths.gather(2, leaf.unsqueeze(-1)).squeeze(-1)
    shared = mass[:, layer.node_rows + layer.leaf_rows :].sum(1)
    return float((chosen.sum(1) + shared).sum() / mass.sum())


def fit_routing(
    layer: TreeFFN, inputs: torch.Tensor, *, router_fit: str = DEFAULT_ROUTER_FIT, holdout: float = 0.1, seed: int = 0,
    layer_index: int = 0,
) -> RoutingFitReport:
    """Re-lay `layer` (in place) so its routing sends tokens to their high-mass neurons."""
    if router_fit not in ROUTER_FITS:
        raise ValueError(f"router_fit must be one of {ROUTER_FITS}, got {router_fit!r}")
    if layer.spec.leaf_neurons != "partition":
        raise ValueError("fit_routing re-lays a partition of the dense neurons; selected leaves are fitted by "
                         "conversion.leaf_selection.fit_selected_leaves")
    generator = torch.Generator().manual_seed(seed)
    x = inputs.float()
    order = torch.randperm(x.shape[0], generator=generator)
    n_eval = max(1, int(holdout * x.shape[0]))
    x_eval, x_fit = x[order[:n_eval]], x[order[n_eval:]]
    before = captured_mass(layer, x_eval)

    mass, pre = neuron_mass(layer, x_fit)
    layout = _fit_layout(layer, x_fit, mass, pre, router_fit)
    _apply_layout(layer, layout)
    return RoutingFitReport(layer=layer_index, captured_mass_before=before,
                            captured_mass_after=captured_mass(layer, x_eval))


@dataclass
class _Layout:
    order: torch.Tensor  # new row -> current row
    router_weight: Optional[torch.Tensor]
    router_bias: Optional[torch.Tensor]


def shared_and_tree_shares(mass: torch.Tensor, spec) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The always-on neurons (largest mean mass, sorted) and every tree's share of the rest, dealt
    round-robin by mass so every tree gets an equal share of the important neurons."""
    by_mass = torch.argsort(mass.mean(0), descending=True)
    rest = by_mass[spec.shared_width :]
    return by_mass[: spec.shared_width].sort().values, [rest[t :: spec.num_trees] for t in range(spec.num_trees)]


def _fit_layout(layer: TreeFFN, x: torch.Tensor, mass: torch.Tensor, pre: torch.Tensor, router_fit: str) -> _Layout:
    spec = layer.spec
    shared, per_tree = shared_and_tree_shares(mass, spec)
    nodes = torch.empty(spec.num_trees, spec.num_nodes, spec.node_width, dtype=torch.long)
    leaves = torch.empty(spec.num_trees, spec.num_leaves, spec.leaf_width, dtype=torch.long)
    hyperplane = spec.routing == "hyperplane"
    router_w = torch.zeros(spec.num_trees, spec.num_nodes, x.shape[1]) if hyperplane else None
    router_b = torch.zeros(spec.num_trees, spec.num_nodes) if hyperplane else None
    all_tokens = torch.arange(x.shape[0])
    for t, members in enumerate(per_tree):
        stack = [(0, 0, all_tokens, members)]
        while stack:
            heap, level, tokens, neurons = stack.pop()
            if level == spec.depth:
                leaves[t, heap - spec.num_nodes] = neurons
                continue
            node_mass = mass[tokens][:, neurons]
            if hyperplane:
                own, left, right, go_right, (w, b) = _split_hyperplane(x[tokens], node_mass, neurons,
                                                                       spec.node_width, router_fit)
                router_w[t, heap], router_b[t, heap] = w, b
            else:
                own, left, right, go_right = _split_self(pre[tokens][:, neurons], node_mass, neurons, spec.node_width)
            if spec.node_width:
                nodes[t, heap] = own
            stack.append((2 * heap + 1, level + 1, tokens[~go_right], left))
            stack.append((2 * heap + 2, level + 1, tokens[go_right], right))
    parts = ([nodes.reshape(-1)] if spec.node_width else []) + [leaves.reshape(-1), shared]
    return _Layout(order=torch.cat(parts), router_weight=router_w, router_bias=router_b)


def _halves(side_mass: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Equal halves of `neurons` given each one's (left mass, right mass); returns the captured mass."""
    preference = side_mass[:, 0] - side_mass[:, 1]
    ordered = torch.argsort(preference, descending=True)
    half = len(ordered) // 2
    left, right = ordered[:half], ordered[half:]
    captured = float(side_mass[left, 0].sum() + side_mass[right, 1].sum())
    return neurons[left], neurons[right], captured


def _side_mass(node_mass: torch.Tensor, go_right: torch.Tensor) -> torch.Tensor:
    return torch.stack([node_mass[~go_right].sum(0), node_mass[go_right].sum(0)], dim=1)


def _split_self(pre: torch.Tensor, node_mass: torch.Tensor, neurons: torch.Tensor, width: int):
    """The node neuron whose gate sign splits the tokens best routes; it goes first in the block."""
    total = node_mass.sum(0)
    candidates = torch.argsort(total, descending=True)[:SELF_ROUTING_CANDIDATES]
    best = None
    for c in candidates.tolist():
        own = torch.cat([torch.tensor([c]), _top_excluding(total, width - 1, exclude=c)])
        keep = torch.ones(len(neurons), dtype=torch.bool)
        keep[own] = False
        go_right = pre[:, c] > 0
        left, right, captured = _halves(_side_mass(node_mass[:, keep], go_right), neurons[keep])
        if best is None or captured > best[0]:
            best = (captured, neurons[own], left, right, go_right)
    return best[1:]


def _top_excluding(values: torch.Tensor, k: int, exclude: int) -> torch.Tensor:
    masked = values.clone()
    masked[exclude] = -float("inf")
    return torch.argsort(masked, descending=True)[:k]


def _split_hyperplane(x: torch.Tensor, node_mass: torch.Tensor, neurons: torch.Tensor, width: int,
                      router_fit: str = "ridge"):
    """Alternate: neuron halves given the token split, a router fitted to where each token's mass
    is, the token split given the router."""
    total = node_mass.sum(0)
    own = torch.argsort(total, descending=True)[:width]
    keep = torch.ones(len(neurons), dtype=torch.bool)
    keep[own] = False
    rest_mass, rest = node_mass[:, keep], neurons[keep]
    w = torch.zeros(x.shape[1])
    b = torch.zeros(())
    if x.shape[0] < 2:
        left, right, _ = _halves(torch.stack([total[keep], total[keep]], 1), rest)
        return neurons[own], left, right, torch.zeros(x.shape[0], dtype=torch.bool), (w, b)
    # Start from the principal direction of the tokens' normalised mass profiles.
    profile = F.normalize(rest_mass, dim=1)
    score = profile @ principal_direction(profile)
    go_right = score > score.median()
    for _ in range(HYPERPLANE_ROUNDS):
        left_pos, right_pos, _ = _halves(_side_mass(rest_mass, go_right), torch.arange(len(rest)))
        want_right = rest_mass[:, right_pos].sum(1) - rest_mass[:, left_pos].sum(1)
        w, b = fit_router(x, want_right > 0, want_right.abs(), router_fit)
        go_right = (x @ w + b) > 0
    left, right, _ = _halves(_side_mass(rest_mass, go_right), rest)
    return neurons[own], left, right, go_right, (w, b)


def fit_router(x: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
               router_fit: str = "ridge") -> tuple[torch.Tensor, torch.Tensor]:
    """A router (w, b) that sends token t right where x_t . w + b > 0, fitted to `label` (go
    right) with per-token `weight` (the mass a token stands to gain), on [x, 1] scaled to unit
    mean norm with the same relative ridge penalty:

    - `ridge`: weighted least squares of +-1 labels, one solve;
    - `logistic`: weighted logistic regression, `NEWTON_STEPS` Newton steps from the ridge solution.
    """
    scale = x.norm(dim=1).mean().clamp_min(1e-6)
    design = torch.cat([x / scale, torch.ones(x.shape[0], 1)], dim=1)
    weight = weight / weight.mean().clamp_min(1e-12)
    gram = design.T @ (design * weight[:, None])
    penalty = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0])
    theta = torch.linalg.solve(gram + penalty, design.T @ (weight * (label.float() * 2 - 1)))
    if router_fit == "logistic":
        target = label.float()
        for _ in range(NEWTON_STEPS):
            p = torch.sigmoid(design @ theta)
            grad = design.T @ (weight * (p - target)) + penalty @ theta
            curvature = (weight * p * (1 - p)).clamp_min(1e-9)
            theta = theta - torch.linalg.solve(design.T @ (design * curvature[:, None]) + penalty, grad)
    return theta[:-1] / scale, theta[-1]


@torch.no_grad()
def _apply_layout(layer: TreeFFN, layout: _Layout) -> None:
    for table in (layer.gate_rows, layer.up_rows, layer.down_rows):
        table.copy_(table[layout.order].clone())
    if layout.router_weight is not None:
        layer.router_weight.copy_(layout.router_weight.to(layer.router_weight.dtype))
        layer.router_bias.copy_(layout.router_bias.to(layer.router_bias.dtype))
