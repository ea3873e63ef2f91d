"""Refit each micro-gated MLP's `down_proj` so the neurons it computes make up for the ones it skips.

With the selection fixed, the layer's output is linear in `down_proj`: y = W (h * mask). The
weight that best reproduces the dense output on calibration tokens is a ridge regression,
solved in closed form, W^T = (H^T H + lam I)^-1 (H^T Y + lam W0^T), shrunk towards the dense
weight W0 (lam = damping x the mean of diag(H^T H), as GPTQ damps its Hessian). The damping is
chosen on held-out tokens among a few values, and the dense weight is kept when no value
beats it, so the refit never makes a layer worse on held-out data. `gate_proj`, `up_proj` and
the predictor are untouched, so the selection and the byte count stay exactly as calibrated.

Inputs and targets (`refit_mgs_layers`):
- `inputs="sparse"` (the default): layer i is fitted on the MLP inputs that the model with its
  already-refitted layers 0..i-1 produces (as GPTQ quantises on the inputs of the quantised
  predecessors), against `target="dense_mlp"` (the default), the dense MLP on those same inputs,
  or `target="dense_output"`, the dense model's MLP output at layer i (the layer then also
  tries to absorb the error that reached it);
- `inputs="dense"`: each layer is fitted on the dense model's MLP inputs, against the dense
  MLP's outputs on them; layers are independent, and the refit takes half the time.
`benchmarks/studies/refit_study.py` measures the three (docs/performance.md): sequential with the dense-MLP target is
as good at 25% density and better at 10%; the dense-output target is worse than no refit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling.mgs_reference import mgs_hidden
from ..modeling.mgs_selection import selection_mask
from .fitting import batched, holdout_split
from .replay import LayerReplay

DAMPINGS = (1e-2, 1e-1, 1.0, 10.0)


@dataclass
class DownRefitReport:
    layer: int
    mse_before: float  # held-out MSE against the dense output, dense down_proj
    mse_after: float
    damping: Optional[float]  # the chosen relative damping; None: the dense weight was kept


@torch.no_grad()
def selected_hidden(mlp, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """act(g) * u of the neurons `mlp` selects for each row of `x`, zero elsewhere, (N, H) float32."""
    parts = []
    for start in range(0, x.shape[0], batch):
        rows = x[start : start + batch]
        mask = selection_mask(mlp.micro_gate(rows), mlp.spec, mlp.gate_threshold)
        parts.append((mgs_hidden(mlp, rows) * mask).float())
    return torch.cat(parts)


@dataclass
class DownFit:
    rows: Optional[torch.Tensor]  # (H, hidden) refitted rows of down_proj^T; None: the start was best
    mse_before: float  # held-out MSE of the starting rows
    mse_after: float
    damping: Optional[float]


@torch.no_grad()
def ridge_down_rows(hidden: torch.Tensor, targets: torch.Tensor, start: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, holdout: float = 0.1,
                    dampings: Sequence[float] = DAMPINGS, seed: int = 0) -> DownFit:
    """The down projection's rows (H, hidden) that best map `hidden` (N, H) onto `targets` (N,
    hidden): the ridge solve of the module doc, shrunk towards `start`, its damping chosen on a
    held-out split; `rows` is None when no damping beats `start` there."""
    h = hidden.double()
    y = targets.to(device=h.device, dtype=torch.float64)
    if bias is not None:
        y = y - bias.double()
    eval_index, train_index = holdout_split(h.shape[0], holdout, torch.Generator().manual_seed(seed))
    h_train, h_eval, y_eval = h[train_index], h[eval_index], y[eval_index]
    gram = h_train.T @ h_train
    cross = h_train.T @ y[train_index]
    initial = start.detach().double()

    def held_out_mse(rows: torch.Tensor) -> float:
        return float(F.mse_loss(h_eval @ rows, y_eval))

    before = best = held_out_mse(initial)
    chosen, best_rows = None, None
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for damping in dampings:
        lam = damping * scale
        candidate = torch.linalg.solve(gram + lam * eye, cross + lam * initial)
        mse = held_out_mse(candidate)
        if mse < best:
            best, chosen, best_rows = mse, damping, candidate
    rows = None if best_rows is None else best_rows.to(start.dtype)
    return DownFit(rows=rows, mse_before=before, mse_after=best, damping=chosen)


@torch.no_grad()
def refit_down_proj(mlp, inputs: torch.Tensor, targets: torch.Tensor, *, holdout: float = 0.1,
                    dampings: Sequence[float] = DAMPINGS, seed: int = 0, layer_index: int = 0) -> DownRefitReport:
    """Refit `mlp.down_proj.weight` in place on (inputs, targets) rows; see the module doc."""
    weight = mlp.down_proj.weight
    x = inputs.to(device=weight.device, dtype=weight.dtype)
    bias = mlp.down_proj.bias
    fit = ridge_down_rows(selected_hidden(mlp, x), targets, weight.T, bias=None if bias is None else bias.detach(),
                          holdout=holdout, dampings=dampings, seed=seed)
    if fit.rows is not None:
        weight.copy_(fit.rows.T)
        if mlp.spec.predictor == "nested":  # back onto the layer's stored grids
            mlp.snap_to_predictor_grid()
    return DownRefitReport(layer=layer_index, mse_before=fit.mse_before, mse_after=fit.mse_after, damping=fit.damping)


INPUTS = ("dense", "sparse")
TARGETS = ("dense_mlp", "dense_output")


@torch.no_grad()
def refit_mgs_layers(sparse_model: torch.nn.Module, dense_model: torch.nn.Module, windows: torch.Tensor, *,
                     inputs: str = "sparse", target: str = "dense_mlp", seed: int = 0, progress: bool = True,
                     **options) -> list[DownRefitReport]:
    """`refit_down_proj` on every micro-gated MLP of `sparse_model`, calibration `windows`
    (sequences, tokens) walked through both models layer by layer; see the module doc."""
    if inputs not in INPUTS or target not in TARGETS:
        raise ValueError(f"inputs must be one of {INPUTS} and target one of {TARGETS}, got {inputs!r}, {target!r}")
    dense_replay = LayerReplay(dense_model.eval(), windows)
    sparse_replay = LayerReplay(sparse_model.eval(), windows) if inputs == "sparse" else None
    dense_mlps = [getattr(layer, dense_replay.mlp_attr) for layer in dense_replay.layers]
    sparse_mlps = dict(sparse_model.sparse_mlps())
    reports = []
    for index in tqdm(range(len(dense_mlps)), desc="refitting down_proj", disable=not progress):
        dense_inputs, dense_outputs = dense_replay.run_layer()
        mlp = sparse_mlps.get(index)
        if mlp is not None and mlp.sparse_method == "mgs" and not mlp.computes_everything:
            x, y = dense_inputs, dense_outputs
            if sparse_replay is not None:
                x = sparse_replay.run_layer(advance=False)[0]
                if target == "dense_mlp":
                    dense_mlp = dense_mlps[index]
                    y = batched(dense_mlp, x.to(next(dense_mlp.parameters()).dtype)).float()
                else:
                    y = dense_outputs
            reports.append(refit_down_proj(mlp, x, y, seed=seed + index, layer_index=index, **options))
        if sparse_replay is not None:
            sparse_replay.run_layer()
    for mlp in sparse_mlps.values():
        if mlp.sparse_method == "mgs":
            mlp.reset_density()
    return reports

