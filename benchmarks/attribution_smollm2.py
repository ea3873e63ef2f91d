"""Where computation moves on SmolLM2-135M: dense vs a distilled tree vs a trained MGS layer.

Per decoder layer, the mean L2 norm of what the attention block and the MLP block write into the
residual stream, and each block's direct contribution to the next token's logit
(`treeffn_hf.attribution`), on the project's test protocol windows. The sparse models are
recovered the way `benchmarks/quality.py` recovers them (gate training for MGS, routing fit and
layer-wise distillation for the tree), with a smaller budget.

    python benchmarks/attribution_smollm2.py      # about 15 minutes on 2 CPU cores

Writes benchmarks/results/attribution_smollm2.json and .png; `python benchmarks/report.py`
renders the table into docs/attribution.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, machine, write_json  # noqa: E402

from treeffn_hf.attribution import as_dicts, plot_attribution, residual_attribution  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.distillation import distill_layers  # noqa: E402
from treeffn_hf.conversion.gate_training import train_gates  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "attribution_smollm2.json"


def summarise(rows) -> dict:
    n = len(rows)
    return {
        "attention_norm": sum(r.attention_norm for r in rows) / n,
        "mlp_norm": sum(r.mlp_norm for r in rows) / n,
        "mlp_share": sum(r.mlp_share for r in rows) / n,
        "attention_logit": sum(r.attention_logit for r in rows),
        "mlp_logit": sum(r.mlp_logit for r in rows),
        "mlp_logit_share": sum(r.mlp_logit_share for r in rows) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=8, help="protocol windows of 1024 tokens")
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens-per-layer", type=int, default=4096)
    parser.add_argument("--tree-fraction", type=float, default=0.25)
    parser.add_argument("--mgs-density", type=float, default=0.5)
    parser.add_argument("--gate-steps", type=int, default=150)
    parser.add_argument("--distill-steps", type=int, default=100)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    progress = not args.no_progress
    torch.manual_seed(0)
    started = time.perf_counter()

    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    calib_ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window,
                              args.calibration_windows)
    captured = capture_mlp_inputs(dense, calib_ids, tokens_per_layer=args.tokens_per_layer, progress=progress)

    models = {"dense": (dense, 1.0, 1.0)}
    mgs = convert(dense, MGSSpec(density=args.mgs_density), progress=False)
    train_gates(mgs, captured.inputs, steps=args.gate_steps, progress=progress)
    models[f"MGS {args.mgs_density:.0%}"] = (mgs, args.mgs_density, mgs.sparse_cost().weight_fraction)
    spec = tree_spec_for_fraction(dense.config.hidden_size, dense.config.intermediate_size, args.tree_fraction)
    tree = convert(dense, spec, progress=False)
    tree.requires_grad_(False)
    for _, mlp in tree.sparse_mlps():
        mlp.requires_grad_(True)
    distill_layers(tree, dense, captured.inputs, steps=args.distill_steps, progress=progress)
    tree.requires_grad_(False)
    cost = tree.sparse_cost()
    models[f"tree {cost.unit_fraction:.1%}"] = (tree, cost.unit_fraction, cost.weight_fraction)

    results, rows = {}, []
    for name, (model, units, weights) in models.items():
        layers = residual_attribution(model, eval_ids, progress=progress)
        results[name] = layers
        rows.append({"model": name, "unit_fraction": units, "weight_fraction": weights,
                     "perplexity": perplexity(model, eval_ids, progress=progress).perplexity,
                     "summary": summarise(layers), "layers": as_dicts(layers)})
    dense_ppl = rows[0]["perplexity"]
    for row in rows:
        row["ppl_ratio"] = row["perplexity"] / dense_ppl
    payload = {
        "benchmark": "attribution_smollm2", "command": "python benchmarks/attribution_smollm2.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)", "dtype": str(dense.dtype),
        "evaluation": {"text": "../shared/data/wikitext-2-raw/wiki.test.raw", "windows": int(eval_ids.shape[0]),
                       "window": int(eval_ids.shape[1])},
        "recovery": {"calibration_tokens": captured.tokens_seen, "tokens_per_layer": args.tokens_per_layer,
                     "gate_steps": args.gate_steps, "distill_steps": args.distill_steps, "tree_spec": spec.to_dict()},
        "seconds": time.perf_counter() - started, "rows": rows,
    }
    path = write_json(OUTPUT, payload)
    plot_attribution(results, RESULTS / "attribution_smollm2.png")
    for row in rows:
        s = row["summary"]
        print(f"{row['model']:12s} ppl ratio {row['ppl_ratio']:8.3f}  MLP share of writes {s['mlp_share']:.3f}  "
              f"of direct logit terms {s['mlp_logit_share']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
