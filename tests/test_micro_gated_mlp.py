"""MicroGatedMLP against the Hugging Face MLP it replaces and a per-token gather written here."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from treeffn_hf import MGSSpec, MicroGatedMLP
from treeffn_hf.modeling.mgs_selection import selection_mask

from .conftest import assert_fast_path_matches_reference
from .sparse_layer_contract import SparseLayerContract


def make_pair(spec: MGSSpec, hidden=40, intermediate=150, dtype=torch.float64):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4)
    reference = LlamaMLP(config).to(dtype)
    layer = MicroGatedMLP(hidden, intermediate, spec, torch.nn.SiLU()).to(dtype)
    with torch.no_grad():
        for p in layer.micro_gate.parameters():
            p.normal_(0, 0.5)
    layer.load_state_dict(reference.state_dict(), strict=False)
    return reference, layer


@pytest.mark.parametrize("rank", [None, 8])
def test_density_one_equals_hf_mlp_forward_and_backward(rank):
    reference, layer = make_pair(MGSSpec(density=1.0, predictor="linear", rank=rank))
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    g1 = torch.autograd.grad(layer(x).square().sum(), [x, layer.gate_proj.weight, layer.down_proj.weight])
    g2 = torch.autograd.grad(reference(x).square().sum(), [x, reference.gate_proj.weight, reference.down_proj.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def per_token_gather(layer: MicroGatedMLP, x: torch.Tensor, selected: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for token, index in zip(x, selected):
        g = layer.gate_proj.weight[index] @ token
        u = layer.up_proj.weight[index] @ token
        rows.append(layer.down_proj.weight[:, index] @ (F.silu(g) * u))
    return torch.stack(rows)


@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
def test_top_k_computes_exactly_the_top_scored_neurons(density):
    spec = MGSSpec(density=density, predictor="linear", rank=6)
    _, layer = make_pair(spec)
    x = torch.randn(17, 40, dtype=torch.float64)
    scores = layer.micro_gate(x)
    k = spec.top_k(150)
    selected = [torch.argsort(row, descending=True)[:k] for row in scores]
    torch.testing.assert_close(layer(x), per_token_gather(layer, x, selected))
    assert layer.measured_units() == k
    assert layer.cost().active_units == k


def test_threshold_selection_and_measured_density():
    spec = MGSSpec(density=0.3, predictor="linear", rank=None, selection="threshold")
    _, layer = make_pair(spec)
    layer.gate_threshold.fill_(0.7)
    x = torch.randn(11, 40, dtype=torch.float64)
    scores = layer.micro_gate(x)
    selected = [torch.nonzero(row > 0.7).flatten() for row in scores]
    torch.testing.assert_close(layer(x), per_token_gather(layer, x, selected))
    expected_units = sum(len(s) for s in selected) / 11
    assert layer.measured_units() == pytest.approx(expected_units)
    assert layer.cost().active_units == pytest.approx(expected_units)


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_torch_path_reads_only_the_rows_it_reports(tokens, dtype):
    """NaN in every row of gate_proj, up_proj and down_proj that no token selects: the gathers must
    not touch them (NaN times a zero mask is NaN, so a masked dense matmul fails here), and the
    bytes the layer reports are the union's rows at the weights' own element size."""
    _, layer = make_pair(MGSSpec(density=0.05, predictor="linear", rank=8), dtype=dtype)
    x = torch.randn(tokens, 40, dtype=dtype)
    with torch.no_grad():
        layer.force_path = "reference"
        want = layer(x)
        union = selection_mask(layer.micro_gate(x), layer.spec, layer.gate_threshold).any(dim=0)
        for projection in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight.t()):
            projection[~union] = float("nan")
        layer.force_path = "torch"
        got = layer(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else \
        torch.testing.assert_close(got, want)
    rows, element = int(union.sum()), torch.empty((), dtype=dtype).element_size()
    assert layer.bytes_read(tokens, rows) == {"predictor": (40 * 8 + 8 * 150 + 150) * element,
                                              "gate_up": 2 * rows * 40 * element, "down": rows * 40 * element}


def test_past_the_gather_fraction_the_torch_path_reads_every_row():
    _, layer = make_pair(MGSSpec(density=0.5, predictor="linear", rank=8), dtype=torch.float32)
    with torch.no_grad():
        layer.down_proj.weight[:, 0] = float("nan")  # a row no selection can spare from a dense matmul
        layer.force_path = "torch"
        selected = selection_mask(layer.micro_gate(torch.randn(1, 40)), layer.spec, layer.gate_threshold)
        out = layer(torch.randn(1, 40))
    assert selected.sum() > 0.15 * 150 and torch.isnan(out).all()  # it did read the whole matrix
    assert layer.bytes_read(1, 75)["down"] == 150 * 40 * 4


def test_cost_counts_the_quantized_predictor_at_four_bits_plus_bf16_scales():
    layer = MicroGatedMLP(64, 160, MGSSpec(density=0.1, group_size=32, predictor="quantized"), torch.nn.SiLU())
    predictor_bytes = 2 * 160 * 64 // 2 + 2 * (2 * 160 * 64 // 32) * 2  # codes + scales and zeros
    assert layer.micro_gate.num_bytes() == predictor_bytes
    # at batch 1 the int4 matmul reads the codes; the 16 selected float32 rows are gathered
    assert layer.cost().active_weight_bytes == predictor_bytes + 4 * 3 * 16 * 64
    # past the int4 matmul's token limit the predictor is dequantised to a float32 copy first
    assert layer.micro_gate.bytes_read(64, "cpu") == predictor_bytes + 4 * 2 * 160 * 64
    # groups of 32: 4 + 32 / 32 bits a weight for gate and up, against 48 bits of dense MLP per neuron-dim
    assert predictor_bytes / (2 * 3 * 160 * 64) == pytest.approx(2 * 5 / 48)


def test_fast_path_with_biases_and_a_stale_down_cache():
    spec = MGSSpec(density=0.2, predictor="linear", rank=8)
    layer = MicroGatedMLP(40, 150, spec, torch.nn.SiLU(), bias=True).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
        x = torch.randn(1, 40, dtype=torch.float64)
        for _ in range(2):  # the second round runs after the weights changed under the cache
            assert_fast_path_matches_reference(layer, x)
            layer.down_proj.weight.mul_(2.0)


class TestMGSContract(SparseLayerContract):
    """The shared contract over MGS selections: a batch reads the union of its tokens' selected
    rows, or every row where its byte report says the PyTorch path runs the masked dense matmuls."""

    HIDDEN = 40
    SPECS = [MGSSpec(density=density, predictor="linear", rank=8, selection=selection)
             for density in (0.5, 0.1, 0.03) for selection in ("top_k", "threshold")]

    def spec_id(self, spec) -> str:
        return f"{spec.selection}-{spec.density}"

    def make_layer(self, spec, dtype=torch.float64):
        _, layer = make_pair(spec, dtype=dtype)
        layer.gate_threshold.fill_(1.5)
        return layer

    def union(self, layer, x):
        return selection_mask(layer.micro_gate(x), layer.spec, layer.gate_threshold).any(dim=0)

    def claimed_rows(self, layer, x):
        union = self.union(layer, x)
        read = layer.bytes_read(x.shape[0], int(union.sum()))["down"]
        rows = union if read < layer.intermediate_size * layer.hidden_size * 8 else torch.ones_like(union)
        return [(layer.gate_proj.weight, rows, 0), (layer.up_proj.weight, rows, 0), (layer.down_proj.weight, rows, 1)]

    def gradient_rows(self, layer, x):
        union = self.union(layer, x)
        return [(layer.gate_proj.weight, union, 0), (layer.up_proj.weight, union, 0), (layer.down_proj.weight, union, 1)]
