"""House rules that a test can enforce: import direction and a light ``import mmtok``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = ["mmtok/core", "mmtok/compressors"]
FORBIDDEN = {
    "transformers",
    "gradio",
    "ray",
    "PIL",
    "av",
    "decord",
    "soundfile",
    "timm",
    "open_clip",
    "triton",
}
CORE_FORBIDDEN = FORBIDDEN | {
    "mmtok.compressors",
    "mmtok.kernels",
    "mmtok.adapters",
    "mmtok.api",
    "mmtok.app",
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", PURE)
def test_core_and_compressors_are_pure_torch(folder):
    forbidden = CORE_FORBIDDEN if folder == "mmtok/core" else FORBIDDEN | {"mmtok.adapters", "mmtok.api"}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            top = {name, name.split(".")[0], ".".join(name.split(".")[:2])}
            bad = top & forbidden
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}: {folder} must stay pure torch"


def test_kernels_import_only_core():
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for name in _imports(path):
            assert not name.startswith(
                ("mmtok.compressors", "mmtok.adapters", "mmtok.api", "transformers")
            ), f"{path.name} imports {name}"


def test_import_mmtok_is_light():
    code = "import sys, mmtok; print(sorted(m for m in ('transformers', 'triton', 'gradio', 'ray', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_top_level_adapters_or_kernels_package_installed():
    code = "import importlib.util as u; print(u.find_spec('adapters'), u.find_spec('kernels'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    assert out.strip() == "None None"
