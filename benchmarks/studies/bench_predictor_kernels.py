"""What the MGS predictor costs on this CPU: one token through [gate_proj; up_proj] (2H x hidden)
by each matmul torch offers, against the dense MLP's three projections, in one process.

    python benchmarks/studies/bench_predictor_kernels.py

The MGS layer must score every neuron before it computes any, so the predictor's matmul is a
floor under its time. Rows: fp32 and bf16 dense GEMV of [gate; up] (the dense work it replaces),
torch's packed int4 matmul with groups of 64 (the 4-bit predictor's CPU path), the packed int8
matmul (per-row scales) and a dequantise-then-GEMV; then down_proj dense and 80% of its rows read in
place, and a whole nested layer at 80% computed from two int4 planes (the high and low nibbles) with
its down rows read in place. Each row's `vs_dense_mlp` is the share of the
dense fp32 MLP's time it takes: a predictor that takes 0.5 of it caps the MLP speed-up at 2x even
if the selected neurons cost nothing. Results: benchmarks/results/bench_predictor_kernels_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf.modeling.mgs_predictors import dequantize_int4, quantize_int4  # noqa: E402

SHAPES = {"smollm2-135m": (576, 1536), "llama-1b": (2048, 8192)}
GROUP = 64


def kernels(hidden: int, intermediate: int) -> dict:
    torch.manual_seed(0)
    gate_up = torch.randn(2 * intermediate, hidden) * 0.02
    down = torch.randn(hidden, intermediate) * 0.02
    x = torch.randn(1, hidden)
    x16 = x.to(torch.bfloat16)
    gate_up16 = gate_up.to(torch.bfloat16)
    codes, scales, zeros = quantize_int4(gate_up, GROUP)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
    row_scale = gate_up.abs().amax(1) / 127
    int8 = (gate_up / row_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    row_scale16 = row_scale.to(torch.bfloat16)

    def dense_mlp():
        gate, up = F.linear(x, gate_up).split(intermediate, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    # The nested layer on two int4 planes: every neuron's gate/up from the high and the low nibbles
    # (the low plane's codes are random here: only its time matters), then the selected 80% of the
    # down_proj rows read in place. Timed to see whether a CPU path could run the nested format.
    low_codes = torch.randint(0, 16, codes.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed_low = torch.ops.aten._convert_weight_to_int4pack_for_cpu(low_codes, 1)
    scale_zero_low = torch.stack([(scales.float() / 16).to(torch.bfloat16).t(), torch.zeros_like(zeros).t()],
                                 dim=-1).contiguous()
    down_rows = down.t().contiguous()
    rows = torch.randperm(intermediate, generator=torch.Generator().manual_seed(2))[: int(0.8 * intermediate)]
    rows = rows.sort().values
    weights_80 = torch.randn(1, rows.numel())

    def nested_two_planes():
        high = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed4, GROUP, scale_zero)
        low = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed_low, GROUP, scale_zero_low)
        gate, up = (high.float() + low.float()).split(intermediate, dim=-1)
        hidden_80 = (F.silu(gate) * up)[:, rows]
        return F.embedding_bag(rows[None], down_rows, per_sample_weights=hidden_80, mode="sum")

    return {
        "dense MLP, fp32 (the baseline)": dense_mlp,
        "[gate; up] GEMV, fp32": lambda: F.linear(x, gate_up),
        "[gate; up] GEMV, bf16": lambda: F.linear(x16, gate_up16),
        "int4 packed matmul, groups of 64 (the 4-bit predictor)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x16, packed4, GROUP, scale_zero),
        "int8 packed matmul, per-row scales": lambda: torch.ops.aten._weight_int8pack_mm(x16, int8, row_scale16),
        "dequantise int4 + GEMV, fp32": lambda: F.linear(x, dequantize_int4(codes, scales, zeros)),
        "down_proj GEMV, fp32 (all rows)": lambda: F.linear(torch.ones(1, intermediate), down),
        "down_proj: 80% of the rows in place (embedding_bag)": lambda: F.embedding_bag(
            rows[None], down_rows, per_sample_weights=weights_80, mode="sum"),
        "nested MLP at 80% on two int4 planes + embedding_bag down": nested_two_planes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for shape, (hidden, intermediate) in SHAPES.items():
        fns = kernels(hidden, intermediate)
        calls = 200 if hidden < 1024 else 10
        with torch.inference_mode():
            times = interleaved_median(fns, rounds=args.rounds, calls=calls)
        baseline = times["dense MLP, fp32 (the baseline)"]
        for name, seconds in times.items():
            weights = 2 * intermediate * hidden
            rows.append({"shape": shape, "hidden": hidden, "intermediate": intermediate, "tokens": 1, "kernel": name,
                         "ms": seconds * 1e3, "vs_dense_mlp": seconds / baseline,
                         "gate_up_weights_per_second": weights / seconds})
            print(f"{shape:>13} {name:<58} {seconds * 1e3:8.3f} ms  {seconds / baseline:5.2f} of dense MLP",
                  flush=True)
    write_json("bench_predictor_kernels_cpu.json", {
        "benchmark": "bench_predictor_kernels", "device": "cpu", "machine": machine(),
        "command": "python benchmarks/studies/bench_predictor_kernels.py " + " ".join(sys.argv[1:]),
        "activations": "1 token; bf16 for the bf16/int4/int8 kernels, fp32 otherwise", "rows": rows})


if __name__ == "__main__":
    main()
