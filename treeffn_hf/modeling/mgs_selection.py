"""Which neurons a micro-gated MLP computes: the one definition every path calls (the reference,
the PyTorch path, the kernels' row lists, gate training).

- `top_k`: the `spec.top_k(H)` highest scores of each token;
- `threshold`: every neuron whose score exceeds the layer's calibrated threshold.
This file is part of the remote-code bundle.
"""

from __future__ import annotations

import torch


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of each row's `k` highest scores."""
    index = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def selection_mask(scores: torch.Tensor, spec, threshold: torch.Tensor, ramp: float = 1.0) -> torch.Tensor:
    """Boolean (N, H) mask of the neurons each token computes. `ramp` < 1 (progressive sparsity
    in training) selects more: the threshold scaled by `ramp`, or k moved towards H; 0 selects
    every neuron with a positive score (top-k: every neuron), 1 the calibrated selection."""
    if spec.selection == "threshold":
        return scores > (threshold if ramp >= 1 else threshold * ramp)
    width = scores.shape[-1]
    k = spec.top_k(width)
    return top_k_mask(scores, k if ramp >= 1 else round(width - ramp * (width - k)))


def token_rows(scores: torch.Tensor, spec, threshold: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the selected neurons of one token's scores (H,), without building
    the mask (the decode path)."""
    if spec.selection == "threshold":
        return (scores > threshold).nonzero().squeeze(1)
    return scores.topk(spec.top_k(scores.shape[-1]), sorted=False).indices.sort().values


def padded_rows(scores: torch.Tensor, spec, threshold: torch.Tensor) -> torch.Tensor:
    """(N, R) indices of each token's selected neurons in no particular order; -1 pads the rows
    of a `threshold` selection to the widest token's count (one host sync)."""
    if spec.selection == "top_k":
        return scores.topk(spec.top_k(scores.shape[-1]), dim=-1, sorted=False).indices
    chosen = scores > threshold
    width = max(1, int(chosen.sum(dim=1).max()))
    top = chosen.to(torch.int8).topk(width, dim=-1, sorted=False)
    return torch.where(top.values.bool(), top.indices, -1)
