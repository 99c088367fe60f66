"""The layers the folders show: core <- lifecycle <- tasks <- flows, and core <- server; no import cycles.

Every import counts: at module level, inside a function, and under TYPE_CHECKING.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("codetune", "tasks", "flows", "server")
MAY_IMPORT = {
    "codetune.core": {"codetune.core"},
    "codetune.lifecycle": {"codetune.core", "codetune.lifecycle"},
    "server": {"codetune.core", "server"},
    "tasks": {"codetune.core", "codetune.lifecycle", "tasks"},
    "flows": {"codetune.core", "codetune.lifecycle", "tasks", "flows", "server"},
}
"""Each layer and what it may import. The package's own __init__ (its version) is below them all."""
LIFECYCLE_LIBRARIES = {"mlflow", "prefect", "prefect_aws", "optuna", "boto3", "botocore", "ray", "scipy", "sklearn"}
"""What the lifecycle services are built on; `codetune train` runs where none of them is installed."""


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a package's submodule where one is named, else the package)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found |= {resolve(f"{module}.{alias.name}") for alias in node.names}
    return found - {None, name}


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> str | None:
    return next((layer for layer in MAY_IMPORT if module == layer or module.startswith(layer + ".")), None)


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        for target in sorted(targets):
            if layer(module) and layer(target) and layer(target) not in MAY_IMPORT[layer(module)]:
                wrong.append(f"{module} -> {target}")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_every_import_points_down_the_layers():
    edges = graph(ROOT)
    assert len([m for m in edges if m.startswith("codetune.core.")]) > 20  # found from any working directory
    assert upward_imports(edges) == []


def test_no_module_imports_itself_back_through_others():
    assert cycles(graph(ROOT)) == []


def test_the_checks_find_an_upward_import_and_a_cycle_wherever_they_hide(tmp_path):
    """In a function and under TYPE_CHECKING, as the imports this test was written against were hidden."""
    files = {
        "codetune/core/training.py": "def fit():\n    from codetune.lifecycle.sweep import pruning_callback\n",
        "codetune/core/config.py": "from codetune.core import families\n",
        "codetune/core/families.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import config\n",
        "codetune/lifecycle/sweep.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = graph(tmp_path)
    assert upward_imports(edges) == ["codetune.core.training -> codetune.lifecycle.sweep"]
    assert cycles(edges) == [["codetune.core.config", "codetune.core.families"]]


def test_the_core_imports_no_library_of_the_lifecycle_services():
    offenders = {}
    for name, path in modules(ROOT).items():
        if layer(name) == "codetune.core":
            tree = ast.walk(ast.parse(path.read_text()))
            names = {a.name for n in tree if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
            if used := sorted(m for m in names if m and m.split(".")[0] in LIFECYCLE_LIBRARIES):
                offenders[name] = used
    assert offenders == {}


def test_codetune_train_runs_where_no_lifecycle_library_is_installed():
    """The pipeline imports in an interpreter where importing any of them fails."""
    blocked = ", ".join(repr(m) for m in sorted(LIFECYCLE_LIBRARIES))
    probe = (
        f"import sys\nfor name in [{blocked}]:\n    sys.modules[name] = None\n"
        "import codetune.core.pipeline, codetune.core.training_process, flows.cli\n"
        "from flows.cli import _parser\n_parser().parse_args(['train'])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def readme_layout() -> set[str]:
    """The paths the README's layout tree names, each line's first word under its parents."""
    block = re.search(r"## Layout.*?```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    paths, parents = set(), []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        parents[depth:] = [line.split()[0]]
        paths.add("".join(parents))
    return paths


def test_the_readme_layout_is_the_package():
    listed = readme_layout()
    assert sorted(p for p in listed if not (ROOT / p).exists()) == []
    layers = [ROOT / "codetune" / "core", ROOT / "codetune" / "lifecycle"]
    present = {
        str(p.relative_to(ROOT)) + ("/" if p.is_dir() else "")
        for layer in layers
        for p in layer.iterdir()
        if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())
    }
    assert sorted(present - listed) == []
