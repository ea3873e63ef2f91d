"""Hyperplane routers fitted as ridge regression against logistic regression, on SmolLM2-135M.

Every decoder layer's MLP inputs are captured on calibration text (valid.txt, as `treeffn
distill` does); each layer is converted to a hyperplane tree of each `--specs` entry, and its
routing fitted (`fit_routing`: neuron partition and routers, no weight training) once with each
router fit. The figure is the captured mass on the held-out tenth of the tokens: the fraction of
the dense MLP's activation mass that lies on the tokens' paths (shared neurons included), the
quantity the fit maximises and the best predictor of quality after distillation we have.

    python benchmarks/studies/router_fit.py               # a few minutes on 2 CPU cores

Writes benchmarks/results/router_fit_smollm2.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import machine, parse_tree_specs, smollm2_with_calibration, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.conversion.routing_fit import ROUTER_FITS, fit_routing  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_mlp_state  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

SPECS = "depth=3,node_width=0,routing=hyperplane;depth=5,node_width=0,routing=hyperplane"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default=SPECS, help="`;`-separated TreeSpec fields (hyperplane routing)")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    args = parser.parse_args()
    command = "python benchmarks/studies/router_fit.py " + " ".join(sys.argv[1:])
    torch.manual_seed(0)
    dense, _, ids, captured = smollm2_with_calibration(args.calibration_windows, args.window, args.tokens_per_layer)
    arch = architecture_for(dense.config)
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    rows = []
    for spec in parse_tree_specs(args.specs):
        spec = spec.resolve(hidden, intermediate)
        per_fit = {fit: [] for fit in ROUTER_FITS}
        seconds = {fit: 0.0 for fit in ROUTER_FITS}
        before = []
        for index, layer in enumerate(arch.decoder_layers(dense)):
            mlp = getattr(layer, arch.mlp_attr)
            for fit in ROUTER_FITS:
                tree = TreeFFN(hidden, intermediate, spec, mlp.act_fn)
                tree.load_state_dict(sparse_mlp_state(spec, mlp.gate_proj, mlp.up_proj, mlp.down_proj), strict=False)
                start = time.perf_counter()
                report = fit_routing(tree, captured.inputs[index], router_fit=fit, seed=index, layer_index=index)
                seconds[fit] += time.perf_counter() - start
                per_fit[fit].append(report.captured_mass_after)
            before.append(report.captured_mass_before)
        row = {"spec": spec.to_dict(), "active_fraction": spec.active_units / intermediate,
               "captured_mass_initial": statistics.mean(before),
               **{f"captured_mass_{fit}": statistics.mean(v) for fit, v in per_fit.items()},
               **{f"layers_{fit}": v for fit, v in per_fit.items()},
               "logistic_wins_layers": sum(lg > rd for lg, rd in zip(per_fit["logistic"], per_fit["ridge"])),
               "fit_seconds": seconds}
        rows.append(row)
        print(f"depth {spec.depth}, node {spec.node_width}, leaf {spec.leaf_width}, shared {spec.shared_width} "
              f"({row['active_fraction']:.1%} active): held-out captured mass initial {row['captured_mass_initial']:.3f}, "
              f"ridge {row['captured_mass_ridge']:.3f}, logistic {row['captured_mass_logistic']:.3f} "
              f"(logistic higher in {row['logistic_wins_layers']} of {len(before)} layers); fit seconds "
              + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), flush=True)
    write_json("router_fit_smollm2.json", {
        "benchmark": "router_fit", "command": command, "machine": machine(),
        "model": f"SmolLM2-135M-Instruct ({smollm2_gguf()[1]}, de-quantized)",
        "calibration": {"source": "../shared/data/wikitext-2/valid.txt", "windows": int(ids.shape[0]),
                        "window": args.window, "tokens_per_layer": args.tokens_per_layer, "holdout": 0.1},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
