"""The routing fit re-lays a tree layer so tokens reach the neurons that carry their activation mass."""

import pytest
import torch
from torch import nn

from treeffn_hf import TreeSpec
from treeffn_hf.conversion.routing_fit import captured_mass, fit_router, fit_routing, neuron_mass
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
@pytest.mark.parametrize("router_fit", ["ridge", "logistic"])
def test_fit_raises_captured_mass_on_unseen_tokens(spec, router_fit):
    if router_fit == "logistic" and spec.routing == "self":
        pytest.skip("self routing fits no router")
    layer, tokens = planted_layer(spec)
    fit_tokens, unseen = tokens[:3000], tokens[3000:]
    before = captured_mass(layer, unseen)
    report = fit_routing(layer, fit_tokens, router_fit=router_fit)
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


@pytest.mark.parametrize("spec", [TreeSpec(num_trees=2, depth=2, node_width=2, routing="self"),
                                  TreeSpec(depth=3, node_width=0, routing="hyperplane")], ids=["two-trees-self", "fff"])
def test_captured_mass_is_the_mass_of_the_neurons_each_token_computes_and_the_oracle_bounds_it(spec):
    layer, tokens = planted_layer(spec)
    tokens = tokens[:300]
    spec = layer.spec
    mass, _ = neuron_mass(layer, tokens)
    # Brute force: each token's computed rows are those its path visits; forcing a route gives a path.
    leaf, path = layer.route(tokens)
    rows = torch.arange(spec.num_trees * spec.num_nodes * spec.node_width,
                        dtype=torch.long).view(spec.num_trees, spec.num_nodes, spec.node_width)

    def path_rows(tree, node_path, leaf_index):
        picked = [rows[tree, node].tolist() for node in node_path] if spec.node_width else []
        start = layer.node_rows + (tree * spec.num_leaves + leaf_index) * spec.leaf_width
        return [r for block in picked for r in block] + list(range(start, start + spec.leaf_width))
    shared = list(range(layer.node_rows + layer.leaf_rows, mass.shape[1]))
    routed = best = 0.0
    for t in range(tokens.shape[0]):
        for tree in range(spec.num_trees):
            routed += float(mass[t, path_rows(tree, path[t, tree].tolist(), int(leaf[t, tree]))].sum())
            options = []
            for candidate in range(spec.num_leaves):
                nodes = [((candidate >> (spec.depth - level)) + (1 << level) - 1) for level in range(spec.depth)]
                options.append(float(mass[t, path_rows(tree, nodes, candidate)].sum()))
            best += max(options)
        routed += float(mass[t, shared].sum())
        best += float(mass[t, shared].sum())
    total = float(mass.sum())
    assert captured_mass(layer, tokens) == pytest.approx(routed / total, rel=1e-5)
    assert captured_mass(layer, tokens, oracle=True) == pytest.approx(best / total, rel=1e-5)
    assert best >= routed


def test_captured_mass_is_one_when_everything_is_shared():
    layer, tokens = planted_layer(TreeSpec(depth=1, node_width=0, routing="hyperplane", shared_width=CLUSTERS * PER_CLUSTER - 2,
                                           leaf_width=1))
    full = captured_mass(layer, tokens)
    assert 0.9 < full <= 1.0


def test_logistic_routers_beat_ridge_routers_where_far_tokens_pull_the_least_squares_boundary():
    """A known split at x0 = 0: tokens at x0 = -1 go left, tokens at x0 = +1 and x0 = +30 go right.
    Least squares fits +1 to the far cluster too and moves its boundary into the near right
    cluster; the logistic fit keeps the split."""
    g = torch.Generator().manual_seed(0)
    near_left = torch.randn(400, 2, generator=g) * 0.4 + torch.tensor([-1.0, 0.0])
    near_right = torch.randn(400, 2, generator=g) * 0.4 + torch.tensor([1.0, 0.0])
    far_right = torch.randn(1200, 2, generator=g) * 0.4 + torch.tensor([30.0, 0.0])
    x = torch.cat([near_left, near_right, far_right])
    right = torch.cat([torch.zeros(400), torch.ones(1600)]).bool()
    accuracy = {}
    for router_fit in ("ridge", "logistic"):
        w, b = fit_router(x, right, torch.ones(2000), router_fit)
        accuracy[router_fit] = float((((x @ w + b) > 0) == right)[:800].float().mean())
    assert accuracy["logistic"] > 0.97 and accuracy["ridge"] < 0.9, accuracy


def test_an_unknown_router_fit_is_refused():
    layer, tokens = planted_layer(TreeSpec(depth=2, node_width=0, routing="hyperplane"))
    with pytest.raises(ValueError, match="router_fit must be one of"):
        fit_routing(layer, tokens, router_fit="svm")


def test_shared_neurons_are_those_with_the_most_calibration_mass():
    from treeffn_hf.conversion.routing_fit import neuron_mass

    spec = TreeSpec(depth=2, node_width=1, leaf_width=16, shared_width=29)  # 3 + 4 x 16 + 29 = 96 neurons
    layer, tokens = planted_layer(spec)
    fit_tokens = tokens[torch.randperm(4000, generator=torch.Generator().manual_seed(0))[400:]]  # fit_routing's split
    mass, _ = neuron_mass(layer, fit_tokens)
    shared = layer.spec.shared_width
    expected = layer.gate_rows.detach()[mass.mean(0).argsort(descending=True)[:shared]]
    fit_routing(layer, tokens)
    got = layer.gate_rows.detach()[-shared:]
    assert shared == 29
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))


def test_leaves_are_balanced_co_activation_clusters():
    """8 planted groups of 12 neurons that fire together, 8 leaves of 12: every leaf is filled to
    exactly its width and holds (nearly) one group, so the grouping follows co-activation."""
    spec = TreeSpec(depth=3, node_width=0, routing="hyperplane", leaf_width=PER_CLUSTER, shared_width=0)
    layer, tokens = planted_layer(spec)
    centres = torch.nn.functional.normalize(torch.randn(CLUSTERS, HIDDEN, generator=torch.Generator().manual_seed(0)), dim=1)
    fit_routing(layer, tokens)
    owner = (layer.gate_rows.detach() @ centres.T).argmax(1)
    leaves = owner[: spec.num_leaves * spec.leaf_width].reshape(spec.num_leaves, spec.leaf_width)
    assert torch.bincount(owner, minlength=CLUSTERS).tolist() == [PER_CLUSTER] * CLUSTERS  # owners recovered
    majority = torch.stack([torch.bincount(leaf, minlength=CLUSTERS).max() for leaf in leaves])
    assert float(majority.sum()) / owner.numel() > 0.9, leaves
    assert len({int(torch.bincount(leaf, minlength=CLUSTERS).argmax()) for leaf in leaves}) == CLUSTERS
