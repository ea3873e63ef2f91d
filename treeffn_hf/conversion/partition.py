"""Dense-to-tree initialisation: partition the dense MLP's neurons into tree blocks.

Neurons are compared by their normalised gate rows (the input directions they respond to). Each
subtree is split in two equal halves along the principal direction of its neurons' gate rows, so
neurons that fire for similar inputs share a leaf. The node block of a subtree takes the neuron
best aligned with that direction first (so `routing='self'` branches along it) and then the
neurons closest to the split, which both halves need. Every dense neuron lands in exactly one
block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..modeling.layer_spec import TreeSpec


@dataclass
class TreeLayout:
    """Dense neuron indices per block. `router` holds one unit split direction per node."""

    node_index: Optional[torch.Tensor]  # (trees, nodes, node_width) or None
    leaf_index: torch.Tensor  # (trees, leaves, leaf_width)
    shared_index: torch.Tensor  # (shared_width,)
    router: torch.Tensor  # (trees, nodes, hidden)

    def all_indices(self) -> torch.Tensor:
        parts = [self.leaf_index.reshape(-1), self.shared_index]
        if self.node_index is not None:
            parts.append(self.node_index.reshape(-1))
        return torch.cat(parts)


def principal_direction(rows: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Unit top principal direction of centred `rows` (power iteration; deterministic start)."""
    centred = rows - rows.mean(dim=0, keepdim=True)
    direction = centred.abs().sum(dim=0) + 1e-6  # a start no single row makes orthogonal
    direction = direction / direction.norm()
    for _ in range(iterations):
        nxt = centred.T @ (centred @ direction)
        norm = nxt.norm()
        if norm == 0:
            break
        direction = nxt / norm
    return direction


def _neuron_importance(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    # Data-free proxy for how much a neuron contributes; calibration refines it later.
    return gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)


def partition_neurons(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, spec: TreeSpec
) -> TreeLayout:
    """Partition the rows of a dense SwiGLU (`gate`, `up`: (H, d); `down`: (d, H)) into `spec`'s blocks.

    `spec` must be resolved against (d, H).
    """
    gate, up, down = gate.float(), up.float(), down.float()
    hidden = gate.shape[1]
    units = torch.arange(gate.shape[0])
    # Shared (always-on) neurons: the most important ones by the weight-magnitude proxy.
    order = torch.argsort(_neuron_importance(gate, up, down), descending=True)
    shared_index, units = order[: spec.shared_width].sort().values, order[spec.shared_width :]
    directions = torch.nn.functional.normalize(gate, dim=1)

    # Trees: deal neurons out round-robin along the principal direction, so every tree spans
    # the whole input space instead of one tree per region.
    along = directions[units] @ principal_direction(directions[units])
    units = units[torch.argsort(along)]
    per_tree = [units[t :: spec.num_trees] for t in range(spec.num_trees)]

    node_index = torch.empty(spec.num_trees, spec.num_nodes, spec.node_width, dtype=torch.long)
    leaf_index = torch.empty(spec.num_trees, spec.num_leaves, spec.leaf_width, dtype=torch.long)
    router = torch.zeros(spec.num_trees, spec.num_nodes, hidden)
    for tree, members in enumerate(per_tree):
        _split(members, 0, 0, spec, directions, node_index[tree], leaf_index[tree], router[tree])
    return TreeLayout(
        node_index=node_index if spec.node_width else None,
        leaf_index=leaf_index,
        shared_index=shared_index,
        router=router,
    )


def _split(
    members: torch.Tensor,
    heap: int,
    level: int,
    spec: TreeSpec,
    directions: torch.Tensor,
    node_index: torch.Tensor,
    leaf_index: torch.Tensor,
    router: torch.Tensor,
) -> None:
    if level == spec.depth:
        leaf_index[heap - spec.num_nodes] = members
        return
    direction = principal_direction(directions[members])
    along = directions[members] @ direction
    if spec.node_width:
        router_first = torch.argmax(along).view(1)
        near_split = torch.argsort((along - along.median()).abs())
        near_split = near_split[near_split != router_first[0]][: spec.node_width - 1]
        own = torch.cat([router_first, near_split])
        node_index[heap] = members[own]
        keep = torch.ones(len(members), dtype=torch.bool)
        keep[own] = False
        members, along = members[keep], along[keep]
    router[heap] = direction
    ordered = members[torch.argsort(along)]
    half = len(ordered) // 2
    _split(ordered[:half], 2 * heap + 1, level + 1, spec, directions, node_index, leaf_index, router)
    _split(ordered[half:], 2 * heap + 2, level + 1, spec, directions, node_index, leaf_index, router)


def selected_leaves_from_partition(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, spec: TreeSpec
) -> TreeLayout:
    """The data-free start of a tree whose leaves select their neurons (`leaf_neurons='selected'`):
    the partition of the same forest, each leaf widened to `spec.leaf_width` neurons by taking its
    tree's next leaves' neurons in order (its siblings first, which respond to similar inputs), and
    the shared block the most important neurons. `treeffn distill` replaces all of it with neurons
    chosen on calibration data (conversion/leaf_selection.py)."""
    partition = dataclasses.replace(spec, leaf_neurons="partition", leaf_width=None, shared_width=None)
    layout = partition_neurons(gate, up, down, partition.resolve(gate.shape[1], gate.shape[0]))
    trees, leaves, width = layout.leaf_index.shape
    sequence = layout.leaf_index.reshape(trees, leaves * width)
    offsets = torch.arange(leaves)[:, None] * width + torch.arange(spec.leaf_width)[None, :]
    leaf_index = sequence[:, offsets % sequence.shape[1]]
    order = torch.argsort(_neuron_importance(gate.float(), up.float(), down.float()), descending=True)
    return dataclasses.replace(layout, leaf_index=leaf_index, shared_index=order[: spec.shared_width].sort().values)
