"""`treeffn distill`: recover quality layer by layer on calibration text, with the recipe of the
checkpoint's method (conversion/mgs/recipe.py, conversion/tree/recipe.py)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Optional, Union

from ..checkpoint import CheckpointError, claim_work_dir, load_dense, prepare_output, save
from ..conversion.distillation import DISTILL_LR
from ..conversion.fit_context import FitContext
from ..conversion.mgs.recipe import MGSRecipe, run_mgs_recipe
from ..conversion.routing_fit import DEFAULT_ROUTER_FIT
from ..conversion.tree.recipe import ShapeMismatch, TreeRecipe, run_tree_recipe


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
    max_ratio: Optional[float] = None,
    allocation: Optional[str] = None,
    refit_down: bool = True,
    router_fit: str = DEFAULT_ROUTER_FIT,
    sequential: bool = True,
    active: Optional[float] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Capture the dense MLPs' inputs on `windows` windows of `window` tokens of `calibration`
    text, run the recipe of the checkpoint's method on them (the MGS options: `gate_steps`,
    `selection`, one budget of `max_ratio` (the default, 1.01), `density` or `weight_fraction`,
    `allocation`, `refit_down`; the tree options:
    `distill_steps`, `lr`, `router_fit`, `sequential`, `active`, `allocation`), and save the
    result to `out` with `treeffn_distill.json`, the summary this returns.

    Per-layer results are kept in a work directory beside OUT, so a killed run resumes from the
    last finished layer; it is removed once OUT is written.
    """
    start = time.perf_counter()
    out = prepare_output(out, overwrite, source=sparse_dir)
    texts = _calibration_texts(calibration)
    mgs = MGSRecipe(gate_steps, selection, density, weight_fraction, allocation, refit_down, max_ratio)
    tree = TreeRecipe(distill_steps, lr, router_fit, sequential, active, allocation)
    work = out.parent / f".{out.name}.distill-work"
    claim_work_dir(work, {"sparse": str(Path(sparse_dir).resolve()), "dense": str(dense), "gguf_file": gguf_file,
                          "calibration": str(calibration), "windows": windows, "window": window,
                          "tokens_per_layer": tokens_per_layer, "mgs": vars(mgs), "tree": vars(tree)})
    try:
        sparse, tokenizer, dense_model = _load_pair(sparse_dir, dense, gguf_file)
        method = sparse.config.sparse_mlp["method"]
        _check_options(sparse, method, mgs, tree)
        fit = _fit_context(dense_model, tokenizer, texts, window, windows, tokens_per_layer, work, progress)
        try:
            sparse, part = run_mgs_recipe(sparse, fit, mgs) if method == "mgs" else run_tree_recipe(sparse, fit, tree)
        except ShapeMismatch as error:
            raise CheckpointError(str(error)) from error
    except BaseException:
        if not any(work.glob("layer_*.pt")):  # nothing worth resuming: leave no trace
            shutil.rmtree(work, ignore_errors=True)
        raise
    summary = {"method": method,
               "calibration": {"source": str(calibration), "windows": int(fit.ids.shape[0]), "window": window,
                               "tokens": fit.captured.tokens_seen, "tokens_per_layer": tokens_per_layer},
               "budget": None, "shape_search": None, "sequential": None, "down_proj_refit": [], **part,
               "seconds": time.perf_counter() - start}
    save(sparse, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(dense),
         extra_files={"treeffn_distill.json": json.dumps(summary, indent=2)})
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _calibration_texts(calibration):
    """The calibration texts, checked before any model is loaded."""
    from ..conversion.calibration import read_texts

    try:
        texts = read_texts(calibration)
        return itertools.chain([next(texts)], texts)
    except (FileNotFoundError, StopIteration) as error:
        raise CheckpointError(f"{calibration}: unusable calibration source ({error or 'empty'})") from error


def _load_pair(sparse_dir, dense: str, gguf_file: Optional[str]):
    """(the sparse model, its tokenizer, the dense model it was converted from)."""
    from transformers import AutoTokenizer

    from ..checkpoint import load

    sparse = load(sparse_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(sparse_dir), trust_remote_code=True)
    dense_model, _ = load_dense(dense, gguf_file=gguf_file, load_tokenizer=False)
    if dense_model.config.num_hidden_layers != sparse.config.num_hidden_layers or (
            dense_model.config.hidden_size != sparse.config.hidden_size):
        raise CheckpointError(f"{dense}: not the dense model {sparse_dir} was converted from (shapes differ)")
    return sparse, tokenizer, dense_model


def _check_options(sparse, method: str, mgs: MGSRecipe, tree: TreeRecipe) -> None:
    """Refuse the options of the other method, and combinations a recipe does not take."""
    if method != "mgs" and any(value is not None for value in (mgs.selection, mgs.density, mgs.weight_fraction,
                                                                mgs.max_ratio)):
        raise CheckpointError("--selection, --density, --weight-fraction and --max-ratio apply to MGS models only")
    if method != "tree" and tree.active is not None:
        raise CheckpointError("--active chooses tree shapes: it applies to tree models only")
    selected = sparse.config.sparse_mlp.get("leaf_neurons") == "selected"
    problem = mgs.problem() if method == "mgs" else tree.problem(selected)
    if problem:
        raise CheckpointError(problem)


def _fit_context(dense_model, tokenizer, texts, window: int, windows: int, tokens_per_layer: int, work: Path,
                 progress: bool) -> FitContext:
    from ..conversion.calibration import capture_mlp_inputs, token_windows

    ids = token_windows(texts, tokenizer, window, windows)
    captured = capture_mlp_inputs(dense_model, ids, tokens_per_layer=tokens_per_layer, progress=progress)
    return FitContext(dense_model, ids, captured, work, progress)
