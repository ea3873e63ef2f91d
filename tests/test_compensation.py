"""Layer replay and the least-squares down_proj refit of micro-gated MLPs."""

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec
from treeffn_hf.conversion import compensation
from treeffn_hf.conversion.compensation import refit_down_proj, refit_mgs_layers, selected_hidden
from treeffn_hf.conversion.replay import LayerReplay

from .conftest import tiny_dense_model

WINDOWS = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))


def mlp_inputs_by_hooks(model, windows):
    """Every layer's MLP inputs in one ordinary forward."""
    seen = {}

    def keep(index, args):
        seen[index] = args[0].reshape(-1, args[0].shape[-1])

    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: keep(i, a))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_replay_walks_the_layers_as_the_model_does(model_type):
    model = tiny_dense_model(model_type)
    expected = mlp_inputs_by_hooks(model, WINDOWS)
    replay = LayerReplay(model, WINDOWS, batch_size=4)  # two batches, the second short
    for index in range(len(replay.layers)):
        peek, _ = replay.run_layer(advance=False)
        inputs, outputs = replay.run_layer()
        torch.testing.assert_close(peek, inputs)
        torch.testing.assert_close(inputs, expected[index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs, model.model.layers[index].mlp(expected[index]), rtol=1e-5, atol=1e-5)


def sparse_model(density=0.25):
    dense = tiny_dense_model("llama")
    return dense, treeffn_hf.convert(dense, MGSSpec(density=density), progress=False)


def test_refit_lowers_the_held_out_error_and_leaves_the_selection_alone():
    dense, sparse = sparse_model()
    mlp, dense_mlp = sparse.model.layers[0].mlp, dense.model.layers[0].mlp
    # Inputs on a low-dimensional subspace, as real hidden states are: the computed neurons then
    # carry information about the skipped ones, which is what the refit uses.
    x = torch.randn(600, 6) @ torch.randn(6, mlp.hidden_size)
    with torch.no_grad():
        y = dense_mlp(x)
    untouched = {k: v.clone() for k, v in mlp.state_dict().items() if "down_proj" not in k}
    hidden_before = selected_hidden(mlp, x)
    report = refit_down_proj(mlp, x, y)
    assert report.damping is not None and report.mse_after < 0.9 * report.mse_before
    for key, value in mlp.state_dict().items():
        if "down_proj" not in key:
            assert torch.equal(value, untouched[key]), key
    torch.testing.assert_close(selected_hidden(mlp, x), hidden_before)
    with torch.no_grad():  # the refitted layer computes what the report says
        assert float(torch.nn.functional.mse_loss(mlp(x), y)) < report.mse_before


def test_refit_keeps_the_dense_weight_when_nothing_beats_it():
    _, sparse = sparse_model()
    mlp = sparse.model.layers[0].mlp
    x = torch.randn(80, mlp.hidden_size)
    with torch.no_grad():  # the layer's own output plus noise: any refit only fits the noise
        y = mlp(x) + torch.randn(80, mlp.hidden_size)
    before = mlp.down_proj.weight.clone()
    report = refit_down_proj(mlp, x, y, holdout=0.25)
    assert report.damping is None and report.mse_after == report.mse_before
    assert torch.equal(mlp.down_proj.weight, before)


def test_sequential_refit_fits_on_the_refitted_predecessors_inputs(monkeypatch):
    dense, sparse = sparse_model()
    fitted_on = {}
    real = compensation.refit_down_proj

    def spy(mlp, inputs, targets, **kwargs):
        fitted_on[kwargs["layer_index"]] = (inputs.clone(), targets.clone())
        return real(mlp, inputs, targets, **kwargs)

    monkeypatch.setattr(compensation, "refit_down_proj", spy)
    refit_mgs_layers(sparse, dense, WINDOWS, inputs="sparse", target="dense_mlp", progress=False)
    sparse_inputs = mlp_inputs_by_hooks(sparse, WINDOWS)  # layer 1 sees layer 0 as refitted
    dense_inputs = mlp_inputs_by_hooks(dense, WINDOWS)
    x1, y1 = fitted_on[1]
    torch.testing.assert_close(x1, sparse_inputs[1], rtol=1e-5, atol=1e-5)
    assert (x1 - dense_inputs[1]).abs().max() > 1e-2  # dense inputs would have failed the line above
    with torch.no_grad():
        torch.testing.assert_close(y1, dense.model.layers[1].mlp(x1), rtol=1e-5, atol=1e-5)

    fitted_on.clear()
    _, fresh = sparse_model()
    refit_mgs_layers(fresh, dense, WINDOWS, inputs="sparse", target="dense_output", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(fitted_on[1][1], dense.model.layers[1].mlp(dense_inputs[1]), rtol=1e-5, atol=1e-5)


def test_independent_refit_uses_dense_inputs_and_records_no_density(monkeypatch):
    dense, sparse = sparse_model()
    fitted_on = {}
    real = compensation.refit_down_proj

    def spy(mlp, inputs, targets, **kwargs):
        fitted_on[kwargs["layer_index"]] = inputs.clone()
        return real(mlp, inputs, targets, **kwargs)

    monkeypatch.setattr(compensation, "refit_down_proj", spy)
    reports = refit_mgs_layers(sparse, dense, WINDOWS, inputs="dense", progress=False)
    assert [r.layer for r in reports] == [0, 1]
    torch.testing.assert_close(fitted_on[1], mlp_inputs_by_hooks(dense, WINDOWS)[1], rtol=1e-5, atol=1e-5)
    assert all(m.measured_units() is None for _, m in sparse.sparse_mlps())
    with pytest.raises(ValueError, match="inputs must be one of"):
        refit_mgs_layers(sparse, dense, WINDOWS, inputs="both", progress=False)
