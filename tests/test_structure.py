"""The package's shape: no import cycle (counting imports inside functions), small modules and classes."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "src" / "transferlab"


def sources() -> dict[str, str]:
    """Module name to source text, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path.read_text()
    return found


def modules() -> dict[str, ast.Module]:
    return {name: ast.parse(text) for name, text in sources().items()}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def test_no_import_cycle():
    trees = modules()
    graph = {m: imports(t, set(trees)) - {m, "transferlab"} for m, t in trees.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_modules_and_classes_stay_small():
    for name, text in sources().items():
        assert len(text.splitlines()) <= 400, name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 150, (name, node.name)
