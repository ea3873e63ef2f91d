"""Calibration of the 4-bit predictor's codes: GPTQ instead of round-to-nearest.

The predictor's copies of gate_proj and up_proj are only read to rank neurons, so what matters is
the error of their *outputs* on real inputs, not of the weights. GPTQ (Frantar et al., 2022)
chooses the codes column by column and pushes each column's rounding error onto the columns not
yet quantised, weighted by the inverse Hessian X^T X of the layer's calibration inputs. Same
format, same bytes, same kernels as round-to-nearest; the grid of each group is fixed from the
error-updated weights when the sweep reaches it.
"""

from __future__ import annotations

import torch

from ..modeling.predictors import dequantize_int4, int4_codes, int4_grid, pack_nibbles

DAMPING = 0.01  # of the mean Hessian diagonal, added for a stable Cholesky factor


def input_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X / n (hidden, hidden), float64 for a stable factorisation, of (n, hidden) inputs."""
    x = inputs.double()
    return x.T @ x / x.shape[0]


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
              damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes (N, K) uint8 and bf16 scales, zeros (N, K / group_size) of `weight` (N, K), in the
    layout of `quantize_int4` (which it falls back to when the Hessian is all zero)."""
    rows, width = weight.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    w = weight.detach().double().clone()
    w[:, dead] = 0
    h[dead, dead] = 1
    h += damping * torch.diagonal(h).mean() * torch.eye(width, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the later columns.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(rows, width, dtype=torch.uint8)
    scales = torch.empty(rows, width // group_size, dtype=torch.bfloat16)
    zeros = torch.empty_like(scales)
    for group, start in enumerate(range(0, width, group_size)):
        end = start + group_size
        block, block_inverse = w[:, start:end].clone(), inverse[start:end, start:end]
        scale, zero = int4_grid(block.amin(-1), block.amax(-1))
        scales[:, group], zeros[:, group] = scale, zero
        errors = torch.empty_like(block)
        for i in range(group_size):
            column = block[:, i]
            code = int4_codes(column, scale, zero)
            codes[:, start + i] = code.to(torch.uint8)
            rounded = dequantize_int4(code[:, None].to(torch.uint8), scale[:, None], zero[:, None])[:, 0].double()
            errors[:, i] = (column - rounded) / block_inverse[i, i]
            block[:, i:] -= errors[:, i : i + 1] * block_inverse[i : i + 1, i:]
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales, zeros


@torch.no_grad()
def refit_predictor(layer, inputs: torch.Tensor) -> None:
    """Re-choose `layer`'s (a MicroGatedMLP with the quantized predictor) 4-bit codes by GPTQ on
    its calibration `inputs` (tokens, hidden)."""
    predictor = layer.micro_gate
    weight = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).float().cpu()
    codes, scales, zeros = gptq_int4(weight, input_hessian(inputs.float().cpu()), predictor.group_size)
    device = predictor.codes.device
    predictor.codes.copy_(pack_nibbles(codes).to(device))
    predictor.scales.copy_(scales.to(device))
    predictor.zeros.copy_(zeros.to(device))
