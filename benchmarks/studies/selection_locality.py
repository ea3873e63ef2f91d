"""Does ordering the neurons by how often they are selected make the recipe's gathers contiguous?

At batch 1 the fused CPU kernel reads the selected neurons' low nibbles and int8 down rows; the
selection leaves gaps, and rows read with gaps stream slower than every row read in order
(docs/status.md). Neurons can be renumbered freely (gate/up rows, down columns and the predictor's
rows together: the layer's function is unchanged), so if some neurons were selected for most tokens
and others rarely (PowerInfer's hot and cold neurons), ordering them by frequency would turn a
token's selection into long runs. This measures, on the default recipe's checkpoint and real
text: each layer's selection frequencies (on 1024 valid.txt tokens), the runs of consecutive
selected neurons per token on 512 other tokens before and after the ordering, and the 30 layers'
decode-step time (the module, bf16 tokens, the fused kernel) in both orders, interleaved.

    python benchmarks/studies/selection_locality.py --work DIR   # about 2 minutes on 2 cores

Writes benchmarks/results/selection_locality_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, interleaved_median, machine, write_json  # noqa: E402

from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.modeling import mgs_kernels_cpu  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

FREQUENCY_TOKENS, TEST_TOKENS = 1024, 512


def selections(layer, x: torch.Tensor) -> torch.Tensor:
    """The kernel's selection (tokens, intermediate) for tokens x."""
    return mgs_kernels_cpu.nested_scores_cpu(layer, x.float()) > layer.gate_threshold.float()


def runs_per_token(selected: torch.Tensor) -> float:
    """Mean count of runs of consecutive selected neurons per token."""
    m = selected.int()
    return float(((m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]).float().mean())


@torch.no_grad()
def permute_neurons(layer, order: torch.Tensor) -> None:
    """Renumber the layer's neurons (the same function): gate/up rows, down columns, predictor rows."""
    layer.gate_proj.weight.copy_(layer.gate_proj.weight[order])
    layer.up_proj.weight.copy_(layer.up_proj.weight[order])
    layer.down_proj.weight.copy_(layer.down_proj.weight[:, order])
    both = torch.cat([order, order + layer.intermediate_size])  # the predictor holds [gate; up]
    for name in ("codes", "scales", "zeros"):
        buffer = getattr(layer.micro_gate, name)
        buffer.copy_(buffer[both])


def layer_rows(layer, frequency_x: torch.Tensor, test_x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    frequency = selections(layer, frequency_x).float().mean(0)
    order = torch.argsort(frequency, descending=True, stable=True)
    test = selections(layer, test_x)
    quantiles = torch.quantile(frequency, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"density": float(test.float().mean()), "frequency_p10_p50_p90": quantiles,
            "runs_per_token": runs_per_token(test), "runs_per_token_ordered": runs_per_token(test[:, order])}, order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="where bench_decode.py keeps the default recipe's checkpoint")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from bench_decode import default_mgs_checkpoint

    source, gguf = smollm2_gguf()
    checkpoint = default_mgs_checkpoint(source, gguf, Path(args.work))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512,
                        (FREQUENCY_TOKENS + TEST_TOKENS) // 512)
    # every token kept, in order (the sample holds them all), back in the model's bf16 (exact)
    captured = capture_mlp_inputs(model, ids, tokens_per_layer=FREQUENCY_TOKENS + TEST_TOKENS, progress=False)
    inputs = [x.bfloat16() for x in captured.inputs]
    original = [layer.mlp for layer in model.model.layers]
    ordered, rows = [], []
    for layer, x in zip(original, inputs):
        row, order = layer_rows(layer, x[:FREQUENCY_TOKENS], x[FREQUENCY_TOKENS:])
        rows.append(row)
        ordered.append(copy.deepcopy(layer))
        permute_neurons(ordered[-1], order)
    steps = [[x[t:t + 1] for x in inputs] for t in range(FREQUENCY_TOKENS, FREQUENCY_TOKENS + 64)]

    def decode(layers) -> None:
        with torch.no_grad():
            for step in steps:
                for layer, x in zip(layers, step):
                    layer(x)

    seconds = interleaved_median({"original order": lambda: decode(original), "by frequency": lambda: decode(ordered)},
                                 rounds=args.rounds, calls=1)
    assert {layer.last_path for layer in original + ordered} == {"cpu"}, "the fused kernel must have run"
    per_layer = {name: s / (64 * len(original)) * 1e6 for name, s in seconds.items()}
    summary = {key: statistics.mean(r[key] for r in rows) for key in ("density", "runs_per_token",
                                                                          "runs_per_token_ordered")}
    print(f"mean density {summary['density']:.3f}; runs of selected neurons per token "
          f"{summary['runs_per_token']:.0f} -> {summary['runs_per_token_ordered']:.0f} ordered by frequency; "
          f"decode step per layer {per_layer['original order']:.1f} us -> {per_layer['by frequency']:.1f} us")
    path = write_json("selection_locality_smollm2.json", {
        "command": "python benchmarks/studies/selection_locality.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "checkpoint": "the default recipe (treeffn convert --method mgs + treeffn distill), loaded in bf16",
        "frequency_tokens": FREQUENCY_TOKENS, "test_tokens": TEST_TOKENS, "summary": summary,
        "us_per_layer_at_batch_1": per_layer, "speedup_ordered": seconds["original order"] / seconds["by frequency"],
        "layers": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
