"""Why trees lose to per-token selection on SmolLM2-135M: how much activation mass each structure can reach.

For every `--layer-step`-th decoder layer, the MLP inputs are captured on calibration text
(valid.txt, as `treeffn distill` does); each forest of `--specs` is built from the dense MLP and its
partition and routing fitted (`fit_routing`). On the held-out tenth of the tokens it reports the
fraction of the dense activation mass `|act(g) u| |d|` that
- its routers reach (`routed`);
- the best path per tree reaches (`oracle paths`: no router of these leaves can do better);
and, at the same number of neurons per token, what
- a fixed set of always-on neurons reaches (`static`: the top calibration mean mass);
- per-token top-k selection reaches (`top-k`: the MGS oracle).
If `oracle paths` sits near `static` and far under `top-k`, routing is not what is missing: no
partition of the neurons into leaves holds most of what each token needs.

    python benchmarks/studies/tree_mass_bound.py            # about 10 minutes on 2 CPU cores

Writes benchmarks/results/tree_mass_bound_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import RESULTS, machine, parse_tree_specs, smollm2_with_calibration, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.conversion.routing_fit import captured_mass, fit_routing, neuron_mass  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_mlp_state  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "tree_mass_bound_smollm2.json"
SPECS = ("depth=2,node_width=1;depth=3,node_width=1,leaf_width=164,shared_width=217;"
         "num_trees=16,depth=3,node_width=1,leaf_width=10,shared_width=144;"
         "num_trees=64,depth=2,node_width=0,routing=hyperplane;"
         "depth=3,node_width=1;depth=4,node_width=1,leaf_width=89,shared_width=97;"
         "num_trees=4,depth=5,node_width=1,leaf_width=10,shared_width=132")


@torch.no_grad()
def selection_masses(layer: TreeFFN, x_fit: torch.Tensor, x_eval: torch.Tensor, units: int) -> tuple[float, float]:
    """(static, top-k) captured mass at `units` neurons a token, on `x_eval`."""
    static = torch.argsort(neuron_mass(layer, x_fit)[0].mean(0), descending=True)[:units]
    mass, _ = neuron_mass(layer, x_eval)
    total = mass.sum()
    return float(mass[:, static].sum() / total), float(mass.topk(units, dim=1).values.sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default=SPECS, help="`;`-separated TreeSpec fields")
    parser.add_argument("--layer-step", type=int, default=2, help="every how many decoder layers to measure")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(RESULTS / OUTPUT)
        return
    command = "python benchmarks/studies/tree_mass_bound.py " + " ".join(sys.argv[1:])
    torch.manual_seed(0)
    dense, _, ids, captured = smollm2_with_calibration(args.calibration_windows, args.window, args.tokens_per_layer)
    arch = architecture_for(dense.config)
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    layer_ids = list(range(0, dense.config.num_hidden_layers, args.layer_step))
    rows = []
    for spec in parse_tree_specs(args.specs):
        spec = spec.resolve(hidden, intermediate)
        start, per_layer = time.perf_counter(), []
        for index in layer_ids:
            mlp = getattr(arch.decoder_layers(dense)[index], arch.mlp_attr)
            dense_rows = (getattr(mlp, arch.gate_proj), getattr(mlp, arch.up_proj), getattr(mlp, arch.down_proj))
            layer = TreeFFN(hidden, intermediate, spec, mlp.act_fn)
            layer.load_state_dict(sparse_mlp_state(spec, *dense_rows))
            x = captured.inputs[index].float()
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(index))
            n_eval = x.shape[0] // 10  # fit_routing's own held-out split is internal; this one is ours
            x_eval, x_fit = x[order[:n_eval]], x[order[n_eval:]]
            fit_routing(layer, x_fit, seed=index, layer_index=index)
            static, top_k = selection_masses(layer, x_fit, x_eval, spec.active_units)
            per_layer.append({"layer": index, "routed": captured_mass(layer, x_eval),
                              "oracle_paths": captured_mass(layer, x_eval, oracle=True), "static": static,
                              "top_k": top_k})
        summary = {key: statistics.fmean(r[key] for r in per_layer)
                   for key in ("routed", "oracle_paths", "static", "top_k")}
        rows.append({"spec": spec.to_dict(), "active_units": spec.active_units,
                     "unit_fraction": spec.active_units / intermediate, **summary, "layers": per_layer,
                     "seconds": time.perf_counter() - start})
        print(f"{spec.num_trees:>2} tree(s) depth {spec.depth} node {spec.node_width} leaf {spec.leaf_width:>3} "
              f"shared {spec.shared_width:>3} ({spec.active_units / intermediate:.1%}): routed {summary['routed']:.3f} "
              f"oracle paths {summary['oracle_paths']:.3f} static {summary['static']:.3f} top-k {summary['top_k']:.3f}",
              flush=True)
    write_json(OUTPUT, {
        "command": command, "machine": machine(), "dtype": "float32",
        "model": f"SmolLM2-135M-Instruct ({smollm2_gguf()[1]}, de-quantized)",
        "shapes": {"hidden": hidden, "intermediate": intermediate, "layers_measured": layer_ids},
        "calibration": {"source": "../shared/data/wikitext-2/valid.txt", "windows": int(ids.shape[0]),
                        "window": args.window, "tokens_per_layer": args.tokens_per_layer, "held_out": 0.1},
        "mass": "|act(gate x) * up x| * ||down column||, summed over the computed neurons, over its sum over all",
        "rows": rows,
    })
    plot(RESULTS / OUTPUT)


def plot(path: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(8, 4.8))
    labels = []
    for i, row in enumerate(data["rows"]):
        s = row["spec"]
        labels.append(f"{s['num_trees']}x d{s['depth']} n{s['node_width']} leaf {s['leaf_width']} shared "
                      f"{s['shared_width']}\n({row['unit_fraction']:.1%})")
        for offset, key, color in ((-0.3, "static", "C7"), (-0.1, "routed", "C2"), (0.1, "oracle_paths", "C1"),
                                   (0.3, "top_k", "k")):
            ax.bar(i + offset, row[key], width=0.2, color=color, label=key.replace("_", " ") if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("held-out activation mass computed")
    ax.set_title("SmolLM2-135M MLPs: what trees can reach against per-token top-k")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
