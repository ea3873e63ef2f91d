"""A study for issue #20: trees whose leaves may share neurons, measured on the whole model.

`tree_layer_fit.py` finds that a tree whose leaves partition the dense neurons fits no better
than static pruning, and that leaves chosen per token cluster (each leaf the top-mass neurons of
the tokens routed to it, so leaves overlap) fit better. No layer of the package has that
structure yet (a TreeSpec's leaves partition the MLP); this script builds it as a plain module to
measure what it would give, before it is built:
- routing: a tree of hyperplanes, each node the perpendicular bisector of a 2-means split of the
  MLP inputs that reach it (`tree_layer_fit.bisect_tokens`);
- leaf l: the `fraction x I` neurons with the highest mean mass on its tokens, gate/up rows copied
  from the dense MLP, down rows refitted by ridge regression (`ridge_down_rows`) on its tokens;
- fitted sequentially (each layer on the inputs the layers before it, already replaced, produce),
  against the dense MLP on those inputs. Calibration only: no gradient step anywhere.
Perplexity on the first `--eval-windows` protocol windows of wiki.test.raw, ratio to dense.

    python benchmarks/overlap_tree_study.py        # about 25 minutes on 2 CPU cores

Writes benchmarks/results/overlap_tree_study_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, machine, write_json  # noqa: E402
from tree_layer_fit import bisect_tokens  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.calibration import read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.compensation import ridge_down_rows  # noqa: E402
from treeffn_hf.conversion.distillation import batched  # noqa: E402
from treeffn_hf.conversion.replay import LayerReplay  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "overlap_tree_study_smollm2.json"


class OverlappingLeavesMLP(nn.Module):
    """A hyperplane tree whose 2^depth leaves each hold their own `width` neurons (copies)."""

    def __init__(self, routers: list[tuple[torch.Tensor, torch.Tensor]], gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.depth = (len(routers) + 1).bit_length() - 1
        self.register_buffer("router_weight", torch.stack([w for w, _ in routers]))
        self.register_buffer("router_bias", torch.stack([b for _, b in routers]))
        self.register_buffer("gate", gate)  # (leaves, width, hidden)
        self.register_buffer("up", up)
        self.register_buffer("down", down)  # (leaves, width, hidden): rows of down_proj^T
        self.act_fn = act_fn

    def leaf_of(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.router_weight.T + self.router_bias
        heap = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.depth):
            heap = 2 * heap + 1 + (scores.gather(1, heap[:, None]).squeeze(1) > 0).long()
        return heap - ((1 << self.depth) - 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        leaf = self.leaf_of(x)
        out = torch.zeros_like(x)
        for index in leaf.unique().tolist():
            rows = (leaf == index).nonzero().squeeze(1)
            z = x[rows]
            out[rows] = (self.act_fn(z @ self.gate[index].T) * (z @ self.up[index].T)) @ self.down[index]
        return out.reshape(hidden_states.shape)


@torch.no_grad()
def fit_overlapping(dense_mlp, x: torch.Tensor, y: torch.Tensor, width: int, depth: int, seed: int):
    gate_w, up_w, down_w = dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight, dense_mlp.down_proj.weight
    routers = bisect_tokens(x, depth, seed)
    module = OverlappingLeavesMLP(routers, torch.empty(0), torch.empty(0), torch.empty(0), dense_mlp.act_fn)
    leaf = module.leaf_of(x)
    hidden = dense_mlp.act_fn(x @ gate_w.T) * (x @ up_w.T)
    mass = hidden.abs() * down_w.norm(dim=0)
    overall = mass.mean(0).topk(width).indices  # a leaf no calibration token reached
    gates, ups, downs = [], [], []
    for index in range(1 << depth):
        mine = leaf == index
        keep = mass[mine].mean(0).topk(width).indices if mine.sum() > width // 4 else overall
        start = down_w[:, keep].T
        fit = ridge_down_rows(hidden[mine][:, keep], y[mine], start) if mine.sum() > width // 4 else None
        gates.append(gate_w[keep])
        ups.append(up_w[keep])
        downs.append(start if fit is None or fit.rows is None else fit.rows)
    return OverlappingLeavesMLP(routers, torch.stack(gates), torch.stack(ups), torch.stack(downs), dense_mlp.act_fn)


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
            y = batched(dense_mlps[index], x)
            setattr(layer, arch.mlp_attr, fit_overlapping(dense_mlps[index], x, y, width, depth, seed=index))
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
        "command": "python benchmarks/overlap_tree_study.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "dtype": "float32", "model": f"SmolLM2-135M-Instruct ({gguf}, de-quantized)",
        "calibration": {"source": "../shared/data/wikitext-2/valid.txt", "windows": int(ids.shape[0]),
                        "window": args.window},
        "evaluation": {"windows": int(eval_ids.shape[0]), "window": 1024}, "dense_perplexity": dense_ppl,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
