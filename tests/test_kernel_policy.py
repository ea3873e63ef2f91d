"""The kernel policy (dispatch.KernelPolicy): one object per layer says which implementation
runs; a model sets it for all its layers, through the API or its config, also when it was
loaded as remote code without treeffn_hf."""

import pytest
import torch
from torch import nn

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec
from treeffn_hf.modeling.tree_layer import TreeFFN

from .conftest import run_python, tiny_dense_model

POLICY_FROM_REMOTE_CODE = r"""
import json, sys
sys.modules["treeffn_hf"] = None  # only the checkpoint's own files
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([[5, 17, 33, 8, 60, 41, 12]])
seen, outputs = {}, {}
with torch.no_grad():
    for path in ("auto", "reference", "torch"):
        model.set_kernel_policy(path=path)
        outputs[path] = model(ids).logits
        seen[path] = sorted({mlp.last_path for _, mlp in model.sparse_mlps()})
model.set_kernel_policy(path="reference")
model.save_pretrained(sys.argv[2])
again = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True)
print(json.dumps({"seen": seen, "error": float((outputs["torch"] - outputs["reference"]).abs().max()),
                  "reloaded": sorted({mlp.kernel_policy.path for _, mlp in again.sparse_mlps()})}))
"""


@pytest.mark.parametrize("spec", [TreeSpec(depth=2, node_width=3), MGSSpec(density=0.3, predictor="linear", rank=8)],
                         ids=["tree", "mgs"])
def test_the_policy_of_a_remote_code_checkpoint_is_set_through_the_api_and_obeyed(tmp_path, spec):
    import json

    treeffn_hf.save(treeffn_hf.convert(tiny_dense_model("llama"), spec, progress=False), tmp_path / "model")
    result = json.loads(run_python(POLICY_FROM_REMOTE_CODE, str(tmp_path / "model"), str(tmp_path / "saved"))
                        .stdout.strip().splitlines()[-1])
    assert result["seen"] == {"auto": ["torch"], "reference": ["reference"], "torch": ["torch"]}
    assert result["error"] < 1e-4
    assert result["reloaded"] == ["reference"]  # the config carries the policy


def test_the_environment_variable_is_read_when_a_layer_is_built(monkeypatch):
    monkeypatch.setenv("TREEFFN_PATH", "reference")
    layer = TreeFFN(24, 48, TreeSpec(depth=2, node_width=1), nn.SiLU())
    monkeypatch.setenv("TREEFFN_PATH", "torch")  # too late for this layer
    with torch.no_grad():
        layer(torch.randn(3, 24))
    assert layer.force_path == "reference" and layer.last_path == "reference"
    monkeypatch.setenv("TREEFFN_PATH", "fast")
    with pytest.raises(ValueError, match="must be one of"):
        TreeFFN(24, 48, TreeSpec(depth=2, node_width=1), nn.SiLU())


@pytest.mark.parametrize("path", ["torch", "cpu", "triton"])
def test_forcing_a_forward_only_path_under_gradients_raises(path):
    layer = TreeFFN(24, 48, TreeSpec(depth=2, node_width=1), nn.SiLU())
    layer.force_path = path
    with pytest.raises(RuntimeError, match="forward-only and gradients are needed"):
        layer(torch.randn(3, 24))
