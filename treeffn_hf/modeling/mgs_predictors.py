"""Neuron predictors of the micro-gated MLP: a score per intermediate neuron, before any is computed.

- `QuantizedPredictor` (`predictor="nested"`, the default, and `"quantized"`): group-wise 4-bit
  copies of `gate_proj` and `up_proj`. The score is |silu(g~) * u~|, the oracle's own criterion
  on the quantised weights; it needs no training. With `"nested"` the layer's gate/up weights
  are snapped to an 8-bit grid whose high nibbles are these codes (`snap_to_nested_grid`, and
  down_proj to int8 rows, `snap_down`), so the predictor is half of the weights rather than an extra copy; the CPU
  kernel (mgs_kernels_cpu.py) reads the codes itself. Elsewhere (the PyTorch and reference paths)
  small CPU batches are scored by torch's packed int4 matmul (bf16 inputs) and the rest
  dequantise per call.
- `LinearGate` (`predictor="linear"`): a trained gate, `scorer(encoder(x))` (low rank) or
  `scorer(x)` (`rank=None`); the score is a logit. Kept as the baseline.

Each predictor says how many bytes a token reads from it (`num_bytes`), counted as served:
weights in bf16 (2 bytes, whatever the storage dtype), packed codes at their bit width, and their
bf16 scales. That is what the MGS layer's weight fraction adds to the selected rows.
This file is part of the remote-code bundle.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .sparse_cost import SERVED_BYTES_PER_WEIGHT

CODE_OFFSET = 8  # 4-bit codes 0..15 around a zero point, the layout of torch's int4 CPU matmul
INT4_MM_GROUPS = (32, 64, 128, 256)  # group sizes the packed int4 CPU matmul accepts
# The int4 CPU matmul is a decode kernel: past a few rows a dequantised fp32 GEMM is faster
# (SmolLM2 shape, one thread, an informal timing: 0.18 ms vs 0.97 ms at 1 token, 16 ms vs 6 ms at 256).
INT4_MM_MAX_TOKENS = 16


class LinearGate(nn.Module):
    """`scorer(encoder(x))` with a low-rank bottleneck, or `scorer(x)` when `rank is None`."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: Optional[int]) -> None:
        super().__init__()
        self.encoder = nn.Linear(hidden_size, rank, bias=False) if rank is not None else None
        self.scorer = nn.Linear(rank if rank is not None else hidden_size, intermediate_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is not None:
            x = self.encoder(x)
        return self.scorer(x)

    def num_bytes(self) -> int:
        return SERVED_BYTES_PER_WEIGHT * sum(p.numel() for p in self.parameters())

    def bytes_read(self, tokens: int, device: torch.device) -> int:
        """Bytes a forward reads: every parameter at its element size."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit quantisation of `weight` (N, K) in groups of `group_size`
    along K: returns codes (N, K) uint8 in [0, 15] and bf16 scales, zeros (N, K / group_size), with
    w ~ (code - 8) * scale + zero. Scales and zeros are rounded to bf16 before the codes are
    chosen, so the codes are the nearest for the stored grid."""
    rows, width = weight.shape
    groups = weight.detach().float().reshape(rows, width // group_size, group_size)
    scale, zero = int4_grid(groups.amin(-1), groups.amax(-1))
    codes = int4_codes(groups, scale[..., None], zero[..., None])
    return codes.to(torch.uint8).reshape(rows, width), scale, zero


def int4_grid(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (scale, zero) of the 16-level grid spanning [low, high], elementwise."""
    scale = ((high - low) / 15).clamp_min(1e-8).to(torch.bfloat16)
    return scale, (low + CODE_OFFSET * scale.float()).to(torch.bfloat16)


def int4_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The nearest grid codes (float, 0..15) of `values` on (scale, zero), broadcast."""
    return ((values - zero.float()) / scale.float() + CODE_OFFSET).round().clamp(0, 15)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight (N, K) that codes (N, K), scale and zero (N, K / group) stand for."""
    rows, width = codes.shape
    groups = codes.reshape(rows, scale.shape[1], -1).float() - CODE_OFFSET
    return (groups * scale.float()[..., None] + zero.float()[..., None]).reshape(rows, width)


def snap_to_nested_grid(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor) -> torch.Tensor:
    """`weight` (N, K) rounded onto the 8-bit grid nested in a 4-bit one: the 4-bit value of
    `codes` (N, K) plus a 4-bit residual in [-8, 7] steps of scale / 16. A kernel can then read
    the high nibbles alone (the predictor) and add the low nibbles of the rows it computes."""
    high = dequantize_int4(codes, scale, zero)
    step = (scale.float() / 16).repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)
    return high + ((weight.float() - high) / step).round().clamp(-8, 7) * step


def snap_gate_up(gate: torch.Tensor, up: torch.Tensor, predictor_state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_proj and up_proj weights snapped onto the nested grid of a predictor's buffers
    (`codes`, `scales`, `zeros`, as `QuantizedPredictor.state_from` returns them), in their own
    dtype and device, as separate tensors."""
    both = torch.cat([gate, up]).detach()
    codes, scales, zeros = (predictor_state[name].cpu() for name in ("codes", "scales", "zeros"))
    snapped = snap_to_nested_grid(both.float().cpu(), unpack_nibbles(codes), scales, zeros)
    snapped = snapped.to(device=both.device, dtype=both.dtype)
    return tuple(part.clone() for part in snapped.split(gate.shape[0]))


def snap_to_bf16(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded to the nearest bf16 values, in its own dtype (down_format='bf16')."""
    return weight.detach().to(torch.bfloat16).to(weight.dtype)


def snap_down(weight: torch.Tensor, down_format: str, group_size: int) -> torch.Tensor:
    """down_proj on the grid its nested spec stores (`MGSSpec.down_format`), in its own dtype."""
    if down_format == "int8_rows":
        return snap_down_to_int8_rows(weight, group_size)
    return snap_to_bf16(weight)


def int8_row_grid(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """down_proj (K, I) as one int8 row per neuron (its output column): codes (I, K) int8 and bf16
    scales (I, K / group_size), symmetric, each group's largest magnitude at 127. The scale of
    values already on this grid comes back exactly (127 * scale is exact in float32), so the grid is
    read back from the values themselves."""
    rows = weight.detach().float().t()
    neurons, width = rows.shape
    groups = rows.reshape(neurons, width // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / 127).to(torch.bfloat16)
    step = scales.float().unsqueeze(-1)
    codes = torch.where(step > 0, groups / step.clamp_min(torch.finfo(torch.float32).tiny), 0).round().clamp(-127, 127)
    return codes.reshape(neurons, width).to(torch.int8).contiguous(), scales.contiguous()


def int8_row_values(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 down_proj (K, I) that `int8_row_grid` codes and scales stand for."""
    neurons, width = codes.shape
    groups = codes.float().reshape(neurons, scales.shape[1], -1) * scales.float().unsqueeze(-1)
    return groups.reshape(neurons, width).t()


def snap_down_to_int8_rows(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` (down_proj) rounded onto its int8 row grid, in its own dtype (the nested recipe's)."""
    return int8_row_values(*int8_row_grid(weight, group_size)).to(device=weight.device, dtype=weight.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K / 2) bytes, the even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def neuron_scores(gate: torch.Tensor, up: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """|act(g) * u|: how much each neuron contributes (the oracle criterion, and the quantised
    predictor's score on approximate g and u)."""
    return (act_fn(gate) * up).abs()


class QuantizedPredictor(nn.Module):
    """Scores |silu(g~) * u~| from 4-bit group-wise copies of gate_proj and up_proj.

    Buffers (saved with the checkpoint): `codes`, the packed nibbles of [gate_proj; up_proj]
    (2H, hidden / 2); `scales` and `zeros`, bf16 (2H, hidden / group_size). No parameters: the
    copies are fixed by the dense weights (`load_from`), not trained.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, group_size: int, act_fn: nn.Module) -> None:
        super().__init__()
        if hidden_size % 2 or hidden_size % group_size:
            raise ValueError(f"hidden size {hidden_size} must be even and a multiple of the group size {group_size}")
        self.hidden_size, self.intermediate_size, self.group_size = hidden_size, intermediate_size, group_size
        self.act_fn = act_fn
        groups = hidden_size // group_size
        self.register_buffer("codes", torch.zeros(2 * intermediate_size, hidden_size // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(2 * intermediate_size, groups, dtype=torch.bfloat16))
        self.register_buffer("zeros", torch.zeros(2 * intermediate_size, groups, dtype=torch.bfloat16))
        self._packed_cache = None
        self._dequantized_cache = None

    @staticmethod
    def state_from(gate_weight: torch.Tensor, up_weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
        """The buffers that quantise these dense weights (keys relative to the predictor)."""
        codes, scales, zeros = quantize_int4(torch.cat([gate_weight, up_weight]), group_size)
        return {"codes": pack_nibbles(codes), "scales": scales, "zeros": zeros}

    def dequantized(self) -> torch.Tensor:
        """[gate_proj; up_proj] as the predictor sees them, float32 (2H, hidden)."""
        return dequantize_int4(unpack_nibbles(self.codes), self.scales, self.zeros)

    def _state_key(self) -> tuple:
        # Changes whenever the buffers are replaced or written in place: the caches' validity.
        return (self.codes.data_ptr(), self.codes._version, self.scales._version, self.zeros._version)

    def _dequantized_operand(self) -> torch.Tensor:
        # Training rescores every batch with fixed codes: keep the float copy while in train mode
        # (eval drops it, so inference holds no float32 duplicate of the predictor).
        if not self.training:
            return self.dequantized()
        key = self._state_key()
        if self._dequantized_cache is None or self._dequantized_cache[0] != key:
            self._dequantized_cache = (key, self.dequantized())
        return self._dequantized_cache[1]

    def train(self, mode: bool = True):
        if not mode:
            self._dequantized_cache = None
        return super().train(mode)

    def uses_int4_matmul(self, x: torch.Tensor) -> bool:
        """Whether `x` is scored by torch's packed int4 CPU matmul (else dequantise and matmul)."""
        return self._int4_matmul_takes(x.shape[0], x.device)

    def _int4_matmul_takes(self, tokens: int, device: torch.device) -> bool:
        return (torch.device(device).type == "cpu" and tokens <= INT4_MM_MAX_TOKENS
                and self.group_size in INT4_MM_GROUPS
                and (2 * self.intermediate_size) % 16 == 0  # the packing's tile of output rows
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))

    def _int4_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._state_key()
        if self._packed_cache is None or self._packed_cache[0] != key:
            codes = unpack_nibbles(self.codes).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()  # (groups, 2H, 2)
            self._packed_cache = (key, (packed, scale_zero))
        return self._packed_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, H) float32 scores."""
        if self.uses_int4_matmul(x):
            packed, scale_zero = self._int4_operands()
            both = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), packed, self.group_size, scale_zero).float()
        else:
            both = F.linear(x.float(), self._dequantized_operand().to(x.device))
        gate, up = both.split(self.intermediate_size, dim=-1)
        return neuron_scores(gate, up, self.act_fn)

    def num_bytes(self) -> int:
        return self.codes.numel() + SERVED_BYTES_PER_WEIGHT * (self.scales.numel() + self.zeros.numel())

    def bytes_read(self, tokens: int, device: torch.device) -> int:
        """Bytes a forward on `tokens` tokens reads: the packed codes with their bf16 scales and
        zeros through the int4 matmul, else those to dequantise plus the float32 copy the matmul
        reads."""
        dequantized = 0 if self._int4_matmul_takes(tokens, device) else 4 * 2 * self.codes.numel()
        return self.num_bytes() + dequantized

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` must not touch the quantised format (a round trip through fp16 would
        # lose scales): a buffer whose dtype changed is moved to the new device instead.
        self._packed_cache = self._dequantized_cache = None
        saved = {name: getattr(self, name) for name in ("codes", "scales", "zeros")}
        result = super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return result
