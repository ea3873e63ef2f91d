"""`treeffn prune`: a tree checkpoint's dead paths removed into a smaller static tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ..checkpoint import CheckpointError, prepare_output, save


def prune_checkpoint(
    model_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    text: Union[str, Path],
    windows: int = 16,
    window: int = 1024,
    min_tokens: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Remove a tree checkpoint's dead paths: run it over `windows` windows of `window` tokens of
    `text`, keep per layer and tree the leaves at least `min_tokens` of those tokens reached, and
    save the smaller static tree to `out` (with `prune_report.json`, which this returns)."""
    from transformers import AutoTokenizer

    from ..checkpoint import is_treeffn_checkpoint, load
    from ..conversion.calibration import read_texts, token_windows
    from ..pruning import prune_dead_paths

    source = Path(model_dir)
    if not (source.is_dir() and is_treeffn_checkpoint(source)):
        raise CheckpointError(f"{model_dir}: not a treeffn checkpoint directory")
    if not Path(text).is_file():
        raise CheckpointError(f"{text}: no such text (pass --text)")
    prepare_output(out, overwrite, source=source)  # fail before the long work
    model = load(source).eval()
    if any(mlp.sparse_method != "tree" for _, mlp in model.sparse_mlps()):
        raise CheckpointError(f"{model_dir}: only tree models have paths to prune")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    ids = token_windows(read_texts(text), tokenizer, window, windows)
    pruned, report = prune_dead_paths(model, ids, min_tokens=min_tokens, progress=progress)
    record = {"source": str(source), "text": str(text), **report.as_dict()}
    save(pruned, out, tokenizer=tokenizer, overwrite=overwrite,
         extra_files={"prune_report.json": json.dumps(record, indent=2)})
    return record
