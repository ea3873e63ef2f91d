"""The 4-bit quantized predictor, calibrated thresholds and greedy budget allocation, on tiny models."""

import math

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec, MicroGatedMLP
from treeffn_hf.conversion import budgets
from treeffn_hf.conversion.budgets import (
    SENSITIVITY_DENSITIES,
    allocate_greedy,
    calibrate_mgs,
    calibrate_mgs_to_ratio,
    density_for_weight_fraction,
    layer_sensitivities,
    ranked_scores,
)
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
from treeffn_hf.conversion.surgery import sparse_mlp_state
from treeffn_hf.modeling.mgs_predictors import (
    dequantize_int4,
    pack_nibbles,
    quantize_int4,
    unpack_nibbles,
)

from .conftest import DATA_DIR, assert_fast_path_matches_reference, char_tokenizer, tiny_dense_model

HAS_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def test_int4_quantization_is_within_half_a_step_and_packs_losslessly():
    weight = torch.randn(37, 96) * torch.logspace(-2, 1, 96)  # groups of very different ranges
    codes, scale, zero = quantize_int4(weight, group_size=32)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == (37, 3)
    restored = dequantize_int4(codes, scale, zero)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((restored - weight).abs() <= 0.5 * step * 1.02 + 1e-6).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def dense_projections(hidden: int, intermediate: int) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(hidden, intermediate, bias=False), torch.nn.Linear(hidden, intermediate, bias=False),
            torch.nn.Linear(intermediate, hidden, bias=False)]


def make_layer(hidden=64, intermediate=96, group_size=32, selection="top_k", density=0.3,
               predictor="quantized") -> MicroGatedMLP:
    spec = MGSSpec(density=density, group_size=group_size, selection=selection,
                   predictor=predictor).resolve(hidden, intermediate)
    layer = MicroGatedMLP(hidden, intermediate, spec, torch.nn.SiLU())
    layer.load_state_dict(sparse_mlp_state(spec, *dense_projections(hidden, intermediate)))
    return layer.requires_grad_(False)


def on_nested_grid(layer: MicroGatedMLP) -> torch.Tensor:
    """The residual of gate/up over the predictor's 4-bit values, in steps of scale / 16."""
    predictor = layer.micro_gate
    step = (predictor.scales.float() / 16).repeat_interleave(predictor.group_size, dim=1)
    weight = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).float()
    return (weight - predictor.dequantized()) / step


def test_nested_weights_are_the_predictor_codes_plus_a_4bit_residual():
    layer = make_layer(predictor="nested")
    residual = on_nested_grid(layer)
    torch.testing.assert_close(residual, residual.round(), rtol=0, atol=1e-3)
    assert residual.min() >= -8 and residual.max() <= 7
    original = torch.cat([p.weight for p in dense_projections(64, 96)[:2]])
    step = (layer.micro_gate.scales.float() / 16).repeat_interleave(32, dim=1)
    error = (torch.cat([layer.gate_proj.weight, layer.up_proj.weight]) - original).abs() / step
    assert error.max() <= 1.0 + 1e-4 and error.mean() < 0.3  # half a step, one where the residual is clamped
    quantized = make_layer(predictor="quantized")  # same codes: the predictor is the high nibbles
    assert torch.equal(layer.micro_gate.codes, quantized.micro_gate.codes)


def test_a_layer_the_kernel_does_not_take_reports_the_torch_paths_bytes():
    """Groups of 32: no C kernel, so the nested layer runs (and is charged) the PyTorch path: the
    int4 predictor, then float32 rows. The kernel's own count is held to its reads in
    test_kernels_cpu.py."""
    layer = make_layer(predictor="nested", density=0.1)
    cost, units = layer.cost(), layer.spec.top_k(96)
    assert cost.active_weight_bytes == layer.micro_gate.num_bytes() + units * 3 * 64 * 4
    assert cost.dense_weight_bytes == 2 * 3 * 64 * 96


def test_requantize_follows_moved_weights_back_onto_the_grid():
    layer = make_layer(predictor="nested")
    with torch.no_grad():
        layer.up_proj.weight.mul_(1.5)
    moved = torch.cat([layer.gate_proj.weight, layer.up_proj.weight]).clone()
    layer.requantize()
    assert torch.equal(unpack_nibbles(layer.micro_gate.codes), quantize_int4(moved, 32)[0])
    residual = on_nested_grid(layer)
    torch.testing.assert_close(residual, residual.round(), rtol=0, atol=1e-3)


def test_predictor_scores_the_oracle_criterion_on_its_dequantized_weights():
    layer = make_layer()
    x = torch.randn(40, 64)
    gate, up = torch.nn.functional.linear(x, layer.micro_gate.dequantized()).split(96, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).abs()
    got = layer.micro_gate(x)  # 40 tokens: the dequantized path
    torch.testing.assert_close(got, want)
    exact = (torch.nn.functional.silu(layer.gate_proj(x)) * layer.up_proj(x)).abs()
    top = lambda s: set(s.topk(29).indices.tolist())  # noqa: E731
    recall = sum(len(top(a) & top(b)) for a, b in zip(got, exact)) / (40 * 29)
    assert recall > 0.8  # a 4-bit view ranks neurons nearly as the exact scores do


@pytest.mark.skipif(not HAS_INT4_MM, reason="this torch has no packed int4 CPU matmul")
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("tokens", [1, 5])
def test_packed_int4_matmul_equals_the_dequantized_reference(group_size, tokens):
    layer = make_layer(hidden=128, intermediate=80, group_size=group_size)
    x = torch.randn(tokens, 128)
    assert layer.micro_gate.uses_int4_matmul(x)
    fast = layer.micro_gate(x)
    gate, up = torch.nn.functional.linear(x, layer.micro_gate.dequantized()).split(80, dim=-1)
    reference = (torch.nn.functional.silu(gate) * up).abs()
    # the int4 kernel takes bf16 activations: agreement to bf16 rounding of x
    assert ((fast - reference).abs().max() / reference.abs().max()) < 2e-2


def test_predictor_keeps_its_format_through_dtype_moves():
    layer = make_layer()
    before = {k: v.clone() for k, v in layer.micro_gate.state_dict().items()}
    layer.half().double().float()
    for name, value in layer.micro_gate.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name])


@pytest.mark.parametrize("predictor", ["quantized", "nested"])
@pytest.mark.parametrize("selection", ["top_k", "threshold"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_fast_path_equals_reference_with_the_quantized_predictor(predictor, selection, tokens):
    layer = make_layer(selection=selection, density=0.1, predictor=predictor).double()
    x = torch.randn(tokens, 64, dtype=torch.float64)
    layer.gate_threshold.fill_(float(layer.micro_gate(x).float().quantile(0.9)))
    assert_fast_path_matches_reference(layer, x)


@pytest.mark.parametrize("bias", [False, True])
def test_a_token_that_selects_no_neuron_gets_the_bias_alone(bias):
    layer = MicroGatedMLP(64, 96, MGSSpec(density=0.3, selection="threshold"), torch.nn.SiLU(), bias=bias)
    layer = layer.double().requires_grad_(False)
    layer.gate_threshold.fill_(float("inf"))
    x = torch.randn(1, 64, dtype=torch.float64)
    out = assert_fast_path_matches_reference(layer, x)
    assert layer.measured_units() == 0
    torch.testing.assert_close(out, layer.down_proj.bias.expand(1, 64) if bias else torch.zeros(1, 64, dtype=torch.float64))


def test_resolve_picks_a_group_that_divides_the_hidden_size():
    assert MGSSpec(group_size=64).resolve(576, 1536).group_size == 64
    assert MGSSpec(group_size=128).resolve(576, 1536).group_size == 64
    assert MGSSpec(group_size=64).resolve(48, 166).group_size == 16
    with pytest.raises(treeffn_hf.InvalidSpecError, match="even"):
        MGSSpec().resolve(45, 100)


def text_windows(start: int, count: int, window: int = 64) -> torch.Tensor:
    texts = read_texts(DATA_DIR / "wikitext-2" / "valid.txt")
    return token_windows(texts, char_tokenizer(), window, start + count)[start:]


def measured_density(model, windows: torch.Tensor) -> float:
    for _, mlp in model.sparse_mlps():
        mlp.reset_density()
    with torch.no_grad():
        model(windows)
    return sum(m.measured_units() / m.intermediate_size for _, m in model.sparse_mlps()) / 2


@pytest.mark.parametrize("predictor", ["nested", "quantized", "linear"])
def test_thresholds_hit_the_target_density_on_held_out_text(predictor):
    dense = tiny_dense_model("llama")
    sparse = treeffn_hf.convert(dense, MGSSpec(density=0.3, predictor=predictor, rank=8), progress=False).eval()
    captured = capture_mlp_inputs(dense, text_windows(0, 16), progress=False)
    calibrate_mgs(sparse, captured.inputs, allocation="uniform", progress=False)
    assert measured_density(sparse, text_windows(40, 8)) == pytest.approx(0.3, abs=0.02)


def test_greedy_allocation_meets_the_budget_exactly_and_spares_the_sensitive_layer():
    densities = (0.75, 0.5, 0.25)
    costs = [[0.1, 0.3, 0.9], [0.01, 0.02, 0.05], [1.0, 2.0, 4.0]]
    allocated = allocate_greedy(costs, densities, target=0.6, step=1 / 64)
    assert sum(allocated) == pytest.approx(3 * 0.6, abs=1e-12)
    assert all(0.25 <= d <= 1.0 for d in allocated)
    assert allocated[1] == pytest.approx(0.25) and allocated[2] == max(allocated)
    with pytest.raises(ValueError, match="outside"):
        allocate_greedy(costs, densities, target=0.2)


@pytest.mark.parametrize("predictor", ["quantized", "nested"])
def test_greedy_calibration_on_a_weight_budget(tmp_path, predictor):
    """A budget of weight bytes read: with the nested format (the C kernel's: a fixed part, then
    the same bytes a neuron) the model's own byte report meets it exactly."""
    dense = tiny_dense_model("llama", hidden_size=64, intermediate_size=160)
    spec = MGSSpec(density=0.5, predictor=predictor, group_size=64)
    sparse = treeffn_hf.convert(dense, spec, progress=False).eval()
    captured = capture_mlp_inputs(dense, text_windows(0, 8), progress=False)
    layers = [m for _, m in sparse.sparse_mlps()]
    target = 0.45
    density = density_for_weight_fraction(layers[0], target)
    budget = calibrate_mgs(sparse, captured.inputs, weight_fraction=target, allocation="greedy",
                           loss_ids=text_windows(20, 2), progress=False)
    assert sum(budget["layer_densities"]) / 2 == pytest.approx(density, abs=1e-12)
    if predictor == "nested":
        for layer in layers:  # the sensitivities ran forwards: charge the calibrated densities instead
            layer.reset_density()
        assert sparse.sparse_cost().weight_fraction == pytest.approx(target, abs=1e-12)
    assert [m.spec.density for m in layers] == budget["layer_densities"]
    assert all(v >= 0 for row in budget["sensitivities"] for v in row)
    treeffn_hf.save(sparse, tmp_path / "m")
    reloaded = treeffn_hf.load(tmp_path / "m")
    assert [m.spec.density for _, m in reloaded.sparse_mlps()] == budget["layer_densities"]
    assert [float(m.gate_threshold) for _, m in reloaded.sparse_mlps()] == pytest.approx(budget["thresholds"])


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_a_perplexity_budget_takes_the_fewest_neurons_within_it(monkeypatch, allocation):
    """The bisection lands within its budget and within a search step of its edge, and a budget
    that quantisation alone spends keeps every neuron. A tiny random model's perplexity hardly
    moves with sparsity, so the loss here is a known function of the mean density: 0.5 (1 - d)
    nats above the dense model's, plus `floor` for the quantisation."""
    dense = tiny_dense_model("llama")
    captured = capture_mlp_inputs(dense, text_windows(0, 8), progress=False)
    floor = 0.0

    def known_nll(model, ids):
        if model is dense:
            return 2.0
        densities = model.config.sparse_mlp["layer_densities"]
        return 2.0 + floor + 0.5 * (1 - sum(densities) / len(densities))

    monkeypatch.setattr(budgets, "mean_nll", known_nll)
    for budget in (1.02, 1.1, 100.0):
        sparse = treeffn_hf.convert(dense, MGSSpec(density=0.5), progress=False).eval()
        result = calibrate_mgs_to_ratio(sparse, captured.inputs, dense=dense, max_ratio=budget, allocation=allocation,
                                        loss_ids=text_windows(30, 2), ratio_ids=text_windows(20, 2), progress=False)
        assert (result["sensitivities"] is None) == (allocation == "uniform")
        if allocation == "uniform":
            assert len(set(result["layer_densities"])) == 1
        edge = max(SENSITIVITY_DENSITIES[-1], 1 - 2 * math.log(budget))  # where the ratio meets the budget
        assert result["calibration_ratio"] <= budget and result["density"] >= edge - 1e-9
        assert result["density"] <= edge + (1 - SENSITIVITY_DENSITIES[-1]) / 2 ** budgets.RATIO_SEARCH_STEPS
        assert sparse.config.sparse_mlp["layer_densities"] == result["layer_densities"]
        assert [m.spec.density for _, m in sparse.sparse_mlps()] == result["layer_densities"]
    floor = math.log(1.05)  # quantisation alone costs more than the budget
    sparse = treeffn_hf.convert(dense, MGSSpec(density=0.5), progress=False).eval()
    result = calibrate_mgs_to_ratio(sparse, captured.inputs, dense=dense, max_ratio=1.01, allocation=allocation,
                                    loss_ids=text_windows(30, 2), ratio_ids=text_windows(20, 2), progress=False)
    assert result["layer_densities"] == [1.0, 1.0] and result["calibration_ratio"] == pytest.approx(1.05)


def test_the_mean_nll_is_the_models_own_loss():
    model = tiny_dense_model("llama")
    ids = text_windows(20, 3)
    with torch.no_grad():
        want = float(model(ids, labels=ids).loss)
    assert budgets.mean_nll(model, ids, batch=2) == pytest.approx(want, rel=1e-5)


def test_sensitivity_is_zero_at_full_density_and_grows_as_it_drops():
    dense = tiny_dense_model("llama")
    sparse = treeffn_hf.convert(dense, MGSSpec(density=0.5), progress=False).eval()
    captured = capture_mlp_inputs(dense, text_windows(0, 8), progress=False)
    layers = list(sparse.sparse_mlps())
    ranked = [ranked_scores(m, captured.inputs[i]) for i, m in layers]
    table = layer_sensitivities(sparse, layers, ranked, text_windows(20, 2), densities=(1.0, 0.5, 0.05),
                                progress=False)
    assert table[:, 0].abs().max() < 1e-6
    assert (table[:, 2] > table[:, 1]).all()
