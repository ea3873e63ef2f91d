"""Quality of every sparse variant of SmolLM2-135M against dense and against two baselines, in one run.

    python benchmarks/quality.py                      # the published run (about 1.5 h on 2 CPU cores)
    python benchmarks/quality.py --plot-only          # redraw the plot from the JSON

Rows (perplexity on the protocol of ../shared/data/README.md, ratio to dense):
  dense; oracle top-k at each MGS density; MGS after gate training; a TEAL-style magnitude
  threshold calibrated to the same fraction of MLP weights read as each MGS row; trees near each
  target fraction after routing fit + layer-wise distillation.
Calibration text: ../shared/data/wikitext-2/valid.txt. Every row states the active fraction of
MLP units and of MLP weights read. Results: benchmarks/results/quality_smollm2.json (+ .png),
written after every row so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, write_json  # noqa: E402
from quality_baselines import OracleTopKMLP, TealMLP, unwrap_mlps, wrap_mlps  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.distillation import distill_layers  # noqa: E402
from treeffn_hf.conversion.gate_training import train_gates  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "quality_smollm2.json"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=40, help="protocol windows of 1024 tokens (0 = all)")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    parser.add_argument("--mgs-densities", default="0.5,0.25,0.1")
    parser.add_argument("--tree-fractions", default="0.25,0.12,0.04")
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
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
    arch = architecture_for(dense.config)
    layers = arch.decoder_layers(dense)
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
    run = Run(args, {
        "command": command, "machine": machine(), "dtype": str(dense.dtype).replace("torch.", ""),
        "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)",
        "shapes": {"hidden": dense.config.hidden_size, "intermediate": dense.config.intermediate_size,
                   "layers": dense.config.num_hidden_layers},
        "evaluation": {"text": "../shared/data/wikitext-2-raw/wiki.test.raw", "windows": int(eval_ids.shape[0]),
                       "window": int(eval_ids.shape[1])},
        "calibration": calibration, "settings": {k: v for k, v in vars(args).items() if k != "plot_only"},
        "rows": [],
    })

    run.dense_ppl = evaluate(dense, eval_ids, progress)
    run.add({"variant": "dense", "method": "dense", "target": 1.0, "perplexity": run.dense_ppl,
             "unit_fraction": 1.0, "weight_fraction": 1.0})

    for density in [float(v) for v in args.mgs_densities.split(",")]:
        oracles = wrap_mlps(layers, arch.mlp_attr, lambda i, mlp, d=density: OracleTopKMLP(mlp, d))
        oracle_ppl = evaluate(dense, eval_ids, progress)
        unit = oracles[0].unit_fraction()
        unwrap_mlps(layers, arch.mlp_attr)
        run.add({"variant": f"oracle top-k {density:.0%}", "method": "oracle", "target": density,
                 "perplexity": oracle_ppl, "unit_fraction": unit, "weight_fraction": unit})

        start = time.perf_counter()
        sparse = convert(dense, MGSSpec(density=density), progress=False)
        reports = train_gates(sparse, captured.inputs, steps=args.gate_steps, progress=progress)
        seconds = time.perf_counter() - start
        for _, mlp in sparse.sparse_mlps():
            mlp.reset_density()
        mgs_ppl = evaluate(sparse, eval_ids, progress)
        cost = sparse.sparse_cost()
        measured_units = _mean(m.measured_units() for _, m in sparse.sparse_mlps()) / dense.config.intermediate_size
        run.add({"variant": f"MGS {density:.0%}", "method": "mgs", "target": density, "perplexity": mgs_ppl,
                 "unit_fraction": measured_units, "weight_fraction": cost.weight_fraction,
                 "gate_recall_before": _mean(r.recall_before for r in reports),
                 "gate_recall_after": _mean(r.recall_after for r in reports),
                 "per_layer_recall": [r.recall_after for r in reports], "fit_seconds": seconds})
        del sparse

        weight_fraction = cost.weight_fraction
        wrappers = wrap_mlps(layers, arch.mlp_attr,
                             lambda i, mlp, f=weight_fraction: TealMLP.calibrated(mlp, captured.inputs[i], f, seed=i))
        teal_ppl = evaluate(dense, eval_ids, progress)
        measured = _mean(w.measured_weight_fraction() for w in wrappers)
        unwrap_mlps(layers, arch.mlp_attr)
        run.add({"variant": f"TEAL-style @ MGS {density:.0%} bytes", "method": "teal", "target": weight_fraction,
                 "perplexity": teal_ppl, "unit_fraction": measured, "weight_fraction": measured})

    for fraction in [float(v) for v in args.tree_fractions.split(",")]:
        spec = tree_spec_for_fraction(dense.config.hidden_size, dense.config.intermediate_size, fraction)
        start = time.perf_counter()
        sparse = convert(dense, spec, progress=False)
        for param in sparse.parameters():
            param.requires_grad_(False)
        for _, mlp in sparse.sparse_mlps():
            mlp.requires_grad_(True)
        reports = distill_layers(sparse, dense, captured.inputs, steps=args.distill_steps, lr=args.distill_lr,
                                 progress=progress)
        seconds = time.perf_counter() - start
        sparse.requires_grad_(False)
        tree_ppl = evaluate(sparse, eval_ids, progress)
        cost = sparse.sparse_cost()
        run.add({"variant": f"tree ~{fraction:.0%} (depth {spec.depth}, node {spec.node_width}, leaf {spec.leaf_width}, "
                            f"shared {spec.shared_width})",
                 "method": "tree", "target": fraction, "spec": spec.to_dict(), "perplexity": tree_ppl,
                 "unit_fraction": cost.unit_fraction, "weight_fraction": cost.weight_fraction,
                 "captured_mass_before": _mean(r.captured_mass_before for r in reports),
                 "captured_mass_after": _mean(r.captured_mass_after for r in reports),
                 "layer_mse_before": _mean(r.mse_before for r in reports),
                 "layer_mse_after": _mean(r.mse_after for r in reports), "fit_seconds": seconds})
        del sparse
    plot(RESULTS / args.output)


def plot(path: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"oracle": ("oracle top-k (ceiling)", "k--", "o"), "mgs": ("MGS, trained gate", "C0-", "s"),
              "teal": ("TEAL-style threshold", "C1-", "^"), "tree": ("tree, fit + distilled", "C2-", "D")}
    for method, (label, line, marker) in styles.items():
        rows = sorted((r for r in data["rows"] if r["method"] == method and "ppl_ratio" in r),
                      key=lambda r: r["weight_fraction"])
        if rows:
            ax.plot([r["weight_fraction"] for r in rows], [r["ppl_ratio"] for r in rows], line, marker=marker,
                    label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of MLP weights read per token")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_title(f"SmolLM2-135M, WikiText-2 test ({data['evaluation']['windows']} x 1024 tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
