"""What the kernels ask of a layer's activation function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def computes_silu(act_fn) -> bool:
    """Whether `act_fn` is SiLU, probed by value: Hugging Face names it several ways (`SiLU`,
    `SiLUActivation`, "swish"), and the Triton and CPU kernels implement SiLU only."""
    probe = torch.linspace(-4, 4, 9)
    return torch.allclose(act_fn(probe), F.silu(probe))
