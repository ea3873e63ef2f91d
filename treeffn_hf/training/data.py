"""Fine-tuning data: token windows from text (files or HF datasets, as for calibration), and
sequences sampled from the dense teacher (data-free distillation), so a small corpus never
starves a run. Every source reports its token count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from tqdm.auto import tqdm

from ..conversion.calibration import read_texts, token_windows


@dataclass
class TrainingData:
    windows: torch.Tensor  # (sequences, window) token ids
    source: str
    parts: tuple[dict, ...] = ()  # of combined data: each source and its token count

    @property
    def tokens(self) -> int:
        return self.windows.numel()

    def describe(self) -> dict:
        return {"source": self.source, "sequences": int(self.windows.shape[0]),
                "window": int(self.windows.shape[1]), "tokens": self.tokens,
                "parts": list(self.parts) or [{"source": self.source, "tokens": self.tokens}]}


class WindowDataset(torch.utils.data.Dataset):
    """Causal-LM examples (input_ids, labels) from fixed windows, with the window's index (the key
    of the trainer's teacher cache)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids.clone(), "window_index": index}


def text_data(source: Union[str, Path], tokenizer, window: int, max_windows: int) -> TrainingData:
    windows = token_windows(read_texts(source), tokenizer, window, max_windows)
    return TrainingData(windows=windows, source=str(source))


@torch.no_grad()
def teacher_data(
    teacher, tokenizer, sequences: int, window: int, *, batch_size: int = 32, temperature: float = 1.0,
    seed: int = 0, progress: bool = True,
) -> TrainingData:
    """Sample `sequences` windows from the teacher, each starting from the BOS token (or token 0)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    device = next(teacher.parameters()).device
    chunks = []
    try:
        for first in tqdm(range(0, sequences, batch_size), desc="sampling from the teacher", disable=not progress):
            count = min(batch_size, sequences - first)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            out = teacher.generate(prompt, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=window - 1, min_new_tokens=window - 1,
                                   pad_token_id=tokenizer.eos_token_id)
            chunks.append(out[:, :window].cpu())
    finally:
        torch.random.set_rng_state(generator_state)
    return TrainingData(windows=torch.cat(chunks), source=f"teacher samples (T={temperature}, seed={seed})")


def combine(parts: list[Optional[TrainingData]]) -> TrainingData:
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("no training data: give a text source and/or teacher samples")
    width = min(p.windows.shape[1] for p in parts)
    windows = [p.windows[:, :width] for p in parts]
    return TrainingData(windows=torch.cat(windows), source=" + ".join(p.source for p in parts),
                        parts=tuple({"source": p.source, "tokens": w.numel()} for p, w in zip(parts, windows)))
