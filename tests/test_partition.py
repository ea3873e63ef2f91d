import pytest
import torch

from treeffn_hf import TreeSpec
from treeffn_hf.conversion.partition import partition_neurons


@pytest.mark.parametrize(
    "spec",
    [TreeSpec(depth=3, node_width=2), TreeSpec(num_trees=3, depth=2, node_width=1, routing="hyperplane"),
     TreeSpec(depth=4, node_width=0, routing="hyperplane"), TreeSpec(depth=2, node_width=20, activation="after_sum")],
)
def test_every_neuron_lands_in_exactly_one_block(spec):
    hidden, width = 32, 166
    spec = spec.resolve(hidden, width)
    gate, up, down = torch.randn(width, hidden), torch.randn(width, hidden), torch.randn(hidden, width)
    layout = partition_neurons(gate, up, down, spec)
    assert sorted(layout.all_indices().tolist()) == list(range(width))
    assert layout.leaf_index.shape == (spec.num_trees, spec.num_leaves, spec.leaf_width)
    assert layout.shared_index.numel() == spec.shared_width


def test_self_routing_neuron_aligns_with_the_split():
    # Two clusters of gate directions: the root must send each cluster's inputs to its own side.
    torch.manual_seed(0)
    hidden, width = 16, 62
    centre = torch.zeros(hidden)
    centre[0] = 1.0
    gate = torch.cat([centre + 0.05 * torch.randn(31, hidden), -centre + 0.05 * torch.randn(31, hidden)])
    spec = TreeSpec(depth=1, node_width=1).resolve(hidden, width)
    layout = partition_neurons(gate, torch.randn(width, hidden), torch.randn(hidden, width), spec)
    sides = [set((gate[layout.leaf_index[0, leaf]][:, 0] > 0).tolist()) for leaf in range(2)]
    assert sides[0] != sides[1] and all(len(s) == 1 for s in sides)
    root = gate[layout.node_index[0, 0, 0]]
    right_leaf_sign = 1.0 if sides[1] == {True} else -1.0
    assert torch.sign(root[0]) == right_leaf_sign


@pytest.mark.parametrize("spec", [TreeSpec(num_trees=2, depth=2, node_width=3), TreeSpec(depth=3, node_width=0, routing="hyperplane")])
def test_tree_weights_hold_the_dense_mlp_exactly(spec):
    """Summing every block of the converted layer (all paths at once) must give back the dense MLP:
    this catches any mix-up of gate/up/down rows or of the transposed down projection."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from treeffn_hf import TreeFFN
    from treeffn_hf.conversion.surgery import sparse_mlp_state

    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=166, num_attention_heads=4)).double()
    layer = TreeFFN(32, 166, spec, torch.nn.SiLU()).double()
    layer.load_state_dict(sparse_mlp_state(layer.spec, dense.gate_proj, dense.up_proj, dense.down_proj))
    x = torch.randn(9, 32, dtype=torch.float64)

    def all_blocks(gate, up, down):  # (..., width, d) slabs; down holds one row per neuron
        g = torch.einsum("nd,...wd->n...w", x, gate)
        u = torch.einsum("nd,...wd->n...w", x, up)
        return torch.einsum("n...w,...wd->nd", torch.nn.functional.silu(g) * u, down)

    total = all_blocks(layer.leaf_gate, layer.leaf_up, layer.leaf_down)
    total = total + all_blocks(layer.shared_gate, layer.shared_up, layer.shared_down)
    if layer.node_gate is not None:
        total = total + all_blocks(layer.node_gate, layer.node_up, layer.node_down)
    torch.testing.assert_close(total, dense(x))
