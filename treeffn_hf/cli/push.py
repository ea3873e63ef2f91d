"""Push a converted checkpoint to the Hugging Face Hub.

DIR is first loaded in a fresh interpreter without treeffn_hf, with trust_remote_code=True, the
way users will load it. Only if that works is the repo created and the folder uploaded.
"""

from __future__ import annotations

import argparse

NAME = "push"
HELP = "verify a converted checkpoint loads without treeffn_hf, then upload it to the Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="converted checkpoint directory")
    parser.add_argument("repo", metavar="REPO", help="Hub repo id, e.g. user/smollm2-135m-tree")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")


def run(args: argparse.Namespace) -> int:
    from ..hub import push

    url = push(args.directory, args.repo, private=args.private, token=args.token)
    print(f"pushed {args.directory} to {args.repo}: {url}")
    return 0
