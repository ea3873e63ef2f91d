"""The quality benchmark's reference points (treeffn_hf/baselines.py) do what they claim."""

import pytest
import torch

from treeffn_hf import baselines as baseline_module

from .conftest import tiny_dense_model


@pytest.fixture(scope="module")
def baselines():
    return baseline_module


@pytest.fixture(scope="module")
def mlp_and_inputs():
    torch.manual_seed(0)
    model = tiny_dense_model("llama")
    return model.model.layers[0].mlp, torch.randn(2000, model.config.hidden_size)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_teal_reads_the_calibrated_fraction_of_weights(baselines, mlp_and_inputs, fraction):
    mlp, x = mlp_and_inputs
    teal = baselines.TealMLP.calibrated(mlp, x[:1000], fraction)
    with torch.no_grad():
        teal(x[1000:])
    assert teal.measured_weight_fraction() == pytest.approx(fraction, abs=0.03)


def test_teal_at_full_fraction_is_the_dense_mlp(baselines, mlp_and_inputs):
    mlp, x = mlp_and_inputs
    teal = baselines.TealMLP.calibrated(mlp, x[:1000], 1.0)
    with torch.no_grad():
        torch.testing.assert_close(teal(x[1000:]), mlp(x[1000:]))


def test_oracle_keeps_exactly_the_largest_k_neurons(baselines, mlp_and_inputs):
    mlp, x = mlp_and_inputs
    oracle = baselines.OracleTopKMLP(mlp, 0.25)
    with torch.no_grad():
        inner = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        k = oracle.k
        kept = inner * (inner.abs() >= inner.abs().topk(k, dim=-1).values[:, -1:])
        torch.testing.assert_close(oracle(x), mlp.down_proj(kept))
        torch.testing.assert_close(baselines.OracleTopKMLP(mlp, 1.0)(x), mlp(x))
    assert oracle.unit_fraction() == pytest.approx(0.25, abs=1 / 166)


def test_wrap_and_unwrap_restore_the_model(baselines):
    model = tiny_dense_model("qwen3")
    originals = [layer.mlp for layer in model.model.layers]
    wrappers = baselines.wrap_mlps(model.model.layers, "mlp", lambda i, mlp: baselines.OracleTopKMLP(mlp, 0.5))
    assert [w.mlp for w in wrappers] == originals
    assert all(isinstance(layer.mlp, baselines.OracleTopKMLP) for layer in model.model.layers)
    baselines.unwrap_mlps(model.model.layers, "mlp")
    assert [layer.mlp for layer in model.model.layers] == originals
