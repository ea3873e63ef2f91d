"""Describe a sparse checkpoint: method, layer spec, active fractions and parameter counts.

Reads only config.json and the safetensors headers; no weights are loaded.
"""

from __future__ import annotations

import argparse
import json

NAME = "info"
HELP = "show the sparse spec, active fraction and parameter counts of a converted checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="converted checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from ..workflows import describe_checkpoint

    description = describe_checkpoint(args.directory)
    print(json.dumps(description, indent=2) if args.json else description_text(description))
    return 0


def description_text(d: dict) -> str:
    lines = [
        f"checkpoint      {d['directory']}",
        f"model type      {d['model_type']} (base: {d['base_model_type']})",
        f"method          {d['method']}",
        f"layers          {d['num_layers']} decoder layers, "
        + ("each with its own forest shape (below)" if d["layer_shapes"] else "all with the spec below"),
        f"layer spec      {json.dumps({k: v for k, v in d['layer_spec'].items() if k != 'layer_shapes'})}",
        *(f"layer {i:<9} {s['num_trees']} tree(s), depth {s['depth']}, node {s['node_width']}, leaf {s['leaf_width']}, "
          f"shared {s['shared_width']}: {s['active_units']} neurons a token"
          for i, s in enumerate(d["layer_shapes"] or [])),
        f"active units    {d['active_unit_fraction']:.2%} of the MLP neurons per token",
        *([f"stored rows     {d['stored_multiple']:.2f}x the dense MLP's neurons (leaves share neurons)"]
          if d.get("stored_multiple") and abs(d["stored_multiple"] - 1) > 1e-9 else []),
        f"weight bytes    {d['active_weight_fraction']:.2%} of the dense MLP weights read per token",
        f"parameters      {d['parameters']['total']:,} total, {d['parameters']['mlp']:,} in sparse MLPs",
        f"runs on CUDA    {d['inference_paths']['cuda']}",
        f"runs on CPU     {d['inference_paths']['cpu']}",
    ]
    copies = d["runtime_copy_bytes"]
    if any(copies.values()):
        lines.append("runtime copies  " + "; ".join(
            f"{device} {size / 2**20:.1f} MiB ({size / d['mlp_weight_bytes']:.0%} of the MLP weights)"
            for device, size in copies.items()) + " for float32 weights, made at first use")
    return "\n".join(lines)
