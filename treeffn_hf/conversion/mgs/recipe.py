"""The MGS recipe of `treeffn distill`: train linear gates on dense-activation labels (the
quantized predictors need none), give every layer a threshold calibrated to its density (unless
`selection='top_k'`), the densities averaging `density` or `weight_fraction` of the MLP weight
bytes, shared out `uniform`ly or `greedy` on a calibration loss (conversion/budgets.py); then
refit each down_proj by least squares under the final selection (conversion/compensation.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..budgets import calibrate_mgs
from ..compensation import refit_mgs_layers
from ..fit_context import FitContext
from ..gate_training import train_gates


@dataclass(frozen=True)
class MGSRecipe:
    gate_steps: int = 300
    selection: Optional[str] = None
    density: Optional[float] = None
    weight_fraction: Optional[float] = None
    allocation: Optional[str] = None
    refit_down: bool = True

    def problem(self) -> Optional[str]:
        """Why these options do not go together, or None."""
        if self.allocation not in (None, "uniform", "greedy"):
            return f"--allocation must be uniform or greedy, got {self.allocation!r}"
        if self.selection == "top_k" and (self.density is not None or self.weight_fraction is not None):
            return "--density and --weight-fraction set calibrated thresholds: not with --selection top_k"
        return None


def run_mgs_recipe(sparse, fit: FitContext, recipe: MGSRecipe) -> tuple[object, dict]:
    """(the recovered model, the summary's method-specific part)."""
    reports = train_gates(sparse, fit.captured.inputs, steps=recipe.gate_steps, work_dir=fit.work,
                          progress=fit.progress)
    budget, refits = None, []
    if recipe.selection != "top_k":  # thresholds are the best selection we know
        budget = calibrate_mgs(sparse, fit.captured.inputs, density=recipe.density,
                               weight_fraction=recipe.weight_fraction, allocation=recipe.allocation or "uniform",
                               loss_ids=fit.loss_ids, progress=fit.progress)
    if recipe.refit_down:  # after the selection is final: the refit is fitted under it
        refits = refit_mgs_layers(sparse, fit.dense, fit.ids, progress=fit.progress)
    return sparse, {"layers": [asdict(r) for r in reports], "budget": budget,
                    "down_proj_refit": [asdict(r) for r in refits]}
