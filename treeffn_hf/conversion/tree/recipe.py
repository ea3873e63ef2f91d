"""The tree recipe of `treeffn distill`: optionally reshape the trees first (with `active`, a
partition forest takes, in each layer, the forest shape that keeps its output best at that
fraction of its neurons per token, conversion/shape_search.py; a tree whose leaves select their
neurons takes per-layer leaf widths whose active neurons average that fraction, `uniform` or
`greedy` on a calibration loss, conversion/tree_allocation.py), then fit each layer's routing and
regress it on the dense outputs (conversion/distillation.py), with `sequential` on the inputs
the already distilled layers before it produce. Searches and allocations are kept in the work
directory, so a killed run resumes without redoing them."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from ...architectures import architecture_for
from ...modeling.layer_spec import TreeSpec
from ..distillation import DISTILL_LR, distill_layers
from ..fit_context import FitContext
from ..routing_fit import DEFAULT_ROUTER_FIT
from ..surgery import convert


@dataclass(frozen=True)
class TreeRecipe:
    distill_steps: int = 200
    lr: float = DISTILL_LR
    router_fit: str = DEFAULT_ROUTER_FIT
    sequential: bool = True
    active: Optional[float] = None
    allocation: Optional[str] = None

    def problem(self, selected_leaves: bool) -> Optional[str]:
        """Why these options do not go together for this tree, or None."""
        if self.allocation not in (None, "uniform", "greedy"):
            return f"--allocation must be uniform or greedy, got {self.allocation!r}"
        if self.allocation is not None and not (selected_leaves and self.active):
            return ("--allocation shares out MGS densities, or with --active the leaf widths of a tree whose "
                    "leaves select their neurons")
        return None


def run_tree_recipe(sparse, fit: FitContext, recipe: TreeRecipe) -> tuple[object, dict]:
    """(the recovered model, possibly re-converted to new shapes; the summary's tree part)."""
    selected = sparse.config.sparse_mlp.get("leaf_neurons") == "selected"
    budget = shapes = None
    if recipe.active is not None and selected:
        budget = allocated_widths(sparse, fit, recipe.active, recipe.allocation or "uniform")
        sparse = reconverted(sparse, fit.dense, [TreeSpec(**s) for s in budget["layer_specs"]])
    elif recipe.active is not None:
        shapes = searched_shapes(sparse, fit, recipe.active, recipe.router_fit)
        sparse = reconverted(sparse, fit.dense, [TreeSpec(**layer["shape"]) for layer in shapes["layers"]])
    sparse.requires_grad_(False)  # one MLP at a time trains
    for _, mlp in sparse.sparse_mlps():
        mlp.requires_grad_(True)
    reports = distill_layers(sparse, fit.dense, fit.captured.inputs, steps=recipe.distill_steps, lr=recipe.lr,
                             work_dir=fit.work, router_fit=recipe.router_fit,
                             sequential_ids=fit.ids if recipe.sequential else None, progress=fit.progress)
    sparse.requires_grad_(True)
    return sparse, {"layers": [asdict(r) for r in reports], "budget": budget, "shape_search": shapes,
                    "sequential": recipe.sequential}


def searched_shapes(sparse, fit: FitContext, active: float, router_fit: str) -> dict:
    """The per-layer forest shapes the search picks (the checkpoint's routing and node width kept)."""
    from ..shape_search import search_tree_shapes, shape_candidates

    def search() -> dict:
        config, base = fit.dense.config, sparse.config.sparse_spec
        candidates = shape_candidates(config.hidden_size, config.intermediate_size, active,
                                      node_width=base.node_width, routing=base.routing)
        return asdict(search_tree_shapes(fit.dense, fit.captured.inputs, active, candidates=candidates,
                                         router_fit=router_fit, progress=fit.progress))

    return kept(fit.work / "shapes.json", search)


def allocated_widths(sparse, fit: FitContext, active: float, allocation: str) -> dict:
    """Per-layer leaf widths of a selected-leaf tree averaging `active` (conversion/tree_allocation.py)."""
    from ..tree_allocation import allocate_tree_widths, allocation_fractions, with_active_fraction

    def allocate() -> dict:
        base, config = sparse.config.sparse_spec, fit.dense.config
        if allocation == "uniform":
            sensitivities, grid = None, allocation_fractions(active)
            specs = [with_active_fraction(base, active, config.intermediate_size)] * config.num_hidden_layers
        else:
            specs, sensitivities, grid = allocate_tree_widths(fit.dense, base, fit.captured.inputs, fit.loss_ids,
                                                              active, progress=fit.progress)
        return {"allocation": allocation, "active": active, "fractions": list(grid),
                "sensitivities": None if sensitivities is None else sensitivities.tolist(),
                "layer_specs": [s.resolve(config.hidden_size, config.intermediate_size).shape() for s in specs]}

    return kept(fit.work / "allocation.json", allocate)


def kept(path: Path, compute: Callable[[], dict]) -> dict:
    """`compute()`'s JSON result, or the one a killed run left at `path`."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, path)
    return result


class ShapeMismatch(ValueError):
    """The tree checkpoint and its dense model differ outside the MLPs."""


def reconverted(sparse, dense_model, specs: list[TreeSpec]):
    """`sparse` re-converted from the dense MLPs with one spec per layer, everything outside the MLPs kept."""
    reshaped = convert(dense_model, specs, progress=False)
    arch = architecture_for(dense_model.config)
    mlps = tuple(arch.mlp_key_prefix(i) for i in range(dense_model.config.num_hidden_layers))
    missing, unexpected = reshaped.load_state_dict(
        {k: v for k, v in sparse.state_dict().items() if not k.startswith(mlps)}, strict=False)
    if unexpected or any(not k.startswith(mlps) for k in missing):
        raise ShapeMismatch(f"the tree checkpoint and its dense model differ outside the MLPs: "
                            f"{(unexpected + [k for k in missing if not k.startswith(mlps)])[:3]}")
    return reshaped
