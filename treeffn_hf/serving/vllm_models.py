"""treeffn models for vLLM: vLLM's own model of each declared architecture with the MLPs swapped.

Attention, KV cache, rotary, norms, embeddings and the LM head are vLLM's, unchanged. Each decoder
layer's MLP becomes the sparse layer the checkpoint's config describes (`build_sparse_mlp`, the
same module transformers runs), and its weights load from our safetensors names as they are.

The sparse MLP runs as one opaque `torch.library` custom op (`treeffn::sparse_mlp`), looked up by
layer name in vLLM's forward context as vLLM does for attention: torch.compile (vLLM's default on
CPU and GPU) then traces around it instead of into its data-dependent routing. Inside the op the
layer's own dispatch runs: the Triton kernels on CUDA, the C kernel or the sparse PyTorch path on
the CPU.

Under tensor parallelism the sparse MLPs are replicated, not sharded: every rank computes the whole
MLP, which is what the decoder layer expects after the dense MLP's all-reduce.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import PPMissingLayer

from ..architectures import layout_of
from ..modeling.base_architectures import BASE_ARCHITECTURES, BaseArchitecture
from ..modeling.modeling_treeffn import build_sparse_mlp
from .checks import serving_refusal


@torch.library.custom_op("treeffn::sparse_mlp", mutates_args=())
def sparse_mlp(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    mlp = get_forward_context().no_compile_layers[layer_name]
    out = mlp.sparse(hidden_states)
    mlp.paths_run[mlp.sparse.last_path] += 1
    return out


@sparse_mlp.register_fake
def _(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


class VllmSparseMLP(nn.Module):
    """One decoder layer's sparse MLP behind the opaque op; `sparse` is the treeffn layer."""

    def __init__(self, vllm_config: VllmConfig, layer_index: int, prefix: str) -> None:
        super().__init__()
        self.sparse = build_sparse_mlp(vllm_config.model_config.hf_config, layer_index)
        if getattr(self.sparse, "keeps_float32_weights", False):  # as transformers loads it (modeling_treeffn)
            self.sparse.float()
        self.layer_name = prefix
        # What this MLP ran, call by call (`last_path`: "cpu", "cpu:amx", "triton:..."), so that a
        # benchmark can show which kernels served its requests (`paths_run`).
        self.paths_run: Counter = Counter()
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.treeffn.sparse_mlp(hidden_states, self.layer_name)


def paths_run(model: nn.Module, reset: bool = False) -> dict[str, int]:
    """Calls per path over the model's sparse MLPs (`LLM.apply_model(paths_run)` from a benchmark);
    `reset` clears the tallies after reading them."""
    total: Counter = Counter()
    for module in model.modules():
        if isinstance(module, VllmSparseMLP):
            total.update(module.paths_run)
            if reset:
                module.paths_run.clear()
    return dict(total)


class SparseMLPSwap:
    """Mixin for a vLLM CausalLM: swap each local decoder layer's MLP, and load the sparse MLP
    weights by their treeffn names while vLLM's loader takes every other weight."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._swap_mlps(vllm_config, prefix)

    def _swap_mlps(self, vllm_config: VllmConfig, prefix: str) -> None:
        config = vllm_config.model_config.hf_config
        refusal = serving_refusal(config)
        if refusal:
            raise ValueError(refusal)
        self._mlp_prefix = layout_of(config).mlp_key_prefix  # e.g. model.layers.{i}.mlp.
        for index, layer in enumerate(self.model.layers):
            if isinstance(layer, PPMissingLayer):  # another pipeline stage's layer
                continue
            layer.mlp = VllmSparseMLP(vllm_config, index, f"{prefix}{self._mlp_prefix(index)}".rstrip("."))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        local = {self._mlp_prefix(i): layer.mlp.sparse for i, layer in enumerate(self.model.layers)
                 if not isinstance(layer, PPMissingLayer)}
        pending: dict[str, dict[str, torch.Tensor]] = {p: {} for p in local}
        all_mlps = tuple(self._mlp_prefix(i) for i in range(len(self.model.layers)))

        def others():
            for name, tensor in weights:
                owner = next((p for p in all_mlps if name.startswith(p)), None)
                if owner is None:
                    yield name, tensor
                elif owner in pending:  # a pipeline stage skips other stages' MLPs
                    pending[owner][name[len(owner):]] = tensor

        loaded = set(super().load_weights(others()))
        for owner, state in pending.items():
            mlp = local[owner]
            own = mlp.state_dict()
            if set(state) != set(own):
                missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
                raise ValueError(f"{owner}: the checkpoint's sparse MLP weights do not match its config "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            mlp.load_state_dict({key: tensor.to(own[key].dtype) for key, tensor in state.items()})  # vLLM's dtype
            loaded.update(f"{owner}sparse.{key}" for key in state)
        return loaded


def _vllm_sparse_class(base: BaseArchitecture) -> type:
    """`TreeFFN<Base>ForCausalLM`: vLLM's `<Base>ForCausalLM` with its MLPs swapped."""
    dense = getattr(importlib.import_module(f"vllm.model_executor.models.{base.model_type}"),
                    base.dense_class_name("ForCausalLM"))
    name = base.sparse_class_name("ForCausalLM")
    return type(name, (SparseMLPSwap, dense), {"__module__": __name__, "__qualname__": name})


# Module attributes by name: the plugin registers them as `treeffn_hf.serving.vllm_models:<name>`.
globals().update({cls.__name__: cls for cls in map(_vllm_sparse_class, BASE_ARCHITECTURES)})
