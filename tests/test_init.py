"""`treeffn init` / `treeffn_hf.init_model`: random tree models to pretrain from scratch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, Trainer, TrainingArguments

import treeffn_hf
from treeffn_hf.cli.main import main as cli
from treeffn_hf.modeling.layer_spec import InvalidSpecError

from .conftest import char_tokenizer, run_python

RELOAD_WITHOUT_PLUGIN = r"""
import sys
sys.modules["treeffn_hf"] = None  # only the checkpoint's own files
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


@pytest.fixture
def dense_shape(tmp_path):
    """A dense model's config and tokenizer, without weights: all `treeffn init` reads."""
    path = tmp_path / "dense"
    LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_an_initialised_tree_trains_with_the_hf_trainer_and_reloads_without_the_plugin(dense_shape, tmp_path):
    out = tmp_path / "tree"
    assert cli(["init", str(dense_shape), str(out), "--depth", "3", "--node-width", "8", "--leaf-width", "8",
                "--activation", "after_sum", "--set", "num_hidden_layers=3", "--seed", "7"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["sparse_mlp"]["activation"] == "after_sum"
    assert (out / "tokenizer.json").is_file()
    assert "random weights (seed 7)" in (out / "README.md").read_text()

    model = treeffn_hf.load(out)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 90, (8, 24), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    arguments = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                                  learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    history = Trainer(model=model, args=arguments, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(history.training_loss))
    trained = dict(model.named_parameters())
    tree_rows = [name for name in before if name.endswith("gate_rows")]
    assert tree_rows and all(not torch.equal(before[n], trained[n]) for n in tree_rows)

    treeffn_hf.save(model, tmp_path / "trained")
    model.eval()
    with torch.no_grad():
        want = model(ids[:2]).logits
    torch.save(ids[:2], tmp_path / "ids.pt")
    run_python(RELOAD_WITHOUT_PLUGIN, str(tmp_path / "trained"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=0, atol=0)


def test_init_draws_every_tree_weight_from_the_configs_initialiser_and_repeats_with_its_seed():
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=248, num_hidden_layers=2,
                         num_attention_heads=4, initializer_range=0.05)
    spec = treeffn_hf.TreeSpec(depth=4, node_width=8, leaf_width=8, shared_width=0)
    state = torch.random.get_rng_state()
    first, again, other = (treeffn_hf.init_model(config, spec, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    mlp = first.model.layers[0].mlp
    assert mlp.sparse_method == "tree" and mlp.gate_rows.shape == (248, 64)
    for rows in (mlp.gate_rows, mlp.up_rows, mlp.down_rows):
        assert abs(rows.std().item() - 0.05) < 0.005
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(first.model.layers[0].mlp.gate_rows, other.model.layers[0].mlp.gate_rows)


def test_init_refuses_what_it_cannot_build_in_one_line(dense_shape, tmp_path, capsys):
    config = LlamaConfig.from_pretrained(dense_shape)
    with pytest.raises(InvalidSpecError, match="train the dense model"):
        treeffn_hf.init_model(config, treeffn_hf.MGSSpec())
    cases = [
        (["--set", "no_such_field=1"], "has no field 'no_such_field'"),
        (["--set", "num_hidden_layers"], "KEY=VALUE"),
        (["--depth", "9", "--node-width", "8"], "needs"),
    ]
    for extra, message in cases:
        assert cli(["init", str(dense_shape), str(tmp_path / "bad"), *extra]) == 1
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error
        assert not (tmp_path / "bad").exists()
    assert cli(["init", str(dense_shape), str(tmp_path / "ok"), "--depth", "3"]) == 0
    assert cli(["init", str(dense_shape), str(tmp_path / "ok"), "--depth", "3"]) == 1
    assert "already exists" in capsys.readouterr().err
