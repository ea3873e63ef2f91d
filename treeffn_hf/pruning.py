"""Prune a tree model's dead paths into a smaller static tree.

A path no token takes on the given text (a dead path, as `tree_stats` counts them) loses its leaf
block: the weight tables keep only the live leaves, and a node whose one subtree has no live leaf
left always branches to the other (`TreeSpec.live_leaves`). On every token whose paths are all
live, the pruned model computes what the unpruned one does (the same sums); a token that would have taken
a pruned path takes the live subtree at the first node where its own subtree died. The active
units per token are unchanged; the stored weights shrink.

The result is a new model (the input is not modified) whose config records each layer's live
leaves, so `save` writes an ordinary checkpoint that loads, with trust_remote_code, as the same
smaller tree.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from .modeling.configuration_treeffn import LAYER_LIVE_LEAVES
from .modeling.tree_layer import TreeFFN
from .tree_stats import LayerTreeStats, collect_tree_stats, tree_layers


@dataclass
class LayerPruneReport:
    layer: int
    leaves_before: int
    leaves_after: int
    stored_units_before: int
    stored_units_after: int


@dataclass
class PruneReport:
    tokens: int
    min_tokens: int
    layers: list[LayerPruneReport]

    @property
    def stored_units_before(self) -> int:
        return sum(layer.stored_units_before for layer in self.layers)

    @property
    def stored_units_after(self) -> int:
        return sum(layer.stored_units_after for layer in self.layers)

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "min_tokens": self.min_tokens,
                "stored_units_before": self.stored_units_before, "stored_units_after": self.stored_units_after,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def live_leaves_from_counts(leaf_counts: list[list[int]], min_tokens: int = 1) -> tuple[tuple[int, ...], ...]:
    """Per tree, the leaves at least `min_tokens` tokens reached. A tree always keeps its most used
    leaf, so a high `min_tokens` cannot empty it."""
    kept = []
    for counts in leaf_counts:
        live = tuple(leaf for leaf, count in enumerate(counts) if count >= min_tokens)
        kept.append(live or (max(range(len(counts)), key=counts.__getitem__),))
    return tuple(kept)


def pruned_layer(layer: TreeFFN, live_leaves: tuple[tuple[int, ...], ...]) -> TreeFFN:
    """A copy of `layer` storing only `live_leaves` (a subset of the leaves it stores now)."""
    spec = layer.spec
    slots = spec.leaf_slots()
    for tree, leaves in enumerate(live_leaves):
        missing = [leaf for leaf in leaves if slots[tree][leaf] < 0]
        if missing:
            raise ValueError(f"tree {tree}: leaves {missing} are already pruned and cannot be kept")
    new = TreeFFN(layer.hidden_size, layer.intermediate_size, dataclasses.replace(spec, live_leaves=live_leaves),
                  layer.act_fn)
    new.to(device=layer.gate_rows.device, dtype=layer.gate_rows.dtype)
    keep = [layer.leaf_block(torch.arange(layer.gate_rows.shape[0]), tree, leaf)
            for tree, leaves in enumerate(live_leaves) for leaf in leaves]
    rows = torch.cat([torch.arange(layer.node_rows), *keep,
                      torch.arange(layer.node_rows + layer.leaf_rows, spec.stored_units)]).to(layer.gate_rows.device)
    with torch.no_grad():
        for name in ("gate_rows", "up_rows", "down_rows"):
            getattr(new, name).copy_(getattr(layer, name).index_select(0, rows))
        if layer.router_weight is not None:
            new.router_weight.copy_(layer.router_weight)
            new.router_bias.copy_(layer.router_bias)
    new.routing_gradient, new.routing_temperature = layer.routing_gradient, layer.routing_temperature
    new.train(layer.training)
    return new


@torch.no_grad()
def prune_dead_paths(model, windows: torch.Tensor, *, min_tokens: int = 1, progress: bool = True):
    """Return (pruned copy of `model`, PruneReport): every tree layer keeps the leaves that at least
    `min_tokens` of the tokens in `windows` (sequences, length) reached."""
    _check_min_tokens(min_tokens)
    return prune_from_stats(model, collect_tree_stats(model, windows, progress=progress), min_tokens=min_tokens)


def prune_from_stats(model, stats: list[LayerTreeStats], *, min_tokens: int = 1):
    """`prune_dead_paths` from already collected `tree_stats` (one pass serves several thresholds)."""
    _check_min_tokens(min_tokens)
    pruned = copy.deepcopy(model)
    layers = dict(tree_layers(pruned))
    if len(layers) != pruned.config.num_hidden_layers:
        raise ValueError("pruning needs a model whose every MLP is a tree")
    if sorted(layer_stats.layer for layer_stats in stats) != sorted(layers):
        raise ValueError("the tree stats do not cover every tree layer of the model")
    per_layer, reports = [], []
    for layer_stats in stats:
        old = layers[layer_stats.layer]
        live = live_leaves_from_counts(layer_stats.leaf_counts, min_tokens)
        new = pruned_layer(old, live)
        pruned.model.layers[layer_stats.layer].mlp = new
        per_layer.append([list(leaves) for leaves in live])
        reports.append(LayerPruneReport(layer_stats.layer, old.spec.stored_leaves, new.spec.stored_leaves,
                                        old.spec.stored_units, new.spec.stored_units))
    pruned.config.sparse_mlp = {**pruned.config.sparse_mlp, LAYER_LIVE_LEAVES: per_layer}
    return pruned, PruneReport(tokens=stats[0].tokens, min_tokens=min_tokens, layers=reports)


def _check_min_tokens(min_tokens: int) -> None:
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
