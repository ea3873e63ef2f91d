"""Register the sparse classes with the transformers Auto* factories (in-process and for export)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .architectures import ARCHITECTURES


def register_auto_classes() -> None:
    for arch in ARCHITECTURES.values():
        config_cls, lm_cls = arch.sparse_config_class, arch.sparse_causal_lm_class
        AutoConfig.register(arch.sparse_model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
        AutoModel.register(config_cls, arch.sparse_base_model_class, exist_ok=True)
        # save_pretrained writes auto_map and copies the bundle only for classes marked here.
        config_cls.register_for_auto_class()
        lm_cls.register_for_auto_class("AutoModelForCausalLM")
        arch.sparse_base_model_class.register_for_auto_class("AutoModel")
