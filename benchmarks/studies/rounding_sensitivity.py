"""How far one rounding error moves a sparse model: the suspected cause of issue #19's run-to-run spread.

The library draws all its randomness from seeded generators, and one process on one machine
repeats a run bit for bit (tests/test_workflows.py). Yet one command gave a tree perplexity ratio
of 1.79e3 in one run and 952 in another, on machines both named "AMD EPYC" (the result files did
not record that one had AVX-512 and the other not). Different vector units round matrix products
differently, by about one unit in the last place (ulp) of float32. Dense layers pass such an
error on at its own size; a hard decision (a tree's branch, a threshold's selection) turns it
into a different neuron set, and layer-wise distillation then trains each layer on what the
layers before it became.

This script measures both steps on SmolLM2-135M, with every weight of the model perturbed by
random relative noise of one float32 ulp (`--seeds` draws, each a stand-in for another machine):
- the evaluated model alone: dense, the default partition tree at `--fraction` with its routing fit
  (no distillation), and the default MGS recipe at `--mgs-density` (calibrated thresholds), each
  evaluated as built and perturbed: perplexity spread and the share of routing decisions or
  selections that flip;
- the whole recovery: the tree distilled (`distill_layers`, `--distill-steps` a layer) from a
  perturbed dense model, once per seed.

    python benchmarks/studies/rounding_sensitivity.py        # about 20 minutes on 2 CPU cores

Writes benchmarks/results/rounding_sensitivity_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import DATA, machine, smollm2_with_calibration, write_json  # noqa: E402

from treeffn_hf.conversion.budgets import calibrate_mgs  # noqa: E402
from treeffn_hf.conversion.distillation import distill_layers  # noqa: E402
from treeffn_hf.conversion.routing_fit import fit_routing  # noqa: E402
from treeffn_hf.conversion.surgery import convert  # noqa: E402
from treeffn_hf.evaluation import perplexity, protocol_windows  # noqa: E402
from treeffn_hf.modeling.layer_spec import MGSSpec, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.modeling.mgs_selection import selection_mask  # noqa: E402

OUTPUT = "rounding_sensitivity_smollm2.json"
ULP = 2.0**-23  # float32's relative spacing at 1


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `model` with every floating weight times (1 + e), e uniform in +-1 ulp."""
    generator = torch.Generator().manual_seed(seed)
    copied = copy.deepcopy(model)
    for param in copied.parameters():
        if param.is_floating_point():
            noise = (torch.rand(param.shape, generator=generator, dtype=torch.float64) * 2 - 1) * ULP
            param.mul_((1 + noise).to(param.dtype))
    return copied


@torch.no_grad()
def decisions(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Every sparse layer's hard decisions on `ids`, flattened: tree leaves, or MGS selections."""
    recorded = []

    def hook(module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        if module.sparse_method == "tree":
            recorded.append(module.route(x)[0].reshape(-1))
        else:
            recorded.append(selection_mask(module.micro_gate(x), module.spec, module.gate_threshold).reshape(-1))

    handles = [mlp.register_forward_hook(hook) for _, mlp in model.sparse_mlps()]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([r.to(torch.int64) for r in recorded])


def spread(values: list[float]) -> float:
    return max(values) / min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.04, help="tree: active units (the runs that spread)")
    parser.add_argument("--mgs-density", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=3, help="perturbed copies (stand-ins for other machines)")
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--distill-steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense, tokenizer, calib_ids, captured = smollm2_with_calibration(32, 512, 8192)
    dense.requires_grad_(False)
    eval_ids = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=args.eval_windows)
    probe = eval_ids[:1, :256]
    config = dense.config
    dense_ppl = perplexity(dense, eval_ids, progress=False).perplexity
    rows = []

    def ratio_row(name: str, build, decisions_of=None) -> None:
        start = time.perf_counter()
        base = build(dense)
        ppl = [perplexity(base, eval_ids, progress=False).perplexity / dense_ppl]
        flips = []
        reference = decisions(base, probe) if decisions_of else None
        for seed in range(1, args.seeds + 1):
            model = perturbed(base, seed)
            ppl.append(perplexity(model, eval_ids, progress=False).perplexity / dense_ppl)
            if reference is not None:
                flips.append(float((decisions(model, probe) != reference).float().mean()))
        row = {"model": name, "ratios": ppl, "spread": spread(ppl), "decisions_flipped": flips,
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"{name}: ratios {', '.join(f'{r:.4g}' for r in ppl)} (spread x{row['spread']:.4f})"
              + (f"; decisions flipped {', '.join(f'{f:.2%}' for f in flips)}" if flips else ""), flush=True)

    def dense_copy(model):
        return model

    def routed_tree(model):
        sparse = convert(model, tree_spec_for_fraction(config.hidden_size, config.intermediate_size, args.fraction),
                         progress=False)
        sparse.requires_grad_(False)
        for index, mlp in sparse.sparse_mlps():  # routing fit only, as distill_layers starts
            fit_routing(mlp, captured.inputs[index], seed=index, layer_index=index)
        return sparse

    def thresholded_mgs(model):
        sparse = convert(model, MGSSpec(density=args.mgs_density), progress=False)
        calibrate_mgs(sparse, captured.inputs, progress=False)
        return sparse.requires_grad_(False)

    ratio_row("dense", dense_copy)
    ratio_row(f"tree ~{args.fraction:.0%}, routing fit, no distillation", routed_tree, decisions_of=True)
    ratio_row(f"MGS {args.mgs_density:.0%}, calibrated thresholds", thresholded_mgs, decisions_of=True)

    # The whole recovery from a perturbed dense model: what another machine's run would do.
    spec = tree_spec_for_fraction(config.hidden_size, config.intermediate_size, args.fraction)
    distilled = []
    for seed in range(args.seeds + 1):
        start = time.perf_counter()
        teacher = dense if seed == 0 else perturbed(dense, seed)
        sparse = convert(teacher, spec, progress=False)
        sparse.requires_grad_(False)
        for _, mlp in sparse.sparse_mlps():
            mlp.requires_grad_(True)
        distill_layers(sparse, teacher, captured.inputs, steps=args.distill_steps, progress=False)
        sparse.requires_grad_(False)
        ratio = perplexity(sparse, eval_ids, progress=False).perplexity / dense_ppl
        distilled.append(ratio)
        print(f"tree ~{args.fraction:.0%} distilled from dense perturbed with seed {seed}: ratio {ratio:.4g} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    rows.append({"model": f"tree ~{args.fraction:.0%}, routing fit + {args.distill_steps} distillation steps a layer, "
                          "from the perturbed dense model", "ratios": distilled, "spread": spread(distilled),
                 "decisions_flipped": []})
    write_json(OUTPUT, {
        "command": "python benchmarks/studies/rounding_sensitivity.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "dtype": "float32", "perturbation": "every weight times (1 + e), e uniform in +-2^-23; seed 0 = unperturbed",
        "evaluation": {"windows": int(eval_ids.shape[0]), "window": int(eval_ids.shape[1])},
        "decision_probe_tokens": int(probe.numel()), "rows": rows,
    })


if __name__ == "__main__":
    main()
