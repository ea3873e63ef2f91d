"""Tree statistics: usage counts, dead paths, entropy and the input common mode."""

from __future__ import annotations

import math

import torch

from tests.conftest import tiny_dense_model
from treeffn_hf import TreeSpec, convert
from treeffn_hf.tree_stats import _InputMoments, collect_tree_stats, summary


def test_input_moments_match_the_direct_formula_over_several_batches():
    x = torch.randn(300, 8) * torch.linspace(0.5, 2.0, 8) + torch.tensor([3.0] + [0.0] * 7)
    moments = _InputMoments()
    for chunk in x.split(70):
        moments(None, (chunk[None],))  # hooks see (batch, seq, hidden)
    centred = x.double() - x.double().mean(0)
    want = x.double().mean(0).norm() / centred.pow(2).sum(1).mean().sqrt()
    assert math.isclose(moments.common_mode(), float(want), rel_tol=1e-9)


def test_collect_tree_stats_counts_every_token_and_measures_the_input_common_mode():
    sparse = convert(tiny_dense_model("llama"), TreeSpec(depth=3, node_width=1), progress=False)
    windows = torch.randint(3, 90, (3, 17))
    stats = collect_tree_stats(sparse, windows, progress=False)
    assert len(stats) == sparse.config.num_hidden_layers
    for layer in stats:
        assert layer.tokens == windows.numel()
        assert sum(layer.leaf_counts[0]) == windows.numel()
        assert layer.dead_paths == sum(c == 0 for c in layer.leaf_counts[0])
        assert 0.0 <= layer.routing_entropy <= 1.0
        assert 0.0 < layer.input_common_mode < math.inf
    assert summary(stats)["mean_input_common_mode"] == sum(s.input_common_mode for s in stats) / len(stats)
    # The hooks are gone afterwards: a second collection sees only its own tokens.
    again = collect_tree_stats(sparse, windows[:1], progress=False)
    assert again[0].tokens == windows.shape[1]


def test_a_dominant_shared_input_direction_shows_as_a_large_common_mode():
    sparse = convert(tiny_dense_model("llama"), TreeSpec(depth=3, node_width=1), progress=False)
    windows = torch.randint(3, 90, (2, 17))
    base = collect_tree_stats(sparse, windows, progress=False)[0]
    mlp = next(m for _, m in sparse.sparse_mlps())
    shift = torch.zeros(sparse.config.hidden_size)
    shift[0] = 1e3
    handle = mlp.register_forward_pre_hook(lambda module, args: (args[0] + shift,))
    try:
        shifted = collect_tree_stats(sparse, windows, progress=False)[0]
    finally:
        handle.remove()
    assert shifted.input_common_mode > 10 * base.input_common_mode
    # Every node now sends every token the same way: one live path is left.
    assert base.dead_paths < shifted.dead_paths == shifted.num_paths - 1
