"""vLLM's entry point (`vllm.general_plugins` group): register every treeffn architecture.

vLLM calls `register()` in each of its processes before it reads a model config. The model
classes are registered by name (`module:Class`), so vLLM imports them only when a treeffn
checkpoint is served. Importing treeffn_hf registers its configs with transformers' AutoConfig,
so a checkpoint is read without remote code.
"""

from __future__ import annotations

from ..modeling.base_architectures import BASE_ARCHITECTURES

SERVED_ARCHITECTURES = frozenset(base.sparse_class_name("ForCausalLM") for base in BASE_ARCHITECTURES)

def register() -> None:
    from vllm import ModelRegistry

    import treeffn_hf  # noqa: F401  (registers the sparse configs with AutoConfig)

    for architecture in sorted(SERVED_ARCHITECTURES):
        ModelRegistry.register_model(architecture, f"treeffn_hf.serving.vllm_models:{architecture}")
