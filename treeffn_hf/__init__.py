"""treeffn_hf: turn pretrained dense Llama/Qwen checkpoints into sparse-MLP models.

    model, tokenizer = treeffn_hf.load_dense("HuggingFaceTB/SmolLM2-135M")
    sparse = treeffn_hf.convert(model, treeffn_hf.TreeSpec(depth=6, node_width=2))
    treeffn_hf.save(sparse, "smollm2-tree", tokenizer=tokenizer)
    reloaded = treeffn_hf.load("smollm2-tree")

    untrained = treeffn_hf.init_model(model.config, treeffn_hf.TreeSpec(depth=6, node_width=8))  # to pretrain

Importing the package registers the sparse model classes with the transformers Auto* factories.
"""

from .architectures import ARCHITECTURES, UnsupportedArchitectureError, supported_model_types
from .checkpoint import CheckpointError, OutputExistsError, load, load_dense, save
from .conversion.surgery import convert, init_model
from .modeling.layer_spec import InvalidSpecError, MGSSpec, TreeSpec, spec_from_dict
from .modeling.mgs_layer import MicroGatedMLP
from .modeling.sparse_cost import SparseCost
from .modeling.tree_layer import TreeFFN
from .registration import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "InvalidSpecError",
    "MGSSpec",
    "MicroGatedMLP",
    "OutputExistsError",
    "SparseCost",
    "TreeFFN",
    "TreeSpec",
    "UnsupportedArchitectureError",
    "convert",
    "init_model",
    "load",
    "load_dense",
    "save",
    "spec_from_dict",
    "supported_model_types",
]
