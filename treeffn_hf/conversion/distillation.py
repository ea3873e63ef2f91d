"""Layer-wise distillation: regress each sparse MLP's output on its dense MLP's output.

Layers are independent given the captured dense inputs, so they are trained one at a time with
bounded memory. With a `work_dir`, every finished layer is saved there (written to a temporary
file, then renamed), and a run that was killed resumes from the last finished layer with the
same result as an uninterrupted run: each layer's randomness depends only on `seed` and its index.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..architectures import architecture_for
from .fitting import batched, fit_keeping_best, holdout_split
from .leaf_selection import fit_selected_leaves
from .replay import LayerReplay
from .routing_fit import DEFAULT_ROUTER_FIT, fit_routing

# The learning rate of every measured tree figure (benchmarks/quality.py and the fine-tuning
# benchmarks distil at it); no run at another rate is measured.
DISTILL_LR = 1e-3


@dataclass
class LayerDistillReport:
    layer: int
    mse_before: float  # held-out MSE when the regression starts (after any routing fit)
    mse_after: float
    steps: int
    # Tree layers: fraction of dense activation mass on the tokens' paths, before and after the
    # routing fit (held-out tokens); None when routing was not fitted.
    captured_mass_before: Optional[float] = None
    captured_mass_after: Optional[float] = None


def _mse(sparse_mlp, x: torch.Tensor, target: torch.Tensor) -> float:
    return float(F.mse_loss(batched(sparse_mlp, x), target))


def distill_layer(
    sparse_mlp: torch.nn.Module,
    dense_mlp: torch.nn.Module,
    inputs: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = DISTILL_LR,
    batch_size: int = 256,
    cosine_weight: float = 0.0,
    holdout: float = 0.1,
    eval_every: int = 25,
    seed: int = 0,
    layer_index: int = 0,
) -> LayerDistillReport:
    """Train `sparse_mlp`'s trainable parameters in place so its outputs match `dense_mlp`'s."""
    generator = torch.Generator().manual_seed(seed)
    param = next(sparse_mlp.parameters())
    x = inputs.to(device=param.device, dtype=param.dtype)
    target = batched(dense_mlp, x)
    eval_index, train_index = holdout_split(x.shape[0], holdout, generator)
    x_eval, y_eval = x[eval_index], target[eval_index]

    def loss_on(positions: torch.Tensor) -> torch.Tensor:
        pick = train_index[positions]
        out = sparse_mlp(x[pick])
        loss = F.mse_loss(out, target[pick])
        if cosine_weight:
            loss = loss + cosine_weight * (1 - F.cosine_similarity(out, target[pick], dim=-1)).mean()
        return loss

    before, best = fit_keeping_best(
        sparse_mlp, loss_on, lambda: _mse(sparse_mlp, x_eval, y_eval), n_train=train_index.numel(), steps=steps,
        lr=lr, batch_size=batch_size, eval_every=eval_every, generator=generator, higher_is_better=False,
        what=f"layer {layer_index}: distillation",
    )
    return LayerDistillReport(layer=layer_index, mse_before=before, mse_after=best, steps=steps)


def for_each_sparse_layer(
    model: torch.nn.Module,
    run_one: Callable[[int, torch.nn.Module], Any],
    report_type: type,
    *,
    work_dir: Optional[Union[str, Path]] = None,
    only: Optional[str] = None,
    desc: str = "layers",
    progress: bool = True,
) -> list:
    """Run `run_one(index, mlp)` on every sparse MLP (of method `only`, if given). With `work_dir`,
    each finished layer's state and report are saved atomically and reused by a later run."""
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    mlps = [(i, m) for i, m in model.sparse_mlps() if only is None or m.sparse_method == only]
    reports = []
    for index, mlp in tqdm(mlps, desc=desc, disable=not progress):
        saved = work / f"layer_{index:04d}.pt" if work is not None else None
        if saved is not None and saved.is_file():
            record = torch.load(saved, weights_only=True)
            mlp.load_state_dict(record["state"])
            reports.append(report_type(**json.loads(record["report"])))
            continue
        report = run_one(index, mlp)
        reports.append(report)
        if saved is not None:
            partial = saved.with_suffix(".partial")
            torch.save({"state": mlp.state_dict(), "report": json.dumps(asdict(report))}, partial)
            os.replace(partial, saved)
    return reports


def distill_layers(
    sparse_model: torch.nn.Module,
    dense_model: torch.nn.Module,
    calibration_inputs: list[torch.Tensor],
    *,
    work_dir: Optional[Union[str, Path]] = None,
    seed: int = 0,
    fit_tree_routing: bool = True,
    router_fit: str = DEFAULT_ROUTER_FIT,
    sequential_ids: Optional[torch.Tensor] = None,
    progress: bool = True,
    **options,
) -> list[LayerDistillReport]:
    """Distill every sparse MLP of `sparse_model` against the dense MLP it replaces; tree layers
    first get their partition and routing fitted to the same inputs (`fit_routing`, with
    `router_fit` for hyperplane routers), or, where leaves select their neurons, are rebuilt from
    the dense MLP on them (`fit_selected_leaves`).

    The inputs of layer i are `calibration_inputs[i]`, captured on the dense model, or, given
    `sequential_ids` (calibration windows), sampled from `sparse_model` itself after layers 0..i-1
    were distilled (as GPTQ does): each layer is fitted to the inputs the sparse model really
    feeds it, the target still the dense MLP's output on them. The windows walk through the
    layers once (`LayerReplay`), so that costs about two forwards of them in all;
    `calibration_inputs` then only sets how many tokens a layer keeps."""
    arch = architecture_for(dense_model.config)
    dense_layers = arch.decoder_layers(dense_model)
    replay = None

    def inputs_of(index: int) -> torch.Tensor:
        nonlocal replay
        if sequential_ids is None:
            return calibration_inputs[index]
        was_training = sparse_model.training
        sparse_model.eval()
        try:
            if replay is None:
                replay = LayerReplay(sparse_model, sequential_ids)
            while replay.next_layer < index:  # the layers before, as distilled (or resumed)
                replay.run_layer()
            rows = replay.run_layer(advance=False)[0].cpu()
        finally:
            sparse_model.train(was_training)
        keep = calibration_inputs[index].shape[0]
        if rows.shape[0] <= keep:
            return rows
        generator = torch.Generator().manual_seed(seed + index)
        return rows[torch.randperm(rows.shape[0], generator=generator)[:keep].sort().values]

    def run_one(index: int, mlp: torch.nn.Module) -> LayerDistillReport:
        routing = None
        inputs = inputs_of(index)
        dense_mlp = getattr(dense_layers[index], arch.mlp_attr)
        if fit_tree_routing and mlp.sparse_method == "tree":
            if mlp.spec.leaf_neurons == "selected":
                routing = fit_selected_leaves(mlp, dense_mlp, inputs, seed=seed + index, layer_index=index)
            else:
                routing = fit_routing(mlp, inputs, router_fit=router_fit, seed=seed + index, layer_index=index)
        report = distill_layer(mlp, dense_mlp, inputs,
                               seed=seed + index, layer_index=index, **options)
        if routing is not None:
            report.captured_mass_before = routing.captured_mass_before
            report.captured_mass_after = routing.captured_mass_after
        return report

    return for_each_sparse_layer(sparse_model, run_one, LayerDistillReport, work_dir=work_dir,
                                 desc="distilling layers", progress=progress)
