"""Every supported architecture, tested the same way (peft-style tester mixin).

Converted checkpoints are loaded in a fresh interpreter where `import treeffn_hf` fails, so the
only code that can run is the bundle copied into the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec, UnsupportedArchitectureError
from treeffn_hf.modeling.base_architectures import BASE_ARCHITECTURES

from .conftest import TINY_MODELS, run_python, tiny_dense_model

METHODS = {
    "tree": TreeSpec(depth=3, node_width=2),
    "tree_hyperplane_after_sum": TreeSpec(num_trees=2, depth=2, node_width=11, routing="hyperplane", activation="after_sum"),
    "mgs": MGSSpec(density=0.25, predictor="linear", rank=8),
    "mgs_quantized": MGSSpec(density=0.25, predictor="quantized"),
    "mgs_nested": MGSSpec(density=0.25),
}
PROMPT = torch.tensor([[5, 17, 33, 8, 60, 41, 12], [9, 9, 70, 3, 22, 88, 14]])
NEW_TOKENS = 6

LOAD_WITHOUT_PLUGIN = r"""
import json, sys
sys.modules["treeffn_hf"] = None  # the plugin must not be importable
import torch
from transformers import AutoModel, AutoModelForCausalLM
spec = json.loads(sys.argv[1])
prompt = torch.tensor(spec["prompt"])
results = {}
for name, path in spec["checkpoints"].items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(prompt).logits
        tokens = model.generate(prompt, max_new_tokens=spec["new_tokens"], do_sample=False)
    decoder = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        hidden = decoder(prompt).last_hidden_state
    results[name] = {"module": type(model).__module__, "logits": logits, "tokens": tokens,
                     "decoder_class": type(decoder).__name__, "hidden": hidden}
torch.save(results, spec["out"])
"""


def generate(model, prompt=PROMPT, **kwargs):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every (architecture, method) converted in process, saved, and reloaded without the plugin."""
    root = tmp_path_factory.mktemp("checkpoints")
    models, paths = {}, {}
    for model_type in TINY_MODELS:
        dense = tiny_dense_model(model_type)
        for method, spec in METHODS.items():
            sparse = treeffn_hf.convert(dense, spec, progress=False).eval()
            path = root / f"{model_type}-{method}"
            treeffn_hf.save(sparse, path, base_model=f"tiny-{model_type}")
            models[model_type, method] = (dense, sparse)
            paths[f"{model_type}/{method}"] = str(path)
    out = root / "reloaded.pt"
    job = {"checkpoints": paths, "prompt": PROMPT.tolist(), "new_tokens": NEW_TOKENS, "out": str(out)}
    run_python(LOAD_WITHOUT_PLUGIN, json.dumps(job))
    return models, paths, torch.load(out)


class SparseArchitectureTesterMixin:
    model_type: str

    @pytest.mark.parametrize("method", METHODS)
    def test_converted_model_class_and_config(self, converted, method):
        _, sparse = converted[0][self.model_type, method]
        assert sparse.config.model_type == f"treeffn_{self.model_type}"
        assert type(sparse).__name__.endswith("ForCausalLM")
        assert sparse.config.sparse_mlp["method"] == METHODS[method].method
        mlps = list(sparse.sparse_mlps())
        assert [i for i, _ in mlps] == list(range(sparse.config.num_hidden_layers))

    @pytest.mark.parametrize("method", METHODS)
    def test_reload_without_plugin_matches_logits_and_tokens(self, converted, method):
        models, _, reloaded = converted
        _, sparse = models[self.model_type, method]
        result = reloaded[f"{self.model_type}/{method}"]
        assert result["module"].startswith("transformers_modules.")
        with torch.no_grad():
            torch.testing.assert_close(result["logits"], sparse(PROMPT).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(result["tokens"], generate(sparse))

    @pytest.mark.parametrize("method", METHODS)
    def test_automodel_loads_the_decoder_without_plugin(self, converted, method):
        models, _, reloaded = converted
        _, sparse = models[self.model_type, method]
        result = reloaded[f"{self.model_type}/{method}"]
        assert result["decoder_class"] == type(sparse.model).__name__
        with torch.no_grad():
            expected = sparse.model(PROMPT).last_hidden_state
        torch.testing.assert_close(result["hidden"], expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("method", METHODS)
    def test_generate_same_with_and_without_kv_cache(self, converted, method):
        _, sparse = converted[0][self.model_type, method]
        assert torch.equal(generate(sparse, use_cache=True), generate(sparse, use_cache=False))

    @pytest.mark.parametrize("method", METHODS)
    def test_saved_checkpoint_is_complete(self, converted, method):
        path = Path(converted[1][f"{self.model_type}/{method}"])
        names = {p.name for p in path.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= names
        bundle = {p.name for p in (Path(treeffn_hf.__file__).parent / "modeling").glob("*.py")} - {"__init__.py"}
        assert bundle <= names
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_treeffn.")
        assert config["auto_map"]["AutoConfig"].startswith("configuration_treeffn.")
        card = (path / "README.md").read_text()
        assert f"tiny-{self.model_type}" in card and "active MLP units per token" in card
        assert not [p for p in path.parent.iterdir() if ".partial-" in p.name]

    @pytest.mark.parametrize("method", METHODS)
    def test_fast_path_generates_the_same_tokens_as_the_reference(self, converted, method):
        _, sparse = converted[0][self.model_type, method]
        tokens = {}
        for path in ("reference", "torch"):
            for _, mlp in sparse.sparse_mlps():
                mlp.force_path = path
            tokens[path] = generate(sparse)
            assert {mlp.last_path for _, mlp in sparse.sparse_mlps()} == {path}
        for _, mlp in sparse.sparse_mlps():
            mlp.force_path = None
        assert torch.equal(tokens["torch"], tokens["reference"])

    @pytest.mark.parametrize("method", ["tree", "mgs"])
    def test_left_padded_batch_matches_unpadded_sequences(self, converted, method):
        _, sparse = converted[0][self.model_type, method]
        short = PROMPT[1, 3:]
        padded = torch.stack([PROMPT[0], torch.cat([torch.zeros(3, dtype=torch.long), short])])
        mask = torch.ones_like(padded)
        mask[1, :3] = 0
        with torch.no_grad():
            batch = sparse(padded, attention_mask=mask).logits
            alone = sparse(short[None]).logits
        torch.testing.assert_close(batch[1, 3:], alone[0], rtol=1e-5, atol=1e-5)

    def test_mgs_at_full_density_reproduces_dense_logits(self, converted):
        dense, _ = converted[0][self.model_type, "mgs"]
        full = treeffn_hf.convert(dense, MGSSpec(density=1.0, predictor="linear", rank=4), progress=False).eval()
        with torch.no_grad():
            torch.testing.assert_close(full(PROMPT).logits, dense(PROMPT).logits, rtol=1e-6, atol=1e-6)

    def test_sparse_model_differs_from_dense_below_full_density(self, converted):
        dense, sparse = converted[0][self.model_type, "tree"]
        with torch.no_grad():
            assert not torch.allclose(sparse(PROMPT).logits, dense(PROMPT).logits, atol=1e-3)

    def test_dense_model_is_untouched_and_shares_no_storage(self):
        dense = tiny_dense_model(self.model_type)
        before = {k: v.clone() for k, v in dense.state_dict().items()}
        sparse = treeffn_hf.convert(dense, METHODS["mgs"], progress=False)
        for key, value in dense.state_dict().items():
            assert torch.equal(value, before[key]), key
        dense_ptrs = {p.data_ptr() for p in dense.parameters()}
        assert not dense_ptrs & {p.data_ptr() for p in sparse.parameters()}
        assert sparse.lm_head.weight.data_ptr() == sparse.model.embed_tokens.weight.data_ptr() or (
            not dense.config.tie_word_embeddings
        )

    def test_module_tree_matches_the_stock_model_outside_the_mlp(self):
        dense = tiny_dense_model(self.model_type)
        sparse = treeffn_hf.convert(dense, METHODS["tree"], progress=False)
        def outside_mlp(model):
            return {name for name, _ in model.named_modules() if ".mlp" not in name}
        assert outside_mlp(sparse) == outside_mlp(dense)
        assert sparse.vocab_size == dense.vocab_size

    def test_from_config_initialises_every_parameter(self):
        dense = tiny_dense_model(self.model_type)
        for spec in METHODS.values():
            sparse = treeffn_hf.convert(dense, spec, progress=False)
            fresh = type(sparse)(sparse.config)
            for name, tensor in list(fresh.named_parameters()) + list(fresh.named_buffers()):
                assert torch.isfinite(tensor).all(), name
            leaf = fresh.model.layers[0].mlp
            if spec.method == "tree":
                assert 0.005 < leaf.leaf_gate.std() < 0.05


class TestLlama(SparseArchitectureTesterMixin):
    model_type = "llama"


class TestMistral(SparseArchitectureTesterMixin):
    model_type = "mistral"


class TestQwen2(SparseArchitectureTesterMixin):
    model_type = "qwen2"


class TestQwen3(SparseArchitectureTesterMixin):
    model_type = "qwen3"


def test_every_supported_architecture_has_a_tester():
    testers = {cls.model_type for cls in SparseArchitectureTesterMixin.__subclasses__()}
    assert testers == set(treeffn_hf.ARCHITECTURES) == set(TINY_MODELS)


def test_architectures_are_declared_in_one_file():
    """Adding an architecture is one line in `modeling/base_architectures.py`: no other library
    module names a base architecture (tests keep a tiny model and a tester per architecture)."""
    package = Path(treeffn_hf.__file__).parent
    names = [name for base in BASE_ARCHITECTURES if base.model_type != "llama"  # `llama` names the GGUF demo model
             for name in (base.class_prefix, base.model_type)]
    declaration = package / "modeling" / "base_architectures.py"
    offenders = sorted(f"{path.relative_to(package)}: {name}" for path in package.rglob("*.py") if path != declaration
                       for name in names if name in path.read_text())
    assert not offenders
    served = {base.sparse_class_name("ForCausalLM") for base in BASE_ARCHITECTURES}
    assert {arch.sparse_causal_lm_class.__name__ for arch in treeffn_hf.ARCHITECTURES.values()} == served


@pytest.mark.parametrize(
    "model",
    [
        lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
        lambda: MixtralForCausalLM(
            MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, num_local_experts=2, vocab_size=50)
        ),
    ],
    ids=["gpt2", "mixtral"],
)
def test_unsupported_architectures_name_the_supported_ones(model):
    with pytest.raises(UnsupportedArchitectureError, match="supported: llama, mistral, qwen2, qwen3"):
        treeffn_hf.convert(model(), TreeSpec(depth=2, node_width=1))


def test_converting_a_sparse_model_again_is_refused():
    sparse = treeffn_hf.convert(tiny_dense_model("llama"), METHODS["tree"], progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="already sparse"):
        treeffn_hf.convert(sparse, METHODS["mgs"])


def test_uncalibrated_threshold_selection_is_refused():
    with pytest.raises(treeffn_hf.InvalidSpecError, match="calibrated"):
        treeffn_hf.convert(tiny_dense_model("llama"), MGSSpec(predictor="linear", rank=8, selection="threshold"))


def test_impossible_spec_fails_before_any_work():
    with pytest.raises(treeffn_hf.InvalidSpecError, match="needs .* neurons"):
        treeffn_hf.convert(tiny_dense_model("llama"), TreeSpec(depth=10, node_width=1))
