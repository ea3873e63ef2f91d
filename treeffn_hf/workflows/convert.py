"""`treeffn convert`: load -> convert -> save (-> push)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import load_dense, prepare_output, read_dense_config, save
from ..conversion.surgery import check_convertible, convert
from ..modeling.layer_spec import LayerSpec


@dataclass
class ConversionReport:
    source: str
    output: Path
    layer_spec: dict
    active_unit_fraction: float
    active_weight_fraction: float
    seconds: float
    pushed_to: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} in {self.seconds:.1f}s",
            f"  layer spec: {json.dumps(self.layer_spec)}",
            f"  active MLP units per token: {self.active_unit_fraction:.2%}; "
            f"MLP weight bytes read: {self.active_weight_fraction:.2%} of dense",
        ]
        if self.pushed_to:
            lines.append(f"  pushed to {self.pushed_to}")
        return "\n".join(lines)


def convert_checkpoint(
    src: Union[str, Path],
    out: Union[str, Path],
    spec: LayerSpec,
    *,
    gguf_file: Optional[str] = None,
    dtype: Union[str, torch.dtype] = "float32",
    revision: Optional[str] = None,
    overwrite: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """load -> convert -> save (-> push). Every check that needs no weights runs first."""
    start = time.perf_counter()
    spec.validate()
    out = prepare_output(out, overwrite, source=src)
    config = read_dense_config(str(src), gguf_file=gguf_file, revision=revision)
    check_convertible(config, spec)
    dense, tokenizer = load_dense(str(src), gguf_file=gguf_file, dtype=dtype, revision=revision, config=config)
    sparse = convert(dense, spec, progress=progress)
    del dense
    save(sparse, out, tokenizer=tokenizer, overwrite=overwrite, base_model=str(src))
    cost = sparse.sparse_cost()
    report = ConversionReport(
        source=str(src) + (f"/{gguf_file}" if gguf_file else ""),
        output=out,
        layer_spec=dict(sparse.config.sparse_mlp),
        active_unit_fraction=cost.unit_fraction,
        active_weight_fraction=cost.weight_fraction,
        seconds=time.perf_counter() - start,
    )
    if push_to_hub:
        from ..hub import push

        report.pushed_to = push(out, push_to_hub, private=private)
    return report
