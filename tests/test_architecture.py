"""The import structure the project promises (DEVELOPERS.md, issue 13): imports run one way,
app -> {stages, online, dashboard} -> pipeline -> glad, and no module imports itself back
through others. Read from the source with `ast` (imports inside functions count too), so a
violation fails here with the offending import, whatever a test run happens to load."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lower layers first; a package may import its own layer and those below it.
LAYERS = [{"glad"}, {"pipeline"}, {"stages", "online", "dashboard"}, {"app"}]
PACKAGES = set().union(*LAYERS)


def layer(package: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if package in names)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES
            for path in (REPO / package).rglob("*.py")}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules imported by one module (absolute and relative imports, any depth)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from pkg import module` or a name in it
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def test_imports_only_run_down_the_layers() -> None:
    upward = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                    for target in targets
                    if layer(target.split(".")[0]) > layer(source.split(".")[0]))
    assert not upward, "imports that run back up the layers:\n" + "\n".join(upward)


def test_sibling_packages_of_one_layer_stay_apart() -> None:
    crossing = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                      for target in targets
                      if (s := source.split(".")[0]) != (t := target.split(".")[0])
                      and layer(s) == layer(t))
    assert not crossing, "imports between sibling packages:\n" + "\n".join(crossing)


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports() -> None:
    """The checks above would pass vacuously if the graph came out empty."""
    graph = import_graph()
    assert "glad.model" in graph["app.cli"] or any(t.startswith("glad") for t in graph["app.cli"])
    assert "pipeline.schema" in graph["stages.align"]
