"""Shared benchmark helpers: machine description, interleaved timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import transformers

from treeffn_hf.modeling.layer_spec import TreeSpec

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def smollm2_with_calibration(windows: int, window: int, tokens_per_layer: int):
    """(dense SmolLM2 in eval mode, tokenizer, valid.txt windows, their captured MLP inputs), as
    `treeffn distill` calibrates."""
    from treeffn_hf.checkpoint import load_dense
    from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
    from treeffn_hf.offline_models import smollm2_gguf

    directory, gguf = smollm2_gguf()
    dense, tokenizer = load_dense(directory, gguf_file=gguf)
    dense.eval()
    ids = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, window, windows)
    return dense, tokenizer, ids, capture_mlp_inputs(dense, ids, tokens_per_layer=tokens_per_layer, progress=False)


def _commit() -> Optional[str]:
    """This checkout's commit, "-dirty" when tracked files other than results differ from it (a
    results file written by an earlier run in the same checkout changes no code); None outside git."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("describe", "--always", "--abbrev=12")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return commit + ("-dirty" if changed else "")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        # Machines named alike differ here (AVX2-only and AVX-512 EPYCs): their float results differ too.
        "cpu_features": [f for f in CPU_FEATURES if f in flags],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # The code that ran: two runs of one command on Nov 23 had run different commits (README Limits).
        "commit": _commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def interleaved_median(
    fns: dict[str, Callable[[], object]], rounds: int, calls: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median seconds per call of each function, timing them in alternation so that drift in the
    machine's speed (turbo, other load) hits every side alike. `sync` waits for queued device
    work (torch.cuda.synchronize) before and after each timed batch of calls."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (and Triton compilation)
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def cuda_graph_replay(fn: Callable[[], object]) -> Optional[Callable[[], None]]:
    """`fn`'s kernels captured in a CUDA graph (its replay, launch overhead gone), or None when
    `fn` cannot be captured because it waits on the host (e.g. `nonzero`)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph.replay


def parse_tree_specs(text: str) -> list[TreeSpec]:
    """`num_trees=64,depth=2,node_width=0,routing=hyperplane;...`: one TreeSpec per `;`-separated item."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        fields = {}
        for pair in item.split(","):
            key, value = pair.split("=")
            fields[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
        specs.append(TreeSpec(**fields))
    return specs


def distilled_tree(dense, mlp_inputs: dict, fraction: float, *, steps: int, lr: float):
    """`dense` converted to a tree near `fraction` active MLP units, its routing fitted and each
    layer distilled on the captured `mlp_inputs` (as `treeffn distill`). Returns (model, spec)."""
    from treeffn_hf.conversion.distillation import distill_layers
    from treeffn_hf.conversion.surgery import convert
    from treeffn_hf.modeling.layer_spec import tree_spec_for_fraction

    spec = tree_spec_for_fraction(dense.config.hidden_size, dense.config.intermediate_size, fraction)
    sparse = convert(dense, spec)
    sparse.requires_grad_(False)  # distillation trains one MLP at a time
    for _, mlp in sparse.sparse_mlps():
        mlp.requires_grad_(True)
    distill_layers(sparse, dense, mlp_inputs, steps=steps, lr=lr)
    sparse.requires_grad_(True)
    return sparse, spec


def finetuned_checkpoint(sparse_dir: Path, out: Path, dense_dir: Path, gguf: str, max_windows: int = 512, **options):
    """The checkpoint in `sparse_dir` fine-tuned against the dense teacher on valid.txt (as
    `treeffn finetune`; at most `max_windows` windows of it), saved to `out` and loaded back.
    Returns (model, run summary)."""
    from treeffn_hf.checkpoint import load
    from treeffn_hf.workflows import finetune_checkpoint

    summary = finetune_checkpoint(sparse_dir, out, dense=str(dense_dir), gguf_file=gguf,
                                  data=str(DATA / "wikitext-2" / "valid.txt"), max_windows=max_windows, **options)
    return load(out), summary
