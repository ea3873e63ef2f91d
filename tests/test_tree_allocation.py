"""Per-layer leaf widths of selected-leaf trees, shared out on calibration KL (conversion/tree_allocation.py)."""

import pytest
import torch

import treeffn_hf
from treeffn_hf import TreeSpec
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
from treeffn_hf.conversion.tree_allocation import (
    ALLOCATION_FRACTIONS,
    allocate_tree_specs,
    allocation_fractions,
    naive_tree_layer_sensitivities,
    tree_layer_sensitivities,
    with_active_fraction,
)
from treeffn_hf.modeling.layer_spec import InvalidSpecError

from .conftest import DATA_DIR, char_tokenizer, tiny_dense_model

SPEC = TreeSpec(depth=2, node_width=0, routing="hyperplane", leaf_neurons="selected", leaf_width=8, shared_width=0)
FRACTIONS = (0.75, 0.5, 0.25, 0.125)
INTERMEDIATE = 166


def text_windows(start: int, count: int, window: int = 64) -> torch.Tensor:
    return token_windows(read_texts(DATA_DIR / "wikitext-2" / "valid.txt"), char_tokenizer(), window, start + count)[start:]


def test_active_fraction_sets_the_leaf_width_and_counts_the_path():
    assert with_active_fraction(SPEC, 0.25, INTERMEDIATE).leaf_width == 41  # floor(41.5)
    two_trees = TreeSpec(num_trees=2, depth=2, node_width=3, routing="hyperplane", leaf_neurons="selected",
                         shared_width=5)
    shaped = with_active_fraction(two_trees, 0.25, INTERMEDIATE).resolve(48, INTERMEDIATE)
    assert shaped.active_units <= 41 and shaped.active_units >= 41 - 1  # (41 - 5 - 12) // 2 = 12 a leaf
    with pytest.raises(InvalidSpecError, match="no leaf neuron"):
        with_active_fraction(two_trees, 0.05, INTERMEDIATE)


def test_the_grid_reaches_below_a_low_target():
    assert allocation_fractions(0.25) == ALLOCATION_FRACTIONS
    low = allocation_fractions(0.05)
    assert low[:-1] == ALLOCATION_FRACTIONS and low[-1] == pytest.approx(0.025)


def test_the_sensitive_layer_gets_the_widest_leaves_within_the_budget(tmp_path):
    dense = tiny_dense_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # layer 1's MLP dominates the residual stream: a tree there costs the most
        dense.model.layers[1].mlp.down_proj.weight.mul_(8.0)
    captured = capture_mlp_inputs(dense, text_windows(0, 8), progress=False)
    sensitivities = tree_layer_sensitivities(dense, SPEC, captured.inputs, text_windows(20, 2), fractions=FRACTIONS,
                                             progress=False)
    assert sensitivities.shape == (3, len(FRACTIONS)) and (sensitivities >= 0).all()
    assert sensitivities[1, -1] > sensitivities[0, -1] and sensitivities[1, -1] > sensitivities[2, -1]
    for layer in dense.model.layers:  # every dense MLP is back in place
        assert type(layer.mlp).__name__ == "LlamaMLP"

    specs = allocate_tree_specs(SPEC, sensitivities, 0.25, INTERMEDIATE, fractions=FRACTIONS)
    active = [s.resolve(48, INTERMEDIATE).active_units for s in specs]
    assert sum(active) <= 0.25 * INTERMEDIATE * 3 and sum(active) >= 0.25 * INTERMEDIATE * 3 - 3
    assert active[1] == max(active) and active[1] > min(active)

    sparse = treeffn_hf.convert(dense, specs, progress=False)
    assert [m.spec.leaf_width for _, m in sparse.sparse_mlps()] == [s.leaf_width for s in specs]
    sparse.save_pretrained(tmp_path)
    reloaded = treeffn_hf.load(tmp_path)
    ids = text_windows(30, 1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, sparse(ids).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@torch.no_grad()
def test_sensitivities_replaying_the_earlier_layers_match_full_forwards(model_type):
    # a trial runs only the layers from its own on, fed the dense hidden states recorded before it
    dense = tiny_dense_model(model_type, num_hidden_layers=3)
    captured = capture_mlp_inputs(dense, text_windows(0, 4), progress=False)
    ids = text_windows(20, 2)
    fast = tree_layer_sensitivities(dense, SPEC, captured.inputs, ids, fractions=FRACTIONS[:2], progress=False)
    torch.testing.assert_close(fast, naive_tree_layer_sensitivities(dense, SPEC, captured.inputs, ids, FRACTIONS[:2]))
    some = tree_layer_sensitivities(dense, SPEC, captured.inputs, ids, fractions=FRACTIONS[:2], progress=False, rows=[2])
    torch.testing.assert_close(some[2], fast[2])
    assert (some[:2] == 0).all()
    assert (fast > 0).all()
    assert [type(layer).__name__ for layer in dense.model.layers] == [type(dense.model.layers[0]).__name__] * 3


def test_allocation_needs_selected_leaves():
    dense = tiny_dense_model("llama")
    partition = TreeSpec(depth=2, node_width=1)
    with pytest.raises(ValueError, match="select their neurons"):
        tree_layer_sensitivities(dense, partition, [torch.zeros(4, 48)] * 2, text_windows(0, 1), progress=False)
