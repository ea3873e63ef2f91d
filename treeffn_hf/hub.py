"""Publishing a converted checkpoint to the Hugging Face Hub.

Before anything is uploaded, the directory is loaded the way a user will load it: in a fresh
interpreter where treeffn_hf cannot be imported, with `trust_remote_code=True`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

from .checkpoint import CheckpointError

_LOAD_CHECK = r"""
import sys
sys.modules["treeffn_hf"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
assert torch.isfinite(logits).all(), "non-finite logits"
print(type(model).__name__)
"""


class HubError(RuntimeError):
    """Publishing to the Hub failed; the message says why."""


def verify_loads(directory: Union[str, Path], timeout: float = 900) -> str:
    """Load `directory` without treeffn_hf in a subprocess; return the model class name."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a model directory (no config.json)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_CHECK, str(directory)],
            capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise CheckpointError(f"{directory}: loading it took longer than {timeout:.0f}s") from error
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{directory}: does not load with trust_remote_code ({last})")
    return lines[-1]


def push(
    directory: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload sparse model converted with treeffn_hf",
    verify: bool = True,
) -> str:
    """Verify, then create `repo_id` (if needed) and upload `directory`. Returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    if verify:
        verify_loads(directory)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(directory),
            repo_id=repo_id,
            commit_message=commit_message,
            ignore_patterns=[".*", "__pycache__/*"],
        )
    except Exception as error:
        raise HubError(f"push to {repo_id} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    return str(getattr(info, "commit_url", info))
