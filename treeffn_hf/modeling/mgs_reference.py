"""The micro-gated MLP's plain references: the masked-dense layer (the oracle of every fast path,
and the training path) and the C kernel's math, its int8 rounding of the tokens included
(`mgs_nested_naive`, the oracle the kernel is held to tightly in tests/test_kernels_cpu.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .mgs_kernels_cpu import low_nibbles
from .mgs_predictors import unpack_nibbles


def mgs_hidden(layer, x: torch.Tensor) -> torch.Tensor:
    """act(gate_proj x) * up_proj x for every neuron, (N, H)."""
    return layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)


def mgs_masked_dense(layer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference computation: all neurons computed, unselected ones zeroed (zero gradient too)."""
    return layer.down_proj(mgs_hidden(layer, x) * mask)


def quantize_tokens(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (N, K) rounded as the kernel rounds it, returned dequantised (float32): per group of
    `group_size` columns, step = the largest magnitude / 127, q = round(x / step) and the residual
    r = round((x - step q) / (step / 256)), both int8, x ~ step (q + r / 256)."""
    groups = x.float().reshape(x.shape[0], -1, group_size)
    step = groups.abs().amax(-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    inverse = 1 / step  # the kernel's float32 operations, in its order
    whole = (groups * inverse).round().clamp(-127, 127)
    fine = ((groups - step * whole) * inverse * 256).round().clamp(-127, 127)
    return (step * (whole + fine / 256)).reshape(x.shape)


def mgs_nested_naive(layer, x: torch.Tensor, selected: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in plain PyTorch: (output, scores). The weight codes meet the
    int8-rounded tokens (`quantize_tokens`), the group zeros the exact ones; scores come from the
    high nibbles, the selection (unless `selected` is given) from the layer's threshold, and the
    selected neurons add their low nibbles, as the layer stores gate/up."""
    predictor = layer.micro_gate
    width, group = layer.intermediate_size, predictor.group_size
    codes, scales, zeros = unpack_nibbles(predictor.codes).float(), predictor.scales.float(), predictor.zeros.float()
    expand = lambda per_group: per_group.repeat_interleave(group, dim=1)  # noqa: E731
    rounded = quantize_tokens(x, group)
    coarse = F.linear(rounded, (codes - 8) * expand(scales)) + F.linear(x.float(), expand(zeros))
    fine = F.linear(rounded, (unpack_nibbles(low_nibbles(layer)).float() - 8) * expand(scales / 16))
    gate, up = coarse.split(width, dim=-1)
    scores = (F.silu(gate) * up).abs()
    gate_fine, up_fine = (coarse + fine).split(width, dim=-1)
    hidden = F.silu(gate_fine) * up_fine * (scores > layer.gate_threshold if selected is None else selected)
    return layer.down_proj(hidden), scores
