"""The remote-code bundle must load where treeffn_hf is not installed.

transformers copies the model file and every file named by `from .x import y` / `import .x`,
flattened by basename, and on the Hub runs `check_imports` on each. So: only single-level
relative imports of files that exist in the bundle, no absolute imports of our own package, and
every dependency beyond torch/transformers/huggingface_hub guarded by try/except ImportError.
"""

import ast
import sys
from pathlib import Path

import pytest

import treeffn_hf

BUNDLE = Path(treeffn_hf.__file__).parent / "modeling"
BUNDLE_FILES = sorted(p for p in BUNDLE.glob("*.py") if p.name != "__init__.py")
HARD_DEPENDENCIES = {"torch", "transformers", "huggingface_hub", "__future__"}


def guarded_nodes(tree: ast.AST) -> set[int]:
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    return guarded


@pytest.mark.parametrize("path", BUNDLE_FILES, ids=lambda p: p.name)
def test_bundle_file_imports(path):
    tree = ast.parse(path.read_text())
    guarded = guarded_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1, f"{path.name}:{node.lineno}: parent-relative import breaks when flattened"
            assert node.module and "." not in node.module, (
                f"{path.name}:{node.lineno}: only `from .module import name` is followed by save_pretrained"
            )
            assert (BUNDLE / f"{node.module}.py").is_file(), f"{path.name}:{node.lineno}: {node.module} not in bundle"
            continue
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root != "treeffn_hf", f"{path.name}:{node.lineno}: absolute import of the plugin"
            if root in sys.stdlib_module_names or root in HARD_DEPENDENCIES:
                continue
            assert id(node) in guarded, f"{path.name}:{node.lineno}: optional import {root!r} is not guarded"


def test_static_check_catches_bad_imports(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import tree_layer\n")
    monkeypatch.setattr(sys.modules[__name__], "BUNDLE", tmp_path)
    with pytest.raises(AssertionError, match="only `from .module import name`"):
        test_bundle_file_imports(bad)
    bad.write_text("import triton\n")
    with pytest.raises(AssertionError, match="not guarded"):
        test_bundle_file_imports(bad)
    bad.write_text("try:\n    import triton\nexcept ImportError:\n    triton = None\n")
    test_bundle_file_imports(bad)
