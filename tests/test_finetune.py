"""End-to-end fine-tuning on tiny models: gradients through hard selections, frozen routing,
resumption, the NaN stop, LoRA round trips, teacher-sampled data."""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec
from treeffn_hf.checkpoint import CheckpointError
from treeffn_hf.modeling.mgs_layer import MicroGatedMLP
from treeffn_hf.modeling.tree_layer import TreeFFN
from treeffn_hf.training import trainer as trainer_module
from treeffn_hf.training.data import teacher_data
from treeffn_hf.training.trainable import configure_training, native_bf16
from treeffn_hf.workflows import finetune_checkpoint

from .conftest import DATA_DIR, char_tokenizer, run_python, tiny_dense_model

HIDDEN, INTER = 48, 166
TEXT = str(DATA_DIR / "wikitext-2" / "valid.txt")


def random_layer(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("routing", ["self", "hyperplane"])
@pytest.mark.parametrize("gradient", [None, "straight_through"])
def test_gradients_reach_the_tree_under_each_routing_mode(routing, gradient):
    layer = random_layer(TreeFFN(HIDDEN, INTER, TreeSpec(depth=3, node_width=2, routing=routing), nn.SiLU()))
    x = torch.randn(64, HIDDEN)
    with torch.no_grad():
        plain = layer(x)
    layer.routing_gradient = gradient
    out = layer(x)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)  # straight-through leaves the value alone
    out.pow(2).sum().backward()
    for name in ("gate_rows", "up_rows", "down_rows"):
        assert getattr(layer, name).grad.abs().sum() > 0, name
    if routing == "hyperplane":
        router_grad = layer.router_weight.grad
        if gradient is None:
            assert router_grad is None or router_grad.abs().sum() == 0  # stop-gradient through the branch
        else:
            assert router_grad.abs().sum() > 0


def test_straight_through_routing_gradient_is_the_path_probability_gradient():
    layer = random_layer(TreeFFN(HIDDEN, INTER, TreeSpec(depth=2, node_width=1, routing="hyperplane"), nn.SiLU()))
    layer.routing_gradient = "straight_through"
    x = torch.randn(5, HIDDEN)
    layer(x).sum().backward()
    got = layer.router_weight.grad.clone()
    # By hand: d/dw of sum_n P_n * stop_grad(path_n . 1 / P_n), path_n the output without the
    # always-on shared neurons (which no routing decision scales).
    layer.zero_grad()
    leaf, path = layer.route(x)
    with torch.no_grad():
        shared = (nn.functional.silu(x @ layer.shared_gate.T) * (x @ layer.shared_up.T)) @ layer.shared_down
        per_token = (layer(x) - shared).sum(dim=1)
    probability = layer.path_probability(x, leaf, path)[:, 0]
    (probability * (per_token / probability).detach()).sum().backward()
    torch.testing.assert_close(got, layer.router_weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gradient", [None, "straight_through"])
def test_mgs_trains_through_the_mask(gradient):
    layer = random_layer(MicroGatedMLP(HIDDEN, INTER, MGSSpec(density=0.1, predictor="linear", rank=8), nn.SiLU()))
    x = torch.randn(32, HIDDEN)
    with torch.no_grad():
        plain = layer(x)
    layer.gate_gradient = gradient
    out = layer(x)
    torch.testing.assert_close(out, plain)
    out.pow(2).sum().backward()
    assert layer.up_proj.weight.grad.abs().sum() > 0
    gate_grad = layer.micro_gate.scorer.weight.grad
    if gradient is None:
        assert gate_grad is None
    else:
        assert gate_grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["self", "hyperplane"])
def test_frozen_routing_keeps_every_decision(routing):
    dense = tiny_dense_model("llama")
    spec = TreeSpec(depth=3, node_width=2, routing=routing)
    sparse = treeffn_hf.convert(dense, spec, progress=False)
    fresh = treeffn_hf.convert(dense, spec, progress=False)
    assert configure_training(sparse, routing="frozen")["frozen_routing_rows"] > 0
    ids = torch.randint(3, 97, (2, 24))
    optimizer = torch.optim.Adam([p for p in sparse.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        sparse(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    probe = torch.randn(50, 48)
    for (_, trained), (_, initial) in zip(sparse.sparse_mlps(), fresh.sparse_mlps()):
        leaf, path = trained.route(probe)
        want_leaf, want_path = initial.route(probe)
        assert torch.equal(leaf, want_leaf) and torch.equal(path, want_path)
        assert not torch.equal(trained.up_rows, initial.up_rows)  # ... while the neurons did train


def test_random_routing_needs_hyperplanes():
    sparse = treeffn_hf.convert(tiny_dense_model("llama"), TreeSpec(depth=2, node_width=1), progress=False)
    with pytest.raises(ValueError, match="hyperplane"):
        configure_training(sparse, routing="random")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    char_tokenizer().save_pretrained(root / "dense")
    tiny_dense_model("llama").save_pretrained(root / "dense")
    dense, tokenizer = treeffn_hf.load_dense(str(root / "dense"))
    for name, spec in {"tree": TreeSpec(depth=3, node_width=2, routing="hyperplane"),
                       "mgs": MGSSpec(density=0.25, predictor="linear", rank=8),
                       "mgs_nested": MGSSpec(density=0.25)}.items():
        treeffn_hf.save(treeffn_hf.convert(dense, spec, progress=False), root / name, tokenizer=tokenizer)
    return root


# fp32 unless a test says otherwise: the default (bf16 where the hardware has it) differs between machines
OPTIONS = dict(data=TEXT, window=32, max_windows=32, batch_size=4, lr=2e-3, save_steps=4, bf16=False, progress=False)


def weights(directory) -> dict:
    return treeffn_hf.load(directory).state_dict()


@pytest.mark.parametrize("method", ["tree", "mgs"])
def test_finetune_lowers_the_distillation_loss(dirs, tmp_path, method):
    summary = finetune_checkpoint(dirs / method, tmp_path / "out", dense=str(dirs / "dense"), steps=24,
                                  stats_every=8, **{**OPTIONS, "save_steps": 100})
    losses = [entry["loss"] for entry in summary["log"]]
    assert losses[-1] < losses[0]
    assert summary["data"]["tokens"] == 32 * 32 and summary["tokens_seen"] == 24 * 4 * 32
    recorded = json.loads((tmp_path / "out" / "treeffn_finetune.json").read_text())
    assert recorded["steps"] == 24
    if method == "tree":
        assert [h["step"] for h in recorded["tree_dynamics"]] == [0, 8, 16, 24]
    assert not list(tmp_path.glob(".out.finetune-work"))


def test_teacher_top_k_runs_the_teacher_once_per_window_and_is_the_full_kl_at_the_whole_vocabulary(
        dirs, tmp_path, monkeypatch):
    from treeffn_hf.training import trainer

    computed = []
    original = trainer.teacher_top_k
    monkeypatch.setattr(trainer, "teacher_top_k", lambda logits, *a: computed.append(logits.shape[0]) or original(
        logits, *a))
    options = {**OPTIONS, "save_steps": 100}
    full = finetune_checkpoint(dirs / "mgs", tmp_path / "full", dense=str(dirs / "dense"), steps=20, **options)
    cached = finetune_checkpoint(dirs / "mgs", tmp_path / "cached", dense=str(dirs / "dense"), steps=20,
                                 teacher_top_k=97, **options)  # 97: the tiny model's whole vocabulary
    assert sum(computed) == 32  # 80 sequences seen (2.5 epochs of 32 windows), the teacher ran on each window once
    for a, b in zip(full["log"], cached["log"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    short = finetune_checkpoint(dirs / "mgs", tmp_path / "short", dense=str(dirs / "dense"), steps=20,
                                teacher_top_k=8, **options)
    assert short["log"][-1]["loss"] < short["log"][0]["loss"]


def test_the_hidden_state_cache_runs_the_teachers_body_once_per_window_and_keeps_the_exact_loss(
        dirs, tmp_path, monkeypatch):
    rows = []
    original = trainer_module.teacher_hidden_states
    monkeypatch.setattr(trainer_module, "teacher_hidden_states",
                        lambda teacher, ids, check=False: rows.append(ids.shape[0]) or original(teacher, ids, check))
    options = {**OPTIONS, "save_steps": 100}
    every_step = finetune_checkpoint(dirs / "tree", tmp_path / "none", dense=str(dirs / "dense"), steps=20,
                                     teacher_cache="none", **options)
    assert rows == [] and every_step["teacher_cache"] == "none"
    cached = finetune_checkpoint(dirs / "tree", tmp_path / "hidden", dense=str(dirs / "dense"), steps=20, **options)
    assert cached["teacher_cache"] == "hidden"
    assert sum(rows) == 32  # 80 sequences seen (2.5 epochs of 32 windows), the teacher ran on each window once
    assert len(cached["log"]) == len(every_step["log"]) > 0
    for a, b in zip(every_step["log"], cached["log"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_an_unknown_teacher_cache_is_refused_before_anything_is_written(dirs, tmp_path):
    with pytest.raises(ValueError, match="teacher_cache must be one of"):
        finetune_checkpoint(dirs / "tree", tmp_path / "out", dense=str(dirs / "dense"), teacher_cache="disk",
                            **OPTIONS)
    assert list(tmp_path.iterdir()) == []


def test_the_hidden_state_cache_refuses_a_teacher_whose_logits_are_not_its_head_of_its_hidden_states():
    teacher = tiny_dense_model("llama").eval()
    ids = torch.randint(0, 20, (2, 8))
    hidden = trainer_module.teacher_hidden_states(teacher, ids, check=True)
    torch.testing.assert_close(teacher.lm_head(hidden), teacher(input_ids=ids).logits)
    teacher.register_forward_hook(lambda module, args, out: out.__setitem__("logits", 1.5 * out.logits))  # a logit scale
    with pytest.raises(ValueError, match="teacher_cache='none'"):
        trainer_module.teacher_hidden_states(teacher, ids, check=True)


@pytest.mark.parametrize("method", ["tree", "mgs"])
def test_bf16_autocast_training_follows_fp32_within_two_percent_of_the_loss(dirs, tmp_path, method):
    """bf16 matmuls (weights, optimizer and KL in fp32) over 8 steps: each logged loss within 2% of
    the fp32 run's, and the trained weights stay fp32. The perplexity curve runs the inference paths
    under the same autocast (a tree's sparse path once mixed its float32 input with bf16 products)."""
    options = {**OPTIONS, "save_steps": 100, "eval_windows": torch.randint(0, 20, (2, 16)), "eval_every": 4}
    fp32 = finetune_checkpoint(dirs / method, tmp_path / "fp32", dense=str(dirs / "dense"), steps=8, **options)
    bf16 = finetune_checkpoint(dirs / method, tmp_path / "bf16", dense=str(dirs / "dense"), steps=8,
                               **{**options, "bf16": True})
    assert len(bf16["perplexity_curve"]) == len(fp32["perplexity_curve"]) > 0
    for a, b in zip(fp32["perplexity_curve"], bf16["perplexity_curve"]):
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=0.02)
    assert len(bf16["log"]) == len(fp32["log"]) > 0
    for a, b in zip(fp32["log"], bf16["log"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    assert any(a["loss"] != b["loss"] for a, b in zip(fp32["log"], bf16["log"]))  # bf16 did run
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "bf16").values() if t.is_floating_point())


def test_finetuned_nested_weights_are_back_on_the_grid_of_their_predictor(dirs, tmp_path):
    finetune_checkpoint(dirs / "mgs_nested", tmp_path / "out", dense=str(dirs / "dense"), steps=4,
                        **{**OPTIONS, "save_steps": 100})
    before, after = treeffn_hf.load(dirs / "mgs_nested"), treeffn_hf.load(tmp_path / "out")
    for (_, old), (_, new) in zip(before.sparse_mlps(), after.sparse_mlps()):
        assert not torch.equal(old.gate_proj.weight, new.gate_proj.weight)  # training moved them
        snapped = torch.cat([new.gate_proj.weight, new.up_proj.weight]).clone()
        new.snap_to_predictor_grid()
        torch.testing.assert_close(torch.cat([new.gate_proj.weight, new.up_proj.weight]), snapped, rtol=0, atol=1e-6)


def test_killed_finetune_resumes_from_its_checkpoint(dirs, tmp_path, monkeypatch):
    uninterrupted = finetune_checkpoint(dirs / "tree", tmp_path / "a", dense=str(dirs / "dense"), steps=10, **OPTIONS)

    real_step = trainer_module.DistillationTrainer.training_step

    def dies_at_step_six(self, *args, **kwargs):
        if self.state.global_step == 6:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.DistillationTrainer, "training_step", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        finetune_checkpoint(dirs / "tree", tmp_path / "b", dense=str(dirs / "dense"), steps=10, **OPTIONS)
    assert (tmp_path / ".b.finetune-work" / "checkpoint-4").is_dir() and not (tmp_path / "b").exists()
    monkeypatch.setattr(trainer_module.DistillationTrainer, "training_step", real_step)
    resumed = finetune_checkpoint(dirs / "tree", tmp_path / "b", dense=str(dirs / "dense"), steps=10, **OPTIONS)
    assert resumed["resumed"] and resumed["steps"] == uninterrupted["steps"] == 10
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(dirs, tmp_path, monkeypatch):
    real_loss = trainer_module.distillation_loss
    calls = {"n": 0}

    def nan_after_five(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(trainer_module, "distillation_loss", nan_after_five)
    with pytest.raises(FloatingPointError, match="became nan at step 5.*last good checkpoint"):
        finetune_checkpoint(dirs / "mgs", tmp_path / "out", dense=str(dirs / "dense"), steps=10, **OPTIONS)
    work = tmp_path / ".out.finetune-work"
    assert (work / "checkpoint-4").is_dir() and not (tmp_path / "out").exists()


LOAD_MERGED = r"""
import sys, torch
sys.modules["treeffn_hf"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor([[5, 17, 33, 8, 60, 41, 12]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_lora_adapter_round_trips_and_merges_into_a_loadable_checkpoint(dirs, tmp_path):
    from peft import PeftModel

    summary = finetune_checkpoint(dirs / "tree", tmp_path / "out", dense=str(dirs / "dense"), steps=6, lora_rank=4,
                                  **{**OPTIONS, "lr": 1e-2})
    assert summary["setup"]["trainable"] == "sparse"
    ids = torch.tensor([[5, 17, 33, 8, 60, 41, 12]])
    # The adapter reloads onto the base (converted) checkpoint and gives the merged model's logits.
    adapted = PeftModel.from_pretrained(treeffn_hf.load(dirs / "tree"), str(tmp_path / "out" / "lora_adapter")).eval()
    merged = treeffn_hf.load(tmp_path / "out").eval()
    base = treeffn_hf.load(dirs / "tree").eval()
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(adapted(ids).logits, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(ids).logits, want, atol=1e-4)  # the fine-tune changed something
    run_python(LOAD_MERGED, str(tmp_path / "out"), str(tmp_path / "logits.pt"))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-4, atol=1e-4)


def test_teacher_samples_are_windows_from_the_teacher():
    teacher = tiny_dense_model("qwen3")
    data = teacher_data(teacher, char_tokenizer(), sequences=5, window=12, batch_size=2, progress=False)
    assert data.windows.shape == (5, 12) and data.tokens == 60
    assert (data.windows[:, 0] == 1).all()  # each starts from BOS
    assert "teacher samples" in data.describe()["source"]
    again = teacher_data(copy.deepcopy(teacher), char_tokenizer(), sequences=5, window=12, batch_size=2, progress=False)
    assert torch.equal(data.windows, again.windows)  # seeded


def test_finetune_and_tree_stats_from_the_command_line(dirs, tmp_path, capsys):
    from treeffn_hf.cli.main import main

    code = main(["finetune", str(dirs / "tree"), str(tmp_path / "out"), "--dense", str(dirs / "dense"),
                 "--data", TEXT, "--window", "32", "--max-windows", "16", "--steps", "4", "--teacher-samples", "4",
                 "--stats-every", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "4 steps, 512 tokens seen" in out and "teacher samples" in out
    recorded = json.loads((tmp_path / "out" / "treeffn_finetune.json").read_text())
    assert recorded["run"]["bf16"] is native_bf16()  # the default: bf16 where the hardware computes it
    text = tmp_path / "text.raw"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    code = main(["eval", str(tmp_path / "out"), "--text", str(text), "--windows", "2",
                 "--tree-stats", str(tmp_path / "stats"), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    stats = json.loads((tmp_path / "stats" / "tree_stats.json").read_text())
    assert result["tree_stats"] == stats["summary"]
    layer = stats["layers"][0]
    assert sum(layer["leaf_counts"][0]) == layer["tokens"] == 2 * 1024
    assert layer["dead_paths"] == sum(c == 0 for c in layer["leaf_counts"][0])
    assert (tmp_path / "stats" / "tree_usage.png").stat().st_size > 1000


def test_nan_is_a_one_line_cli_error(dirs, tmp_path, capsys, monkeypatch):
    from treeffn_hf.cli.main import main

    monkeypatch.setattr(trainer_module, "distillation_loss", lambda *a, **k: torch.tensor(float("nan")))
    code = main(["finetune", str(dirs / "mgs"), str(tmp_path / "out"), "--dense", str(dirs / "dense"),
                 "--data", TEXT, "--window", "32", "--max-windows", "8", "--steps", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "treeffn: error: the fine-tuning loss became nan" in err and "Traceback" not in err


def test_a_failed_start_leaves_no_work_directory(dirs, tmp_path, capsys):
    from treeffn_hf.cli.main import main

    code = main(["finetune", str(dirs / "tree"), str(tmp_path / "out"), "--dense", str(dirs / "dense"),
                 "--data", str(tmp_path / "missing.txt"), "--no-progress"])
    assert code == 1 and "unusable training data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_two_process_finetune_counts_every_process_and_writes_once(dirs, tmp_path):
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # `--multi_gpu` is accelerate's multi-process launcher (gloo on CPUs); `--cpu` would start one process.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "treeffn_hf.cli.main", "finetune", str(dirs / "mgs_nested"),
               str(tmp_path / "out"), "--dense", str(dirs / "dense"), "--data", TEXT, "--window", "32",
               "--max-windows", "16", "--steps", "4", "--batch-size", "1", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(reports) == 1 and "4 steps, 256 tokens seen" in reports[0]  # 4 x 1 x 32 tokens x 2 processes
    summary = json.loads((tmp_path / "out" / "treeffn_finetune.json").read_text())
    assert summary["tokens_seen"] == 256 and summary["main_process"]
    treeffn_hf.load(tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if "finetune-work" in p.name]


def test_selection_ramp_goes_from_every_neuron_to_the_calibrated_selection():
    from treeffn_hf.modeling.mgs_selection import selection_mask

    scores = torch.rand(20, 40) + 0.01
    for spec in (MGSSpec(density=0.25), MGSSpec(density=0.25, selection="threshold")):
        threshold = torch.tensor(0.75)
        counts = [int(selection_mask(scores, spec, threshold, ramp).sum()) for ramp in (0.0, 0.5, 1.0)]
        assert counts[0] == scores.numel() and counts[0] > counts[1] > counts[2]
        assert torch.equal(selection_mask(scores, spec, threshold, 1.0), selection_mask(scores, spec, threshold))


def test_progressive_sparsity_reaches_the_final_selection_exactly(dirs, tmp_path, monkeypatch):
    seen = []
    real_forward = MicroGatedMLP.forward

    def spy(self, hidden_states):
        if torch.is_grad_enabled() and self is first_layer[0]:
            seen.append(self.selection_ramp)
        return real_forward(self, hidden_states)

    first_layer = []
    real_configure = trainer_module.DistillationTrainer.__init__

    def remember_first_layer(self, *args, **kwargs):
        real_configure(self, *args, **kwargs)
        first_layer.append(next(m for _, m in self.model.sparse_mlps()))

    monkeypatch.setattr(MicroGatedMLP, "forward", spy)
    monkeypatch.setattr(trainer_module.DistillationTrainer, "__init__", remember_first_layer)
    finetune_checkpoint(dirs / "mgs_nested", tmp_path / "out", dense=str(dirs / "dense"), steps=6,
                        sparsity_ramp_steps=4, **{**OPTIONS, "save_steps": 100})
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # the ramp ends on the calibrated selection
    with pytest.raises(CheckpointError, match="MGS models only"):
        finetune_checkpoint(dirs / "tree", tmp_path / "tree", dense=str(dirs / "dense"), steps=2,
                            sparsity_ramp_steps=1, **OPTIONS)
