"""Shared fixtures: tiny random-weight models of every supported architecture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. Triton reads this when a
# kernel is defined, and ours are defined lazily, so setting it here (before any test) suffices.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (registered under its name, as its own
    imports of `common` and friends expect)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

_COMMON = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=166,  # odd on purpose: tree widths must be fitted, not assumed
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_MODELS = {
    "llama": (LlamaForCausalLM, lambda **kw: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **kw})),
    "mistral": (MistralForCausalLM, lambda **kw: MistralConfig(**{**_COMMON, "sliding_window": None, **kw})),
    "qwen2": (Qwen2ForCausalLM, lambda **kw: Qwen2Config(**{**_COMMON, **kw})),
    "qwen3": (Qwen3ForCausalLM, lambda **kw: Qwen3Config(**{**_COMMON, "head_dim": 16, **kw})),
}


def tiny_dense_model(model_type: str, seed: int = 0, **config: object) -> torch.nn.Module:
    """A tiny random model of `model_type`; `config` overrides the shared tiny shapes."""
    model_cls, make_config = TINY_MODELS[model_type]
    torch.manual_seed(seed)
    model = model_cls(make_config(**config)).eval()
    # Stock init (std 0.02) makes every MLP output tiny; scale up so sparsity visibly matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name:
                param.mul_(10.0)
    return model


def char_tokenizer():
    """A real (character-level) fast tokenizer over the tiny models' 100-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i): 3 + i for i in range(90)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def run_python(code: str, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the way a user without our process state would)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(1234)


def assert_fast_path_matches_reference(layer: torch.nn.Module, x: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Run `layer` on its reference and its sparse torch path; they must agree. Returns the output."""
    with torch.no_grad():
        layer.force_path = "reference"
        want = layer(x)
        layer.force_path = "torch"
        got = layer(x)
    assert layer.last_path == "torch"
    layer.force_path = None
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return want
