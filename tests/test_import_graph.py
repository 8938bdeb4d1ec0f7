"""The import graph is one-way: kernels <- bindings (csrc) <- gate (ops, layers) <- lora <- moegate
(integrations, CLI).

A package may import those to its left, never one to its right: gate never imports lora or moegate,
lora never imports moegate. Read from the source (every import statement, at any depth, lazy ones
included), so an import inside a function cannot hide a cycle. In csrc, the kernels include neither
torch nor the bindings (csrc/bindings/) that call them.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("gate", "lora", "moegate")  # each may import only those before it


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every module an import statement in ``path`` names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def upward_imports(package: str) -> list[str]:
    above = set(LAYERS[LAYERS.index(package) + 1:])
    return [f"{path.relative_to(ROOT)} imports {', '.join(sorted(imported_packages(path) & above))}"
            for path in sorted((ROOT / package).rglob("*.py")) if imported_packages(path) & above]


@pytest.mark.parametrize("package", LAYERS[:-1])
def test_no_package_imports_one_above_it(package):
    assert (ROOT / package / "__init__.py").is_file()
    assert upward_imports(package) == []


def test_the_check_sees_lazy_imports(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\n\ndef f():\n    from lora.registry import replace_modules\n"
                      "    import moegate.verify\n")
    assert imported_packages(source) == {"torch", "lora", "moegate"}


def test_importing_gate_and_lora_loads_nothing_above_them():
    # lora's adapter I/O loads safetensors and PEFT on first use, not at `import lora`.
    code = ("import sys, gate, gate.ops, gate.layer\n"
            "assert not {'lora', 'moegate'} & set(sys.modules), 'gate loaded lora or moegate'\n"
            "import lora\n"
            "top = {name.split('.')[0] for name in sys.modules}\n"
            "loaded = {'moegate', 'peft', 'safetensors', 'transformers'} & top\n"
            "assert not loaded, f'import lora loaded {sorted(loaded)}'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def includes_torch_or_bindings(name: str) -> bool:
    """Whether an #include names torch, ATen, c10, pybind11 or our bindings, by any path to them."""
    folders = {"ATen", "c10", "torch", "pybind11", "bindings"}
    return bool(folders & set(name.replace("\\", "/").split("/")[:-1]))


def test_kernels_are_torch_free_and_include_no_binding():
    assert includes_torch_or_bindings("../bindings/common.h") and includes_torch_or_bindings("ATen/ATen.h")
    assert not includes_torch_or_bindings("kernels/route.h") and not includes_torch_or_bindings("cuda_bf16.h")
    kernels = sorted((ROOT / "csrc" / "kernels").iterdir())
    assert kernels
    found = [f"{path.name} includes {name}" for path in kernels
             for name in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M)
             if includes_torch_or_bindings(name)]
    assert found == []
