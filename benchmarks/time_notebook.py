"""Wall time of a notebook's full-size run, cell by cell (the figure notebooks/README.md quotes).

Executes the notebook with nbclient in a fresh kernel (outputs are not written back), at the size
`TREEFFN_NOTEBOOK` selects (unset: full size). Run it alone on the machine: the time is the claim.

    python benchmarks/time_notebook.py notebooks/quickstart.ipynb

Writes benchmarks/results/notebook_<name>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def first_line(source: str) -> str:
    return next((line for line in source.splitlines() if line.strip()), "")[:80]


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", type=Path)
    args = parser.parse_args()
    notebook = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(notebook, timeout=7200, kernel_name="python3",
                            resources={"metadata": {"path": str(args.notebook.parent)}})
    cells = []
    start = time.perf_counter()
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            cell_start = time.perf_counter()
            client.execute_cell(cell, index)
            cells.append({"cell": index, "first_line": first_line(cell.source),
                          "seconds": time.perf_counter() - cell_start})
            print(f"cell {index:3d} {cells[-1]['seconds']:7.1f}s  {cells[-1]['first_line']}", flush=True)
    total = time.perf_counter() - start
    size = os.environ.get("TREEFFN_NOTEBOOK", "full")
    print(f"total {total:.0f}s ({total / 60:.1f} min) at size {size}")
    write_json(f"notebook_{args.notebook.stem}.json", {
        "benchmark": "time_notebook", "command": "python benchmarks/time_notebook.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "notebook": str(args.notebook), "size": size, "total_seconds": total, "cells": cells,
    })


if __name__ == "__main__":
    main()
