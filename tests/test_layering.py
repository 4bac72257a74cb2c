"""The dependency arrows: kernels <- model <- conversion; the CLI on top; no import cycle; nothing imports tests."""

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
    origin = found.stdout.strip()  # None, or the Hugging Face package (which may sit in a venv inside the checkout)
    assert not Path(origin).resolve().is_relative_to(REPO / "kernels"), f"a top-level `kernels` is ours: {origin}"


def test_run_from_the_checkouts_root_import_kernels_gets_the_hub_package_where_installed(tmp_path):
    """`python -c` / `python -m` in the repository root put it on sys.path, where the kernels/ folder would shadow
    the Hugging Face `kernels` package (transformers >= 5.25 imports it, so every import of transformers failed);
    without that package, transformers (5.17 imports a `kernels` with no version metadata to read its version) must
    import as before."""
    import subprocess

    probe = ("import sys, transformers.modeling_utils, transnormer_hf, kernels\n"
             "print(kernels.__file__, [m for m in sys.modules if m.startswith('kernels.reference')])")
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    if subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path).returncode == 0:  # the Hub package
        origin, leftovers = run.stdout.split(" ", 1)
        assert not Path(origin).resolve().is_relative_to(REPO / "kernels") and leftovers.strip() == "[]", run.stdout


# ---- the package's own import graph: no cycle, and the CLI dispatcher imported by nobody

# Where each package of the install lives in the repository (pyproject.toml's package-dir).
PACKAGE_FOLDERS = {
    "transnormer_hf": REPO / "src" / "transnormer_hf",
    "transnormer_hf.kernels": REPO / "kernels",
    "transnormer_hf.conversion": REPO / "conversion",
}
DISPATCHER = "transnormer_hf.cli"
# `python -m transnormer_hf` runs the dispatcher; nothing else may import it.
DISPATCHER_IMPORTERS = {"transnormer_hf.__main__"}


def _modules(folders: dict[str, Path]) -> dict[str, Path]:
    """Installed module name -> source file, for every .py under each package folder."""
    modules = {}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _import_graph(folders: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the same install it imports (anywhere in the file, lazy imports included).

    `from P import n` counts as importing P.n when that is a module, else P; importing P.Q.m also runs the
    `__init__` of P and P.Q, except those of the importer's own enclosing packages (already being imported).
    """
    modules = _modules(folders)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(filter(None, (*parent, node.module)))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for length in range(1, len(parts) + 1):
                prefix = ".".join(parts[:length])
                own_ancestor = length < len(parts) and (name == prefix or name.startswith(prefix + "."))
                if prefix in modules and prefix != name and not own_ancestor:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per back edge a depth-first search meets."""
    cycles, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_cycle_finder_finds_a_lazy_two_module_cycle_and_accepts_a_package_importing_its_modules(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (tmp_path / "b.py").write_text("from . import c\n\ndef g():\n    from .a import f\n")
    (tmp_path / "c.py").write_text("from pkg.a import f\nimport os\n")
    graph = _import_graph({"pkg": tmp_path})
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a", "pkg.c"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_the_package_has_no_import_cycle():
    graph = _import_graph(PACKAGE_FOLDERS)
    assert {"transnormer_hf.kernels.reference", "transnormer_hf.conversion.cli", DISPATCHER} <= set(graph)
    cycles = [" -> ".join(cycle) for cycle in _cycles(graph)]
    assert not cycles, "import cycles in transnormer_hf:\n" + "\n".join(cycles)


def test_only_the_entry_point_imports_the_cli_dispatcher():
    graph = _import_graph(PACKAGE_FOLDERS)
    importers = {name for name, targets in graph.items() if DISPATCHER in targets}
    assert importers == DISPATCHER_IMPORTERS, f"modules importing the dispatcher {DISPATCHER}: {sorted(importers)}"
