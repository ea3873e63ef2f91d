"""Residual-stream attribution: what the attention and MLP blocks write, per layer."""

import json

import torch

import treeffn_hf
from treeffn_hf import TreeSpec
from treeffn_hf.attribution import residual_attribution
from treeffn_hf.cli.main import main

from .conftest import char_tokenizer, tiny_dense_model


class Silent(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_norms_bound_the_residual_updates_and_see_a_silenced_mlp():
    model = tiny_dense_model("llama").eval()
    windows = torch.randint(3, 97, (2, 16))
    rows = residual_attribution(model, windows, progress=False)
    with torch.no_grad():
        hidden = [model(w[None], output_hidden_states=True).hidden_states for w in windows]
    for layer, row in enumerate(rows[:-1]):  # the last hidden state is after the final norm
        update = torch.cat([(h[layer + 1] - h[layer])[0] for h in hidden]).norm(dim=-1).mean()
        assert 0 < float(update) <= row.attention_norm + row.mlp_norm + 1e-4  # triangle inequality
        assert row.mlp_share == row.mlp_norm / (row.attention_norm + row.mlp_norm)
    model.model.layers[1].mlp = Silent()
    silenced = residual_attribution(model, windows, progress=False)
    assert silenced[1].mlp_norm == 0 and silenced[1].attention_norm > 0
    assert silenced[0].mlp_norm == rows[0].mlp_norm


def test_eval_attribution_compares_with_the_baseline(tmp_path, capsys):
    dense = tiny_dense_model("qwen3")
    dense.save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    treeffn_hf.save(treeffn_hf.convert(dense, TreeSpec(depth=2, node_width=2), progress=False), tmp_path / "tree",
                    tokenizer=char_tokenizer())
    text = tmp_path / "t.raw"
    text.write_text("a sparse tree sends each token down one path. " * 30)
    code = main(["eval", str(tmp_path / "tree"), "--baseline", str(tmp_path / "dense"), "--text", str(text),
                 "--windows", "1", "--attribution", str(tmp_path / "attr"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "model: mean MLP share" in out and "baseline: mean MLP share" in out
    saved = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert set(saved) == {"model", "baseline"} and len(saved["model"]) == 2
    assert saved["model"][0]["mlp_norm"] != saved["baseline"][0]["mlp_norm"]  # the tree computes less
    assert (tmp_path / "attr" / "attribution.png").stat().st_size > 1000


def test_logit_terms_of_all_blocks_and_the_embedding_add_up_to_the_logit():
    """Direct logit attribution is exact: with the final norm's scale fixed per token, the next
    token's logit is the embedding's term plus one term per block."""
    model = tiny_dense_model("qwen2").eval()
    window = torch.randint(3, 97, (1, 20))
    rows = residual_attribution(model, window, progress=False)
    captured = []
    handle = model.model.norm.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0][0]))
    with torch.no_grad():
        logits = model(window).logits[0, :-1]
    handle.remove()
    targets = window[0, 1:]
    want = logits.gather(1, targets[:, None]).squeeze(1).mean()
    norm = model.model.norm
    rms = captured[0][:-1].pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
    direction = model.get_output_embeddings().weight[targets] * norm.weight / rms
    embedding = (model.model.embed_tokens(window)[0, :-1] * direction).sum(-1).mean()
    got = embedding + sum(r.attention_logit + r.mlp_logit for r in rows)
    assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-4), (float(got), float(want))
    assert all(0.0 <= r.mlp_logit_share <= 1.0 for r in rows)
