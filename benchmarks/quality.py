"""Quality of SmolLM2-135M's sparse variants against dense, the oracles and two baselines, in one run.

    python benchmarks/quality.py --only mgs          # the MGS frontier (about 1-1.5 h on 2 CPU cores)
    python benchmarks/quality.py                     # the frontier and the trees
    python benchmarks/quality.py --plot-only         # redraw the plot from the JSON

The MGS frontier: perplexity ratio against the fraction of MLP weight bytes read per token
(bf16, predictor included). At each density of `--nested-densities` the default recipe runs (the
nested predictor: gate/up on an 8-bit grid whose high nibbles are the 4-bit predictor; per-layer
thresholds calibrated on valid.txt), and at `--mgs-densities` the 4-bit predictor beside bf16
weights (greedy allocation too at `--greedy-densities`). At the bytes each reads: the threshold
oracle, the top-k oracle (exact |silu(g) * u|, read for free), a TEAL-style threshold and the
CATS criterion (|silu(g)|, all of gate_proj read), unless already measured within 2 points.
The nested rows' bytes are those of a kernel that reads the nibbles; today's kernels read the
snapped weights in the model dtype. The trained linear gate (the old default) runs at `--linear-densities`.
Trees near each target fraction are fitted (routing fit + layer-wise distillation); `--tree-specs`
adds any forest, `--tree-search` forests whose shape each layer chose (conversion/shape_search.py).
Protocol: ../shared/data/README.md. Results: benchmarks/results/quality_smollm2.json (+ .png),
rewritten after every row; with `--only`, the other method's rows are carried over from the
existing file (marked `carried_over`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, parse_tree_specs, write_json  # noqa: E402
from quality_baselines import (  # noqa: E402
    CatsMLP,
    OracleThresholdMLP,
    OracleTopKMLP,
    TealMLP,
    unwrap_mlps,
    wrap_mlps,
)

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.distillation import DISTILL_LR, distill_layers  # noqa: E402
from treeffn_hf.conversion.gate_training import train_gates  # noqa: E402
from treeffn_hf.conversion.routing_fit import DEFAULT_ROUTER_FIT, ROUTER_FITS  # noqa: E402
from treeffn_hf.conversion.shape_search import search_tree_shapes  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.conversion.tree_allocation import allocate_tree_widths  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.workflows import LOSS_WINDOWS  # noqa: E402

OUTPUT = "quality_smollm2.json"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class Run:
    """Accumulates rows and rewrites the result file after each one."""

    def __init__(self, args: argparse.Namespace, payload: dict) -> None:
        self.args, self.payload = args, payload
        self.dense_ppl: float | None = None

    def add(self, row: dict) -> None:
        if self.dense_ppl is not None:
            row["ppl_ratio"] = row["perplexity"] / self.dense_ppl
        self.payload["rows"].append(row)
        ratio = f"ratio {row['ppl_ratio']:.3f}" if "ppl_ratio" in row else ""
        print(f"{row['variant']:>28}: ppl {row['perplexity']:.3f} {ratio} units {row['unit_fraction']:.2%} "
              f"weights {row['weight_fraction']:.2%}", flush=True)
        write_json(self.args.output, self.payload)


def evaluate(model, windows, progress: bool) -> float:
    return perplexity(model, windows, progress=progress).perplexity


def _calibrated_mgs(dense, captured, spec: MGSSpec, allocation: str, loss_ids) -> tuple:
    start = time.perf_counter()
    sparse = convert(dense, spec, progress=False)
    reports = train_gates(sparse, captured.inputs, progress=False)  # [] for the quantized predictor
    budget = calibrate_mgs(sparse, captured.inputs, allocation=allocation, loss_ids=loss_ids, progress=False)
    return sparse.eval(), reports, budget, time.perf_counter() - start


def _measured(model) -> tuple[float, float]:
    """(unit fraction, weight fraction) that the last evaluation measured."""
    cost = model.sparse_cost()
    return cost.unit_fraction, cost.weight_fraction


def _wrapped_row(run, dense, layers, mlp_attr, eval_ids, progress, wrap, variant: str, method: str, target: float,
                 weights_of) -> None:
    wrappers = wrap_mlps(layers, mlp_attr, wrap)
    ppl = evaluate(dense, eval_ids, progress)
    unwrap_mlps(layers, mlp_attr)
    unit = _mean(w.unit_fraction() for w in wrappers)
    run.add({"variant": variant, "method": method, "target": target, "perplexity": ppl, "unit_fraction": unit,
             "weight_fraction": _mean(weights_of(w) for w in wrappers)})


PREDICTOR_LABELS = {"quantized": "4-bit predictor", "nested": "nested 4+4-bit gate/up"}
SAME_LEVEL = 0.02  # baselines already measured this close to a row's bytes are not run again


def mgs_frontier(run, args, dense, captured, eval_ids, loss_ids, progress) -> None:
    arch = architecture_for(dense.config)
    layers = arch.decoder_layers(dense)
    greedy = {float(v) for v in args.greedy_densities.split(",") if v}
    plan = [(predictor, float(v)) for predictor, values in (("quantized", args.mgs_densities),
                                                            ("nested", args.nested_densities))
            for v in values.split(",") if v]
    for predictor, density in plan:
        for allocation in ["uniform"] + (["greedy"] if density in greedy else []):
            spec = MGSSpec(density=density, predictor=predictor)
            sparse, _, budget, seconds = _calibrated_mgs(dense, captured, spec, allocation, loss_ids)
            for _, mlp in sparse.sparse_mlps():
                mlp.reset_density()
            ppl = evaluate(sparse, eval_ids, progress)
            unit, weights = _measured(sparse)
            run.add({"variant": f"MGS {PREDICTOR_LABELS[predictor]}, thresholds ({allocation}) {density:.0%}",
                     "method": f"mgs-{predictor}-{allocation}", "target": density, "perplexity": ppl,
                     "unit_fraction": unit, "weight_fraction": weights, "spec": sparse.config.sparse_mlp,
                     "layer_densities": budget["layer_densities"], "fit_seconds": seconds})
            del sparse
            if allocation == "greedy":
                continue
            level = weights  # the baselines read as many bytes as this MGS model
            if any(r["method"] == "oracle-threshold" and abs(r["weight_fraction"] - level) < SAME_LEVEL
                   for r in run.payload["rows"]):
                continue
            _wrapped_row(run, dense, layers, arch.mlp_attr, eval_ids, progress,
                         lambda i, mlp, d=level: OracleThresholdMLP.calibrated(mlp, captured.inputs[i], d, seed=i),
                         f"oracle threshold @ {level:.1%} bytes", "oracle-threshold", level, lambda w: w.unit_fraction())
            _wrapped_row(run, dense, layers, arch.mlp_attr, eval_ids, progress,
                         lambda i, mlp, d=level: OracleTopKMLP(mlp, d),
                         f"oracle top-k @ {level:.1%} bytes", "oracle-top-k", level, lambda w: w.unit_fraction())
            _wrapped_row(run, dense, layers, arch.mlp_attr, eval_ids, progress,
                         lambda i, mlp, f=level: TealMLP.calibrated(mlp, captured.inputs[i], f, seed=i),
                         f"TEAL-style @ {level:.1%} bytes", "teal", level, lambda w: w.measured_weight_fraction())
            if level > 1 / 3:  # CATS reads all of gate_proj
                _wrapped_row(run, dense, layers, arch.mlp_attr, eval_ids, progress,
                             lambda i, mlp, f=level: CatsMLP.calibrated(mlp, captured.inputs[i], f, seed=i),
                             f"CATS @ {level:.1%} bytes", "cats", level, lambda w: w.measured_weight_fraction())
    for density in [float(v) for v in args.linear_densities.split(",") if v]:
        spec = MGSSpec(density=density, predictor="linear", rank=64)
        sparse, reports, _, seconds = _calibrated_mgs(dense, captured, spec, "uniform", loss_ids)
        for _, mlp in sparse.sparse_mlps():
            mlp.reset_density()
        ppl = evaluate(sparse, eval_ids, progress)
        unit, weights = _measured(sparse)
        run.add({"variant": f"MGS rank-64 linear gate, thresholds {density:.0%}", "method": "mgs-linear",
                 "target": density, "perplexity": ppl, "unit_fraction": unit, "weight_fraction": weights,
                 "gate_recall_after": _mean(r.recall_after for r in reports), "fit_seconds": seconds})
        del sparse


def tree_rows(run, args, dense, captured, calib_ids, eval_ids, loss_ids, progress) -> None:
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    specs = [(tree_spec_for_fraction(hidden, intermediate, float(v)), float(v))
             for v in args.tree_fractions.split(",") if v]
    for spec in parse_tree_specs(args.tree_specs):
        spec = spec.resolve(hidden, intermediate)
        specs.append((spec, spec.active_units / intermediate))
    specs += [(None, float(v)) for v in args.tree_search.split(",") if v]
    for spec, fraction in specs:
        start = time.perf_counter()
        search = allocation = None
        layer_specs = spec
        if spec is None:  # per-layer shapes chosen by the shape search
            search = search_tree_shapes(dense, captured.inputs, fraction, router_fit=args.router_fit,
                                        progress=progress)
            layer_specs = spec = search.specs()
        elif args.tree_allocation == "greedy" and spec.leaf_neurons == "selected":
            layer_specs, sensitivities, grid = allocate_tree_widths(dense, spec, captured.inputs, loss_ids, fraction,
                                                                    progress=progress)
            allocation = {"sensitivities": sensitivities.tolist(), "fractions": list(grid),
                          "leaf_widths": [s.leaf_width for s in layer_specs],
                          "seconds": time.perf_counter() - start}
        sparse = convert(dense, layer_specs, progress=False)
        for param in sparse.parameters():
            param.requires_grad_(False)
        for _, mlp in sparse.sparse_mlps():
            mlp.requires_grad_(True)
        reports = distill_layers(sparse, dense, captured.inputs, steps=args.distill_steps, lr=args.distill_lr,
                                 fit_tree_routing=not args.no_routing_fit, router_fit=args.router_fit,
                                 sequential_ids=calib_ids if args.sequential else None, progress=progress)
        seconds = time.perf_counter() - start
        sparse.requires_grad_(False)
        tree_ppl = evaluate(sparse, eval_ids, progress)
        cost = sparse.sparse_cost()
        options = (", hyperplane" if sparse.config.sparse_spec.routing == "hyperplane" else "") + (
            f", {args.router_fit} routers" if args.router_fit != DEFAULT_ROUTER_FIT else "") + (
            ", sequential" if args.sequential else "") + (
            ", no routing fit (leaves by gate-row bisection)" if args.no_routing_fit else "")
        stored = sum(m.stored_multiple for _, m in sparse.sparse_mlps()) / sparse.config.num_hidden_layers
        if search is None:
            trees = f"{spec.num_trees} trees, " if spec.num_trees > 1 else ""
            shape = f"{trees}depth {spec.depth}, node {spec.node_width}, leaf {spec.leaf_width}, shared {spec.shared_width}"
            if spec.leaf_neurons == "selected":
                shape += f", selected leaves: MLP stored {stored:.1f}x"
            if allocation:
                widths = allocation["leaf_widths"]
                shape += (f", leaf widths allocated per layer on calibration KL ({min(widths)}-{max(widths)}, "
                          f"first layer {widths[0]})")
        else:
            shape = f"shapes searched per layer, <= {search.active_units} active"
        run.add({"variant": f"tree ~{fraction:.0%} ({shape}{options})",
                 "method": "tree", "target": fraction, "spec": sparse.config.sparse_mlp, "perplexity": tree_ppl,
                 "unit_fraction": cost.unit_fraction, "weight_fraction": cost.weight_fraction,
                 "stored_multiple": stored, "captured_mass_before": _mean(r.captured_mass_before for r in reports),
                 "captured_mass_after": _mean(r.captured_mass_after for r in reports),
                 "layer_mse_before": _mean(r.mse_before for r in reports),
                 "layer_mse_after": _mean(r.mse_after for r in reports), "fit_seconds": seconds,
                 **({"shape_search": dataclasses.asdict(search)} if search else {}),
                 **({"allocation": allocation} if allocation else {})})
        del sparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=40, help="protocol windows of 1024 tokens (0 = all)")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    parser.add_argument("--mgs-densities", default="0.5,0.35,0.25,0.15,0.1", help="densities of the 4-bit predictor")
    parser.add_argument("--nested-densities", default="0.8,0.5,0.35,0.25,0.15,0.1",
                        help="densities of the nested predictor (the default)")
    parser.add_argument("--greedy-densities", default="0.25,0.1", help="densities that also run greedy allocation")
    parser.add_argument("--linear-densities", default="0.5,0.25", help="densities of the trained linear gate")
    parser.add_argument("--tree-fractions", default="0.25,0.12,0.04")
    parser.add_argument("--tree-specs", default="",
                        help="more trees, `;`-separated TreeSpec fields: num_trees=64,depth=2,node_width=0,"
                             "routing=hyperplane;...")
    parser.add_argument("--tree-search", default="",
                        help="active fractions at which each layer's forest shape is searched (treeffn distill --active)")
    parser.add_argument("--tree-allocation", choices=("uniform", "greedy"), default="uniform",
                        help="trees with selected leaves: the same width in every layer, or widths whose mean is the "
                             "spec's, shared out on calibration KL (conversion/tree_allocation.py)")
    parser.add_argument("--no-routing-fit", action="store_true",
                        help="distil the trees as converted: leaves by recursive bisection of gate rows, no fit of "
                             "the partition and routing to activation mass")
    parser.add_argument("--router-fit", choices=ROUTER_FITS, default=DEFAULT_ROUTER_FIT, help="hyperplane routers")
    parser.add_argument("--sequential", action="store_true",
                        help="distil the trees sequentially (each layer on the sparse model's own inputs)")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR, help="tree distillation lr (treeffn distill's)")
    parser.add_argument("--only", choices=("mgs", "tree"), help="run one method; carry the other's rows over")
    parser.add_argument("--append", action="store_true",
                        help="carry every row of the existing file over (dense is measured again), e.g. to add densities")
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(RESULTS / args.output)
        return
    progress = not args.no_progress
    torch.manual_seed(0)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])

    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)

    start, rss_before = time.perf_counter(), _peak_rss_gib()
    calib_ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window,
                              args.calibration_windows)
    captured = capture_mlp_inputs(dense, calib_ids, tokens_per_layer=args.tokens_per_layer, progress=progress)
    calibration = {
        "source": "../shared/data/wikitext-2/valid.txt", "windows": int(calib_ids.shape[0]), "window": args.window,
        "tokens": captured.tokens_seen, "tokens_per_layer": args.tokens_per_layer,
        "seconds": time.perf_counter() - start, "peak_rss_gib_before": rss_before, "peak_rss_gib_after": _peak_rss_gib(),
    }
    carried = []
    if (args.only or args.append) and (RESULTS / args.output).exists():
        previous = json.loads((RESULTS / args.output).read_text())
        if args.append:
            keep = lambda m: m != "dense"  # noqa: E731
        else:
            keep = (lambda m: m == "tree") if args.only == "mgs" else (lambda m: m != "tree" and m != "dense")
        carried = [{"carried_over": previous["command"], **row} for row in previous["rows"] if keep(row["method"])]
    run = Run(args, {
        "command": command, "machine": machine(), "dtype": str(dense.dtype).replace("torch.", ""),
        "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)",
        "shapes": {"hidden": dense.config.hidden_size, "intermediate": dense.config.intermediate_size,
                   "layers": dense.config.num_hidden_layers},
        "evaluation": {"text": "../shared/data/wikitext-2-raw/wiki.test.raw", "windows": int(eval_ids.shape[0]),
                       "window": int(eval_ids.shape[1])},
        "calibration": calibration, "settings": {k: v for k, v in vars(args).items() if k != "plot_only"},
        "bytes": "MLP weight bytes read per token as a fraction of the dense MLP's, all weights in bf16, "
                 "the MGS predictor at 4 bits + bf16 scales and zeros; nested: a selected neuron reads the "
                 "low nibbles of its gate and up rows and its bf16 down row (modelled: no kernel reads them yet)",
        "rows": [],
    })

    run.dense_ppl = evaluate(dense, eval_ids, progress)
    run.add({"variant": "dense", "method": "dense", "target": 1.0, "perplexity": run.dense_ppl,
             "unit_fraction": 1.0, "weight_fraction": 1.0})
    for row in carried:
        run.add(row)
    loss_ids = calib_ids[-LOSS_WINDOWS:]
    if args.only != "tree":
        mgs_frontier(run, args, dense, captured, eval_ids, loss_ids, progress)
    if args.only != "mgs":
        tree_rows(run, args, dense, captured, calib_ids, eval_ids, loss_ids, progress)
    plot(RESULTS / args.output)


STYLES = {
    "oracle-threshold": ("threshold oracle (ceiling)", "k--", "o"),
    "oracle-top-k": ("top-k oracle", "k:", "o"),
    "mgs-quantized-uniform": ("MGS, 4-bit predictor + thresholds", "C0-", "s"),
    "mgs-quantized-greedy": ("MGS, same, greedy allocation", "C0--", "x"),
    "mgs-nested-uniform": ("MGS, nested 4+4-bit gate/up + thresholds (bytes modelled)", "C5-", "P"),
    "mgs-linear": ("MGS, trained rank-64 gate + thresholds", "C4-", "v"),
    "teal": ("TEAL-style threshold", "C1-", "^"),
    "cats": ("CATS (|silu(g)|)", "C3-", "<"),
    "tree": ("tree, fit + distilled", "C2-", "D"),
}


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, (label, line, marker) in STYLES.items():
        rows = sorted((r for r in data["rows"] if r["method"] == method and "ppl_ratio" in r),
                      key=lambda r: r["weight_fraction"])
        if rows:
            ax.plot([r["weight_fraction"] for r in rows], [r["ppl_ratio"] for r in rows], line, marker=marker,
                    label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.03, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of MLP weight bytes read per token (bf16; predictor included)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_title(f"SmolLM2-135M, WikiText-2 test ({data['evaluation']['windows']} x 1024 tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
