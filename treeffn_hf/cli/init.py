"""Write a randomly initialised tree model with a dense model's shape, to pretrain from scratch.

SRC gives the shape: a model directory with a config.json (weights are not read), or a Hub id;
`--set KEY=VALUE` changes config fields (e.g. `--set num_hidden_layers=4 --set hidden_size=256`).
OUT is a normal checkpoint: it trains with the HF Trainer or any PyTorch loop (docs/usage.md,
"Training a tree model from scratch") and loads with `trust_remote_code=True` like a converted one.
"""

from __future__ import annotations

import argparse

from .layer_options import add_tree_options, tree_spec_from_args

NAME = "init"
HELP = "write a randomly initialised tree model with a dense model's shape, to train from scratch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="dense model directory (config.json) or Hub id giving the shape")
    parser.add_argument("out", metavar="OUT", help="output directory")
    add_tree_options(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config field of SRC (repeatable; values read as JSON where they parse)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..workflows import init_checkpoint
    from ..workflows.init import parse_overrides

    summary = init_checkpoint(args.src, args.out, tree_spec_from_args(args), config_overrides=parse_overrides(args.overrides),
                              seed=args.seed, revision=args.revision, overwrite=args.overwrite)
    print(f"wrote {summary['output']}: {summary['parameters']:,} parameters, "
          f"{summary['active_unit_fraction']:.2%} of the MLP units active per token, random weights (seed {args.seed})")
    return 0
