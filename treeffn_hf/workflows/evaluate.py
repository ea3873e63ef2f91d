"""`treeffn eval`: perplexity on the project protocol, the ratio to a dense baseline, tree statistics
and attribution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import CheckpointError, load_dense


def load_for_evaluation(src: Union[str, Path], gguf_file: Optional[str] = None):
    """(model in eval mode, tokenizer) of a treeffn checkpoint or of a dense model (dir, Hub id, GGUF)."""
    from transformers import AutoTokenizer

    from ..checkpoint import is_treeffn_checkpoint, load

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
    text: Union[str, Path],
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
    from ..evaluation import perplexity, protocol_windows

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
    from ..tree_stats import collect_tree_stats, plot_usage, summary

    if not hasattr(model, "sparse_mlps") or not any(m.sparse_method == "tree" for _, m in model.sparse_mlps()):
        raise CheckpointError("--tree-stats needs a model with tree layers")
    stats = collect_tree_stats(model, ids, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree_stats.json").write_text(json.dumps({"summary": summary(stats),
                                                     "layers": [s.as_dict() for s in stats]}, indent=1))
    plot_usage(stats, out / "tree_usage.png")
    return summary(stats)


def _write_attribution(model, baseline, ids: torch.Tensor, out: Path, progress: bool) -> dict:
    from ..attribution import as_dicts, plot_attribution, residual_attribution

    results = {"model": residual_attribution(model, ids, progress=progress)}
    if baseline is not None:
        results["baseline"] = residual_attribution(baseline, ids, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    payload = {name: as_dicts(rows) for name, rows in results.items()}
    (out / "attribution.json").write_text(json.dumps(payload, indent=1))
    plot_attribution(results, out / "attribution.png")
    return payload
