"""Quality of SmolLM2-135M's sparse variants against dense, the oracles and two baselines, in one run.

    python benchmarks/quality.py --only mgs          # the MGS frontier (about 1-1.5 h on 2 CPU cores)
    python benchmarks/quality.py                     # the frontier and the trees
    python benchmarks/quality.py --plot-only         # redraw the plot from the JSON

The MGS frontier, at the same precision: perplexity ratio against the MLP weight bytes read per
token, as the code path reads them, as a fraction of the bf16 MLP's. Beside every sparse row:
- the dense MLP weight-only quantized (`--dense-grids`: int8 per row and in groups of 64, int4 in
  groups of 32 and 64; weights rounded onto the grid, scales and zeros in bf16);
- the threshold oracle, the top-k oracle (exact |silu(g) * u|, read for free), a TEAL-style
  threshold and the CATS criterion (|silu(g)|, all of gate_proj read) at `--baseline-densities`,
  on the MLP weights rounded to int8 in groups of 64 and charged those bytes.
The default recipe runs at each density of `--nested-densities` as a user gets it: `treeffn
convert --method mgs --density D` and `treeffn distill` (thresholds calibrated on valid.txt, the
down_proj refit), saved, then reloaded with `from_pretrained(..., trust_remote_code=True)` and
evaluated on the path it runs (the C kernel where it builds), its bytes those that path reads.
`--mgs-densities` (the 4-bit predictor beside float weights, greedy allocation too at
`--greedy-densities`) and `--linear-densities` (the trained gate) are off by default: they have
no kernel, and their PyTorch path reads float rows.
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
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, parse_tree_specs, write_json  # noqa: E402
from dense_baselines import FRONTIER_GRIDS, INT8_G64, fake_quantized, mlp_bytes  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.baselines import (  # noqa: E402
    CatsMLP,
    OracleThresholdMLP,
    OracleTopKMLP,
    TealMLP,
    unwrap_mlps,
    wrap_mlps,
)
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.distillation import DISTILL_LR, distill_layers  # noqa: E402
from treeffn_hf.conversion.gate_training import train_gates  # noqa: E402
from treeffn_hf.conversion.mgs.recipe import DEFAULT_MAX_RATIO  # noqa: E402
from treeffn_hf.conversion.routing_fit import DEFAULT_ROUTER_FIT, ROUTER_FITS  # noqa: E402
from treeffn_hf.conversion.shape_search import search_tree_shapes  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.conversion.tree_allocation import allocate_tree_widths  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.workflows import LOSS_WINDOWS, convert_checkpoint, distill_checkpoint  # noqa: E402

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




def mgs_frontier(run, args, dense, captured, eval_ids, loss_ids, progress) -> None:
    dense_grid_rows(run, args, dense, eval_ids, progress)
    eight_bit_baselines(run, args, dense, captured, eval_ids, progress)
    for max_ratio in [float(v) for v in args.nested_ratios.split(",") if v]:
        nested_checkpoint_row(run, args, eval_ids, progress, max_ratio=max_ratio)
    for density in [float(v) for v in args.nested_densities.split(",") if v]:
        nested_checkpoint_row(run, args, eval_ids, progress, density=density)
    greedy = {float(v) for v in args.greedy_densities.split(",") if v}
    for density in [float(v) for v in args.mgs_densities.split(",") if v]:
        for allocation in ["uniform"] + (["greedy"] if density in greedy else []):
            sparse, _, budget, seconds = _calibrated_mgs(dense, captured, MGSSpec(density=density, predictor="quantized"),
                                                         allocation, loss_ids)
            _sparse_row(run, sparse, eval_ids, progress, f"MGS 4-bit predictor, thresholds ({allocation}) "
                        f"{density:.0%}", f"mgs-quantized-{allocation}", density,
                        layer_densities=budget["layer_densities"], fit_seconds=seconds)
    for density in [float(v) for v in args.linear_densities.split(",") if v]:
        spec = MGSSpec(density=density, predictor="linear", rank=64)
        sparse, reports, _, seconds = _calibrated_mgs(dense, captured, spec, "uniform", loss_ids)
        _sparse_row(run, sparse, eval_ids, progress, f"MGS rank-64 linear gate, thresholds {density:.0%}",
                    "mgs-linear", density, gate_recall_after=_mean(r.recall_after for r in reports),
                    fit_seconds=seconds)


def _sparse_row(run, sparse, eval_ids, progress, variant: str, method: str, target: float, **extra) -> None:
    for _, mlp in sparse.sparse_mlps():
        mlp.reset_density()
    ppl = evaluate(sparse, eval_ids, progress)
    unit, weights = _measured(sparse)
    paths = sorted({mlp.last_path for _, mlp in sparse.sparse_mlps()})
    run.add({"variant": variant, "method": method, "target": target, "perplexity": ppl, "unit_fraction": unit,
             "weight_fraction": weights, "spec": dict(sparse.config.sparse_mlp), "paths": paths, **extra})


def dense_grid_rows(run, args, dense, eval_ids, progress) -> None:
    """The dense model with its MLP weights rounded onto each of `--dense-grids`."""
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    for grid in FRONTIER_GRIDS:
        if grid.name not in args.dense_grids.split(","):
            continue
        ppl = evaluate(fake_quantized(dense, grid), eval_ids, progress)
        run.add({"variant": f"dense, MLP weights {grid.name}", "method": f"dense-int{grid.bits}", "target": 1.0,
                 "perplexity": ppl, "unit_fraction": 1.0,
                 "weight_fraction": mlp_bytes(hidden, intermediate, grid) / mlp_bytes(hidden, intermediate, None)})


def eight_bit_baselines(run, args, dense, captured, eval_ids, progress) -> None:
    """The oracles, TEAL-style and CATS on MLP weights rounded to int8 g64, charged int8 g64 bytes."""
    quantized = fake_quantized(dense, INT8_G64)
    arch = architecture_for(quantized.config)
    layers, attr = arch.decoder_layers(quantized), arch.mlp_attr
    per_weight = INT8_G64.bytes_per_weight() / 2  # of a bf16 weight
    for density in [float(v) for v in args.baseline_densities.split(",") if v]:
        rows = [(OracleThresholdMLP, "oracle-threshold", "threshold oracle", lambda w: w.unit_fraction()),
                (OracleTopKMLP, "oracle-top-k", "top-k oracle", lambda w: w.unit_fraction()),
                (TealMLP, "teal", "TEAL-style", lambda w: w.measured_weight_fraction()),
                (CatsMLP, "cats", "CATS", lambda w: w.measured_weight_fraction())]
        for cls, method, label, fraction in rows:
            if cls is CatsMLP and density <= 1 / 3:  # CATS reads all of gate_proj
                continue
            if cls is OracleTopKMLP:
                wrap = lambda i, mlp, d=density: OracleTopKMLP(mlp, d)  # noqa: E731
            else:
                wrap = lambda i, mlp, d=density, c=cls: c.calibrated(mlp, captured.inputs[i], d, seed=i)  # noqa: E731
            _wrapped_row(run, quantized, layers, attr, eval_ids, progress, wrap,
                         f"{label}, int8 g64 weights @ {density:.0%}", f"{method}-int8", density,
                         lambda w, f=fraction: f(w) * per_weight)


def nested_checkpoint_row(run, args, eval_ids, progress, density: float | None = None,
                          max_ratio: float | None = None) -> None:
    """The nested recipe at `density` (uniform), or within a calibration perplexity budget
    `max_ratio` (the default recipe: greedy), made by the CLI's functions (or, for the default
    recipe, taken from `--recipe-checkpoint`: the decode benchmark's, made the same way), saved
    and reloaded as a user loads it (remote code, bf16), evaluated on the path it runs."""
    directory, gguf = smollm2_gguf()
    budget = f"--max-ratio {max_ratio}" if density is None else f"--density {density}"
    with tempfile.TemporaryDirectory() as work:
        distilled = Path(work) / "distilled"
        if density is None and max_ratio == DEFAULT_MAX_RATIO and args.recipe_checkpoint:
            distilled = Path(args.recipe_checkpoint)
        else:
            convert_checkpoint(directory, Path(work) / "converted", MGSSpec(density=density or MGSSpec.density),
                               gguf_file=gguf, progress=False)
            distill_checkpoint(Path(work) / "converted", distilled, dense=directory, gguf_file=gguf,
                               calibration=DATA / "wikitext-2" / "valid.txt", density=density, max_ratio=max_ratio,
                               progress=False)
        summary = json.loads((distilled / "treeffn_distill.json").read_text())  # its seconds: distill's own
        reloaded = AutoModelForCausalLM.from_pretrained(distilled, trust_remote_code=True,
                                                        dtype=torch.bfloat16).eval()
        label = f"{density:.0%}" if density is not None else f"calibration ratio <= {max_ratio}"
        _sparse_row(run, reloaded, eval_ids, progress, f"MGS nested recipe, {label}, saved + reloaded (bf16)",
                    "mgs-nested-uniform" if density is not None else "mgs-nested-ratio", density or max_ratio,
                    fit_seconds=summary["seconds"], budget=summary["budget"],
                    command=f"treeffn convert --method mgs && treeffn distill {budget}")


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
    parser.add_argument("--mgs-densities", default="", help="densities of the 4-bit predictor beside float weights")
    parser.add_argument("--nested-ratios", default="1.01",
                        help="calibration perplexity budgets of the nested recipe (treeffn distill --max-ratio; 1.01 is "
                             "the default recipe)")
    parser.add_argument("--recipe-checkpoint", default=None,
                        help="the default recipe's checkpoint, already made by `treeffn convert --method mgs` + "
                             "`treeffn distill` with their defaults (bench_decode.py --work keeps one): evaluated "
                             "instead of made again")
    parser.add_argument("--nested-densities", default="0.8,0.5,0.35,0.25,0.15,0.1",
                        help="densities of the nested predictor at uniform allocation (treeffn distill --density)")
    parser.add_argument("--greedy-densities", default="0.25,0.1", help="densities that also run greedy allocation")
    parser.add_argument("--linear-densities", default="", help="densities of the trained linear gate")
    parser.add_argument("--dense-grids", default=",".join(grid.name for grid in FRONTIER_GRIDS),
                        help="weight-only grids of the dense rows")
    parser.add_argument("--baseline-densities", default="0.5,0.35,0.25",
                        help="densities of the oracles, TEAL-style and CATS on int8 g64 weights")
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
        "bytes": "MLP weight bytes read per token as a fraction of the dense MLP's bf16 bytes. MGS: as the path "
                 "the reloaded checkpoint runs reads them at batch 1 (its bytes_read: the C kernel reads the "
                 "predictor, then the selected neurons' low nibbles and int8 down rows). Dense grids: codes plus bf16 scales (and "
                 "zeros). Oracles, TEAL-style, CATS: the weights they read at int8 g64. Trees: bf16 rows, as served",
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


ZOOM_MAX_RATIO = 1.06  # the right panel of the plot
STYLES = {
    "mgs-quantized-uniform": ("MGS, 4-bit predictor + thresholds", "C0-", "s"),
    "mgs-quantized-greedy": ("MGS, same, greedy allocation", "C0--", "x"),
    "mgs-nested-uniform": ("MGS nested recipe at a density (saved, reloaded in bf16; bytes as its kernel reads)",
                           "C5-", "P"),
    "mgs-nested-ratio": ("MGS default recipe: calibration ratio <= 1.01 (saved, reloaded in bf16)", "C5", "*"),
    "dense-int8": ("dense, MLP int8 (per row, g64)", "C7", "*"),
    "dense-int4": ("dense, MLP int4 (g32/g64)", "C8", "*"),
    "oracle-threshold-int8": ("threshold oracle, int8 g64 weights", "k--", "o"),
    "oracle-top-k-int8": ("top-k oracle, int8 g64 weights", "k:", "o"),
    "teal-int8": ("TEAL-style, int8 g64 weights", "C1-", "^"),
    "cats-int8": ("CATS, int8 g64 weights", "C3-", "<"),
    "mgs-linear": ("MGS, trained rank-64 gate + thresholds", "C4-", "v"),
    "tree": ("tree, fit + distilled", "C2-", "D"),
}


def plot(path: Path) -> None:
    """Ratio against bytes read: every row (left), and the region near dense quality (right), where
    the MGS recipe meets the dense weight-only grids and the 8-bit baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, zoomed in zip(axes, (False, True)):
        for method, (label, line, marker) in STYLES.items():
            rows = sorted((r for r in data["rows"] if r["method"] == method and "ppl_ratio" in r
                           and (not zoomed or r["ppl_ratio"] <= ZOOM_MAX_RATIO)), key=lambda r: r["weight_fraction"])
            if rows:
                ax.plot([r["weight_fraction"] for r in rows], [r["ppl_ratio"] for r in rows], line, marker=marker,
                        label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(1.01, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("linear" if zoomed else "log")
        ax.set_xlabel("MLP weight bytes read per token, over the bf16 MLP's (as each path reads them)")
        ax.set_ylabel("perplexity / dense perplexity")
        ax.set_title(f"ratio <= {ZOOM_MAX_RATIO}: the frontier near dense quality" if zoomed else
                     f"SmolLM2-135M, WikiText-2 test ({data['evaluation']['windows']} x 1024 tokens)", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
