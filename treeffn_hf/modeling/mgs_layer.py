"""Micro-gated MLP (MGS): the dense SwiGLU weights plus a small gate that picks neurons per token.

`gate_proj` / `up_proj` / `down_proj` keep the Hugging Face names and shapes, so dense weights load
unchanged. The predictor (`micro_gate`: a 4-bit view of gate/up, or a trained linear gate; mgs_predictors.py)
scores every intermediate neuron; only the selected ones are computed. With the nested predictor
gate/up are snapped to an 8-bit grid whose high nibbles are the predictor's codes and down_proj
to bf16; on the CPU the C kernel (mgs_kernels_cpu.py) reads that format directly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dispatch import KernelPolicyMixin, choose_path, initial_policy
from .layer_spec import MGSSpec
from .mgs_kernels_cpu import (
    decode_step,
    fused_bytes_read,
    layer_unsupported_reason,
    mgs_nested_amx,
    mgs_nested_cpu,
    nested_scores_cpu,
)
from .mgs_predictors import LinearGate, QuantizedPredictor, snap_down, snap_gate_up
from .mgs_reference import mgs_masked_dense
from .mgs_selection import selection_mask
from .mgs_torch import bf16_weights_bytes, mgs_scored_bf16, mgs_torch_path, torch_path_bytes
from .sparse_cost import SERVED_BYTES_PER_WEIGHT, SparseCost


def build_predictor(spec: MGSSpec, hidden_size: int, intermediate_size: int, act_fn: nn.Module) -> nn.Module:
    """The neuron predictor `spec.predictor` names (see mgs_predictors.py)."""
    if spec.predictor in ("nested", "quantized"):
        return QuantizedPredictor(hidden_size, intermediate_size, spec.group_size, act_fn)
    return LinearGate(hidden_size, intermediate_size, spec.rank)




class MicroGatedMLP(KernelPolicyMixin, nn.Module):
    """Drop-in replacement for a gated MLP block that computes only the gate-selected neurons."""

    sparse_method = "mgs"

    def __init__(
        self, hidden_size: int, intermediate_size: int, spec: MGSSpec, act_fn: nn.Module, bias: bool = False
    ) -> None:
        super().__init__()
        self.spec = spec.resolve(hidden_size, intermediate_size)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = act_fn
        self.micro_gate = build_predictor(self.spec, hidden_size, intermediate_size, act_fn)
        # Calibrated per layer for selection='threshold'; saved with the checkpoint.
        self.register_buffer("gate_threshold", torch.zeros(()))
        self._tokens_seen = 0
        self._units_selected = 0.0  # a tensor once a batched path adds to it (no host sync)
        self._units_counted = 0  # what the CPU kernel reports, a Python int
        # Fine-tuning through the top-k mask: "straight_through" adds sigmoid(s) - stop_grad(sigmoid(s))
        # to the 0/1 mask (same forward value), so the gate learns from every neuron's contribution.
        self.gate_gradient: Optional[str] = None
        # Progressive sparsity, on the training (reference) path only: 0 computes every neuron, 1
        # the calibrated selection; inference paths always use the calibrated selection.
        self.selection_ramp = 1.0
        self.kernel_policy = initial_policy()
        self.last_path: Optional[str] = None

    @property
    def keeps_float32_weights(self) -> bool:
        """Whether a bf16 model keeps this layer's weights in float32: the nested 8-bit grid and the
        int8 down rows hold values bf16 cannot (the kernels read packed copies, not these)."""
        return self.spec.predictor == "nested"

    @property
    def computes_everything(self) -> bool:
        return self.spec.selection == "top_k" and self.spec.top_k(self.intermediate_size) == self.intermediate_size

    def forward(self, hidden_states: torch.Tensor, bf16_model: bool = False) -> torch.Tensor:
        """`bf16_model`: the tokens came in bf16, so the many-token CPU path may multiply in bf16; a
        float32 model's output never depends on the batch's path."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        fused = decode_step(self, x)  # the fused kernel where the dispatch would surely take it
        if fused is not None:
            return self._counted("cpu", x, *fused).reshape(shape)
        if self.computes_everything:
            return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        path = choose_path(self, x)
        weight_dtype = self.gate_proj.weight.dtype
        if path == "cpu" or x.dtype == weight_dtype or torch.is_autocast_enabled(x.device.type):
            return self._run(x, path, bf16_model).reshape(shape)
        # A nested layer in a bf16 model keeps float32 weights (modeling_treeffn): the fused kernel
        # (above) takes its bf16 tokens as they are, the other paths a float32 copy, and give bf16 back.
        bf16 = x.dtype == torch.bfloat16
        return self._run(x.to(weight_dtype), path, bf16_model=bf16).to(x.dtype).reshape(shape)

    def _run(self, x: torch.Tensor, path: str, bf16_model: bool) -> torch.Tensor:
        """The layer on x (tokens, hidden) through `path`."""
        self.__dict__["last_path"] = path  # see _counted
        if path in ("cpu", "cpu:amx"):  # the kernel scores, selects and computes in one call
            return self._counted(path, x, *(mgs_nested_cpu if path == "cpu" else mgs_nested_amx)(self, x))
        if path == "cpu:scores":  # the kernel scores; bf16 GEMMs (a bf16 model) or the PyTorch path's compute
            compute = mgs_scored_bf16 if bf16_model else mgs_torch_path
            return compute(self, x, nested_scores_cpu(self, x))
        scores = self.micro_gate(x)
        if path == "triton":
            from .mgs_kernels import mgs_triton  # imports triton only when the kernels run

            out, self.last_path = mgs_triton(self, x, scores)
            return out
        if path == "torch":
            return mgs_torch_path(self, x, scores)
        mask = selection_mask(scores, self.spec, self.gate_threshold, self.selection_ramp).to(scores.dtype)
        self._record_density(mask)
        # A quantised predictor has no parameters: its scores carry no gradient, nor would the term.
        if self.gate_gradient == "straight_through" and scores.requires_grad:
            soft = torch.sigmoid(scores)
            mask = mask + soft - soft.detach()
        elif self.gate_gradient not in (None, "straight_through"):
            raise ValueError(f"gate_gradient must be None or 'straight_through', got {self.gate_gradient!r}")
        return mgs_masked_dense(self, x, mask)

    def _counted(self, path: str, x: torch.Tensor, out: torch.Tensor, selected: int) -> torch.Tensor:
        """A CPU kernel's output, its path and the neurons it computed recorded."""
        # Plain attributes set through __dict__: nn.Module.__setattr__ costs ~15 us a call, and a
        # decode step on the CPU kernel makes three of them per layer (measured in generate()).
        state = self.__dict__
        state["last_path"] = path
        state["_tokens_seen"] += x.shape[0]
        state["_units_counted"] += selected
        return out

    @torch.no_grad()
    def _record_density(self, mask: torch.Tensor) -> None:
        # Kept as a tensor: no host sync per layer on a GPU.
        self._record_count(mask.sum(dtype=torch.float32), tokens=mask.numel() // self.intermediate_size)

    def _record_count(self, units, tokens: int) -> None:
        self._tokens_seen += tokens
        self._units_selected = self._units_selected + units

    def reset_density(self) -> None:
        self._tokens_seen, self._units_selected, self._units_counted = 0, 0.0, 0

    def measured_units(self) -> Optional[float]:
        """Mean neurons selected per token since the last reset, or None before any token."""
        return (float(self._units_selected) + self._units_counted) / self._tokens_seen if self._tokens_seen else None

    def cost(self) -> SparseCost:
        """Per token at batch 1, the weight bytes as the path that CPU inference runs reads them
        (`bytes_read`), against the dense MLP's bf16 bytes."""
        if self.spec.selection == "top_k":
            units = float(self.spec.top_k(self.intermediate_size))
        else:
            measured = self.measured_units()
            units = measured if measured is not None else self.spec.density * self.intermediate_size
        if self.computes_everything:  # the plain MLP, as stored
            active = self.gate_proj.weight.element_size() * 3 * units * self.hidden_size
        else:
            active = sum(self.bytes_read(1, units).values())
        return SparseCost(
            active_units=units,
            total_units=self.intermediate_size,
            active_weight_bytes=active,
            dense_weight_bytes=SERVED_BYTES_PER_WEIGHT * 3 * self.intermediate_size * self.hidden_size,
        )

    def bytes_read(self, tokens: int, union: float, bf16_model: bool = True) -> dict[str, float]:
        """Weight bytes, per operand, that CPU inference reads for a batch of `tokens` whose
        selections cover `union` neurons: the C kernel's where it implements this layer (as it runs
        on CPUs with AVX-512 VNNI; mgs_kernels_cpu.fused_bytes_read), else the PyTorch path's
        (mgs_torch.torch_path_bytes). Past the fused kernel's tokens (`cpu:scores`): its scoring, then
        the bf16 matrices (`bf16_model`) or the PyTorch path's reads. Each count lives beside the code
        that reads the bytes."""
        if layer_unsupported_reason(self) is None:
            if tokens <= self.kernel_policy.cpu_fused_max_tokens:
                return fused_bytes_read(self, tokens, union)
            scoring = {name: value for name, value in fused_bytes_read(self, tokens, 0).items()
                       if name in ("codes_blocks", "scales_t", "zeros_t")}
            if bf16_model:
                return scoring | {"bf16_weights": float(bf16_weights_bytes(self))}
            return scoring | {name: value for name, value in torch_path_bytes(self, tokens, union).items()
                              if name != "predictor"}
        return torch_path_bytes(self, tokens, union)

    @torch.no_grad()
    def requantize(self) -> None:
        """Rebuild the 4-bit predictor from the current gate/up weights (after training moved
        them) and, for the nested predictor, snap the weights back onto its grids."""
        if self.spec.predictor == "linear":
            return
        gate, up = self.gate_proj.weight, self.up_proj.weight
        for name, value in QuantizedPredictor.state_from(gate, up, self.spec.group_size).items():
            getattr(self.micro_gate, name).copy_(value)
        if self.spec.predictor == "nested":
            self.snap_to_predictor_grid()

    @torch.no_grad()
    def snap_to_predictor_grid(self) -> None:
        """Round gate_proj/up_proj onto the nested 8-bit grid of the predictor's codes, and
        down_proj onto its `down_format`: the values the nested layer stores (and its CPU kernel reads)."""
        buffers = {name: getattr(self.micro_gate, name) for name in ("codes", "scales", "zeros")}
        gate, up = snap_gate_up(self.gate_proj.weight, self.up_proj.weight, buffers)
        self.gate_proj.weight.copy_(gate)
        self.up_proj.weight.copy_(up)
        self.down_proj.weight.copy_(snap_down(self.down_proj.weight, self.spec.down_format, self.spec.group_size))

    def extra_repr(self) -> str:
        s = self.spec
        predictor = f"rank={s.rank}" if s.predictor == "linear" else f"4-bit, groups of {s.group_size}"
        if s.predictor == "nested":
            predictor += ", the high nibbles of 8-bit gate/up"
        return f"density={s.density}, predictor={s.predictor} ({predictor}), selection={s.selection}"
