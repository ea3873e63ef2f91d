"""End-to-end fine-tuning of a converted checkpoint, distilled from its dense teacher on the HF
Trainer (`accelerate launch -m treeffn_hf.cli.main finetune ...` scales it to several GPUs; on
CPUs, `accelerate launch --multi_gpu --num_processes N` starts N gloo processes, while `--cpu`
starts one, whatever --num_processes says). The main process writes OUT and reports the tokens
seen by all processes.

Loss: --kl-weight x KL(teacher || student) + --lm-weight x next-token cross-entropy. The sparse
layers train by default (--trainable all: everything); --lora-rank adds LoRA on attention via peft
(the sparse layers train as `modules_to_save`), merged into OUT, the adapter kept in OUT/lora_adapter.
Tree routers learn with a straight-through path-probability gradient unless --routing frozen|random;
MGS gates learn through the top-k mask. Data: --data (text/jsonl/parquet or an HF dataset id) and/or
--teacher-samples sequences sampled from the teacher. Rerunning a killed command resumes it from its
last checkpoint; a non-finite loss stops with that checkpoint kept.
"""

from __future__ import annotations

import argparse

NAME = "finetune"
HELP = "fine-tune a converted model end to end against its dense teacher (KL + LM loss)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sparse", metavar="SPARSE_DIR", help="converted (and usually distilled) checkpoint")
    parser.add_argument("out", metavar="OUT", help="output directory")
    parser.add_argument("--dense", required=True, help="the dense teacher (dir or Hub id)")
    parser.add_argument("--gguf-file", default=None, help="DENSE/GGUF_FILE")
    parser.add_argument("--data", default=None, help="text, .jsonl or .parquet file, or an HF dataset id")
    parser.add_argument("--teacher-samples", type=int, default=0, help="sequences sampled from the teacher")
    parser.add_argument("--window", type=int, default=256, help="tokens per training sequence")
    # The defaults are the recipe measured on SmolLM2 (README fine-tuning tables): MGS at 25% and 10%
    # and the 25% tree, 300 steps of 4 x 256 tokens at lr 2e-4, 10 warmup steps, cosine decay.
    parser.add_argument("--max-windows", type=int, default=512, help="sequences taken from --data")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--sparsity-ramp", type=int, default=0, metavar="STEPS",
                        help="MGS: start from every neuron and reach the calibrated selection at this step "
                             "(progressive sparsity; 0: sparse from the start)")
    parser.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine",
                        help="after the warmup: decay to zero by the last step, or hold the learning rate")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--lm-weight", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--teacher-top-k", type=int, default=0, metavar="K",
                        help="run the teacher once per window and keep its top K tokens for later epochs "
                             "(KL over those and one bucket for the rest; 0: full logits every step)")
    parser.add_argument("--teacher-cache", choices=("auto", "hidden", "none"), default="auto",
                        help="hidden: run the teacher's body once per window and keep its last hidden states "
                             "(4 x hidden_size bytes a token, in memory), so later epochs compute the exact KL "
                             "from them with its LM head; none: the whole teacher every step; auto: hidden when "
                             "the run sees a window more than once")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (weights, optimizer and loss stay fp32); default: on where the "
                             "hardware computes bf16 (CUDA, CPUs with AVX-512 BF16 or AMX: 2.14x the fp32 step, "
                             "README throughput table), off where it would be emulated in software (0.50x)")
    parser.add_argument("--trainable", choices=("sparse", "all"), default="sparse")
    parser.add_argument("--routing", choices=("learned", "frozen", "random"), default="learned")
    parser.add_argument("--no-straight-through", action="store_true",
                        help="stop-gradient through routing and the MGS mask (the tree paper's form)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on attention (0 = no LoRA)")
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--stats-every", type=int, default=0, help="record tree dynamics every N steps")
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..workflows import finetune_checkpoint

    gradient = None if args.no_straight_through else "straight_through"
    summary = finetune_checkpoint(
        args.sparse, args.out, dense=args.dense, gguf_file=args.gguf_file, data=args.data,
        teacher_samples=args.teacher_samples, window=args.window, max_windows=args.max_windows, steps=args.steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, sparsity_ramp_steps=args.sparsity_ramp,
        kl_weight=args.kl_weight, lm_weight=args.lm_weight, temperature=args.temperature,
        teacher_top_k=args.teacher_top_k, teacher_cache=args.teacher_cache, bf16=args.bf16, trainable=args.trainable,
        routing=args.routing, routing_gradient=gradient, gate_gradient=gradient, lora_rank=args.lora_rank,
        lora_targets=args.lora_targets, stats_every=args.stats_every, save_steps=args.save_steps, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    if not summary["main_process"]:  # under `accelerate launch`, the main process reports
        return 0
    log = summary["log"]
    if log:
        print(f"loss {log[0]['loss']:.4f} (step {log[0]['step']}) -> {log[-1]['loss']:.4f} (step {log[-1]['step']})")
    print(f"wrote {args.out}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen "
          f"from {summary['data']['source']}, {summary['seconds']:.0f}s"
          + (" (resumed)" if summary["resumed"] else ""))
    return 0
