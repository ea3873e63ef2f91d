"""What the vLLM plugin refuses, checked from the config alone (no vLLM needed: `treeffn serve`
runs it before it starts the server, the plugin again when vLLM builds the model)."""

from __future__ import annotations

from typing import Optional

import torch

from ..modeling.layer_spec import InvalidSpecError
from .vllm_plugin import SERVED_ARCHITECTURES


def serving_refusal(config) -> Optional[str]:
    """A one-line reason why vLLM cannot serve a checkpoint of this config, or None."""
    from ..modeling.modeling_treeffn import build_sparse_mlp

    if not getattr(config, "sparse_mlp", None):
        return "not a treeffn checkpoint (its config has no sparse_mlp)"
    architectures = getattr(config, "architectures", None) or []
    unknown = [a for a in architectures if a not in SERVED_ARCHITECTURES]
    if not architectures or unknown:
        return f"architectures {architectures} are not served; the plugin serves {sorted(SERVED_ARCHITECTURES)}"
    if getattr(config, "quantization_config", None):
        return "quantized treeffn checkpoints are not served: the sparse MLPs read their own weight formats"
    try:
        with torch.device("meta"):
            for index in range(config.num_hidden_layers):
                build_sparse_mlp(config, index)
    except (InvalidSpecError, ValueError, KeyError) as error:
        return f"the sparse MLP cannot be built: {error}"
    return None
