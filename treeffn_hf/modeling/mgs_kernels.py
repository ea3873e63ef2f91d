"""Triton path of the micro-gated MLP.

The gate (two small GEMMs) and its selection (`torch.topk`, or the calibrated threshold) run on
the device; the selected neurons of each token then go through `gather_kernels.gathered_swiglu`:
the selected rows of `gate_proj` and `up_proj` (contiguous in the stock layout) and of
`down_proj` transposed (cached, one row per neuron) are read once, with fp32 accumulation.

Batches beyond `uses_gather` go to the PyTorch path's gathered GEMM over the union of
the tokens' selections (or the masked dense GEMMs once that union is large), which is cuBLAS on
a GPU; the caller is told so, and `last_path` records it.
"""

from __future__ import annotations

import torch

from .gather_kernels import gathered_swiglu
from .mgs_selection import padded_rows
from .mgs_torch import down_rows, mgs_torch_path


def uses_gather(layer, tokens: int) -> bool:
    """Whether `tokens` tokens go through the gather kernels (else the PyTorch union path): the
    kernel policy's `mgs_gather_max_row_multiple`. Per-token gathers read (tokens x selected)
    rows; the union GEMM reads the union once but waits on the host for its size."""
    per_token = layer.spec.top_k(layer.intermediate_size) if layer.spec.selection == "top_k" else (
        layer.spec.density * layer.intermediate_size)  # threshold: calibrated to this density
    return tokens * per_token <= layer.kernel_policy.mgs_gather_max_row_multiple * layer.intermediate_size


def selected_rows(layer, scores: torch.Tensor) -> torch.Tensor:
    """(N, R) indices of each token's selected neurons; -1 pads rows of `threshold` selection."""
    return padded_rows(scores, layer.spec, layer.gate_threshold)


def mgs_triton(layer, x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Forward of a `MicroGatedMLP` on the kernels; returns (output, which path ran)."""
    if not uses_gather(layer, x.shape[0]):
        return mgs_torch_path(layer, x, scores), "torch"
    rows = selected_rows(layer, scores)
    # top-k selects a known number per token: no counting kernel on the decode path
    selected = rows.numel() if layer.spec.selection == "top_k" else (rows >= 0).sum(dtype=torch.float32)
    layer._record_count(selected, tokens=x.shape[0])
    out = gathered_swiglu(x.contiguous(), rows.contiguous(), layer.gate_proj.weight.detach(),
                          layer.up_proj.weight.detach(), down_rows(layer))
    return out, "triton:gather"
