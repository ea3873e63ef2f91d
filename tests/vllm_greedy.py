"""Run in the vLLM environment by tests/test_vllm.py: greedy completions from vLLM's engine.

    python tests/vllm_greedy.py '{"models": [{"path": DIR, "prompts": [[ids]], "max_tokens": N}]}'

Prints one JSON object: {DIR: {"tokens": [[token ids per prompt]], "paths": {path: sparse-MLP calls}}}.
The engines run one after another in this process (no engine subprocess), so each costs its start-up
only; each engine's sparse MLPs keep their own tally of the paths they ran, read through `apply_model`.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _summed(per_worker: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for paths in per_worker:
        for path, calls in paths.items():
            total[path] = total.get(path, 0) + calls
    return total


if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    from treeffn_hf.serving.vllm_models import paths_run

    spec = json.loads(sys.argv[1])
    results = {}
    for model in spec["models"]:
        llm = LLM(model=model["path"], dtype="float32", max_model_len=model.get("max_model_len", 256),
                  trust_remote_code=True, enforce_eager=model.get("eager", True), seed=0)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in model["prompts"]],
                               SamplingParams(temperature=0, max_tokens=model["max_tokens"]),
                               use_tqdm=False)
        results[model["path"]] = {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
                                  "paths": _summed(llm.apply_model(paths_run))}
        del llm
        gc.collect()
    print("RESULT " + json.dumps(results), flush=True)
