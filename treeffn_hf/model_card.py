"""Model card (README.md) for a saved sparse checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformers import PreTrainedModel

_METHOD_NAMES = {"tree": "tree-structured FFN (hard hierarchical routing)", "mgs": "micro-gated MLP (MGS)"}


def render_model_card(model: PreTrainedModel, base_model: Optional[str] = None, origin: Optional[str] = None) -> str:
    """`origin`: how the model came to be, where it was not converted from `base_model`."""
    config = model.config
    spec = dict(config.sparse_mlp)
    method = spec.get("method")
    cost = model.sparse_cost()
    front = ["---", "library_name: transformers", "tags:", "- treeffn", "- sparse-mlp", f"- {method}"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {config.model_type} ({_METHOD_NAMES.get(method, method)})",
        "",
        origin or (f"Every MLP block of the dense `{config.base_model_type}` model"
                   + (f" `{base_model}`" if base_model else "")
                   + f" was replaced by a {_METHOD_NAMES.get(method, method)} with treeffn_hf."),
        "",
        "| property | value |",
        "| --- | --- |",
        f"| base model | {base_model or 'unknown'} |",
        f"| method | {method} |",
        f"| decoder layers | {config.num_hidden_layers} |",
        f"| active MLP units per token | {cost.unit_fraction:.2%} |",
        f"| MLP weight bytes read per token | {cost.weight_fraction:.2%} of the dense MLP |",
        "",
        *_threshold_note(spec),
        *_runtime_copies_note(model),
        "Layer spec (as stored in `config.sparse_mlp`):",
        "",
        "```json",
        json.dumps(spec, indent=2),
        "```",
        "",
        "## Use",
        "",
        "The modelling code ships with the checkpoint; treeffn_hf need not be installed.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(REPO_OR_PATH, trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


def _threshold_note(spec: dict) -> list[str]:
    if spec.get("method") == "mgs" and spec.get("selection") == "threshold":
        return ["Threshold selection activates an input-dependent number of units; the figures above", "are the calibrated target.", ""]
    return []


def _runtime_copies_note(model: PreTrainedModel) -> list[str]:
    from .modeling.dispatch import runtime_copy_bytes

    mlps = [mlp for _, mlp in model.sparse_mlps()]
    copies = {device: sum(runtime_copy_bytes(mlp)[device] for mlp in mlps) for device in ("cuda", "cpu")}
    if not any(copies.values()):
        return []
    weights = sum(t.numel() * t.element_size() for mlp in mlps for t in [*mlp.parameters(), *mlp.buffers()])
    return [f"Memory: inference keeps copies of some MLP weights in the layout its kernels read, made at first use: "
            f"{copies['cuda'] / weights:.0%} of the MLP weight bytes on CUDA (down_proj transposed), "
            f"{copies['cpu'] / weights:.0%} on the CPU (`treeffn info` gives the sizes).", ""]


def write_model_card(directory: Path, model: PreTrainedModel, base_model: Optional[str] = None,
                     origin: Optional[str] = None) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(model, base_model, origin), encoding="utf-8")
    return path
