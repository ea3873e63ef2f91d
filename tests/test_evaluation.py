import math

import pytest
import torch

from treeffn_hf.cli.main import main
from treeffn_hf.evaluation import perplexity, protocol_windows

from .conftest import tiny_dense_model


class CharTokenizer:
    def __call__(self, text, return_tensors=None):
        return type("Encoding", (), {"input_ids": torch.tensor([[3 + ord(c) % 90 for c in text]])})()


def test_protocol_windows_are_non_overlapping_and_counted(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 5000)
    windows = protocol_windows(CharTokenizer(), tmp_path / "t.txt", window=1024, max_windows=40)
    assert windows.shape == (4, 1024)
    assert protocol_windows(CharTokenizer(), tmp_path / "t.txt", max_windows=2).shape == (2, 1024)
    with pytest.raises(ValueError, match="fewer than 1024 tokens"):
        (tmp_path / "s.txt").write_text("short")
        protocol_windows(CharTokenizer(), tmp_path / "s.txt")


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    model = tiny_dense_model("llama")
    windows = torch.randint(3, 97, (3, 20))
    result = perplexity(model, windows, progress=False)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]  # mean over 19 predictions each
    assert result.predicted_tokens == 57
    assert result.perplexity == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


def test_eval_cli_needs_the_text(tmp_path, capsys):
    code = main(["eval", str(tmp_path), "--text", str(tmp_path / "missing.raw")])
    assert code == 1 and "no such evaluation text" in capsys.readouterr().err
