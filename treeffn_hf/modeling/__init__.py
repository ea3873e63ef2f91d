"""The remote-code bundle: every `.py` file here is copied flat into saved checkpoints.

Files in this folder import each other only as `from .module import name`, and guard optional
dependencies, so the checkpoint loads with `trust_remote_code=True` where treeffn_hf is absent.
"""
