"""The dense baselines of the benchmarks (benchmarks/dense_baselines.py): PyTorch's weight-only
kernels compute what their grid says, and the grids round as documented."""

import pytest
import torch

from .conftest import load_benchmark

baselines = load_benchmark("dense_baselines")


@pytest.mark.parametrize("grid", [baselines.INT8_ROW, baselines.INT4_G32_ASYM, baselines.INT4_G64_ASYM],
                         ids=lambda g: g.name)
def test_the_weight_only_kernel_computes_its_grid(grid):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(5, 128)
    want = x.bfloat16().float() @ baselines.fake_quantize(linear.weight, grid).t()
    got = baselines.WeightOnlyLinear(linear, grid)(x)
    assert got.dtype == torch.float32
    # bf16 activations and outputs: about 1% of the largest output
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    exact = x @ linear.weight.t()
    assert (got - exact).abs().max() < (0.02 if grid.bits == 8 else 0.2) * exact.abs().max()


def test_grids_round_to_their_levels_and_count_their_bytes():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    for grid in baselines.FRONTIER_GRIDS:
        q = baselines.fake_quantize(w, grid).reshape(8, -1, grid.group or 128)
        levels = {len(torch.unique(group)) for row in q for group in row}
        assert max(levels) <= 2**grid.bits
    assert baselines.INT8_G64.bytes_per_weight() == 1 + 2 / 64
    assert baselines.INT4_G32_ASYM.bytes_per_weight() == 0.5 + 4 / 32
    # the dense bf16 MLP is 6 bytes per hidden x intermediate slot; int8 per row about half of it
    assert baselines.mlp_bytes(64, 256, None) == 6 * 64 * 256
    assert baselines.mlp_bytes(64, 256, baselines.INT8_ROW) == 2 * 256 * (64 + 2) + 64 * (256 + 2)


def test_no_kernel_is_claimed_for_a_grid_pytorch_lacks():
    with pytest.raises(ValueError, match="no PyTorch CPU kernel"):
        baselines.WeightOnlyLinear(torch.nn.Linear(64, 64, bias=False), baselines.INT8_G64)
