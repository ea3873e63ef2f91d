"""Where computation moves: per decoder layer, how much the attention block and the MLP block
write into the residual stream (mean L2 norm of their outputs per token), and how much each
contributes to the logit of the next token (direct logit attribution). Sparse FFNs are reported
to shift work from the MLP to attention; comparing a converted model with its dense original on
the same text shows whether, and in which layers, they do.

Direct logit attribution: the final RMSNorm is y = w * h / rms(h), linear in h once rms(h) is
fixed, and h is the embedding plus every block's output. So the next token's logit splits
exactly into one term per block, (W_U[next] * w) . o_block / rms(h) (plus the embedding's):
what that block writes *directly* towards the prediction, not through later blocks.
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
    attention_logit: float = 0.0  # mean over tokens of the block's direct contribution to the next token's logit
    mlp_logit: float = 0.0
    mlp_logit_share: float = 0.0  # mean |mlp logit term| / (mean |attention term| + mean |mlp term|)


def _architecture(model):
    base = getattr(model.config, "base_model_type", None)  # converted models name their dense type
    return ARCHITECTURES[base] if base in ARCHITECTURES else architecture_for(model.config)


@torch.no_grad()
def residual_attribution(model, windows: torch.Tensor, *, progress: bool = True) -> list[LayerAttribution]:
    """Run `model` (dense or converted) over `windows` and measure each block's residual writes
    and its direct contribution to the logit of each next token."""
    arch = _architecture(model)
    layers = arch.decoder_layers(model)
    final_norm = model.get_decoder().norm
    unembed = model.get_output_embeddings().weight
    # per layer and block (attention, MLP): sum of norms, signed and absolute logit terms
    sums = torch.zeros(len(layers), 2, 3, dtype=torch.float64)
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    final: list[torch.Tensor] = []
    tokens = [0]
    handles = []
    for index, layer in enumerate(layers):
        for slot, module in enumerate((layer.self_attn, getattr(layer, arch.mlp_attr))):
            def hook(_module, _inputs, output, index=index, slot=slot):
                out = output[0] if isinstance(output, tuple) else output
                outputs[index, slot] = out[0].float()
            handles.append(module.register_forward_hook(hook))
    handles.append(final_norm.register_forward_hook(lambda _m, inputs, _o: final.append(inputs[0][0].float())))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="attribution", disable=not progress):
            final.clear()
            model(window[None].to(device), use_cache=False)
            targets = window[1:].to(device)
            rms = final[-1][:-1].pow(2).mean(-1, keepdim=True).add(final_norm.variance_epsilon).sqrt()
            direction = unembed[targets].float() * final_norm.weight.float() / rms  # (T-1, d)
            for (index, slot), out in outputs.items():
                sums[index, slot, 0] += out.norm(dim=-1).sum().item()
                logit = (out[:-1] * direction).sum(-1)
                sums[index, slot, 1] += logit.sum().item()
                sums[index, slot, 2] += logit.abs().sum().item()
            tokens[0] += window.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = []
    predicted = max(1, tokens[0] - len(windows))  # the last token of a window has no next token
    for i in range(len(layers)):
        (a_norm, a_logit, a_abs), (m_norm, m_logit, m_abs) = sums[i].tolist()
        a_norm, m_norm = a_norm / max(1, tokens[0]), m_norm / max(1, tokens[0])
        rows.append(LayerAttribution(
            layer=i, attention_norm=a_norm, mlp_norm=m_norm, mlp_share=m_norm / (a_norm + m_norm),
            attention_logit=a_logit / predicted, mlp_logit=m_logit / predicted,
            mlp_logit_share=m_abs / (a_abs + m_abs) if a_abs + m_abs else 0.0))
    return rows


def as_dicts(rows: list[LayerAttribution]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot_attribution(results: dict[str, list[LayerAttribution]], path: Union[str, Path]) -> Path:
    """MLP share of the residual writes per layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_share, ax_norm, ax_logit) = plt.subplots(1, 3, figsize=(16, 4))
    for name, rows in results.items():
        ax_share.plot([r.layer for r in rows], [r.mlp_share for r in rows], marker="o", label=name)
        ax_logit.plot([r.layer for r in rows], [r.mlp_logit_share for r in rows], marker="o", label=name)
        ax_norm.plot([r.layer for r in rows], [r.attention_norm for r in rows], marker="^", label=f"{name}: attention")
        ax_norm.plot([r.layer for r in rows], [r.mlp_norm for r in rows], marker="s", ls="--", label=f"{name}: MLP")
    ax_share.set_xlabel("layer")
    ax_share.set_ylabel("MLP share of |attention| + |MLP|")
    ax_norm.set_xlabel("layer")
    ax_norm.set_ylabel("mean |output| per token")
    ax_norm.set_yscale("log")
    ax_logit.set_xlabel("layer")
    ax_logit.set_ylabel("MLP share of |direct logit terms|")
    ax_share.legend()
    ax_norm.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
