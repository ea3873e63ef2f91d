"""Where computation moves: per decoder layer, how much the attention block and the MLP block
write into the residual stream (mean L2 norm of their outputs per token), and the MLP's share of
the two. Sparse FFNs are reported to shift work from the MLP to attention; comparing a converted
model with its dense original on the same text shows whether, and in which layers, they do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import torch
from tqdm.auto import tqdm

from .architectures import ARCHITECTURES, architecture_for


@dataclass
class LayerAttribution:
    layer: int
    attention_norm: float  # mean over tokens of |attention output|_2
    mlp_norm: float  # mean over tokens of |MLP output|_2
    mlp_share: float  # mlp_norm / (attention_norm + mlp_norm)


def _architecture(model):
    base = getattr(model.config, "base_model_type", None)  # converted models name their dense type
    return ARCHITECTURES[base] if base in ARCHITECTURES else architecture_for(model.config)


@torch.no_grad()
def residual_attribution(model, windows: torch.Tensor, *, progress: bool = True) -> list[LayerAttribution]:
    """Run `model` (dense or converted) over `windows` and measure each block's residual writes."""
    arch = _architecture(model)
    layers = arch.decoder_layers(model)
    sums = torch.zeros(len(layers), 2, dtype=torch.float64)
    tokens = [0]
    handles = []
    for index, layer in enumerate(layers):
        for slot, module in enumerate((layer.self_attn, getattr(layer, arch.mlp_attr))):
            def hook(_module, _inputs, output, index=index, slot=slot):
                out = output[0] if isinstance(output, tuple) else output
                sums[index, slot] += out.float().norm(dim=-1).sum().item()
            handles.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="attribution", disable=not progress):
            model(window[None].to(device), use_cache=False)
            tokens[0] += window.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    means = sums / max(1, tokens[0])
    return [LayerAttribution(layer=i, attention_norm=float(a), mlp_norm=float(m), mlp_share=float(m / (a + m)))
            for i, (a, m) in enumerate(means.tolist())]


def as_dicts(rows: list[LayerAttribution]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot_attribution(results: dict[str, list[LayerAttribution]], path: Union[str, Path]) -> Path:
    """MLP share of the residual writes per layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_share, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        ax_share.plot([r.layer for r in rows], [r.mlp_share for r in rows], marker="o", label=name)
        ax_norm.plot([r.layer for r in rows], [r.attention_norm for r in rows], marker="^", label=f"{name}: attention")
        ax_norm.plot([r.layer for r in rows], [r.mlp_norm for r in rows], marker="s", ls="--", label=f"{name}: MLP")
    ax_share.set_xlabel("layer")
    ax_share.set_ylabel("MLP share of |attention| + |MLP|")
    ax_norm.set_xlabel("layer")
    ax_norm.set_ylabel("mean |output| per token")
    ax_norm.set_yscale("log")
    ax_share.legend()
    ax_norm.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
