"""TreeFFN against a plain per-token reference written here: walk each tree, sum the path's blocks."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from treeffn_hf import TreeFFN, TreeSpec
from treeffn_hf.modeling.tree_layer import TreeUsage

from .conftest import assert_fast_path_matches_reference
from .sparse_layer_contract import SparseLayerContract


def naive_tree_ffn(layer: TreeFFN, x: torch.Tensor) -> torch.Tensor:
    spec = layer.spec
    forced = spec.forced_branches()  # a pruned tree's closed branches; all 0 otherwise
    outputs = []
    for token in x:
        y = torch.zeros_like(token)
        for t in range(spec.num_trees):
            blocks, position = [], 0
            for level in range(spec.depth):
                heap = 2**level - 1 + position
                if spec.routing == "self":
                    score = token @ layer.node_gate[t, heap, 0]
                else:
                    score = token @ layer.router_weight[t, heap] + layer.router_bias[t, heap]
                if spec.node_width:
                    blocks.append((layer.node_gate[t, heap], layer.node_up[t, heap], layer.node_down[t, heap]))
                go_right = score.item() > 0 if not forced[t][heap] else forced[t][heap] > 0
                position = 2 * position + int(go_right)
            blocks.append(tuple(layer.leaf_block(table, t, position)
                                for table in (layer.gate_rows, layer.up_rows, layer.down_rows)))
            if spec.activation == "per_node":
                for gate, up, down in blocks:
                    y = y + (F.silu(gate @ token) * (up @ token)) @ down
            else:
                g = sum(gate @ token for gate, _, _ in blocks)
                u = sum(up @ token for _, up, _ in blocks)
                a = F.silu(g) * u
                for _, _, down in blocks:
                    y = y + a @ down
        if spec.shared_width:
            y = y + (F.silu(layer.shared_gate @ token) * (layer.shared_up @ token)) @ layer.shared_down
        outputs.append(y)
    return torch.stack(outputs)


def make_layer(spec: TreeSpec, hidden=24, intermediate=None, dtype=torch.float64) -> TreeFFN:
    if intermediate is None and spec.leaf_neurons == "selected":  # as narrow as it goes: stored rows exceed it
        distinct = spec.num_trees * (spec.num_nodes * spec.node_width + spec.num_leaves)
        intermediate = max(distinct, spec.num_trees * (spec.depth * spec.node_width + spec.leaf_width) + spec.shared_width)
    elif intermediate is None:  # exactly the width an explicit spec describes
        per_tree = spec.num_nodes * spec.node_width + spec.num_leaves * spec.leaf_width
        intermediate = spec.num_trees * per_tree + spec.shared_width
    layer = TreeFFN(hidden, intermediate, spec, torch.nn.SiLU()).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


SETTINGS = [
    TreeSpec(num_trees=trees, depth=depth, node_width=node_width, routing=routing, activation=activation,
             leaf_width=node_width if (activation == "after_sum" and node_width) else 5, shared_width=3)
    for trees, depth, node_width, routing, activation in itertools.product(
        (1, 3), (1, 3), (0, 2), ("self", "hyperplane"), ("per_node", "after_sum")
    )
    if not (routing == "self" and node_width == 0)
]


def spec_id(s: TreeSpec) -> str:
    return (f"T{s.num_trees}D{s.depth}n{s.node_width}-{s.routing}-{s.activation}" + ("-pruned" if s.is_pruned else "")
            + ("-selected" if s.leaf_neurons == "selected" else ""))


# Pruned trees (as `treeffn prune` makes them), for every routing and activation family.
_LIVE = {(1, 1): ((1,),), (3, 1): ((1,), (0,), (0, 1)), (1, 3): ((1, 2, 6),), (3, 3): ((1, 2, 6), (0,), (3, 4, 5, 7))}
SETTINGS += [dataclasses.replace(s, live_leaves=_LIVE[s.num_trees, s.depth]) for s in SETTINGS if s.node_width == 2]
# Leaves that select their neurons: the layer stores more rows than the MLP it replaces has neurons.
SETTINGS += [dataclasses.replace(s, leaf_neurons="selected") for s in SETTINGS
             if s.routing == "hyperplane" and s.activation == "per_node" and not s.is_pruned]


@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: spec_id(s))
def test_forward_and_backward_match_naive_walk(spec):
    layer = make_layer(spec)
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 7, 24, dtype=torch.float64)

    out = layer(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *layer.parameters()], allow_unused=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_tree_ffn(layer, x_ref.reshape(-1, 24)).reshape(2, 7, 24)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x_ref, *layer.parameters()], allow_unused=True)

    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_float32_and_bfloat16_track_float64():
    spec = TreeSpec(num_trees=2, depth=2, node_width=3)
    layer = make_layer(spec, intermediate=130)
    x = torch.randn(33, 24, dtype=torch.float64)
    want = layer(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        low = make_layer(spec, intermediate=130, dtype=dtype)
        low.load_state_dict(layer.state_dict())
        got = low(x.to(dtype))
        # Routing may flip for scores within rounding of zero; compare tokens routed the same way.
        same = (low.route(x.to(dtype))[0] == layer.route(x)[0]).all(dim=1)
        assert same.float().mean() > 0.8
        scale = want[same].abs().max()
        assert ((got[same].double() - want[same]).abs().max() / scale) < tol


def test_cost_counts_exact_rows():
    spec = TreeSpec(num_trees=2, depth=3, node_width=2, routing="hyperplane")
    layer = make_layer(spec, intermediate=130)
    s = layer.spec
    rows = 2 * (3 * 2 + s.leaf_width) + s.shared_width
    cost = layer.cost()
    assert cost.active_units == rows
    assert cost.unit_fraction == rows / 130
    assert cost.active_weight_bytes == 2 * (3 * rows * 24 + 2 * 3 * 25)  # bf16, as served


def test_usage_counts_match_routing():
    spec = TreeSpec(num_trees=2, depth=3, node_width=1)
    layer = make_layer(spec, intermediate=130)
    layer.usage = TreeUsage(layer.spec)
    x = torch.randn(50, 24, dtype=torch.float64)
    layer(x)
    # Count the same quantities by walking every token by hand.
    leaves = torch.zeros(2, 8, dtype=torch.long)
    visits = torch.zeros(2, 7, dtype=torch.long)
    rights = torch.zeros(2, 7, dtype=torch.long)
    for token in x:
        for t in range(2):
            position = 0
            for level in range(3):
                heap = 2**level - 1 + position
                right = bool(token @ layer.node_gate[t, heap, 0] > 0)
                visits[t, heap] += 1
                rights[t, heap] += right
                position = 2 * position + right
            leaves[t, position] += 1
    assert torch.equal(layer.usage.leaf_counts, leaves)
    assert torch.equal(layer.usage.node_visits, visits)
    assert torch.equal(layer.usage.node_right, rights)


@pytest.mark.parametrize("depth", [1, 2, 5, 6])
def test_routing_from_all_scores_equals_level_by_level_walk(depth):
    from treeffn_hf.modeling.tree_layer import tree_route
    from treeffn_hf.modeling.tree_torch import route_from_scores

    vectors, bias = torch.randn(3, 2**depth - 1, 16), torch.randn(3, 2**depth - 1)
    x = torch.randn(200, 16)
    leaf, path = tree_route(x, vectors, bias, depth)
    fast_leaf, fast_path = route_from_scores(torch.einsum("nd,tjd->ntj", x, vectors) + bias, depth)
    assert torch.equal(fast_leaf, leaf) and torch.equal(fast_path, path)


def test_auto_dispatch_trains_on_the_reference_path_and_infers_on_the_fast_one():
    layer = make_layer(TreeSpec(depth=2, node_width=1, leaf_width=5, shared_width=3))
    x = torch.randn(4, 24, dtype=torch.float64)
    layer(x)
    assert layer.last_path == "reference"
    with torch.no_grad():
        layer(x)
    assert layer.last_path == "torch"


@pytest.mark.parametrize("spec", [s for s in SETTINGS if s.activation == "per_node"],
                         ids=lambda s: spec_id(s))
def test_one_token_with_leaves_read_in_place_equals_reference(spec):
    layer = make_layer(spec)
    layer.kernel_policy = layer.kernel_policy.replace(tree_in_place_leaf_elems=0)  # the big-leaf branch, small shapes
    assert_fast_path_matches_reference(layer, torch.randn(1, 24, dtype=torch.float64))


@pytest.mark.parametrize("tokens", [2, 7])
@pytest.mark.parametrize("spec", SETTINGS, ids=lambda s: spec_id(s))
def test_every_batched_strategy_equals_reference(spec, tokens):
    """Both batch strategies, whichever the dispatcher would pick for this shape."""
    from treeffn_hf.modeling import tree_torch

    layer = make_layer(spec)
    x = torch.randn(tokens, 24, dtype=torch.float64)
    want = assert_fast_path_matches_reference(layer, x)
    with torch.no_grad():
        leaf, path = layer.route(x)
        for strategy in (tree_torch._per_token_gather(layer, x, leaf),
                         tree_torch._grouped_by_leaf(layer, x, leaf, path)):
            torch.testing.assert_close(strategy, want, rtol=1e-10, atol=1e-10)


def test_batch_dispatch_weighs_gathered_rows_against_visited_leaves():
    """Per-token gathers while their copies cost less than reading each visited leaf in place
    plus the per-leaf overhead (KernelPolicy.tree_cpu_*); tokens sharing one leaf group."""
    from treeffn_hf.modeling import tree_torch

    layer = make_layer(TreeSpec(num_trees=2, depth=2, node_width=1, leaf_width=10, shared_width=3))
    shared_leaf = torch.zeros(16, 2, dtype=torch.long)
    spread = torch.arange(16).remainder(4)[:, None].expand(16, 2)
    policy = layer.kernel_policy
    layer.kernel_policy = policy.replace(tree_cpu_leaf_overhead_elems=0)
    # 2.5 x 16 tokens x 2 trees x 11 rows gathered against 2 leaves x 10 rows + 6 node rows
    assert not tree_torch.gathers_per_token(layer, shared_leaf)
    layer.kernel_policy = policy.replace(tree_cpu_leaf_overhead_elems=0, tree_cpu_gather_row_cost=0.05)
    assert tree_torch.gathers_per_token(layer, shared_leaf)
    # the per-leaf overhead: grouping 8 visited leaves costs more than gathering, 2 less
    layer.kernel_policy = policy.replace(tree_cpu_leaf_overhead_elems=5000)
    assert tree_torch.gathers_per_token(layer, spread) and not tree_torch.gathers_per_token(layer, shared_leaf)


@pytest.mark.parametrize("spec", [s for s in SETTINGS if s.activation == "per_node"], ids=lambda s: spec_id(s))
def test_block_computation_equals_masked_dense_forward_and_backward(spec):
    """What selected-leaf trees train on: only the path's blocks, with the masked form's gradients
    (straight-through routing scale included)."""
    from treeffn_hf.modeling.tree_layer import tree_ffn_blocks, tree_ffn_masked_dense

    layer = make_layer(spec)
    x = torch.randn(23, 24, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(23, 24, dtype=torch.float64)
    leaf, path = layer.route(x)
    results = []
    for compute in (tree_ffn_blocks, tree_ffn_masked_dense):
        scale = layer.path_probability(x, leaf, path)
        out = compute(layer, x, leaf, path, scale / scale.detach() * 1.5)
        results.append((out, torch.autograd.grad((out * upstream).sum(), [x, *layer.parameters()])))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", [s for s in SETTINGS if s.activation == "per_node"][::3], ids=lambda s: spec_id(s))
def test_block_computation_under_bf16_autocast_matches_the_masked_reference(spec):
    """Training runs under bf16 autocast: the grouped blocks keep the masked form's numerics (bf16
    GEMMs, float32 weights and gradients) to bf16's precision, and leave unreached rows' gradients at zero."""
    from treeffn_hf.modeling.tree_layer import tree_ffn_blocks, tree_ffn_masked_dense

    layer = make_layer(spec, dtype=torch.float32)
    x = torch.randn(37, 24, requires_grad=True)
    upstream = torch.randn(37, 24)
    leaf, path = layer.route(x)
    results = []
    for compute in (tree_ffn_blocks, tree_ffn_masked_dense):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compute(layer, x, leaf, path)
        grads = torch.autograd.grad((out.float() * upstream).sum(), [x, layer.gate_rows, layer.up_rows,
                                                                       layer.down_rows])
        results.append((out, grads))
    (got, got_grads), (want, want_grads) = results
    assert got.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got_grads[1:])

    def relative_error(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm())

    # bf16 keeps 8 bits: the two sum their rounded products in different orders
    assert relative_error(got, want) < 0.01
    for g, w in zip(got_grads, want_grads):
        assert relative_error(g, w) < 0.02
    for g, w in zip(got_grads[1:], want_grads[1:]):
        assert torch.equal(g == 0, w == 0)  # the same rows untouched


def test_block_computation_trains_the_input_alone_when_the_tables_are_frozen():
    from treeffn_hf.modeling.tree_layer import tree_ffn_blocks, tree_ffn_masked_dense

    layer = make_layer(dataclasses.replace(SETTINGS[0], routing="hyperplane", leaf_neurons="selected"))
    layer.requires_grad_(False)
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    leaf, path = layer.route(x)
    got, want = (torch.autograd.grad(compute(layer, x, leaf, path).square().sum(), x)[0]
                 for compute in (tree_ffn_blocks, tree_ffn_masked_dense))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_selected_leaves_train_on_their_blocks_and_partitions_on_the_masked_rows():
    selected = make_layer(dataclasses.replace(SETTINGS[0], routing="hyperplane", leaf_neurons="selected"))
    assert selected.computes_blocks_in_training
    assert not make_layer(SETTINGS[0]).computes_blocks_in_training
    selected.masked_training = True  # the reference, on request
    assert not selected.computes_blocks_in_training


class TestTreeContract(SparseLayerContract):
    """The shared contract over every tree setting: a token reads its path's node and leaf rows, the
    shared rows, and with self routing every node's first gate row (its routing vector)."""

    SPECS = SETTINGS

    def spec_id(self, spec) -> str:
        return spec_id(spec)

    def make_layer(self, spec, dtype=torch.float64):
        return make_layer(spec, dtype=dtype)

    def claimed_rows(self, layer, x):
        spec = layer.spec
        leaf, path = layer.route(x)
        rows = torch.zeros(layer.gate_rows.shape[0], dtype=torch.bool)
        slots = layer.slot_table(x.device)[torch.arange(spec.num_trees), leaf]  # (N, T) stored leaf blocks
        for slot in slots.flatten().tolist():
            start = layer.node_rows + slot * spec.leaf_width
            rows[start:start + spec.leaf_width] = True
        for (_, tree, _), heap in zip(itertools.product(*map(range, path.shape)), path.flatten().tolist()):
            start = (tree * spec.num_nodes + heap) * spec.node_width
            rows[start:start + spec.node_width] = True
        if spec.routing == "self":  # every node's score is computed from its first gate row
            rows[: layer.node_rows : spec.node_width] = True
        rows[layer.node_rows + layer.leaf_rows:] = True  # the shared neurons
        return [(layer.gate_rows, rows, 0), (layer.up_rows, rows, 0), (layer.down_rows, rows, 0)]
