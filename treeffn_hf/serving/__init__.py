"""Serving treeffn checkpoints with vLLM: a plugin that vLLM loads through its entry point.

Nothing here is imported by `import treeffn_hf`; vLLM imports `vllm_plugin` in its own environment.
"""
