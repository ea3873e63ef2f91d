"""End-to-end greedy decode speed: dense vs converted models, side by side in one process.

Every model decodes the same prompt greedily with its KV cache, and the models take turns step by
step (the order flips every step), so a slow spell of this shared machine hits all of them
alike; at whole-`generate()` granularity the machine's drift moved single rounds by up to 1.5x.
A round is one prefill and `--new-tokens` steps per model; its time is the end-to-end time,
prefill included. Tokens/s are medians over the rounds, the speed-up is the median of the
per-round ratios (all recorded, with the prefill and the decode steps also apart). The loop is
`generate()`'s greedy loop (warm-up checks that it yields `generate()`'s tokens). The MLP share
of dense decode time is measured in the same run, by timing the dense model with its MLPs
replaced by a no-op: `1 / (1 - share)` is the Amdahl ceiling of any MLP speed-up.

    python benchmarks/bench_decode.py                   # real SmolLM2-135M (pretrained, GGUF) on CPU
    python benchmarks/bench_decode.py --model llama-1b  # ~1B random-weight Llama: speed needs no training

The tree is freshly converted (not distilled): its speed is what it will be after training, its
text is not. The MGS model is the default recipe (the nested 4-bit predictor, thresholds
calibrated on valid.txt, or on random tokens for the random-weight model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, machine, write_json  # noqa: E402

import treeffn_hf  # noqa: E402
from treeffn_hf import MGSSpec, TreeSpec  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402


class NoMLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def calibration_windows(args: argparse.Namespace, tokenizer) -> torch.Tensor:
    """valid.txt for the real model; random tokens for random weights (no text means anything to them)."""
    if tokenizer is None:
        return torch.randint(3, 32000, (4, 256), generator=torch.Generator().manual_seed(1))
    return token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512, 8)


def load_models(args: argparse.Namespace):
    if args.model == "smollm2-135m":
        directory, gguf_file = smollm2_gguf()
        dense, tokenizer = treeffn_hf.load_dense(directory, gguf_file=gguf_file)
        text = (DATA / "wikitext-2" / "valid.txt").read_text()[:20000]
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
        weights = "pretrained (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                             tie_word_embeddings=True)
        torch.manual_seed(0)
        dense = LlamaForCausalLM(config)
        ids = torch.randint(3, 32000, (1, args.prompt_tokens))
        weights = "random (speed does not depend on trained weights)"
        tokenizer = None
    dense = dense.eval()
    models = {"dense": dense}
    for name, spec in (("tree", TreeSpec(depth=args.tree_depth, node_width=args.tree_node_width)),
                       ("mgs", MGSSpec() if args.mgs_density is None else MGSSpec(density=args.mgs_density))):
        if name in args.methods:
            models[name] = treeffn_hf.convert(dense, spec, progress=False).eval()
    if "mgs" in args.methods:  # the default recipe: per-layer thresholds calibrated on text
        calibration = calibration_windows(args, tokenizer if args.model == "smollm2-135m" else None)
        captured = capture_mlp_inputs(dense, calibration, tokens_per_layer=4096, progress=False)
        calibrate_mgs(models["mgs"], captured.inputs, allocation="uniform", progress=False)
    no_mlp = treeffn_hf.convert(dense, MGSSpec(density=1.0, predictor="linear", rank=1), progress=False).eval()
    for layer in no_mlp.model.layers:
        layer.mlp = NoMLP()
    models["dense_without_mlp"] = no_mlp
    return models, ids, weights


@torch.no_grad()
def greedy_interleaved(models: dict, ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decode of `ids` by every model, taking turns step by step: per model, the prefill
    time, each step's time and the tokens."""
    state, result = {}, {}
    for name, model in models.items():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        result[name] = {"prefill_s": time.perf_counter() - start, "step_s": [], "tokens": [token],
                        "prefill_paths": sorted({mlp.last_path for _, mlp in getattr(model, "sparse_mlps", list)()})}
        state[name] = cache
    names = list(models)
    for step in range(new_tokens - 1):
        for name in names if step % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            logits = models[name](result[name]["tokens"][-1], past_key_values=state[name], use_cache=True).logits[:, -1]
            result[name]["tokens"].append(logits.argmax(-1, keepdim=True))
            result[name]["step_s"].append(time.perf_counter() - start)
    for timing in result.values():
        timing["tokens"] = torch.cat(timing["tokens"], dim=1)[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2-135m", "llama-1b"), default="smollm2-135m")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["tree", "mgs"], choices=("tree", "mgs"))
    parser.add_argument("--tree-depth", type=int, default=6)
    parser.add_argument("--tree-node-width", type=int, default=2)
    parser.add_argument("--mgs-density", type=float, default=None,
                        help="mean density of the MGS recipe (default: MGSSpec's, 59%% of the MLP weight bytes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models, ids, weights = load_models(args)
    mask = torch.ones_like(ids)

    samples = {name: [] for name in models}
    parts = {name: {"prefill_s": [], "decode_s": []} for name in models}
    decode_paths, prefill_paths = {}, {}
    first = greedy_interleaved(models, ids, args.new_tokens)  # warm-up, and two checks:
    for name, model in models.items():
        if name == "dense_without_mlp":
            continue
        with torch.no_grad():  # the loop decodes what generate() decodes
            expected = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
        if not torch.equal(first[name]["tokens"], expected):
            raise RuntimeError(f"{name}: the timed loop decodes other tokens than generate()")
        if name in args.methods:  # a fast path is the one timed
            paths = {mlp.last_path for _, mlp in model.sparse_mlps()}  # those of the last decode step
            if not paths <= {"torch", "cpu"}:
                raise RuntimeError(f"{name} decoded on the {paths} path(s), not only fast ones")
            decode_paths[name] = sorted(paths)
            prefill_paths[name] = first[name]["prefill_paths"]
    for round_index in range(args.rounds):
        timings = greedy_interleaved(models, ids, args.new_tokens)
        for name, timing in timings.items():
            parts[name]["prefill_s"].append(timing["prefill_s"])
            parts[name]["decode_s"].append(sum(timing["step_s"]))
            samples[name].append(args.new_tokens / (timing["prefill_s"] + sum(timing["step_s"])))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {s[-1]:.2f} tok/s" for n, s in samples.items()), flush=True)

    tok_s = {name: statistics.median(values) for name, values in samples.items()}
    mlp_share = 1.0 - tok_s["dense"] / tok_s["dense_without_mlp"]
    rows = []
    for name in args.methods:
        cost = models[name].sparse_cost()
        rows.append({
            "method": name, "spec": dict(models[name].config.sparse_mlp),
            "active_unit_fraction": cost.unit_fraction, "active_weight_fraction": cost.weight_fraction,
            "dense_tok_s": tok_s["dense"], "sparse_tok_s": tok_s[name],
            # paired: within a round the models take turns step by step, so a slow spell hits both
            "speedup": statistics.median(s / d for s, d in zip(samples[name], samples["dense"])),
            "speedup_per_round": [s / d for s, d in zip(samples[name], samples["dense"])],
            "prefill_speedup": statistics.median(
                d / s for s, d in zip(parts[name]["prefill_s"], parts["dense"]["prefill_s"])),
            "decode_steps_speedup": statistics.median(
                d / s for s, d in zip(parts[name]["decode_s"], parts["dense"]["decode_s"])),
            "decode_path": decode_paths[name],
            "prefill_path": prefill_paths[name],
        })
        print(f"{name}: {tok_s[name]:.2f} tok/s vs dense {tok_s['dense']:.2f} tok/s -> {rows[-1]['speedup']:.2f}x "
              f"(active units {cost.unit_fraction:.2%})")
    ceiling = 1.0 / (1.0 - mlp_share)
    print(f"MLP share of dense decode time: {mlp_share:.1%} -> Amdahl ceiling {ceiling:.2f}x")
    config = models["dense"].config
    payload = {
        "benchmark": "bench_decode", "device": "cpu", "dtype": "float32", "model": args.model, "weights": weights,
        "shape": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                  "layers": config.num_hidden_layers, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens},
        "rounds": args.rounds, "machine": machine(), "tokens_per_second": tok_s, "samples": samples,
        "seconds": parts, "mlp_share_of_dense_decode": mlp_share, "amdahl_ceiling": ceiling, "results": rows,
        "command": " ".join(["python", "benchmarks/bench_decode.py", *sys.argv[1:]]),
    }
    print(f"wrote {write_json(f'bench_decode_{args.model}.json', payload)}")


if __name__ == "__main__":
    main()
