"""Perplexity on the project's protocol: the whole text as one string, tokenized, cut into
non-overlapping windows of 1024 tokens; each window predicts its own tokens 2..1024."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int


def protocol_windows(tokenizer, text_path: Union[str, Path], window: int = 1024, max_windows: int = 40) -> torch.Tensor:
    """(windows, window) token ids of `text_path` read as one string; `max_windows=0` keeps all."""
    ids = tokenizer(Path(text_path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    count = ids.numel() // window
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"{text_path}: fewer than {window} tokens")
    return ids[: count * window].view(count, window)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, progress: bool = True) -> Perplexity:
    """exp(mean next-token NLL) of `model` over the windows, one window at a time."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for window in tqdm(windows, desc="perplexity", disable=not progress):
        ids = window[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        total_tokens += ids.shape[1] - 1
    model.train(was_training)
    mean = total_nll / total_tokens
    return Perplexity(perplexity=math.exp(mean), mean_nll=mean, predicted_tokens=total_tokens, windows=len(windows))
