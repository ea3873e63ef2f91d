"""Where the tree's CPU batch path should switch from per-token gathers to grouped-by-leaf GEMMs.

For each shape, tree (bench_mlp.py's `tree` and `tree-shared` layers at each density) and batch
size, the two batched PyTorch paths of `tree_torch.py` are timed on the same routed tokens,
interleaved with the dense `LlamaMLP`, and the faster one is recorded beside the one the dispatch
(`tree_torch.gathers_per_token`, with the `KernelPolicy` constants) picks. Routing is computed once outside the timed
calls: it is the same work for both paths.

    python benchmarks/studies/tree_cpu_dispatch.py        # writes benchmarks/results/tree_cpu_dispatch.json
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from bench_mlp import SHAPES, build_layers, random_dense_mlp  # noqa: E402
from common import interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf.modeling import tree_torch  # noqa: E402


def routed(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spec = layer.spec
    scores = torch.nn.functional.linear(x, tree_torch.routing_matrix(layer), tree_torch.routing_bias(layer))
    return tree_torch.route_from_scores(scores.view(-1, spec.num_trees, spec.num_nodes), spec.depth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["smollm2-135m", "llama-1b"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.125, 0.05])
    parser.add_argument("--tokens", nargs="+", type=int, default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="tree_cpu_dispatch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        hidden, width = SHAPES[shape]
        dense = random_dense_mlp(hidden, width).eval().requires_grad_(False)
        for kind in ("tree", "tree-shared"):
            for density in args.densities:
                layer = build_layers(dense, kind, density, torch.float32)
                for tokens in args.tokens:
                    x = torch.randn(tokens, hidden)
                    leaf, path = routed(layer, x)
                    with torch.no_grad():
                        gather = tree_torch._per_token_gather(layer, x, leaf)
                        grouped = tree_torch._grouped_by_leaf(layer, x, leaf, path)
                        torch.testing.assert_close(gather, grouped, rtol=1e-4, atol=1e-4)
                        calls = max(2, 64 // tokens)
                        times = interleaved_median({
                            "dense": partial(dense, x),
                            "gather": partial(tree_torch._per_token_gather, layer, x, leaf),
                            "grouped": partial(tree_torch._grouped_by_leaf, layer, x, leaf, path),
                        }, rounds=args.rounds, calls=calls)
                    chosen = "gather" if tree_torch.gathers_per_token(layer, leaf) else "grouped"
                    row = {
                        "shape": shape, "kind": kind, "density": density, "tokens": tokens,
                        "spec": {k: getattr(layer.spec, k) for k in ("num_trees", "depth", "node_width", "leaf_width", "shared_width")},
                        "distinct_leaves": int(torch.unique(leaf[:, 0]).numel()),
                        "ms": {name: 1e3 * seconds for name, seconds in times.items()},
                        "faster": min(("gather", "grouped"), key=lambda name: times[name]),
                        "dispatch": chosen,
                        "dispatch_speedup": times["dense"] / times[chosen],
                        "best_speedup": times["dense"] / min(times["gather"], times["grouped"]),
                    }
                    rows.append(row)
                    print(f"{shape:13s} {kind:11s} {density:5.3f} N={tokens:4d} gather {row['ms']['gather']:.3f} ms, "
                          f"grouped {row['ms']['grouped']:.3f} ms ({row['distinct_leaves']} leaves), dense "
                          f"{row['ms']['dense']:.3f} ms; dispatch {chosen} {row['dispatch_speedup']:.2f}x, "
                          f"best {row['best_speedup']:.2f}x", flush=True)
    wrong = [r for r in rows if r["dispatch"] != r["faster"]]
    loss = max((r["best_speedup"] / r["dispatch_speedup"] for r in rows), default=1.0)
    print(f"dispatch picks the slower path in {len(wrong)} of {len(rows)} cases; worst loss {loss:.2f}x")
    write_json(args.out, {
        "benchmark": "tree_cpu_dispatch", "command": " ".join(["python", "benchmarks/studies/tree_cpu_dispatch.py", *sys.argv[1:]]),
        "machine": machine(), "dtype": "float32", "threads": args.threads, "rows": rows,
        "dispatch_wrong": len(wrong), "worst_dispatch_loss": loss,
    })


if __name__ == "__main__":
    main()
