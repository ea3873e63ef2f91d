"""End-to-end workflows behind the CLI (and usable from Python): convert a checkpoint, describe one."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import CheckpointError, claim_work_dir, load_dense, prepare_output, read_dense_config, save
from .conversion.surgery import check_convertible, convert
from .modeling.layer_spec import LayerSpec
from .modeling.sparse_cost import SparseCost

LOSS_WINDOWS = 2  # calibration windows whose KL drives greedy allocation


@dataclass
class ConversionReport:
    source: str
    output: Path
    layer_spec: dict
    active_unit_fraction: float
    active_weight_fraction: float
    seconds: float
    pushed_to: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} in {self.seconds:.1f}s",
            f"  layer spec: {json.dumps(self.layer_spec)}",
            f"  active MLP units per token: {self.active_unit_fraction:.2%}; "
            f"MLP weight bytes read: {self.active_weight_fraction:.2%} of dense",
        ]
        if self.pushed_to:
            lines.append(f"  pushed to {self.pushed_to}")
        return "\n".join(lines)


def convert_checkpoint(
    src: Union[str, Path],
    out: Union[str, Path],
    spec: LayerSpec,
    *,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "float32",
    revision: Optional[str] = None,
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """load -> convert -> save (-> push). Every check that needs no weights runs first."""
    start = time.perf_counter()
    spec.validate()
    out = prepare_output(out, overwrite, source=src)
    config = read_dense_config(str(src), gguf_file=gguf_file, revision=revision)
    check_convertible(config, spec)
    dense, tokenizer = load_dense(str(src), gguf_file=gguf_file, dtype=dtype, revision=revision, config=config)
    sparse = convert(dense, spec, progress=progress)
    del dense
    save(sparse, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(src))
    cost = sparse.sparse_cost()
    report = ConversionReport(
        source=str(src) + (f"/{gguf_file}" if gguf_file else ""),
        output=out,
        layer_spec=dict(sparse.config.sparse_mlp),
        active_unit_fraction=cost.unit_fraction,
        active_weight_fraction=cost.weight_fraction,
        seconds=time.perf_counter() - start,
    )
    if push_to_hub:
        from .hub import push

        report.pushed_to = push(out, push_to_hub, private=private)
    return report


def describe_checkpoint(directory: Union[str, Path]) -> dict:
    """Spec, active fractions and parameter counts of a converted checkpoint, without loading weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from .modeling.dispatch import inference_paths
    from .modeling.modeling_treeffn import build_sparse_mlp

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a model directory (no config.json)")
    try:
        config_data = json.loads((directory / "config.json").read_text())
    except ValueError as error:
        raise CheckpointError(f"{directory}: config.json is not valid JSON ({error})") from error
    if "sparse_mlp" not in config_data:
        raise CheckpointError(f"{directory}: not a treeffn checkpoint (config has no sparse_mlp)")
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):  # every layer: allocated budgets give each its own density
            layers = [build_sparse_mlp(config, index) for index in range(config.num_hidden_layers)]
    except Exception as error:
        raise CheckpointError(f"{directory}: cannot read the sparse config ({type(error).__name__}: {error})") from error
    layer = layers[0]
    cost = SparseCost.total(mlp.cost() for mlp in layers)
    total = mlp = 0
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise CheckpointError(f"{directory}: no safetensors weights")
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= size
                    total += count
                    mlp += count if ".mlp." in key else 0
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable safetensors ({type(error).__name__}: {error})") from error
    return {
        "directory": str(directory),
        "model_type": config.model_type,
        "base_model_type": config.base_model_type,
        "method": config.sparse_mlp["method"],
        "num_layers": config.num_hidden_layers,
        "layer_spec": dict(config.sparse_mlp),
        "active_unit_fraction": cost.unit_fraction,
        "active_weight_fraction": cost.weight_fraction,
        "parameters": {"total": total, "mlp": mlp},
        "inference_paths": inference_paths(layer),
    }


def distill_checkpoint(
    sparse_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    dense: str,
    calibration: Union[str, Path],
    gguf_file: Optional[str] = None,
    windows: int = 32,
    window: int = 512,
    tokens_per_layer: int = 8192,
    gate_steps: int = 300,
    distill_steps: int = 200,
    lr: float = 1e-4,
    selection: Optional[str] = None,
    density: Optional[float] = None,
    weight_fraction: Optional[float] = None,
    allocation: str = "uniform",
    refit_down: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Recover quality layer by layer: capture the dense MLPs' inputs on calibration text, then
    regress tree MLPs on the dense outputs, or calibrate MGS models: train linear gates on
    dense-activation labels (the quantized predictor needs no training) and, unless
    `selection='top_k'`, give every layer a threshold calibrated to its density. The densities
    average `density` (default: the checkpoint's), or `weight_fraction` of the MLP weight bytes,
    shared out `uniform`ly or `greedy` on a calibration loss (conversion/budgets.py). Then, with
    `refit_down`, each MGS layer's down_proj is refitted by least squares so the computed neurons
    make up for the skipped ones (conversion/compensation.py).

    Per-layer results are kept in a work directory beside OUT, so a killed run resumes from the
    last finished layer; it is removed once OUT is written.
    """
    import shutil

    from transformers import AutoTokenizer

    from .checkpoint import load
    from .conversion.budgets import calibrate_mgs
    from .conversion.calibration import capture_mlp_inputs, read_texts, token_windows
    from .conversion.compensation import refit_mgs_layers
    from .conversion.distillation import distill_layers
    from .conversion.gate_training import train_gates

    start = time.perf_counter()
    out = prepare_output(out, overwrite, source=sparse_dir)
    try:  # the calibration source is checked before any model is loaded
        texts = read_texts(calibration)
        texts = itertools.chain([next(texts)], texts)
    except (FileNotFoundError, StopIteration) as error:
        raise CheckpointError(f"{calibration}: unusable calibration source ({error or 'empty'})") from error
    work = out.parent / f".{out.name}.distill-work"
    claim_work_dir(work, {
        "sparse": str(Path(sparse_dir).resolve()), "dense": str(dense), "gguf_file": gguf_file,
        "calibration": str(calibration), "windows": windows, "window": window,
        "tokens_per_layer": tokens_per_layer, "gate_steps": gate_steps, "distill_steps": distill_steps, "lr": lr,
        "selection": selection, "density": density, "weight_fraction": weight_fraction, "allocation": allocation,
        "refit_down": refit_down,
    })
    try:
        sparse = load(sparse_dir)
        if sparse.config.sparse_mlp["method"] != "mgs" and (
                selection is not None or density is not None or weight_fraction is not None):
            raise CheckpointError("--selection, --density and --weight-fraction apply to MGS models only")
        if selection == "top_k" and (density is not None or weight_fraction is not None):
            raise CheckpointError("--density and --weight-fraction set calibrated thresholds: not with --selection top_k")
        tokenizer = AutoTokenizer.from_pretrained(str(sparse_dir), trust_remote_code=True)
        dense_model, _ = load_dense(dense, gguf_file=gguf_file, load_tokenizer=False)
        if dense_model.config.num_hidden_layers != sparse.config.num_hidden_layers or (
            dense_model.config.hidden_size != sparse.config.hidden_size
        ):
            raise CheckpointError(f"{dense}: not the dense model {sparse_dir} was converted from (shapes differ)")
        ids = token_windows(texts, tokenizer, window, windows)
        captured = capture_mlp_inputs(dense_model, ids, tokens_per_layer=tokens_per_layer, progress=progress)
        method = sparse.config.sparse_mlp["method"]
        budget, refits = None, []
        if method == "mgs":
            reports = train_gates(sparse, captured.inputs, steps=gate_steps, work_dir=work, progress=progress)
            if selection != "top_k":  # thresholds are the best selection we know
                budget = calibrate_mgs(sparse, captured.inputs, density=density, weight_fraction=weight_fraction,
                                       allocation=allocation, loss_ids=ids[-LOSS_WINDOWS:], progress=progress)
            if refit_down:  # after the selection is final: the refit is fitted under it
                refits = refit_mgs_layers(sparse, dense_model, ids, progress=progress)
        else:
            for param in sparse.parameters():
                param.requires_grad_(False)
            for _, mlp in sparse.sparse_mlps():
                for param in mlp.parameters():
                    param.requires_grad_(True)
            reports = distill_layers(sparse, dense_model, captured.inputs, steps=distill_steps, lr=lr, work_dir=work,
                                     progress=progress)
            for param in sparse.parameters():
                param.requires_grad_(True)
    except BaseException:
        if not any(work.glob("layer_*.pt")):  # nothing worth resuming: leave no trace
            shutil.rmtree(work, ignore_errors=True)
        raise
    summary = {
        "method": method,
        "calibration": {"source": str(calibration), "windows": int(ids.shape[0]), "window": window,
                        "tokens": captured.tokens_seen, "tokens_per_layer": tokens_per_layer},
        "layers": [asdict(r) for r in reports],
        "budget": budget,
        "down_proj_refit": [asdict(r) for r in refits],
        "seconds": time.perf_counter() - start,
    }
    save(sparse, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(dense),
         extra_files={"treeffn_distill.json": json.dumps(summary, indent=2)})
    shutil.rmtree(work, ignore_errors=True)
    return summary
