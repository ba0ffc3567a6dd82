"""The house rules that keep kappatune a one-way house: no import cycles, no private cross-module imports
or attribute accesses."""

import ast
from pathlib import Path

import pytest

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


# -- private names reached as attributes: ``cache._umask``, ``kappatune.scan._digest``, getattr(m, "_x") --
def _is_module(name: str, root: Path = ROOT) -> bool:
    """Whether ``name`` (``kappatune.x.y``) is a module or package of the source tree under ``root``."""
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dotted(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_aliases(path: Path, tree: ast.AST, root: Path = ROOT) -> dict:
    """Every name the file binds to a kappatune module, under any alias, in any scope:
    ``import kappatune[.x] [as a]``, ``from kappatune[.x] import y [as a]`` with ``y`` a submodule,
    and the relative forms inside the package."""
    mod = _dotted(path, root) if path.is_relative_to(root / "kappatune") else ""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "kappatune" or a.name.startswith("kappatune."):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:  # ``import kappatune.cache`` binds ``kappatune``
                        aliases[a.name.partition(".")[0]] = "kappatune"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "kappatune" or target.startswith("kappatune."):
                for a in node.names:
                    if _is_module(f"{target}.{a.name}", root):
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
    return aliases


def _module_of(node: ast.AST, aliases: dict, root: Path):
    """The kappatune module an expression names (``c``, ``kappatune.study.run``), else ``None``."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _module_of(node.value, aliases, root)
        if owner is not None and _is_module(f"{owner}.{node.attr}", root):
            return f"{owner}.{node.attr}"
    return None


def _private_attribute_uses(path: Path, root: Path = ROOT):
    """``(line, module, name)`` of every private name (``_x``, not ``__x__``) of another kappatune
    module that ``path`` reaches as an attribute (``m._x``) or by ``getattr``/``setattr``/``hasattr``/
    ``delattr`` with a literal name. A private *module* (``kappatune._files``) may be reached from
    inside the package, which it serves, but not from outside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = _module_aliases(path, tree, root)
    inside = path.is_relative_to(root / "kappatune")
    own = _dotted(path, root) if inside else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner, name = _module_of(node.value, aliases, root), node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            owner, name = _module_of(node.args[0], aliases, root), node.args[1].value
        else:
            continue
        if owner is None or owner == own or not name.startswith("_") or name.endswith("__"):
            continue
        if inside and _is_module(f"{owner}.{name}", root):
            continue
        yield node.lineno, owner, name


def test_private_attribute_finder_sees_every_spelling(tmp_path):
    """The finder used below catches each way of reaching a private name, and nothing public (on a
    stand-in package, so that renaming a real module cannot blind this test)."""
    for mod in ("__init__", "cache", "selection", "scan", "_files", "study/__init__", "study/run", "study/arms",
                "integrations/__init__", "integrations/peft"):
        (tmp_path / "kappatune" / f"{mod}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "kappatune" / f"{mod}.py").write_text("")
    outside = tmp_path / "probe.py"
    outside.write_text(
        "import kappatune\nimport kappatune.cache as c\nimport kappatune.study.run\n"
        "from kappatune import selection as sel\nfrom kappatune.integrations import peft\n"
        "c._umask(); sel._apply; kappatune.scan._digest; kappatune.study.run._loop\n"
        "def f():\n    peft._pick; getattr(c, '_lock'); setattr(sel, '_x', 1)\n"
        "c.KappaCache; kappatune.__version__; sel.__name__; kappatune._files.atomic_write\n"
        "other._private; c.KappaCache._store; hasattr(c, 'KappaCache')\n")
    assert sorted((m, n) for _, m, n in _private_attribute_uses(outside, tmp_path)) == sorted([
        ("kappatune.cache", "_umask"), ("kappatune.selection", "_apply"), ("kappatune.scan", "_digest"),
        ("kappatune.study.run", "_loop"), ("kappatune.integrations.peft", "_pick"),
        ("kappatune.cache", "_lock"), ("kappatune.selection", "_x"), ("kappatune", "_files")])
    inside = tmp_path / "kappatune" / "study" / "arms.py"   # relative imports; its own privates; a private module
    inside.write_text("from .. import selection as s\nfrom . import run, arms\nfrom .. import _files\n"
                      "import kappatune\ns._apply; run._loop; arms._own; _files.atomic_write; kappatune._files\n"
                      "_files._helper\n")
    assert sorted((m, n) for _, m, n in _private_attribute_uses(inside, tmp_path)) == sorted([
        ("kappatune.selection", "_apply"), ("kappatune.study.run", "_loop"), ("kappatune._files", "_helper")])


# tests/ is left out on purpose: a test may patch or inspect internals (monkeypatch a private
# function to count calls, read a private constant to hit a switch point); the rule is for the code
# users run and read: the package, the examples and the benchmarks.
# The white-box benchmarks that time kappatune.kappa's internal methods one by one (the switch points
# of the κ numerics are measured there, by design). Listed exactly: a new use anywhere else fails.
WHITE_BOX = {
    ("benchmarks/kappa_paths.py", "kappatune.kappa", "_gram"),
    ("benchmarks/kappa_paths.py", "kappatune.kappa", "_dense_gram_extremes"),
    ("benchmarks/kappa_paths.py", "kappatune.kappa", "_certified_gram_extremes"),
    ("benchmarks/kappa_paths.py", "kappatune.kappa", "_qr_extremes"),
    ("benchmarks/kappa_paths.py", "kappatune.kappa", "_krylov_max"),
    ("benchmarks/scan_speed.py", "kappatune.kappa", "_GRAM_REL_ERR_BUDGET"),
    ("benchmarks/scan_speed_cuda.py", "kappatune.kappa", "_use_certified"),
}


def test_no_private_names_reached_as_attributes_across_modules():
    """No module, example or benchmark reaches another kappatune module's private names as
    attributes (``import kappatune.cache as c; c._umask``), the way around the import rule above."""
    files = [*PKG.rglob("*.py"), *(ROOT / "examples").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = [(str(path.relative_to(ROOT)), line, module, name)
             for path in sorted(files) for line, module, name in sorted(_private_attribute_uses(path))]
    offenders = [f"{f}:{line} uses {module}.{name}" for f, line, module, name in found
                 if (f, module, name) not in WHITE_BOX]
    assert not offenders, "\n".join(offenders)
    stale = WHITE_BOX - {(f, module, name) for f, _, module, name in found}
    assert not stale, f"WHITE_BOX lists uses that are gone: {sorted(stale)}"


def test_the_top_level_is_small_and_old_spellings_warn():
    """The names a newcomer holds in their head; moved names still work, with a FutureWarning."""
    import warnings

    import kappatune

    assert len(kappatune.__all__) - 1 <= 16, kappatune.__all__  # without __version__
    for name in kappatune.__all__:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(kappatune, name) is not None
    import kappatune.compat
    import kappatune.kappa

    for old, new in (("SelectiveFineTuningOptimizer", kappatune.compat.SelectiveFineTuningOptimizer),
                     ("condition_numbers", kappatune.kappa.condition_numbers),
                     ("kappa_of", kappatune.kappa.kappa_of)):
        with pytest.warns(FutureWarning, match=f"kappatune.{old} is deprecated"):
            assert getattr(kappatune, old) is new
    with pytest.warns(FutureWarning, match="kappatune.KappaResult is deprecated"):
        assert kappatune.KappaResult is kappatune.KappaEntry      # one record type for a κ
    with pytest.warns(FutureWarning, match="kappatune.kappa.KappaResult is deprecated"):
        assert kappatune.kappa.KappaResult is kappatune.KappaEntry
    assert isinstance(kappatune.kappa.kappa_of(__import__("torch").eye(3)), kappatune.KappaEntry)
    assert callable(kappatune.scan)  # the function, not a module of that name
