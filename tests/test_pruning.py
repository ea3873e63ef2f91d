"""Pruning dead paths into a smaller static tree: same outputs where the paths live, fewer weights,
saved and reloaded (also through remote code), bad input refused."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_dense_model
from treeffn_hf import TreeSpec, convert, load, save
from treeffn_hf.modeling.layer_spec import InvalidSpecError, spec_from_dict
from treeffn_hf.pruning import live_leaves_from_counts, prune_dead_paths, prune_from_stats
from treeffn_hf.tree_stats import collect_tree_stats

SPECS = [TreeSpec(depth=3, node_width=1), TreeSpec(num_trees=2, depth=3, node_width=2, routing="hyperplane")]


def tree_model(spec: TreeSpec):
    return convert(tiny_dense_model("llama"), spec, progress=False).eval()


def logits(model, ids: torch.Tensor, path: str) -> torch.Tensor:
    for _, mlp in model.sparse_mlps():
        mlp.force_path = path
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("spec", SPECS, ids=["self", "hyperplane-2trees"])
def test_pruned_model_matches_on_the_pruning_text_and_stores_fewer_rows(spec):
    model = tree_model(spec)
    seen = torch.randint(3, 90, (1, 6))  # few tokens: most paths stay dead
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prune_dead_paths(model, seen, progress=False)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    for path in ("reference", "torch"):  # the same sums (the reference's matmul order may differ in the last bit)
        torch.testing.assert_close(logits(pruned, seen, path), logits(model, seen, path), rtol=1e-5, atol=1e-6)
    assert report.stored_units_after < report.stored_units_before
    for layer_report, (_, mlp) in zip(report.layers, pruned.sparse_mlps()):
        assert mlp.gate_rows.shape[0] == layer_report.stored_units_after == mlp.spec.stored_units
        assert layer_report.leaves_after == mlp.spec.stored_leaves < layer_report.leaves_before
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # Active units per token are unchanged: pruning removes storage, not work per token.
    assert pruned.sparse_cost().unit_fraction == model.sparse_cost().unit_fraction


def test_new_text_never_reaches_a_pruned_leaf_and_every_path_agrees():
    model = tree_model(SPECS[0])
    pruned, _ = prune_dead_paths(model, torch.randint(3, 90, (1, 5)), progress=False)
    fresh = torch.randint(3, 90, (3, 20))
    for layer, (_, mlp) in zip(collect_tree_stats(pruned, fresh, progress=False), pruned.sparse_mlps()):
        counts = layer.leaf_counts[0]
        assert all(counts[leaf] == 0 for leaf in range(mlp.spec.num_leaves) if leaf not in mlp.spec.live_leaves[0])
    torch.testing.assert_close(logits(pruned, fresh, "torch"), logits(pruned, fresh, "reference"),
                               rtol=1e-5, atol=1e-5)
    one = fresh[:1, :1]  # the one-token decode path walks the tree in Python
    torch.testing.assert_close(logits(pruned, one, "torch"), logits(pruned, one, "reference"), rtol=1e-5, atol=1e-5)


def test_pruning_twice_keeps_shrinking_and_min_tokens_prunes_rare_paths():
    model = tree_model(SPECS[0])
    text = torch.randint(3, 90, (2, 30))
    once, first = prune_dead_paths(model, text, progress=False)
    twice, second = prune_dead_paths(once, text[:, :4], progress=False)
    assert second.stored_units_after <= first.stored_units_after
    torch.testing.assert_close(logits(twice, text[:, :4], "torch"), logits(model, text[:, :4], "torch"),
                               rtol=1e-5, atol=1e-6)
    strict, report = prune_dead_paths(model, text, min_tokens=10, progress=False)
    assert report.stored_units_after <= first.stored_units_after
    assert all(len(m.spec.live_leaves[0]) >= 1 for _, m in strict.sparse_mlps())


def test_one_stats_pass_prunes_at_several_thresholds_as_prune_dead_paths_does():
    model = tree_model(SPECS[0])
    text = torch.randint(3, 90, (2, 30))
    stats = collect_tree_stats(model, text, progress=False)
    for min_tokens in (1, 3, 10):
        from_stats, report = prune_from_stats(model, stats, min_tokens=min_tokens)
        direct, expected = prune_dead_paths(model, text, min_tokens=min_tokens, progress=False)
        assert report == expected and report.tokens == text.numel()
        assert [m.spec for _, m in from_stats.sparse_mlps()] == [m.spec for _, m in direct.sparse_mlps()]
    with pytest.raises(ValueError, match="every tree layer"):
        prune_from_stats(model, stats[1:])


def test_live_leaves_from_counts_keeps_the_busiest_leaf_when_all_are_rare():
    assert live_leaves_from_counts([[0, 3, 0, 1]], min_tokens=1) == ((1, 3),)
    assert live_leaves_from_counts([[0, 3, 0, 1]], min_tokens=5) == ((1,),)


def test_pruned_checkpoint_round_trips_through_save_load_and_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tree_model(SPECS[1])
    ids = torch.randint(3, 90, (1, 8))
    pruned, _ = prune_dead_paths(model, ids, progress=False)
    save(pruned, tmp_path / "pruned")
    config = (tmp_path / "pruned" / "config.json").read_text()
    assert "layer_live_leaves" in config
    for reloaded in (load(tmp_path / "pruned"),
                     AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True)):
        reloaded.eval()
        assert [m.spec for _, m in reloaded.sparse_mlps()] == [m.spec for _, m in pruned.sparse_mlps()]
        torch.testing.assert_close(logits(reloaded, ids, "torch"), logits(pruned, ids, "torch"), rtol=1e-5, atol=1e-6)


def test_leaf_slots_and_forced_branches_of_a_pruned_spec():
    spec = TreeSpec(num_trees=2, depth=2, node_width=1, leaf_width=2, shared_width=0, live_leaves=((1, 2), (3,)))
    assert spec.leaf_slots() == [[-1, 0, 1, -1], [-1, -1, -1, 2]]
    # Compute tables point pruned leaves at a live block of their tree (valid memory, never used).
    assert spec.leaf_slots(pruned_to_live=True) == [[0, 0, 1, 0], [2, 2, 2, 2]]
    # Heap order (root, left child, right child): tree 1 can only go right, twice.
    assert spec.forced_branches() == [[0, 1, -1], [1, 0, 1]]
    assert spec.stored_leaves == 3 and spec.stored_units == 2 * 3 * 1 + 3 * 2


def test_bad_live_leaves_and_converting_to_a_pruned_tree_are_refused():
    for live, message in [(((),), "keeps no leaf"), (((3, 1),), "increasing order"), (((0, 8),), r"\[0, 8\)"),
                          (((0,), (1,)), "one tuple per tree")]:
        with pytest.raises(InvalidSpecError, match=message):
            TreeSpec(depth=3, node_width=1, live_leaves=live).validate()
    with pytest.raises(InvalidSpecError, match="treeffn prune"):
        convert(tiny_dense_model("llama"), TreeSpec(depth=3, node_width=1, live_leaves=((0, 1),)), progress=False)
    # The spec survives its JSON form (lists) unchanged, and stays hashable.
    spec = TreeSpec(depth=3, node_width=1, live_leaves=((0, 5),))
    back = spec_from_dict({**spec.to_dict(), "live_leaves": [[0, 5]]})
    assert back == spec and hash(back) == hash(spec)
