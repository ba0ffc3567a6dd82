"""The ``kappatune`` command: scan a checkpoint on disk, then show, plot and export the selection.

::

    kappatune scan   MODEL_DIR [-o table.json] [--json]          # κ of every weight, cached
    kappatune show   MODEL_DIR|table.json --top-fraction 0.1     # table: rank, name, shape, κ, selected
    kappatune plot   MODEL_DIR|table.json --num-tensors 20 -o kappa.png
    kappatune export MODEL_DIR|table.json --param-budget 0.05 --format axolotl

``MODEL_DIR`` is a Hugging Face model folder (``model.safetensors`` or a sharded checkpoint with
``model.safetensors.index.json``), an index file, or one or more ``.safetensors`` files; tensors
are read memory-mapped, one at a time, without building the model (:mod:`kappatune.checkpoint`).
``table.json`` is what ``kappatune scan ... -o table.json`` (or ``--json``) wrote. Given a
checkpoint, ``show``/``plot``/``export`` scan it first through the κ cache (fast when warm).

This is the only module of kappatune that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "SCAN_FORMAT", "read_scan", "default_cli_cache_dir"]

SCAN_FORMAT = "kappatune-scan"
SCAN_VERSION = 1
_SCAN_ONLY = ("min_ndim", "max_dim", "aggregate", "cache_dir", "no_cache", "recompute")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return v


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}")
    return v


def _budget(s: str) -> float:
    """``0.05`` or ``5%`` → a fraction; ``2000000`` or ``2e6`` → a parameter count."""
    t = s.strip()
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100.0
        if t.isdigit():
            return int(t)  # type: ignore[return-value]
        v = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction (0.05 or 5%%) or a parameter count (2000000), got {s!r}") from None
    if v > 1 and v.is_integer():
        return int(v)  # type: ignore[return-value]
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``kappatune`` argument parser (sub-commands scan, show, plot, export)."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("general")
    g.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    g.add_argument("-v", "--verbose", action="store_true", help="log what the scan does (cache hits, timings)")

    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="a Hugging Face model folder, a model.safetensors.index.json, or one or more .safetensors files")
    inputs_or_saved = argparse.ArgumentParser(add_help=False)
    inputs_or_saved.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="a saved scan (table.json from 'kappatune scan -o'), or a checkpoint as for scan: a model folder, "
             "an index file or .safetensors files, scanned first through the κ cache")

    scan_opts = argparse.ArgumentParser(add_help=False)
    s = scan_opts.add_argument_group("scan (which tensors are analysed, and the κ cache)")
    s.add_argument("--min-ndim", type=_positive_int, default=None, metavar="N",
                   help="skip tensors with fewer dimensions (default 2: biases and norms are skipped)")
    s.add_argument("--max-dim", type=_positive_int, default=None, metavar="N",
                   help="skip tensors with a matrix side longer than N (e.g. 16384 skips large embeddings)")
    s.add_argument("--aggregate", choices=("mean", "max"), default=None,
                   help="κ of a stacked 3-D tensor (mixture-of-experts weights): mean (default) or max "
                        "over its matrices")
    s.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="κ cache folder (or .json file). Default: $KAPPATUNE_CACHE_DIR if set; else ./cache "
                        "when ./cache/README.md mentions kappatune (a kappatune checkout); else "
                        "~/.cache/kappatune")
    s.add_argument("--no-cache", action="store_true", help="neither read nor write the κ cache")
    s.add_argument("--recompute", action="store_true", help="ignore cached κ values (fresh values are still stored)")
    s.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    filt = argparse.ArgumentParser(add_help=False)
    f = filt.add_argument_group("name filters")
    f.add_argument("--include", action="append", default=None, metavar="REGEX",
                   help="only tensors whose name matches (re.search); repeat for several patterns")
    f.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="leave out tensors whose name matches (re.search); repeatable")

    sel = argparse.ArgumentParser(add_help=False)
    p = sel.add_argument_group("selection (give one policy)")
    p.add_argument("--num-tensors", type=_positive_int, metavar="K", help="the K lowest-κ tensors")
    p.add_argument("--top-fraction", type=_float, metavar="F",
                   help="the lowest-κ fraction F (0 < F <= 1) of the tensors")
    p.add_argument("--param-budget", type=_budget, metavar="B",
                   help="lowest κ first, every tensor that fits in B parameters: a fraction of the analysed "
                        "parameters (0.05 or 5%%) or a count (2000000)")
    p.add_argument("--max-kappa", type=_float, metavar="T", help="every tensor with κ <= T")
    p.add_argument("--group-by", choices=("kind", "layer"), default=None,
                   help="apply the policy within each module kind (q_proj, up_proj, ...) or each layer")

    parser = argparse.ArgumentParser(
        prog="kappatune",
        description="Condition numbers (κ = σ_max/σ_min) of the weights of a checkpoint on disk, and the "
                    "lowest-κ selection for selective fine-tuning. Checkpoints are read memory-mapped, one "
                    "tensor at a time, without building the model.",
        epilog="PATH for show/plot/export is a checkpoint (scanned through the κ cache; the scan options "
               "apply) or a table.json written by 'kappatune scan -o'. Run 'kappatune COMMAND --help' for "
               "the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"kappatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sp = sub.add_parser(
        "scan", parents=[inputs, scan_opts, filt, common],
        help="compute κ of every weight tensor of a checkpoint (cached)",
        description="Compute κ of every eligible tensor of a safetensors checkpoint, one tensor at a time, and "
                    "print a summary and the lowest-κ tensors. Values go to the κ cache, where "
                    "kappatune.scan(model) and KappaTuneOptimizer find them again for the same weights.")
    sp.add_argument("--top", type=int, default=10, metavar="N",
                    help="how many of the lowest-κ tensors to list (default 10; 0 for none)")
    sp.add_argument("--json", action="store_true",
                    help="print the scan result as JSON on stdout (the table.json format) instead of text")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="also save the scan result as JSON (read back by show, plot and export)")
    sp.set_defaults(func=_cmd_scan)

    sh = sub.add_parser(
        "show", parents=[inputs_or_saved, scan_opts, filt, sel, common],
        help="table of κ with the selection marked",
        description="Print a table (rank, name, shape, params, κ, selected) lowest κ first. With a selection "
                    "policy the chosen tensors are marked with '*'. --include/--exclude restrict the tensors "
                    "shown and selectable.")
    sh.add_argument("--top", type=int, default=None, metavar="N", help="show only the first N rows")
    sh.set_defaults(func=_cmd_show)

    pl = sub.add_parser(
        "plot", parents=[inputs_or_saved, scan_opts, filt, sel, common],
        help="heatmap of κ by layer and module kind, with a histogram",
        description="Draw κ (log scale) by layer × module kind, selected tensors marked, next to a histogram "
                    "of log10 κ. The format follows the suffix of -o: .png, .svg or .pdf.")
    pl.add_argument("-o", "--output", required=True, metavar="FILE", help="image file: kappa.png, kappa.svg, ...")
    pl.add_argument("--dpi", type=int, default=100, help="pixels per inch of a PNG (default 100)")
    pl.add_argument("--title", default=None, help="title of the heatmap (default: the checkpoint name)")
    pl.set_defaults(func=_cmd_plot)

    ex = sub.add_parser(
        "export", parents=[inputs_or_saved, scan_opts, filt, sel, common],
        help="write the selection for a training config",
        description="Write the selected tensor names: 'names' (one per line), 'json' (names with κ, shape, "
                    "size and the policy), 'axolotl' (an unfrozen_parameters YAML block of anchored patterns) "
                    "or 'peft' (a JSON list of module names for LoraConfig(target_modules=...)).")
    ex.add_argument("--format", required=True, choices=("names", "json", "axolotl", "peft"),
                    help="output format")
    ex.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    ex.set_defaults(func=_cmd_export)
    return parser


# --------------------------------------------------------------------------------------------
# inputs: checkpoints and saved scans
# --------------------------------------------------------------------------------------------
def default_cli_cache_dir() -> Path:
    """``$KAPPATUNE_CACHE_DIR``; else ``./cache`` if ``./cache/README.md`` mentions kappatune (the
    folder of a kappatune checkout); else the library default (``~/.cache/kappatune``)."""
    from .cache import default_cache_dir

    if os.environ.get("KAPPATUNE_CACHE_DIR"):
        return default_cache_dir()
    readme = Path("cache") / "README.md"
    try:
        if readme.is_file() and "kappatune" in readme.read_text(encoding="utf-8", errors="replace").lower():
            return Path("cache")
    except OSError:
        pass
    return default_cache_dir()


def read_scan(path: Path) -> Tuple[Any, Dict[str, Any]]:
    """``(KappaTable, document)`` of a file written by ``kappatune scan -o`` / ``--json``."""
    from .selection import KappaTable

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SCAN_FORMAT:
        raise CLIError(f"{path}: not a kappatune scan result (write one with: kappatune scan MODEL -o {path.name})")
    if not isinstance(doc.get("version"), int) or doc["version"] > SCAN_VERSION:
        raise CLIError(f"{path}: scan result version {doc.get('version')!r} is not supported by this kappatune")
    try:
        table = KappaTable.from_dict(doc["table"])
    except (KeyError, TypeError, ValueError) as e:
        raise CLIError(f"{path}: malformed scan result ({type(e).__name__}: {e})") from None
    return table, doc


def _saved_scan(paths: Sequence[str]) -> Optional[Path]:
    """The path if the input is one JSON file that is not a safetensors index, else None."""
    if len(paths) != 1:
        return None
    p = Path(paths[0]).expanduser()
    if p.suffix.lower() != ".json" or not p.is_file():
        return None
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{p}: cannot read it as JSON ({e})") from None
    if isinstance(head, dict) and "weight_map" in head:
        return None  # a sharded checkpoint's index
    if isinstance(head, dict) and head.get("format") == "kappatune-kappa-cache":
        raise CLIError(f"{p} is a κ cache, not a scan result; save a scan with: kappatune scan MODEL -o table.json")
    return p


def _scan(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """Scan the checkpoint in ``args.paths``; returns (table, document)."""
    from . import __version__
    from .cache import KappaCache
    from .checkpoint import checkpoint_files, checkpoint_refs
    from .scan import scan_refs

    files = checkpoint_files(args.paths)
    refs = checkpoint_refs(args.paths)
    cache = None if args.no_cache else KappaCache(Path(args.cache_dir) if args.cache_dir else default_cli_cache_dir())
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    options = {
        "min_ndim": 2 if args.min_ndim is None else args.min_ndim,
        "max_dim": args.max_dim,
        "include": args.include,
        "exclude": args.exclude,
        "aggregate": args.aggregate or "mean",
    }
    t0 = time.perf_counter()
    table = scan_refs(refs, cache=cache if cache is not None else False, recompute=args.recompute,
                      progress=progress, **options)
    seconds = time.perf_counter() - t0
    hits = 0 if cache is None else cache.hits
    doc = {
        "format": SCAN_FORMAT,
        "version": SCAN_VERSION,
        "kappatune_version": __version__,
        "source": [str(p) for p in args.paths],
        "files": [str(p) for p in files],
        "options": options,
        "summary": {
            "checkpoint_tensors": len(refs),
            "checkpoint_numel": sum(math.prod(r.shape) for r in refs),
            "analysed": len(table),
            "analysed_numel": table.total_numel,
            "skipped": len(table.skipped),
            "from_cache": hits,
            "computed": len(table) - hits,
            "seconds": round(seconds, 3),
            "cache": None if cache is None else str(cache.path),
        },
        "table": table.to_dict(),
    }
    return table, doc


def _load(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    saved = _saved_scan(args.paths)
    if saved is None:
        return _scan(args)
    given = [f"--{k.replace('_', '-')}" for k in _SCAN_ONLY if getattr(args, k) not in (None, False)]
    if given:
        raise CLIError(f"{' '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when scanning a "
                       f"checkpoint; {saved} is a saved scan (its options: {_fmt_options(_opts(saved))})")
    return read_scan(saved)


def _opts(saved: Path, key: str = "options") -> Any:
    """``doc[key]`` of a JSON file (its options by default), or ``{}``."""
    try:
        return json.loads(saved.read_text(encoding="utf-8")).get(key) or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _fmt_options(opts: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None) or "defaults"


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def _policy(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in ("num_tensors", "top_fraction", "param_budget", "max_kappa")
            if getattr(args, k) is not None}


def _candidates(table: Any, args: argparse.Namespace) -> Any:
    """The table restricted to --include/--exclude (what is shown and selectable)."""
    inc, exc = _regexes(args.include, "--include"), _regexes(args.exclude, "--exclude")
    if not inc and not exc:
        return table
    keep = [e.name for e in table if (not inc or any(r.search(e.name) for r in inc))
            and not any(r.search(e.name) for r in exc)]
    if not keep:
        raise CLIError(f"no tensor of the {len(table)} in the κ table passes --include {args.include} "
                       f"--exclude {args.exclude}")
    sub = table.subset(keep)
    sub.skipped = dict(table.skipped)
    return sub


def _regexes(patterns: Optional[List[str]], flag: str) -> List[Any]:
    import re

    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise CLIError(f"{flag} {p!r}: invalid regular expression ({e})") from None
    return out


def _select(table: Any, args: argparse.Namespace, required: bool) -> Tuple[List[str], Dict[str, Any]]:
    policy = _policy(args)
    if not policy:
        if required:
            raise CLIError("give a selection policy: --num-tensors K, --top-fraction F, --param-budget B "
                           "or --max-kappa T")
        return [], {}
    if len(policy) > 1:
        raise CLIError("give only one selection policy; got "
                       + ", ".join("--" + k.replace("_", "-") for k in policy))
    names = table.select(**policy, group_by=args.group_by)
    return names, {**policy, "group_by": args.group_by, "include": args.include, "exclude": args.exclude}


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _kappa_line(table: Any) -> str:
    finite = [e for e in table if math.isfinite(e.kappa)]
    if not finite:
        return "κ: every analysed tensor is rank-deficient (κ = ∞)" if len(table) else "κ: nothing analysed"
    med = statistics.median(e.kappa for e in finite)
    n_inf = len(table) - len(finite)
    return (f"κ: lowest {finite[0].kappa:.4g} ({finite[0].name}), median {med:.4g}, highest "
            f"{finite[-1].kappa:.4g} ({finite[-1].name})"
            + (f"; {n_inf} rank-deficient (κ = ∞)" if n_inf else ""))


def _cmd_scan(args: argparse.Namespace) -> int:
    saved = _saved_scan(args.paths)
    if saved is not None and _opts(saved, key="format") == SCAN_FORMAT:
        raise CLIError(f"{saved} is a saved scan, not a checkpoint: read it with kappatune show/plot/export")
    table, doc = _scan(args)
    text = json.dumps(doc, indent=1, allow_nan=False)
    if args.output:
        _write(args.output, text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")
        return 0
    s = doc["summary"]
    size = sum(Path(f).stat().st_size for f in doc["files"])
    out = [
        f"checkpoint: {', '.join(doc['source'])} ({len(doc['files'])} file{'s' * (len(doc['files']) != 1)}, "
        f"{_human_bytes(size)}; {s['checkpoint_tensors']} tensors, {s['checkpoint_numel']:,} parameters)",
        f"analysed {s['analysed']} tensors ({s['analysed_numel']:,} parameters): {s['from_cache']} from the "
        f"cache, {s['computed']} computed, in {s['seconds']:.2f} s",
    ]
    if table.skipped:
        reasons: Dict[str, int] = {}
        for r in table.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        out.append(f"skipped {len(table.skipped)}: " + ", ".join(f"{r} {c}" for r, c in sorted(reasons.items())))
    out.append(_kappa_line(table))
    out.append(f"cache: {s['cache'] or 'off (--no-cache)'}")
    if args.output:
        out.append(f"saved the scan to {args.output}")
    if args.top and len(table):
        out.append("")
        out.append(f"lowest κ ({min(args.top, len(table))} of {len(table)}):")
        out.append(table.format(top=args.top))
    print("\n".join(out))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    table, doc = _load(args)
    table = _candidates(table, args)
    names, policy = _select(table, args, required=False)
    sel_numel = sum(table[n].numel for n in names)
    head = [f"{', '.join(doc['source'])}: {len(table)} tensors, {table.total_numel:,} parameters; {_kappa_line(table)}"]
    if policy:
        pol = ", ".join(f"{k}={v}" for k, v in policy.items() if v is not None)
        head.append(f"selected ({pol}): {len(names)} tensors, {sel_numel:,} parameters "
                    f"({100 * sel_numel / max(1, table.total_numel):.2f}%), marked *")
    print("\n".join(head) + "\n\n" + table.format(top=args.top, selected=names))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import _format_from, plot_kappa

    _format_from(args.output)  # a bad suffix fails before any scanning
    table, doc = _load(args)
    table = _candidates(table, args)
    names, policy = _select(table, args, required=False)
    title = args.title
    if title is None:
        title = "κ of " + ", ".join(Path(p).name or str(p) for p in doc["source"])
        if policy:
            title += f" — {len(names)} selected"
    plot_kappa(table, names, args.output, title=title, dpi=args.dpi)
    print(f"wrote {args.output} ({len(table)} tensors, {len(names)} selected)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import format_selection, peft_targets

    table, doc = _load(args)
    table = _candidates(table, args)
    names, policy = _select(table, args, required=True)
    text = format_selection(table, names, args.format, policy=policy, source=doc["source"])
    if args.format == "peft":
        _, others = peft_targets(names)
        if others:
            print(f"kappatune: warning: {len(others)} selected tensor(s) are not a module's .weight and are left "
                  f"out of target_modules (PEFT >= 0.17 takes them as target_parameters): "
                  f"{others[:5]}{' ...' if len(others) > 5 else ''}", file=sys.stderr)
    if args.output:
        _write(args.output, text)
        print(f"wrote {len(names)} names ({args.format}) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _write(path: str, text: str) -> None:
    p = Path(path).expanduser()
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"kappatune: {record.levelname.lower()}: {record.getMessage()}"


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 unexpected failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    log = logging.getLogger("kappatune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("kappatune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kappatune export ... | head`
        return 0
    except (CLIError, ValueError, OSError, KeyError, ImportError) as e:
        if args.debug:
            raise
        print(f"kappatune: error: {_error_text(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else is a bug: still one line, unless --debug
        if args.debug:
            raise
        print(f"kappatune: error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
