"""Tree dynamics: auto-pruning and balance, `per_node` vs `after_sum`, learned vs frozen routing.

Setting `layer` (the default; the README quotes it): one tree layer (SiLU, depth 4, blocks of 8,
self routing) learns to reproduce a fixed random SwiGLU teacher on inputs x = m + N(0, I), where
the fixed offset m gives the inputs a common mode |m| / spread (--common-mode, 0.7: the range
measured on the inputs of trained LM layers; with zero-mean symmetric inputs a node without a
bias always splits its tokens in half, and no path can die). The input distribution never moves,
so path usage changes only through the routing's own learning, and frozen routing is the control.
Four variants from the same initial weights, over several seeds; every --every steps the leaf
usage on a fixed probe set gives dead paths (no probe token), rare paths (under a tenth of a
uniform share) and the routing entropy (1 = balanced).

Setting `charlm`: a 2-layer character LM trained from scratch on WikiText-2 (valid.txt). There the
inputs move too: early in training one shared direction dominates every layer's input (common
mode >> 1), which sends (almost) every token down one path in all four variants, and paths come
back as it fades. The input common mode is recorded beside the path statistics.

    python benchmarks/tree_dynamics.py                    # layer setting, about 6 minutes on 2 CPU cores
    python benchmarks/tree_dynamics.py --setting charlm   # about 40 minutes
    python benchmarks/tree_dynamics.py --plot-only [--setting charlm]

Writes benchmarks/results/tree_dynamics.json (charlm: tree_dynamics_charlm.json), each with a .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_config_for  # noqa: E402
from treeffn_hf.modeling.layer_spec import TreeSpec  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN, TreeUsage  # noqa: E402
from treeffn_hf.training.trainable import configure_training, freeze_routing  # noqa: E402
from treeffn_hf.tree_stats import collect_tree_stats, plot_dynamics, rare_paths, stats_from_usage, summary  # noqa: E402

VARIANTS = {
    "per_node, learned": ("per_node", "learned"),
    "after_sum, learned": ("after_sum", "learned"),
    "per_node, frozen": ("per_node", "frozen"),
    "after_sum, frozen": ("after_sum", "frozen"),
}
OUTPUT = {"layer": RESULTS / "tree_dynamics.json", "charlm": RESULTS / "tree_dynamics_charlm.json"}


# -- setting `layer`: one tree layer, a fixed teacher, a fixed input distribution ----------------
class LayerTask:
    """A random SwiGLU teacher and inputs x = mean + N(0, I), all fixed by the seed."""

    def __init__(self, args, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        d, width = args.hidden, args.teacher_width
        self.teacher = [torch.randn(width, d, generator=g) / d**0.5 for _ in range(3)]
        direction = torch.randn(d, generator=g)
        self.mean = direction / direction.norm() * args.common_mode * d**0.5  # spread of N(0, I) is sqrt(d)
        self.probe = self.inputs(args.probe, g)
        self.generator = g

    def inputs(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.mean.numel(), generator=generator or self.generator) + self.mean

    def target(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.teacher
        return (nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down / gate.shape[0] ** 0.5


def layer_variant(name: str, activation: str, routing: str, seed: int, args) -> list[dict]:
    task = LayerTask(args, seed)
    spec = TreeSpec(depth=args.depth, node_width=args.node_width, leaf_width=args.node_width, shared_width=0,
                    activation=activation)
    width = (spec.num_nodes + spec.num_leaves) * args.node_width
    layer = TreeFFN(args.hidden, width, spec, nn.SiLU())
    torch.manual_seed(seed)  # the same initial weights for the four variants of a seed
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, args.hidden**-0.5)
    if routing == "frozen":
        freeze_routing(layer)
    optimizer = torch.optim.Adam(layer.parameters(), lr=args.lr)
    target = task.target(task.probe)
    history = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            layer.usage = TreeUsage(spec)
            with torch.no_grad():
                loss = nn.functional.mse_loss(layer(task.probe), target).item()
            stats = stats_from_usage(0, layer.usage)
            layer.usage = None
            history.append({"label": name, "seed": seed, "step": step, "probe_loss": loss,
                            "dead_paths": stats.dead_paths, "rare_paths": rare_paths(stats.leaf_counts),
                            "paths": stats.num_paths, "mean_routing_entropy": stats.routing_entropy})
        if step == args.steps:
            break
        x = task.inputs(args.batch)
        loss = nn.functional.mse_loss(layer(x), task.target(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    last = history[-1]
    print(f"{name:20s} seed {seed}  dead {last['dead_paths']:2d}  rare {last['rare_paths']:2d}/{last['paths']}  "
          f"entropy {last['mean_routing_entropy']:.3f}  probe loss {last['probe_loss']:.4f}", flush=True)
    return history


def mean_over_seeds(history: list[dict]) -> list[dict]:
    """One row per (variant, step): the mean of every number over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in history:
        groups.setdefault((row["label"], row["step"]), []).append(row)
    keys = ("probe_loss", "dead_paths", "rare_paths", "paths", "mean_routing_entropy")
    return [{"label": label, "step": step, "seeds": len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}
            for (label, step), rows in groups.items()]


# -- setting `charlm`: a character LM trained from scratch --------------------------------------
def char_ids(text: str) -> torch.Tensor:
    return torch.tensor([3 + min(max(ord(c) - 32, 0), 93) for c in text], dtype=torch.long)


def build_char_lm(activation: str, args) -> torch.nn.Module:
    dense_config = LlamaConfig(vocab_size=97, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=args.window, tie_word_embeddings=True)
    arch = architecture_for(dense_config)
    spec = TreeSpec(depth=args.depth, node_width=args.node_width, leaf_width=args.node_width, activation=activation)
    torch.manual_seed(args.seed)  # the same initial weights for every variant
    return arch.sparse_causal_lm_class(sparse_config_for(arch, dense_config, spec.resolve(args.hidden, args.intermediate)))


def charlm_variant(name: str, activation: str, routing: str, ids: torch.Tensor, probe: torch.Tensor, args) -> list[dict]:
    model = build_char_lm(activation, args)
    configure_training(model, trainable="all", routing=routing, routing_gradient=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    last_loss = None
    for step in range(args.steps + 1):
        if step % args.every == 0:
            stats = collect_tree_stats(model, probe, progress=False)
            row = {"label": name, "step": step, "train_loss": last_loss, **summary(stats),
                   "rare_paths": sum(rare_paths(s.leaf_counts) for s in stats)}
            history.append(row)
            print(f"{name:20s} step {step:4d}  dead {row['dead_paths']:3d}/{row['paths']}  "
                  f"entropy {row['mean_routing_entropy']:.3f}  input common mode {row['mean_input_common_mode']:.2f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if step == args.steps:
            break
        starts = torch.randint(0, ids.numel() - args.window, (args.batch,), generator=generator)
        batch = torch.stack([ids[s : s + args.window] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_loss = loss.item()
    return history


def char_data(window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, 8 held-out probe windows)."""
    ids = char_ids((DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8"))
    split = int(0.9 * ids.numel())
    return ids[:split], ids[split:][: 8 * window].view(8, window)


DEFAULTS = {
    "layer": dict(hidden=32, depth=4, node_width=8, steps=3000, every=150, batch=256, lr=3e-3),
    "charlm": dict(hidden=64, depth=4, node_width=8, steps=1000, every=50, batch=16, lr=1e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(DEFAULTS), default="layer")
    for name in ("hidden", "depth", "node_width", "steps", "every", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=3, help="layer: independent repeats")
    parser.add_argument("--common-mode", type=float, default=0.7, help="layer: |mean x| / spread of the inputs")
    parser.add_argument("--teacher-width", type=int, default=256, help="layer: the teacher MLP's width")
    parser.add_argument("--probe", type=int, default=16384, help="layer: probe inputs for the usage statistics")
    parser.add_argument("--intermediate", type=int, default=256, help="charlm: dense MLP width")
    parser.add_argument("--layers", type=int, default=2, help="charlm")
    parser.add_argument("--window", type=int, default=128, help="charlm")
    parser.add_argument("--seed", type=int, default=0, help="charlm")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = OUTPUT[args.setting]
    if args.plot_only:
        data = json.loads(out.read_text())
        plot_dynamics(data["curves"], out.with_suffix(".png"), title=data["title"])
        return
    torch.set_num_threads(1 if args.setting == "layer" else 2)  # the one-layer ops are too small to share
    history = []
    if args.setting == "layer":
        for seed in range(args.seeds):
            for name, (activation, routing) in VARIANTS.items():
                history += layer_variant(name, activation, routing, seed, args)
        curves = mean_over_seeds(history)
        title = (f"one tree layer, depth {args.depth}, blocks of {args.node_width}, input common mode "
                 f"{args.common_mode} (mean of {args.seeds} seeds)")
    else:
        train, probe = char_data(args.window)
        for name, (activation, routing) in VARIANTS.items():
            history += charlm_variant(name, activation, routing, train, probe, args)
        curves = history
        title = (f"char LM, {args.layers} layers, tree depth {args.depth}, blocks of {args.node_width} "
                 f"({args.steps} steps x {args.batch} x {args.window} chars)")
    settings = {k: v for k, v in vars(args).items() if k != "plot_only"}
    payload = {"benchmark": "tree_dynamics", "command": "python benchmarks/tree_dynamics.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "settings": settings, "title": title, "curves": curves, "history": history}
    write_json(out.name, payload)
    plot_dynamics(curves, out.with_suffix(".png"), title=title)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
