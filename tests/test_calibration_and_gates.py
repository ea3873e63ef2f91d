"""Calibration capture and MGS gate training on tiny models."""

import json

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec
from treeffn_hf.conversion.budgets import calibrate_mgs
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
from treeffn_hf.conversion.gate_training import (
    activation_magnitude,
    gate_recall,
    top_k_mask,
    train_gate,
    train_gates,
)

from .conftest import tiny_dense_model


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()


def test_read_texts_from_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(read_texts(tmp_path / "a.txt")) == ["hello world"]
    assert list(read_texts(tmp_path / "b.jsonl")) == ["one", "two"]


def test_token_windows_cut_fixed_windows():
    windows = token_windows(iter(["abcdefghij" * 3]), CharTokenizer(), window=7, max_windows=3)
    assert windows.shape == (3, 7)
    assert windows.flatten().tolist() == [3 + ord(c) % 90 for c in ("abcdefghij" * 3)[:21]]
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(iter(["abc"]), CharTokenizer(), window=7, max_windows=3)


def test_capture_keeps_exact_mlp_inputs_and_bounds_memory():
    model = tiny_dense_model("llama")
    windows = torch.randint(3, 97, (4, 16))
    seen = {i: [] for i in range(2)}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].reshape(-1, 48).clone()))
             for i, layer in enumerate(model.model.layers)]
    captured = capture_mlp_inputs(model, windows, tokens_per_layer=1000, progress=False)
    for hook in hooks:
        hook.remove()
    assert captured.tokens_seen == 64
    for i in range(2):
        torch.testing.assert_close(captured.inputs[i], torch.cat(seen[i]))
    bounded = capture_mlp_inputs(model, windows, tokens_per_layer=10, batch_size=2, progress=False)
    everything = torch.cat(seen[0])
    assert bounded.inputs[0].shape == (10, 48)
    for row in bounded.inputs[0]:  # every kept row is one of the real inputs
        assert (everything - row).abs().sum(1).min() < 1e-6


def test_labels_are_the_top_k_contributions():
    sparse = treeffn_hf.convert(tiny_dense_model("llama"), MGSSpec(density=0.1, predictor="linear", rank=8), progress=False)
    mlp = sparse.model.layers[0].mlp
    x = torch.randn(5, 48)
    labels = top_k_mask(activation_magnitude(mlp, x), 17)
    contribution = (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)).abs()
    for row, label in zip(contribution, labels):
        assert set(torch.argsort(row, descending=True)[:17].tolist()) == set(torch.nonzero(label).flatten().tolist())


def test_gate_training_raises_recall_above_a_random_gate():
    torch.manual_seed(0)
    sparse = treeffn_hf.convert(tiny_dense_model("llama"), MGSSpec(density=0.1, predictor="linear", rank=16), progress=False)
    mlp = sparse.model.layers[0].mlp
    with torch.no_grad():  # start from a random gate, not the SVD initialisation
        for p in mlp.micro_gate.parameters():
            p.normal_(0, 0.1)
    inputs = torch.randn(3000, 48)
    held_out = torch.randn(500, 48)
    labels = top_k_mask(activation_magnitude(mlp, held_out), mlp.spec.top_k(166))
    random_recall = gate_recall(mlp, held_out, labels)
    for p in mlp.parameters():
        p.requires_grad_(p in set(mlp.micro_gate.parameters()))
    report = train_gate(mlp, inputs, steps=300)
    assert random_recall < 0.3
    assert report.recall_after > report.recall_before
    assert gate_recall(mlp, held_out, labels) > 3 * random_recall


def test_train_gates_on_captured_inputs_restores_trainability():
    model = tiny_dense_model("qwen2")
    sparse = treeffn_hf.convert(model, MGSSpec(density=0.25, predictor="linear", rank=8), progress=False)
    captured = capture_mlp_inputs(model, torch.randint(3, 97, (8, 32)), progress=False)
    flags = {n: p.requires_grad for n, p in sparse.named_parameters()}
    reports = train_gates(sparse, captured.inputs, steps=40, progress=False)
    assert [r.layer for r in reports] == [0, 1]
    assert all(r.recall_after >= r.recall_before for r in reports)
    assert {n: p.requires_grad for n, p in sparse.named_parameters()} == flags


def test_missing_calibration_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        list(read_texts(tmp_path / "missing.txt"))


@pytest.mark.parametrize("predictor", ["linear", "quantized"])
def test_threshold_selection_is_calibrated_to_the_density(tmp_path, predictor):
    dense = tiny_dense_model("llama")
    sparse = treeffn_hf.convert(dense, MGSSpec(density=0.2, predictor=predictor, rank=8), progress=False)
    torch.manual_seed(0)
    captured = capture_mlp_inputs(dense, torch.randint(3, 97, (16, 32)), progress=False)
    unseen = capture_mlp_inputs(dense, torch.randint(3, 97, (16, 32)), seed=1, progress=False)
    thresholds = calibrate_mgs(sparse, captured.inputs, allocation="uniform", progress=False)["thresholds"]
    assert len(thresholds) == 2 and sparse.config.sparse_mlp["selection"] == "threshold"
    for (index, mlp), threshold in zip(sparse.sparse_mlps(), thresholds):
        assert mlp.spec.selection == "threshold" and float(mlp.gate_threshold) == pytest.approx(threshold)
        mlp.reset_density()
        with torch.no_grad():
            mlp(unseen.inputs[index])
        assert mlp.measured_units() / mlp.intermediate_size == pytest.approx(0.2, abs=0.04)
    treeffn_hf.save(sparse, tmp_path / "m")
    reloaded = treeffn_hf.load(tmp_path / "m")
    assert reloaded.config.sparse_mlp["selection"] == "threshold"
    for (_, a), (_, b) in zip(sparse.sparse_mlps(), reloaded.sparse_mlps()):
        assert b.spec.selection == "threshold" and torch.equal(a.gate_threshold, b.gate_threshold)


@pytest.mark.parametrize("spec", [MGSSpec(density=0.25, predictor="linear", rank=8), treeffn_hf.TreeSpec(depth=2, node_width=1)],
                         ids=["mgs-gates", "tree-distill"])
def test_recovery_does_not_depend_on_the_global_random_state(spec):
    """Same data, different global RNG state, identical weights: every random draw of conversion,
    capture, routing fit, gate training and distillation comes from its own seeded generator."""
    from treeffn_hf.conversion.distillation import distill_layers

    dense = tiny_dense_model("llama")
    tokens = torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(3))
    states = []
    for global_seed in (0, 12345):
        torch.manual_seed(global_seed)
        sparse = treeffn_hf.convert(dense, spec, progress=False)
        captured = capture_mlp_inputs(dense, tokens, tokens_per_layer=64, progress=False)
        if spec.method == "mgs":
            train_gates(sparse, captured.inputs, steps=20, progress=False)
        else:
            distill_layers(sparse, dense, captured.inputs, steps=20, progress=False)
        states.append(sparse.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
