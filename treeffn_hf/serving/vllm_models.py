"""treeffn models for vLLM: vLLM's own Llama, Mistral, Qwen2 and Qwen3 with the MLPs swapped.

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

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from ..architectures import layout_of
from ..modeling.modeling_treeffn import build_sparse_mlp
from .checks import serving_refusal

# What the sparse MLPs of this process ran, call by call (`last_path`: "cpu", "cpu:amx", "triton:..."),
# so that a benchmark can show which kernels served its requests.
PATHS_RUN: Counter = Counter()


@torch.library.custom_op("treeffn::sparse_mlp", mutates_args=())
def sparse_mlp(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer = get_forward_context().no_compile_layers[layer_name].sparse
    out = layer(hidden_states)
    PATHS_RUN[layer.last_path] += 1
    return out


@sparse_mlp.register_fake
def _(hidden_states: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


class VllmSparseMLP(nn.Module):
    """One decoder layer's sparse MLP behind the opaque op; `sparse` is the treeffn layer."""

    def __init__(self, vllm_config: VllmConfig, layer_index: int, prefix: str) -> None:
        super().__init__()
        self.sparse = build_sparse_mlp(vllm_config.model_config.hf_config, layer_index)
        self.layer_name = prefix
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix}")
        context[prefix] = self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.treeffn.sparse_mlp(hidden_states, self.layer_name)


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


class TreeFFNLlamaForCausalLM(SparseMLPSwap, LlamaForCausalLM):
    pass


class TreeFFNMistralForCausalLM(SparseMLPSwap, MistralForCausalLM):
    pass


class TreeFFNQwen2ForCausalLM(SparseMLPSwap, Qwen2ForCausalLM):
    pass


class TreeFFNQwen3ForCausalLM(SparseMLPSwap, Qwen3ForCausalLM):
    pass
