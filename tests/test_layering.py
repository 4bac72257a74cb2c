"""The dependency arrows of the design: kernels <- model <- conversion; the CLI on top; nothing imports tests."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NEVER_IMPORTED = ("tests", "benchmarks", "notebooks", "checks", "conftest")
# The application layer: command-line entry points may use every layer below them.
APPLICATION = {"cli.py", "__main__.py"}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against its package)."""
    package = path.parent.relative_to(REPO).parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join((*base, node.module or "")).strip("."))
            else:
                names.add(node.module)
    return names


def _sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _sources("kernels"), ids=lambda p: p.name)
def test_kernels_use_only_torch_triton_and_the_standard_library(path):
    allowed = {"torch", "triton", "kernels", "transnormer_hf"} | set(sys.stdlib_module_names)
    for name in _imports(path):
        assert _top(name) in allowed, f"{path.name} imports {name}"
        if name.startswith("transnormer_hf"):
            assert name.startswith("transnormer_hf.kernels"), f"{path.name} imports {name} (kernels import nothing above)"


@pytest.mark.parametrize("path", _sources("src/transnormer_hf"), ids=lambda p: p.name)
def test_the_model_does_not_import_conversion(path):
    if path.name in APPLICATION:
        return
    for name in _imports(path):
        assert not name.startswith(("transnormer_hf.conversion", "conversion")), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", _sources("src") + _sources("kernels") + _sources("conversion"), ids=lambda p: p.name)
def test_nothing_imports_tests_benchmarks_or_notebooks(path):
    for name in _imports(path):
        assert _top(name) not in NEVER_IMPORTED, f"{path} imports {name}"


def test_kernels_are_installed_inside_the_package_namespace(tmp_path):
    """No top-level `kernels` module may come with us (it would shadow the Hugging Face `kernels` package)."""
    import subprocess

    import transnormer_hf.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(REPO) not in found.stdout, f"a top-level `kernels` resolves to this repository: {found.stdout}"
