"""Layer-wise quality recovery of a converted checkpoint (no end-to-end training).

The dense model runs once over the calibration text; each MLP's inputs are sampled (bounded
memory). MGS models get per-layer thresholds on their predictor's scores, calibrated to the
density (the 4-bit predictor needs nothing else; a linear gate is first trained to predict the
dense model's top-k neurons), then their down_proj is refitted by least squares under that
selection; tree MLPs first get their neuron partition and routing fitted to
where the tokens' dense activation mass is, then are regressed on the dense MLP outputs. Layers are done one
at a time and saved as they finish: rerunning the same command after a kill resumes.
"""

from __future__ import annotations

import argparse
from collections import Counter

from ..conversion.distillation import DISTILL_LR
from ..conversion.routing_fit import DEFAULT_ROUTER_FIT, ROUTER_FITS

NAME = "distill"
HELP = "train gates / distill tree layers of a converted model against its dense original"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sparse", metavar="SPARSE_DIR", help="converted checkpoint")
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.add_argument("--dense", required=True, help="the dense model it was converted from (dir or Hub id)")
    parser.add_argument("--gguf-file", default=None, help="DENSE/GGUF_FILE")
    parser.add_argument("--calibration", required=True, help="text, .jsonl or .parquet file, or an HF dataset id")
    parser.add_argument("--windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--tokens-per-layer", type=int, default=8192, help="MLP inputs kept per layer")
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=DISTILL_LR, help="learning rate of tree distillation")
    parser.add_argument("--router-fit", choices=ROUTER_FITS, default=DEFAULT_ROUTER_FIT,
                        help="trees with hyperplane routing: fit each router by weighted logistic regression or "
                             "weighted least squares (see benchmarks/studies/router_fit.py)")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                        help="trees: fit each layer on the inputs the already distilled layers before it produce "
                             "(GPTQ-style; the calibration text walks through the layers once); --no-sequential "
                             "fits every layer on the dense model's inputs")
    parser.add_argument("--active", type=float, default=None,
                        help="trees: make a token compute this fraction of each MLP's neurons on average. A partition "
                             "forest takes, per layer, the shape (trees, depth, shared neurons) that keeps its output "
                             "best, chosen by short distillations of every candidate; a tree whose leaves select "
                             "their neurons takes per-layer leaf widths (see --allocation). Default: keep the "
                             "checkpoint's shape")
    parser.add_argument("--selection", choices=("top_k", "threshold"), default=None,
                        help="MGS: threshold (the default) calibrates per-layer thresholds; top_k keeps a fixed k")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-ratio", type=float, default=None,
                        help="MGS (the default budget, 1.01): the fewest neurons, per layer, that keep the calibration "
                             "perplexity within this ratio of the dense model's")
    budget.add_argument("--density", type=float, default=None,
                        help="MGS: mean fraction of neurons computed instead")
    budget.add_argument("--weight-fraction", type=float, default=None,
                        help="MGS: mean fraction of MLP weight bytes read per token, predictor included, instead")
    parser.add_argument("--allocation", choices=("uniform", "greedy"), default=None,
                        help="MGS: the same density in every layer, or greedy on a calibration loss (TEAL-style; the "
                             "default with --max-ratio, uniform with --density or --weight-fraction). Selected-leaf trees with "
                             "--active (default uniform): the same leaf width in every layer, or widths shared out "
                             "on each layer's calibration KL (on SmolLM2 better at 25%% active, worse at 12.5%%; "
                             "see README)")
    parser.add_argument("--no-refit-down", dest="refit_down", action="store_false",
                        help="MGS: keep the dense down_proj (default: refit it by least squares under the selection)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..workflows import distill_checkpoint

    summary = distill_checkpoint(
        args.sparse, args.out, dense=args.dense, gguf_file=args.gguf_file, calibration=args.calibration,
        windows=args.windows, window=args.window, tokens_per_layer=args.tokens_per_layer,
        gate_steps=args.gate_steps, distill_steps=args.distill_steps, lr=args.lr, selection=args.selection,
        density=args.density, weight_fraction=args.weight_fraction, max_ratio=args.max_ratio, allocation=args.allocation,
        refit_down=args.refit_down, router_fit=args.router_fit, sequential=args.sequential, active=args.active,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    layers = summary["layers"]
    if summary["method"] == "mgs":
        if layers:
            before = sum(r["recall_before"] for r in layers) / len(layers)
            after = sum(r["recall_after"] for r in layers) / len(layers)
            print(f"gate recall at the target density (mean over {len(layers)} layers): {before:.3f} -> {after:.3f}")
        budget = summary["budget"]
        if budget:
            densities = budget["layer_densities"]
            within = (f", calibration perplexity x{budget['calibration_ratio']:.4f} of dense (budget "
                      f"x{budget['max_ratio']})" if "max_ratio" in budget else "")
            print(f"thresholds calibrated ({budget['allocation']}): mean density {sum(densities) / len(densities):.2%}, "
                  f"layers from {min(densities):.2%} to {max(densities):.2%}{within}")
        refits = summary["down_proj_refit"]
        if refits:
            kept = sum(r["damping"] is None for r in refits)
            ratio = sum(r["mse_after"] / max(r["mse_before"], 1e-30) for r in refits) / len(refits)
            print(f"down_proj refitted in {len(refits) - kept} of {len(refits)} layers: held-out MSE x{ratio:.2f} "
                  "(mean over layers)")
    else:
        if summary["shape_search"]:
            search = summary["shape_search"]
            chosen = Counter(_shape_name(layer["shape"]) for layer in search["layers"])
            print(f"shapes at <= {search['active_units']} active neurons a token ({search['seconds']:.0f}s, "
                  f"{len(search['candidates'])} candidates): "
                  + ", ".join(f"{name} x{count}" for name, count in chosen.most_common()))
        if summary["budget"]:  # selected leaves: widths allocated per layer
            widths = [shape["leaf_width"] for shape in summary["budget"]["layer_specs"]]
            print(f"leaf widths ({summary['budget']['allocation']}) at {summary['budget']['active']:.1%} active on "
                  f"average: layers from {min(widths)} to {max(widths)}, the first {widths[0]}")
        improved = sum(r["mse_after"] < r["mse_before"] for r in layers)
        fitted = [r for r in layers if r.get("captured_mass_after") is not None]
        if fitted:
            after = sum(r["captured_mass_after"] for r in fitted) / len(fitted)
            rebuilt = any(r["captured_mass_before"] is None for r in fitted)  # selected leaves: rebuilt from dense
            before = "" if rebuilt else f"{sum(r['captured_mass_before'] for r in fitted) / len(fitted):.3f} -> "
            print(f"activation mass on the tokens' paths (mean over {len(fitted)} layers): {before}{after:.3f}")
        print(f"layer MSE lowered in {improved} of {len(layers)} layers")
    print(f"wrote {args.out} ({summary['calibration']['tokens']} calibration tokens, {summary['seconds']:.0f}s)")
    return 0


def _shape_name(shape: dict) -> str:
    return (f"{shape['num_trees']} tree(s) depth {shape['depth']} node {shape['node_width']} leaf {shape['leaf_width']} "
            f"shared {shape['shared_width']}")
