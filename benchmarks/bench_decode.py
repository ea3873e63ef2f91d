"""End-to-end greedy decode: the sparse models against the dense models a user would run instead,
side by side in one process, each with its perplexity ratio and the MLP weight bytes it reads.

The headline baseline is dense bf16 (`model.to(torch.bfloat16)`, what a Hugging Face user runs on a
CPU that computes bf16). Beside it: dense with weight-only int8 / int4 MLPs (PyTorch's own CPU
kernels, and torchao's where it is installed), dense float32 (beside, never alone), the default MGS
recipe as a user gets it (`treeffn convert --method mgs` + `treeffn distill`, saved, reloaded with
`trust_remote_code` in bf16, its MLPs on the C kernel; beside it the same in float32), the same
checkpoint with every neuron selected (what its number format alone buys: the recipe over it is
sparsity's own gain), with `--levers` the recipe with its down_proj in bf16 (what int8 rows buy), a freshly
converted tree (untrained: its speed is what it will be after training, its text is not; or a
trained one with `--tree-checkpoint DIR`), and
llama.cpp on the same GGUF (a separate process, after the others; optional).

Every model decodes the same prompt greedily with its KV cache, the models taking turns step by
step (the order flips every step), so a slow spell of this shared machine hits all of them
alike. A round is one prefill and `--new-tokens` steps per model; tokens/s are medians over the
rounds and each speed-up is the median of the per-round ratios. The MLP share of dense bf16
decode time is measured in the same run (the dense bf16 model with its MLPs replaced by a no-op):
`1 / (1 - share)` is the Amdahl ceiling of any MLP speed-up.

    python benchmarks/bench_decode.py                   # real SmolLM2-135M (GGUF) on CPU, 2 threads
    python benchmarks/bench_decode.py --quality-windows 40
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, machine, write_json  # noqa: E402
from dense_baselines import (  # noqa: E402
    INT4_G32_ASYM,
    INT4_G64_ASYM,
    INT8_ROW,
    mlp_bytes,
    torchao_mlps,
    weight_only_mlps,
)

import treeffn_hf  # noqa: E402
from treeffn_hf import MGSSpec, TreeSpec  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402
from treeffn_hf.workflows import convert_checkpoint, distill_checkpoint  # noqa: E402

HEADLINE = "dense bf16"
WITHOUT_MLP = "dense bf16 without MLPs"
QUALITY_TOLERANCE = 1.01  # "equal quality": a perplexity ratio at most this
RECIPE = "mgs default recipe (bf16 load: C kernel)"
EVERY_NEURON = "mgs format, every neuron (bf16 load: C kernel)"


class NoMLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def default_mgs_checkpoint(directory: str, gguf_file: str, work: Path, spec: MGSSpec = MGSSpec()) -> Path:
    """The default MGS recipe as the CLI makes it: `treeffn convert --method mgs`, then `treeffn
    distill` on valid.txt, both with their defaults (or convert with `spec`). Kept in `work`, by
    spec, for the next run."""
    suffix = "" if spec == MGSSpec() else "-" + "-".join(f"{k}={v}" for k, v in spec.to_dict().items()
                                                        if getattr(MGSSpec(), k, v) != v)
    distilled = work / f"mgs-distilled{suffix}"
    if not (distilled / "config.json").is_file():
        converted = work / f"mgs-converted{suffix}"
        convert_checkpoint(directory, converted, spec, gguf_file=gguf_file, overwrite=True, progress=False)
        distill_checkpoint(converted, distilled, dense=directory, gguf_file=gguf_file,
                           calibration=DATA / "wikitext-2" / "valid.txt", overwrite=True, progress=False)
    return distilled


def everything_selected(model: nn.Module) -> nn.Module:
    """`model` with every MGS layer's threshold below any score: the same format and kernel,
    every neuron computed."""
    for _, mlp in model.sparse_mlps():
        mlp.gate_threshold.fill_(-1.0)
    return model


def load_models(args: argparse.Namespace, directory: str, gguf_file: str, work: Path, skipped: dict) -> dict:
    """name -> (model, what it is, the MLP weight bytes a decode step reads as a fraction of the
    bf16 MLP's; None for sparse models, which report their own). Every dense variant is built
    from the same float32 weights; a variant that cannot be built goes into `skipped` with why."""
    dense, _ = treeffn_hf.load_dense(directory, gguf_file=gguf_file)
    dense = dense.eval()
    bf16 = copy.deepcopy(dense).to(torch.bfloat16).eval()
    hidden, intermediate = dense.config.hidden_size, dense.config.intermediate_size
    share = lambda grid: mlp_bytes(hidden, intermediate, grid) / mlp_bytes(hidden, intermediate, None)  # noqa: E731
    models = {"dense fp32": (dense, "the GGUF's weights dequantized to float32", 2.0),
              HEADLINE: (bf16, "model.to(torch.bfloat16)", 1.0)}
    for grid, op in ((INT8_ROW, "torch._weight_int8pack_mm"), (INT4_G32_ASYM, "torch._weight_int4pack_mm_for_cpu"),
                     (INT4_G64_ASYM, "torch._weight_int4pack_mm_for_cpu")):
        models[f"dense bf16, MLP {grid.name} (torch op)"] = (weight_only_mlps(dense, grid), op, share(grid))
    for grid in (INT8_ROW, INT4_G32_ASYM):
        name = f"dense bf16, MLP {grid.name} (torchao)"
        try:
            models[name] = (torchao_mlps(dense, grid), "torchao quantize_, as TorchAoConfig", share(grid))
        except Exception as error:  # noqa: BLE001 - the reason is the finding
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"{name} skipped: {skipped[name]}")
    checkpoint = default_mgs_checkpoint(directory, gguf_file, work)

    def reloaded(dtype: torch.dtype, path: Path = checkpoint) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()

    models[RECIPE] = (reloaded(torch.bfloat16), "treeffn convert + distill, dtype=bfloat16", None)
    models[EVERY_NEURON] = (everything_selected(reloaded(torch.bfloat16)), "the same, thresholds below every score",
                            None)
    models["mgs default recipe, fp32 load (C kernel)"] = (reloaded(torch.float32), "the same, dtype=float32", None)
    if args.levers:  # what int8 down rows bought: the same recipe with down_proj in bf16, streamed whole
        bf16_down = default_mgs_checkpoint(directory, gguf_file, work, MGSSpec(down_format="bf16"))
        models["mgs recipe, bf16 down_proj (bf16 load: C kernel)"] = (reloaded(torch.bfloat16, bf16_down),
                                                                     "treeffn convert --down-format bf16 + distill",
                                                                     None)
    if args.tree_checkpoint:  # the best tree there is: a distilled or fine-tuned one
        tree = AutoModelForCausalLM.from_pretrained(args.tree_checkpoint, trust_remote_code=True,
                                                    dtype=torch.bfloat16).eval()
        models[f"tree {Path(args.tree_checkpoint).name} (bf16)"] = (tree, str(args.tree_checkpoint), None)
    elif args.tree:
        tree = treeffn_hf.convert(dense, TreeSpec(depth=6, node_width=2), progress=False).to(torch.bfloat16).eval()
        models["tree depth 6 (fresh, untrained, bf16)"] = (tree, "treeffn convert --method tree", None)
    no_mlp = copy.deepcopy(bf16)
    for layer in no_mlp.model.layers:
        layer.mlp = NoMLP()
    models[WITHOUT_MLP] = (no_mlp, "for the MLP share of dense bf16 decode", 0.0)
    return models


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


def check_loop_and_paths(models: dict, ids: torch.Tensor, new_tokens: int, first: dict) -> dict:
    """The timed loop decodes what generate() decodes; returns each sparse model's decode paths."""
    paths = {}
    for name, model in models.items():
        if name == WITHOUT_MLP:
            continue
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:]
        if not torch.equal(first[name]["tokens"], expected):
            raise RuntimeError(f"{name}: the timed loop decodes other tokens than generate()")
        if hasattr(model, "sparse_mlps"):
            paths[name] = sorted({mlp.last_path for _, mlp in model.sparse_mlps()})  # the last decode step's
            if "C kernel" in name and paths[name] != ["cpu"]:
                raise RuntimeError(f"{name} decoded on {paths[name]}, not the C kernel it is named for")
    return paths


LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(model_path=spec["gguf"], n_ctx=len(spec["ids"]) + spec["new"] + 8, n_threads=spec["threads"],
            n_threads_batch=spec["threads"], verbose=False)
rates = []
for _ in range(spec["rounds"] + 1):  # the first is a warm-up
    llm.reset()
    start, count = time.perf_counter(), 0
    for _token in llm.generate(spec["ids"], temp=0.0, top_k=1, reset=True):
        count += 1
        if count == spec["new"]:
            break
    rates.append(spec["new"] / (time.perf_counter() - start))
print(json.dumps(rates[1:]))
"""


def llama_cpp_rates(gguf_path: str, ids: torch.Tensor, args: argparse.Namespace) -> tuple[list | None, str | None]:
    """llama.cpp's greedy tokens/s on the same GGUF and prompt, per round, in a process of its own,
    or (None, why not)."""
    spec = {"gguf": gguf_path, "ids": ids[0].tolist(), "new": args.new_tokens, "threads": args.threads,
            "rounds": args.rounds}
    result = subprocess.run([sys.executable, "-c", LLAMA_CPP, json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        return None, (result.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(result.stdout.strip().splitlines()[-1]), None


def quality_ratios(models: dict, windows: torch.Tensor) -> dict:
    """Each model's perplexity on the protocol windows, over dense fp32's."""
    ppl = {name: perplexity(model, windows, progress=False).perplexity
           for name, model in models.items() if name != WITHOUT_MLP}
    return {name: value / ppl["dense fp32"] for name, value in ppl.items()} | {"dense fp32 perplexity": ppl["dense fp32"]}


def summarize(models: dict, samples: dict, parts: dict, ratios: dict, paths: dict, fractions: dict) -> list:
    """One row per model: tokens/s, the paired speed-up over dense bf16, quality ratio and bytes."""
    rows = []
    for name, (_, what, _) in models.items():
        if name == WITHOUT_MLP:
            continue
        rows.append({
            "model": name, "what": what, "tok_s": statistics.median(samples[name]),
            "speedup_vs_bf16": statistics.median(s / d for s, d in zip(samples[name], samples[HEADLINE])),
            "speedup_per_round": [s / d for s, d in zip(samples[name], samples[HEADLINE])],
            "prefill_speedup_vs_bf16": statistics.median(
                d / s for s, d in zip(parts[name]["prefill_s"], parts[HEADLINE]["prefill_s"])),
            "perplexity_ratio": ratios.get(name),
            "mlp_weight_fraction_of_bf16": fractions[name][0], "active_unit_fraction": fractions[name][1],
            "decode_path": paths.get(name),
        })
    return rows


def measured_fractions(models: dict) -> dict:
    """name -> (MLP weight bytes read per token over the bf16 MLP's, active unit fraction): the
    sparse models' own reports over the tokens they last ran (the timed rounds)."""
    out = {}
    for name, (model, _, fraction) in models.items():
        if fraction is None:
            cost = model.sparse_cost()
            out[name] = (cost.weight_fraction, cost.unit_fraction)
        else:
            out[name] = (fraction, 1.0 if fraction else 0.0)
    return out


def print_table(rows: list, fastest_equal: str | None, share: float) -> None:
    print(f"\n{'model':48s} {'tok/s':>7s} {'vs bf16':>8s} {'ppl ratio':>9s} {'MLP bytes':>9s}  path")
    for row in rows:
        ratio = "n/a" if row["perplexity_ratio"] is None else f"{row['perplexity_ratio']:.4f}"
        fraction = row["mlp_weight_fraction_of_bf16"]
        print(f"{row['model']:48s} {row['tok_s']:7.1f} {row['speedup_vs_bf16']:7.2f}x {ratio:>9s} "
              f"{'n/a' if fraction is None else f'{fraction:.3f}':>9s}  {row['decode_path'] or ''}")
    print(f"fastest dense variant at ratio <= {QUALITY_TOLERANCE}: {fastest_equal}")
    print(f"MLP share of dense bf16 decode time: {share:.1%} -> Amdahl ceiling {1 / (1 - share):.2f}x")


def timed_rounds(models: dict, ids: torch.Tensor, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(tokens/s per round, prefill and decode seconds per round, decode paths) of every model."""
    plain = {name: model for name, (model, _, _) in models.items()}
    first = greedy_interleaved(plain, ids, args.new_tokens)  # warm-up, and the checks
    paths = check_loop_and_paths(plain, ids, args.new_tokens, first)
    for model in plain.values():  # the byte reports count the timed rounds' tokens
        for _, mlp in getattr(model, "sparse_mlps", list)():
            getattr(mlp, "reset_density", lambda: None)()  # MGS layers measure their density
    samples = {name: [] for name in plain}
    parts = {name: {"prefill_s": [], "decode_s": []} for name in plain}
    for round_index in range(args.rounds):
        for name, timing in greedy_interleaved(plain, ids, args.new_tokens).items():
            parts[name]["prefill_s"].append(timing["prefill_s"])
            parts[name]["decode_s"].append(sum(timing["step_s"]))
            samples[name].append(args.new_tokens / (timing["prefill_s"] + sum(timing["step_s"])))
        print(f"round {round_index + 1}: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in samples.items()), flush=True)
    return samples, parts, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-windows", type=int, default=10, help="protocol windows for each row's ratio")
    parser.add_argument("--no-tree", dest="tree", action="store_false")
    parser.add_argument("--tree-checkpoint", help="a saved tree of this model (treeffn distill / finetune output) to "
                        "time instead of a freshly converted, untrained one")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    parser.add_argument("--levers", action="store_true",
                        help="also time the recipe with a bf16 down_proj (a second conversion and distillation)")
    parser.add_argument("--work", default=None, help="where the MGS checkpoint is kept (default: a temporary folder)")
    parser.add_argument("--output", default="bench_decode_smollm2-135m.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory, gguf_file = smollm2_gguf()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        skipped: dict[str, str] = {}
        models = load_models(args, directory, gguf_file, work, skipped)
        tokenizer = treeffn_hf.load_dense(directory, gguf_file=gguf_file)[1]
        text = (DATA / "wikitext-2" / "valid.txt").read_text()[:20000]
        ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
        samples, parts, paths = timed_rounds(models, ids, args)
        fractions = measured_fractions(models)
        windows = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw",
                                   max_windows=args.quality_windows)
        ratios = quality_ratios({name: model for name, (model, _, _) in models.items()}, windows)
    config = models[HEADLINE][0].config
    rows = summarize(models, samples, parts, ratios, paths, fractions)
    anchor, why_not = llama_cpp_rates(str(Path(directory) / gguf_file), ids, args) if args.llama_cpp else (None, "off")
    if anchor:
        rows.append({"model": "llama.cpp (llama-cpp-python, same GGUF, own process, not interleaved)",
                     "what": "Q4_1 weights as stored", "tok_s": statistics.median(anchor), "tok_s_per_round": anchor,
                     "speedup_vs_bf16": statistics.median(anchor) / statistics.median(samples[HEADLINE]),
                     "perplexity_ratio": None, "mlp_weight_fraction_of_bf16": None, "active_unit_fraction": 1.0,
                     "decode_path": None})
    else:
        print(f"llama.cpp skipped: {why_not}")
    share = 1.0 - statistics.median(samples[HEADLINE]) / statistics.median(samples[WITHOUT_MLP])
    equal = [r for r in rows if r["model"].startswith("dense") and r["perplexity_ratio"] is not None
             and r["perplexity_ratio"] <= QUALITY_TOLERANCE]
    fastest = max(equal, key=lambda r: r["tok_s"])["model"] if equal else None
    print_table(rows, fastest, share)
    own_gain = {"speedup": statistics.median(r / e for r, e in zip(samples[RECIPE], samples[EVERY_NEURON])),
                "byte_ratio": fractions[RECIPE][0] / fractions[EVERY_NEURON][0]}
    print(f"sparsity's own gain end to end (the recipe over its format with every neuron): {own_gain['speedup']:.2f}x "
          f"for {own_gain['byte_ratio']:.2f}x the MLP bytes")
    payload = {
        "benchmark": "bench_decode", "device": "cpu", "model": "smollm2-135m",
        "weights": "pretrained (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32)",
        "shape": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                  "layers": config.num_hidden_layers, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens},
        "rounds": args.rounds, "machine": machine(), "headline_baseline": HEADLINE,
        "quality": {"windows": int(windows.shape[0]), "text": "wikitext-2-raw/wiki.test.raw (protocol)",
                    "dense_fp32_perplexity": ratios["dense fp32 perplexity"], "ratio_to": "dense fp32"},
        "fastest_dense_at_equal_quality": fastest, "quality_tolerance": QUALITY_TOLERANCE,
        "mlp_share_of_dense_bf16_decode": share, "amdahl_ceiling": 1 / (1 - share),
        "sparsity_own_gain": {"recipe": RECIPE, "every_neuron": EVERY_NEURON, **own_gain},
        "skipped": {**skipped, **({"llama.cpp": why_not} if why_not else {})}, "results": rows, "seconds": parts,
        "command": " ".join(["python", "benchmarks/bench_decode.py", *sys.argv[1:]]),
    }
    print(f"wrote {write_json(args.output, payload)}")


if __name__ == "__main__":
    main()
