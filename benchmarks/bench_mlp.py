"""MLP block time: sparse layer vs the dense Hugging Face `LlamaMLP`, side by side in one process.

For each shape, batch (1, 4, 16, 64 tokens, and a prefill) and target density (50/25/10/5/3%), the
tree FFN and the micro-gated MLP (gate cost included) are timed against the dense block,
interleaved, median of several rounds, and the ratio dense/sparse is printed. On the CPU the dense
block is bf16 (what a user runs there) and the MGS layers run their C kernel on the same bf16
activations (their weights stay float32, as a bf16 checkpoint load keeps them; the kernels read
packed copies). Before the sparse cases, each (shape, batch) times the dense block's
other forms in one interleaved group (`baselines`): float32, bf16, int8 and int4 weight-only
through PyTorch's ops and torchao, and the nested MGS format with every neuron selected (what its
number format alone buys), each with its speed-up over bf16 and the weight bytes it reads. The sparse layers
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
timed on the other kernel variants (`other_variants`: per-token gathers or masked dense GEMMs for
the tree; for MGS, per-token gathers or the union GEMM), which is how the dispatch's switch points
(`KernelPolicy` in treeffn_hf/modeling/dispatch.py) are chosen.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cuda_graph_replay, interleaved_median, machine, write_json  # noqa: E402
from dense_baselines import INT4_G32_ASYM, INT4_G64_ASYM, INT8_ROW, mlp_bytes, torchao_mlps, weight_only_mlp  # noqa: E402

from treeffn_hf import MGSSpec, MicroGatedMLP, TreeFFN  # noqa: E402
from treeffn_hf.conversion.budgets import calibrate_threshold  # noqa: E402
from treeffn_hf.conversion.surgery import sparse_mlp_state  # noqa: E402
from treeffn_hf.modeling import mgs_kernels_cpu, mgs_reference  # noqa: E402
from treeffn_hf.modeling.layer_spec import TreeSpec, tree_shape_at, tree_spec_for_fraction  # noqa: E402
from treeffn_hf.modeling.sparse_cost import SERVED_BYTES_PER_WEIGHT  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeUsage  # noqa: E402

SHAPES = {"smollm2-135m": (576, 1536), "llama-1b": (2048, 8192), "llama-8b": (4096, 14336), "tiny": (64, 256)}
DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.03)
TREE_KINDS = ("tree", "tree-shared", "tree-selected")
SELECTED_DEPTH = 4  # tree-selected: 16 leaves, each `density` of the MLP's neurons (the #20 trees)
MGS_DENSITIES = (0.8, 0.5, 0.1)  # nested predictor, int8 down rows; the default recipe's density is its budget's
MAX_RELATIVE_ERROR = 3e-2  # bf16 operands land near 1e-2 at most
STACK_MEMORY_BYTES = 16 << 30  # per side, for the GPU's stacks of layer copies
DEVICE_DEFAULTS = {  # what each device's published run uses
    "cpu": {"shapes": ["smollm2-135m", "llama-1b"], "tokens": [1, 4, 16, 64, 512], "dtype": "bfloat16"},
    "cuda": {"shapes": ["llama-1b", "llama-8b"], "tokens": [1, 4, 16, 64, 2048], "dtype": "bfloat16"},
}


def copy_bandwidth(device: str, dtype: torch.dtype, sync) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical bandwidth peak."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = interleaved_median({"copy": partial(dst.copy_, src)}, rounds=5, calls=10, sync=sync)
    return 2 * src.numel() / times["copy"]


def other_variants(layer: torch.nn.Module, tokens: int) -> list[dict]:
    """`KernelPolicy` fields, each dict making the kernels take another variant at this batch
    (a switch point moved to 0 or infinity)."""
    if isinstance(layer, TreeFFN):
        from treeffn_hf.modeling import tree_kernels

        gathers = tree_kernels.kernel_variant(layer, tokens) == "gather"
        return [{"tree_gather_max_row_multiple": 0.0 if gathers else math.inf}]
    from treeffn_hf.modeling import mgs_kernels

    if tokens >= 1024:  # per-token gathers of a whole prefill: known to lose, and slow to time
        return []
    return [{"mgs_gather_max_row_multiple": 0.0 if mgs_kernels.uses_gather(layer, tokens) else math.inf}]


def time_side_stack(stack: list, x: torch.Tensor, device: str, rounds: int, calls: int, sync,
                    path: str) -> tuple[dict, dict | None]:
    return timed({"other": partial(run_stack, stack, x)}, capturable(device, path), rounds, calls, sync)


def side_variant(stack: list, x: torch.Tensor, settings: dict, time_stack, copies: int) -> dict:
    """One `other_variants` setting, given to every layer of the stack: checked against the
    reference on the first, then timed. A variant that fails or is off is recorded with its error
    and not timed (the kernel tests say more); it does not end the run, whose other cases still
    count. The policies are restored afterwards."""
    layer, saved = stack[0], [member.kernel_policy for member in stack]
    row = {"settings": {name: str(value) for name, value in settings.items()}}
    try:
        for member in stack:
            member.kernel_policy = member.kernel_policy.replace(**settings)
        out = layer(x)
        row["path"] = layer.last_path  # before the reference call below
        row["median_token_rel_error"], _ = error_vs_reference(layer, x, out)
        if not row["median_token_rel_error"] < MAX_RELATIVE_ERROR:
            row["error"] = f"off by {row['median_token_rel_error']:.3g} (limit {MAX_RELATIVE_ERROR})"
            return row
        eager, graph = time_stack(row["path"])
        row["ms"] = 1e3 * eager["other"] / copies
        row["graph_ms"] = 1e3 * graph["other"] / copies if graph else None
    except Exception as failure:  # noqa: BLE001 - the failure is the finding
        row["error"] = f"{type(failure).__name__}: {failure}"
    finally:
        for member, policy in zip(stack, saved):
            member.kernel_policy = policy
    return row


def baseline_forms(dense: LlamaMLP) -> dict:
    """The float32 block `dense` and its other forms a user could run, name -> (module, input
    dtype, MLP weight bytes over the bf16 block's); a form that cannot be built here is left out
    with its reason printed."""
    hidden, width = dense.gate_proj.in_features, dense.gate_proj.out_features
    bf16_bytes = mlp_bytes(hidden, width, None)
    forms = {"dense fp32": (dense, torch.float32, 2.0),
             "dense bf16": (copy.deepcopy(dense).to(torch.bfloat16), torch.bfloat16, 1.0)}
    for grid in (INT8_ROW, INT4_G32_ASYM, INT4_G64_ASYM):
        forms[f"{grid.name} (torch op)"] = (weight_only_mlp(dense, grid), torch.bfloat16,
                                            mlp_bytes(hidden, width, grid) / bf16_bytes)
    for grid in (INT8_ROW, INT4_G32_ASYM):
        try:
            wrapped = torchao_mlps(torch.nn.ModuleDict({"mlp": copy.deepcopy(dense)}), grid)["mlp"]
        except Exception as error:  # noqa: BLE001 - the reason is the finding
            print(f"  {grid.name} (torchao) skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            continue
        forms[f"{grid.name} (torchao)"] = (wrapped, torch.bfloat16, mlp_bytes(hidden, width, grid) / bf16_bytes)
    if hidden % 64 == 0:
        every = build_layers(dense, "mgs", 0.8, torch.float32)
        every.gate_threshold.fill_(-1.0)  # below every score: the format and kernel, every neuron
        forms["nested MGS format, every neuron"] = (every, torch.bfloat16, None)
    return forms


def baseline_rows(dense: LlamaMLP, shape_name: str, tokens: int, copies: int, args) -> list[dict]:
    """The dense block's forms (`baseline_forms`) timed in one interleaved group, stacks of
    `copies` as the sparse cases are, each against bf16."""
    forms = baseline_forms(dense)
    hidden = dense.gate_proj.in_features
    x = torch.randn(tokens, hidden)
    stacks = {name: [module] + [copy.deepcopy(module) for _ in range(copies - 1)]
              for name, (module, _, _) in forms.items()}
    inputs = {name: x.to(dtype) for name, (_, dtype, _) in forms.items()}
    calls = max(1, int(args.budget / max(tokens * copies, 1)))
    with torch.no_grad():
        want = forms["dense fp32"][0](x)
        for name, stack in stacks.items():  # outputs against the float32 block: no form is broken
            error = float((stack[0](inputs[name]).float() - want).norm() / want.norm())
            if not error < 0.3:  # int4 on random weights is off by about 0.15; a broken form by 1
                raise RuntimeError(f"{name}: off the float32 block by {error:.3g}")
        seconds = interleaved_median({name: partial(run_stack, stack, inputs[name]) for name, stack in stacks.items()},
                                     rounds=args.rounds, calls=calls)
    rows = []
    for name, (module, dtype, fraction) in forms.items():
        if fraction is None:  # the nested layer reports its own bytes as read
            module.reset_density()
            with torch.no_grad():
                module(inputs[name])
            fraction = module.cost().weight_fraction
        rows.append({"shape": shape_name, "tokens": tokens, "form": name, "activations": str(dtype).split(".")[-1],
                     "ms": 1e3 * seconds[name] / copies, "speedup_vs_bf16": seconds["dense bf16"] / seconds[name],
                     "weight_fraction_of_bf16": fraction, "layers_per_call": copies,
                     "path": getattr(module, "last_path", None)})
        if rows[-1]["path"] not in (None, "cpu", "cpu:scores", "cpu:amx"):
            raise RuntimeError(f"{name} ran the {rows[-1]['path']} path, not its kernel")
        print(f"{shape_name:13s} N={tokens:<4d} {name:34s} {rows[-1]['ms']:8.3f} ms  "
              f"{rows[-1]['speedup_vs_bf16']:5.2f}x bf16  bytes {fraction:.3f} of bf16", flush=True)
    return rows


def random_dense_mlp(hidden: int, width: int) -> LlamaMLP:
    """A dense `LlamaMLP` with weights drawn at the scale that keeps activations of order one."""
    dense = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=8))
    torch.nn.init.normal_(dense.gate_proj.weight, std=hidden**-0.5)
    torch.nn.init.normal_(dense.up_proj.weight, std=hidden**-0.5)
    torch.nn.init.normal_(dense.down_proj.weight, std=width**-0.5)
    return dense


def build_layers(dense: LlamaMLP, kind: str, density: float, dtype: torch.dtype) -> torch.nn.Module:
    hidden, width = dense.gate_proj.in_features, dense.gate_proj.out_features
    if kind in TREE_KINDS:
        spec = tree_spec_for_fraction(hidden, width, density)
        if kind == "tree-shared":  # one level deeper within the same units: the leftover neurons always on
            spec = tree_shape_at(hidden, width, spec.active_units, depth=spec.depth + 1, node_width=spec.node_width)
        elif kind == "tree-selected":  # leaves that select their neurons: 16 x density of the MLP stored
            spec = TreeSpec(depth=SELECTED_DEPTH, node_width=0, routing="hyperplane", leaf_neurons="selected",
                            leaf_width=round(density * width), shared_width=0)
        layer = TreeFFN(hidden, width, spec, torch.nn.SiLU())
    else:  # the default recipe: the nested 4-bit predictor, a threshold calibrated to the density
        spec = MGSSpec(density=density, selection="threshold")
        layer = MicroGatedMLP(hidden, width, spec, torch.nn.SiLU())
    state = sparse_mlp_state(layer.spec, dense.gate_proj, dense.up_proj, dense.down_proj)
    layer.load_state_dict(state, strict=kind in TREE_KINDS)
    layer = layer.to(dense.gate_proj.weight.device).requires_grad_(False)
    if kind == "mgs":
        calibration = torch.randn(4096, hidden, generator=torch.Generator().manual_seed(2)).to(dense.gate_proj.weight)
        calibrate_threshold(layer, calibration, density)
    return layer.to(dtype).eval()


def other_cpu_path(stack: list, x: torch.Tensor, ran: str, dense_seconds: float, rounds: int,
                   calls: int) -> dict:
    """The stack of MGS layers forced onto the other C-kernel path (the fused kernel, or the scores
    then bf16 GEMMs of `cpu:scores`), timed alone: where the dispatch's token limit
    (`KernelPolicy.cpu_fused_max_tokens`) comes from. `dense_seconds` is the dense stack's time, so
    the speed-up compares like with like."""
    other = "cpu:scores" if ran == "cpu" else "cpu"
    row = {"settings": {"force_path": other}, "path": other}
    reason = mgs_kernels_cpu.cpu_kernel_unavailable_reason(stack[0], x.float())  # the layer takes bf16 to float32
    if reason is not None:
        return {**row, "error": reason}
    for layer in stack:
        layer.force_path = other
    try:
        seconds = interleaved_median({"other": partial(run_stack, stack, x)}, rounds=rounds, calls=calls)["other"]
    finally:
        for layer in stack:
            layer.force_path = None
    return {**row, "ms": 1e3 * seconds / len(stack), "speedup": dense_seconds / seconds}


def scoring_alone(stack: list, x: torch.Tensor, dense_seconds: float, rounds: int, calls: int) -> dict:
    """The predictor's scoring GEMM of the stack's MGS layers alone (every neuron's high nibbles
    against the tokens): what `cpu:scores` adds to the dense bf16 GEMMs, so its best speed-up over
    them is dense / (dense + scoring) whatever the selection."""
    x = x.float()
    if mgs_kernels_cpu.cpu_kernel_unavailable_reason(stack[0], x) is not None:
        return {"path": "scoring alone", "error": "no CPU kernel"}
    run = lambda: [mgs_kernels_cpu.nested_scores_cpu(layer, x) for layer in stack]  # noqa: E731
    seconds = interleaved_median({"scores": run}, rounds=rounds, calls=calls)["scores"]
    return {"path": "scoring alone", "ms": 1e3 * seconds / len(stack), "speedup": dense_seconds / seconds,
            "ceiling_with_dense_gemms": dense_seconds / (dense_seconds + seconds)}


def error_vs_reference(layer: torch.nn.Module, x: torch.Tensor, fast: torch.Tensor,
                       oracle: str = "reference") -> tuple[float, float]:
    """(median over tokens of ||fast - ref|| / ||ref||, fraction of tokens off by more than 5%),
    ref = the layer's reference path on the same input, or with oracle="naive_cpu" the CPU
    kernel's naive twin (its int8-rounded inputs included). A token whose near-zero routing
    score or gate score falls the other way in the two paths' rounding is off as a whole; the
    median ignores those few, the fraction counts them."""
    if oracle == "naive_cpu":  # on the tokens as the kernel takes them, float32
        reference = mgs_reference.mgs_nested_naive(layer, x.float())[0]
    else:
        forced, layer.force_path = layer.force_path, "reference"
        try:
            reference = layer(x).float()
        finally:
            layer.force_path = forced
    per_token = (fast.float() - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-30)
    return float(per_token.median()), float((per_token > 0.05).float().mean())


def leaf_entropy(layer: TreeFFN, x: torch.Tensor) -> float:
    layer.usage = TreeUsage(layer.spec)
    with torch.no_grad():
        layer(x)
    counts = layer.usage.leaf_counts.double().flatten()
    layer.usage = None
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(counts.numel()))


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 << 20)


def stack_copies(device: str, shape_name: str, densities, dtype: torch.dtype, stack_cpu: bool = False) -> int:
    """How many copies of each layer a timed call runs, one after the other, like a model's layers.

    On a GPU a 3%-active layer touches a few MB, which the L2 cache would keep between repeated
    calls on one layer, and a decode step never reuses a layer's rows that way (every layer has
    its own weights). So both sides run a stack of distinct copies whose sparse rows touched per
    token add up to 4x the L2 size (within a memory budget); times are per layer. On the CPU
    (`--stack`) the copies' dense weights add up to 4x the last-level cache, so that neither side
    runs from a cache that a model's other layers would have evicted (without it one layer is
    timed again and again: the SmolLM2 MLP, 10.6 MB in fp32, then sits in a 48 MB L3)."""
    hidden, width = SHAPES[shape_name]
    element = torch.empty((), dtype=dtype).element_size()
    if device != "cuda":
        return math.ceil(4 * last_level_cache_bytes() / (3 * hidden * width * element)) if stack_cpu else 1
    sparsest = 3 * hidden * width * min(densities) * element
    copies = math.ceil(4 * torch.cuda.get_device_properties(0).L2_cache_size / sparsest)
    return max(1, min(copies, int(STACK_MEMORY_BYTES // (2 * 3 * hidden * width * element))))


def timed(fns: dict, capturable: bool, rounds: int, calls: int, sync) -> tuple[dict, dict]:
    """(eager, graph) median seconds per call. Graph times are empty where a side cannot be
    captured (the PyTorch union path waits on the host for `nonzero`), so each column compares
    like with like."""
    eager = interleaved_median(fns, rounds=rounds, calls=calls, sync=sync)
    graph = {}
    if capturable:
        replays = {name: cuda_graph_replay(fn) for name, fn in fns.items()}
        if all(replays.values()):
            graph = interleaved_median(replays, rounds=rounds, calls=calls, sync=sync)
    return eager, graph


def capturable(device: str, path: str) -> bool:
    return device == "cuda" and path.startswith("triton:")


def run_stack(layers: list, x: torch.Tensor) -> None:
    for layer in layers:
        layer(x)


def case_key(row: dict) -> tuple:
    return row["shape"], row["tokens"], row["method"], row["target_density"]


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    peak = copy_bandwidth(device, dtype, sync) if device == "cuda" else None
    element = torch.empty((), dtype=dtype).element_size()
    payload = {"benchmark": "bench_mlp", "device": device, "dtype": args.dtype, "machine": machine(),
               "copy_bandwidth_gb_s": peak / 1e9 if peak else None,
               "l2_cache_bytes": torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else None,
               "last_level_cache_bytes": last_level_cache_bytes() if device == "cpu" else None,
               "command": " ".join(["python", "benchmarks/bench_mlp.py", *sys.argv[1:]]), "results": []}
    existing = RESULTS / f"{args.out}.json"
    if args.resume and existing.exists():
        previous = json.loads(existing.read_text())
        payload["results"], payload["baselines"] = previous["results"], previous.get("baselines", [])
        payload["command"] = previous["command"] + " && " + payload["command"]  # every run that added rows
    payload.setdefault("baselines", [])
    done = {case_key(row) for row in payload["results"]}
    done_baselines = {(row["shape"], row["tokens"]) for row in payload["baselines"]}
    for shape_name in args.shapes:
        hidden, width = SHAPES[shape_name]
        dense_fp32 = random_dense_mlp(hidden, width).to(device).eval()
        dense = copy.deepcopy(dense_fp32).to(dtype)
        copies = stack_copies(device, shape_name, args.densities + args.mgs_densities, dtype, args.stack)
        dense_stack = [dense] + [copy.deepcopy(dense) for _ in range(copies - 1)]
        for tokens in args.tokens:
            if device == "cpu" and args.baselines and (shape_name, tokens) not in done_baselines:
                payload["baselines"] += baseline_rows(dense_fp32, shape_name, tokens, copies, args)
                write_json(f"{args.out}.json", payload)
            x = torch.randn(tokens, hidden, dtype=dtype, device=device)
            for kind in args.methods:
                for density in (args.densities if kind in TREE_KINDS else args.mgs_densities):
                    if (shape_name, tokens, kind, density) in done:
                        continue
                    # On the CPU the MGS layers run their C kernel on the bf16 activations; their weights
                    # stay float32 (the nested grid's 8-bit values; bf16 would round them off it).
                    mgs_cpu = device == "cpu" and kind == "mgs"
                    layer_dtype = torch.float32 if mgs_cpu else dtype
                    layer = build_layers(dense_fp32 if mgs_cpu else dense, kind, density, layer_dtype).to(device)
                    x_sparse = x
                    with torch.no_grad():
                        fast = layer(x_sparse)
                        path = layer.last_path
                        # The C kernel rounds its inputs to int8: its oracle is its naive twin;
                        # the distance to the layer's reference path is recorded beside it.
                        oracle = "naive_cpu" if path == "cpu" else "reference"
                        error, tokens_off = error_vs_reference(layer, x_sparse, fast, oracle)
                        reference_error = error_vs_reference(layer, x_sparse, fast)
                    expected = ("triton:", "torch") if device == "cuda" else ("torch", "cpu")  # never the reference
                    if not path.startswith(expected):
                        raise RuntimeError(f"{kind} ran the {path} path, not a fast one")
                    if not error < MAX_RELATIVE_ERROR:  # a wrong kernel is off on most tokens
                        raise RuntimeError(f"{kind} {density:.0%} N={tokens}: {path} is off by {error:.3g} "
                                           f"({tokens_off:.1%} of tokens)")
                    sparse_stack = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
                    calls = max(1, int(args.budget / max(tokens * copies, 1)))
                    fns = {"dense": partial(run_stack, dense_stack, x),
                           "sparse": partial(run_stack, sparse_stack, x_sparse)}
                    with torch.no_grad():
                        eager, graph = timed(fns, capturable(device, path), args.rounds, calls, sync)
                        others = []
                        if device == "cpu" and kind == "mgs":  # the other CPU path: the switch point
                            others.append(other_cpu_path(sparse_stack, x_sparse, path, eager["dense"], args.rounds,
                                                         calls))
                            if tokens >= 16:
                                others.append(scoring_alone(sparse_stack, x_sparse, eager["dense"], args.rounds, calls))
                        if device == "cuda":  # the other variants: the switch points
                            time_stack = partial(time_side_stack, sparse_stack, x, device, args.rounds, calls, sync)
                            for settings in other_variants(layer, tokens):
                                others.append(side_variant(sparse_stack, x, settings, time_stack, copies))
                                if "error" in others[-1]:
                                    print(f"  side variant {others[-1]['settings']}: {others[-1]['error']}", flush=True)
                    del sparse_stack
                    cost = layer.cost()
                    row = {
                        "shape": shape_name, "hidden": hidden, "intermediate": width, "tokens": tokens,
                        "method": kind, "target_density": density, "spec": layer.spec.to_dict(),
                        "active_unit_fraction": cost.unit_fraction, "active_weight_fraction": cost.weight_fraction,
                        "stored_multiple": layer.stored_multiple if kind in TREE_KINDS else None,
                        "layers_per_call": copies,
                        "dense_ms": eager["dense"] * 1e3 / copies, "sparse_ms": eager["sparse"] * 1e3 / copies,
                        "speedup": eager["dense"] / eager["sparse"],
                        "graph_dense_ms": graph["dense"] * 1e3 / copies if graph else None,
                        "graph_sparse_ms": graph["sparse"] * 1e3 / copies if graph else None,
                        "graph_speedup": graph["dense"] / graph["sparse"] if graph else None,
                        "median_token_rel_error": error, "fraction_tokens_off": tokens_off, "oracle": oracle,
                        "median_token_rel_error_vs_reference": reference_error[0],
                        "fraction_tokens_off_vs_reference": reference_error[1],
                        "leaf_entropy": leaf_entropy(layer, x) if kind in TREE_KINDS and tokens > 1 else None,
                        "dense_dtype": str(dtype).split(".")[-1], "sparse_activations": str(x_sparse.dtype).split(".")[-1],
                        "sparse_weights_dtype": str(layer_dtype).split(".")[-1],
                        "path": path, "other_variants": others,
                    }
                    if peak is not None and tokens == 1:
                        best = graph or eager  # the launch-free time where there is one
                        row["bandwidth_fraction_of_copy_peak"] = (
                            cost.active_weight_bytes / SERVED_BYTES_PER_WEIGHT * element * copies / best["sparse"] / peak)
                        row["dense_bandwidth_fraction_of_copy_peak"] = (
                            cost.dense_weight_bytes / SERVED_BYTES_PER_WEIGHT * element * copies / best["dense"] / peak)
                    payload["results"].append(row)
                    write_json(f"{args.out}.json", payload)  # after every case: a killed run resumes
                    graph_note = f"  graphed {row['graph_speedup']:6.2f}x" if graph else ""
                    print(f"{shape_name:13s} N={tokens:<4d} {kind:4s} target {density:5.0%} "
                          f"active {cost.unit_fraction:6.2%} (weights {cost.weight_fraction:6.2%})  "
                          f"dense {row['dense_ms']:8.3f} ms  sparse {row['sparse_ms']:8.3f} ms  "
                          f"speed-up {row['speedup']:6.2f}x{graph_note}  [{path}]", flush=True)
        del dense_stack
    return payload


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
            pts = sorted((r["active_weight_fraction"], r.get("graph_speedup") or r["speedup"]) for r in payload["results"]
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
        ax.set_yticks([0.2, 0.5, 1, 2, 5, 10, 20])
        ax.set_xlabel("fraction of dense MLP weights read per token")
        ax.set_ylabel("speed-up over dense LlamaMLP")
        where = (payload["machine"]["cuda"] if payload.get("device") == "cuda"
                 else f"{payload['machine']['torch_threads']} threads (CPU)")
        graphs = ", CUDA graphs where capturable" if payload.get("device") == "cuda" else ""
        ax.set_title(f"{shape}, {payload['dtype']}, {where}{graphs}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: per device")
    parser.add_argument("--tokens", nargs="+", type=int, help="default: per device (the largest is a prefill)")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES), help="tree densities")
    parser.add_argument("--mgs-densities", nargs="+", type=float, default=list(MGS_DENSITIES))
    parser.add_argument("--methods", nargs="+", choices=(*TREE_KINDS, "mgs"), default=["tree", "mgs"],
                        help="tree-shared: the tree one level deeper at the same units, its leftover neurons always on; "
                             "tree-selected: 16 hyperplane-routed leaves of `density` x the neurons each, leaves "
                             "sharing neurons (stored 16 x density times)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: per device")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=64, help="tokens per timed batch of calls")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shape only, fewer rounds")
    parser.add_argument("--out", help="result name (default: bench_mlp_<device>)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing JSON")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in the result file")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="CPU: skip the dense block's other forms (fp32, bf16, int8/int4 weight-only, the nested "
                             "format with every neuron)")
    parser.add_argument("--stack", action="store_true",
                        help="CPU: time stacks of distinct layer copies whose dense weights exceed 4x the last-level "
                             "cache, as a model's layers are (default: one layer, cache-hot)")
    args = parser.parse_args()
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"bench_mlp_{args.device}"
    if args.plot_only:
        plot(json.loads((RESULTS / f"{args.out}.json").read_text()), RESULTS / f"{args.out}.png")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.quick:
        args.shapes, args.rounds = ["smollm2-135m"], 3
    torch.set_num_threads(args.threads)
    payload = run(args)
    path = write_json(f"{args.out}.json", payload)
    plot(payload, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")


if __name__ == "__main__":
    main()
