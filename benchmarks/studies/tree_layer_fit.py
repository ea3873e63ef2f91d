"""How close a fitted tree layer comes to the dense MLP, against per-token selection and static pruning.

`tree_mass_bound.py` shows that a tree's leaves hold no more activation mass than a fixed set of
neurons. This script asks the question after fitting, which is what the model sees: the fraction
of the dense MLP output's variance that each layer leaves unexplained (FVU, `|y - y_dense|^2 /
|y_dense - mean|^2`) on held-out calibration windows, for
- `top-k oracle`: each token's own top neurons by mass, dense weights (what MGS approaches);
- `static`: the same number of always-on neurons (top calibration mass), dense down_proj, and
  with down_proj refitted by least squares (`static + LS`);
- `overlapping leaves + LS`: the package's tree with selected leaves (`fit_selected_leaves`:
  tokens split by a tree of hyperplanes, recursive 2-means, each leaf the top neurons of its own
  tokens, so leaves may share neurons, down_proj refitted per leaf), no gradient step;
- each tree of `--specs`: its routing fitted (`fit_routing`), then `+ LS` (down_proj refitted in
  closed form, the routing and gate/up fixed), and then `treeffn distill`'s layer distillation
  at each `--budgets` (tokens, steps; `+ LS` after it too).
Distillation and the least-squares refits see only the training windows; the last
`--test-windows` windows are never fitted on.

    python benchmarks/studies/tree_layer_fit.py          # about 45 minutes on 2 CPU cores

Writes benchmarks/results/tree_layer_fit_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, RESULTS, machine, parse_tree_specs, write_json  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.compensation import ridge_down_rows  # noqa: E402
from treeffn_hf.conversion.distillation import batched, distill_layer  # noqa: E402
from treeffn_hf.conversion.leaf_selection import fit_selected_leaves  # noqa: E402
from treeffn_hf.conversion.replay import LayerReplay  # noqa: E402
from treeffn_hf.conversion.routing_fit import fit_routing  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_mlp_state  # noqa: E402
from treeffn_hf.modeling.layer_spec import TreeSpec  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN, tree_hidden  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "tree_layer_fit_smollm2.json"
SPECS = "depth=2,node_width=1;depth=3,node_width=1,leaf_width=164,shared_width=217;depth=3,node_width=1"


def fvu(out: torch.Tensor, target: torch.Tensor) -> float:
    return float((out - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


@torch.no_grad()
def tree_hidden_rows(layer: TreeFFN, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([tree_hidden(layer, rows, *layer.route(rows)) for rows in x.split(2048)])


@torch.no_grad()
def refit_tree_down(layer: TreeFFN, x: torch.Tensor, y: torch.Tensor) -> None:
    fit = ridge_down_rows(tree_hidden_rows(layer, x), y, layer.down_rows)
    if fit.rows is not None:
        layer.down_rows.copy_(fit.rows)


@torch.no_grad()
def selection_rows(dense_mlp, x_fit, y_fit, x_test, y_test, units: int) -> dict:
    """FVU of per-token top-k and of static pruning (dense and refitted down_proj) at `units`."""
    def hidden(z):
        return dense_mlp.act_fn(dense_mlp.gate_proj(z)) * dense_mlp.up_proj(z)

    down = dense_mlp.down_proj.weight  # (hidden, I)
    norms = down.norm(dim=0)
    h_test, h_fit = hidden(x_test), hidden(x_fit)
    top = (h_test.abs() * norms).topk(units, dim=1).indices
    per_token = torch.zeros_like(h_test).scatter_(1, top, 1.0)
    keep = (h_fit.abs() * norms).mean(0).topk(units).indices
    start = down[:, keep].T
    refitted = ridge_down_rows(h_fit[:, keep], y_fit, start).rows
    refitted = start if refitted is None else refitted
    return {"top-k oracle": fvu((h_test * per_token) @ down.T, y_test),
            "static": fvu(h_test[:, keep] @ down[:, keep].T, y_test),
            "static + LS": fvu(h_test[:, keep] @ refitted, y_test)}


@torch.no_grad()
def overlapping_leaves_fvu(dense_mlp, x_fit, x_test, y_test, units: int, depth: int, seed: int) -> float:
    """The package's tree with selected leaves (2^depth leaves of `units` neurons, leaves may share
    neurons, so the MLP's weights are stored up to 2^depth units / I times), fitted on `x_fit`
    by `fit_selected_leaves` and given no gradient step."""
    hidden, intermediate = x_fit.shape[1], dense_mlp.gate_proj.weight.shape[0]
    spec = TreeSpec(depth=depth, node_width=0, routing="hyperplane", leaf_neurons="selected", leaf_width=units,
                    shared_width=0).resolve(hidden, intermediate)
    layer = TreeFFN(hidden, intermediate, spec, dense_mlp.act_fn)
    fit_selected_leaves(layer, dense_mlp, x_fit, seed=seed)
    return fvu(batched(layer, x_test), y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default=SPECS, help="`;`-separated TreeSpec fields")
    parser.add_argument("--layers", nargs="+", type=int, default=[4, 14, 24])
    parser.add_argument("--windows", type=int, default=144, help="valid.txt windows (training + test)")
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--budgets", nargs="+", default=["8192:200", "65536:1000"],
                        help="distillation TOKENS:STEPS (8192:200 is `treeffn distill`'s default)")
    parser.add_argument("--overlap-depths", nargs="+", type=int, default=[2, 4],
                        help="depths of the overlapping-leaves study (2^depth leaves)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(RESULTS / OUTPUT)
        return
    command = "python benchmarks/studies/tree_layer_fit.py " + " ".join(sys.argv[1:])
    torch.manual_seed(0)
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval().requires_grad_(False)
    arch = architecture_for(dense.config)
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window, args.windows)
    test_tokens = args.test_windows * args.window
    replay, inputs = LayerReplay(dense, ids), {}
    while replay.next_layer <= max(args.layers):
        captured = replay.run_layer()[0]
        if replay.next_layer - 1 in args.layers:
            inputs[replay.next_layer - 1] = captured
    specs = [spec.resolve(hidden, intermediate) for spec in parse_tree_specs(args.specs)]
    budgets = [tuple(int(v) for v in budget.split(":")) for budget in args.budgets]
    rows = []
    for index in args.layers:
        dense_mlp = getattr(arch.decoder_layers(dense)[index], arch.mlp_attr)
        x_pool, x_test = inputs[index][:-test_tokens], inputs[index][-test_tokens:]
        y_pool, y_test = batched(dense_mlp, x_pool), batched(dense_mlp, x_test)
        order = torch.randperm(x_pool.shape[0], generator=torch.Generator().manual_seed(index))
        for spec in specs:
            start = time.perf_counter()
            row = {"layer": index, "spec": spec.to_dict(), "unit_fraction": spec.active_units / intermediate}
            largest = max(tokens for tokens, _ in budgets)
            x_fit, y_fit = x_pool[order[:largest]], y_pool[order[:largest]]
            row.update(selection_rows(dense_mlp, x_fit, y_fit, x_test, y_test, spec.active_units))
            row["overlapping leaves + LS"] = {
                str(1 << depth): overlapping_leaves_fvu(dense_mlp, x_fit, x_test, y_test, spec.active_units, depth,
                                                        seed=index)
                for depth in args.overlap_depths
            }
            base = TreeFFN(hidden, intermediate, spec, dense_mlp.act_fn)
            base.load_state_dict(sparse_mlp_state(spec, dense_mlp.gate_proj, dense_mlp.up_proj, dense_mlp.down_proj))
            for tokens, steps in budgets:
                pick = order[:tokens]
                x, y = x_pool[pick], y_pool[pick]
                layer = copy.deepcopy(base)
                fit_routing(layer, x, seed=index, layer_index=index)
                row.setdefault("routed", {})[str(tokens)] = fvu(batched(layer, x_test), y_test)
                routed_ls = copy.deepcopy(layer)
                refit_tree_down(routed_ls, x, y)
                row.setdefault("routed + LS", {})[str(tokens)] = fvu(batched(routed_ls, x_test), y_test)
                layer.requires_grad_(True)
                distill_layer(layer, dense_mlp, x, steps=steps, seed=index, layer_index=index)
                key = f"{tokens}:{steps}"
                row.setdefault("distilled", {})[key] = fvu(batched(layer, x_test), y_test)
                refit_tree_down(layer, x, y)
                row.setdefault("distilled + LS", {})[key] = fvu(batched(layer, x_test), y_test)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(f"layer {index:2d} {spec.num_trees:>2}x d{spec.depth} n{spec.node_width} leaf {spec.leaf_width:>3} "
                  f"shared {spec.shared_width:>3} ({row['unit_fraction']:.1%}): top-k {row['top-k oracle']:.3f} "
                  f"static+LS {row['static + LS']:.3f} routed+LS {row['routed + LS']} distilled {row['distilled']} "
                  f"+LS {row['distilled + LS']} overlapping {row['overlapping leaves + LS']} ({row['seconds']:.0f} s)", flush=True)
    summary = []
    for spec in specs:
        mine = [r for r in rows if r["spec"] == spec.to_dict()]
        entry = {"spec": spec.to_dict(), "unit_fraction": mine[0]["unit_fraction"]}
        for key in ("top-k oracle", "static", "static + LS"):
            entry[key] = statistics.fmean(r[key] for r in mine)
        for key in ("routed", "routed + LS", "distilled", "distilled + LS", "overlapping leaves + LS"):
            entry[key] = {budget: statistics.fmean(r[key][budget] for r in mine) for budget in mine[0][key]}
        summary.append(entry)
    write_json(OUTPUT, {
        "command": command, "machine": machine(), "dtype": "float32",
        "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)",
        "data": {"source": "../shared/data/wikitext-2/valid.txt", "windows": int(ids.shape[0]), "window": args.window,
                 "test_windows": args.test_windows, "test_tokens": test_tokens},
        "metric": "held-out FVU of the MLP output: |y - y_dense|^2 / |y_dense - mean(y_dense)|^2",
        "budgets": args.budgets, "rows": rows, "summary": summary,
    })
    plot(RESULTS / OUTPUT)


def plot(path: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    largest = data["budgets"][-1]
    tokens = largest.split(":")[0]
    bars = [("top-k oracle", None, "k"), ("static + LS", None, "C7"), ("routed + LS", tokens, "C0"),
            (f"distilled {data['budgets'][0]}", ("distilled", data["budgets"][0]), "C1"),
            (f"distilled {largest} + LS", ("distilled + LS", largest), "C2")]
    leaves = list(data["summary"][0]["overlapping leaves + LS"])[-1]
    bars.append((f"overlapping leaves ({leaves}) + LS", ("overlapping leaves + LS", leaves), "C3"))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = []
    width = 0.8 / len(bars)
    for i, row in enumerate(data["summary"]):
        s = row["spec"]
        labels.append(f"{s['num_trees']}x d{s['depth']} n{s['node_width']} leaf {s['leaf_width']} shared "
                      f"{s['shared_width']}\n({row['unit_fraction']:.1%})")
        for j, (label, key, color) in enumerate(bars):
            if key is None:
                value = row[label]
            elif isinstance(key, tuple):
                value = row[key[0]][key[1]]
            else:
                value = row[label][key]
            ax.bar(i - 0.4 + (j + 0.5) * width, value, width=width, color=color, label=label if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("held-out FVU of the MLP output (lower is better)")
    ax.set_title(f"SmolLM2-135M layers {sorted({r['layer'] for r in data['rows']})}: fitted trees against selection")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
