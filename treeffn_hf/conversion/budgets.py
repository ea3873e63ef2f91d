"""Per-layer budgets of the micro-gated MLP, set on calibration data without training.

- **Thresholds**: each layer keeps the neurons whose predictor score exceeds a threshold, the
  quantile of its calibration scores that selects the layer's density on average. A token then
  computes as many neurons as it needs (thresholds beat a fixed k: see DESIGN.md).
- **Allocation**: a mean density (or a mean fraction of MLP weight bytes) is shared out across
  layers greedily, in the manner of TEAL, on a calibration loss: each layer's sensitivity is the
  KL divergence from the dense model's next-token distribution when that layer alone runs at a
  grid of densities; from dense, the layer whose next step down adds the least KL gives it up,
  until the budget is met exactly. (The layer's own output error is a poor guide: layers whose
  relative error stays small at low density still hurt the model.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling.configuration_treeffn import LAYER_DENSITIES

SCORE_SAMPLE = 1 << 21  # calibration scores per layer that the thresholds are read from
SENSITIVITY_DENSITIES = (0.8, 0.6, 0.45, 0.3, 0.2, 0.1)  # where each layer's KL is measured
GRID_STEP = 1 / 128  # density steps the greedy allocation moves by
RATIO_SEARCH_STEPS = 6  # bisections of the mean density under a perplexity budget: within 0.7/64 of it


@torch.no_grad()
def ranked_scores(layer, inputs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A sorted sample of `layer`'s predictor scores on `inputs` (tokens, hidden)."""
    weight = layer.gate_proj.weight
    scores = layer.micro_gate(inputs.to(device=weight.device, dtype=weight.dtype)).float().reshape(-1)
    if scores.numel() > SCORE_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        scores = scores[torch.randint(0, scores.numel(), (SCORE_SAMPLE,), generator=generator).to(scores.device)]
    return scores.sort().values


def threshold_for(ranked: torch.Tensor, density: float) -> float:
    """The threshold above which `density` of the ranked scores lie (-inf keeps every neuron)."""
    if density >= 1.0:
        return float("-inf")
    position = min(ranked.numel() - 1, max(0, round((1.0 - density) * ranked.numel()) - 1))
    return float(ranked[position])


def use_threshold(layer, threshold: float, density: float) -> None:
    layer.spec = dataclasses.replace(layer.spec, density=density, selection="threshold")
    layer.gate_threshold.fill_(threshold)


def use_all_neurons(layer) -> None:
    """Make `layer` compute every neuron, the plain dense MLP (no predictor run)."""
    layer.spec = dataclasses.replace(layer.spec, density=1.0, selection="top_k")


def calibrate_threshold(layer, inputs: torch.Tensor, density: Optional[float] = None, seed: int = 0) -> float:
    """Switch `layer` (a MicroGatedMLP) to threshold selection at `density` (default: its spec's),
    with the threshold that selects that fraction of neurons on `inputs` on average."""
    density = layer.spec.density if density is None else density
    threshold = threshold_for(ranked_scores(layer, inputs, seed), density)
    use_threshold(layer, threshold, density)
    return threshold


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)


def kl_from_dense(dense_log_probs: torch.Tensor, model, ids: torch.Tensor) -> float:
    """Mean KL(dense || model) per token on `ids`, from the dense model's log-probabilities there."""
    return float((dense_log_probs.exp() * (dense_log_probs - _log_probs(model, ids))).sum(-1).mean())


@torch.no_grad()
def layer_sensitivities(model, layers: list, ranked: list[torch.Tensor], ids: torch.Tensor,
                        densities: Sequence[float] = SENSITIVITY_DENSITIES, progress: bool = True) -> torch.Tensor:
    """(layers, densities): mean KL(dense || model) per token on `ids` when only that layer is sparse
    at that density (every other layer computes all its neurons)."""
    for _, mlp in layers:
        use_all_neurons(mlp)
    ids = ids.to(next(model.parameters()).device)
    dense = _log_probs(model, ids)
    table = torch.zeros(len(layers), len(densities))
    cases = [(row, col) for row in range(len(layers)) for col in range(len(densities))]
    for row, col in tqdm(cases, desc="allocation: layer sensitivities", disable=not progress):
        mlp = layers[row][1]
        use_threshold(mlp, threshold_for(ranked[row], densities[col]), densities[col])
        table[row, col] = kl_from_dense(dense, model, ids)
        use_all_neurons(mlp)
    return table


def allocate_greedy(costs: Sequence[Sequence[float]], densities: Sequence[float], target: float,
                    step: float = GRID_STEP) -> list[float]:
    """Per-layer densities with mean exactly `target`, from measured costs (a row per layer, at
    `densities`, descending; cost 0 at density 1 is implied), linearly interpolated: from density
    1, repeatedly lower by `step` the layer whose step adds the least cost; the last step is cut
    short so that the mean lands on the target."""
    points = [1.0, *densities]
    lowest = points[-1]
    if not lowest <= target <= 1.0:
        raise ValueError(f"target density {target} is outside the measured range [{lowest}, 1]")

    def cost(layer: int, density: float) -> float:
        values = [0.0, *costs[layer]]
        for (d0, c0), (d1, c1) in zip(zip(points, values), zip(points[1:], values[1:])):
            if d1 <= density <= d0:
                return c0 + (c1 - c0) * (d0 - density) / (d0 - d1)
        raise ValueError(f"density {density} outside [{lowest}, 1]")

    current = [1.0] * len(costs)
    excess = (1.0 - target) * len(costs)
    while excess > 1e-12:
        options = [(cost(i, max(lowest, d - step)) - cost(i, d), i) for i, d in enumerate(current) if d > lowest]
        _, layer = min(options)
        move = min(step, excess, current[layer] - lowest)
        current[layer] -= move
        excess -= move
    return current


@torch.no_grad()
def calibrate_mgs(
    model,
    calibration_inputs: list[torch.Tensor],
    *,
    density: Optional[float] = None,
    weight_fraction: Optional[float] = None,
    allocation: str = "uniform",
    loss_ids: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> dict:
    """Give every MGS layer of `model` a calibrated threshold, at per-layer densities whose mean is
    `density` (default: the spec's), or whose MLP weight bytes read (predictor included) average
    `weight_fraction`. `allocation` is 'uniform' (the default: on SmolLM2 it did as well as
    greedy) or 'greedy' (TEAL-style, on the KL of `loss_ids`, a few token windows of calibration
    text). The config records the densities and the threshold
    selection. Returns what was set."""
    layers = [(index, mlp) for index, mlp in model.sparse_mlps() if mlp.sparse_method == "mgs"]
    if not layers:
        raise ValueError("the model has no MGS layers to calibrate")
    if allocation not in ("greedy", "uniform"):
        raise ValueError(f"allocation must be 'greedy' or 'uniform', got {allocation!r}")
    if allocation == "greedy" and loss_ids is None:
        raise ValueError("greedy allocation measures a calibration loss: pass loss_ids (token windows)")
    if density is not None and weight_fraction is not None:
        raise ValueError("give a target density or a target weight fraction, not both")
    if weight_fraction is not None:
        density = density_for_weight_fraction(layers[0][1], weight_fraction)
    density = float(model.config.sparse_mlp["density"] if density is None else density)  # the mean, not a layer's
    ranked = [ranked_scores(mlp, calibration_inputs[index], seed=index) for index, mlp in layers]
    sensitivities = None
    if allocation == "uniform":
        densities = [density] * len(layers)
    else:
        sensitivities = layer_sensitivities(model, layers, ranked, loss_ids, progress=progress)
        densities = allocate_greedy(sensitivities.tolist(), SENSITIVITY_DENSITIES, density)
    thresholds = _use_densities(model, layers, ranked, densities)
    return {"allocation": allocation, "density": density, "layer_densities": densities, "thresholds": thresholds,
            "sensitivities": None if sensitivities is None else sensitivities.tolist()}


def _use_densities(model, layers: list, ranked: list[torch.Tensor], densities: Sequence[float]) -> list[float]:
    """Give each layer the threshold of its density; record them in the config. The thresholds."""
    thresholds = []
    for (_, mlp), layer_ranked, layer_density in zip(layers, ranked, densities):
        thresholds.append(threshold_for(layer_ranked, layer_density))
        use_threshold(mlp, thresholds[-1], layer_density)
    model.config.sparse_mlp = {**model.config.sparse_mlp, "selection": "threshold",
                               "density": float(sum(densities) / len(densities)), LAYER_DENSITIES: list(densities)}
    return thresholds


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor, batch: int = 2) -> float:
    """Mean next-token negative log-likelihood of `model` on the windows `ids` (equal lengths),
    `batch` windows a forward (the logits of a window take vocabulary x window floats)."""
    total = 0.0
    for chunk in ids.split(batch):
        logits = model(chunk, use_cache=False).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def calibrate_mgs_to_ratio(model, calibration_inputs: list[torch.Tensor], *, dense, max_ratio: float,
                           ratio_ids: torch.Tensor, allocation: str = "greedy", loss_ids: Optional[torch.Tensor] = None,
                           progress: bool = True, searches: int = RATIO_SEARCH_STEPS) -> dict:
    """Give every MGS layer a calibrated threshold at the fewest neurons (so the fewest bytes: every
    layer pays the same per neuron) that keep the model's perplexity on `ratio_ids` within
    `max_ratio` of `dense`'s: the greedy allocation's path (KL sensitivities on `loss_ids`; a
    forward per layer and density) or one density for every layer (`allocation='uniform'`, no
    sensitivities) is searched by bisection on its mean density, each step measured with every layer
    sparse at once. Quantisation alone counts against the budget; where it spends all of it, every
    neuron stays."""
    layers = [(index, mlp) for index, mlp in model.sparse_mlps() if mlp.sparse_method == "mgs"]
    if not layers:
        raise ValueError("the model has no MGS layers to calibrate")
    if allocation not in ("greedy", "uniform") or (allocation == "greedy" and loss_ids is None):
        raise ValueError(f"allocation must be 'uniform' or 'greedy' (with loss_ids), got {allocation!r}")
    ranked = [ranked_scores(mlp, calibration_inputs[index], seed=index) for index, mlp in layers]
    sensitivities = None
    if allocation == "greedy":
        sensitivities = layer_sensitivities(model, layers, ranked, loss_ids, progress=progress)
    dense_nll = mean_nll(dense, ratio_ids)

    def ratio_at(target: float) -> tuple[float, list[float]]:
        densities = ([target] * len(layers) if sensitivities is None
                     else allocate_greedy(sensitivities.tolist(), SENSITIVITY_DENSITIES, target))
        _use_densities(model, layers, ranked, densities)
        return math.exp(mean_nll(model, ratio_ids) - dense_nll), densities

    low, high = SENSITIVITY_DENSITIES[-1], 1.0  # the sparsest measured; every neuron
    ratio, densities = ratio_at(low)
    if ratio > max_ratio:
        best = ratio_at(high)
        for _ in tqdm(range(searches), desc=f"allocation: density within ratio {max_ratio}", disable=not progress):
            middle = (low + high) / 2
            ratio, densities = ratio_at(middle)
            if ratio <= max_ratio:
                best, high = (ratio, densities), middle
            else:
                low = middle
        ratio, densities = best
    thresholds = _use_densities(model, layers, ranked, densities)
    return {"allocation": allocation, "max_ratio": max_ratio, "calibration_ratio": ratio,
            "density": float(sum(densities) / len(densities)), "layer_densities": densities, "thresholds": thresholds,
            "sensitivities": None if sensitivities is None else sensitivities.tolist()}


def density_for_weight_fraction(layer, weight_fraction: float) -> float:
    """The density at which `layer`, once on calibrated thresholds (the path and bytes that
    selection runs), reads `weight_fraction` of the dense MLP's bf16 bytes: every layer reads a
    fixed part, then the same bytes per neuron."""
    calibrated = copy.copy(layer)  # shares the tensors; only its spec differs
    calibrated.spec = dataclasses.replace(layer.spec, selection="threshold")
    fixed, per_neuron = predictor_fraction(calibrated), neuron_fraction(calibrated)
    density = (weight_fraction - fixed) / per_neuron
    if not 0.0 < density <= 1.0:
        raise ValueError(f"weight fraction {weight_fraction} leaves density {density:.3f} once the {fixed:.3f} "
                         "every token reads whatever it selects (the predictor; all of a bf16 down_proj) is read")
    return density


def predictor_fraction(layer) -> float:
    """The bytes a token reads whatever it selects (the predictor; with the C kernel and a bf16
    down_proj, all of it), as a fraction of the dense MLP's bf16 bytes."""
    return sum(layer.bytes_read(1, 0).values()) / layer.cost().dense_weight_bytes


def neuron_fraction(layer) -> float:
    """The bytes of selecting every neuron beyond `predictor_fraction`, as a fraction of the dense
    MLP's (the C kernel: the low nibbles of gate and up, and the int8 down rows)."""
    every = sum(layer.bytes_read(1, layer.intermediate_size).values())
    return every / layer.cost().dense_weight_bytes - predictor_fraction(layer)
