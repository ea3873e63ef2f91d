"""Configs of the sparse models: the base architecture's config plus the sparse MLP spec.

Each architecture gets its own `model_type` (`treeffn_llama`, ...). Keeping the base type would let
transformers load a checkpoint as a dense model with randomly initialised MLPs whenever remote code
is not trusted.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from huggingface_hub.dataclasses import strict

from .base_architectures import BASE_ARCHITECTURES, BaseArchitecture
from .layer_spec import LayerSpec, spec_from_dict

# Per-layer values kept beside the shared spec: a forest shape per layer (the shape search picks
# each layer's own), a pruned tree's live leaves, and an MGS model's allocated densities (greedy
# budget allocation gives each layer its own). Shapes apply first: live leaves refer to them.
LAYER_SHAPES = "layer_shapes"
LAYER_LIVE_LEAVES = "layer_live_leaves"
LAYER_DENSITIES = "layer_densities"
_PER_LAYER = {LAYER_SHAPES: None, LAYER_LIVE_LEAVES: "live_leaves", LAYER_DENSITIES: "density"}
_ATTENTION_ONLY = "mlp."  # tensor-parallel plans of the base configs name the dense MLP projections


def _without_mlp(plan: dict[str, str] | None) -> dict[str, str] | None:
    if plan is None:
        return None
    return {key: value for key, value in plan.items() if _ATTENTION_ONLY not in key}


class SparseConfigMixin:
    """Accessors shared by every sparse config. The fields themselves are declared per class,
    because transformers configs are dataclasses and fields must be annotated on the class."""

    sparse_mlp: dict[str, Any] | None
    base_model_type: str | None

    @property
    def sparse_spec(self) -> LayerSpec:
        if not self.sparse_mlp:
            raise ValueError(
                f"{type(self).__name__} has no `sparse_mlp` spec; build sparse models with "
                "treeffn_hf.convert(...) or from a saved treeffn checkpoint"
            )
        return spec_from_dict({k: v for k, v in self.sparse_mlp.items() if k not in _PER_LAYER})

    def sparse_spec_for_layer(self, index: int) -> LayerSpec:
        """The spec of decoder layer `index`: the shared spec, with that layer's own forest shape
        (searched trees), live leaves (pruned trees) or density (allocated MGS budgets) where the
        config lists them."""
        spec = self.sparse_spec
        for key, field in _PER_LAYER.items():
            per_layer = self.sparse_mlp.get(key)
            if per_layer is None:
                continue
            if len(per_layer) != self.num_hidden_layers:
                raise ValueError(f"{key} lists {len(per_layer)} layers, the model has {self.num_hidden_layers}")
            fields = per_layer[index] if field is None else {field: per_layer[index]}
            spec = dataclasses.replace(spec, **fields)
        return spec


def _sparse_config_class(base: BaseArchitecture) -> type:
    """`TreeFFN<Base>Config`: the dense config plus the sparse MLP spec, under its own model_type."""
    module = importlib.import_module(f"transformers.models.{base.model_type}.configuration_{base.model_type}")
    dense = getattr(module, base.dense_class_name("Config"))
    name = base.sparse_class_name("Config")
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{dense.__name__} with a sparse MLP spec (`sparse_mlp`).",
        "__annotations__": {"sparse_mlp": "dict | None", "base_model_type": "str | None"},
        "model_type": base.sparse_model_type,
        "base_model_tp_plan": _without_mlp(dense.base_model_tp_plan),
        "sparse_mlp": None,
        "base_model_type": base.model_type,
    }
    return strict(type(name, (SparseConfigMixin, dense), namespace))


# Module attributes by name (`TreeFFNLlamaConfig`, ...): saved checkpoints' auto_map refers to them.
SPARSE_CONFIG_CLASSES: dict[str, type] = {base.model_type: _sparse_config_class(base) for base in BASE_ARCHITECTURES}
globals().update({cls.__name__: cls for cls in SPARSE_CONFIG_CLASSES.values()})
