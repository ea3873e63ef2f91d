"""Convert a dense checkpoint (local directory, Hub id, or GGUF file) into a sparse one.

The output is written to a temporary directory beside OUT and renamed into place at the end, so
an interrupted run leaves no OUT. The source checkpoint is only read.
"""

from __future__ import annotations

import argparse

from .layer_options import add_layer_options, spec_from_args

NAME = "convert"
HELP = "convert a dense model to a tree-FFN or micro-gated sparse model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="dense model: local directory or Hub id")
    parser.add_argument("out", metavar="OUT", help="output directory for the sparse checkpoint")
    add_layer_options(parser)
    parser.add_argument("--gguf-file", default=None, help="load SRC/GGUF_FILE (dequantized) instead of safetensors")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="after saving, push OUT to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..workflows import convert_checkpoint

    report = convert_checkpoint(
        args.src, args.out, spec_from_args(args),
        gguf_file=args.gguf_file, dtype=args.dtype, revision=args.revision, overwrite=args.overwrite,
        push_to_hub=args.push_to_hub, private=args.private, progress=not args.no_progress,
    )
    print(report.summary())
    return 0
