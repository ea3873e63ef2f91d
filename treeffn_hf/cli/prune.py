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
import json

NAME = "prune"
HELP = "remove a tree model's dead paths (a smaller static tree)"
DEFAULT_TEXT = "../shared/data/wikitext-2/valid.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="tree checkpoint directory")
    parser.add_argument("out", metavar="OUT", help="output directory for the pruned checkpoint")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="text whose tokens decide which paths live")
    parser.add_argument("--windows", type=int, default=16, help="number of windows of that text")
    parser.add_argument("--window", type=int, default=1024, help="tokens per window")
    parser.add_argument("--min-tokens", type=int, default=1,
                        help="keep a leaf only if at least this many tokens reached it (1 = drop dead paths only)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..checkpoint import CheckpointError, is_treeffn_checkpoint, load, prepare_output, save
    from ..conversion.calibration import read_texts, token_windows
    from ..pruning import prune_dead_paths

    source = Path(args.model)
    if not (source.is_dir() and is_treeffn_checkpoint(source)):
        raise CheckpointError(f"{args.model}: not a treeffn checkpoint directory")
    if not Path(args.text).is_file():
        raise CheckpointError(f"{args.text}: no such text (pass --text)")
    prepare_output(args.out, args.overwrite, source=source)  # fail before the long work
    model = load(source).eval()
    if any(mlp.sparse_method != "tree" for _, mlp in model.sparse_mlps()):
        raise CheckpointError(f"{args.model}: only tree models have paths to prune")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    windows = token_windows(read_texts(args.text), tokenizer, args.window, args.windows)
    pruned, report = prune_dead_paths(model, windows, min_tokens=args.min_tokens, progress=not args.no_progress)
    record = {"source": str(source), "text": args.text, **report.as_dict()}
    save(pruned, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
         extra_files={"prune_report.json": json.dumps(record, indent=2)})
    kept = sum(layer.leaves_after for layer in report.layers)
    total = sum(layer.leaves_before for layer in report.layers)
    print(f"pruned on {report.tokens:,} tokens: kept {kept} of {total} leaves; stored MLP units "
          f"{report.stored_units_before:,} -> {report.stored_units_after:,} "
          f"({report.stored_units_after / report.stored_units_before:.1%}); wrote {args.out}")
    return 0
