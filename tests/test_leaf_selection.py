"""Trees whose leaves select their own neurons (`leaf_neurons='selected'`): spec, conversion and fit."""

import dataclasses

import pytest
import torch
from torch import nn

import treeffn_hf
from treeffn_hf import TreeSpec
from treeffn_hf.conversion.fitting import batched
from treeffn_hf.conversion.leaf_selection import SelectedLeafFit, bisect_tokens, fit_selected_leaves
from treeffn_hf.conversion.routing_fit import captured_mass, fit_routing
from treeffn_hf.conversion.surgery import sparse_mlp_state
from treeffn_hf.modeling.layer_spec import InvalidSpecError
from treeffn_hf.modeling.tree_layer import TreeFFN

from .conftest import tiny_dense_model

HIDDEN, CLUSTERS, SPAN = 32, 8, 16
INTER = 64  # neuron i serves clusters i // 8 and i // 8 - 1: each cluster needs 16, shared with its neighbours


class DenseMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.down_proj = nn.Linear(gate.shape[0], gate.shape[1], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate)
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down.T)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def overlapping_clusters(seed: int = 0) -> tuple[DenseMLP, torch.Tensor]:
    """A dense MLP whose token clusters each need 16 neurons, every neuron needed by two
    neighbouring clusters: no partition into leaves serves them, selected leaves can."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(CLUSTERS, HIDDEN, generator=g), dim=1)
    first = torch.arange(INTER) // (INTER // CLUSTERS)
    second = (first - 1) % CLUSTERS
    direction = centres[first] + centres[second]
    gate = 3 * direction + 0.1 * torch.randn(INTER, HIDDEN, generator=g)
    up = 3 * direction + 0.1 * torch.randn(INTER, HIDDEN, generator=g)
    down = torch.randn(INTER, HIDDEN, generator=g)
    tokens = centres[torch.randint(0, CLUSTERS, (4000,), generator=g)] + 0.1 * torch.randn(4000, HIDDEN, generator=g)
    return DenseMLP(gate, up, down), tokens


def converted(spec: TreeSpec, dense: DenseMLP) -> TreeFFN:
    layer = TreeFFN(HIDDEN, INTER, spec, nn.SiLU())
    state = sparse_mlp_state(layer.spec, dense.gate_proj, dense.up_proj, dense.down_proj)
    layer.load_state_dict(state)
    return layer


def relative_error(layer: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    want = batched(dense, x)
    return float((batched(layer, x) - want).pow(2).sum() / want.pow(2).sum())


SELECTED = TreeSpec(depth=3, node_width=0, routing="hyperplane", leaf_neurons="selected", leaf_width=SPAN,
                    shared_width=0)


def test_spec_stores_more_rows_than_the_mlp_has_neurons():
    spec = SELECTED.resolve(HIDDEN, INTER)
    assert spec.active_units == SPAN and spec.stored_units == 8 * SPAN == 2 * INTER
    assert TreeFFN(HIDDEN, INTER, spec, nn.SiLU()).stored_multiple == 2.0
    default = dataclasses.replace(SELECTED, leaf_width=None, shared_width=None).resolve(HIDDEN, INTER)
    assert default.shared_width == 0 and default.stored_units == INTER  # the partition's leaf: stored once


@pytest.mark.parametrize("fields,message", [
    ({"leaf_width": INTER - 2, "shared_width": 3}, "more than the MLP's"),
    ({"routing": "self", "node_width": 1}, "routing='hyperplane'"),
    ({"activation": "after_sum", "node_width": 2, "leaf_width": 2}, "activation='per_node'"),
    ({"depth": 7}, "needs 128 neurons at least"),
    ({"leaf_neurons": "copies"}, "leaf_neurons must be one of"),
])
def test_impossible_selected_specs_are_refused(fields, message):
    with pytest.raises(InvalidSpecError, match=message):
        dataclasses.replace(SELECTED, **fields).resolve(HIDDEN, INTER)


def test_data_free_start_copies_dense_rows_and_covers_every_neuron():
    dense, _ = overlapping_clusters()
    layer = converted(SELECTED, dense)
    dense_rows = {tuple(row.tolist()) for row in dense.gate_proj.weight}
    stored = [tuple(row.tolist()) for row in layer.gate_rows]
    assert len(stored) == 2 * INTER and set(stored) == dense_rows  # copies of every neuron, each twice


def test_bisection_routers_split_each_node_by_two_means():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 4, generator=g) - 5, torch.randn(100, 4, generator=g) + 5])
    weight, bias = bisect_tokens(x, 1, g)
    side = x @ weight[0] + bias[0] > 0
    assert side[:100].all() != side[100:].all() and side[:100].unique().numel() == 1


def test_fit_beats_a_partition_at_equal_units_where_clusters_share_neurons():
    dense, tokens = overlapping_clusters()
    fit_tokens, unseen = tokens[:3000], tokens[3000:]
    selected = converted(SELECTED, dense)
    report = fit_selected_leaves(selected, dense, fit_tokens)
    # A partition tree computing as many neurons per token: 4 leaves of 16.
    partition = converted(TreeSpec(depth=2, node_width=0, routing="hyperplane", leaf_width=SPAN, shared_width=0), dense)
    fit_routing(partition, fit_tokens)
    assert report.captured_mass_after > captured_mass(partition, unseen)
    assert relative_error(selected, dense, unseen) < 0.25 * relative_error(partition, dense, unseen)
    # Every stored row is a dense neuron's: gate and up rows are copied, not fitted.
    dense_rows = {tuple(row.tolist()) for row in dense.gate_proj.weight}
    assert all(tuple(row.tolist()) in dense_rows for row in selected.gate_rows)


def test_down_rows_refit_lowers_the_error_of_the_selected_neurons():
    dense, tokens = overlapping_clusters(seed=1)
    spec = dataclasses.replace(SELECTED, leaf_width=SPAN // 2)  # half of what a cluster needs: the refit must help
    selected = converted(spec, dense)
    fit_selected_leaves(selected, dense, tokens[:3000])
    copied = converted(spec, dense)
    with torch.no_grad():  # the same neurons and routers with the dense down rows
        for name in ("gate_rows", "up_rows", "router_weight", "router_bias"):
            getattr(copied, name).copy_(getattr(selected, name))
        rows = {tuple(row.tolist()): index for index, row in enumerate(dense.gate_proj.weight)}
        neuron = torch.tensor([rows[tuple(row.tolist())] for row in selected.gate_rows])
        copied.down_rows.copy_(dense.down_proj.weight.T[neuron])
    assert relative_error(selected, dense, tokens[3000:]) < 0.9 * relative_error(copied, dense, tokens[3000:])


def test_one_prepared_fit_serves_every_width_as_a_fresh_fit_does():
    dense, tokens = overlapping_clusters(seed=2)
    prepared = SelectedLeafFit(dense, tokens[:3000], SELECTED, seed=5)
    for width in (SPAN, SPAN // 2, 3):
        spec = dataclasses.replace(SELECTED, leaf_width=width)
        reused, fresh = converted(spec, dense), converted(spec, dense)
        assert prepared.fit(reused) == fit_selected_leaves(fresh, dense, tokens[:3000], seed=5)
        for (name, a), b in zip(reused.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="prepared for"):
        prepared.fit(converted(dataclasses.replace(SELECTED, depth=1, leaf_width=SPAN), dense))


def test_partition_fit_refuses_selected_leaves():
    dense, tokens = overlapping_clusters()
    with pytest.raises(ValueError, match="fit_selected_leaves"):
        fit_routing(converted(SELECTED, dense), tokens)


def test_selected_tree_model_saves_and_reloads(tmp_path):
    dense = tiny_dense_model("llama")
    spec = TreeSpec(depth=3, node_width=1, routing="hyperplane", leaf_neurons="selected", leaf_width=30, shared_width=4)
    sparse = treeffn_hf.convert(dense, spec, progress=False)
    mlp = next(m for _, m in sparse.sparse_mlps())
    assert mlp.stored_multiple > 1
    treeffn_hf.save(sparse, tmp_path / "tree")
    reloaded = treeffn_hf.load(tmp_path / "tree")
    ids = torch.randint(0, dense.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, sparse(ids).logits)
    assert reloaded.config.sparse_spec.leaf_neurons == "selected"
