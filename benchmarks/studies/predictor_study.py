"""The MGS levers of issue #17 side by side, at the two byte targets (60% and 40% of the MLP's bf16
weight bytes, predictor included), on SmolLM2-135M: perplexity ratio, active units and bytes.

    python benchmarks/studies/predictor_study.py                       # 40 windows, about an hour on 2 cores
    python benchmarks/studies/predictor_study.py --eval-windows 10 --only rtn4,gptq4

Levers (each calibrated on valid.txt, uniform per-layer thresholds, no training of the MLP):
- rtn4: the default 4-bit predictor, round-to-nearest codes;
- gptq4: the same format and bytes, codes chosen by GPTQ on the layer's calibration inputs;
- regress-r64 / regress-r128: a trained low-rank linear gate regressing the oracle score
  |silu(g) * u| (MSE), instead of BCE on top-k labels;
- always-on-5%: the 5% of neurons most often selected on calibration text always run, the
  predictor scores only the rest (its bytes shrink by 5%);
- nested (`predictor="nested"`): gate_proj/up_proj snapped to an 8-bit grid whose high nibbles
  are the 4-bit predictor. The predictor reads the high nibbles of every row, a selected neuron
  reads its low nibbles and its down_proj row. The quality is exact (the weights are the 8-bit
  values); the bytes are those of a kernel that reads the nibbles, which is not built yet (no
  GPU to measure it on): today's kernels read the snapped weights in the model dtype. The 100%
  row shows what 8-bit gate/up alone costs;
- nested+gptq4: the same with GPTQ codes as the high nibbles.
Results: benchmarks/results/predictor_study_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, RESULTS, machine, write_json  # noqa: E402

from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs, predictor_fraction, use_all_neurons  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec  # noqa: E402
from treeffn_hf.modeling.mgs_predictors import (  # noqa: E402,E501
    dequantize_int4,
    int4_codes,
    int4_grid,
    neuron_scores,
    pack_nibbles,
)
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

OUTPUT = "predictor_study_smollm2.json"
BYTE_TARGETS = (0.60, 0.40)
ALWAYS_ON = 0.05
EIGHT_BIT_GATE_UP_MLP = 2 / 3 * (1 / 2 + 1 / 32) + 1 / 3  # 8-bit gate/up, bf16 scale + zero per 64, bf16 down


# -- gptq4: the 4-bit codes chosen by GPTQ (Frantar et al., 2022) instead of round-to-nearest. The
# predictor's copies are read only to rank neurons, so the error that matters is that of their
# outputs on real inputs: each column's rounding error is pushed onto the columns not yet
# quantised, weighted by the inverse Hessian X^T X of the layer's calibration inputs. Same
# format, bytes and kernels; measured and not kept (a small gain, and nested does better).
DAMPING = 0.01  # of the mean Hessian diagonal, added for a stable Cholesky factor


def input_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """X^T X / n (hidden, hidden), float64 for a stable factorisation, of (n, hidden) inputs."""
    x = inputs.double()
    return x.T @ x / x.shape[0]


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
              damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes (N, K) uint8 and bf16 scales, zeros (N, K / group_size) of `weight` (N, K), in the
    layout of `quantize_int4`; each group's grid is fixed from the error-updated weights."""
    rows, width = weight.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    w = weight.detach().double().clone()
    w[:, dead] = 0
    h[dead, dead] = 1
    h += damping * torch.diagonal(h).mean() * torch.eye(width, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the later columns.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(rows, width, dtype=torch.uint8)
    scales = torch.empty(rows, width // group_size, dtype=torch.bfloat16)
    zeros = torch.empty_like(scales)
    for group, start in enumerate(range(0, width, group_size)):
        end = start + group_size
        block, block_inverse = w[:, start:end].clone(), inverse[start:end, start:end]
        scale, zero = int4_grid(block.amin(-1), block.amax(-1))
        scales[:, group], zeros[:, group] = scale, zero
        errors = torch.empty_like(block)
        for i in range(group_size):
            column = block[:, i]
            code = int4_codes(column, scale, zero)
            codes[:, start + i] = code.to(torch.uint8)
            rounded = dequantize_int4(code[:, None].to(torch.uint8), scale[:, None], zero[:, None])[:, 0].double()
            errors[:, i] = (column - rounded) / block_inverse[i, i]
            block[:, i:] -= errors[:, i : i + 1] * block_inverse[i : i + 1, i:]
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales, zeros


@torch.no_grad()
def refit_predictor(layer, inputs: torch.Tensor) -> None:
    """Re-choose `layer`'s (a MicroGatedMLP with the quantized predictor) 4-bit codes by GPTQ on
    its calibration `inputs` (tokens, hidden)."""
    predictor = layer.micro_gate
    weight = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).float().cpu()
    codes, scales, zeros = gptq_int4(weight, input_hessian(inputs.float().cpu()), predictor.group_size)
    device = predictor.codes.device
    predictor.codes.copy_(pack_nibbles(codes).to(device))
    predictor.scales.copy_(scales.to(device))
    predictor.zeros.copy_(zeros.to(device))


def oracle_scores(mlp, x: torch.Tensor) -> torch.Tensor:
    return neuron_scores(mlp.gate_proj(x), mlp.up_proj(x), mlp.act_fn)


def fit_score_regression(mlp, inputs: torch.Tensor, steps: int, seed: int) -> float:
    """Train `mlp`'s linear gate to regress the oracle score (scaled to mean 1). Returns, on 1024
    held-out tokens, the fraction of the true top-25% neurons that the gate's top 25% finds."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(inputs.shape[0], generator=generator)
    held, train = inputs[order[:1024]], inputs[order[1024:]]
    with torch.no_grad():
        target = oracle_scores(mlp, train)
        scale = target.mean()
        target = target / scale
    gate = mlp.micro_gate
    gate.requires_grad_(True)
    optimizer = torch.optim.Adam(gate.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = torch.randint(0, train.shape[0], (512,), generator=generator)
        loss = torch.nn.functional.mse_loss(gate(train[batch]), target[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    gate.requires_grad_(False)
    with torch.no_grad():
        k = mlp.intermediate_size // 4
        true = oracle_scores(mlp, held).topk(k).indices
        guess = gate(held).topk(k).indices
        hits = torch.zeros(held.shape[0], mlp.intermediate_size).scatter_(1, true, 1.0).gather(1, guess).sum()
    return float(hits / true.numel())


class AlwaysOn(torch.nn.Module):
    """A predictor whose chosen neurons always score +inf (so they always run)."""

    def __init__(self, predictor: torch.nn.Module, always: torch.Tensor, fraction: float) -> None:
        super().__init__()
        self.predictor, self.fraction = predictor, fraction
        self.register_buffer("always", always)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.predictor(x)
        scores[:, self.always] = float("inf")
        return scores

    def num_bytes(self) -> int:
        return round(self.predictor.num_bytes() * (1 - self.fraction))


def use_always_on(sparse, inputs: list[torch.Tensor], density: float) -> None:
    """Give each layer's most often selected neurons (thresholds at `density`) the always-on role;
    the thresholds are calibrated again afterwards."""
    calibrate_mgs(sparse, inputs, density=density, progress=False)
    for index, mlp in sparse.sparse_mlps():
        with torch.no_grad():
            rate = (mlp.micro_gate(inputs[index]) > mlp.gate_threshold).float().mean(0)
        always = rate.topk(round(ALWAYS_ON * mlp.intermediate_size)).indices
        mlp.micro_gate = AlwaysOn(mlp.micro_gate, always, ALWAYS_ON)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--regression-steps", type=int, default=1500)
    parser.add_argument("--only", default="", help="comma-separated levers (default: all)")
    parser.add_argument("--append", action="store_true", help="keep the existing file's rows of other levers")
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    levers = ["rtn4", "gptq4", "regress-r64", "regress-r128", "always-on-5%", "nested", "nested+gptq4"]
    if args.only:
        levers = [lever for lever in levers if lever in args.only.split(",")]

    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    calib_ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512, args.calibration_windows)
    inputs = capture_mlp_inputs(dense, calib_ids, progress=False).inputs
    dense_ppl = perplexity(dense, eval_ids, progress=False).perplexity
    payload = {"command": "python benchmarks/studies/predictor_study.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "dtype": str(dense.dtype).replace("torch.", ""), "model": f"SmolLM2-135M-Instruct ({gguf})",
               "evaluation": {"windows": int(eval_ids.shape[0]), "window": int(eval_ids.shape[1]),
                              "dense_perplexity": dense_ppl},
               "calibration": {"source": "../shared/data/wikitext-2/valid.txt", "windows": args.calibration_windows,
                               "window": 512},
               "bytes": "MLP weight bytes read per token / the dense MLP's in bf16, predictor included "
                        "(nested: modelled, see the docstring)",
               "rows": []}
    print(f"dense ppl {dense_ppl:.3f} on {eval_ids.shape[0]} windows", flush=True)
    if args.append and (RESULTS / args.output).exists():
        previous = json.loads((RESULTS / args.output).read_text())
        payload["rows"] = [{"carried_over": previous["command"], **row} for row in previous["rows"]
                           if row["lever"].split(" ")[0] not in levers]

    def measure(sparse, lever: str, target: float, extra: dict) -> None:
        for _, mlp in sparse.sparse_mlps():
            mlp.reset_density()
        ppl = perplexity(sparse, eval_ids, progress=False).perplexity
        cost = sparse.sparse_cost()
        weights = EIGHT_BIT_GATE_UP_MLP if lever.startswith("nested 100%") else cost.weight_fraction
        row = {"lever": lever, "target_bytes": target, "perplexity": ppl, "ppl_ratio": ppl / dense_ppl,
               "unit_fraction": cost.unit_fraction, "weight_fraction": weights, **extra}
        payload["rows"].append(row)
        print(f"{lever:>14} @ {target:.0%} bytes: ratio {row['ppl_ratio']:.4f} units {cost.unit_fraction:.1%} "
              f"bytes {weights:.1%} {extra}", flush=True)
        write_json(args.output, payload)

    trained = {}  # a regression gate is trained once per lever, then calibrated per target
    for lever in levers:
        for target in BYTE_TARGETS:
            start = time.perf_counter()
            extra: dict = {}
            if lever.startswith("regress"):
                if lever not in trained:
                    rank = int(lever.split("-r")[1])
                    sparse = convert(dense, MGSSpec(predictor="linear", rank=rank), progress=False)
                    recall = [fit_score_regression(mlp, inputs[i], args.regression_steps, i)
                              for i, mlp in sparse.sparse_mlps()]
                    trained[lever] = sparse, {"top25_recall": sum(recall) / len(recall),
                                              "train_seconds": time.perf_counter() - start}
                sparse, extra = trained[lever][0], dict(trained[lever][1])
            else:
                predictor = "nested" if lever.startswith("nested") else "quantized"
                sparse = convert(dense, MGSSpec(predictor=predictor), progress=False)
                if "gptq4" in lever:
                    for index, mlp in sparse.sparse_mlps():
                        refit_predictor(mlp, inputs[index])
                        if predictor == "nested":
                            mlp.snap_to_predictor_grid()
            first = next(mlp for _, mlp in sparse.sparse_mlps())
            if lever.startswith("always-on"):
                use_always_on(sparse, inputs, target - predictor_fraction(first))
            calibrate_mgs(sparse, inputs, weight_fraction=target, progress=False)
            extra["fit_seconds"] = time.perf_counter() - start
            measure(sparse.eval(), lever, target, extra)
            if lever == "nested" and target == BYTE_TARGETS[0]:
                for _, mlp in sparse.sparse_mlps():
                    use_all_neurons(mlp)
                measure(sparse, "nested 100% (8-bit gate/up, dense)", 1.0, {})
            del sparse


if __name__ == "__main__":
    main()
