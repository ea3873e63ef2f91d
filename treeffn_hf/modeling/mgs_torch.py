"""Fast PyTorch inference path of the micro-gated MLP (CPU, and the GPU fallback).

- one token (decode): gather the selected rows of `gate_proj`/`up_proj` (rows are contiguous in
  the stock layout) and sum the selected rows of the transposed `down_proj` with `embedding_bag`,
  which reads them in place;
- many tokens: compute the union of the selected neurons once and mask per token;
- once the selection (or the union) covers more than the kernel policy's
  `mgs_torch_gather_max_fraction` of the neurons, the gather copies cost more than they save, and
  the dense matmuls run with the mask instead.

The result equals `mgs_masked_dense` (tests hold it to that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mgs_selection import selection_mask, token_rows


def down_rows(layer) -> torch.Tensor:
    """`down_proj.weight` transposed and contiguous (one row per neuron), cached until it changes."""
    weight = layer.down_proj.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    cached = getattr(layer, "_down_rows_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().t().contiguous())
        layer._down_rows_cache = cached
    return cached[1]


def down_rows_bytes(layer) -> int:
    """Bytes of the `down_rows` copy (made at the first gather, kept beside the layer)."""
    weight = layer.down_proj.weight
    return weight.numel() * weight.element_size()


def torch_path_bytes(layer, tokens: int, union: float) -> dict[str, float]:
    """Weight bytes `mgs_torch_path` reads for a batch of `tokens` whose selections cover `union`
    neurons: the predictor's, then the union's rows of gate_proj, up_proj and of the transposed
    down_proj at the weights' own element size while the union is within the policy's gather
    fraction, else all three matrices (the masked dense matmuls). A test poisons the rows it
    claims not to read with NaN."""
    weight = layer.gate_proj.weight
    element, hidden, width = weight.element_size(), layer.hidden_size, layer.intermediate_size
    max_fraction = layer.kernel_policy.mgs_torch_gather_max_fraction
    # as mgs_torch_path decides: a batch expected to cover too much skips measuring its union
    gathered = union <= max_fraction * width and (
        tokens == 1 or not _union_expected_too_large(layer, tokens, max_fraction))
    rows = union if gathered else width
    device = "cpu" if weight.is_meta else weight.device  # meta: a layer built to describe a checkpoint, as on the CPU
    return {"predictor": layer.micro_gate.bytes_read(tokens, device),
            "gate_up": 2 * rows * hidden * element, "down": rows * hidden * element}


def bf16_weights(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_proj, up_proj and down_proj rounded to bf16 (the nested grids keep 8 of their bits),
    cached beside the layer until a weight changes: what the many-token CPU path multiplies."""
    weights = tuple(getattr(layer, name).weight for name in ("gate_proj", "up_proj", "down_proj"))
    key = tuple((w.data_ptr(), w._version) for w in weights)
    cached = layer.__dict__.get("_bf16_weights")
    if cached is None or cached[0] != key:
        cached = (key, tuple(w.detach().to(torch.bfloat16).contiguous() for w in weights))
        layer.__dict__["_bf16_weights"] = cached
    return cached[1]


def bf16_weights_bytes(layer) -> int:
    """Bytes of the `bf16_weights` copy (made at the first many-token CPU call, kept beside the layer)."""
    return 2 * 3 * layer.hidden_size * layer.intermediate_size


def mgs_scored_bf16(layer, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Many tokens on the CPU, after the C kernel's scores: the kernel's selection as a mask on bf16
    GEMMs (oneDNN) over `bf16_weights`, so a prefill costs a dense bf16 MLP's GEMMs plus the scoring
    whatever the union covers (the same neurons as the fused kernel, the weights rounded to bf16)."""
    selected = selection_mask(scores, layer.spec, layer.gate_threshold)
    layer._record_density(selected)
    gate, up, down = bf16_weights(layer)
    tokens = x.to(torch.bfloat16)
    hidden = layer.act_fn(F.linear(tokens, gate)) * F.linear(tokens, up) * selected.to(torch.bfloat16)
    return F.linear(hidden, down).to(x.dtype)


def _gathered(layer, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = layer.gate_proj, layer.up_proj
    g = F.linear(x, gate.weight.index_select(0, rows), None if gate.bias is None else gate.bias[rows])
    u = F.linear(x, up.weight.index_select(0, rows), None if up.bias is None else up.bias[rows])
    return layer.act_fn(g), u


def _union_expected_too_large(layer, tokens: int, max_fraction: float) -> bool:
    """Whether the selections of this many tokens are all but sure to cover more than
    `max_fraction` of the neurons (independent selections at the layer's density, the
    top-k fraction or a threshold's calibrated mean: 1 - (1 - d)^N), so that measuring the union
    (a host sync) is not worth it."""
    expected = 1.0 - (1.0 - layer.spec.density) ** tokens
    return expected > 2 * max_fraction


def mgs_torch_path(layer, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Sparse forward of `layer` (a MicroGatedMLP) for x: (N, hidden) and its gate scores (N, H)."""
    bias = layer.down_proj.bias
    width = scores.shape[-1]
    max_fraction = layer.kernel_policy.mgs_torch_gather_max_fraction
    if x.shape[0] == 1:
        rows = token_rows(scores[0], layer.spec, layer.gate_threshold)
        layer._record_count(rows.numel(), tokens=1)
        if rows.numel() == 0:  # a threshold can select nothing: the MLP adds only its bias
            out = torch.zeros_like(x)
            return out if bias is None else out + bias
        if rows.numel() <= max_fraction * width:
            g, u = _gathered(layer, x, rows)
            out = F.embedding_bag(rows[None], down_rows(layer), per_sample_weights=g * u, mode="sum")  # in place
            return out if bias is None else out + bias
        selected = torch.zeros_like(scores, dtype=torch.bool)
        selected[0, rows] = True
    else:
        selected = selection_mask(scores, layer.spec, layer.gate_threshold)
        layer._record_density(selected)
        if not _union_expected_too_large(layer, x.shape[0], max_fraction):
            union = selected.any(dim=0).nonzero().squeeze(1)  # one host sync: the union's size
            if union.numel() <= max_fraction * layer.intermediate_size:
                g, u = _gathered(layer, x, union)
                out = (g * u * selected[:, union]) @ down_rows(layer).index_select(0, union)
                return out if bias is None else out + bias
    # most neurons are needed: dense matmuls with the selection as a mask
    hidden = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x) * selected
    return layer.down_proj(hidden)
