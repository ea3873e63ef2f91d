"""Every Triton kernel against its PyTorch reference, and the layers' triton path against their
reference path. Without a GPU they run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it);
with one, the same tests run on CUDA, in bf16 as well."""

import copy
import math

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from treeffn_hf import MGSSpec, TreeSpec  # noqa: E402
from treeffn_hf.modeling import gather_kernels, mgs_kernels, tree_kernels  # noqa: E402
from treeffn_hf.modeling.mgs_layer import MicroGatedMLP  # noqa: E402
from treeffn_hf.modeling.mgs_predictors import QuantizedPredictor  # noqa: E402
from treeffn_hf.modeling.tree_layer import TreeFFN  # noqa: E402
from treeffn_hf.modeling.tree_torch import routing_bias, routing_matrix  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# fp32 sums in a different order; half precision rounds the activations like the PyTorch path.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
HIDDEN, INTER = 45, 166  # odd on purpose: every block size is masked at its edge


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e}"


def tables(dtype, seed=0, rows=INTER, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, hidden, generator=g) * s).to(DEVICE, dtype) for s in (0.2, 0.2, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,selected", [(1, 1), (1, 13), (7, 40), (33, 5)])
def test_gathered_swiglu_matches_naive(dtype, tokens, selected):
    gate, up, down = tables(dtype)
    x = torch.randn(tokens, HIDDEN).to(DEVICE, dtype)
    rows = torch.stack([torch.randperm(INTER)[:selected] for _ in range(tokens)]).to(DEVICE)
    rows[0, -1] = -1  # padding of threshold selection
    want = gather_kernels.gathered_swiglu_naive(x, rows, gate, up, down)
    close(gather_kernels.gathered_swiglu(x, rows, gate, up, down), want, dtype)


@pytest.mark.parametrize("after_sum", [False, True], ids=["per_node", "after_sum"])
def test_the_gather_kernels_read_only_the_listed_rows(after_sum):
    """NaN in every row no token lists: the Triton gathers must not touch them (a read would spread
    the NaN), so the rows a tree or MGS layer on the triton path is charged for are all it reads."""
    gate, up, down = tables(torch.float32)
    x = torch.randn(4, HIDDEN).to(DEVICE)
    if after_sum:
        rows = torch.randint(0, INTER // 3, (4, 2, 3, 5), device=DEVICE)
        naive, kernel = gather_kernels.gathered_swiglu_after_sum_naive, gather_kernels.gathered_swiglu_after_sum
    else:
        rows = torch.stack([torch.randperm(INTER // 3)[:13] for _ in range(4)]).to(DEVICE)
        rows[0, -1] = -1  # padding of threshold selection
        naive, kernel = gather_kernels.gathered_swiglu_naive, gather_kernels.gathered_swiglu
    want = naive(x, rows, gate, up, down)
    unlisted = torch.ones(INTER, dtype=torch.bool, device=DEVICE)
    unlisted[rows[rows >= 0]] = False
    assert unlisted.sum() > INTER // 2
    for table in (gate, up, down):
        table[unlisted] = float("nan")
    got = kernel(x, rows, gate, up, down)
    assert torch.isfinite(got).all(), "a gather kernel read a row no token lists"
    close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_with_several_atomic_adds_per_output_matches_naive(dtype):
    """A hidden size of several gate/up blocks (several partial g and u per row) and row lists
    longer than the down block (several partial sums per output element), padded inside the list:
    every tile's atomic add lands once, also into an `out` that already holds a sum."""
    gate_up_rows, gate_up_hidden = gather_kernels.GATE_UP_BLOCK
    down_rows, _ = gather_kernels.DOWN_BLOCK
    hidden = 2 * gate_up_hidden + 88  # three gate/up blocks over hidden, the last masked at its edge
    selected = max(2 * down_rows, 4 * gate_up_rows) + 22  # three down blocks over rows, the last partial
    assert triton.cdiv(hidden, gate_up_hidden) >= 3 and triton.cdiv(selected, down_rows) >= 3
    tokens, stored = 3, selected + 50
    gate, up, down = tables(dtype, rows=stored, hidden=hidden)
    x = torch.randn(tokens, hidden).to(DEVICE, dtype)
    rows = torch.stack([torch.randperm(stored)[:selected] for _ in range(tokens)]).to(DEVICE)
    rows[0, [5, down_rows + 1, -1]] = -1  # padding in the first, second and last down block
    want = gather_kernels.gathered_swiglu_naive(x.float(), rows, gate.float(), up.float(), down.float())
    got = gather_kernels.gathered_swiglu(x, rows, gate, up, down)
    assert got.dtype == dtype
    close(got, want, dtype)
    start = torch.randn(tokens, hidden, device=DEVICE)
    summed = gather_kernels.gathered_swiglu(x, rows, gate, up, down, out=start.clone())
    close(summed, start + want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,trees,blocks,width", [(1, 1, 2, 3), (7, 2, 4, 5), (33, 3, 1, 17)])
def test_gathered_swiglu_after_sum_matches_naive(dtype, tokens, trees, blocks, width):
    gate, up, down = tables(dtype)
    x = torch.randn(tokens, HIDDEN).to(DEVICE, dtype)
    rows = torch.randint(0, INTER, (tokens, trees, blocks, width), device=DEVICE)
    want = gather_kernels.gathered_swiglu_after_sum_naive(x, rows, gate, up, down)
    close(gather_kernels.gathered_swiglu_after_sum(x, rows, gate, up, down), want, dtype)


@pytest.mark.parametrize("depth", range(1, 7))
@pytest.mark.parametrize("trees,bias", [(1, False), (3, True)])
def test_route_kernel_walks_the_same_path(depth, trees, bias):
    nodes = (1 << depth) - 1
    x = torch.randn(9, HIDDEN, device=DEVICE)
    vectors = torch.randn(trees * nodes, HIDDEN, device=DEVICE)
    bias_t = torch.randn(trees, nodes, device=DEVICE) if bias else None
    leaf, path = tree_kernels.tree_route_triton(x, vectors, bias_t, trees, depth)
    want_leaf, want_path = tree_kernels.tree_route_naive(x, vectors, bias_t, trees, depth)
    assert torch.equal(leaf, want_leaf) and torch.equal(path, want_path)


TREE_SPECS = {
    "self-d3-w2": TreeSpec(depth=3, node_width=2),
    "self-d6-w1": TreeSpec(depth=6, node_width=1),
    "hyperplane-2trees": TreeSpec(num_trees=2, depth=2, node_width=1, routing="hyperplane"),
    "fff-3trees": TreeSpec(num_trees=3, depth=1, node_width=0, routing="hyperplane"),
    "after-sum": TreeSpec(depth=2, node_width=23, activation="after_sum"),
    "after-sum-hyperplane-2trees": TreeSpec(num_trees=2, depth=1, node_width=27, activation="after_sum",
                                            routing="hyperplane"),
    # Pruned trees: leaves found through the slot table, dead subtrees closed by forced branches.
    "pruned-self-d3-w2": TreeSpec(depth=3, node_width=2, live_leaves=((1, 2, 3, 6),)),
    "pruned-hyperplane-2trees": TreeSpec(num_trees=2, depth=2, node_width=1, routing="hyperplane",
                                         live_leaves=((0,), (1, 3))),
    "pruned-after-sum": TreeSpec(depth=2, node_width=23, activation="after_sum", live_leaves=((0, 3),)),
    # Leaves that select their neurons: about 1.5x the MLP's rows stored.
    "selected-2trees": TreeSpec(num_trees=2, depth=3, node_width=1, routing="hyperplane", leaf_neurons="selected",
                                leaf_width=14, shared_width=5),
}


def random_layer(layer: nn.Module, dtype) -> nn.Module:
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    return layer.to(DEVICE, dtype)


def run_both(layer, x):
    with torch.no_grad():
        layer.force_path = "reference"
        want = layer(x)
        layer.force_path = "triton"
        got = layer(x)
    layer.force_path = None
    return got, want


@pytest.mark.parametrize("name", [n for n in TREE_SPECS if TREE_SPECS[n].activation == "per_node"])
def test_fused_route_rows_kernel_lists_the_path_rows(name):
    """Decode routing writes each token's row list itself: the same leaf, path and rows (node
    blocks, leaf block, shared rows) as the walker plus `path_rows`."""
    layer = random_layer(TreeFFN(HIDDEN, INTER, TREE_SPECS[name], nn.SiLU()), torch.float32)
    x = torch.randn(6, HIDDEN, device=DEVICE)
    bias = routing_bias(layer)
    vectors = routing_matrix(layer)
    rows, leaf, path = tree_kernels.tree_route_rows_triton(layer, x, vectors, bias)
    want_leaf, want_path = tree_kernels.tree_route_naive(x, vectors, bias, layer.spec.num_trees, layer.spec.depth)
    assert torch.equal(leaf.long(), want_leaf) and torch.equal(path.long(), want_path)
    want_rows = tree_kernels.path_rows(layer, want_leaf, want_path)
    shared = torch.arange(layer.node_rows + layer.leaf_rows, layer.spec.stored_units, device=DEVICE).expand(6, -1)
    assert torch.equal(rows.long(), torch.cat([want_rows, shared], dim=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,variant", [(1, None), (7, None), (33, None), (33, "gather"), (33, "masked_dense")],
                         ids=["1", "7", "33", "33-gather", "33-masked-dense"])
@pytest.mark.parametrize("name", TREE_SPECS)
def test_tree_layer_triton_path_matches_reference(name, tokens, variant, dtype):
    layer = random_layer(TreeFFN(HIDDEN, INTER, TREE_SPECS[name], nn.SiLU()), dtype)
    if variant is not None:  # every variant on every spec, through the layer's policy
        forced = {"gather": math.inf, "masked_dense": 0.0}[variant]
        layer.kernel_policy = layer.kernel_policy.replace(tree_gather_max_row_multiple=forced)
    x = torch.randn(tokens, HIDDEN).to(DEVICE, dtype)
    got, _ = run_both(layer, x)
    ran = tree_kernels.kernel_variant(layer, tokens)
    assert layer.last_path.startswith("triton:route+" + ran)
    # Oracle: the reference path in fp32 on the same (rounded) weights; the kernels also route
    # and accumulate in fp32, so half precision cannot send a token down another path.
    reference = copy.deepcopy(layer).float()
    reference.force_path = "reference"
    with torch.no_grad():
        close(got, reference(x.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("spec", [MGSSpec(density=0.1, predictor="linear", rank=16), MGSSpec(density=0.3, predictor="linear", rank=None)], ids=["r64-10%", "full-30%"])
def test_mgs_layer_triton_path_matches_reference(spec, tokens, dtype):
    layer = random_layer(MicroGatedMLP(HIDDEN, INTER, spec, nn.SiLU()), dtype)
    x = torch.randn(tokens, HIDDEN).to(DEVICE, dtype)
    got, want = run_both(layer, x)
    assert layer.last_path == "triton:gather"
    close(got, want, dtype)
    assert layer.measured_units() == spec.top_k(INTER)


@pytest.mark.parametrize("selection", ["top_k", "threshold"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_mgs_quantized_predictor_runs_on_the_kernels(selection, tokens):
    hidden = 64  # the 4-bit predictor packs two codes a byte: an even hidden size
    layer = random_layer(MicroGatedMLP(hidden, INTER, MGSSpec(density=0.2, selection=selection), nn.SiLU()),
                         torch.float32)
    layer.micro_gate.load_state_dict(
        QuantizedPredictor.state_from(layer.gate_proj.weight, layer.up_proj.weight, layer.spec.group_size))
    x = torch.randn(tokens, hidden, device=DEVICE)
    with torch.no_grad():
        layer.gate_threshold.fill_(float(layer.micro_gate(x).quantile(0.8)))
    got, want = run_both(layer, x)
    assert layer.last_path == "triton:gather"
    close(got, want, torch.float32)


def test_tree_switches_to_the_masked_dense_gemms_once_gathers_would_read_more_than_the_layer():
    layer = TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU())
    switch = layer.kernel_policy.tree_gather_max_row_multiple * INTER / layer.spec.active_units
    assert tree_kernels.kernel_variant(layer, 1) == "gather"
    assert tree_kernels.kernel_variant(layer, int(switch)) == "gather"
    assert tree_kernels.kernel_variant(layer, int(switch) + 1) == "masked_dense"


def test_a_bad_kernel_policy_is_refused_when_it_is_set():
    layer = TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU())
    with pytest.raises(ValueError, match="no field 'tree_variant'"):
        layer.kernel_policy.replace(tree_variant="dense")
    with pytest.raises(ValueError, match="must be one of"):
        layer.force_path = "fast"
    assert layer.force_path is None and layer.kernel_policy.path == "auto"


def test_mgs_threshold_selection_on_the_kernel():
    layer = random_layer(MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=16, selection="threshold"), nn.SiLU()),
                         torch.float32)
    layer.gate_threshold.fill_(0.5)
    x = torch.randn(5, HIDDEN, device=DEVICE)
    got, want = run_both(layer, x)
    close(got, want, torch.float32)
    rows = mgs_kernels.selected_rows(layer, layer.micro_gate(x))
    assert ((rows >= 0).sum(1) == (layer.micro_gate(x) > 0.5).sum(1)).all()


def test_large_mgs_batches_hand_over_to_the_union_gemm_and_say_so():
    layer = random_layer(MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=16), nn.SiLU()), torch.float32)
    tokens = int(layer.kernel_policy.mgs_gather_max_row_multiple * INTER / layer.spec.top_k(INTER)) + 1
    assert mgs_kernels.uses_gather(layer, tokens - 1) and not mgs_kernels.uses_gather(layer, tokens)
    x = torch.randn(tokens, HIDDEN, device=DEVICE)
    got, want = run_both(layer, x)
    assert layer.last_path == "torch"
    close(got, want, torch.float32)


@torch.no_grad()
def test_forcing_triton_where_it_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    layer = random_layer(MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=16), nn.SiLU(), bias=True), torch.float32)
    layer.force_path = "triton"
    with pytest.raises(RuntimeError, match="biases"):
        layer(torch.randn(1, HIDDEN, device=DEVICE))
    tree = random_layer(TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.GELU()), torch.float32)
    tree.force_path = "triton"
    with pytest.raises(RuntimeError, match="SiLU"):
        tree(torch.randn(1, HIDDEN, device=DEVICE))
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        plain = random_layer(TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU()), torch.float32)
        plain.force_path = "triton"
        with pytest.raises(RuntimeError, match="CUDA"):
            plain(torch.randn(1, HIDDEN))


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["tree", "mgs"])
def test_forcing_a_forward_only_path_where_gradients_are_needed_is_an_error(path, kind):
    layer = (TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU()) if kind == "tree"
             else MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=16), nn.SiLU()))
    layer = random_layer(layer, torch.float32)
    layer.force_path = path
    with pytest.raises(RuntimeError, match="forward-only"):
        layer(torch.randn(2, HIDDEN, device=DEVICE))
    layer.force_path = "reference"
    layer(torch.randn(2, HIDDEN, device=DEVICE)).sum().backward()
    assert layer.down_proj.weight.grad is not None if kind == "mgs" else layer.down_rows.grad is not None


def test_auto_dispatch_uses_the_kernels_only_on_cuda():
    layer = random_layer(TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1), nn.SiLU()), torch.float32)
    with torch.no_grad():
        layer(torch.randn(1, HIDDEN, device=DEVICE))
    assert layer.last_path == ("triton:route+gather" if DEVICE == "cuda" else "torch")


def test_saved_checkpoints_carry_the_kernels_and_nothing_else(tmp_path):
    """transformers copies the files a model file imports, also lazily imported ones: the kernels
    travel with every checkpoint, so trust_remote_code users get them, and no other file does."""
    import treeffn_hf

    from .conftest import tiny_dense_model

    for spec in (TreeSpec(depth=2, node_width=1), MGSSpec(density=0.1, predictor="linear", rank=8)):
        out = tmp_path / spec.method
        treeffn_hf.save(treeffn_hf.convert(tiny_dense_model("llama"), spec, progress=False), out)
        assert {p.name for p in out.glob("*.py")} == BUNDLE_FILES


# Every file a checkpoint ships for trust_remote_code: the modeling package but its __init__.
# Listed so that a new module (or a deleted one) is a visible change to what users download.
BUNDLE_FILES = {
    # shared: the architecture declarations, configs, model classes, specs, costs, dispatch, the gather
    # kernels both methods use
    "base_architectures.py", "activations.py", "configuration_treeffn.py", "dispatch.py", "gather_kernels.py", "layer_spec.py",
    "modeling_treeffn.py", "sparse_cost.py",
    # the tree-structured FFN
    "tree_layer.py", "tree_reference.py", "tree_torch.py", "tree_blocks.py", "tree_kernels.py",
    # the micro-gated MLP
    "mgs_layer.py", "mgs_predictors.py", "mgs_selection.py", "mgs_torch.py", "mgs_kernels.py", "mgs_kernels_cpu.py",
    "mgs_kernels_cpu_source.py", "mgs_reference.py",
}


KERNELS_FROM_REMOTE_CODE = r"""
import sys
sys.modules["treeffn_hf"] = None  # only the checkpoint's own files
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).to(sys.argv[2])
ids = torch.tensor([[5, 17, 33, 8, 60, 41, 12]], device=sys.argv[2])
outputs = {}
for path in ("reference", "triton"):
    for layer in model.model.layers:
        layer.mlp.force_path = path
    with torch.no_grad():
        outputs[path] = model(ids).logits
    ran = {layer.mlp.last_path for layer in model.model.layers}
assert all(p.startswith("triton:") for p in ran), ran
err = (outputs["triton"] - outputs["reference"]).abs().max().item()
assert err < 1e-3, err
"""


@pytest.mark.parametrize("spec", [TreeSpec(depth=2, node_width=3), MGSSpec(density=0.1, predictor="linear", rank=8)],
                         ids=["tree", "mgs"])
def test_remote_code_checkpoint_runs_its_kernels(tmp_path, spec):
    import treeffn_hf

    from .conftest import run_python, tiny_dense_model

    treeffn_hf.save(treeffn_hf.convert(tiny_dense_model("llama"), spec, progress=False), tmp_path / "model")
    run_python(KERNELS_FROM_REMOTE_CODE, str(tmp_path / "model"), DEVICE)
