"""The shape of `src/`: dependencies point one way (entry points -> orchestration -> stages -> base),
no import cycle, no long function. `python -m tests.test_structure` prints the import graph and the
longest functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_FUNCTION_LINES = 60

# A module may import its own layer or a lower one, never a higher one.
LAYERS = {
    "base": {"config", "names", "urls", "signals", "cli"},
    "stages": {"data", "modeling", "loop", "evaluate", "checkpoint", "serving", "served_model", "tracking",
               "registry"},
    "orchestration": {"finetune", "tune", "compare"},
    "entry points": {"train", "predict", "serve", "options"},
}
RANK = {module: rank for rank, names in enumerate(LAYERS.values()) for module in names}


def modules() -> list[str]:
    return sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its body (function-level imports included:
    they are dependencies all the same)."""
    found = set()
    for node in ast.walk(ast.parse((SRC / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("src.")}
    return {m.split(".")[0] for m in found} - {module}


def graph() -> dict[str, set[str]]:
    return {m: imports(m) for m in modules()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path back to it."""
    found = []
    for start in edges:
        stack = [(start, [start])]
        seen = set()
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


def function_lengths() -> list[tuple[int, str]]:
    rows = []
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                rows.append((node.end_lineno - node.lineno + 1, f"src/{path.name}:{node.name}"))
    return sorted(rows, reverse=True)


def test_every_module_has_a_layer():
    assert set(modules()) - set(RANK) == set(), "place new modules in LAYERS"


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_cycle_detection_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})[0] in (["a", "b", "c", "a"],
                                                                           ["b", "c", "a", "b"],
                                                                           ["c", "a", "b", "c"])


def test_dependencies_point_down():
    upward = [f"{m} ({layer(m)}) imports {d} ({layer(d)})"
              for m, deps in graph().items() for d in deps if RANK[d] > RANK[m]]
    assert upward == []


def test_no_long_function():
    long = [f"{where}: {n} lines" for n, where in function_lengths() if n > MAX_FUNCTION_LINES]
    assert long == [], f"split functions over {MAX_FUNCTION_LINES} lines"


def layer(module: str) -> str:
    return list(LAYERS)[RANK[module]]


if __name__ == "__main__":
    for name, members in LAYERS.items():
        print(f"## {name}")
        for m in sorted(members & set(modules())):
            print(f"  {m} -> {', '.join(sorted(imports(m))) or '-'}")
    print(f"cycles: {cycles(graph()) or 'none'}")
    print("longest functions:")
    for n, where in function_lengths()[:5]:
        print(f"  {n:>4}  {where}")
