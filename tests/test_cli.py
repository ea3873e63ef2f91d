"""The `treeffn` CLI and the optimum-cli plugin: happy paths and every kind of bad input.

Each bad input must give a one-line error, a non-zero exit, and leave nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from treeffn_hf import MGSSpec
from treeffn_hf.cli.main import main

from .conftest import char_tokenizer, tiny_dense_model

BIN = Path(sys.executable).parent
TREE_ARGS = ["--method", "tree", "--depth", "3", "--node-width", "2", "--no-progress"]


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".probe-" in p.name]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dense") / "tiny-llama"
    tiny_dense_model("llama").save_pretrained(path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("treeffn: error: ")]
    assert len(errors) == 1, err
    assert pattern in errors[0], errors[0]


@pytest.mark.parametrize("argv", [[], ["convert"], ["distill"], ["finetune"], ["prune"], ["info"], ["eval"], ["push"],
                                  ["demo"]])
def test_help_on_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: treeffn" in capsys.readouterr().out


def test_the_demo_compares_answers_up_to_their_first_sentence_end():
    from treeffn_hf.cli.demo import first_sentence

    assert first_sentence(" Paris.\n\nThe answer is: 2018") == "Paris."
    assert first_sentence(' "Hamlet" (1609). The play') == '"Hamlet" (1609).'
    assert first_sentence(" 2.5 kg of it, and") == "2.5 kg of it, and"  # no sentence end: all of it
    assert first_sentence("red\nblue") == "red"


def test_convert_then_info(dense_dir, tmp_path, capsys):
    before = tree_hash(dense_dir)
    out = tmp_path / "tree"
    code, stdout, _ = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS)
    assert code == 0 and "active MLP units per token" in stdout
    assert (out / "model.safetensors").is_file() and (out / "modeling_treeffn.py").is_file()
    assert tree_hash(dense_dir) == before, "the source checkpoint must never be modified"
    assert leftovers(tmp_path) == []

    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["method"] == "tree" and info["layer_spec"]["depth"] == 3
    spec = info["layer_spec"]
    rows = spec["depth"] * spec["node_width"] + spec["leaf_width"] + spec["shared_width"]
    assert info["active_unit_fraction"] == pytest.approx(rows / 166)
    assert info["parameters"]["total"] == sum(
        p.numel() for p in tiny_dense_model("llama").parameters()
    )  # a tree re-lays out the dense neurons: same parameter count (tied lm_head counted once)
    assert info["inference_paths"]["cpu"] == "PyTorch sparse path (there is no CPU kernel for TreeFFN)"
    assert info["inference_paths"]["cuda"] == "triton kernels"  # triton is a dev dependency
    assert info["runtime_copy_bytes"] == {"cuda": 0, "cpu": 0}  # trees store the layout their paths read
    code, stdout, _ = run_cli(capsys, "info", out)
    assert "active units" in stdout and "tree" in stdout and "runs on CUDA    triton kernels" in stdout


def test_prune_writes_a_smaller_checkpoint_that_info_reads(dense_dir, tmp_path, capsys):
    tree = tmp_path / "tree"
    assert run_cli(capsys, "convert", dense_dir, tree, *TREE_ARGS)[0] == 0
    char_tokenizer().save_pretrained(tree)
    text = tmp_path / "text.txt"
    text.write_text("a few words of text\n\nand another short document\n")
    before = tree_hash(tree)
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tree, out, "--text", text, "--windows", "2", "--window", "16",
                              "--no-progress")
    assert code == 0 and "leaves; stored MLP units" in stdout
    assert tree_hash(tree) == before and leftovers(tmp_path) == []
    report = json.loads((out / "prune_report.json").read_text())
    assert report["tokens"] == 32 and report["stored_units_after"] < report["stored_units_before"]
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["parameters"]["mlp"] < json.loads(run_cli(capsys, "info", tree, "--json")[1])[
        "parameters"]["mlp"]
    code, _, err = run_cli(capsys, "prune", tree, out, "--text", text, "--windows", "2", "--window", "16")
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(capsys, "prune", dense_dir, tmp_path / "x", "--text", text)
    assert_one_line_error(code, err, "not a treeffn checkpoint")


def test_mgs_convert_through_cli(dense_dir, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "convert", dense_dir, tmp_path / "mgs", "--method", "mgs", "--density", "0.1",
                              "--predictor", "linear", "--rank", "full", "--no-progress")
    assert code == 0
    config = json.loads((tmp_path / "mgs" / "config.json").read_text())
    assert config["sparse_mlp"] == {"method": "mgs", "density": 0.1, "predictor": "linear", "rank": None,
                                    "group_size": 64, "selection": "top_k", "down_format": "int8_rows"}
    code, stdout, _ = run_cli(capsys, "convert", dense_dir, tmp_path / "default", "--method", "mgs", "--no-progress")
    assert code == 0
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    # the default: the 4-bit predictor (groups fitted to the tiny hidden size of 48)
    assert config["sparse_mlp"] == {**MGSSpec().to_dict(), "group_size": 16}
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "default", "--json")
    info = json.loads(stdout)
    assert info["inference_paths"]["cpu"] == ("PyTorch sparse path (the CPU kernel implements the "
                                              "nested predictor with threshold selection, not nested/top_k)")
    # the PyTorch gathers (and the Triton kernels) keep down_proj transposed: 2 layers of 166 x 48 float32
    assert info["runtime_copy_bytes"] == {"cuda": 2 * 166 * 48 * 4, "cpu": 2 * 166 * 48 * 4}
    assert 3 * 2 * 166 * 48 * 4 < info["mlp_weight_bytes"] < 3.5 * 2 * 166 * 48 * 4  # plus the 4-bit predictor
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "default")
    assert "runtime copies  cuda 0.1 MiB (" in stdout
    card = (tmp_path / "default" / "README.md").read_text()
    assert "of the MLP weight bytes on CUDA (down_proj transposed)" in card


@pytest.mark.parametrize("kernel_builds", [True, False])
def test_info_on_a_nested_threshold_checkpoint_whether_or_not_the_kernel_builds(tmp_path, capsys, monkeypatch,
                                                                                 kernel_builds):
    """The default recipe's format (nested predictor, thresholds) on a shape the CPU kernel takes:
    `info` builds its layers on the meta device, which must not reach the kernel's value checks
    (they crashed it on machines where the kernel compiles). Forced both ways, so no CPU skips it."""
    import treeffn_hf
    from treeffn_hf.conversion.budgets import calibrate_mgs
    from treeffn_hf.modeling import mgs_kernels_cpu

    dense = tiny_dense_model("llama", hidden_size=64, intermediate_size=160)
    sparse = treeffn_hf.convert(dense, MGSSpec(group_size=64), progress=False)
    calibrate_mgs(sparse, {index: torch.randn(256, 64) for index in range(2)}, progress=False)
    treeffn_hf.save(sparse, tmp_path / "nested")
    monkeypatch.setattr(mgs_kernels_cpu, "library_error", lambda: None if kernel_builds else "no compiler (forced)")
    code, stdout, err = run_cli(capsys, "info", tmp_path / "nested", "--json")
    assert code == 0, err
    cpu = json.loads(stdout)["inference_paths"]["cpu"]
    assert cpu.startswith("C kernel") if kernel_builds else cpu == "PyTorch sparse path (no compiler (forced))"
    code, stdout, err = run_cli(capsys, "info", tmp_path / "nested")
    assert code == 0 and "runs on CPU" in stdout, err


def test_unsupported_architecture(tmp_path, capsys):
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(src)
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", *TREE_ARGS)
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")
    assert "supported: llama, mistral, qwen2, qwen3" in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "options, pattern",
    [
        (["--depth", "12"], "needs"),
        (["--node-width", "0"], "routing='self'"),
        (["--leaf-width", "7", "--shared-width", "0"], "do not divide"),
    ],
)
def test_impossible_layer_options(dense_dir, tmp_path, capsys, options, pattern):
    code, _, err = run_cli(capsys, "convert", dense_dir, tmp_path / "out", *TREE_ARGS, *options)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_impossible_mgs_density(dense_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", dense_dir, tmp_path / "out", "--method", "mgs", "--density", "1.5")
    assert_one_line_error(code, err, "density must be in (0, 1]")


def test_missing_source(tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", tmp_path / "does-not-exist", tmp_path / "out", *TREE_ARGS)
    assert_one_line_error(code, err, "no such directory")


def test_source_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "convert", tmp_path / "empty", tmp_path / "out", *TREE_ARGS)
    assert_one_line_error(code, err, "not a model directory")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(dense_dir, tmp_path, capsys, damage):
    src = tmp_path / "corrupt"
    shutil.copytree(dense_dir, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    code, _, err = run_cli(capsys, "convert", src, tmp_path / "out", *TREE_ARGS)
    assert_one_line_error(code, err, "cannot load the weights")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS)
    assert code == 0
    first = tree_hash(out)
    code, _, err = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS, "--depth", "2")
    assert_one_line_error(code, err, "already exists (pass overwrite=True / --overwrite")
    assert tree_hash(out) == first

    code, _, _ = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS, "--depth", "2", "--overwrite")
    assert code == 0 and json.loads((out / "config.json").read_text())["sparse_mlp"]["depth"] == 2
    assert leftovers(tmp_path) == [] and not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_overwrite_never_deletes_what_treeffn_did_not_write(dense_dir, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "convert", dense_dir, precious, *TREE_ARGS, "--overwrite")
    assert_one_line_error(code, err, "not a treeffn checkpoint")
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_may_not_overlap_the_source(dense_dir, tmp_path, capsys, where):
    src = tmp_path / "src"
    shutil.copytree(dense_dir, src)
    before = tree_hash(src)
    out = {"same": src, "inside": src / "sparse", "parent": tmp_path}[where]
    code, _, err = run_cli(capsys, "convert", src, out, *TREE_ARGS, "--overwrite")
    assert_one_line_error(code, err, "must not be, contain, or lie inside the source")
    assert tree_hash(src) == before


def test_saved_checkpoint_has_umask_permissions(dense_dir, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "convert", dense_dir, tmp_path / "out", *TREE_ARGS)
    umask = os.umask(0)
    os.umask(umask)
    assert code == 0 and (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_run_killed_between_renames_gets_its_old_output_back(dense_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that certainly belongs to no running process
    out = tmp_path / "out"
    assert run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS)[0] == 0
    original = tree_hash(out)
    retired = tmp_path / f".out.old-{dead.pid}-abc"
    retired.mkdir()
    os.rename(out, retired / "out")  # what a kill between the two renames leaves behind
    code, _, err = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS)
    assert_one_line_error(code, err, "already exists")
    assert tree_hash(out) == original and not retired.exists()


def test_info_on_bad_directories(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "info", tmp_path / "bad")
    assert_one_line_error(code, err, "not valid JSON")
    code, _, err = run_cli(capsys, "info", tmp_path / "nothing-here")
    assert_one_line_error(code, err, "not a model directory")


def test_output_not_writable(dense_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        out = Path("/sys/treeffn-test-out")  # sysfs refuses new directories even to root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out"
    code, _, err = run_cli(capsys, "convert", dense_dir, out, *TREE_ARGS)
    assert_one_line_error(code, err, "cannot write in")
    assert not out.exists()


def _start_convert(src: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    # A runner started in the background (`cmd &` without job control) ignores SIGINT, and children
    # inherit that; restore the default so the child gets Python's KeyboardInterrupt handler.
    return subprocess.Popen([str(BIN / "treeffn"), "convert", str(src), str(out), *TREE_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def big_dense_dir(tmp_path_factory) -> Path:
    # Large enough (~60 MB of weights) that writing takes a while, so a kill lands mid-write.
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("big") / "llama"
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1500, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_conversion_leaves_no_output(big_dense_dir, tmp_path, sig):
    before = tree_hash(big_dense_dir)
    out = tmp_path / "out"
    process = _start_convert(big_dense_dir, out)
    deadline = time.monotonic() + 120
    def writing() -> bool:
        return any(".partial-" in p.name for p in tmp_path.iterdir())

    while not writing() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert writing() and process.poll() is None, "the signal must land while the output is being written"
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert not out.exists(), "an interrupted conversion must leave no OUT"
    assert tree_hash(big_dense_dir) == before
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "interrupted" in err
        assert leftovers(tmp_path) == []
    # A killed run's staging directory is swept by the next run into the same place.
    code = subprocess.run([str(BIN / "treeffn"), "convert", str(big_dense_dir), str(out), *TREE_ARGS],
                          capture_output=True, text=True).returncode
    assert code == 0 and out.is_dir() and leftovers(tmp_path) == []


def test_console_script_and_optimum_cli_plugin(dense_dir, tmp_path):
    help_text = subprocess.run([str(BIN / "optimum-cli"), "treeffn", "--help"], capture_output=True, text=True,
                               cwd=tmp_path).stdout
    for name in ("convert", "distill", "finetune", "info", "eval", "push", "demo"):
        assert name in help_text
    out = tmp_path / "via-optimum"
    result = subprocess.run([str(BIN / "optimum-cli"), "treeffn", "convert", str(dense_dir), str(out), *TREE_ARGS],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "treeffn_llama"
    failed = subprocess.run([str(BIN / "optimum-cli"), "treeffn", "convert", str(dense_dir), str(out), *TREE_ARGS],
                            capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode == 1 and "already exists" in failed.stderr
