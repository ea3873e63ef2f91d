"""Which implementation a sparse layer runs:

- `reference`: masked dense, differentiable, the oracle (and the training path; trees whose leaves
  select their neurons train on their tokens' blocks alone, `tree_layer.tree_ffn_blocks`);
- `torch`: the sparse PyTorch path (CPU, and any device without the kernels);
- `cpu`: the fused C kernel of the nested micro-gated MLP (mgs_kernels_cpu.py: float32 or bf16 CPU
  tokens, x86 AVX-512 VNNI, a compiler at first use), which computes each token as in decode (a decode
  step reaches it through `mgs_kernels_cpu.decode_step`, the same choice on cheaper checks);
- `cpu:amx`: the same layer, the same math, on AMX tiles (mgs_kernels_cpu.py; Sapphire Rapids
  and later): many tokens;
- `cpu:scores`: the fused kernel's scoring GEMM, then bf16 GEMMs masked by its selection (prefill without AMX);
- `triton`: the Triton kernels (CUDA tensors; CPU tensors too under `TRITON_INTERPRET=1`).

`auto` picks `reference` when gradients are needed, `triton` for CUDA tensors when the kernels
support the layer; where the C kernel supports the layer, `cpu:amx` from `cpu_amx_min_tokens` CPU
tokens when the CPU has AMX, else `cpu` up to `cpu_fused_max_tokens` and `cpu:scores` beyond;
`torch` otherwise.

Every sparse layer carries a `KernelPolicy`, the one place these choices live: the path
(`auto` or a forced one) and the switch points between kernel variants. A layer starts with the
policy of its model's config (`kernel_policy`) and `TREEFFN_PATH` (read once, when the layer is
built); `model.set_kernel_policy(...)` changes every layer of a model, loaded remote code
included, and `layer.force_path` is the policy's path. Forcing `triton`, `cpu`, `cpu:amx` or `cpu:scores`
where its kernel cannot run, or anything but `reference` where gradients are needed, is an error,
never a silent fallback. Each layer records what it last ran in `last_path`
(`triton:<kernels>` when the kernels did), so benchmarks and `treeffn info` never mistake one
path for another.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

import torch

from .activations import computes_silu
from .mgs_kernels_cpu import MAX_TOKENS as CPU_KERNEL_MAX_TOKENS
from .mgs_kernels_cpu import (
    amx_machine_reason,
    amx_takes_many_tokens,
    amx_unavailable_reason,
    cpu_kernel_unavailable_reason,
    layer_unsupported_reason,
    operand_copy_bytes,
)
from .mgs_torch import bf16_weights_bytes, down_rows_bytes

PATHS = ("reference", "torch", "cpu", "cpu:amx", "cpu:scores", "triton")


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which implementation a sparse layer runs, and where it switches between kernel variants
    (the measurements behind each default: docs/layers.md, "Where the switch points come from").

    - `path`: `auto` (the rules above) or one of `PATHS`, forced;
    - `cpu_fused_max_tokens`: up to this many tokens the fused C kernel runs, beyond it `cpu:scores`;
    - `cpu_amx_min_tokens`: from this many tokens the AMX kernel runs where the CPU has it; `inf`
      turns it off, and its operand copies are then never made;
    - `tree_gather_max_row_multiple`: a tree batch on CUDA takes per-token gathers while tokens x
      active units <= this x intermediate, else masked cuBLAS GEMMs over all rows (0 forces those,
      inf the gathers);
    - `mgs_gather_max_row_multiple`: the MGS Triton gathers run while tokens x selected <= this x
      intermediate, else the PyTorch union path;
    - `mgs_torch_gather_max_fraction`: the PyTorch path gathers the selected rows (or the batch's
      union) while they are at most this fraction of the neurons, else it runs the dense matmuls
      with the selection as a mask;
    - `tree_cpu_gather_row_cost`, `tree_cpu_leaf_overhead_elems`: a tree batch on the PyTorch
      path takes per-token gathers while `row_cost` x the weights they gather (tokens x routed
      rows x hidden) is at most what the grouped GEMMs read (each visited leaf once, and the node
      rows) plus `leaf_overhead_elems` per visited leaf, else it groups tokens by leaf;
    - `tree_in_place_leaf_elems`: a one-token tree step reads a leaf block of at least this many
      weights in place; a smaller one is gathered with the nodes (one copy beats the extra ops).
    """

    path: str = "auto"
    cpu_fused_max_tokens: int = CPU_KERNEL_MAX_TOKENS
    cpu_amx_min_tokens: float = 8
    tree_gather_max_row_multiple: float = 1.25
    tree_cpu_gather_row_cost: float = 2.5
    tree_cpu_leaf_overhead_elems: int = 1 << 17
    mgs_gather_max_row_multiple: float = 7.0
    mgs_torch_gather_max_fraction: float = 0.15
    tree_in_place_leaf_elems: int = 1 << 16

    def __post_init__(self) -> None:
        if self.path != "auto" and self.path not in PATHS:
            raise ValueError(f"the kernel policy's path (TREEFFN_PATH / force_path) must be one of {PATHS} "
                             f"or 'auto', got {self.path!r}")

    def replace(self, **fields: Any) -> "KernelPolicy":
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"KernelPolicy has no field {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **fields)


def initial_policy(config_fields: Optional[dict] = None) -> KernelPolicy:
    """A new layer's policy: the config's `kernel_policy` fields, its path overridden by
    `TREEFFN_PATH` when that is set (read here, once per layer built)."""
    policy = KernelPolicy().replace(**(config_fields or {}))
    forced = os.environ.get("TREEFFN_PATH")
    return policy.replace(path=forced) if forced else policy


class KernelPolicyMixin:
    """`kernel_policy`, set in the layer's constructor, and `force_path`: its path, None for auto."""

    kernel_policy: KernelPolicy

    @property
    def force_path(self) -> Optional[str]:
        path = self.kernel_policy.path
        return None if path == "auto" else path

    @force_path.setter
    def force_path(self, path: Optional[str]) -> None:
        self.kernel_policy = self.kernel_policy.replace(path=path or "auto")


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
    policy = layer.kernel_policy
    forced = policy.path
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
        elif forced in ("cpu", "cpu:amx", "cpu:scores"):
            reason = (amx_unavailable_reason if forced == "cpu:amx" else cpu_kernel_unavailable_reason)(layer, x)
            if reason is not None:
                raise RuntimeError(f"the {forced} path was forced, but {reason}")
        return forced
    if x.is_cuda:
        return "triton" if triton_unavailable_reason(layer, x.device) is None else "torch"
    if cpu_kernel_unavailable_reason(layer, x) is None:
        if x.shape[0] >= policy.cpu_amx_min_tokens and amx_unavailable_reason(layer, x) is None:
            return "cpu:amx"
        return "cpu" if x.shape[0] <= policy.cpu_fused_max_tokens else "cpu:scores"
    return "torch"


def inference_paths(layer: torch.nn.Module) -> dict[str, str]:
    """What inference (no gradients, no forcing) runs on each kind of device, and why."""
    cuda = triton_unavailable_reason(layer, torch.device("cuda"))
    cpu = cpu_kernel_unavailable_reason(layer)
    policy = layer.kernel_policy
    if cpu is not None:
        cpu = f"PyTorch sparse path ({cpu})"
    elif amx_machine_reason() is None and policy.cpu_amx_min_tokens != float("inf"):
        cpu = (f"C kernel below {policy.cpu_amx_min_tokens:g} tokens; from there the AMX kernel "
               "(where down_proj holds bf16 values, as the nested recipe stores it)")
    else:
        cpu = f"C kernel up to {policy.cpu_fused_max_tokens} tokens; beyond, its scores and the PyTorch path's GEMMs"
    return {"cuda": "triton kernels" if cuda is None else f"PyTorch sparse path ({cuda})", "cpu": cpu}


def runtime_copy_bytes(layer: torch.nn.Module) -> dict[str, int]:
    """Memory inference adds beside `layer`'s parameters on each kind of device, made at first use:
    an MGS layer's Triton kernels and PyTorch gathers read a transposed copy of down_proj (a third
    of its MLP weights), its CPU kernel the copies of `operand_copy_bytes`. Trees store their
    weights in the layout their paths read, and copy nothing."""
    if getattr(layer, "sparse_method", None) != "mgs":
        return {"cuda": 0, "cpu": 0}
    # where the C kernel implements the layer it runs every CPU batch, and past its token limit
    # (`cpu:scores`, unless the AMX kernel takes those) bf16 GEMMs over a bf16 copy of the three matrices
    if layer_unsupported_reason(layer) is None:
        cpu = operand_copy_bytes(layer) + (0 if amx_takes_many_tokens(layer) else bf16_weights_bytes(layer))
    else:
        cpu = down_rows_bytes(layer)
    return {"cuda": down_rows_bytes(layer), "cpu": cpu}
