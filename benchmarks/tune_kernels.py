"""Tile sizes of the Triton kernels, measured on this GPU.

The constants `gather_kernels.GATE_UP_BLOCK` / `DOWN_BLOCK` (decode: the split-K tiles of the
per-token gathered rows, in both layers) are set from this script's output. Each candidate is
checked against the kernel's naive reference, then timed as CUDA-graph replays over enough
copies of the weight tables that the rows touched exceed 4x the L2 cache (so the cache cannot
hold them between calls, as in a real model with many layers).

    python benchmarks/tune_kernels.py          # writes benchmarks/results/tune_kernels_cuda.json
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_graph_replay, interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf.modeling import gather_kernels  # noqa: E402

SHAPES = {"llama-1b": (2048, 8192), "llama-8b": (4096, 14336)}
GATE_UP_CANDIDATES = [(8, 512), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128)]
DOWN_CANDIDATES = [(16, 256), (16, 512), (32, 128), (32, 256), (64, 64), (64, 128)]


def tables(hidden: int, width: int, touched_bytes: float, dtype) -> list[tuple[torch.Tensor, ...]]:
    """Copies of (gate, up, down) row tables, enough that the rows touched per call exceed 4x L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(1, min(math.ceil(4 * l2 / touched_bytes), int((12 << 30) // (3 * hidden * width * 2))))
    return [tuple(torch.randn(width, hidden, device="cuda", dtype=dtype) * s for s in (0.02, 0.02, 0.02))
            for _ in range(copies)]


def graph_ms(fn, copies: int, rounds: int) -> float:
    replay = cuda_graph_replay(fn)
    if replay is None:
        raise RuntimeError("a kernel candidate could not be captured in a CUDA graph")
    return 1e3 * interleaved_median({"c": replay}, rounds=rounds, calls=5, sync=torch.cuda.synchronize)["c"] / copies


def run_gather(tabs, x, rows, kwargs) -> None:
    for tab in tabs:
        gather_kernels.gathered_swiglu(x, rows, *tab, **kwargs)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def tune_gather(dtype, rounds: int) -> list[dict]:
    rows_out = []
    for shape, (hidden, width) in SHAPES.items():
        for tokens in (1, 4, 16):
            for density in (0.03, 0.1, 0.5):
                selected = max(1, round(density * width))
                tabs = tables(hidden, width, 3 * selected * hidden * 2 * tokens, dtype)
                x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
                rows = torch.stack([torch.randperm(width, device="cuda")[:selected] for _ in range(tokens)])
                rows = rows.to(torch.int32).contiguous()
                want = gather_kernels.gathered_swiglu_naive(x, rows.long(), *tabs[0])
                for part, candidates in (("gate_up", GATE_UP_CANDIDATES), ("down", DOWN_CANDIDATES)):
                    for block in candidates:
                        kwargs = {f"{part}_block": block}
                        error = relative_error(gather_kernels.gathered_swiglu(x, rows, *tabs[0], **kwargs), want)
                        if not error < 2e-2:
                            raise RuntimeError(f"gather {part} {block}: relative error {error:.3g}")
                        ms = graph_ms(partial(run_gather, tabs, x, rows, kwargs), len(tabs), rounds)
                        rows_out.append({"kernel": "gather", "part": part, "block": list(block), "shape": shape,
                                         "tokens": tokens, "density": density, "ms": ms, "rel_error": error})
                        print(f"gather {part:7s} {block!s:10s} {shape} N={tokens:<3d} {density:4.0%}: {ms * 1e3:8.1f} us",
                              flush=True)
    return rows_out


def best(rows: list[dict], kernel: str, part: str | None = None) -> dict:
    """Per candidate, the geometric mean over cases of its time relative to the case's fastest."""
    cases = {}
    for r in rows:
        if r["kernel"] == kernel and r.get("part") == part:
            cases.setdefault((r["shape"], r["tokens"], r["density"]), []).append(r)
    score: dict[tuple, float] = {}
    for case in cases.values():
        fastest = min(r["ms"] for r in case)
        for r in case:
            score[tuple(r["block"])] = score.get(tuple(r["block"]), 0.0) + math.log(r["ms"] / fastest)
    ranked = sorted(score.items(), key=lambda kv: kv[1])
    return {"best": list(ranked[0][0]), "slowdown_vs_case_best": {str(list(k)): math.exp(v / len(cases))
                                                                  for k, v in ranked}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = tune_gather(dtype, args.rounds)
    summary = {"gate_up": best(rows, "gather", "gate_up"), "down": best(rows, "gather", "down")}
    path = write_json("tune_kernels_cuda.json", {
        "benchmark": "tune_kernels", "dtype": "bfloat16", "machine": machine(),
        "current": {"GATE_UP_BLOCK": gather_kernels.GATE_UP_BLOCK, "DOWN_BLOCK": gather_kernels.DOWN_BLOCK},
        "summary": summary, "results": rows})
    for name, result in summary.items():
        print(name, "best", result["best"], {k: round(v, 3) for k, v in result["slowdown_vs_case_best"].items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
