"""Sparse-MLP variants of the Llama-family causal LMs.

Each architecture of `base_architectures` gets three classes, made from its transformers classes: a
`*PreTrainedModel` base that knows how to initialise the sparse layers, the inner `*Model` whose
decoder layers carry a sparse MLP, and the `*ForCausalLM`.
transformers 5 runs `_init_weights` of the nearest nested `PreTrainedModel`, so the inner model
must inherit the sparse-aware base too, or raw parameters come back uninitialised.

This file is copied into every saved checkpoint: relative imports are `from .x import y` only.
"""

from __future__ import annotations

import importlib
from typing import Iterator

from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN

from .base_architectures import BASE_ARCHITECTURES, BaseArchitecture
from .configuration_treeffn import SPARSE_CONFIG_CLASSES
from .dispatch import initial_policy
from .layer_spec import InvalidSpecError
from .mgs_layer import MicroGatedMLP
from .sparse_cost import SparseCost
from .tree_layer import TreeFFN

# Dispatch on the `method` / `sparse_method` strings, never on isinstance: with remote code,
# transformers may execute a bundle file more than once, so the same class can exist twice.


def build_sparse_mlp(config, layer_index: int = 0) -> nn.Module:
    """The sparse MLP that `config.sparse_mlp` describes for decoder layer `layer_index`, with
    uninitialised weights."""
    spec = config.sparse_spec_for_layer(layer_index)
    act_fn = ACT2FN[config.hidden_act]
    bias = bool(getattr(config, "mlp_bias", False))
    if spec.method == "tree":
        if bias:
            raise InvalidSpecError("tree conversion of MLPs with biases (mlp_bias=True) is not supported")
        layer = TreeFFN(config.hidden_size, config.intermediate_size, spec, act_fn)
    elif spec.method == "mgs":
        layer = MicroGatedMLP(config.hidden_size, config.intermediate_size, spec, act_fn, bias=bias)
    else:
        raise InvalidSpecError(f"unsupported sparse spec {spec!r}")
    layer.kernel_policy = initial_policy(getattr(config, "kernel_policy", None))
    return layer


# Parameter names (as transformers matches them) that a nested MGS model keeps in float32.
FLOAT32_WEIGHTS_OF_NESTED_MGS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def is_sparse_mlp(module: nn.Module) -> bool:
    return getattr(module, "sparse_method", None) in ("tree", "mgs")


class SparseMLPPreTrainedMixin:
    """Weight init for the sparse layers and accounting helpers shared by all architectures."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", 0.02)
        method = getattr(module, "sparse_method", None)
        if method == "tree":
            for name in ("gate_rows", "up_rows", "down_rows", "router_weight"):
                param = getattr(module, name)
                if param is not None:
                    init.normal_(param, mean=0.0, std=std)
            if module.router_bias is not None:
                init.zeros_(module.router_bias)
        elif method == "mgs":
            init.zeros_(module.gate_threshold)

    def _decoder(self) -> PreTrainedModel:
        return self.model if hasattr(self, "model") and isinstance(self.model, PreTrainedModel) else self

    def save_pretrained(self, *args, **kwargs):
        # transformers writes only the saved class's own auto_map entry; AutoModel must find the
        # decoder in the same bundle (vLLM's Transformers backend loads it that way).
        decoder = type(self._decoder())
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                "AutoModel": f"{decoder.__module__.rsplit('.', 1)[-1]}.{decoder.__name__}"}
        return super().save_pretrained(*args, **kwargs)

    def sparse_mlps(self) -> Iterator[tuple[int, nn.Module]]:
        """(layer index, sparse MLP) for every decoder layer."""
        for index, layer in enumerate(self._decoder().layers):
            if is_sparse_mlp(layer.mlp):
                yield index, layer.mlp

    def set_kernel_policy(self, **fields) -> None:
        """Set these `KernelPolicy` fields (`path`, the switch points) in every sparse MLP, and in
        the config, so that a saved model keeps them. Keywords, not a KernelPolicy, because a
        model loaded with trust_remote_code has its own copy of that class."""
        for _, mlp in self.sparse_mlps():
            mlp.kernel_policy = mlp.kernel_policy.replace(**fields)
        self.config.kernel_policy = {**(getattr(self.config, "kernel_policy", None) or {}), **fields}

    def sparse_cost(self) -> SparseCost:
        """Per-token active fraction of MLP units and weights, summed over all layers."""
        return SparseCost.total(mlp.cost() for _, mlp in self.sparse_mlps())


def _install_sparse_mlps(model: nn.Module, config) -> None:
    for index, layer in enumerate(model.layers):
        layer.mlp = build_sparse_mlp(config, index)


def _init_causal_lm(self: PreTrainedModel, config, inner_model_cls: type) -> None:
    # Mirrors the stock `*ForCausalLM.__init__` (model, vocab_size, lm_head) without first
    # building a dense body that would be thrown away; tests compare the module trees.
    PreTrainedModel.__init__(self, config)
    self.model = inner_model_cls(config)
    self.vocab_size = config.vocab_size
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()


class SparseDecoderMixin:
    """The inner `*Model`: the stock decoder with every MLP swapped for its sparse layer."""

    def __init__(self, config) -> None:
        super().__init__(config)
        _install_sparse_mlps(self, config)
        # Loaded with dtype=bfloat16, the nested MGS layer keeps its weights in float32: its 8-bit grid
        # has values bf16 cannot hold. Its kernels read their own packed copies, so no bytes are added.
        if any(getattr(layer.mlp, "keeps_float32_weights", False) for layer in self.layers):
            self._keep_in_fp32_modules_strict = list(FLOAT32_WEIGHTS_OF_NESTED_MGS)
        self.post_init()


class SparseCausalLMMixin:
    decoder_class: type  # the architecture's sparse `*Model`

    def __init__(self, config) -> None:
        _init_causal_lm(self, config, self.decoder_class)


def _sparse_model_classes(base: BaseArchitecture) -> dict[str, type]:
    """`TreeFFN<Base>PreTrainedModel`, `...Model` and `...ForCausalLM` of one architecture, by name."""
    dense = importlib.import_module(f"transformers.models.{base.model_type}.modeling_{base.model_type}")

    def make(suffix: str, bases: tuple, **attributes) -> type:
        name = base.sparse_class_name(suffix)
        dense_class = getattr(dense, base.dense_class_name(suffix))
        return type(name, (*bases, dense_class), {"__module__": __name__, "__qualname__": name, **attributes})

    pretrained = make("PreTrainedModel", (SparseMLPPreTrainedMixin,),
                      config_class=SPARSE_CONFIG_CLASSES[base.model_type])
    decoder = make("Model", (SparseDecoderMixin, pretrained))
    causal_lm = make("ForCausalLM", (SparseCausalLMMixin, pretrained), decoder_class=decoder)
    return {cls.__name__: cls for cls in (pretrained, decoder, causal_lm)}


# Module attributes by name (`TreeFFNLlamaForCausalLM`, ...): saved checkpoints' auto_map refers to them.
SPARSE_MODEL_CLASSES: dict[str, dict[str, type]] = {
    base.model_type: _sparse_model_classes(base) for base in BASE_ARCHITECTURES
}
for _classes in SPARSE_MODEL_CLASSES.values():
    globals().update(_classes)
del _classes

__all__ = [name for classes in SPARSE_MODEL_CLASSES.values() for name in classes if "PreTrained" not in name]
__all__ += ["build_sparse_mlp"]
