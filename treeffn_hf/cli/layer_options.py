"""Command-line options that describe a sparse layer, shared by every subcommand that builds one."""

from __future__ import annotations

import argparse

from ..modeling.layer_spec import (
    ACTIVATION_PLACEMENTS,
    LEAF_NEURONS,
    MGS_DOWN_FORMATS,
    MGS_PREDICTORS,
    MGS_SELECTIONS,
    ROUTING_MODES,
    LayerSpec,
    MGSSpec,
    TreeSpec,
)

_TREE_DEFAULTS = TreeSpec()
_MGS_DEFAULTS = MGSSpec()


def _rank(value: str):
    return None if value == "full" else int(value)


def add_tree_options(parser: argparse.ArgumentParser, title: str = "tree options") -> None:
    tree = parser.add_argument_group(title)
    tree.add_argument("--num-trees", type=int, default=_TREE_DEFAULTS.num_trees)
    tree.add_argument("--depth", type=int, default=_TREE_DEFAULTS.depth, help="levels of internal nodes per tree")
    tree.add_argument("--node-width", type=int, default=_TREE_DEFAULTS.node_width,
                      help="neurons per internal node (0: pure routing hyperplanes)")
    tree.add_argument("--leaf-width", type=int, default=None, help="neurons per leaf (default: widest that fits)")
    tree.add_argument("--shared-width", type=int, default=None,
                      help="always-on neurons (default: the neurons left over after the trees)")
    tree.add_argument("--routing", choices=ROUTING_MODES, default=_TREE_DEFAULTS.routing)
    tree.add_argument("--activation", choices=ACTIVATION_PLACEMENTS, default=_TREE_DEFAULTS.activation,
                      help="nonlinearity per node, or after summing the path (the balancing tweak)")
    tree.add_argument("--leaf-neurons", choices=LEAF_NEURONS, default=_TREE_DEFAULTS.leaf_neurons,
                      help="partition: every dense neuron in one block; selected: each leaf holds copies of the "
                           "neurons its tokens need (leaves may share them, so more leaves store more rows; "
                           "`treeffn distill` picks them; needs --routing hyperplane)")


def add_layer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=("tree", "mgs"), required=True, help="which sparse layer replaces each MLP")
    add_tree_options(parser, "tree options (--method tree)")
    mgs = parser.add_argument_group("micro-gated options (--method mgs)")
    mgs.add_argument("--density", type=float, default=_MGS_DEFAULTS.density, help="fraction of neurons computed")
    mgs.add_argument("--predictor", choices=MGS_PREDICTORS, default=_MGS_DEFAULTS.predictor,
                     help="quantized: 4-bit copies of gate/up, no training; linear: a gate for `treeffn distill` to train")
    mgs.add_argument("--group-size", type=int, default=_MGS_DEFAULTS.group_size,
                     help="quantized predictor: weights per bf16 scale and zero")
    mgs.add_argument("--down-format", choices=MGS_DOWN_FORMATS, default=_MGS_DEFAULTS.down_format,
                     help="nested predictor: down_proj as int8 rows (a kernel reads only the selected ones) or bf16")
    mgs.add_argument("--rank", type=_rank, default=_MGS_DEFAULTS.rank,
                     help="linear predictor: gate rank, or 'full' for Linear(d, H)")
    mgs.add_argument("--selection", choices=MGS_SELECTIONS, default=_MGS_DEFAULTS.selection,
                     help="top_k here; `treeffn distill` calibrates thresholds, the better selection")


def spec_from_args(args: argparse.Namespace) -> LayerSpec:
    """The spec the options describe, validated as far as it can be without the model."""
    if args.method == "tree":
        return tree_spec_from_args(args)
    spec = MGSSpec(density=args.density, predictor=args.predictor, rank=args.rank, group_size=args.group_size,
                   selection=args.selection, down_format=args.down_format)
    spec.validate()
    return spec


def tree_spec_from_args(args: argparse.Namespace) -> TreeSpec:
    spec = TreeSpec(
        num_trees=args.num_trees, depth=args.depth, node_width=args.node_width, leaf_width=args.leaf_width,
        routing=args.routing, activation=args.activation, shared_width=args.shared_width,
        leaf_neurons=args.leaf_neurons,
    )
    spec.validate()
    return spec
