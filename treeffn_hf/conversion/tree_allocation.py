"""Per-layer widths of trees whose leaves select their neurons, shared out on a calibration loss.

Layers are not equally sensitive to a tree: on SmolLM2, a 25% tree in the first layer alone costs
a KL of 0.46 from the dense model, in any other 0.02-0.12 (benchmarks/quality.py's allocated
row, which reaches 2.994 against 3.138 for the same width everywhere). So a mean active fraction is
shared out as `budgets.allocate_greedy` shares out MGS densities: each layer's sensitivity is the
KL divergence from the dense model's next-token distribution when that layer alone is a tree,
fitted from the dense MLP (`SelectedLeafFit`, no gradient step) at a grid of active
fractions; from dense, the layer whose next step down adds the least KL gives it up until the
mean is met. The widths are then rounded to whole neurons without exceeding the budget.

It is not `treeffn distill`'s default (`--allocation greedy` asks for it): with 16 leaves at 12.5%
active it made SmolLM2 worse, 7.16 against 5.52 with the same width everywhere (README).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..architectures import architecture_for
from ..modeling.layer_spec import InvalidSpecError, TreeSpec
from ..modeling.tree_layer import TreeFFN
from .budgets import _log_probs, allocate_greedy, kl_from_dense
from .leaf_selection import SelectedLeafFit, fit_selected_leaves

ALLOCATION_FRACTIONS = (0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625)  # where each layer's KL is measured
SENSITIVITY_TOKENS = 8192  # calibration tokens a layer's trial trees are fitted on


def allocation_fractions(active: float) -> tuple[float, ...]:
    """The grid the sensitivities are measured on: `ALLOCATION_FRACTIONS`, reaching down to half of
    `active` where that lies below them (the greedy allocation moves only within the grid)."""
    return ALLOCATION_FRACTIONS + ((active / 2,) if active / 2 < ALLOCATION_FRACTIONS[-1] else ())


def with_active_fraction(spec: TreeSpec, fraction: float, intermediate_size: int) -> TreeSpec:
    """`spec` with the leaf width that makes a token compute `fraction` of the MLP's neurons
    (rounded down; the path's node and shared neurons count)."""
    path = spec.num_trees * spec.depth * spec.node_width + (spec.shared_width or 0)
    leaf = (math.floor(fraction * intermediate_size + 1e-9) - path) // spec.num_trees
    if leaf < 1:
        raise InvalidSpecError(f"{fraction:.1%} of {intermediate_size} neurons leaves no leaf neuron beside the "
                               f"path's {path} node and shared neurons")
    return dataclasses.replace(spec, leaf_width=leaf)


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer before the one on trial: passes its input through, or, for the
    layer just before it, returns the hidden states the dense layers produced there (recorded once),
    so a trial computes only the layers from its own on; the logits are the same."""

    def __init__(self, output: Optional[torch.Tensor] = None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.output is None else self.output


def _trial_shapes(dense_model, spec: TreeSpec, fractions: Sequence[float]) -> list[TreeSpec]:
    if spec.leaf_neurons != "selected":
        raise ValueError("tree width allocation fits trees whose leaves select their neurons (leaf_neurons='selected')")
    config = dense_model.config
    return [with_active_fraction(spec, fraction, config.intermediate_size).resolve(
        config.hidden_size, config.intermediate_size) for fraction in fractions]


def _trial_tree(dense_mlp: torch.nn.Module, config, shape: TreeSpec) -> TreeFFN:
    weight = dense_mlp.gate_proj.weight
    return TreeFFN(config.hidden_size, config.intermediate_size, shape, dense_mlp.act_fn).to(
        device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def tree_layer_sensitivities(dense_model, spec: TreeSpec, inputs: Sequence[torch.Tensor], loss_ids: torch.Tensor,
                             fractions: Sequence[float] = ALLOCATION_FRACTIONS, seed: int = 0,
                             progress: bool = True, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(layers, fractions): mean KL(dense || model) per token on `loss_ids` when only that layer's MLP
    is a tree of `spec`'s shape at that active fraction, fitted on `inputs[layer]` (the dense MLP's
    inputs; at most `SENSITIVITY_TOKENS` of them). `rows`: measure only these layers (others stay 0)."""
    shapes = _trial_shapes(dense_model, spec, fractions)
    config = dense_model.config
    arch = architecture_for(config)
    layer_list = arch.layer_list(dense_model)
    layers = list(layer_list)
    ids = loss_ids.to(next(dense_model.parameters()).device)
    reference = dense_model(ids, use_cache=False, output_hidden_states=True)
    dense = F.log_softmax(reference.logits.float(), dim=-1)  # as budgets._log_probs, from the same forward
    hidden = reference.hidden_states  # hidden[i]: the input of decoder layer i
    table = torch.zeros(len(layers), len(fractions))
    rows = range(len(layers)) if rows is None else rows
    progress_bar = tqdm(total=len(rows) * len(fractions), desc="allocation: tree sensitivities", disable=not progress)
    for row in rows:
        layer = layers[row]
        dense_mlp = getattr(layer, arch.mlp_attr)
        for before in range(row):
            layer_list[before] = _Replay(hidden[row] if before == row - 1 else None)
        try:
            prepared = SelectedLeafFit(dense_mlp, inputs[row][:SENSITIVITY_TOKENS], shapes[0], seed=seed + row)
            for col, shape in enumerate(shapes):
                tree = _trial_tree(dense_mlp, config, shape)
                prepared.fit(tree)  # the routing is the same at every width: computed once a layer
                setattr(layer, arch.mlp_attr, tree)
                try:
                    table[row, col] = kl_from_dense(dense, dense_model, ids)
                finally:
                    setattr(layer, arch.mlp_attr, dense_mlp)
                progress_bar.update()
        finally:
            for before in range(row):
                layer_list[before] = layers[before]
    progress_bar.close()
    return table


@torch.no_grad()
def naive_tree_layer_sensitivities(dense_model, spec: TreeSpec, inputs: Sequence[torch.Tensor], loss_ids: torch.Tensor,
                                   fractions: Sequence[float] = ALLOCATION_FRACTIONS, seed: int = 0,
                                   rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The oracle of `tree_layer_sensitivities` (tests, benchmarks/studies/allocation_cost.py): every trial a
    fresh fit and a full forward of the model with that one MLP swapped."""
    shapes = _trial_shapes(dense_model, spec, fractions)
    config = dense_model.config
    arch = architecture_for(config)
    layers = arch.decoder_layers(dense_model)
    ids = loss_ids.to(next(dense_model.parameters()).device)
    dense = _log_probs(dense_model, ids)
    table = torch.zeros(len(layers), len(fractions))
    for row in range(len(layers)) if rows is None else rows:
        dense_mlp = getattr(layers[row], arch.mlp_attr)
        for col, shape in enumerate(shapes):
            tree = _trial_tree(dense_mlp, config, shape)
            fit_selected_leaves(tree, dense_mlp, inputs[row][:SENSITIVITY_TOKENS], seed=seed + row)
            setattr(layers[row], arch.mlp_attr, tree)
            try:
                table[row, col] = kl_from_dense(dense, dense_model, ids)
            finally:
                setattr(layers[row], arch.mlp_attr, dense_mlp)
    return table


def allocate_tree_specs(spec: TreeSpec, sensitivities: torch.Tensor, active: float, intermediate_size: int,
                        fractions: Sequence[float] = ALLOCATION_FRACTIONS) -> list[TreeSpec]:
    """One spec per layer, `spec`'s shape with leaf widths whose active neurons average at most
    `active` of the MLP's (greedy on `sensitivities`, then rounded down to whole neurons)."""
    shares = allocate_greedy(sensitivities.tolist(), fractions, active)
    return [with_active_fraction(spec, share, intermediate_size) for share in shares]


def allocate_tree_widths(dense_model, spec: TreeSpec, inputs: Sequence[torch.Tensor], loss_ids: torch.Tensor,
                         active: float, *, progress: bool = True) -> tuple[list[TreeSpec], torch.Tensor, tuple]:
    """The whole allocation: (one spec per layer, the sensitivities, the grid they were measured on)."""
    grid = allocation_fractions(active)
    sensitivities = tree_layer_sensitivities(dense_model, spec, inputs, loss_ids, fractions=grid, progress=progress)
    intermediate = dense_model.config.intermediate_size
    return allocate_tree_specs(spec, sensitivities, active, intermediate, fractions=grid), sensitivities, grid
