"""The MGS recipe of `treeffn distill`: train linear gates on dense-activation labels (the
quantized predictors need none), give every layer a threshold calibrated to its density (unless
`selection='top_k'`): by default the fewest neurons that keep the calibration perplexity within
`max_ratio` of the dense model's (greedy on a calibration loss, conversion/budgets.py), or
densities averaging `density` or `weight_fraction` of the MLP weight bytes, shared out
`uniform`ly or `greedy`; then refit each down_proj by least squares under the final selection
(conversion/compensation.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..budgets import calibrate_mgs, calibrate_mgs_to_ratio
from ..compensation import refit_mgs_layers
from ..fit_context import FitContext
from ..gate_training import train_gates

DEFAULT_MAX_RATIO = 1.01  # calibration perplexity over the dense model's that the default recipe spends


@dataclass(frozen=True)
class MGSRecipe:
    gate_steps: int = 300
    selection: Optional[str] = None
    density: Optional[float] = None
    weight_fraction: Optional[float] = None
    allocation: Optional[str] = None
    refit_down: bool = True
    max_ratio: Optional[float] = None  # DEFAULT_MAX_RATIO unless a density or weight fraction is given

    @property
    def ratio_budget(self) -> Optional[float]:
        """The perplexity budget the thresholds are calibrated to, or None (a density budget)."""
        if self.selection == "top_k" or self.density is not None or self.weight_fraction is not None:
            return None
        return DEFAULT_MAX_RATIO if self.max_ratio is None else self.max_ratio

    def problem(self) -> Optional[str]:
        """Why these options do not go together, or None."""
        if self.allocation not in (None, "uniform", "greedy"):
            return f"--allocation must be uniform or greedy, got {self.allocation!r}"
        budgets = [name for name, value in (("--density", self.density), ("--weight-fraction", self.weight_fraction),
                                             ("--max-ratio", self.max_ratio)) if value is not None]
        if self.selection == "top_k" and budgets:
            return f"{budgets[0]} sets calibrated thresholds: not with --selection top_k"
        if len(budgets) > 1:
            return f"give one budget, not {' and '.join(budgets)}"
        if self.max_ratio is not None and self.max_ratio < 1.0:
            return f"--max-ratio is a perplexity ratio to the dense model, at least 1, got {self.max_ratio}"
        return None


def run_mgs_recipe(sparse, fit: FitContext, recipe: MGSRecipe) -> tuple[object, dict]:
    """(the recovered model, the summary's method-specific part)."""
    reports = train_gates(sparse, fit.captured.inputs, steps=recipe.gate_steps, work_dir=fit.work,
                          progress=fit.progress)
    budget, refits = None, []
    if recipe.ratio_budget is not None:  # thresholds are the best selection we know
        budget = calibrate_mgs_to_ratio(sparse, fit.captured.inputs, dense=fit.dense, max_ratio=recipe.ratio_budget,
                                        ratio_ids=fit.ratio_ids, allocation=recipe.allocation or "greedy",
                                        loss_ids=fit.loss_ids, progress=fit.progress)
    elif recipe.selection != "top_k":
        budget = calibrate_mgs(sparse, fit.captured.inputs, density=recipe.density,
                               weight_fraction=recipe.weight_fraction, allocation=recipe.allocation or "uniform",
                               loss_ids=fit.loss_ids, progress=fit.progress)
    if recipe.refit_down:  # after the selection is final: the refit is fitted under it
        refits = refit_mgs_layers(sparse, fit.dense, fit.ids, progress=fit.progress)
    return sparse, {"layers": [asdict(r) for r in reports], "budget": budget,
                    "down_proj_refit": [asdict(r) for r in refits]}
