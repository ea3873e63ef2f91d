"""`treeffn distill` end to end on tiny models with a real (character-level) tokenizer."""

import json

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec
from treeffn_hf.cli.main import main

from .conftest import DATA_DIR, char_tokenizer, tiny_dense_model


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "llama"
    tiny_dense_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def save_sparse(dense_dir, path, spec) -> None:
    dense, tokenizer = treeffn_hf.load_dense(str(dense_dir))
    treeffn_hf.save(treeffn_hf.convert(dense, spec, progress=False), path, tokenizer=tokenizer)


def assert_refused(dense_dir, tmp_path, capsys, spec, flags: list[str], message: str) -> None:
    """`treeffn distill` with `flags` on a checkpoint of `spec` fails with `message`, leaving nothing behind."""
    save_sparse(dense_dir, tmp_path / "sparse", spec)
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), *flags, "--no-progress"])
    assert code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "distill-work" in p.name]


@pytest.mark.parametrize("spec,selection", [(TreeSpec(depth=3, node_width=2), None),
                                            (TreeSpec(depth=3, node_width=1, routing="hyperplane",
                                                      leaf_neurons="selected", leaf_width=40, shared_width=4), None),
                                            (MGSSpec(density=0.1, predictor="linear", rank=8), "top_k"),
                                            (MGSSpec(density=0.1, predictor="linear", rank=8), None),
                                            (MGSSpec(density=0.3), None)],
                         ids=["tree", "tree-selected", "mgs-linear-top-k", "mgs-linear", "mgs-quantized"])
def test_distill_cli(dense_dir, tmp_path, capsys, spec, selection):
    save_sparse(dense_dir, tmp_path / "sparse", spec)
    calibration = DATA_DIR / "wikitext-2" / "valid.txt"
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(calibration), "--windows", "8", "--window", "64", "--gate-steps", "40",
                 "--distill-steps", "40", "--lr", "1e-3", "--no-progress"]
                + (["--selection", selection] if selection else []))
    stdout, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "treeffn_distill.json").read_text())
    trained = spec.method == "tree" or spec.predictor == "linear"  # the 4-bit predictor has nothing to fit
    assert summary["calibration"]["tokens"] == 8 * 64 and len(summary["layers"]) == (2 if trained else 0)
    assert summary["sequential"] is (True if spec.method == "tree" else None)  # trees: sequential by default
    if spec.method == "tree":
        assert all(r["mse_after"] < r["mse_before"] for r in summary["layers"])
        assert all(0 < r["captured_mass_after"] <= 1 for r in summary["layers"])  # the routing was fitted
        assert "activation mass on the tokens' paths" in stdout
    elif spec.predictor == "linear":
        assert all(r["recall_after"] >= r["recall_before"] for r in summary["layers"])
    distilled = treeffn_hf.load(tmp_path / "out")
    assert distilled.config.sparse_mlp["method"] == spec.method
    if spec.method == "tree" and spec.leaf_neurons == "selected":  # 7 nodes + 8 leaves of 40 + 4 shared = 331 rows for 166 neurons
        assert all(m.stored_multiple > 1.9 for _, m in distilled.sparse_mlps())
        assert main(["info", str(tmp_path / "out")]) == 0 and "stored rows     1.99x" in capsys.readouterr().out
    if spec.method == "mgs" and selection is None:  # the default: thresholds within a perplexity budget
        budget = summary["budget"]
        thresholds = budget["thresholds"]
        assert distilled.config.sparse_mlp["selection"] == "threshold" and len(thresholds) == 2
        assert [float(m.gate_threshold) for _, m in distilled.sparse_mlps()] == pytest.approx(thresholds)
        assert distilled.config.sparse_mlp["layer_densities"] == pytest.approx(budget["layer_densities"])
        assert budget["max_ratio"] == 1.01 and budget["calibration_ratio"] <= 1.01
        assert "calibration perplexity x" in stdout
    elif spec.method == "mgs":
        assert distilled.config.sparse_mlp["selection"] == "top_k" and summary["budget"] is None
    refits = summary["down_proj_refit"]
    assert [r["layer"] for r in refits] == ([0, 1] if spec.method == "mgs" else [])
    assert all(r["mse_after"] <= r["mse_before"] for r in refits)
    if refits:
        assert "down_proj refitted in" in stdout
    assert not [p for p in tmp_path.iterdir() if "distill-work" in p.name]


def test_distill_at_a_density_without_refit_keeps_the_dense_down_proj(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", MGSSpec(density=0.3))
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--windows", "4", "--window", "64",
                 "--density", "0.4", "--no-refit-down", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "treeffn_distill.json").read_text())
    assert summary["down_proj_refit"] == [] and summary["budget"]["layer_densities"] == pytest.approx([0.4, 0.4])
    converted, distilled = treeffn_hf.load(tmp_path / "sparse"), treeffn_hf.load(tmp_path / "out")
    for (_, before), (_, after) in zip(converted.sparse_mlps(), distilled.sparse_mlps()):
        assert torch.equal(before.down_proj.weight, after.down_proj.weight)


def test_distill_refuses_a_dense_model_of_another_shape(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=3, node_width=2))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = tiny_dense_model("llama").config.to_dict()
    config.update(num_hidden_layers=3)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(other)
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(other),
                 "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--no-progress"])
    assert code == 1 and "not the dense model" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if "distill-work" in p.name]


def test_a_work_dir_is_resumed_only_by_the_same_run(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=3, node_width=2))
    work = tmp_path / ".out.distill-work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"from": "another run"}))
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--no-progress"])
    assert code == 1 and "holds a run with other inputs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_calibration_file_is_a_one_line_error(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=3, node_width=2))
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(tmp_path / "missing.txt"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no such calibration file" in err and "Traceback" not in err


def test_threshold_selection_is_refused_for_trees(dense_dir, tmp_path, capsys):
    assert_refused(dense_dir, tmp_path, capsys, TreeSpec(depth=2, node_width=1), ["--selection", "threshold"],
                   "MGS models only")


def test_a_density_with_top_k_selection_is_refused(dense_dir, tmp_path, capsys):
    assert_refused(dense_dir, tmp_path, capsys, MGSSpec(density=0.3), ["--selection", "top_k", "--density", "0.2"],
                   "not with --selection top_k")


def test_distill_with_active_searches_a_shape_per_layer_and_info_prints_them(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=2, node_width=1))
    args = ["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
            "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--windows", "4", "--window", "64",
            "--distill-steps", "10", "--active", "0.3", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "shapes at <= 49 active neurons a token" in stdout
    summary = json.loads((tmp_path / "out" / "treeffn_distill.json").read_text())
    chosen = [layer["shape"] for layer in summary["shape_search"]["layers"]]
    distilled = treeffn_hf.load(tmp_path / "out")
    specs = [m.spec for _, m in distilled.sparse_mlps()]
    assert [s.shape() for s in specs] == chosen and all(s.active_units <= 49 for s in specs)
    assert main(["info", str(tmp_path / "out")]) == 0
    info = capsys.readouterr().out
    for index, spec in enumerate(specs):
        assert f"layer {index:<9} {spec.num_trees} tree(s), depth {spec.depth}" in info
        assert f"{spec.active_units} neurons a token" in info


@pytest.mark.parametrize("allocation", ["greedy", "uniform"])
def test_distill_with_active_allocates_selected_leaf_widths(dense_dir, tmp_path, capsys, allocation):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=2, node_width=0, routing="hyperplane",
                                                         leaf_neurons="selected", leaf_width=40, shared_width=0))
    args = ["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
            "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--windows", "4", "--window", "64",
            "--distill-steps", "10", "--active", "0.2", "--no-progress"]
    # uniform is the default: greedy is asked for
    assert main(args + (["--allocation", "greedy"] if allocation == "greedy" else [])) == 0, capsys.readouterr().err
    assert f"leaf widths ({allocation}) at 20.0% active" in capsys.readouterr().out
    budget = json.loads((tmp_path / "out" / "treeffn_distill.json").read_text())["budget"]
    widths = [m.spec.leaf_width for _, m in treeffn_hf.load(tmp_path / "out").sparse_mlps()]
    assert widths == [shape["leaf_width"] for shape in budget["layer_specs"]]
    assert sum(widths) <= 0.2 * 166 * 2 and sum(widths) >= 0.2 * 166 * 2 - 2  # the mean, rounded down per layer
    if allocation == "uniform":
        assert widths == [33, 33] and budget["sensitivities"] is None
    else:
        assert len(budget["sensitivities"]) == 2


def test_allocation_is_refused_for_a_tree_without_active_widths(dense_dir, tmp_path, capsys):
    assert_refused(dense_dir, tmp_path, capsys, TreeSpec(depth=2, node_width=1), ["--allocation", "greedy"],
                   "--allocation shares out")


def test_active_is_refused_for_mgs(dense_dir, tmp_path, capsys):
    assert_refused(dense_dir, tmp_path, capsys, MGSSpec(density=0.3), ["--active", "0.2"], "tree models only")


def test_distill_no_sequential_fits_trees_on_the_dense_inputs(dense_dir, tmp_path, capsys):
    save_sparse(dense_dir, tmp_path / "sparse", TreeSpec(depth=3, node_width=2))
    code = main(["distill", str(tmp_path / "sparse"), str(tmp_path / "out"), "--dense", str(dense_dir),
                 "--calibration", str(DATA_DIR / "wikitext-2" / "valid.txt"), "--windows", "8", "--window", "64",
                 "--distill-steps", "20", "--no-sequential", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "treeffn_distill.json").read_text())["sequential"] is False
