"""The house rules that keep kappatune a one-way house: no import cycles, no private cross-module imports."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kappatune"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported kappatune module, imported names, line) for every import in the file, in functions too."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "kappatune" or target.startswith("kappatune."):
                names = [a.name for a in node.names]
                # "from . import quant" imports the submodule quant
                subs = [f"{target}.{n}" for n in names if (PKG.parent / (target + "." + n).replace(".", "/")).with_suffix(".py").exists()
                        or (PKG.parent / (target + "." + n).replace(".", "/") / "__init__.py").exists()]
                yield (subs[0] if subs else target), names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kappatune"):
                    yield a.name, [], node.lineno


def _graph():
    graph = {}
    for path in PKG.rglob("*.py"):
        src = _module_name(path)
        graph[src] = {t for t, _, _ in _imports(path) if t != src and t != "kappatune"}
    return graph


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_refs_is_a_leaf():
    assert _graph()["kappatune.refs"] == set()


def test_no_private_names_cross_modules():
    """No module, example or benchmark imports another kappatune module's private (``_x``) names."""
    offenders = []
    files = [*PKG.rglob("*.py"), *(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    for path in files:
        own = _module_name(path) if path.is_relative_to(PKG) else None
        for target, names, line in _imports(path):
            if target == own:
                continue
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {target}")
    assert not offenders, "\n".join(offenders)
