import pytest

from treeffn_hf import InvalidSpecError, MGSSpec, TreeSpec, spec_from_dict


def test_auto_leaf_width_fills_the_mlp_exactly():
    spec = TreeSpec(num_trees=2, depth=3, node_width=2).resolve(48, 166)
    per_tree = spec.num_nodes * spec.node_width + spec.num_leaves * spec.leaf_width
    assert spec.num_trees * per_tree + spec.shared_width == 166
    assert spec.leaf_width == (166 - 2 * 7 * 2) // 16
    assert 0 <= spec.shared_width < 2 * 16


def test_smollm2_shape_under_five_percent():
    spec = TreeSpec(depth=6, node_width=2).resolve(576, 1536)
    assert spec.active_units / 1536 < 0.05


def test_explicit_widths_that_do_not_divide_are_rejected():
    with pytest.raises(InvalidSpecError, match="do not divide"):
        TreeSpec(depth=2, node_width=1, leaf_width=10, shared_width=0).resolve(48, 166)


def test_depth_too_large_for_the_mlp():
    with pytest.raises(InvalidSpecError, match="needs .* neurons at least"):
        TreeSpec(depth=9, node_width=1).resolve(48, 166)


def test_self_routing_needs_node_neurons():
    with pytest.raises(InvalidSpecError, match="routing='self'.*node_width >= 1"):
        TreeSpec(depth=3, node_width=0, routing="self").resolve(48, 166)


def test_after_sum_needs_equal_block_widths():
    with pytest.raises(InvalidSpecError, match="leaf_width == node_width"):
        TreeSpec(depth=2, node_width=4, leaf_width=8, activation="after_sum").resolve(48, 166)
    spec = TreeSpec(depth=2, node_width=20, activation="after_sum").resolve(48, 166)
    assert spec.leaf_width == 20 and spec.shared_width == 166 - 7 * 20


def test_after_sum_refuses_to_leave_most_neurons_always_on():
    with pytest.raises(InvalidSpecError, match="node_width=12 with activation='after_sum'"):
        TreeSpec(depth=6, node_width=2, activation="after_sum").resolve(576, 1536)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(routing="learned"), "routing must be"),
        (dict(activation="relu"), "activation must be"),
        (dict(num_trees=0), "num_trees"),
        (dict(depth=0), "depth must be"),
    ],
)
def test_bad_tree_settings(kwargs, message):
    with pytest.raises(InvalidSpecError, match=message):
        TreeSpec(**kwargs).resolve(48, 166)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(rank=0), "rank"),
     (dict(predictor="linear", rank=1000), "rank"), (dict(selection="random"), "selection"),
     (dict(predictor="oracle"), "predictor"), (dict(group_size=1), "group_size")],
)
def test_bad_mgs_settings(kwargs, message):
    with pytest.raises(InvalidSpecError, match=message):
        MGSSpec(**kwargs).resolve(48, 166)


def test_top_k_rounds_up_and_is_exact_for_round_fractions():
    assert MGSSpec(density=0.1).top_k(1000) == 100
    assert MGSSpec(density=0.25).top_k(166) == 42
    assert MGSSpec(density=1e-9).top_k(166) == 1


def test_spec_dict_round_trip_and_unknown_keys():
    spec = TreeSpec(depth=3, node_width=2, routing="hyperplane").resolve(48, 166)
    assert spec_from_dict(spec.to_dict()) == spec
    assert spec_from_dict(MGSSpec(density=0.5, predictor="linear", rank=None).to_dict()) == MGSSpec(density=0.5, predictor="linear", rank=None)
    with pytest.raises(InvalidSpecError, match="unknown tree option"):
        spec_from_dict({"method": "tree", "depht": 3})
    with pytest.raises(InvalidSpecError, match="unknown sparse method"):
        spec_from_dict({"method": "moe"})
