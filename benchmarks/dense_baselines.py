"""The dense models a user would run instead of a sparse one: the same weights at bf16, or with
the MLP weights quantized weight-only, on the kernels a PyTorch user has.

- `WeightOnlyLinear` runs PyTorch's own CPU weight-only kernels: int8 with one scale per output row
  (`torch._weight_int8pack_mm`) or int4 with a scale and a zero per group of columns
  (`torch._weight_int4pack_mm_for_cpu`); activations in bf16, as a bf16 model has them.
- `torchao_mlps` quantizes the same layers through torchao, the way Hugging Face users do
  (`TorchAoConfig`), where torchao is installed and has a CPU layout for the format; the
  benchmarks time both and name the faster.
- `fake_quantized` rounds weights onto a grid and back (per row or per group, symmetric or
  asymmetric) for the quality frontier's grids that no CPU kernel runs (int8 with group scales).

Bytes are counted as each format stores them: codes, and bf16 scales and zeros.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class WeightGrid:
    """A weight-only number format: `bits` per weight, one scale (and a zero when asymmetric) per
    `group` columns of a row (None: per row)."""

    bits: int
    group: Optional[int]
    asymmetric: bool

    @property
    def name(self) -> str:
        grouping = f"g{self.group}" if self.group else "per-row"
        return f"int{self.bits} {grouping}{' asym' if self.asymmetric else ''}"

    def bytes_per_weight(self) -> float:
        """Codes plus bf16 scales (and zeros) per weight."""
        per_group = 2 * (2 if self.asymmetric else 1)
        return self.bits / 8 + (per_group / self.group if self.group else 0.0)

    def row_bytes(self, columns: int) -> float:
        if self.group:
            return columns * self.bytes_per_weight()
        return columns * self.bits / 8 + 2 * (2 if self.asymmetric else 1)


# The grids the quality frontier measures (issue #38), and the two that CPU kernels run.
INT8_ROW = WeightGrid(8, None, False)
INT8_G64 = WeightGrid(8, 64, False)
INT4_G32_ASYM = WeightGrid(4, 32, True)  # SmolLM2's GGUF is Q4_1: this grid is lossless on it alone
INT4_G64_ASYM = WeightGrid(4, 64, True)
INT4_G64 = WeightGrid(4, 64, False)
FRONTIER_GRIDS = (INT8_ROW, INT8_G64, INT4_G32_ASYM, INT4_G64_ASYM, INT4_G64)


def quantize_grid(weight: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`weight` (rows, columns) on `grid`: (codes (rows, groups, group) as floats, bf16 scales
    (rows, groups, 1), bf16 zeros or None). Asymmetric codes are 0..levels with the weight
    (code - mid) * scale + zero, the zero of the centred codes PyTorch's int4 kernels store;
    symmetric ones are signed, the weight code * scale."""
    w = weight.detach().float()
    rows, columns = w.shape
    group = grid.group or columns
    if columns % group:
        raise ValueError(f"{columns} columns do not split into groups of {group}")
    g = w.reshape(rows, columns // group, group)
    levels = (1 << grid.bits) - 1
    if grid.asymmetric:
        low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((high - low) / levels).clamp_min(1e-12).bfloat16()
        zero = (low + (1 << (grid.bits - 1)) * scale.float()).bfloat16()
        return ((g - low) / scale.float()).round().clamp(0, levels), scale, zero
    top = levels // 2  # 127 or 7: a symmetric grid
    scale = (g.abs().amax(-1, keepdim=True) / top).clamp_min(1e-12).bfloat16()
    return (g / scale.float()).round().clamp(-top - 1, top), scale, None


def fake_quantize(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """`weight` (rows, columns) rounded onto `grid` and dequantized, in float32."""
    codes, scale, zero = quantize_grid(weight, grid)
    if zero is None:
        return (codes * scale.float()).reshape(weight.shape)
    return ((codes - (1 << (grid.bits - 1))) * scale.float() + zero.float()).reshape(weight.shape)


def fake_quantized(model: nn.Module, grid: WeightGrid) -> nn.Module:
    """A copy of `model` whose MLP weights are rounded onto `grid` (the rest unchanged)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in out.named_modules():
            if name.endswith(".mlp"):
                for projection in MLP_PROJECTIONS:
                    linear = getattr(module, projection)
                    linear.weight.copy_(fake_quantize(linear.weight, grid).to(linear.weight.dtype))
    return out


class WeightOnlyLinear(nn.Module):
    """A bias-free Linear whose weights are int8 per row or int4 asymmetric per group, run by
    PyTorch's CPU weight-only kernels on bf16 activations (the output in the input's dtype)."""

    def __init__(self, linear: nn.Linear, grid: WeightGrid) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("weight-only baselines take bias-free projections")
        if grid not in (INT8_ROW,) and not (grid.bits == 4 and grid.asymmetric and grid.group):
            raise ValueError(f"no PyTorch CPU kernel runs {grid.name}")
        self.grid, self.out_features, self.in_features = grid, linear.out_features, linear.in_features
        codes, scale, zero = quantize_grid(linear.weight, grid)
        if grid.bits == 8:
            self.register_buffer("codes", codes.reshape(self.out_features, -1).to(torch.int8))
            self.register_buffer("scales", scale.reshape(-1))
        else:
            q = codes.reshape(self.out_features, -1).to(torch.int32)
            self.register_buffer("codes", torch._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales_and_zeros",
                                 torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.grid.bits == 8:
            out = torch._weight_int8pack_mm(x, self.codes, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(x, self.codes, self.grid.group, self.scales_and_zeros)
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    def weight_bytes(self) -> float:
        return self.out_features * self.grid.row_bytes(self.in_features)


def weight_only_mlp(mlp: nn.Module, grid: WeightGrid) -> nn.Module:
    """A copy of a gated MLP block with its three projections as `WeightOnlyLinear`."""
    out = copy.deepcopy(mlp)
    for projection in MLP_PROJECTIONS:
        setattr(out, projection, WeightOnlyLinear(getattr(mlp, projection), grid))
    return out


def weight_only_mlps(model: nn.Module, grid: WeightGrid) -> nn.Module:
    """A copy of `model` in bf16 whose MLP blocks run `WeightOnlyLinear` on `grid`."""
    out = copy.deepcopy(model).to(torch.bfloat16)
    for layer in out.model.layers:
        layer.mlp = weight_only_mlp(layer.mlp, grid)
    return out


def torchao_mlps(model: nn.Module, grid: WeightGrid) -> nn.Module:
    """A copy of `model` in bf16 whose MLP projections torchao quantizes weight-only (int8 per
    channel, or int4 with asymmetric groups), as `TorchAoConfig` does for HF users. Raises where
    torchao cannot (not installed, or no CPU layout for the format)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if grid == INT8_ROW:
        config = Int8WeightOnlyConfig()
    elif grid.bits == 4 and grid.asymmetric and grid.group:
        config = Int4WeightOnlyConfig(group_size=grid.group)
    else:
        raise ValueError(f"torchao has no weight-only config for {grid.name}")
    out = copy.deepcopy(model).to(torch.bfloat16)
    quantize_(out, config, filter_fn=lambda module, name: isinstance(module, nn.Linear) and ".mlp." in f".{name}")
    return out


def mlp_bytes(hidden: int, intermediate: int, grid: Optional[WeightGrid]) -> float:
    """Weight bytes one dense MLP block reads per step: bf16 (grid None) or `grid`."""
    if grid is None:
        return 2.0 * 3 * hidden * intermediate
    return 2 * intermediate * grid.row_bytes(hidden) + hidden * grid.row_bytes(intermediate)
