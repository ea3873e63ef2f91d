"""Per-layer forest shapes: candidates within the budget, the search picks each layer's best by
its distilled error, and a model of mixed shapes converts, saves, prunes and reloads."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_dense_model
from treeffn_hf import TreeSpec, convert, load, save
from treeffn_hf.conversion import shape_search
from treeffn_hf.conversion.calibration import capture_mlp_inputs
from treeffn_hf.conversion.shape_search import active_budget, search_tree_shapes, shape_candidates
from treeffn_hf.modeling.layer_spec import InvalidSpecError, tree_shape_at
from treeffn_hf.pruning import prune_dead_paths

HIDDEN, INTERMEDIATE = 48, 166


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.25, 0.125])
def test_every_candidate_places_each_neuron_once_and_stays_within_the_budget(fraction):
    budget = active_budget(INTERMEDIATE, fraction)
    shapes = shape_candidates(HIDDEN, INTERMEDIATE, fraction, depths=(1, 2, 3, 4))
    assert shapes
    for spec in shapes:
        assert spec.stored_units == INTERMEDIATE
        assert 0.85 * budget <= spec.active_units <= budget


def test_tree_shape_at_is_the_closest_fit_under_the_budget():
    # 1 tree of depth 3, node width 1: a token computes 1536 - 4 - 7 * leaf neurons.
    spec = tree_shape_at(576, 1536, 384, depth=3)
    assert (spec.leaf_width, spec.shared_width, spec.active_units) == (164, 217, 384)
    wider = TreeSpec(depth=3, node_width=1, leaf_width=163, shared_width=1536 - 7 - 8 * 163).resolve(576, 1536)
    assert wider.active_units > 384  # one neuron narrower a leaf is over the budget
    assert tree_shape_at(576, 1536, 384, depth=1) is None  # two leaves cannot go under half


def test_active_budget_does_not_lose_a_neuron_to_float_error():
    assert active_budget(1000, 0.3) == 300


@pytest.fixture(scope="module")
def calibrated():
    dense = tiny_dense_model("llama")
    captured = capture_mlp_inputs(dense, torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(0)),
                                  progress=False)
    return dense, captured.inputs


def test_search_chooses_each_layers_lowest_error_candidate_within_budget(calibrated):
    dense, inputs = calibrated
    candidates = shape_candidates(HIDDEN, INTERMEDIATE, 0.3, depths=(2, 3), tree_counts=(1, 2))
    report = search_tree_shapes(dense, inputs, 0.3, candidates=candidates, screen_layers=None, steps=10,
                                progress=False)
    assert len(report.layers) == dense.config.num_hidden_layers
    for choice in report.layers:
        assert len(choice.trials) == len(candidates)
        best = min(choice.trials, key=lambda t: t.relative_error)
        assert choice.shape == best.shape
        assert TreeSpec(**choice.shape).resolve(HIDDEN, INTERMEDIATE).active_units <= report.active_units


def test_screening_keeps_only_the_finalists_for_the_other_layers(calibrated, monkeypatch):
    dense, inputs = calibrated
    candidates = shape_candidates(HIDDEN, INTERMEDIATE, 0.3, depths=(2, 3), tree_counts=(1, 2))
    assert len(candidates) > 2
    fits = []
    original = shape_search.fit_candidate

    def counting(spec, *args, **kwargs):
        fits.append((kwargs["layer_index"], spec))
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(shape_search, "fit_candidate", counting)
    report = search_tree_shapes(dense, inputs, 0.3, candidates=candidates, screen_layers=1, finalists=2, steps=5,
                                progress=False)
    screened = [spec for layer, spec in fits if layer == 0]
    later = [spec for layer, spec in fits if layer == 1]
    assert len(screened) == len(candidates) and len(later) == 2
    assert [s.shape() for s in later] == report.finalists
    assert report.layers[1].shape in report.finalists


def test_a_candidate_over_the_budget_is_refused(calibrated):
    dense, inputs = calibrated
    too_big = TreeSpec(depth=2, node_width=1)
    with pytest.raises(InvalidSpecError, match="over the budget"):
        search_tree_shapes(dense, inputs, 0.1, candidates=[too_big], progress=False)


def test_a_model_of_per_layer_shapes_round_trips_and_prunes(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_dense_model("llama")
    shapes = [TreeSpec(depth=2, node_width=1), TreeSpec(num_trees=2, depth=3, node_width=1)]
    model = convert(dense, shapes, progress=False).eval()
    assert [m.spec for _, m in model.sparse_mlps()] == [s.resolve(HIDDEN, INTERMEDIATE) for s in shapes]
    assert model.config.sparse_mlp["layer_shapes"][1]["num_trees"] == 2
    ids = torch.randint(3, 90, (1, 12))
    pruned, _ = prune_dead_paths(model, ids, progress=False)
    save(pruned, tmp_path / "mixed")
    for reloaded in (load(tmp_path / "mixed"),
                     AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", trust_remote_code=True)):
        reloaded.eval()
        assert [m.spec for _, m in reloaded.sparse_mlps()] == [m.spec for _, m in pruned.sparse_mlps()]
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, rtol=1e-5, atol=1e-6)


def test_per_layer_specs_must_be_trees_and_one_per_layer():
    dense = tiny_dense_model("llama")
    with pytest.raises(InvalidSpecError, match="1 layer specs for a model of 2"):
        convert(dense, [TreeSpec(depth=2)], progress=False)
