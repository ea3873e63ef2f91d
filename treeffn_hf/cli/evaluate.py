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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="converted checkpoint or dense model (dir or Hub id)")
    parser.add_argument("--gguf-file", default=None, help="MODEL/GGUF_FILE, for a dense GGUF model")
    parser.add_argument("--baseline", default=None, help="dense model to compare with, in the same run")
    parser.add_argument("--baseline-gguf-file", default=None)
    parser.add_argument("--text", required=True, help="evaluation text, e.g. WikiText-2's wiki.test.raw (never train on it)")
    parser.add_argument("--windows", type=int, default=40, help="number of 1024-token windows (0 = all)")
    parser.add_argument("--tree-stats", metavar="DIR", default=None,
                        help="write path-usage statistics and a heatmap of a tree model to DIR")
    parser.add_argument("--attribution", metavar="DIR", default=None,
                        help="write per-layer attention vs MLP residual contributions (and the baseline's) to DIR")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..workflows import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.model, gguf_file=args.gguf_file, baseline=args.baseline, baseline_gguf_file=args.baseline_gguf_file,
        text=args.text, windows=args.windows, tree_stats=args.tree_stats, attribution=args.attribution,
        progress=not args.no_progress,
    )
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

