"""What the per-layer width allocation's trials cost: `tree_layer_sensitivities` (one routing per
layer reused for every width; each trial runs only the layers from its own on) against its naive
oracle (`naive_tree_layer_sensitivities`: a fresh fit and a full forward per trial), both on the
same SmolLM2 layers, inputs and grid, in one process. The two tables must agree.

    python benchmarks/studies/allocation_cost.py            # 6 layers spread over the model, the full grid

Writes benchmarks/results/allocation_cost_smollm2.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import machine, parse_tree_specs, smollm2_with_calibration, write_json  # noqa: E402

from treeffn_hf.conversion.tree_allocation import (  # noqa: E402
    allocation_fractions,
    naive_tree_layer_sensitivities,
    tree_layer_sensitivities,
)

SPEC = "depth=4,node_width=0,routing=hyperplane,leaf_neurons=selected,leaf_width=192,shared_width=0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=SPEC, help="the tree (TreeSpec fields)")
    parser.add_argument("--active", type=float, default=0.125, help="the target: sets the grid")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 11, 17, 23, 29])
    args = parser.parse_args()
    # as `treeffn distill` calibrates: windows of 512 tokens, the last 2 of them for the KL
    dense, _, ids, captured = smollm2_with_calibration(16, 512, 8192)
    spec, grid = parse_tree_specs(args.spec)[0], allocation_fractions(args.active)
    loss_ids = ids[-2:]
    seconds, tables = {}, {}
    for name, measure in (("naive", naive_tree_layer_sensitivities), ("now", tree_layer_sensitivities)):
        options = {"progress": False} if name == "now" else {}
        start = time.perf_counter()
        tables[name] = measure(dense, spec, captured.inputs, loss_ids, fractions=grid, rows=args.layers, **options)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.1f} s for {len(args.layers) * len(grid)} trials", flush=True)
    torch.testing.assert_close(tables["now"], tables["naive"], rtol=1e-4, atol=1e-6)
    trials = len(args.layers) * len(grid)
    payload = {
        "benchmark": "allocation_cost", "command": "python benchmarks/studies/allocation_cost.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "model": "SmolLM2-135M-Instruct", "dtype": "float32", "spec": args.spec,
        "grid": list(grid), "layers": args.layers, "trials": trials, "loss_tokens": int(loss_ids.numel()),
        "seconds": seconds, "seconds_per_trial": {k: v / trials for k, v in seconds.items()},
        "speedup": seconds["naive"] / seconds["now"],
        "max_abs_difference": float((tables["now"] - tables["naive"]).abs().max()),
    }
    print(f"speed-up {payload['speedup']:.2f}x; tables agree (max difference {payload['max_abs_difference']:.2e})")
    print(f"wrote {write_json('allocation_cost_smollm2.json', payload)}")


if __name__ == "__main__":
    main()
