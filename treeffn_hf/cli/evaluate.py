"""Perplexity of a model (dense or converted) on the project protocol: the text read as one string,
non-overlapping windows of 1024 tokens, the first --windows of them (0 = all). With --baseline, the
dense model is evaluated in the same run and the ratio is printed, next to the sparse model's
active fraction of MLP units and weight bytes. With --tree-stats DIR, a tree model's path usage on
the same windows is written to DIR: tree_stats.json (per layer: leaf histogram, dead paths, routing
entropy, right-fraction per node) and tree_usage.png (usage heatmap).
"""

from __future__ import annotations

import argparse
import json

NAME = "eval"
HELP = "perplexity (and ratio to a dense baseline) on a text file"
DEFAULT_TEXT = "../shared/data/wikitext-2-raw/wiki.test.raw"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="converted checkpoint or dense model (dir or Hub id)")
    parser.add_argument("--gguf-file", default=None, help="MODEL/GGUF_FILE, for a dense GGUF model")
    parser.add_argument("--baseline", default=None, help="dense model to compare with, in the same run")
    parser.add_argument("--baseline-gguf-file", default=None)
    parser.add_argument("--text", default=DEFAULT_TEXT, help="evaluation text (never train on it)")
    parser.add_argument("--windows", type=int, default=40, help="number of 1024-token windows (0 = all)")
    parser.add_argument("--tree-stats", metavar="DIR", default=None,
                        help="write path-usage statistics and a heatmap of a tree model to DIR")
    parser.add_argument("--attribution", metavar="DIR", default=None,
                        help="write per-layer attention vs MLP residual contributions (and the baseline's) to DIR")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-progress", action="store_true")


def _load(src: str, gguf_file):
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..checkpoint import is_treeffn_checkpoint, load, load_dense

    if gguf_file is None and Path(src).is_dir() and is_treeffn_checkpoint(Path(src)):
        return load(src).eval(), AutoTokenizer.from_pretrained(src, trust_remote_code=True)
    return load_dense(src, gguf_file=gguf_file)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import CheckpointError
    from ..evaluation import perplexity, protocol_windows

    if not Path(args.text).is_file():
        raise CheckpointError(f"{args.text}: no such evaluation text (pass --text)")
    model, tokenizer = _load(args.model, args.gguf_file)
    if tokenizer is None:
        raise CheckpointError(f"{args.model}: no tokenizer to read the evaluation text with")
    windows = protocol_windows(tokenizer, args.text, max_windows=args.windows)
    result = {"model": args.model, "text": args.text, "windows": windows.shape[0]}
    result["perplexity"] = perplexity(model, windows, progress=not args.no_progress).perplexity
    if hasattr(model, "sparse_cost"):
        cost = model.sparse_cost()
        result.update(active_unit_fraction=cost.unit_fraction, active_weight_fraction=cost.weight_fraction)
    if args.tree_stats:
        result["tree_stats"] = _tree_stats(model, windows, args.tree_stats, not args.no_progress)
    baseline = None
    if args.baseline:
        baseline, _ = _load(args.baseline, args.baseline_gguf_file)
        result["baseline_perplexity"] = perplexity(baseline, windows, progress=not args.no_progress).perplexity
        result["perplexity_ratio"] = result["perplexity"] / result["baseline_perplexity"]
    if args.attribution:
        result["attribution"] = _attribution(model, baseline, windows, args.attribution, not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"perplexity {result['perplexity']:.3f} on {result['windows']} windows of {args.text}")
        if "active_unit_fraction" in result:
            print(f"active MLP units {result['active_unit_fraction']:.2%}, weight bytes {result['active_weight_fraction']:.2%}")
        if args.baseline:
            print(f"baseline perplexity {result['baseline_perplexity']:.3f}; ratio {result['perplexity_ratio']:.3f}")
        if args.attribution:
            for name, rows in result["attribution"].items():
                share = sum(r["mlp_share"] for r in rows) / len(rows)
                logit_share = sum(r["mlp_logit_share"] for r in rows) / len(rows)
                print(f"{name}: mean MLP share of the residual writes {share:.3f}, of the direct logit terms "
                      f"{logit_share:.3f} (per layer in {args.attribution})")
        if args.tree_stats:
            t = result["tree_stats"]
            print(f"tree paths: {t['dead_paths']} of {t['paths']} dead, mean routing entropy "
                  f"{t['mean_routing_entropy']:.3f}; details in {args.tree_stats}")
    return 0


def _tree_stats(model, windows, directory: str, progress: bool) -> dict:
    from pathlib import Path

    from ..checkpoint import CheckpointError
    from ..tree_stats import collect_tree_stats, plot_usage, summary

    if not hasattr(model, "sparse_mlps") or not any(m.sparse_method == "tree" for _, m in model.sparse_mlps()):
        raise CheckpointError("--tree-stats needs a model with tree layers")
    stats = collect_tree_stats(model, windows, progress=progress)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree_stats.json").write_text(json.dumps({"summary": summary(stats),
                                                     "layers": [s.as_dict() for s in stats]}, indent=1))
    plot_usage(stats, out / "tree_usage.png")
    return summary(stats)


def _attribution(model, baseline, windows, directory: str, progress: bool) -> dict:
    from pathlib import Path

    from ..attribution import as_dicts, plot_attribution, residual_attribution

    results = {"model": residual_attribution(model, windows, progress=progress)}
    if baseline is not None:
        results["baseline"] = residual_attribution(baseline, windows, progress=progress)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {name: as_dicts(rows) for name, rows in results.items()}
    (out / "attribution.json").write_text(json.dumps(payload, indent=1))
    plot_attribution(results, out / "attribution.png")
    return payload
