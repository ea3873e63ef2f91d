"""What a fine-tune trains, and how gradients cross the hard selections.

- `trainable`: "sparse" (the sparse MLPs only, the default) or "all".
- tree routing: "learned" (routers train; with `routing_gradient="straight_through"` hyperplane
  routers and self-routing node neurons also get the taken path's probability gradient),
  "frozen" (decisions fixed at their initial function: router parameters, or the routing
  neurons' gate rows for `routing='self'`, get no update), or "random" (hyperplane routers
  re-drawn at random, then frozen: the one-layer study's control).
- MGS: `gate_gradient="straight_through"` trains the gate through the top-k mask, with the dense
  weights trainable too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

ROUTING_MODES = ("learned", "frozen", "random")


def native_bf16() -> bool:
    """Whether bf16 autocast runs on bf16 hardware: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX, where autocast runs the fp32 step 2.14x as fast (README throughput table).
    Elsewhere torch emulates bf16 matmuls in software: 0.50x the fp32 step on a Xeon without them
    (train_throughput_cpu.json as of commit 4457192)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_training(
    model, *, trainable: str = "sparse", routing: str = "learned", routing_gradient: Optional[str] = "straight_through",
    gate_gradient: Optional[str] = "straight_through", seed: int = 0,
) -> dict:
    """Set requires_grad and gradient modes in place; returns a description for the run record."""
    if trainable not in ("sparse", "all"):
        raise ValueError(f"trainable must be 'sparse' or 'all', got {trainable!r}")
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
    model.requires_grad_(trainable == "all")
    generator = torch.Generator().manual_seed(seed)
    frozen_rows = 0
    for _, mlp in model.sparse_mlps():
        mlp.requires_grad_(True)
        if mlp.sparse_method == "mgs":
            mlp.gate_gradient = gate_gradient
            continue
        mlp.routing_gradient = routing_gradient if routing == "learned" else None
        if routing == "random":
            if mlp.spec.routing != "hyperplane":
                raise ValueError("routing='random' needs hyperplane routers; self-routing nodes route with their "
                                 "own neurons, which cannot be re-drawn without changing what they compute")
            with torch.no_grad():
                scale = mlp.router_weight.norm(dim=-1, keepdim=True).mean()
                draw = torch.randn(mlp.router_weight.shape, generator=generator)
                mlp.router_weight.copy_(torch.nn.functional.normalize(draw, dim=-1) * scale)
                mlp.router_bias.zero_()
        if routing != "learned":
            frozen_rows += freeze_routing(mlp)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "routing": routing, "routing_gradient": routing_gradient,
            "gate_gradient": gate_gradient, "trainable_parameters": trained, "frozen_routing_rows": frozen_rows}


def freeze_routing(mlp) -> int:
    """Stop the routing decisions of one tree layer from learning; returns the routing rows frozen."""
    if mlp.spec.routing == "hyperplane":
        mlp.router_weight.requires_grad_(False)
        mlp.router_bias.requires_grad_(False)
        return mlp.router_weight.shape[0] * mlp.router_weight.shape[1]
    # routing='self': the first neuron of each node routes; its gate row must not move.
    spec = mlp.spec
    rows = torch.arange(spec.num_trees * spec.num_nodes) * spec.node_width
    keep = torch.ones(mlp.gate_rows.shape[0], 1, dtype=mlp.gate_rows.dtype)
    keep[rows] = 0
    mlp.gate_rows.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return rows.numel()
