"""One workflows layer: every CLI subcommand is its Python function, with the same defaults and output."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import pytest

from treeffn_hf import workflows
from treeffn_hf.cli import convert, distill, evaluate, finetune, prune
from treeffn_hf.cli.main import main

from .conftest import char_tokenizer, tiny_dense_model

# options whose parameter has another name
PARAMETER_NAMES = {"sparsity_ramp": "sparsity_ramp_steps"}
# (subcommand module, its function, CLI options that are not parameters of the function)
SUBCOMMANDS = [
    (convert, workflows.convert_checkpoint, {"method", "json"}),
    (distill, workflows.distill_checkpoint, set()),
    (finetune, workflows.finetune_checkpoint, {"no_straight_through"}),
    (prune, workflows.prune_checkpoint, set()),
    (evaluate, workflows.evaluate_checkpoint, {"json"}),
]


@pytest.mark.parametrize("module, function, cli_only", SUBCOMMANDS, ids=lambda v: getattr(v, "NAME", ""))
def test_every_cli_default_is_the_functions_default(module, function, cli_only):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    parameters = inspect.signature(function).parameters
    compared = 0
    for action in parser._actions:
        name = PARAMETER_NAMES.get(action.dest, action.dest)
        if name in ("help", "no_progress") or name in cli_only or action.default is None:
            continue
        if name not in parameters:  # layer options build the spec, not keyword arguments
            assert module is convert, f"--{name} of `treeffn {module.NAME}` is no parameter of {function.__name__}"
            continue
        default = parameters[name].default
        if isinstance(default, tuple):
            default = list(default)
        assert action.default == default, f"`treeffn {module.NAME} --{name}`: {action.default!r} vs {default!r}"
        compared += 1
    assert compared >= 1  # the test compares something


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workflows")
    dense = root / "dense"
    tiny_dense_model("llama").save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    assert main(["convert", str(dense), str(root / "tree"), "--method", "tree", "--depth", "3", "--node-width", "2",
                 "--no-progress"]) == 0
    char_tokenizer().save_pretrained(root / "tree")
    (root / "text.txt").write_text(" ".join(f"word{i % 37} and some text" for i in range(400)))
    return root


def test_prune_from_the_cli_and_the_api_write_the_same_checkpoint(tree_dir, capsys):
    text = tree_dir / "text.txt"
    args = dict(text=str(text), windows=2, window=16, min_tokens=2)
    record = workflows.prune_checkpoint(tree_dir / "tree", tree_dir / "pruned_api", progress=False, **args)
    assert main(["prune", str(tree_dir / "tree"), str(tree_dir / "pruned_cli"), "--text", str(text), "--windows", "2",
                 "--window", "16", "--min-tokens", "2", "--no-progress"]) == 0
    assert f"kept {sum(layer['leaves_after'] for layer in record['layers'])} of" in capsys.readouterr().out
    for name in ("model.safetensors", "prune_report.json", "config.json"):
        assert (tree_dir / "pruned_api" / name).read_bytes() == (tree_dir / "pruned_cli" / name).read_bytes(), name
    assert json.loads((tree_dir / "pruned_api" / "prune_report.json").read_text()) == record
    assert record["stored_units_after"] < record["stored_units_before"]


def test_eval_from_the_cli_and_the_api_give_the_same_figures(tree_dir, capsys, tmp_path):
    text = tree_dir / "text.txt"
    result = workflows.evaluate_checkpoint(tree_dir / "tree", baseline=str(tree_dir / "dense"), text=text, windows=2,
                                           tree_stats=tmp_path / "api", progress=False)
    capsys.readouterr()
    assert main(["eval", str(tree_dir / "tree"), "--baseline", str(tree_dir / "dense"), "--text", str(text),
                 "--windows", "2", "--tree-stats", str(tmp_path / "cli"), "--json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert result["windows"] == 2 and result["perplexity_ratio"] == pytest.approx(
        result["perplexity"] / result["baseline_perplexity"])
    assert 0 < result["active_unit_fraction"] < 1
    assert (tmp_path / "api" / "tree_stats.json").read_bytes() == (tmp_path / "cli" / "tree_stats.json").read_bytes()
