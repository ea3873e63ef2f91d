"""Reference points for the quality benchmark (benchmarks/quality.py), applied to a dense model's MLPs in place.

- `TealMLP`: training-free activation sparsity in the manner of TEAL (Liu et al., 2024): the
  smallest-magnitude entries of each projection's input are zeroed, with per-layer thresholds
  calibrated so that a target fraction of the MLP's weight columns is read.
- `OracleTopKMLP`: keeps each token's true top-k neurons by |act(g) * u|, the ceiling of any
  neuron-selecting gate at that density (it needs the full dense pre-activations to know them).
- `OracleThresholdMLP`: keeps the neurons whose true |act(g) * u| exceeds a per-layer threshold
  calibrated to a density: the ceiling of threshold selection.
- `CatsMLP`: the CATS criterion (Lee et al., 2024): all of gate_proj is read, and only neurons with
  |act(g)| above a calibrated threshold read their up_proj and down_proj rows.

Both count what they actually keep, so the benchmark reports measured fractions.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTILE_SAMPLE = 1 << 22  # torch.quantile's input limit is 2**24 elements


def _magnitude_quantile(values: torch.Tensor, q: float, generator: torch.Generator) -> torch.Tensor:
    if q <= 0:  # keep everything, also inputs smaller than any seen in calibration
        return torch.zeros((), dtype=torch.float32)
    flat = values.detach().abs().float().reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(0, flat.numel(), (QUANTILE_SAMPLE,), generator=generator)]
    return torch.quantile(flat, q)


class TealMLP(nn.Module):
    """A dense gated MLP whose projection inputs are thresholded by magnitude (TEAL-style).

    With the same sparsity `s` for the hidden input (read by gate_proj and up_proj) and for the
    intermediate input (read by down_proj), the fraction of weights read is `1 - s`.
    """

    def __init__(self, mlp: nn.Module, input_threshold: torch.Tensor, inner_threshold: torch.Tensor) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("input_threshold", input_threshold.reshape(()))
        self.register_buffer("inner_threshold", inner_threshold.reshape(()))
        self.kept_inputs = 0.0
        self.kept_inner = 0.0
        self.tokens = 0

    @classmethod
    @torch.no_grad()
    def calibrated(cls, mlp: nn.Module, inputs: torch.Tensor, weight_fraction: float, seed: int = 0) -> "TealMLP":
        generator = torch.Generator().manual_seed(seed)
        sparsity = min(max(1.0 - weight_fraction, 0.0), 1.0)
        x = inputs.to(mlp.gate_proj.weight.dtype)
        input_threshold = _magnitude_quantile(x, sparsity, generator)
        x = torch.where(x.abs() >= input_threshold, x, torch.zeros_like(x))
        inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return cls(mlp, input_threshold, _magnitude_quantile(inner, sparsity, generator))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        keep = hidden_states.abs() >= self.input_threshold
        x = hidden_states * keep
        inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        keep_inner = inner.abs() >= self.inner_threshold
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        self.kept_inputs += float(keep.sum()) / hidden_states.shape[-1]
        self.kept_inner += float(keep_inner.sum()) / inner.shape[-1]
        self.tokens += tokens
        return mlp.down_proj(inner * keep_inner)

    def unit_fraction(self) -> float:
        """Fraction of intermediate neurons kept for down_proj."""
        return self.kept_inner / self.tokens

    def measured_weight_fraction(self) -> float:
        """Fraction of the MLP's weights read per token: gate and up read the kept input columns,
        down reads the kept intermediate columns (all three projections are equally big)."""
        return (2 * self.kept_inputs + self.kept_inner) / (3 * self.tokens)


class OracleTopKMLP(nn.Module):
    """A dense gated MLP that keeps each token's `k` largest |act(g) * u| neurons."""

    def __init__(self, mlp: nn.Module, density: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.k = max(1, round(density * mlp.up_proj.out_features))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        inner = mlp.act_fn(mlp.gate_proj(hidden_states)) * mlp.up_proj(hidden_states)
        index = inner.abs().topk(self.k, dim=-1, sorted=False).indices
        kept = torch.zeros_like(inner).scatter(-1, index, inner.gather(-1, index))
        return mlp.down_proj(kept)

    def unit_fraction(self) -> float:
        return self.k / self.mlp.up_proj.out_features


def wrap_mlps(layers, mlp_attr: str, wrap) -> list[nn.Module]:
    """Replace every layer's MLP by `wrap(index, mlp)`; returns the wrappers (undo with `unwrap_mlps`)."""
    wrappers = []
    for index, layer in enumerate(layers):
        wrapper = wrap(index, getattr(layer, mlp_attr))
        setattr(layer, mlp_attr, wrapper)
        wrappers.append(wrapper)
    return wrappers


def unwrap_mlps(layers, mlp_attr: str) -> None:
    for layer in layers:
        setattr(layer, mlp_attr, getattr(layer, mlp_attr).mlp)


def _score_threshold(scores: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    return _magnitude_quantile(scores, 1.0 - density, generator)


class _ThresholdedMLP(nn.Module):
    """A dense gated MLP whose neurons are kept by a calibrated threshold; counts what it keeps."""

    def __init__(self, mlp: nn.Module, threshold: torch.Tensor) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("threshold", threshold.reshape(()))
        self.kept, self.tokens = 0.0, 0

    def _keep(self, scores: torch.Tensor) -> torch.Tensor:
        keep = scores.abs() > self.threshold
        self.kept += float(keep.sum()) / scores.shape[-1]
        self.tokens += scores.numel() // scores.shape[-1]
        return keep

    def unit_fraction(self) -> float:
        return self.kept / self.tokens


class OracleThresholdMLP(_ThresholdedMLP):
    """Keeps the neurons whose |act(g) * u| exceeds `threshold`."""

    @classmethod
    @torch.no_grad()
    def calibrated(cls, mlp: nn.Module, inputs: torch.Tensor, density: float, seed: int = 0) -> "OracleThresholdMLP":
        x = inputs.to(mlp.gate_proj.weight.dtype)
        inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return cls(mlp, _score_threshold(inner.abs(), density, torch.Generator().manual_seed(seed)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        inner = mlp.act_fn(mlp.gate_proj(hidden_states)) * mlp.up_proj(hidden_states)
        return mlp.down_proj(inner * self._keep(inner))


class CatsMLP(_ThresholdedMLP):
    """CATS: threshold |act(g)|; gate_proj is read whole, up_proj and down_proj only for kept neurons."""

    @classmethod
    @torch.no_grad()
    def calibrated(cls, mlp: nn.Module, inputs: torch.Tensor, weight_fraction: float, seed: int = 0) -> "CatsMLP":
        density = min(1.0, max(0.0, (weight_fraction - 1 / 3) * 3 / 2))  # gate_proj is a third of the bytes
        x = inputs.to(mlp.gate_proj.weight.dtype)
        gate = mlp.act_fn(mlp.gate_proj(x)).abs()
        return cls(mlp, _score_threshold(gate, density, torch.Generator().manual_seed(seed)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        gate = mlp.act_fn(mlp.gate_proj(hidden_states))
        return mlp.down_proj(gate * mlp.up_proj(hidden_states) * self._keep(gate))

    def measured_weight_fraction(self) -> float:
        return (1 + 2 * self.unit_fraction()) / 3
