"""The GPU benchmark's side variants (benchmarks/bench_mlp.py `other_variants`) each make the
kernels run another, correct path: what the benchmark times as an alternative really is one."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from treeffn_hf import MGSSpec, MicroGatedMLP, TreeFFN, TreeSpec  # noqa: E402
from treeffn_hf.modeling import tree_kernels  # noqa: E402

from .conftest import load_benchmark  # noqa: E402

HIDDEN, INTER = 40, 160
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels in the interpreter


@pytest.fixture(scope="module")
def bench_mlp():
    return load_benchmark("bench_mlp")


def untimed(path):
    return {"other": 0.0}, None  # the timing itself is the GPU's; here only what runs is checked


def paths_of_every_variant(bench_mlp, layer, tokens):
    """The dispatched path and each side variant's, every one checked by `side_variant` itself
    against the reference (at the benchmark's own tolerance)."""
    torch.manual_seed(1)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    layer.to(DEVICE)
    x = torch.randn(tokens, HIDDEN, device=DEVICE)
    layer.force_path = "triton"
    with torch.no_grad():
        layer(x)
        paths = [layer.last_path]
        for settings in bench_mlp.other_variants(layer, tokens):
            row = bench_mlp.side_variant([layer], x, settings, untimed, copies=1)
            assert "error" not in row, row
            assert row["median_token_rel_error"] < 1e-4, row  # fp32: far inside the benchmark's limit
            paths.append(row["path"])
    return paths


@pytest.mark.parametrize("tokens", [1, 40])
def test_tree_side_variants_cover_every_kernel_variant(bench_mlp, tokens):
    layer = TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU())
    paths = paths_of_every_variant(bench_mlp, layer, tokens)
    assert sorted(p.removeprefix("triton:route+") for p in paths) == sorted(tree_kernels.VARIANTS)


def test_mgs_decode_side_variants_time_the_union_path(bench_mlp):
    layer = MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=8), nn.SiLU())
    paths = paths_of_every_variant(bench_mlp, layer, 1)
    assert sorted(paths) == ["torch", "triton:gather"]


def test_a_failing_side_variant_is_recorded_and_its_setting_restored(bench_mlp):
    layer = TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU()).to(DEVICE)
    layer.force_path = "triton"
    x = torch.randn(1, HIDDEN, device=DEVICE)
    with torch.no_grad():
        before = layer.kernel_policy
        row = bench_mlp.side_variant([layer], x, {"tree_variant": "bogus"}, untimed, copies=1)
    assert row["error"].startswith("ValueError") and "no field 'tree_variant'" in row["error"]
    assert "ms" not in row and layer.kernel_policy is before
