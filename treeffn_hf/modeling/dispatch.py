"""Which implementation a sparse layer runs: `reference` (masked dense, differentiable, the
oracle) or `torch` (the sparse PyTorch path). `TREEFFN_PATH=reference|torch|auto` forces one for
the whole process; a layer's `force_path` attribute forces one for that layer. Each layer records
the path it last ran in `last_path`, so benchmarks and `treeffn info` never mistake one for the other.
"""

from __future__ import annotations

import os

import torch

PATHS = ("reference", "torch")


def choose_path(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> str:
    forced = getattr(layer, "force_path", None) or os.environ.get("TREEFFN_PATH", "auto")
    if forced != "auto":
        if forced not in PATHS:
            raise ValueError(f"TREEFFN_PATH / force_path must be one of {PATHS} or 'auto', got {forced!r}")
        return forced
    # Training goes through the reference path, whose gradients the tests pin down.
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "reference"
    return "torch"
