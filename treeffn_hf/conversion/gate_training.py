"""Train each micro gate to predict which neurons its dense MLP actually uses.

Labels come from the layer's own dense weights on calibration inputs (Deja Vu style): neuron i is
active for a token when |silu(g_i) * u_i| is among the token's top-k, k set by the target
density. SwiGLU has no exact zeros, so "active" is this magnitude criterion. The gate is fitted
with a weighted BCE (positives are rare, so they are up-weighted by (1 - density) / density), and
the state with the best held-out recall at the target density is kept: recall, not loss, is
what decides how much of the dense output survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling.mgs_predictors import neuron_scores
from ..modeling.mgs_selection import top_k_mask
from .fitting import fit_keeping_best, holdout_split


@dataclass
class GateReport:
    layer: int
    recall_before: float
    recall_after: float
    steps: int


def activation_magnitude(layer, x: torch.Tensor) -> torch.Tensor:
    """|act(gate_proj x) * up_proj x| per neuron: how much each neuron contributes, (N, H)."""
    return neuron_scores(layer.gate_proj(x), layer.up_proj(x), layer.act_fn)


@torch.no_grad()
def gate_recall(layer, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the truly active neurons (labels) that the gate's top-k also picks."""
    k = layer.spec.top_k(layer.intermediate_size)
    picked = top_k_mask(layer.micro_gate(x), k)
    return float((picked & labels).sum() / labels.sum())


def train_gate(
    layer,
    inputs: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 256,
    holdout: float = 0.1,
    eval_every: int = 25,
    seed: int = 0,
    layer_index: int = 0,
) -> GateReport:
    """Fit `layer.micro_gate` (a MicroGatedMLP's gate) on `inputs` (tokens, hidden); in place."""
    generator = torch.Generator().manual_seed(seed)
    param = next(layer.micro_gate.parameters())
    x = inputs.to(device=param.device, dtype=param.dtype)
    eval_index, train_index = holdout_split(x.shape[0], holdout, generator)
    x_eval, x_train = x[eval_index], x[train_index]
    k = layer.spec.top_k(layer.intermediate_size)
    with torch.no_grad():
        y_eval = top_k_mask(activation_magnitude(layer, x_eval), k)
        y_train = top_k_mask(activation_magnitude(layer, x_train), k)
    density = k / layer.intermediate_size
    pos_weight = torch.tensor((1.0 - density) / density, device=x.device, dtype=x.dtype)

    def loss_on(positions: torch.Tensor) -> torch.Tensor:
        logits = layer.micro_gate(x_train[positions])
        return F.binary_cross_entropy_with_logits(logits, y_train[positions].to(logits.dtype), pos_weight=pos_weight)

    before, best = fit_keeping_best(
        layer.micro_gate, loss_on, lambda: gate_recall(layer, x_eval, y_eval), n_train=x_train.shape[0],
        steps=steps, lr=lr, batch_size=batch_size, eval_every=eval_every, generator=generator,
        higher_is_better=True, what=f"layer {layer_index}: gate",
    )
    return GateReport(layer=layer_index, recall_before=before, recall_after=best, steps=steps)


def train_gates(
    model, calibration_inputs: list[torch.Tensor], *, work_dir=None, progress: bool = True, **options
) -> list[GateReport]:
    """Train the linear gate of every MGS layer of `model` on that layer's captured inputs
    (resumable per layer with `work_dir`). The quantized predictor has nothing to train: []."""
    if model.config.sparse_mlp.get("predictor", "linear") != "linear":
        return []
    from .distillation import for_each_sparse_layer

    def run_one(index: int, mlp) -> GateReport:
        flags = {name: p.requires_grad for name, p in mlp.named_parameters()}
        for name, p in mlp.named_parameters():
            p.requires_grad_(name.startswith("micro_gate."))  # dense weights only make the labels
        try:
            return train_gate(mlp, calibration_inputs[index], layer_index=index, **options)
        finally:
            for name, p in mlp.named_parameters():
                p.requires_grad_(flags[name])

    return for_each_sparse_layer(model, run_one, GateReport, work_dir=work_dir, only="mgs",
                                 desc="training gates", progress=progress)
