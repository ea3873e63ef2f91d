"""Triton path of the micro-gated MLP.

The gate (two small GEMMs) and its top-k (`torch.topk`, or the one-launch `kernels_topk`, see
TOPK_KERNEL) run on the device; the selected neurons of each token then go through
`kernels_gather.gathered_swiglu` (or `gathered_swiglu_streamed`, see GATHER_KERNELS): the
selected rows of `gate_proj` and `up_proj` (contiguous in the stock layout) and of `down_proj`
transposed (cached, one row per neuron) are read once, with fp32 accumulation.

Batches beyond `uses_gather` go to the PyTorch path's gathered GEMM over the union of
the tokens' selections (or the masked dense GEMMs once that union is large), which is cuBLAS on
a GPU; the caller is told so, and `last_path` records it.
"""

from __future__ import annotations

import torch

from .kernels_gather import gathered_swiglu, gathered_swiglu_streamed
from .kernels_topk import MAX_ROW, topk_rows_triton
from .mgs_selection import padded_rows
from .mgs_torch import down_rows, mgs_fast

# Per-token gathers read (tokens x selected) rows; the union GEMM reads the union once but waits
# on the host for its size. In the H100 run of benchmarks/bench_mlp.py (its side-variant timings)
# the gathers beat the union path at 4x and 6.4x intermediate as CUDA graphs (eagerly, launch
# overhead ties or loses) and lost at 8x either way; the boundary sits between. That run
# dispatched on "<= 8 tokens", so this rule is not yet measured as the main path.
GATHER_MAX_ROW_MULTIPLE = 7.0
# Which gather kernels run: "split_k" (five launches with atomics, measured on the H100) or
# "streamed" (two launches, no atomics; not yet timed on a GPU, so not the default).
GATHER_KERNELS = "split_k"
GATHER_KERNEL_CHOICES = ("split_k", "streamed")
# Which top-k runs at decode: "torch" (`torch.topk`, several launches, measured on the H100) or
# "triton" (`kernels_topk`, one launch; not yet timed on a GPU, so not the default).
TOPK_KERNEL = "torch"
TOPK_KERNEL_CHOICES = ("torch", "triton")


def uses_gather(layer, tokens: int) -> bool:
    """Whether `tokens` tokens go through the gather kernels (else the PyTorch union path)."""
    per_token = layer.spec.top_k(layer.intermediate_size) if layer.spec.selection == "top_k" else (
        layer.spec.density * layer.intermediate_size)  # threshold: calibrated to this density
    return tokens * per_token <= GATHER_MAX_ROW_MULTIPLE * layer.intermediate_size


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"kernels_mgs.{name} must be one of {choices}, got {value!r}")
    return value


def uses_topk_kernel(layer) -> bool:
    """Whether the top-k kernel selects the neurons (TOPK_KERNEL, and a row it can hold)."""
    triton_topk = _choice("TOPK_KERNEL", TOPK_KERNEL, TOPK_KERNEL_CHOICES) == "triton"
    return triton_topk and layer.spec.selection == "top_k" and layer.intermediate_size <= MAX_ROW


def selected_rows(layer, scores: torch.Tensor) -> torch.Tensor:
    """(N, R) indices of each token's selected neurons; -1 pads rows of `threshold` selection."""
    if uses_topk_kernel(layer):
        return topk_rows_triton(scores, layer.spec.top_k(scores.shape[-1]))
    return padded_rows(scores, layer.spec, layer.gate_threshold)


def mgs_triton(layer, x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Forward of a `MicroGatedMLP` on the kernels; returns (output, which path ran)."""
    if not uses_gather(layer, x.shape[0]):
        return mgs_fast(layer, x, scores), "torch"
    rows = selected_rows(layer, scores)
    # top-k selects a known number per token: no counting kernel on the decode path
    selected = rows.numel() if layer.spec.selection == "top_k" else (rows >= 0).sum(dtype=torch.float32)
    layer._record_count(selected, tokens=x.shape[0])
    streamed = _choice("GATHER_KERNELS", GATHER_KERNELS, GATHER_KERNEL_CHOICES) == "streamed"
    kernels = gathered_swiglu_streamed if streamed else gathered_swiglu
    out = kernels(x.contiguous(), rows.contiguous(), layer.gate_proj.weight.detach(),
                  layer.up_proj.weight.detach(), down_rows(layer))
    topk = "topk+" if uses_topk_kernel(layer) else ""
    return out, f"triton:{topk}{'streamed_gather' if streamed else 'gather'}"
