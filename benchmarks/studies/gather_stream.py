"""How fast a random selection of neuron rows streams from memory (gather_stream.c), against every row in order.

The question behind sparsity's own gain at batch 1: the nested recipe's C kernel reads, per
selected neuron, its low nibbles, its int8 down row and their scales; does reading 73% of those
rows, with gaps, take 73% of the time of reading them all? gather_stream.c reads exactly those
bytes (a sum, no kernel math) for random selections, in the kernel's layout and with one chunk per
neuron, on the SmolLM2 and 1B shapes, 2 threads, every read from DRAM.

    python benchmarks/studies/gather_stream.py      # about a minute on 2 cores

Writes benchmarks/results/gather_stream_cpu.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from common import machine, write_json  # noqa: E402

SHAPES = {"smollm2-135m": (576, 1536), "llama-1b": (2048, 8192)}
DENSITIES = (0.5, 0.73, 0.9)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-Wall", "-Wextra", "-Werror")


def build(work: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("no C compiler found")
    binary = work / "gather_stream"
    subprocess.run([compiler, *FLAGS, str(Path(__file__).with_name("gather_stream.c")), "-o", str(binary)], check=True)
    return binary


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        binary = build(Path(work))
        for shape, (hidden, intermediate) in SHAPES.items():
            for density in DENSITIES:
                out = subprocess.run([str(binary), str(hidden), str(intermediate), str(density), "9"], check=True,
                                     capture_output=True, text=True).stdout
                row = {"shape": shape, **json.loads(out)}
                seconds = row["seconds_per_layer"]
                rate = {name: (row["every_bytes_per_layer"] if name == "every neuron in order"
                               else row["selected_bytes_per_layer"]) / s / 1e9 for name, s in seconds.items()}
                row["gb_per_s"] = rate
                row["time_vs_every_neuron"] = seconds["three arrays"] / seconds["every neuron in order"]
                rows.append(row)
                print(f"{shape:13s} density {row['density']:.2f}: kernel layout {rate['three arrays']:5.1f} GB/s, "
                      f"one chunk per neuron {rate['one chunk per neuron']:5.1f} GB/s, every neuron in order "
                      f"{rate['every neuron in order']:5.1f} GB/s; the selection takes "
                      f"{row['time_vs_every_neuron']:.2f}x the time of every neuron for {row['density']:.2f}x the bytes",
                      flush=True)
    path = write_json("gather_stream_cpu.json", {
        "command": "python benchmarks/studies/gather_stream.py", "machine": machine(), "threads": 2,
        "flags": list(FLAGS), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
