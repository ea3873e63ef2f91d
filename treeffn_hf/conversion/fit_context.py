"""What every recovery recipe starts from: the dense model, its calibration windows and the MLP
inputs captured on them, and a work directory for resumable per-layer results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .calibration import MLPInputs

LOSS_WINDOWS = 2  # calibration windows whose KL drives greedy allocation
RATIO_WINDOWS = 8  # calibration windows on which a perplexity budget (`--max-ratio`) is held


@dataclass
class FitContext:
    dense: torch.nn.Module
    ids: torch.Tensor  # (windows, window) calibration token ids
    captured: MLPInputs
    work: Path
    progress: bool = True

    @property
    def loss_ids(self) -> torch.Tensor:
        return self.ids[-LOSS_WINDOWS:]

    @property
    def ratio_ids(self) -> torch.Tensor:
        return self.ids[:RATIO_WINDOWS]
