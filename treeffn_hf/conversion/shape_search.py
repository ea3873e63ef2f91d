"""Per-layer forest shapes chosen from data.

At a budget of active neurons per token, forests differ in how many trees route, how deep they
are, how wide their nodes are, and so (every dense neuron placed once) how many neurons stay
always on. Routing mass alone says little about which shape keeps quality: what counts is the
layer's output error once the weights are refitted to the structure. So every candidate is built
from the dense MLP, given its routing fit and a short layer-wise distillation, and scored by its
held-out error relative to the dense output's power.

Scoring every candidate on every layer is the most faithful search and costs
`candidates x layers` short fits. With `screen_layers`, candidates are first scored on that many
evenly spaced layers, and only the `finalists` best (by mean relative error) compete on every
layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..architectures import architecture_for
from ..modeling.layer_spec import InvalidSpecError, TreeSpec, tree_shape_at
from ..modeling.tree_layer import TreeFFN
from .distillation import DISTILL_LR, batched, distill_layer
from .routing_fit import DEFAULT_ROUTER_FIT, fit_routing
from .surgery import sparse_mlp_state

TREE_COUNTS = (1, 2, 4, 8)
DEPTHS = (2, 3, 4, 5, 6)
SEARCH_STEPS = 60
MIN_BUDGET_USE = 0.85


@dataclass
class ShapeTrial:
    shape: dict
    relative_error: float  # held-out MSE after the short fit / mean square of the dense output
    captured_mass: float


@dataclass
class LayerShapeChoice:
    layer: int
    shape: dict
    trials: list[ShapeTrial] = field(default_factory=list)


@dataclass
class ShapeSearchReport:
    active_fraction: float
    active_units: int
    candidates: list[dict]
    finalists: list[dict]
    layers: list[LayerShapeChoice]
    seconds: float

    def specs(self) -> list[TreeSpec]:
        return [TreeSpec(**choice.shape) for choice in self.layers]


def active_budget(intermediate_size: int, active_fraction: float) -> int:
    """Neurons a token may compute; the epsilon keeps 0.3 * 1000 from flooring to 299."""
    return int(active_fraction * intermediate_size + 1e-9)


def shape_candidates(
    hidden_size: int,
    intermediate_size: int,
    active_fraction: float,
    *,
    tree_counts: Sequence[int] = TREE_COUNTS,
    depths: Sequence[int] = DEPTHS,
    node_width: int = 1,
    routing: str = "self",
    min_use: float = MIN_BUDGET_USE,
) -> list[TreeSpec]:
    """Every forest of these counts and depths within `active_fraction` of the neurons per token
    (as close to it as the widths allow; see `tree_shape_at`) that uses at least `min_use` of that
    budget: integer leaf widths move some shapes far under it, where they lose for want of neurons."""
    if not 0.0 < active_fraction < 1.0:
        raise InvalidSpecError(f"active fraction must be in (0, 1), got {active_fraction}")
    budget = active_budget(intermediate_size, active_fraction)
    shapes = []
    for trees in tree_counts:
        for depth in depths:
            spec = tree_shape_at(hidden_size, intermediate_size, budget, num_trees=trees, depth=depth,
                                 node_width=node_width, routing=routing)
            if spec is not None and spec.active_units >= min_use * budget and spec not in shapes:
                shapes.append(spec)
    if not shapes:
        raise InvalidSpecError(f"no forest of {list(tree_counts)} trees and depths {list(depths)} fits "
                               f"{budget} active neurons of {intermediate_size}")
    return shapes


def fit_candidate(
    spec: TreeSpec, dense_mlp: torch.nn.Module, inputs: torch.Tensor, *, gate: str, up: str, down: str, act_fn,
    steps: int, lr: float, seed: int, layer_index: int, router_fit: str,
) -> tuple[TreeFFN, ShapeTrial]:
    """A tree layer of `spec` built from `dense_mlp`, routing-fitted and briefly distilled."""
    weight = getattr(dense_mlp, gate).weight
    layer = TreeFFN(weight.shape[1], weight.shape[0], spec, act_fn).to(weight.dtype)
    layer.load_state_dict(sparse_mlp_state(layer.spec, getattr(dense_mlp, gate), getattr(dense_mlp, up),
                                           getattr(dense_mlp, down)))
    routing = fit_routing(layer, inputs, router_fit=router_fit, seed=seed, layer_index=layer_index)
    layer.requires_grad_(True)
    report = distill_layer(layer, dense_mlp, inputs, steps=steps, lr=lr, seed=seed, layer_index=layer_index,
                           eval_every=max(1, steps // 2))
    power = float(batched(dense_mlp, inputs.to(weight.dtype)).pow(2).mean())
    return layer, ShapeTrial(shape=layer.spec.shape(), relative_error=report.mse_after / max(power, 1e-30),
                             captured_mass=routing.captured_mass_after)


def search_tree_shapes(
    dense_model: torch.nn.Module,
    calibration_inputs: list[torch.Tensor],
    active_fraction: float,
    *,
    candidates: Optional[Sequence[TreeSpec]] = None,
    screen_layers: Optional[int] = 4,
    finalists: int = 3,
    steps: int = SEARCH_STEPS,
    lr: float = DISTILL_LR,
    router_fit: str = DEFAULT_ROUTER_FIT,
    seed: int = 0,
    progress: bool = True,
) -> ShapeSearchReport:
    """Choose each decoder layer's forest shape at `active_fraction` of its neurons per token: the
    candidate with the lowest held-out output error after a routing fit and `steps` of layer-wise
    distillation on that layer's `calibration_inputs`. `screen_layers=None` scores every candidate
    on every layer."""
    start = time.perf_counter()
    arch = architecture_for(dense_model.config)
    config = dense_model.config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    if candidates is None:
        candidates = shape_candidates(hidden, intermediate, active_fraction)
    budget = active_budget(intermediate, active_fraction)
    candidates = [c.resolve(hidden, intermediate) for c in candidates]
    over = [c for c in candidates if c.active_units > budget]
    if over:
        raise InvalidSpecError(f"candidate {over[0].shape()} computes {over[0].active_units} neurons a token, "
                               f"over the budget of {budget}")
    layers = arch.decoder_layers(dense_model)
    mlps = [getattr(layer, arch.mlp_attr) for layer in layers]
    act_fn = mlps[0].act_fn

    def trial(spec: TreeSpec, index: int) -> ShapeTrial:
        _, result = fit_candidate(spec, mlps[index], calibration_inputs[index], gate=arch.gate_proj,
                                  up=arch.up_proj, down=arch.down_proj, act_fn=act_fn, steps=steps, lr=lr,
                                  seed=seed + index, layer_index=index, router_fit=router_fit)
        return result

    count = len(layers)
    trials: dict[int, dict[TreeSpec, ShapeTrial]] = {i: {} for i in range(count)}
    finalist_specs = list(candidates)
    if screen_layers is not None and len(candidates) > finalists:
        screened = sorted({round(i * (count - 1) / max(1, screen_layers - 1)) for i in range(screen_layers)})
        bar = tqdm(total=len(screened) * len(candidates), desc="screening tree shapes", disable=not progress)
        for index in screened:
            for spec in candidates:
                trials[index][spec] = trial(spec, index)
                bar.update()
        bar.close()
        mean_error = {spec: sum(trials[i][spec].relative_error for i in screened) / len(screened)
                      for spec in candidates}
        finalist_specs = sorted(candidates, key=mean_error.__getitem__)[:finalists]
    todo = [(i, s) for i in range(count) for s in finalist_specs if s not in trials[i]]
    for index, spec in tqdm(todo, desc="fitting tree shapes per layer", disable=not progress):
        trials[index][spec] = trial(spec, index)
    choices = []
    for index in range(count):
        best = min(finalist_specs, key=lambda s: trials[index][s].relative_error)
        choices.append(LayerShapeChoice(layer=index, shape=best.shape(), trials=list(trials[index].values())))
    return ShapeSearchReport(active_fraction=active_fraction, active_units=budget,
                             candidates=[c.shape() for c in candidates],
                             finalists=[c.shape() for c in finalist_specs], layers=choices,
                             seconds=time.perf_counter() - start)
