"""Prune a tree checkpoint's dead paths into a smaller static tree.

MODEL runs over --windows windows of --window tokens of TEXT; per layer and tree, the leaves that
at least --min-tokens of those tokens reached are kept, the others are removed from the weights,
and a node whose one subtree lost every leaf always branches to the other. OUT is an ordinary
checkpoint (it loads with trust_remote_code like any other) that computes what MODEL does (the same
sums) on every token whose paths survived; the active units per token do not change, the stored MLP
weights shrink. OUT/prune_report.json lists what each layer kept. Prune on training text, never
on the evaluation text. MODEL is only read; OUT is written to a temporary directory and renamed.
"""

from __future__ import annotations

import argparse

NAME = "prune"
HELP = "remove a tree model's dead paths (a smaller static tree)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="tree checkpoint directory")
    parser.add_argument("out", metavar="OUT", help="output directory for the pruned checkpoint")
    parser.add_argument("--text", required=True, help="text whose tokens decide which paths live (e.g. valid.txt)")
    parser.add_argument("--windows", type=int, default=16, help="number of windows of that text")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--min-tokens", type=int, default=1,
                        help="keep a leaf only if at least this many tokens reached it (1 = drop dead paths only)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..workflows import prune_checkpoint

    record = prune_checkpoint(args.model, args.out, text=args.text, windows=args.windows, window=args.window,
                              min_tokens=args.min_tokens, overwrite=args.overwrite, progress=not args.no_progress)
    layers = record["layers"]
    kept = sum(layer["leaves_after"] for layer in layers)
    total = sum(layer["leaves_before"] for layer in layers)
    before, after = record["stored_units_before"], record["stored_units_after"]
    print(f"pruned on {record['tokens']:,} tokens: kept {kept} of {total} leaves; stored MLP units "
          f"{before:,} -> {after:,} ({after / before:.1%}); wrote {args.out}")
    return 0
