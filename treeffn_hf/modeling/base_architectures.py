"""The dense architectures treeffn_hf converts, one declaration each: the only place to edit to add one.

From a declaration come the sparse config (`configuration_treeffn`), the sparse model classes
(`modeling_treeffn`), their vLLM twins (`serving.vllm_models`, `serving.vllm_plugin`) and the
converter's map of where the MLPs live (`treeffn_hf.architectures`). This file is copied into every
saved checkpoint, so it imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseArchitecture:
    """A dense gated-MLP decoder: its transformers `model_type` (also the module name of its
    transformers and vLLM implementations) and the prefix of its class names (`Llama` for
    `LlamaConfig`, `LlamaModel`, `LlamaForCausalLM`), plus where its MLPs live."""

    model_type: str
    class_prefix: str
    layers_path: str = "model.layers"
    mlp_attr: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"

    @property
    def sparse_model_type(self) -> str:
        return f"treeffn_{self.model_type}"

    def sparse_class_name(self, suffix: str) -> str:
        """`TreeFFNLlama` + suffix: `Config`, `Model`, `ForCausalLM`, `PreTrainedModel`."""
        return f"TreeFFN{self.class_prefix}{suffix}"

    def dense_class_name(self, suffix: str) -> str:
        return f"{self.class_prefix}{suffix}"


BASE_ARCHITECTURES: tuple[BaseArchitecture, ...] = (
    BaseArchitecture("llama", "Llama"),  # also SmolLM2
    BaseArchitecture("mistral", "Mistral"),
    BaseArchitecture("qwen2", "Qwen2"),
    BaseArchitecture("qwen3", "Qwen3"),
)
