"""Tree dynamics on a small character-level LM trained from scratch: auto-pruning and balance.

Four tree models of the same shape, trained identically on WikiText-2 (valid.txt, characters),
differ only in the activation placement (`per_node` vs `after_sum`) and whether routing learns or
stays frozen at initialisation. Every few steps the path usage on fixed held-out windows is
recorded: dead paths (never taken) and the routing entropy (1 = balanced).

    python benchmarks/tree_dynamics.py            # about 10 minutes on 2 CPU cores
    python benchmarks/tree_dynamics.py --plot-only

Writes benchmarks/results/tree_dynamics.json and tree_dynamics.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_config_for  # noqa: E402
from treeffn_hf.modeling.layer_spec import TreeSpec  # noqa: E402
from treeffn_hf.training.setup import configure_training  # noqa: E402
from treeffn_hf.tree_stats import collect_tree_stats, plot_dynamics, summary  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"
VARIANTS = {
    "per_node, learned": ("per_node", "learned"),
    "after_sum, learned": ("after_sum", "learned"),
    "per_node, frozen": ("per_node", "frozen"),
    "after_sum, frozen": ("after_sum", "frozen"),
}


def char_ids(text: str) -> torch.Tensor:
    return torch.tensor([3 + min(max(ord(c) - 32, 0), 93) for c in text], dtype=torch.long)


def build_model(activation: str, args) -> torch.nn.Module:
    dense_config = LlamaConfig(vocab_size=97, hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=args.window, tie_word_embeddings=True)
    arch = architecture_for(dense_config)
    spec = TreeSpec(depth=args.depth, node_width=args.node_width, leaf_width=args.node_width, activation=activation)
    torch.manual_seed(args.seed)  # the same initial weights for every variant
    return arch.sparse_causal_lm_class(sparse_config_for(arch, dense_config, spec.resolve(args.hidden, args.intermediate)))


def train_variant(name: str, activation: str, routing: str, ids: torch.Tensor, probe: torch.Tensor, args) -> list[dict]:
    model = build_model(activation, args)
    configure_training(model, trainable="all", routing=routing, routing_gradient=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    last_loss = None
    for step in range(args.steps + 1):
        if step % args.every == 0:
            row = {"label": name, "step": step, "train_loss": last_loss,
                   **summary(collect_tree_stats(model, probe, progress=False))}
            history.append(row)
            print(f"{name:20s} step {step:4d}  dead {row['dead_paths']:3d}/{row['paths']}  "
                  f"entropy {row['mean_routing_entropy']:.3f}  {time.perf_counter() - start:.0f}s", flush=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--node-width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out = RESULTS / "tree_dynamics.json"
    if args.plot_only:
        data = json.loads(out.read_text())
        plot_dynamics(data["history"], out.with_suffix(".png"), title=data["title"])
        return
    torch.set_num_threads(2)
    ids = char_ids(DATA.read_text(encoding="utf-8"))
    split = int(0.9 * ids.numel())
    train, held_out = ids[:split], ids[split:]
    probe = held_out[: 8 * args.window].view(8, args.window)
    history = []
    for name, (activation, routing) in VARIANTS.items():
        history += train_variant(name, activation, routing, train, probe, args)
    title = (f"char LM, {args.layers} layers, tree depth {args.depth}, blocks of {args.node_width} "
             f"({args.steps} steps x {args.batch} x {args.window} chars)")
    payload = {"benchmark": "tree_dynamics", "command": "python benchmarks/tree_dynamics.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "settings": vars(args), "title": title, "history": history}
    write_json(out.name, payload)
    plot_dynamics(history, out.with_suffix(".png"), title=title)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
