"""A study for issue #20: trees whose leaves may share neurons, measured on the whole model.

`tree_layer_fit.py` finds that a tree whose leaves partition the dense neurons fits no better
than static pruning, and that leaves chosen per token cluster (each leaf the top-mass neurons of
the tokens routed to it, so leaves overlap) fit better. This study measured that structure on the
whole model before it became the package's `TreeSpec(leaf_neurons='selected')`; it now builds that
layer (`fit_selected_leaves`: 2-means hyperplane routing, each leaf its tokens' top-mass neurons,
down rows refitted by ridge regression per leaf) and gives it no gradient step, so it measures
what calibration alone does. The layers are fitted sequentially (each on the inputs the layers
before it, already replaced, produce), against the dense MLP on those inputs.
Perplexity on the first `--eval-windows` protocol windows of wiki.test.raw, ratio to dense.

    python benchmarks/studies/overlap_tree_study.py        # about 25 minutes on 2 CPU cores

Writes benchmarks/results/overlap_tree_study_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, machine, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.leaf_selection import fit_selected_leaves  # noqa: E402
from treeffn_hf.conversion.replay import LayerReplay  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import TreeSpec  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "overlap_tree_study_smollm2.json"


@torch.no_grad()
def fit_overlapping(dense_mlp, x: torch.Tensor, width: int, depth: int, seed: int) -> TreeFFN:
    """The package's tree with selected leaves, fitted on `x` and given no gradient step."""
    hidden, intermediate = x.shape[1], dense_mlp.gate_proj.weight.shape[0]
    spec = TreeSpec(depth=depth, node_width=0, routing="hyperplane", leaf_neurons="selected", leaf_width=width,
                    shared_width=0).resolve(hidden, intermediate)
    layer = TreeFFN(hidden, intermediate, spec, dense_mlp.act_fn)
    fit_selected_leaves(layer, dense_mlp, x, seed=seed)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["0.25:4", "0.25:2", "0.125:4"],
                        help="FRACTION:DEPTH (2^depth leaves of FRACTION x intermediate neurons)")
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval().requires_grad_(False)
    arch = architecture_for(dense.config)
    intermediate = dense.config.intermediate_size
    ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window, args.calibration_windows)
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    dense_ppl = perplexity(dense, eval_ids, progress=False).perplexity
    print(f"dense perplexity {dense_ppl:.3f} on {eval_ids.shape[0]} windows", flush=True)
    rows = []
    for config in args.configs:
        fraction, depth = float(config.split(":")[0]), int(config.split(":")[1])
        width = round(fraction * intermediate)
        start = time.perf_counter()
        model = copy.deepcopy(dense)
        layers = arch.decoder_layers(model)
        dense_mlps = [getattr(layer, arch.mlp_attr) for layer in arch.decoder_layers(dense)]
        replay = LayerReplay(model, ids)
        for index, layer in enumerate(layers):
            x = replay.run_layer(advance=False)[0]
            setattr(layer, arch.mlp_attr, fit_overlapping(dense_mlps[index], x, width, depth, seed=index))
            replay.run_layer()
        fit_seconds = time.perf_counter() - start
        ppl = perplexity(model, eval_ids, progress=False).perplexity
        row = {"fraction": fraction, "depth": depth, "leaves": 1 << depth, "width": width,
               "unit_fraction": width / intermediate, "stored_mlp_multiple": (1 << depth) * width / intermediate,
               "perplexity": ppl, "ratio": ppl / dense_ppl, "fit_seconds": fit_seconds}
        rows.append(row)
        print(f"{1 << depth} leaves of {width} neurons ({width / intermediate:.1%} active, MLP stored "
              f"{row['stored_mlp_multiple']:.1f}x): perplexity {ppl:.2f}, ratio {row['ratio']:.3f} "
              f"(fit {fit_seconds:.0f} s)", flush=True)
        del model
    write_json(OUTPUT, {
        "command": "python benchmarks/studies/overlap_tree_study.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "dtype": "float32", "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)",
        "calibration": {"source": "../shared/data/wikitext-2/valid.txt", "windows": int(ids.shape[0]),
                        "window": args.window},
        "evaluation": {"windows": int(eval_ids.shape[0]), "window": 1024}, "dense_perplexity": dense_ppl,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
