"""`treeffn init`: a randomly initialised tree checkpoint, to pretrain from scratch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from ..checkpoint import CheckpointError, prepare_output, read_dense_config, save
from ..conversion.surgery import init_model
from ..modeling.layer_spec import TreeSpec


def init_checkpoint(
    src: Union[str, Path],
    out: Union[str, Path],
    spec: TreeSpec,
    *,
    config_overrides: Optional[dict[str, Any]] = None,
    seed: int = 0,
    revision: Optional[str] = None,
    overwrite: bool = False,
) -> dict:
    """Write a tree model with the shape of SRC's config (plus `config_overrides`, e.g. fewer layers)
    and random weights to OUT, with SRC's tokenizer when it has one. Reads no weights of SRC."""
    spec.validate()
    out = prepare_output(out, overwrite, source=src)
    config = read_dense_config(str(src), revision=revision)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise CheckpointError(f"{src}: the config has no field {key!r} to override")
        setattr(config, key, value)
    model = init_model(config, spec, seed=seed)
    origin = (f"A {config.model_type} model with the shape of `{src}`"
              + (f" (changed: {', '.join(sorted(config_overrides))})" if config_overrides else "")
              + f", every MLP a tree-structured FFN, and random weights (seed {seed}): made by `treeffn init` "
              "to be trained from scratch.")
    save(model, out, tokenizer=_tokenizer(str(src), revision), overwrite=overwrite, origin=origin)
    cost = model.sparse_cost()
    return {"output": str(out), "layer_spec": dict(model.config.sparse_mlp), "parameters": model.num_parameters(),
            "active_unit_fraction": cost.unit_fraction, "seed": seed}


def _tokenizer(src: str, revision: Optional[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, revision=revision)
    except Exception:  # a config without a tokenizer still makes a model; the caller brings one
        return None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings, each value read as JSON where it parses (numbers, true, null), else text."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
