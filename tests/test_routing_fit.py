"""The routing fit re-lays a tree layer so tokens reach the neurons that carry their activation mass."""

import pytest
import torch
from torch import nn

from treeffn_hf import TreeSpec
from treeffn_hf.conversion.routing_fit import captured_mass, fit_routing
from treeffn_hf.modeling.tree_layer import TreeFFN

HIDDEN, CLUSTERS, PER_CLUSTER = 32, 8, 12


def planted_layer(spec: TreeSpec, seed: int = 0) -> tuple[TreeFFN, torch.Tensor]:
    """A layer whose neurons each fire for one of 8 token clusters, rows shuffled at random, and
    tokens drawn from those clusters. A good fit puts a cluster's neurons on its tokens' path."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(CLUSTERS, HIDDEN, generator=g), dim=1) * 4
    owner = torch.arange(CLUSTERS).repeat_interleave(PER_CLUSTER)
    inter = CLUSTERS * PER_CLUSTER
    gate = centres[owner] + 0.3 * torch.randn(inter, HIDDEN, generator=g)
    up = centres[owner] + 0.3 * torch.randn(inter, HIDDEN, generator=g)
    down = torch.randn(inter, HIDDEN, generator=g)
    layer = TreeFFN(HIDDEN, inter, spec, nn.SiLU())
    shuffle = torch.randperm(inter, generator=g)
    with torch.no_grad():
        layer.gate_rows.copy_(gate[shuffle])
        layer.up_rows.copy_(up[shuffle])
        layer.down_rows.copy_(down[shuffle])
        if layer.router_weight is not None:
            layer.router_weight.normal_(generator=g)
            layer.router_bias.zero_()
    tokens = centres[torch.randint(0, CLUSTERS, (4000,), generator=g)] / 4 + 0.2 * torch.randn(4000, HIDDEN, generator=g)
    return layer, tokens


@pytest.mark.parametrize("spec", [
    TreeSpec(depth=3, node_width=1, routing="self"),
    TreeSpec(depth=3, node_width=1, routing="hyperplane"),
    TreeSpec(depth=3, node_width=0, routing="hyperplane"),
    TreeSpec(num_trees=2, depth=2, node_width=1, routing="hyperplane"),
    TreeSpec(num_trees=2, depth=2, node_width=2, routing="self"),
], ids=["self", "hyperplane", "fff", "two-trees-hyperplane", "two-trees-self"])
def test_fit_raises_captured_mass_on_unseen_tokens(spec):
    layer, tokens = planted_layer(spec)
    fit_tokens, unseen = tokens[:3000], tokens[3000:]
    before = captured_mass(layer, unseen)
    report = fit_routing(layer, fit_tokens)
    after = captured_mass(layer, unseen)
    assert report.captured_mass_after > report.captured_mass_before
    assert after > before + 0.1, (before, after)


def test_fit_only_permutes_neurons():
    layer, tokens = planted_layer(TreeSpec(depth=3, node_width=1))
    tables = [t.detach().clone() for t in (layer.gate_rows, layer.up_rows, layer.down_rows)]
    fit_routing(layer, tokens)
    stacked_before = torch.cat(tables, dim=1)
    stacked_after = torch.cat([layer.gate_rows, layer.up_rows, layer.down_rows], dim=1).detach()
    # Same neurons (whole rows move together), each exactly once.
    assert torch.equal(stacked_after[torch.argsort(stacked_after[:, 0])], stacked_before[torch.argsort(stacked_before[:, 0])])


def test_captured_mass_is_one_when_everything_is_shared():
    layer, tokens = planted_layer(TreeSpec(depth=1, node_width=0, routing="hyperplane", shared_width=CLUSTERS * PER_CLUSTER - 2,
                                           leaf_width=1))
    full = captured_mass(layer, tokens)
    assert 0.9 < full <= 1.0
