"""The public workflows: one Python function behind each CLI subcommand, with the CLI's defaults.

- `convert_checkpoint` (`treeffn convert`), `distill_checkpoint` (`treeffn distill`),
  `finetune_checkpoint` (`treeffn finetune`, in training/finetune.py), `prune_checkpoint`
  (`treeffn prune`), `evaluate_checkpoint` (`treeffn eval`), `describe_checkpoint` (`treeffn info`)
  and `hub.push` (`treeffn push`).

A subcommand parses its options, calls its function and prints the result; nothing else. The
benchmarks call the same functions, and state in their captions where they change a default.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .architectures import architecture_for
from .checkpoint import CheckpointError, claim_work_dir, load_dense, prepare_output, read_dense_config, save
from .conversion.distillation import DISTILL_LR
from .conversion.routing_fit import DEFAULT_ROUTER_FIT
from .conversion.surgery import check_convertible, convert
from .modeling.layer_spec import LayerSpec, TreeSpec
from .modeling.sparse_cost import SparseCost
from .training.finetune import finetune_checkpoint

__all__ = ["convert_checkpoint", "describe_checkpoint", "distill_checkpoint", "evaluate_checkpoint",
           "finetune_checkpoint", "load_for_evaluation", "prune_checkpoint"]

LOSS_WINDOWS = 2  # calibration windows whose KL drives greedy allocation
PRUNE_TEXT = "../shared/data/wikitext-2/valid.txt"
EVAL_TEXT = "../shared/data/wikitext-2-raw/wiki.test.raw"


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

    from .modeling.configuration_treeffn import LAYER_SHAPES
    from .modeling.dispatch import inference_paths, runtime_copy_bytes
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
        # Per-layer forests (the shape search's choice): each layer's shape and neurons per token.
        "layer_shapes": [{**mlp.spec.shape(), "active_units": mlp.spec.active_units} for mlp in layers]
        if config.sparse_mlp.get(LAYER_SHAPES) else None,
        "active_unit_fraction": cost.unit_fraction,
        "active_weight_fraction": cost.weight_fraction,
        # Trees: rows stored per dense neuron (above 1 where selected leaves share neurons).
        "stored_multiple": (sum(m.spec.stored_units for m in layers) / sum(m.intermediate_size for m in layers)
                            if config.sparse_mlp["method"] == "tree" else None),
        "parameters": {"total": total, "mlp": mlp},
        "inference_paths": inference_paths(layer),
        # for float32 weights (the layers are built on the meta device in the default dtype)
        "runtime_copy_bytes": {device: sum(runtime_copy_bytes(mlp)[device] for mlp in layers)
                               for device in ("cuda", "cpu")},
        "mlp_weight_bytes": sum(t.numel() * t.element_size() for mlp in layers
                                for t in itertools.chain(mlp.parameters(), mlp.buffers())),
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
    lr: float = DISTILL_LR,
    selection: Optional[str] = None,
    density: Optional[float] = None,
    weight_fraction: Optional[float] = None,
    allocation: Optional[str] = None,
    refit_down: bool = True,
    router_fit: str = DEFAULT_ROUTER_FIT,
    sequential: bool = True,
    active: Optional[float] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Recover quality layer by layer: capture the dense MLPs' inputs on calibration text, then
    regress tree MLPs on the dense outputs (after their routing fit, with `router_fit` routers where
    they route by hyperplanes; with `sequential`, each on the inputs the already distilled sparse
    layers before it produce; with `active`, a partition forest first takes, in each layer, the
    forest shape that keeps its output best at that fraction of its neurons per token
    (conversion/shape_search.py), and a tree whose leaves select their neurons takes per-layer leaf
    widths whose active neurons average that fraction, `greedy` on a calibration loss (the default
    for trees) or `uniform`, conversion/tree_allocation.py), or
    calibrate MGS models: train linear gates on
    dense-activation labels (the quantized predictor needs no training) and, unless
    `selection='top_k'`, give every layer a threshold calibrated to its density. The densities
    average `density` (default: the checkpoint's), or `weight_fraction` of the MLP weight bytes,
    shared out `uniform`ly (the default for MGS) or `greedy` on a calibration loss (conversion/budgets.py). Then, with
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
        "refit_down": refit_down, "router_fit": router_fit, "sequential": sequential, "active": active,
    })
    try:
        sparse = load(sparse_dir)
        if sparse.config.sparse_mlp["method"] != "mgs" and (
                selection is not None or density is not None or weight_fraction is not None):
            raise CheckpointError("--selection, --density and --weight-fraction apply to MGS models only")
        if sparse.config.sparse_mlp["method"] != "tree" and active is not None:
            raise CheckpointError("--active chooses tree shapes: it applies to tree models only")
        selected = sparse.config.sparse_mlp.get("leaf_neurons") == "selected"
        if allocation not in (None, "uniform", "greedy"):
            raise CheckpointError(f"--allocation must be uniform or greedy, got {allocation!r}")
        if sparse.config.sparse_mlp["method"] == "tree" and allocation is not None and not (selected and active):
            raise CheckpointError("--allocation shares out MGS densities, or with --active the leaf widths of a tree "
                                  "whose leaves select their neurons")
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
        budget, refits, shapes = None, [], None
        if method == "mgs":
            reports = train_gates(sparse, captured.inputs, steps=gate_steps, work_dir=work, progress=progress)
            if selection != "top_k":  # thresholds are the best selection we know
                budget = calibrate_mgs(sparse, captured.inputs, density=density, weight_fraction=weight_fraction,
                                       allocation=allocation or "uniform", loss_ids=ids[-LOSS_WINDOWS:],
                                       progress=progress)
            if refit_down:  # after the selection is final: the refit is fitted under it
                refits = refit_mgs_layers(sparse, dense_model, ids, progress=progress)
        else:
            if active is not None and selected:
                budget = _allocated(sparse, dense_model, captured.inputs, ids[-LOSS_WINDOWS:], active,
                                    allocation or "uniform", work, progress)
                sparse = _reconverted(sparse, dense_model, [TreeSpec(**s) for s in budget["layer_specs"]])
            elif active is not None:
                shapes = _searched_shapes(sparse, dense_model, captured.inputs, active, work, router_fit, progress)
                sparse = _reconverted(sparse, dense_model, [TreeSpec(**layer["shape"]) for layer in shapes["layers"]])
            for param in sparse.parameters():
                param.requires_grad_(False)
            for _, mlp in sparse.sparse_mlps():
                for param in mlp.parameters():
                    param.requires_grad_(True)
            reports = distill_layers(sparse, dense_model, captured.inputs, steps=distill_steps, lr=lr, work_dir=work,
                                     router_fit=router_fit, sequential_ids=ids if sequential else None,
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
        "shape_search": shapes,
        "sequential": sequential if method == "tree" else None,  # trees: fitted on the sparse model's inputs
        "down_proj_refit": [asdict(r) for r in refits],
        "seconds": time.perf_counter() - start,
    }
    save(sparse, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(dense),
         extra_files={"treeffn_distill.json": json.dumps(summary, indent=2)})
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _searched_shapes(sparse, dense_model, inputs, active: float, work: Path, router_fit: str, progress: bool) -> dict:
    """The per-layer forest shapes the search picks (the checkpoint's routing and node width kept),
    kept in `work`, so a resumed run skips the search."""
    from .conversion.shape_search import search_tree_shapes, shape_candidates

    def search() -> dict:
        config, base = dense_model.config, sparse.config.sparse_spec
        candidates = shape_candidates(config.hidden_size, config.intermediate_size, active,
                                      node_width=base.node_width, routing=base.routing)
        return asdict(search_tree_shapes(dense_model, inputs, active, candidates=candidates, router_fit=router_fit,
                                         progress=progress))

    return _kept(work / "shapes.json", search)


def _allocated(sparse, dense_model, inputs, loss_ids, active: float, allocation: str, work: Path,
               progress: bool) -> dict:
    """Per-layer leaf widths of a selected-leaf tree averaging `active` (conversion/tree_allocation.py),
    kept in `work`, so a resumed run skips the sensitivities."""
    from .conversion.tree_allocation import allocate_tree_widths, allocation_fractions, with_active_fraction

    def allocate() -> dict:
        base, config = sparse.config.sparse_spec, dense_model.config
        if allocation == "uniform":
            sensitivities, grid = None, allocation_fractions(active)
            specs = [with_active_fraction(base, active, config.intermediate_size)] * config.num_hidden_layers
        else:
            specs, sensitivities, grid = allocate_tree_widths(dense_model, base, inputs, loss_ids, active,
                                                              progress=progress)
        return {"allocation": allocation, "active": active, "fractions": list(grid),
                "sensitivities": None if sensitivities is None else sensitivities.tolist(),
                "layer_specs": [s.resolve(config.hidden_size, config.intermediate_size).shape() for s in specs]}

    return _kept(work / "allocation.json", allocate)


def _kept(path: Path, compute) -> dict:
    """`compute()`'s JSON result, or the one a killed run left at `path`."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    os.replace(partial, path)
    return result


def _reconverted(sparse, dense_model, specs: list[TreeSpec]):
    """`sparse` re-converted from the dense MLPs with one spec per layer, everything outside the MLPs kept."""
    reshaped = convert(dense_model, specs, progress=False)
    arch = architecture_for(dense_model.config)
    mlps = tuple(arch.mlp_key_prefix(i) for i in range(dense_model.config.num_hidden_layers))
    missing, unexpected = reshaped.load_state_dict(
        {k: v for k, v in sparse.state_dict().items() if not k.startswith(mlps)}, strict=False)
    if unexpected or any(not k.startswith(mlps) for k in missing):
        raise CheckpointError(f"the tree checkpoint and its dense model differ outside the MLPs: "
                              f"{(unexpected + [k for k in missing if not k.startswith(mlps)])[:3]}")
    return reshaped


def prune_checkpoint(
    model_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    text: Union[str, Path] = PRUNE_TEXT,
    windows: int = 16,
    window: int = 1024,
    min_tokens: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Remove a tree checkpoint's dead paths: run it over `windows` windows of `window` tokens of
    `text`, keep per layer and tree the leaves at least `min_tokens` of those tokens reached, and
    save the smaller static tree to `out` (with `prune_report.json`, which this returns)."""
    from transformers import AutoTokenizer

    from .checkpoint import is_treeffn_checkpoint, load
    from .conversion.calibration import read_texts, token_windows
    from .pruning import prune_dead_paths

    source = Path(model_dir)
    if not (source.is_dir() and is_treeffn_checkpoint(source)):
        raise CheckpointError(f"{model_dir}: not a treeffn checkpoint directory")
    if not Path(text).is_file():
        raise CheckpointError(f"{text}: no such text (pass --text)")
    prepare_output(out, overwrite, source=source)  # fail before the long work
    model = load(source).eval()
    if any(mlp.sparse_method != "tree" for _, mlp in model.sparse_mlps()):
        raise CheckpointError(f"{model_dir}: only tree models have paths to prune")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    ids = token_windows(read_texts(text), tokenizer, window, windows)
    pruned, report = prune_dead_paths(model, ids, min_tokens=min_tokens, progress=progress)
    record = {"source": str(source), "text": str(text), **report.as_dict()}
    save(pruned, out, tokenizer=tokenizer, overwrite=overwrite,
         extra_files={"prune_report.json": json.dumps(record, indent=2)})
    return record


def load_for_evaluation(src: Union[str, Path], gguf_file: Optional[str] = None):
    """(model in eval mode, tokenizer) of a treeffn checkpoint or of a dense model (dir, Hub id, GGUF)."""
    from transformers import AutoTokenizer

    from .checkpoint import is_treeffn_checkpoint, load

    if gguf_file is None and Path(src).is_dir() and is_treeffn_checkpoint(Path(src)):
        return load(src).eval(), AutoTokenizer.from_pretrained(src, trust_remote_code=True)
    model, tokenizer = load_dense(str(src), gguf_file=gguf_file)
    return model.eval(), tokenizer


def evaluate_checkpoint(
    model: Union[str, Path],
    *,
    gguf_file: Optional[str] = None,
    baseline: Optional[str] = None,
    baseline_gguf_file: Optional[str] = None,
    text: Union[str, Path] = EVAL_TEXT,
    windows: int = 40,
    tree_stats: Optional[Union[str, Path]] = None,
    attribution: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> dict:
    """Perplexity on the project protocol (`text` as one string, non-overlapping 1024-token
    windows, the first `windows`, 0 = all); with `baseline`, the dense model's on the same windows
    and the ratio; a sparse model's active fractions of MLP units and weight bytes. `tree_stats`
    and `attribution` name directories for a tree model's path usage and for the per-layer
    attention vs MLP residual contributions (JSON and a plot each)."""
    from .evaluation import perplexity, protocol_windows

    if not Path(text).is_file():
        raise CheckpointError(f"{text}: no such evaluation text (pass --text)")
    sparse, tokenizer = load_for_evaluation(model, gguf_file)
    if tokenizer is None:
        raise CheckpointError(f"{model}: no tokenizer to read the evaluation text with")
    ids = protocol_windows(tokenizer, text, max_windows=windows)
    result = {"model": str(model), "text": str(text), "windows": ids.shape[0]}
    result["perplexity"] = perplexity(sparse, ids, progress=progress).perplexity
    if hasattr(sparse, "sparse_cost"):
        cost = sparse.sparse_cost()
        result.update(active_unit_fraction=cost.unit_fraction, active_weight_fraction=cost.weight_fraction)
    if tree_stats:
        result["tree_stats"] = _write_tree_stats(sparse, ids, Path(tree_stats), progress)
    dense = None
    if baseline:
        dense, _ = load_for_evaluation(baseline, baseline_gguf_file)
        result["baseline_perplexity"] = perplexity(dense, ids, progress=progress).perplexity
        result["perplexity_ratio"] = result["perplexity"] / result["baseline_perplexity"]
    if attribution:
        result["attribution"] = _write_attribution(sparse, dense, ids, Path(attribution), progress)
    return result


def _write_tree_stats(model, ids: torch.Tensor, out: Path, progress: bool) -> dict:
    from .tree_stats import collect_tree_stats, plot_usage, summary

    if not hasattr(model, "sparse_mlps") or not any(m.sparse_method == "tree" for _, m in model.sparse_mlps()):
        raise CheckpointError("--tree-stats needs a model with tree layers")
    stats = collect_tree_stats(model, ids, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree_stats.json").write_text(json.dumps({"summary": summary(stats),
                                                     "layers": [s.as_dict() for s in stats]}, indent=1))
    plot_usage(stats, out / "tree_usage.png")
    return summary(stats)


def _write_attribution(model, baseline, ids: torch.Tensor, out: Path, progress: bool) -> dict:
    from .attribution import as_dicts, plot_attribution, residual_attribution

    results = {"model": residual_attribution(model, ids, progress=progress)}
    if baseline is not None:
        results["baseline"] = residual_attribution(baseline, ids, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    payload = {name: as_dicts(rows) for name, rows in results.items()}
    (out / "attribution.json").write_text(json.dumps(payload, indent=1))
    plot_attribution(results, out / "attribution.png")
    return payload

