"""Which implementation a sparse layer runs:

- `reference`: masked dense, differentiable, the oracle (and the training path);
- `torch`: the sparse PyTorch path (CPU, and any device without the kernels);
- `cpu`: the fused C kernel of the nested micro-gated MLP (kernels_cpu.py: float32 CPU tensors,
  x86 AVX-512 VNNI, a compiler at first use), which computes each token as in decode;
- `cpu:scores`: that kernel's scoring GEMM, then the `torch` path's GEMMs (prefill);
- `triton`: the Triton kernels (CUDA tensors; CPU tensors too under `TRITON_INTERPRET=1`).

`auto` picks `reference` when gradients are needed, `triton` for CUDA tensors when the kernels
support the layer, `cpu` for up to `kernels_cpu.MAX_TOKENS` CPU tokens and `cpu:scores` for
more when the C kernel supports the layer, and `torch` otherwise. `TREEFFN_PATH=reference|torch|cpu|cpu:scores|triton|auto` forces one
for the whole process, a layer's `force_path` attribute for that layer; forcing `triton` or `cpu`
where its kernel cannot run, or a forward-only path where gradients are needed, is an error,
never a silent fallback. Each layer records what it last ran
in `last_path` (`triton:<kernels>` when the kernels did), so benchmarks and `treeffn info` never
mistake one path for another.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .activations import computes_silu
from .kernels_cpu import MAX_TOKENS as CPU_KERNEL_MAX_TOKENS
from .kernels_cpu import cpu_kernel_unavailable_reason

PATHS = ("reference", "torch", "cpu", "cpu:scores", "triton")


def triton_unavailable_reason(layer: torch.nn.Module, device: torch.device) -> Optional[str]:
    """Why the kernels cannot run `layer` on inputs on `device`, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the input is on {device}; the kernels need CUDA (or TRITON_INTERPRET=1)"
    supported = getattr(layer, "_kernel_support", None)
    if supported is None:
        supported = computes_silu(layer.act_fn)
        layer._kernel_support = supported
    if not supported:
        return f"the kernels implement SiLU only, not {type(layer.act_fn).__name__}"
    if any(getattr(getattr(layer, name, None), "bias", None) is not None for name in ("gate_proj", "up_proj", "down_proj")):
        return "the kernels do not implement MLP biases"
    return None


def choose_path(layer: torch.nn.Module, x: torch.Tensor) -> str:
    forced = getattr(layer, "force_path", None) or os.environ.get("TREEFFN_PATH", "auto")
    if forced != "auto" and forced not in PATHS:
        raise ValueError(f"TREEFFN_PATH / force_path must be one of {PATHS} or 'auto', got {forced!r}")
    # Training goes through the reference path, whose gradients (straight-through terms included)
    # the tests pin down; the other paths are forward-only, so forcing one would drop gradients.
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        if forced not in ("auto", "reference"):
            raise RuntimeError(f"the {forced} path was forced, but it is forward-only and gradients are needed: "
                               "train on the reference path, or run under torch.no_grad()")
        return "reference"
    if forced != "auto":
        if forced == "triton":
            reason = triton_unavailable_reason(layer, x.device)
            if reason is not None:
                raise RuntimeError(f"the triton path was forced, but {reason}")
        elif forced in ("cpu", "cpu:scores"):
            reason = cpu_kernel_unavailable_reason(layer, x)
            if reason is not None:
                raise RuntimeError(f"the {forced} path was forced, but {reason}")
        return forced
    if x.is_cuda:
        return "triton" if triton_unavailable_reason(layer, x.device) is None else "torch"
    if cpu_kernel_unavailable_reason(layer, x) is None:
        return "cpu" if x.shape[0] <= CPU_KERNEL_MAX_TOKENS else "cpu:scores"
    return "torch"


def inference_paths(layer: torch.nn.Module) -> dict[str, str]:
    """What inference (no gradients, no forcing) runs on each kind of device, and why."""
    cuda = triton_unavailable_reason(layer, torch.device("cuda"))
    cpu = cpu_kernel_unavailable_reason(layer)
    return {
        "cuda": "triton kernels" if cuda is None else f"PyTorch sparse path ({cuda})",
        "cpu": (f"C kernel up to {CPU_KERNEL_MAX_TOKENS} tokens; beyond, its scores and the PyTorch path's GEMMs"
                if cpu is None
                else f"PyTorch sparse path ({cpu})"),
    }
