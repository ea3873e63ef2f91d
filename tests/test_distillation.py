"""Layer-wise distillation on tiny models: it lowers layer MSE, resumes exactly, stops on NaN."""

import copy

import pytest
import torch

import treeffn_hf
from treeffn_hf import TreeSpec
from treeffn_hf.conversion import distillation
from treeffn_hf.conversion.calibration import capture_mlp_inputs
from treeffn_hf.conversion.distillation import distill_layer, distill_layers

from .conftest import tiny_dense_model

SPEC = TreeSpec(depth=3, node_width=2)


@pytest.fixture(scope="module")
def setup():
    dense = tiny_dense_model("llama")
    sparse = treeffn_hf.convert(dense, SPEC, progress=False)
    torch.manual_seed(0)
    captured = capture_mlp_inputs(dense, torch.randint(3, 97, (16, 32)), progress=False)
    fresh = capture_mlp_inputs(dense, torch.randint(3, 97, (8, 32)), seed=1, progress=False)
    return dense, sparse, captured.inputs, fresh.inputs


def layer_mse(sparse, dense, inputs):
    with torch.no_grad():
        return [float(torch.nn.functional.mse_loss(s.mlp(x), d.mlp(x)))
                for s, d, x in zip(sparse.model.layers, dense.model.layers, inputs)]


def test_distillation_lowers_layer_mse_on_unseen_inputs(setup):
    dense, converted, inputs, unseen = setup
    sparse = copy.deepcopy(converted)
    before = layer_mse(sparse, dense, unseen)
    reports = distill_layers(sparse, dense, inputs, steps=80, lr=1e-3, progress=False)
    after = layer_mse(sparse, dense, unseen)
    for report in reports:
        assert report.mse_after < 0.9 * report.mse_before
    for b, a in zip(before, after):
        assert a < 0.9 * b


def test_sequential_distillation_fits_each_layer_on_what_its_sparse_predecessors_feed_it(setup, monkeypatch):
    dense, converted, _, _ = setup
    sparse = copy.deepcopy(converted)
    ids = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(5))
    dense_inputs = capture_mlp_inputs(dense, ids, tokens_per_layer=128, progress=False).inputs
    seen = {}
    original = distillation.distill_layer

    def recording(mlp, dense_mlp, inputs, **options):
        seen[options["layer_index"]] = inputs.clone()
        return original(mlp, dense_mlp, inputs, **options)

    monkeypatch.setattr(distillation, "distill_layer", recording)
    reports = distill_layers(sparse, dense, dense_inputs, sequential_ids=ids, steps=40, lr=1e-3, progress=False)
    assert [r.mse_after < r.mse_before for r in reports] == [True, True]
    torch.testing.assert_close(seen[0], dense_inputs[0])  # nothing sparse before layer 0
    # layer 1 saw the sparse model's inputs (layer 0 distilled, as it is now), not the dense model's
    after_layer_0 = capture_mlp_inputs(sparse, ids, tokens_per_layer=128, progress=False, only_layer=1).inputs[1]
    torch.testing.assert_close(seen[1], after_layer_0)
    assert (seen[1] - dense_inputs[1]).abs().max() > 1e-2

    # Keeping fewer tokens than the windows hold: a sample of those same rows, one walk through the layers.
    walks = []
    real_replay = distillation.LayerReplay
    monkeypatch.setattr(distillation, "LayerReplay", lambda *a, **k: walks.append(1) or real_replay(*a, **k))
    fresh = copy.deepcopy(converted)
    seen.clear()
    distill_layers(fresh, dense, [x[:50] for x in dense_inputs], sequential_ids=ids, steps=40, lr=1e-3, progress=False)
    full = capture_mlp_inputs(fresh, ids, tokens_per_layer=128, progress=False, only_layer=1).inputs[1]
    assert walks == [1] and seen[1].shape == (50, full.shape[1])
    distance = torch.cdist(seen[1], full, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    assert distance.max() < 1e-4


def test_killed_run_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    dense, converted, inputs, _ = setup
    uninterrupted = copy.deepcopy(converted)
    distill_layers(uninterrupted, dense, inputs, steps=30, lr=1e-3, work_dir=tmp_path / "a", progress=False)

    real = distillation.distill_layer

    def dies_on_layer_one(*args, layer_index, **kwargs):
        if layer_index == 1:
            raise KeyboardInterrupt  # as if killed after layer 0 was saved
        return real(*args, layer_index=layer_index, **kwargs)

    monkeypatch.setattr(distillation, "distill_layer", dies_on_layer_one)
    with pytest.raises(KeyboardInterrupt):
        distill_layers(copy.deepcopy(converted), dense, inputs, steps=30, lr=1e-3, work_dir=tmp_path / "b",
                       progress=False)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["layer_0000.pt"]
    monkeypatch.setattr(distillation, "distill_layer", real)
    resumed = copy.deepcopy(converted)  # a new process starts again from the converted model
    distill_layers(resumed, dense, inputs, steps=30, lr=1e-3, work_dir=tmp_path / "b", progress=False)
    for (key, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_nan_stops_with_a_clear_error(setup):
    dense, converted, inputs, _ = setup
    sparse = copy.deepcopy(converted)
    poisoned = inputs[0].clone()
    poisoned[:] = float("nan")
    with pytest.raises(FloatingPointError, match="layer 0: distillation loss became nan"):
        distill_layer(sparse.model.layers[0].mlp, dense.model.layers[0].mlp, poisoned, steps=5)
