"""Tree dynamics: how tokens use each tree's paths, on text, per layer.

- leaf (path) usage histogram, and dead paths: leaves no token reached;
- routing entropy: entropy of the leaf distribution over log(leaves) (1 = perfectly balanced);
- per node: the fraction of the tokens reaching it that go right;
- the common mode of the layer's input: |mean x| / rms(x - mean x) over the tokens. Routing is by
  the sign of a dot product, so when one shared direction dominates the inputs (ratio >> 1), every
  node sends (almost) every token the same way and paths die whatever the routing weights are.

`collect_tree_stats` counts with the layers' own `TreeUsage` hooks while the model runs;
`plot_usage` draws the per-layer usage heatmap, `plot_dynamics` entropy and dead paths over steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import torch
from tqdm.auto import tqdm

from .modeling.tree_layer import TreeUsage


@dataclass
class LayerTreeStats:
    layer: int
    tokens: int
    leaf_counts: list[list[int]]  # [tree][leaf]
    dead_paths: int  # leaves (over all trees) that no token reached
    num_paths: int
    routing_entropy: float  # mean over trees of H(leaf usage) / log(leaves)
    right_fraction: list[list[float]]  # [tree][node]; NaN where no token arrived
    input_common_mode: float  # |mean x| / rms(x - mean x) of the layer's inputs

    def as_dict(self) -> dict:
        return asdict(self)


def tree_layers(model) -> list[tuple[int, torch.nn.Module]]:
    return [(i, m) for i, m in model.sparse_mlps() if m.sparse_method == "tree"]


class _InputMoments:
    """Streaming first and second moments of a layer's inputs (a forward pre-hook)."""

    def __init__(self) -> None:
        self.count, self.total, self.square = 0, None, 0.0

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.count += x.shape[0]
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.square += float((x * x).sum())

    def common_mode(self) -> float:
        mean = self.total / self.count
        spread = max(self.square / self.count - float(mean @ mean), 0.0) ** 0.5
        return float(mean.norm()) / spread if spread > 0 else math.inf


def stats_from_usage(index: int, usage: TreeUsage, input_common_mode: float = math.nan) -> LayerTreeStats:
    counts = usage.leaf_counts.cpu()
    entropies = []
    for row in counts.double():
        p = row / row.sum().clamp_min(1)
        p = p[p > 0]
        entropies.append(float(-(p * p.log()).sum() / math.log(row.numel())) if row.numel() > 1 else 1.0)
    visits = usage.node_visits.cpu().double()
    right = torch.where(visits > 0, usage.node_right.cpu().double() / visits.clamp_min(1), float("nan"))
    return LayerTreeStats(
        layer=index, tokens=int(counts[0].sum()), leaf_counts=counts.tolist(),
        dead_paths=int((counts == 0).sum()), num_paths=counts.numel(),
        routing_entropy=sum(entropies) / len(entropies), right_fraction=right.tolist(),
        input_common_mode=input_common_mode,
    )


@torch.no_grad()
def collect_tree_stats(model, windows: torch.Tensor, *, progress: bool = True) -> list[LayerTreeStats]:
    """Run `model` over `windows` (sequences, length) and return the usage of every tree layer."""
    layers = tree_layers(model)
    if not layers:
        raise ValueError("the model has no tree layers")
    device = next(model.parameters()).device
    moments = [_InputMoments() for _ in layers]
    hooks = [layer.register_forward_pre_hook(m) for (_, layer), m in zip(layers, moments)]
    for _, layer in layers:
        layer.usage = TreeUsage(layer.spec, device=device)
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="tree statistics", disable=not progress):
            model(window[None].to(device), use_cache=False)
        return [stats_from_usage(i, layer.usage, m.common_mode()) for (i, layer), m in zip(layers, moments)]
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for _, layer in layers:
            layer.usage = None


def rare_paths(leaf_counts: list[list[int]]) -> int:
    """Leaves with less than a tenth of a uniform share of the tokens (dead ones included)."""
    return sum(count * len(counts) * 10 < sum(counts) for counts in leaf_counts for count in counts)


def summary(stats: list[LayerTreeStats]) -> dict:
    return {
        "dead_paths": sum(s.dead_paths for s in stats),
        "paths": sum(s.num_paths for s in stats),
        "mean_routing_entropy": sum(s.routing_entropy for s in stats) / len(stats),
        "mean_input_common_mode": sum(s.input_common_mode for s in stats) / len(stats),
    }


def plot_usage(stats: list[LayerTreeStats], path: Union[str, Path], title: str = "") -> Path:
    """Heatmap: one row per layer, one column per path (all trees side by side), share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shares = torch.tensor([[c for tree in s.leaf_counts for c in tree] for s in stats], dtype=torch.float64)
    shares = shares / shares.sum(dim=1, keepdim=True).clamp_min(1)
    floor = 0.1 / shares.shape[1] / max(1, stats[0].tokens)
    fig, ax = plt.subplots(figsize=(min(14, 3 + shares.shape[1] * 0.12), 1.5 + 0.25 * len(stats)))
    image = ax.imshow(shares.clamp_min(floor).numpy(), aspect="auto", cmap="viridis",
                      norm=LogNorm(vmin=floor, vmax=float(shares.max())), interpolation="nearest")
    ax.set_xlabel("path (leaf), trees side by side")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(stats)), [str(s.layer) for s in stats])
    dead = summary(stats)
    ax.set_title(title or f"path usage: {dead['dead_paths']} of {dead['paths']} paths dead, "
                          f"mean entropy {dead['mean_routing_entropy']:.2f}")
    fig.colorbar(image, ax=ax, label="share of tokens (dead paths at the floor)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dynamics(history: list[dict], path: Union[str, Path], title: str = "tree dynamics") -> Path:
    """Entropy and dead paths (and rare paths, input common mode where the rows have them) against
    training step; `history` rows: step, label, summary keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("routing entropy (1 = balanced)", lambda h: h["mean_routing_entropy"]),
              ("fraction of paths dead", lambda h: h["dead_paths"] / h["paths"])]
    if all("rare_paths" in h for h in history):
        panels.append(("fraction of paths rare (< 1/10 of uniform)", lambda h: h["rare_paths"] / h["paths"]))
    if all("mean_input_common_mode" in h for h in history):
        panels.append(("input common mode |mean| / spread", lambda h: h["mean_input_common_mode"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for label in dict.fromkeys(h.get("label", "") for h in history):
        rows = [h for h in history if h.get("label", "") == label]
        steps = [h["step"] for h in rows]
        for ax, (_, value) in zip(axes, panels):
            ax.plot(steps, [value(h) for h in rows], marker="o", label=label or None)
    for ax, (ylabel, _) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if any(h.get("label") for h in history):
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
