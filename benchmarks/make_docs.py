#!/usr/bin/env python
"""Build the benchmark pages of the documentation site from the committed result files.

Every benchmark writes ``benchmarks/results/<name>/results.md`` (its markdown tables, the command
that reproduces them, the machine) and ``results.json``. This script turns each ``results.md``
found under ``benchmarks/results/`` into ``docs/benchmarks/<name>.md`` (a result in a subfolder,
``results/<name>/<part>/results.md``, becomes ``docs/benchmarks/<name>-<part>.md``), copies the
figures it shows into ``docs/benchmarks/img/``, and writes ``docs/benchmarks/index.md`` listing
them all. Pages appear as result files land; nothing in them is typed by hand.

Relative links in a ``results.md`` are rewritten for the site: figures are copied, another result
becomes a link to its page, and any other file (a per-run JSON, a log) is named as a repository
path, so the site never links outside itself.

Usage (from anywhere)::

    python benchmarks/make_docs.py           # (re)write docs/benchmarks/
    python benchmarks/make_docs.py --check   # exit 1 if docs/benchmarks/ is not what the results give

``tests/test_docs.py`` runs the check, so a result file committed without its pages fails the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "benchmarks"
MKDOCS = ROOT / "mkdocs.yml"
NAV_BEGIN = "# BEGIN benchmark pages"
NAV_END = "# END benchmark pages"
IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}
# result folders that hold no benchmark of record: smoke runs, scratch space, per-run files
SKIP_DIRS = {"quick", "tmp", "runs", "smoke", "scratch"}
# results of record whose harness has since been retired: folder -> the commit whose tree ran the
# command their results.md names (the index and the page say so; the record itself is not edited)
RETIRED = {"forgetting": "4ec6a3b", "forgetting/lr_probe": "4ec6a3b"}
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")

Content = Union[str, bytes]


def _rel(path: Path, results: Path = RESULTS) -> str:
    """The repository path of a file under ``results`` (``benchmarks/results/...``)."""
    path, results = path.resolve(), results.resolve()
    try:
        return "benchmarks/results/" + path.relative_to(results).as_posix()
    except ValueError:
        try:
            return path.relative_to(ROOT).as_posix()
        except ValueError:
            return path.as_posix()


def find_results(results: Path = RESULTS) -> List[Path]:
    """Every ``results.md`` of record under ``results``, sorted (skipping smoke/scratch folders)."""
    found = []
    for md in sorted(results.rglob("results.md"), key=lambda p: p.relative_to(results).parts[:-1]):
        parts = md.relative_to(results).parts[:-1]
        if not parts or any(p in SKIP_DIRS or p.startswith((".", "_")) for p in parts):
            continue
        found.append(md)
    return found


def slug_of(md: Path, results: Path = RESULTS) -> str:
    """``results/scan_speed/results.md`` -> ``scan_speed``; ``results/a/b/results.md`` -> ``a-b``."""
    return "-".join(md.relative_to(results).parts[:-1])


def _title_and_body(text: str, fallback: str) -> Tuple[str, str]:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            if line.startswith("# "):
                return line[2:].strip(), "\n".join(lines[i + 1:]).strip("\n")
            break
    return fallback, text.strip("\n")


def _retired_at(md: Path, results: Path = RESULTS) -> Optional[str]:
    """The commit that holds the harness of a retired result (``RETIRED``), else None."""
    return RETIRED.get("/".join(md.relative_to(results).parts[:-1]))


def _command_of(md: Path, text: str) -> Optional[str]:
    js = md.with_name("results.json")
    if js.is_file():
        try:
            cmd = json.loads(js.read_text()).get("command")
            if isinstance(cmd, str) and cmd:
                return cmd
        except (ValueError, AttributeError):
            pass
    m = (re.search(r"```(?:bash|sh)?\n(python [^\n]+)\n", text) or re.search(r"^Made with: `([^`]+)`", text, re.M)
         or re.search(r"[Cc]ommand[^`\n]*`([^`]+)`", text))
    return m.group(1).strip() if m else None


def _rewrite_links(text: str, md: Path, slug: str, files: Dict[str, Content], results: Path) -> Tuple[str, set]:
    """Rewrite the relative links of ``md`` for the site; returns (text, figures referenced)."""
    used = set()

    def sub(m: re.Match) -> str:
        bang, label, url = m.groups()
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", url, re.I):  # http:, mailto:, an anchor
            return m.group(0)
        path_part, _, anchor = url.partition("#")
        target = (md.parent / path_part).resolve()
        repo_path = _rel(target, results)
        if target.is_file() and target.suffix.lower() in IMAGE_SUFFIXES:
            name = f"{slug}-{target.name}"
            files[f"img/{name}"] = target.read_bytes()
            used.add(target)
            return f"{bang}[{label}](img/{name})"
        if target.name == "results.md" and target.is_file():
            try:
                return f"[{label}]({slug_of(target, results)}.md{'#' + anchor if anchor else ''})"
            except ValueError:
                pass
        if target.is_dir() and (target / "results.md").is_file():
            return f"[{label}]({slug_of(target / 'results.md', results)}.md)"
        return f"{label} (`{repo_path}`)" if label and label != path_part else f"`{repo_path}`"

    return LINK.sub(sub, text), used


def _fallback_title(slug: str) -> str:
    return slug.replace("_", " ").replace("-", ": ")


def page_titles(mds: List[Path], results: Path = RESULTS) -> Dict[Path, str]:
    """The title of each page: its ``results.md`` heading, made unique.

    Where several result files share a heading (the same benchmark run on two models into
    ``results/<name>/<part>/``), each one in a subfolder gets its part appended, ``Title (part)``
    (any left alike, their page name), so that the navigation and the index never list two pages
    under one name.
    """
    titles = {md: _title_and_body(md.read_text(encoding="utf-8"), _fallback_title(slug_of(md, results)))[0]
              for md in mds}
    counts: Dict[str, int] = {}
    for t in titles.values():
        counts[t] = counts.get(t, 0) + 1
    out = {}
    for md, t in titles.items():
        parts = md.relative_to(results).parts[:-1]
        out[md] = f"{t} ({'/'.join(parts[1:]).replace('_', ' ')})" if counts[t] > 1 and len(parts) > 1 else t
    taken = list(out.values())
    return {md: f"{t} ({slug_of(md, results)})" if taken.count(t) > 1 else t for md, t in out.items()}


def render_page(md: Path, results: Path = RESULTS,
                title: Optional[str] = None) -> Tuple[str, str, Dict[str, Content], Optional[str]]:
    """(slug, page text, extra files, command) for one ``results.md`` (``title`` replaces its heading)."""
    slug = slug_of(md, results)
    text = md.read_text(encoding="utf-8")
    heading, body = _title_and_body(text, _fallback_title(slug))
    title = title or heading
    files: Dict[str, Content] = {}
    body, used = _rewrite_links(body, md, slug, files, results)
    figures = [p for p in sorted(md.parent.iterdir())
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in used]
    extra = []
    for p in figures:  # figures the benchmark wrote but its results.md does not show
        name = f"{slug}-{p.name}"
        files[f"img/{name}"] = p.read_bytes()
        extra.append(f"![{p.stem}](img/{name})\n\n`{_rel(p, results)}`")
    sources = [f"`{_rel(md, results)}`"] + ([f"`{_rel(md.with_name('results.json'), results)}`"]
                                   if md.with_name("results.json").is_file() else [])
    header = [
        f"<!-- generated by benchmarks/make_docs.py from {_rel(md, results)}; do not edit: rerun the benchmark, "
        f"then python benchmarks/make_docs.py -->",
        f"# {title}",
        "",
        f"*Generated by `python benchmarks/make_docs.py` from {' and '.join(sources)}; do not edit this "
        f"page: rerun the benchmark and regenerate.*",
        "",
    ]
    retired = _retired_at(md, results)
    if retired:
        header += [f"*The harness that wrote this record has been retired; its command below ran from the "
                   f"tree of commit `{retired}` (`git worktree add ../at-{retired} {retired}`).*", ""]
    page = "\n".join(header) + "\n" + body.strip("\n") + "\n"
    if extra:
        page += "\n## Figures\n\n" + "\n\n".join(extra) + "\n"
    return slug, page, files, _command_of(md, text)


def render_all(results: Path = RESULTS) -> Dict[str, Content]:
    """Every generated file of ``docs/benchmarks/``: relative path -> content."""
    out: Dict[str, Content] = {}
    rows = []
    mds = find_results(results)
    titles = page_titles(mds, results)
    for md in mds:
        slug, page, files, cmd = render_page(md, results, titles[md])
        out[f"{slug}.md"] = page
        out.update(files)
        title = page.splitlines()[1][2:]
        retired = _retired_at(md, results)
        shown = (f"`{cmd}`" if cmd else "—") + (f" at commit `{retired}` (harness retired)" if retired else "")
        rows.append(f"| [{title}]({slug}.md) | `{_rel(md.parent, results)}/` | {shown} |")
    index = [
        "<!-- generated by benchmarks/make_docs.py from benchmarks/results/*/results.md; do not edit -->",
        "# Benchmarks",
        "",
        "*Generated by `python benchmarks/make_docs.py` from the result files under `benchmarks/results/`; "
        "do not edit these pages.*",
        "",
        "Every benchmark in `benchmarks/` writes `benchmarks/results/<name>/results.json` and `results.md` "
        "(its tables, the command that reproduces them and the machine they ran on). Each page below is one "
        "of those files; ratios are always between methods measured in the same run. Performance is measured "
        "here, never asserted in the tests.",
        "",
        "| benchmark | result files | command |",
        "|---|---|---|",
        *(rows or ["| (no result files yet) | | |"]),
        "",
        "To add one: make the benchmark write its two files (`benchmarks/results_io.py` has `write_results`), "
        "run it, then `python benchmarks/make_docs.py`, and commit the result files with the pages.",
        "",
    ]
    out["index.md"] = "\n".join(index)
    return out


def nav_lines(pages: Dict[str, Content]) -> List[str]:
    """The mkdocs.yml nav entries of the benchmark pages: the index first, then one per page."""
    out = ["benchmarks/index.md"]
    for rel, content in pages.items():
        if rel.endswith(".md") and rel != "index.md":
            title = content.splitlines()[1][2:] if isinstance(content, str) else rel
            out.append(f"{json.dumps(title, ensure_ascii=False)}: benchmarks/{rel}")
    return out


def render_nav(pages: Dict[str, Content], config: str) -> str:
    """``config`` (the text of mkdocs.yml) with the lines between the nav markers regenerated."""
    lines = config.splitlines(keepends=True)
    try:
        b = next(i for i, ln in enumerate(lines) if ln.strip().startswith(NAV_BEGIN))
        e = next(i for i, ln in enumerate(lines) if i > b and ln.strip().startswith(NAV_END))
    except StopIteration:
        raise SystemExit(f"{MKDOCS}: the nav markers '{NAV_BEGIN}' / '{NAV_END}' are missing") from None
    indent = lines[b][: len(lines[b]) - len(lines[b].lstrip())]
    new = [f"{indent}- {entry}\n" for entry in nav_lines(pages)]
    return "".join(lines[: b + 1] + new + lines[e:])


def _on_disk(out_dir: Path) -> Dict[str, bytes]:
    if not out_dir.is_dir():
        return {}
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}


def _as_bytes(c: Content) -> bytes:
    return c if isinstance(c, bytes) else c.encode("utf-8")


def differences(results: Path = RESULTS, out_dir: Path = OUT, config: Optional[Path] = MKDOCS) -> List[str]:
    """What differs between ``out_dir`` (and the nav of ``config``) and what the results give.

    Empty when everything is up to date.
    """
    pages = render_all(results)
    want = {k: _as_bytes(v) for k, v in pages.items()}
    have = _on_disk(out_dir)
    diffs = [f"missing: {k}" for k in sorted(set(want) - set(have))]
    diffs += [f"stale (no result file makes it): {k}" for k in sorted(set(have) - set(want))]
    diffs += [f"out of date: {k}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if config is not None:
        text = config.read_text(encoding="utf-8")
        if render_nav(pages, text) != text:
            diffs.append(f"out of date: the benchmark nav of {config.name}")
    return diffs


def write(results: Path = RESULTS, out_dir: Path = OUT, config: Optional[Path] = MKDOCS) -> List[str]:
    """Write every generated file into ``out_dir`` (and the nav of ``config``); returns the paths.

    Files in ``out_dir`` that no result makes any more are removed.
    """
    want = render_all(results)
    if config is not None:
        text = config.read_text(encoding="utf-8")
        new = render_nav(want, text)
        if new != text:
            config.write_text(new, encoding="utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel in set(_on_disk(out_dir)) - set(want):
        (out_dir / rel).unlink()
    for rel, content in want.items():
        p = out_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = _as_bytes(content)
        if not p.is_file() or p.read_bytes() != data:
            p.write_bytes(data)
    return sorted(want)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report differences and exit 1 instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        diffs = differences()
        for d in diffs:
            print(d, file=sys.stderr)
        if diffs:
            print("run: python benchmarks/make_docs.py", file=sys.stderr)
            return 1
        print("docs/benchmarks/ is up to date with benchmarks/results/")
        return 0
    for rel in write():
        print(f"docs/benchmarks/{rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
