"""`treeffn info`: a checkpoint's spec, active fractions, bytes read and parameter counts, without
loading its weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Union

import torch

from ..checkpoint import CheckpointError
from ..modeling.sparse_cost import SparseCost


def describe_checkpoint(directory: Union[str, Path]) -> dict:
    """Spec, active fractions and parameter counts of a converted checkpoint, without loading weights."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from ..modeling.configuration_treeffn import LAYER_SHAPES
    from ..modeling.dispatch import inference_paths, runtime_copy_bytes
    from ..modeling.modeling_treeffn import build_sparse_mlp

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: not a model directory (no config.json)")
    try:
        config_data = json.loads((directory / "config.json").read_text())
    except ValueError as error:
        raise CheckpointError(f"{directory}: config.json is not valid JSON ({error})") from error
    if "sparse_mlp" not in config_data:
        raise CheckpointError(f"{directory}: not a treeffn checkpoint (config has no sparse_mlp)")
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):  # every layer: allocated budgets give each its own density
            layers = [build_sparse_mlp(config, index) for index in range(config.num_hidden_layers)]
    except Exception as error:
        raise CheckpointError(f"{directory}: cannot read the sparse config ({type(error).__name__}: {error})") from error
    layer = layers[0]
    cost = SparseCost.total(mlp.cost() for mlp in layers)
    total = mlp = 0
    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        raise CheckpointError(f"{directory}: no safetensors weights")
    for path in weight_files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    count = 1
                    for size in handle.get_slice(key).get_shape():
                        count *= size
                    total += count
                    mlp += count if ".mlp." in key else 0
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable safetensors ({type(error).__name__}: {error})") from error
    return {
        "directory": str(directory),
        "model_type": config.model_type,
        "base_model_type": config.base_model_type,
        "method": config.sparse_mlp["method"],
        "num_layers": config.num_hidden_layers,
        "layer_spec": dict(config.sparse_mlp),
        # Per-layer forests (the shape search's choice): each layer's shape and neurons per token.
        "layer_shapes": [{**mlp.spec.shape(), "active_units": mlp.spec.active_units} for mlp in layers]
        if config.sparse_mlp.get(LAYER_SHAPES) else None,
        "active_unit_fraction": cost.unit_fraction,
        "active_weight_fraction": cost.weight_fraction,
        # Trees: rows stored per dense neuron (above 1 where selected leaves share neurons).
        "stored_multiple": (sum(m.spec.stored_units for m in layers) / sum(m.intermediate_size for m in layers)
                            if config.sparse_mlp["method"] == "tree" else None),
        "parameters": {"total": total, "mlp": mlp},
        "inference_paths": inference_paths(layer),
        # for float32 weights (the layers are built on the meta device in the default dtype)
        "runtime_copy_bytes": {device: sum(runtime_copy_bytes(mlp)[device] for mlp in layers)
                               for device in ("cuda", "cpu")},
        "mlp_weight_bytes": sum(t.numel() * t.element_size() for mlp in layers
                                for t in itertools.chain(mlp.parameters(), mlp.buffers())),
    }
