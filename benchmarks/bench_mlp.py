"""MLP block time: sparse layer vs the dense Hugging Face `LlamaMLP`, side by side in one process.

For each shape, batch (1, 4, 16 tokens, and a prefill) and target density (50/25/10/5/3%), the
tree FFN and the micro-gated MLP (gate cost included) are timed against the dense block,
interleaved, median of several rounds, and the ratio dense/sparse is printed. The sparse layers
run their fast PyTorch path; the script checks `last_path` so the reference path can never be
reported as the fast one, and checks the fast output against the reference once per case.

Weights are random: speed does not depend on training, but the tree's leaf balance does, which
matters for batched (grouped-by-leaf) cases; the recorded leaf-usage entropy shows it.

    python benchmarks/bench_mlp.py                     # CPU, fp32, 2 threads (as in the README)
    python benchmarks/bench_mlp.py --quick             # a smaller run
    python benchmarks/bench_mlp.py --device cuda       # GPU: Triton kernels vs cuBLAS, bf16, Llama shapes

On a GPU the sparse layers run their Triton kernels (the row records which: `path`), batch-1
rows report the achieved weight-read bandwidth as a fraction of the device-to-device copy
bandwidth measured in the same process (the practical peak), and every tree / MGS case is also
timed on the other kernel variant (per-token gather vs grouped GEMM / union GEMM), which is how
the dispatch's switch points (`GROUPED_MIN_TOKENS`, `GATHER_MAX_TOKENS`) are to be set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf import MGSSpec, MicroGatedMLP, TreeFFN  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_mlp_state  # noqa: E402
from treeffn_hf.modeling.layer_spec import tree_spec_for_fraction  # noqa: E402
from treeffn_hf.modeling.tree_ffn import TreeUsage  # noqa: E402

SHAPES = {"smollm2-135m": (576, 1536), "llama-1b": (2048, 8192), "llama-8b": (4096, 14336), "tiny": (64, 256)}
DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.03)
DEVICE_DEFAULTS = {  # what each device's published run uses
    "cpu": {"shapes": ["smollm2-135m", "llama-1b"], "tokens": [1, 4, 16, 512], "dtype": "float32"},
    "cuda": {"shapes": ["llama-1b", "llama-8b"], "tokens": [1, 4, 16, 64, 2048], "dtype": "bfloat16"},
}


def copy_bandwidth(device: str, dtype: torch.dtype, sync) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical bandwidth peak."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = interleaved_median({"copy": partial(dst.copy_, src)}, rounds=5, calls=10, sync=sync)
    return 2 * src.numel() / times["copy"]


def variant_switch(kind: str, tokens: int):
    """(module, attribute, value) that makes the kernels take the other variant at this batch."""
    if kind == "tree":
        from treeffn_hf.modeling import kernels_tree

        grouped_now = tokens > kernels_tree.GROUPED_MIN_TOKENS
        return kernels_tree, "GROUPED_MIN_TOKENS", (1 << 30) if grouped_now else 0
    from treeffn_hf.modeling import kernels_mgs

    gather_now = tokens <= kernels_mgs.GATHER_MAX_TOKENS
    return kernels_mgs, "GATHER_MAX_TOKENS", 0 if gather_now else (1 << 30)


def build_layers(dense: LlamaMLP, kind: str, density: float, dtype: torch.dtype) -> torch.nn.Module:
    hidden, width = dense.gate_proj.in_features, dense.gate_proj.out_features
    if kind == "tree":
        spec = tree_spec_for_fraction(hidden, width, density)
        layer = TreeFFN(hidden, width, spec, torch.nn.SiLU())
    else:
        spec = MGSSpec(density=density, rank=64)
        layer = MicroGatedMLP(hidden, width, spec, torch.nn.SiLU())
    state = sparse_mlp_state(layer.spec, dense.gate_proj, dense.up_proj, dense.down_proj)
    layer.load_state_dict(state, strict=kind == "tree")
    if kind == "mgs":  # a random gate: speed does not depend on what it selects
        torch.nn.init.normal_(layer.micro_gate.scorer.weight, std=0.05)
        torch.nn.init.normal_(layer.micro_gate.encoder.weight, std=0.05)
    return layer.to(dtype).eval()


def leaf_entropy(layer: TreeFFN, x: torch.Tensor) -> float:
    layer.usage = TreeUsage(layer.spec)
    with torch.no_grad():
        layer(x)
    counts = layer.usage.leaf_counts.double().flatten()
    layer.usage = None
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(counts.numel()))


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = copy_bandwidth(device, dtype, sync) if device == "cuda" else None
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for shape_name in args.shapes:
        hidden, width = SHAPES[shape_name]
        dense = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=8))
        torch.nn.init.normal_(dense.gate_proj.weight, std=hidden**-0.5)
        torch.nn.init.normal_(dense.up_proj.weight, std=hidden**-0.5)
        torch.nn.init.normal_(dense.down_proj.weight, std=width**-0.5)
        dense = dense.to(device, dtype).eval()
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            for kind in ("tree", "mgs"):
                for density in args.densities:
                    layer = build_layers(dense, kind, density, dtype).to(device)
                    with torch.no_grad():
                        layer.force_path = "reference"
                        reference = layer(x)
                        layer.force_path = None
                        fast = layer(x)
                    path = layer.last_path
                    expected = ("triton:", "torch") if device == "cuda" else ("torch",)
                    if not path.startswith(expected):
                        raise RuntimeError(f"{kind} ran the {path} path, not a fast one")
                    error = float((fast.float() - reference.float()).abs().max() / reference.float().abs().max())
                    calls = max(1, int(args.budget / max(tokens, 1)))
                    fns = {"dense": partial(dense, x), "sparse": partial(layer, x)}
                    with torch.no_grad():
                        times = interleaved_median(fns, rounds=args.rounds, calls=calls, sync=sync)
                        other = None
                        if device == "cuda":  # the other kernel variant, for the dispatch's switch point
                            module, name, value = variant_switch(kind, tokens)
                            saved = getattr(module, name)
                            setattr(module, name, value)
                            try:
                                layer(x)
                                other = {"path": layer.last_path, "ms": 1e3 * interleaved_median(
                                    {"other": partial(layer, x)}, rounds=args.rounds, calls=calls, sync=sync)["other"]}
                            finally:
                                setattr(module, name, saved)
                    cost = layer.cost()
                    row = {
                        "shape": shape_name, "hidden": hidden, "intermediate": width, "tokens": tokens,
                        "method": kind, "target_density": density, "spec": layer.spec.to_dict(),
                        "active_unit_fraction": cost.unit_fraction, "active_weight_fraction": cost.weight_fraction,
                        "dense_ms": times["dense"] * 1e3, "sparse_ms": times["sparse"] * 1e3,
                        "speedup": times["dense"] / times["sparse"], "max_rel_error_vs_reference": error,
                        "leaf_entropy": leaf_entropy(layer, x) if kind == "tree" and tokens > 1 else None,
                        "path": path, "other_variant": other,
                    }
                    if peak is not None and tokens == 1:
                        read = cost.active_weight_elems * element
                        row["bandwidth_fraction_of_copy_peak"] = read / times["sparse"] / peak
                        row["dense_bandwidth_fraction_of_copy_peak"] = (
                            cost.dense_weight_elems * element / times["dense"] / peak)
                    rows.append(row)
                    print(f"{shape_name:13s} N={tokens:<4d} {kind:4s} target {density:5.0%} "
                          f"active {cost.unit_fraction:6.2%} (weights {cost.weight_fraction:6.2%})  "
                          f"dense {row['dense_ms']:8.3f} ms  sparse {row['sparse_ms']:8.3f} ms  "
                          f"speed-up {row['speedup']:6.2f}x", flush=True)
    return {"benchmark": "bench_mlp", "device": device, "dtype": args.dtype, "machine": machine(),
            "copy_bandwidth_gb_s": peak / 1e9 if peak else None,
            "command": " ".join(["python", "benchmarks/bench_mlp.py", *sys.argv[1:]]), "results": rows}


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in payload["results"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for (method, tokens), marker in zip(
            sorted({(r["method"], r["tokens"]) for r in payload["results"] if r["shape"] == shape}),
            "osd^v<>ph*" * 3,
        ):
            pts = sorted((r["active_weight_fraction"], r["speedup"]) for r in payload["results"]
                         if r["shape"] == shape and r["method"] == method and r["tokens"] == tokens)
            ax.plot(*zip(*pts), marker=marker, linestyle="-" if method == "tree" else "--", label=f"{method} N={tokens}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xticks([0.03, 0.05, 0.1, 0.25, 0.5])
        ax.set_yticks([0.5, 1, 2, 5, 10, 20])
        ax.set_xlabel("fraction of dense MLP weights read per token")
        ax.set_ylabel("speed-up over dense LlamaMLP")
        where = (payload["machine"]["cuda"] if payload.get("device") == "cuda"
                 else f"{payload['machine']['torch_threads']} threads (CPU)")
        ax.set_title(f"{shape}, {payload['dtype']}, {where}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: per device")
    parser.add_argument("--tokens", nargs="+", type=int, help="default: per device (the largest is a prefill)")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: per device")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=64, help="tokens per timed batch of calls")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shape only, fewer rounds")
    parser.add_argument("--out", help="result name (default: bench_mlp_<device>)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing JSON")
    args = parser.parse_args()
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"bench_mlp_{args.device}"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.plot_only:
        plot(json.loads((RESULTS / f"{args.out}.json").read_text()), RESULTS / f"{args.out}.png")
        return
    if args.quick:
        args.shapes, args.rounds = ["smollm2-135m"], 3
    torch.set_num_threads(args.threads)
    payload = run(args)
    path = write_json(f"{args.out}.json", payload)
    plot(payload, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")


if __name__ == "__main__":
    main()
