"""The shape of `src/`: each folder is a layer, dependencies point down, no import cycle.

    src/base/       standard library at import: settings, names, strategies, errors, URLs, signals
    src/core/       computation (data, models, the loop, metrics, scoring, the promotion rule): never MLflow
    src/mlflow_io/  every read and write of MLflow (runs, logged models, the registry gate, serving)
    src/flows/      orchestration: a training run, a search, a report
    src/*.py        the commands (`python -m src.<name>`) and their helpers (cli.py): nothing imports them

A library module imports the project's modules at its top (so this graph is the whole truth); the
logged model's code (`serving.CODE`) imports only itself; no function is over 60 lines.
`python -m tests.test_structure` prints the graph and the longest functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_FUNCTION_LINES = 60
LAYERS = ("base", "core", "mlflow_io", "flows", "commands")  # a module may import its layer or a lower one
NO_MLFLOW = ("base", "core")


def layer(module: str) -> str:
    return module.split(".")[0] if "." in module else "commands"


def modules() -> list[str]:
    return sorted(".".join(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")
                  if p.name != "__init__.py")


def _target(module: str, node: ast.ImportFrom, name: str | None) -> str | None:
    """The project module an import names (`from ..core import loop`, `from .data import x`, `src.x`)."""
    if node.level:
        package = module.split(".")[:-1][:len(module.split(".")) - node.level]
        parts = package + (node.module.split(".") if node.module else [])
    elif (node.module or "").startswith("src."):
        parts = node.module.split(".")[1:]
    else:
        return None
    known = set(modules())
    for candidate in (".".join(parts + [name]) if name else "", ".".join(parts)):
        if candidate in known:
            return candidate
    return None


def import_nodes(module: str, tree: ast.AST | None = None):
    """(node, depth) of every import in the module; depth 0 = at the module's top level."""
    tree = tree or ast.parse((SRC / f"{module.replace('.', '/')}.py").read_text())

    def walk(node, depth):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, depth
            deeper = depth + isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, deeper)
    return list(walk(tree, 0))


def imports(module: str, tree: ast.AST | None = None, top_only: bool = False) -> set[str]:
    found = set()
    for node, depth in import_nodes(module, tree):
        if top_only and depth:
            continue
        if isinstance(node, ast.ImportFrom):
            found |= {t for a in node.names if (t := _target(module, node, a.name))}
        else:
            found |= {a.name.removeprefix("src.") for a in node.names if a.name.startswith("src.")}
    return found - {module}


def third_party(module: str, tree: ast.AST | None = None) -> set[str]:
    """Top-level names of the libraries the module imports, anywhere in it."""
    names = set()
    for node, _ in import_nodes(module, tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names - {"src"}


def graph() -> dict[str, set[str]]:
    return {m: imports(m) for m in modules()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path back to it."""
    found = []
    for start in edges:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def violations(module: str, tree: ast.AST | None = None) -> list[str]:
    """What breaks the layering in one module (its source parsed, or `tree` for a planted one)."""
    deps, rank, found = imports(module, tree), LAYERS.index(layer(module)), []
    found += [f"{module} imports {d} ({layer(d)}), a higher layer" for d in deps if LAYERS.index(layer(d)) > rank]
    found += [f"{module} imports the command module {d}" for d in deps if layer(d) == "commands" and rank < 4]
    if layer(module) in NO_MLFLOW and "mlflow" in third_party(module, tree):
        found.append(f"{module} ({layer(module)}) imports mlflow")
    if layer(module) != "commands":
        lazy = imports(module, tree) - imports(module, tree, top_only=True)
        found += [f"{module} imports {d} inside a function: library modules import the project at the top"
                  for d in sorted(lazy)]
    return found


def function_lengths() -> list[tuple[int, str]]:
    rows = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC.parent)}:{node.name}"))
    return sorted(rows, reverse=True)


def test_every_module_sits_in_a_layer():
    assert [m for m in modules() if layer(m) not in LAYERS] == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_cycle_detection_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] in (["a", "b", "c", "a"],
                                                                           ["b", "c", "a", "b"],
                                                                           ["c", "a", "b", "c"])


def test_layers_hold():
    assert [v for m in modules() for v in violations(m)] == []


def test_planted_breaches_are_caught():
    """A core module importing MLflow, the command layer or a higher layer, or the project inside a
    function, fails the check: the rules can fail."""
    planted = ast.parse("import mlflow\nfrom ..flows import finetune\nfrom .. import cli\n\n"
                        "def f():\n    from . import data\n")
    found = violations("core.loop", planted)
    assert "core.loop (core) imports mlflow" in found
    assert "core.loop imports flows.finetune (flows), a higher layer" in found
    assert "core.loop imports the command module cli" in found
    assert any("imports core.data inside a function" in v for v in found)


def test_the_logged_model_ships_only_what_it_imports():
    """serving.CODE (what a logged model carries) is closed under its imports: no trainer in it."""
    from src.mlflow_io.serving import CODE

    shipped = {c.removesuffix(".py").replace("/", ".") for c in CODE if not c.endswith("__init__.py")}
    needed = set().union(*(imports(m) for m in shipped))
    assert needed <= shipped, needed - shipped


def test_no_long_function():
    long = [f"{where}: {n} lines" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert long == [], f"split functions over {MAX_FUNCTION_LINES} lines"


if __name__ == "__main__":
    for name in LAYERS:
        print(f"## {name}")
        for m in modules():
            if layer(m) == name:
                print(f"  {m} -> {', '.join(sorted(imports(m))) or '-'}")
    print(f"cycles: {cycles(graph()) or 'none'}")
    breaches = [v for m in modules() for v in violations(m)]
    print(f"breaches: {breaches or 'none'}")
    print("longest functions:")
    for n, where in function_lengths()[:5]:
        print(f"  {n:>4}  {where}")
