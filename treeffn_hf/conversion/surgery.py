"""Dense -> sparse model surgery.

`convert` validates the spec against the model before touching any weight, builds the sparse
model on the meta device, and fills it with the dense weights: unchanged for everything but the
MLPs, which are re-laid out for the chosen sparse layer. The input model is never modified and
shares no storage with the result, so it can serve as the distillation teacher.
`init_model` builds the same tree model with random weights, for training from scratch.
"""

from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from ..architectures import Architecture, architecture_for
from ..modeling.configuration_treeffn import LAYER_SHAPES
from ..modeling.layer_spec import InvalidSpecError, LayerSpec, MGSSpec, TreeSpec, spec_from_dict
from ..modeling.mgs_predictors import QuantizedPredictor, snap_down, snap_gate_up
from .partition import partition_neurons, selected_leaves_from_partition


def convert(
    model: PreTrainedModel, spec: Union[LayerSpec, dict, Sequence[TreeSpec]], *, progress: bool = True
) -> PreTrainedModel:
    """Return a sparse copy of `model` with every MLP replaced by the layer `spec` describes.

    `spec` is a `TreeSpec`, an `MGSSpec`, or their `to_dict()` form; or one `TreeSpec` per decoder
    layer (each layer its own forest shape, as the shape search chooses; kept in the config's
    `layer_shapes`). Raises `UnsupportedArchitectureError` or `InvalidSpecError` before any work if
    the model or spec cannot be converted.
    """
    arch = architecture_for(model.config)
    dense_config = model.config
    layer_specs = _per_layer_specs(dense_config, spec)
    resolved = layer_specs[0]

    config = sparse_config_for(arch, dense_config, resolved)
    if len(set(layer_specs)) > 1:
        config.sparse_mlp = {**config.sparse_mlp, LAYER_SHAPES: [s.shape() for s in layer_specs]}
    with torch.device("meta"):
        sparse = arch.sparse_causal_lm_class(config)

    state = _copy_state(model)
    dense_layers = arch.decoder_layers(model)
    for index, layer in enumerate(tqdm(dense_layers, desc=f"converting MLPs to {resolved.method}", disable=not progress)):
        prefix = arch.mlp_key_prefix(index)
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        mlp = getattr(layer, arch.mlp_attr)
        dense = (getattr(mlp, arch.gate_proj), getattr(mlp, arch.up_proj), getattr(mlp, arch.down_proj))
        state.update({prefix + k: v for k, v in sparse_mlp_state(layer_specs[index], *dense).items()})

    sparse.load_state_dict(state, strict=True, assign=True)
    _copy_non_persistent_buffers(model, sparse)
    sparse.tie_weights()
    sparse.generation_config = copy.deepcopy(model.generation_config)
    sparse.train(model.training)
    return sparse


def init_model(dense_config, spec: Union[TreeSpec, dict], *, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tree model with the shape of `dense_config`, for training from scratch.

    Every MLP becomes the tree `spec` describes; the rest of the model is initialised as the dense
    architecture would be (`initializer_range`). Trees only: a micro-gated layer predicts from a
    trained dense MLP, so train the dense model and convert it instead.
    """
    if isinstance(spec, dict):
        spec = spec_from_dict(spec)
    if not isinstance(spec, TreeSpec):
        raise InvalidSpecError("init builds tree models; a micro-gated MLP predicts from trained dense weights, "
                               "so train the dense model and `treeffn convert --method mgs` it")
    arch = architecture_for(dense_config)
    resolved = check_convertible(dense_config, spec)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = arch.sparse_causal_lm_class(sparse_config_for(arch, dense_config, resolved))
    model.generation_config = GenerationConfig.from_model_config(dense_config)
    return model


def _per_layer_specs(dense_config, spec) -> list[LayerSpec]:
    """Every layer's resolved spec; a sequence must give one tree spec per decoder layer."""
    if isinstance(spec, (list, tuple)):
        if len(spec) != dense_config.num_hidden_layers:
            raise InvalidSpecError(f"{len(spec)} layer specs for a model of {dense_config.num_hidden_layers} layers")
        if not all(isinstance(s, TreeSpec) for s in spec):
            raise InvalidSpecError("per-layer specs are tree shapes: every entry must be a TreeSpec")
        return [check_convertible(dense_config, s) for s in spec]
    return [check_convertible(dense_config, spec)] * dense_config.num_hidden_layers


def check_convertible(dense_config, spec: Union[LayerSpec, dict]) -> LayerSpec:
    """Every check that needs only the dense config; returns the spec resolved against it."""
    if isinstance(spec, dict):
        spec = spec_from_dict(spec)
    architecture_for(dense_config)
    resolved = spec.resolve(dense_config.hidden_size, dense_config.intermediate_size)
    if isinstance(resolved, TreeSpec) and getattr(dense_config, "mlp_bias", False):
        raise InvalidSpecError("tree conversion of MLPs with biases (mlp_bias=True) is not supported")
    if isinstance(resolved, TreeSpec) and resolved.is_pruned:
        raise InvalidSpecError(
            "live_leaves comes from pruning a trained tree (treeffn prune), not from conversion: a dense "
            "MLP converts to a complete tree"
        )
    if isinstance(resolved, MGSSpec) and resolved.selection == "threshold":
        # An uncalibrated threshold of 0 would select about half the neurons while the spec
        # (and every reported fraction) claims `density`.
        raise InvalidSpecError(
            "selection='threshold' needs per-layer thresholds calibrated on data, which plain "
            "conversion does not do; convert with selection='top_k', then `treeffn distill --selection threshold`"
        )
    return resolved


def sparse_config_for(arch: Architecture, dense_config, spec: LayerSpec):
    values = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version"):
        values.pop(key, None)
    values["sparse_mlp"] = spec.to_dict()
    values["base_model_type"] = arch.model_type
    config = arch.sparse_config_class(**values)
    config.architectures = [arch.sparse_causal_lm_class.__name__]
    return config


def sparse_mlp_state(spec: LayerSpec, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> dict[str, torch.Tensor]:
    """State dict of one sparse MLP (keys relative to the MLP), built from its dense projections."""
    if isinstance(spec, MGSSpec):
        return _mgs_state(spec, gate, up, down)
    return _tree_state(spec, gate, up, down)


def _mgs_state(spec: MGSSpec, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> dict[str, torch.Tensor]:
    state = {}
    for name, linear in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        state[f"{name}.weight"] = linear.weight.detach().clone()
        if linear.bias is not None:
            state[f"{name}.bias"] = linear.bias.detach().clone()
    dtype = gate.weight.dtype
    if spec.predictor in ("nested", "quantized"):
        predictor = QuantizedPredictor.state_from(gate.weight, up.weight, spec.group_size)
        state.update({f"micro_gate.{k}": v for k, v in predictor.items()})
        if spec.predictor == "nested":  # the stored grids: 8-bit gate/up around the codes, int8 or bf16 down
            state["gate_proj.weight"], state["up_proj.weight"] = snap_gate_up(gate.weight, up.weight, predictor)
            state["down_proj.weight"] = snap_down(down.weight, spec.down_format, spec.group_size).clone()
    else:
        # Start the linear gate as the best rank-r approximation of gate_proj: its top-k then
        # picks the neurons with the largest gate pre-activation, a far better start than random.
        weight = gate.weight.detach().float()
        if spec.rank is None:
            state["micro_gate.scorer.weight"] = weight.to(dtype).clone()
        else:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = s[: spec.rank].sqrt()
            state["micro_gate.encoder.weight"] = (root[:, None] * vh[: spec.rank]).to(dtype)
            state["micro_gate.scorer.weight"] = (u[:, : spec.rank] * root[None, :]).to(dtype)
        state["micro_gate.scorer.bias"] = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    state["gate_threshold"] = torch.zeros((), dtype=dtype, device=gate.weight.device)
    return state


def _tree_state(spec: TreeSpec, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> dict[str, torch.Tensor]:
    g, u, d = gate.weight.detach(), up.weight.detach(), down.weight.detach()
    # The partition is host-side bookkeeping (index tensors built on the CPU): run it on CPU
    # copies, then gather on the weights' own device, so models already on a GPU convert too.
    if spec.leaf_neurons == "selected":
        layout = selected_leaves_from_partition(g.cpu(), u.cpu(), d.cpu(), spec)
    else:
        layout = partition_neurons(g.cpu(), u.cpu(), d.cpu(), spec)
    # Row order of the tree's tables: nodes (tree-major, heap order), leaves, shared.
    parts = [layout.leaf_index.reshape(-1), layout.shared_index]
    if layout.node_index is not None:
        parts.insert(0, layout.node_index.reshape(-1))
    order = torch.cat(parts).to(g.device)
    state = {
        "gate_rows": g[order].contiguous(),
        "up_rows": u[order].contiguous(),
        "down_rows": d.T[order].contiguous(),  # one row per neuron, so each block is contiguous
    }
    if spec.routing == "hyperplane":
        state["router_weight"] = layout.router.to(g.device, g.dtype)
        state["router_bias"] = torch.zeros(layout.router.shape[:2], dtype=g.dtype, device=g.device)
    return state


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clone the state dict, keeping tensors that share storage (tied weights) shared."""
    clones: dict[tuple, torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if identity not in clones:
            clones[identity] = tensor.detach().clone()
        state[key] = clones[identity]
    return state


def _copy_non_persistent_buffers(source: nn.Module, target: nn.Module) -> None:
    # load_state_dict skips non-persistent buffers (rotary inv_freq), which are still on meta.
    for name, buffer in target.named_buffers():
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            value = source.get_buffer(name).detach().clone()
            target.get_submodule(module_name)._buffers[buffer_name] = value
