"""The map from a config's `model_type` to its declaration (`modeling/base_architectures.py`) and
sparse classes, with the errors for architectures we cannot convert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

from .modeling.base_architectures import BASE_ARCHITECTURES, BaseArchitecture
from .modeling.configuration_treeffn import SPARSE_CONFIG_CLASSES
from .modeling.modeling_treeffn import SPARSE_MODEL_CLASSES


class UnsupportedArchitectureError(ValueError):
    """The model is not one of the dense gated-MLP architectures treeffn_hf can convert."""


@dataclass(frozen=True)
class Architecture:
    """A declared base architecture (`modeling/base_architectures.py`) with its sparse classes."""

    base: BaseArchitecture
    sparse_config_class: type
    sparse_causal_lm_class: type
    sparse_base_model_class: type  # the decoder without the LM head, for AutoModel

    @classmethod
    def of(cls, base: BaseArchitecture) -> "Architecture":
        classes = SPARSE_MODEL_CLASSES[base.model_type]
        return cls(base, SPARSE_CONFIG_CLASSES[base.model_type],
                   classes[base.sparse_class_name("ForCausalLM")], classes[base.sparse_class_name("Model")])

    def __getattr__(self, name: str) -> Any:  # model_type, layers_path, mlp_attr, gate_proj, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def layer_list(self, model: Any) -> Any:
        """The model's own `ModuleList` of decoder layers (assigning into it swaps a layer)."""
        layers = model
        for attr in self.layers_path.split("."):
            layers = getattr(layers, attr)
        return layers

    def decoder_layers(self, model: Any) -> list:
        return list(self.layer_list(model))

    def mlp_key_prefix(self, layer_index: int) -> str:
        return f"{self.layers_path}.{layer_index}.{self.mlp_attr}."


ARCHITECTURES: dict[str, Architecture] = {base.model_type: Architecture.of(base) for base in BASE_ARCHITECTURES}
SPARSE_ARCHITECTURES: dict[str, Architecture] = {arch.sparse_model_type: arch for arch in ARCHITECTURES.values()}

_WHY_NOT = {
    "moe": "mixture-of-experts models already route their MLPs; convert a dense model instead",
    "gpt2": "GPT-2 uses an ungated GELU MLP (c_fc/c_proj), not gate/up/down projections",
}


def supported_model_types() -> str:
    return ", ".join(sorted(ARCHITECTURES)) + " (SmolLM2 is a llama)"


def layout_of(config: PreTrainedConfig) -> Architecture:
    """The declaration of a dense or an already converted config: where its layers and MLPs live."""
    sparse = SPARSE_ARCHITECTURES.get(getattr(config, "model_type", None))
    return sparse if sparse is not None else architecture_for(config)


def architecture_for(config: PreTrainedConfig) -> Architecture:
    """The declaration for a dense config; a clear error naming what is supported otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in SPARSE_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"this model is already sparse ({model_type}); convert its dense base model instead"
        )
    reason = ""
    if model_type and ("moe" in model_type or model_type in ("mixtral", "dbrx", "deepseek_v3")):
        reason = f" ({_WHY_NOT['moe']})"
    elif model_type in _WHY_NOT:
        reason = f" ({_WHY_NOT[model_type]})"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {model_type!r}{reason}; supported: {supported_model_types()}"
    )
