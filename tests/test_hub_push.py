"""Pushing to the Hub, against a loopback Hub server started by the test.

The pushed model is then loaded *by repo id* in a fresh interpreter where treeffn_hf cannot be
imported, with an isolated HF_HOME: the path on which transformers runs `check_imports` on every
bundled file, which a local-folder load does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import treeffn_hf

from .conftest import run_python, tiny_dense_model
from .hub_server import LoopbackHub

BIN = Path(sys.executable).parent
PROMPT = [[3, 14, 15, 92, 65, 35]]
LOAD_BY_ID = r"""
import sys
sys.modules["treeffn_hf"] = None
import torch
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
decoder = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
prompt = torch.tensor(eval(sys.argv[2]))
with torch.no_grad():
    torch.save({"logits": model(prompt).logits, "hidden": decoder(prompt).last_hidden_state}, sys.argv[3])
print(type(model).__module__)
"""


@pytest.fixture()
def hub(tmp_path):
    with LoopbackHub() as server:
        server.env = {
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": "hf_loopback_token",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }
        yield server


def cli(hub, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "treeffn"), *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, **hub.env}, stdin=subprocess.DEVNULL, timeout=600)


def assert_loads_by_id_and_matches(hub, repo: str, local_dir: Path, tmp_path: Path) -> None:
    logits_file = tmp_path / f"{repo.replace('/', '_')}.pt"
    result = run_python(LOAD_BY_ID, repo, json.dumps(PROMPT), str(logits_file), env=hub.env)
    assert result.stdout.strip().startswith("transformers_modules.")
    local = treeffn_hf.load(local_dir).eval()
    with torch.no_grad():
        expected_logits = local(torch.tensor(PROMPT)).logits
        expected_hidden = local.model(torch.tensor(PROMPT)).last_hidden_state
    loaded = torch.load(logits_file)
    torch.testing.assert_close(loaded["logits"], expected_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loaded["hidden"], expected_hidden, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sparse") / "tiny-tree"
    sparse = treeffn_hf.convert(tiny_dense_model("qwen3"), treeffn_hf.TreeSpec(depth=3, node_width=2), progress=False)
    treeffn_hf.save(sparse, path)
    return path


def test_push_then_load_by_repo_id(hub, sparse_dir, tmp_path):
    result = cli(hub, "push", sparse_dir, "alice/tiny-tree")
    assert result.returncode == 0, result.stderr
    uploaded = set(hub.repos["alice/tiny-tree"])
    assert {"model.safetensors", "config.json", "modeling_treeffn.py", "tree_layer.py", "README.md"} <= uploaded
    assert hub.private["alice/tiny-tree"] is False
    assert_loads_by_id_and_matches(hub, "alice/tiny-tree", sparse_dir, tmp_path)
    assert hub.unhandled == []


def test_convert_with_push_to_hub(hub, tmp_path):
    src = tmp_path / "dense"
    tiny_dense_model("mistral").save_pretrained(src)
    out = tmp_path / "mgs"
    result = cli(hub, "convert", src, out, "--method", "mgs", "--density", "0.25", "--rank", "4", "--no-progress",
                 "--push-to-hub", "bob/tiny-mgs", "--private")
    assert result.returncode == 0, result.stderr
    assert "pushed to" in result.stdout
    assert hub.private["bob/tiny-mgs"] is True
    assert_loads_by_id_and_matches(hub, "bob/tiny-mgs", out, tmp_path)


def test_push_refuses_a_directory_that_does_not_load(hub, sparse_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in sparse_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "tree_layer.py").write_text("raise RuntimeError('broken bundle')\n")
    result = cli(hub, "push", broken, "carol/broken")
    assert result.returncode == 1
    assert "treeffn: error:" in result.stderr and "does not load with trust_remote_code" in result.stderr
    assert "Traceback" not in result.stderr
    assert "carol/broken" not in hub.repos, "nothing may be created before the load check passes"


def test_convert_from_a_hub_id(hub, tmp_path):
    dense_dir = tmp_path / "dense"
    tiny_dense_model("qwen2").save_pretrained(dense_dir)
    hub.repos["dave/tiny-qwen2"] = {p.name: p.read_bytes() for p in dense_dir.iterdir()}
    hub.private["dave/tiny-qwen2"] = False
    hub.commits["dave/tiny-qwen2"] = "1" * 40
    out = tmp_path / "tree"
    result = cli(hub, "convert", "dave/tiny-qwen2", out, "--method", "tree", "--depth", "2", "--node-width", "1",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "treeffn_qwen2"
    assert "base_model: dave/tiny-qwen2" in (out / "README.md").read_text()
