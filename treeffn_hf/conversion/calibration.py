"""Calibration data: text in fixed token windows, and each dense MLP's inputs captured with hooks.

Memory stays bounded: each layer keeps at most `tokens_per_layer` input rows, a uniform random
sample of the tokens seen (reservoir sampling over windows), so a 135M model calibrates on a
laptop. MLP outputs are not stored: they are recomputed from the dense weights when needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

from ..architectures import layout_of


def read_texts(source: Union[str, Path], text_field: str = "text") -> Iterator[str]:
    """Texts from a local .txt (one document per blank-line-separated block), .jsonl, .parquet,
    or a Hugging Face dataset id (`name` or `name:config:split`)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)[text_field]
            return
        if path.suffix == ".parquet":
            from datasets import load_dataset  # optional dependency

            yield from load_dataset("parquet", data_files=str(path), split="train")[text_field]
            return
        yield path.read_text(encoding="utf-8")
        return
    if path.exists():
        raise FileNotFoundError(f"{source}: not a text, jsonl or parquet file")
    text = str(source)
    looks_like_path = bool(path.suffix) or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_like_path:  # Hub dataset ids are `name` or `org/name`
        raise FileNotFoundError(f"{source}: no such calibration file")
    try:
        from datasets import load_dataset  # optional dependency; a Hub id needs network
    except ImportError as error:
        raise FileNotFoundError(
            f"{source}: not a local file, and reading Hugging Face datasets needs `pip install datasets`"
        ) from error

    name, _, rest = str(source).partition(":")
    config, _, split = rest.partition(":")
    for row in load_dataset(name, config or None, split=split or "train", streaming=True):
        yield row[text_field]


def token_windows(
    texts: Iterator[str], tokenizer, window: int, max_windows: int
) -> torch.Tensor:
    """Concatenate the texts' tokens and cut them into `max_windows` windows of `window` tokens."""
    needed = window * max_windows
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) >= needed:
            break
    usable = (len(ids) // window) * window
    if usable == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: min(usable, needed)]).view(-1, window)


class _StopForward(Exception):
    """Raised by a capture hook once the layer it waits for has run: the rest of the forward is not needed."""


@dataclass
class MLPInputs:
    """Per decoder layer: a (tokens, hidden) sample of the inputs its MLP saw."""

    inputs: list[torch.Tensor]
    tokens_seen: int


@torch.no_grad()
def capture_mlp_inputs(
    model: torch.nn.Module,
    windows: torch.Tensor,
    tokens_per_layer: int = 8192,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    only_layer: Optional[int] = None,
) -> MLPInputs:
    """Run `model` over `windows` once and keep a uniform sample of each MLP's inputs. With
    `only_layer`, only that layer's (the others' entries are None), and each forward stops there.
    `model` is dense or sparse (a sparse model's MLP inputs, for sequential distillation)."""
    arch = layout_of(model.config)
    layers = arch.decoder_layers(model)
    generator = torch.Generator().manual_seed(seed)
    samples: list[Optional[torch.Tensor]] = [None] * len(layers)
    seen = [0]

    def reservoir(index: int, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).detach().float().cpu()
        held = samples[index]
        start = seen[0]
        if held is None:
            held = torch.empty(0, rows.shape[1])
        # Algorithm R over a batch: row i (global position start+i) replaces a random slot with
        # probability tokens_per_layer / (start+i+1).
        room = max(0, tokens_per_layer - held.shape[0])
        held = torch.cat([held, rows[:room]])
        rest = rows[room:]
        if rest.shape[0]:
            positions = torch.arange(start + room, start + room + rest.shape[0])
            slots = (torch.rand(rest.shape[0], generator=generator) * (positions + 1)).long()
            keep = slots < tokens_per_layer
            held[slots[keep]] = rest[keep]
        samples[index] = held

    def capture(index: int, rows: torch.Tensor) -> None:
        reservoir(index, rows)
        if only_layer is not None:
            raise _StopForward

    hooks = [
        getattr(layer, arch.mlp_attr).register_forward_pre_hook(
            lambda module, args, index=index: capture(index, args[0])
        )
        for index, layer in enumerate(layers) if only_layer is None or index == only_layer
    ]
    try:
        was_training = model.training
        model.eval()
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibration", disable=not progress):
            batch = windows[start : start + batch_size].to(next(model.parameters()).device)
            try:
                model(batch, use_cache=False)
            except _StopForward:
                pass
            seen[0] += batch.numel()
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return MLPInputs(inputs=[s for s in samples], tokens_seen=seen[0])
