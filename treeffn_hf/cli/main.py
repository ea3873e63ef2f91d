"""Entry point: builds the parser from the subcommand modules and turns known errors into one line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import convert, demo, distill, evaluate, finetune, info, init, prune, push, serve

SUBCOMMANDS = (convert, distill, finetune, prune, info, evaluate, push, serve, demo, init)


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Attach every subcommand to `parser` (shared by `treeffn` and `optimum-cli treeffn`)."""
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in SUBCOMMANDS:
        sub = subparsers.add_parser(
            module.NAME, help=module.HELP, description=module.__doc__,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(treeffn_handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treeffn",
        description="Turn dense Llama/Qwen checkpoints into tree-FFN or micro-gated sparse models.",
    )
    add_subcommands(parser)
    return parser


def dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    handler = getattr(args, "treeffn_handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print("treeffn: interrupted (outputs are renamed into place only once complete)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the known failures below get one clear line
        if _is_user_error(error):
            print(f"treeffn: error: {error}", file=sys.stderr)
            return 1
        raise


def _is_user_error(error: Exception) -> bool:
    from ..architectures import UnsupportedArchitectureError
    from ..checkpoint import CheckpointError
    from ..hub import HubError
    from ..modeling.layer_spec import InvalidSpecError

    # FloatingPointError: a non-finite loss stopped distillation or fine-tuning (the message says
    # which checkpoint was kept).
    return isinstance(error, (UnsupportedArchitectureError, CheckpointError, HubError, InvalidSpecError,
                              FloatingPointError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    return dispatch(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
