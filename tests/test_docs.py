"""The documentation: the site builds with warnings as errors, links resolve, generated pages are current."""

import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_docs  # noqa: E402

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
# not documented as modules: the console script and its entry point (documented as the command line), and
# the integrations package, whose submodules have their pages
NOT_API = {"kappatune.cli", "kappatune.__main__", "kappatune.integrations"}


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: str):
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", md, re.M)}


def _relative_links(text: str):
    for url in LINK.findall(text) + HTML_SRC.findall(text):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I):
            yield url


def test_readme_relative_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    anchors = _anchors(readme)
    bad = []
    links = list(_relative_links(readme))
    assert links, "the README links to the docs pages and examples"
    for url in links:
        path, _, anchor = url.partition("#")
        if not path:
            if anchor not in anchors:
                bad.append(f"{url} (no such heading in README.md)")
            continue
        target = (ROOT / path).resolve()
        if not target.exists():
            bad.append(f"{url} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text(encoding="utf-8")):
            bad.append(f"{url} (no such heading in {path})")
    assert not bad, "README.md links that do not resolve: " + "; ".join(bad)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; the details belong in docs/ (the README stays <= 300)"


def test_contributing_links_resolve():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    bad = [u for u in _relative_links(text) if u.partition("#")[0] and not (ROOT / u.partition("#")[0]).exists()]
    assert not bad, f"CONTRIBUTING.md links that do not resolve: {bad}"


def test_contributing_maps_every_module():
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "kappatune").rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and f"`{p.relative_to(ROOT).as_posix()}`" not in text]
    assert not missing, f"CONTRIBUTING.md's package map does not list: {missing}"


def test_benchmark_pages_are_generated_from_the_result_files():
    diffs = make_docs.differences()
    assert not diffs, ("docs/benchmarks/ is not what benchmarks/results/ gives: " + "; ".join(diffs)
                       + " -- run: python benchmarks/make_docs.py")


def _nodes(obj):
    """Every value of a parsed JSON document, containers included, depth first."""
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for v in children:
        yield from _nodes(v)


FIG = r"[+\-−]?\d+\.\d{3,4}\b"
V2_SUMMARY = "benchmarks/results/forgetting_v2/summary.json"
V3_SUMMARY = "benchmarks/results/forgetting_v3/summary.json"
# the prose that quotes a forgetting study, with the summary it quotes: README's paragraph and the evidence
# page's findings
STUDY_PROSE = [
    (ROOT / "README.md", "**What forgets least: the evidence first.**", "**The earlier study (v2)**", V3_SUMMARY),
    (ROOT / "README.md", "**The earlier study (v2)**", "\n## ", V2_SUMMARY),
    (DOCS / "index.md", "**What forgets least?**", "**The earlier study (v2)**", V3_SUMMARY),
    (DOCS / "evidence" / "forgetting_v2.md", "## What came out", "\n## How to read", V2_SUMMARY),
    (DOCS / "evidence" / "forgetting_v3.md", "## What came out", "\n## Caveats", V3_SUMMARY),
    (DOCS / "guides" / "forgetting.md", "## What the evidence shows", "\n## ", V3_SUMMARY),
]


@pytest.mark.parametrize("path,start,end,source", STUDY_PROSE,
                         ids=["README v3", "README v2", "docs index v3", "evidence page v2", "evidence page v3",
                              "forgetting guide v3"])
def test_quoted_study_figures_come_from_the_summary(path, start, end, source):
    """The prose quoting the forgetting study matches summary.json, so a rerun cannot leave the headline
    behind: every interval ``[lo, hi]`` it quotes is one comparison's ``ci95`` or ``t_ci95``, the figure just
    before it is a value of that same comparison, and every other figure with 3 or 4 decimals is a value of
    the summary, correctly rounded. After regenerating the report, update the prose until this passes."""
    def num(q):
        return float(q.replace("−", "-"))

    def close(v, q):  # v rounds to q (to q's decimals)
        decimals = len(q.split(".")[1])
        return isinstance(v, (int, float)) and abs(v - num(q)) <= 0.5 * 10 ** -decimals + 1e-9

    summary = json.loads((ROOT / source).read_text())
    nodes = list(_nodes(summary))
    values = [float(v) for v in nodes if isinstance(v, (int, float)) and not isinstance(v, bool)]
    comparisons = [c for c in nodes if isinstance(c, dict) and "mean_diff" in c]   # a difference with its CIs
    text = path.read_text()
    assert start in text, f"{path.name}: section {start!r} not found"
    section = text[text.index(start):]
    section = section[:section.index(end)] if end in section else section

    wrong = []
    intervals = list(re.finditer(rf"(?:({FIG})(?:[^\[\]\d]|95 %){{0,45}})?\[({FIG}), ({FIG})\]", section))
    assert intervals, f"{path.name}: no interval quoted in {start!r}"
    for m in intervals:
        figure, lo, hi = m.groups()
        owners = [c for c in comparisons for key in ("ci95", "t_ci95")
                  if c.get(key) and close(c[key][0], lo) and close(c[key][1], hi)]
        if not owners or (figure and not any(close(v, figure) for c in owners for v in c.values())):
            wrong.append(m.group(0))
    # a figure the prose derives from two summary values (e.g. a task-loss gap) is written with 2 decimals;
    # every one with 3 or 4 decimals is quoted as it stands in the summary, rounded once
    wrong += [q for q in re.findall(FIG, section) if not any(close(v, q) for v in values)]
    assert not wrong, (f"{path.name} quotes {wrong}, which {source} does not hold: update the prose "
                       f"to the regenerated {Path(source).with_name('results.md')}")


def test_generator_makes_a_page_per_result_and_rewrites_links(tmp_path):
    results = tmp_path / "results"
    (results / "alpha").mkdir(parents=True)
    (results / "alpha" / "results.md").write_text(
        "# Alpha speed\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![plot](plot.png) [runs](runs/r1.json) "
        "[beta](../beta/results.md) [web](https://example.org/x)\n")
    (results / "alpha" / "plot.png").write_bytes(b"\x89PNG fake")
    (results / "alpha" / "results.json").write_text('{"command": "python benchmarks/alpha.py --fast"}')
    (results / "beta" / "quick").mkdir(parents=True)
    (results / "beta" / "results.md").write_text("no title here\n")
    (results / "beta" / "quick" / "results.md").write_text("# smoke run, not a page\n")
    (results / "gamma").mkdir()       # a study's report: its command on a "Made with" line, a sibling link
    (results / "gamma" / "results.md").write_text(
        "# Gamma study\n\nMade with: `kappatune study --out gamma`\n\nPre-registration: "
        "[PREREGISTRATION.md](PREREGISTRATION.md).\n")
    (results / "gamma" / "PREREGISTRATION.md").write_text("# rules\n")
    out = tmp_path / "docs_bench"
    config = tmp_path / "mkdocs.yml"
    config.write_text("nav:\n  - Benchmarks:\n      # BEGIN benchmark pages\n      - old.md\n"
                      "      # END benchmark pages\n  - Other: other.md\n")
    assert make_docs.differences(results, out, config)
    make_docs.write(results, out, config)
    assert make_docs.differences(results, out, config) == []
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "alpha.md", "beta.md", "gamma.md", "img/alpha-plot.png", "index.md"]
    alpha = (out / "alpha.md").read_text()
    assert alpha.startswith("<!-- generated by benchmarks/make_docs.py")
    assert "# Alpha speed" in alpha and "do not edit" in alpha and "| 1 | 2 |" in alpha
    assert "![plot](img/alpha-plot.png)" in alpha and (out / "img/alpha-plot.png").read_bytes() == b"\x89PNG fake"
    assert "runs/r1.json)" not in alpha and "[beta](beta.md)" in alpha and "(https://example.org/x)" in alpha
    index = (out / "index.md").read_text()
    assert "[Alpha speed](alpha.md)" in index and "`python benchmarks/alpha.py --fast`" in index
    assert "`kappatune study --out gamma`" in index
    assert "Pre-registration: `benchmarks/results/gamma/PREREGISTRATION.md`." in (out / "gamma.md").read_text()
    nav = config.read_text()
    assert "old.md" not in nav and '- "Alpha speed": benchmarks/alpha.md' in nav and "Other: other.md" in nav
    # a result file edited after the pages were made: the check says so; a page nobody makes is stale
    (results / "alpha" / "results.md").write_text("# Alpha speed\n\nnew numbers\n")
    (out / "orphan.md").write_text("x")
    diffs = make_docs.differences(results, out, config)
    assert "out of date: alpha.md" in diffs and "stale (no result file makes it): orphan.md" in diffs


def _public_modules():
    import kappatune

    names = ["kappatune"]
    for info in pkgutil.walk_packages(kappatune.__path__, "kappatune."):
        if any(part.startswith("_") for part in info.name.split(".")) or info.name in NOT_API:
            continue
        names.append(info.name)
    return names


def test_every_public_module_has_a_reference_page():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = []
    for mod in _public_modules():
        page = DOCS / "reference" / ("kappatune.md" if mod == "kappatune" else mod[len("kappatune."):] + ".md")
        if mod != "kappatune" and (not page.is_file() or f"::: {mod}" not in page.read_text(encoding="utf-8")):
            missing.append(f"{mod} (docs/reference/{page.name} with '::: {mod}')")
        elif f"reference/{page.name}" not in nav:
            missing.append(f"{mod} (not in the nav of mkdocs.yml)")
    assert not missing, "public modules without a reference page: " + "; ".join(missing)


def test_reference_index_names_every_exported_name():
    import kappatune

    text = (DOCS / "reference" / "kappatune.md").read_text(encoding="utf-8")
    missing = [n for n in kappatune.__all__ if n != "__version__" and f"`{n}`" not in text]
    assert not missing, f"docs/reference/kappatune.md does not list: {missing}"


# -- every argument of the public API is documented ----------------------------------------------
# The other direction, an argument documented under a name the signature does not have, is the docs
# build's: griffe warns "Parameter 'x' does not appear in the function signature" and
# test_site_builds_with_warnings_as_errors builds with warnings as errors.
ARGS_SECTIONS = ("Args:", "Arguments:")
FIELDS_SECTIONS = ARGS_SECTIONS + ("Attributes:",)   # a dataclass's fields are its __init__'s arguments


def _documented(doc: str, sections) -> set:
    """Names with an entry ``name (type...): ...`` (``*name``, ``**name`` too) in the Google-style
    ``sections`` of a cleaned docstring: a header at column 0, entries at the first indentation below it."""
    names, inside, indent = set(), False, None
    for line in doc.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            inside, indent = line.strip() in sections, None
            continue
        if inside:
            depth = len(line) - len(line.lstrip())
            indent = depth if indent is None else indent
            m = re.match(r"^\s+\*{0,2}(\w+) \(", line)
            if depth == indent and m:
                names.add(m.group(1))
    return names


def _undocumented(func, doc: str, sections) -> list:
    """The arguments of ``func`` (not self, cls, *args, **kwargs) without an entry in ``doc``."""
    have = _documented(doc, sections)
    return [p.name for p in inspect.signature(func).parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in have]


def _api_callables():
    """``(qualified name, function or None, docstring, sections)`` of every function and class in the
    ``__all__`` of a public module, and of every public method a class defines. A class's ``__init__``
    is documented in the class docstring (the reference merges it into the class); a dataclass's
    fields may be documented as ``Attributes:``. Docstrings are the objects' own, never inherited
    (the reference does not inherit them either)."""
    import dataclasses

    out, seen = [], set()
    for mod_name in _public_modules() + ["kappatune.cli"]:  # the command's main(argv) is public too
        mod = importlib.import_module(mod_name)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            where = f"{obj.__module__}.{obj.__qualname__}"
            if inspect.isfunction(obj):
                out.append((where, obj, obj.__doc__, ARGS_SECTIONS))
                continue
            init = obj.__dict__.get("__init__")
            doc = "\n\n".join(inspect.cleandoc(d) for d in (obj.__doc__, getattr(init, "__doc__", None)) if d)
            out.append((where, init, doc or None, FIELDS_SECTIONS if dataclasses.is_dataclass(obj) else ARGS_SECTIONS))
            for attr, value in obj.__dict__.items():
                func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if not attr.startswith("_") and inspect.isfunction(func):
                    out.append((f"{where}.{attr}", func, func.__doc__, ARGS_SECTIONS))
    return out


def test_public_api_documents_every_argument():
    """Every public function, class and method has a docstring whose ``Args:`` section has an entry
    ``name (type, optional): what. Default: x.`` for each of its arguments (CONTRIBUTING's rule)."""
    pytest.importorskip("transformers")  # kappatune.integrations.transformers imports it

    def sample(a: int, b: int = 1, *rest: int, **options: int) -> None:
        """Sample.

        Args:
            a (int): the first. It spans
                two lines; b (int): is not an entry.
        """

    assert _undocumented(sample, inspect.cleandoc(sample.__doc__), ARGS_SECTIONS) == ["b"]
    callables = _api_callables()
    assert len(callables) >= 80, f"only {len(callables)} public callables found: the collection is broken"
    problems = []
    for where, func, doc, sections in callables:
        if not (doc or "").strip():
            problems.append(f"{where}: no docstring")
        elif func is not None:
            missing = _undocumented(func, inspect.cleandoc(doc), sections)
            if missing:
                problems.append(f"{where}: {missing} not documented (in {' or '.join(sections)})")
    assert not problems, (f"{len(problems)} public callables do not document every argument as "
                          "'name (type, optional): what. Default: x.':\n" + "\n".join(problems))


def test_nothing_points_outside_the_project():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    bad = []
    for rel in files:
        p = ROOT / rel
        if rel.startswith("benchmarks/results/") or not p.is_file() or p.stat().st_size > 2_000_000:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for m in re.finditer(r"(?<![\w.-])(?:\.\./)?shared/[\w.-]+", text):
            bad.append(f"{rel}: {m.group(0)}")
    assert not bad, f"files that point outside the project: {bad}"


def test_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    importlib.import_module("mkdocstrings_handlers.python")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = "\n".join(ln for ln in (proc.stdout + proc.stderr).splitlines() if not ln.startswith("INFO"))
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + log
    site = tmp_path / "site"
    for page in ("index.html", "reference/optimizer/index.html", "benchmarks/index.html",
                 "guides/cli/index.html", "concepts/kappa/index.html"):
        assert (site / page).is_file(), page
    # the reference is generated from the docstrings: the optimizer's page documents its arguments
    html = (site / "reference/optimizer/index.html").read_text(encoding="utf-8")
    assert "KappaTuneOptimizer" in html and "param_budget" in html
    # Sphinx markup of the docstrings is rendered: no role prefixes, math marked for MathJax
    kappa = (site / "reference/kappa/index.html").read_text(encoding="utf-8")
    assert '<div class="arithmatex">\\[' in kappa and '<span class="arithmatex">\\(' in kappa
    assert ".. math::" not in kappa and ":math:" not in kappa and ":func:" not in html
    tex_as_code = re.compile(r"<pre><code>[^<]*\\(?:frac|leftarrow|mathrm|sum|sigma|kappa)\b")
    literal = [str(f.relative_to(site)) for f in sorted((site / "reference").rglob("index.html"))
               if ".. math::" in (t := f.read_text(encoding="utf-8")) or ":math:" in t or tex_as_code.search(t)]
    assert not literal, f"math left as literal text or a code block on: {literal}"


# -- the navigation: one title per page, nothing internal ----------------------------------------
def _nav_pages(node, out):
    """(title, path) of every page in a parsed mkdocs nav."""
    if isinstance(node, list):
        for item in node:
            _nav_pages(item, out)
    elif isinstance(node, dict):
        for title, value in node.items():
            if isinstance(value, str):
                out.append((title, value))
            else:
                _nav_pages(value, out)
    elif isinstance(node, str):
        out.append((None, node))
    return out


def test_navigation_lists_each_page_once_under_its_own_title():
    yaml = pytest.importorskip("yaml")
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"], [])
    titles = [t for t, _ in nav if t is not None]
    paths = [p for _, p in nav]
    assert len(set(paths)) == len(paths), f"pages listed twice: {sorted({p for p in paths if paths.count(p) > 1})}"
    assert len(set(titles)) == len(titles), f"titles used twice: {sorted({t for t in titles if titles.count(t) > 1})}"
    internal = [t for t in titles if re.search(r"\bissues?\b\s*#?\d|#\d", t, re.I)]
    assert not internal, f"navigation titles that show issue numbers to users: {internal}"


def test_generator_gives_results_with_one_heading_distinct_titles(tmp_path):
    results = tmp_path / "results"
    for part in ("small_model", "large_model"):
        (results / "speed" / part).mkdir(parents=True)
        (results / "speed" / part / "results.md").write_text("# Speed\n\nnumbers\n")
    (results / "mem").mkdir(parents=True)
    (results / "mem" / "results.md").write_text("# Memory\n")
    (results / "mem" / "again").mkdir()
    (results / "mem" / "again" / "results.md").write_text("# Memory\n")
    pages = make_docs.render_all(results)
    titles = [ln.split('": ')[0].strip('"') for ln in make_docs.nav_lines(pages)[1:]]
    assert sorted(titles) == ["Memory", "Memory (again)", "Speed (large model)", "Speed (small model)"]
    assert pages["speed-small_model.md"].splitlines()[1] == "# Speed (small model)"
    assert "[Speed (large model)](speed-large_model.md)" in pages["index.md"]


# -- the command line and the quickstart choose the same tensors by default ----------------------
def test_command_line_selects_what_the_quickstart_trains(tmp_path, capsys):
    """``kappatune export MODEL_DIR --top-fraction 0.1`` and the quickstart's
    ``KappaTuneOptimizer(model, ..., top_fraction=0.1, max_dim=16384)`` select the same tensors, on a
    model whose embedding and LM head (16400 × 16, the best conditioned) are longer than 16384."""
    import torch

    import kappatune
    from kappatune.cli import main

    from .conftest import make_tiny_llama

    model = make_tiny_llama(seed=1, layers=2, hidden=16, vocab=16400)
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--top-fraction", "0.1", "--format", "names"]) == 0
    cli = capsys.readouterr().out.split()
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.AdamW, top_fraction=0.1, max_dim=16384, lr=1e-3,
                                       cache=False)
    assert sorted(cli) == sorted(opt.selected) and len(cli) == 2  # ceil(0.1 × 14 linear layers)
    fresh = make_tiny_llama(seed=1, layers=2, hidden=16, vocab=16400)  # nothing frozen yet
    bare = kappatune.KappaTuneOptimizer(fresh, torch.optim.AdamW, top_fraction=0.1, lr=1e-3, cache=False)
    assert sorted(bare.selected) == sorted(cli)                      # one default for both
    table = kappatune.scan(model, cache=False, progress=False, max_dim=None)  # every size: the embedding ranks first
    assert table.names[0] in ("model.embed_tokens.weight", "lm_head.weight")
    assert "model.embed_tokens.weight" not in kappatune.scan(model, cache=False, progress=False)


# -- the code blocks marked runnable run ----------------------------------------------------------
# A fenced ```python or ```bash block right after a line `<!-- runnable -->` is run by this test, in
# document order, in a fresh folder per page (python blocks of a page share one namespace, as a reader
# running them in turn would). `<!-- runnable: model, batches -->` names what the block takes from
# the reader and the test supplies (GIVENS below): in python a variable, in bash a word replaced by the
# value. Everything is built from tiny configs, never downloaded.
RUNNABLE = re.compile(r"^<!--\s*runnable(?::\s*(?P<givens>[^>]*?))?\s*-->\s*$")
FENCE = re.compile(r"^```(python|bash)\s*$")


def _tiny_model(ctx):
    from .conftest import make_tiny_llama

    return make_tiny_llama(seed=0, layers=3)


def _saved_model(ctx):
    folder = ctx["tmp"] / "given_model"
    if not folder.is_dir():
        _given(ctx, "model").save_pretrained(folder)
    return str(folder)


def _batches(ctx):
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = _given(ctx, "model").config.vocab_size
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(2)]


def _opt(ctx):
    import torch

    import kappatune

    return kappatune.KappaTuneOptimizer(_given(ctx, "model"), torch.optim.AdamW, top_fraction=0.1, lr=1e-3,
                                        cache=False)


def _table(ctx):
    import kappatune

    return kappatune.scan(_given(ctx, "model"), cache=False, progress=False)


GIVENS = {
    "model": _tiny_model,                                   # a LlamaForCausalLM, 3 layers, from a config
    "MODEL": _saved_model,                                  # the folder it is saved in (from_pretrained)
    "MODEL_DIR": _saved_model,                              # the same, for the command line
    "batches": _batches,                                    # token-id tensors (2, 16)
    "general_batches": _batches,                            # the forgetting monitor's control text
    "task_batches": _batches,                               # and its task text
    "loader": lambda ctx: [dict(input_ids=x, labels=x) for x in _given(ctx, "batches")],
    "accum": lambda ctx: 2,
    "opt": _opt,                                            # KappaTuneOptimizer over model, AdamW
    "table": _table,                                        # kappatune.scan(model)
    "names": lambda ctx: _given(ctx, "table").select(top_fraction=0.1),
}


def _given(ctx, name):
    if name not in ctx["values"]:
        ctx["values"][name] = GIVENS[name](ctx)
    return ctx["values"][name]


def runnable_blocks(path: Path):
    """``(line, language, givens, code)`` of every block of ``path`` marked runnable.

    Raises:
        ValueError: a marker not followed by a python/bash fence, an unclosed block, or a given the
            test does not know, naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        m = RUNNABLE.match(line.strip())
        if not m:
            continue
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{i + 1}"
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if not fence:
            raise ValueError(f"{where}: '<!-- runnable -->' must be followed by a ```python or ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"{where}: the code block is not closed")
        givens = [g.strip() for g in (m.group("givens") or "").split(",") if g.strip()]
        unknown = [g for g in givens if g not in GIVENS]
        if unknown:
            raise ValueError(f"{where}: unknown given(s) {unknown}; the test supplies {sorted(GIVENS)}")
        blocks.append((i + 2, fence.group(1), givens, "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


def _documents():
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted(
        p for p in DOCS.rglob("*.md") if "benchmarks" not in p.relative_to(DOCS).parts)


RUNNABLE_DOCS = [p for p in _documents()
                 if any(RUNNABLE.match(ln.strip()) for ln in p.read_text(encoding="utf-8").splitlines())]


def test_runnable_markers_are_well_formed(tmp_path):
    assert len(RUNNABLE_DOCS) >= 3, "the README and the guides mark their runnable blocks"
    for p in RUNNABLE_DOCS:
        assert runnable_blocks(p)  # each marker well formed: a fence follows, every given is known
    bad = tmp_path / "x.md"
    bad.write_text("<!-- runnable -->\n\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match=r"x\.md:1: .* must be followed by"):
        runnable_blocks(bad)
    bad.write_text("<!-- runnable: model, gpu_cluster -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match=r"unknown given\(s\) \['gpu_cluster'\]"):
        runnable_blocks(bad)
    bad.write_text("text\n<!-- runnable: model -->\n```bash\necho hi\n```\n")
    assert runnable_blocks(bad) == [(3, "bash", ["model"], "echo hi\n")]


@pytest.mark.parametrize("path", RUNNABLE_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runnable_blocks_run(path, tmp_path, monkeypatch):
    import os
    import shlex
    import warnings

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # blocks write where a reader would: cache="cache", -o table.json, ...
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    namespace = {"__name__": "__docs__"}
    for line, lang, givens, code in runnable_blocks(path):
        where = f"{path.relative_to(ROOT).as_posix()}:{line}"
        ctx = {"tmp": tmp_path, "values": {}}
        if lang == "python":
            namespace.update({g: _given(ctx, g) for g in givens})
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    exec(compile(code, where, "exec"), namespace)
                except Exception as e:
                    pytest.fail(f"{where}: the python block fails: {type(e).__name__}: {e}")
            # a block a reader copies should not warn (e.g. autocast("cuda") on a machine without CUDA)
            warned = [f"{w.category.__name__}: {w.message}" for w in caught
                      if issubclass(w.category, UserWarning) and not issubclass(w.category, FutureWarning)]
            assert not warned, f"{where}: the python block warns: {warned}"
        else:
            for g in givens:
                code = re.sub(rf"\b{re.escape(g)}\b", shlex.quote(str(_given(ctx, g))), code)
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=work, env=env,
                               capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, f"{where}: the bash block fails:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
