"""The ``kappatune`` command: scan a checkpoint on disk, then show, plot and export the selection.

::

    kappatune scan   MODEL_DIR [-o table.json] [--json]          # κ of every weight, cached
    kappatune show   MODEL_DIR|table.json --top-fraction 0.1     # table: rank, name, shape, κ, selected
    kappatune plot   MODEL_DIR|table.json --num-tensors 20 -o kappa.png
    kappatune export MODEL_DIR|table.json --param-budget 0.05 --format axolotl

``MODEL_DIR`` is a Hugging Face model folder (``model.safetensors`` or a sharded checkpoint with
``model.safetensors.index.json``), an index file, or one or more ``.safetensors`` files; tensors
are read one at a time with ``pread`` (not memory-mapped), without building the model
(:mod:`kappatune.checkpoint`).
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
import stat
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple

from ._numbers import encode_float
from .refs import DEFAULT_MAX_DIM  # the library's default, so the CLI selects what the library does

__all__ = ["main"]

SCAN_FORMAT = "kappatune-scan"
SCAN_VERSION = 1
_SCAN_ONLY = ("min_ndim", "max_dim", "aggregate", "cache_dir", "no_cache", "recompute", "workers")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------
def _int_at_least(low: int):
    """An argparse type: a whole number ``>= low``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {s!r}")
        return v

    parse.__name__ = f"whole number >= {low}"
    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _max_dim(s: str) -> Any:
    """An argparse type: a whole number ``>= 1``, or ``none`` (no limit)."""
    if s.strip().lower() == "none":
        return "none"
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'none', got {s!r}") from None


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


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line, as the command's own errors: what is wrong and where the help is
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
    s.add_argument("--max-dim", type=_max_dim, default=None, metavar="N",
                   help=f"skip tensors with a matrix side longer than N (default {DEFAULT_MAX_DIM}, the value "
                        "the library's quickstart passes: large embeddings and LM heads are left out; 'none' "
                        "analyses every tensor)")
    s.add_argument("--aggregate", choices=("mean", "max"), default=None,
                   help="κ of a stacked 3-D tensor (mixture-of-experts weights): mean (default) or max "
                        "over its matrices")
    s.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="κ cache folder (or a .sqlite file); the library's default: "
                        "$KAPPATUNE_CACHE_DIR, else $XDG_CACHE_HOME/kappatune, else ~/.cache/kappatune")
    s.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="matrices analysed at once, one BLAS thread each (default: torch's thread count, "
                        "i.e. OMP_NUM_THREADS or the cores)")
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

    parser = _Parser(
        prog="kappatune",
        description="Condition numbers (κ = σ_max/σ_min) of the weights of a checkpoint on disk, and the "
                    "lowest-κ selection for selective fine-tuning. Checkpoints are read one tensor at a "
                    "time (pread, not memory-mapped), without building the model.",
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
    sp.add_argument("--top", type=_count, default=10, metavar="N",
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
    sh.add_argument("--top", type=_count, default=None, metavar="N", help="show only the first N rows")
    sh.set_defaults(func=_cmd_show)

    pl = sub.add_parser(
        "plot", parents=[inputs_or_saved, scan_opts, filt, sel, common],
        help="heatmap of κ by layer and module kind, with a histogram",
        description="Draw κ (log scale) by layer × module kind, selected tensors marked, next to a histogram "
                    "of log10 κ. The format follows the suffix of -o: .png, .svg or .pdf.")
    pl.add_argument("-o", "--output", required=True, metavar="FILE", help="image file: kappa.png, kappa.svg, ...")
    pl.add_argument("--dpi", type=_positive_int, default=100, help="pixels per inch of a PNG (default 100)")
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

    ad = sub.add_parser(
        "apply-delta", parents=[common],
        help="blend a saved delta into a checkpoint: W0 + alpha (W1 - W0)",
        description="Write BASE_DIR with the delta of DELTA_DIR (opt.save_delta) blended in, W = W0 + alpha (W1 - W0), "
                    "as a new safetensors checkpoint folder that from_pretrained loads (config and tokenizer files "
                    "copied). The delta's base digests are checked first: a checkpoint that is not the delta's base is "
                    "refused. One tensor is in memory at a time; OUT_DIR must not exist.")
    ad.add_argument("base", metavar="BASE_DIR", help="the base model's checkpoint folder (safetensors)")
    ad.add_argument("delta", metavar="DELTA_DIR", help="a delta folder written by KappaTuneOptimizer.save_delta")
    ad.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the new checkpoint folder (must not exist)")
    ad.add_argument("--alpha", type=_float, default=1.0, metavar="A",
                    help="the blend: 1 = the fine-tuned model (default), 0 = the base, between = interpolation")
    ad.set_defaults(func=_cmd_apply_delta)

    from .study.command import add_parser as add_study_parser  # argparse only: no torch at import

    add_study_parser(sub, parents=[common]).set_defaults(func=_cmd_study)
    return parser


# --------------------------------------------------------------------------------------------
# inputs: checkpoints and saved scans
# --------------------------------------------------------------------------------------------
def read_scan(path: Path) -> Tuple[Any, Dict[str, Any]]:
    """``(KappaTable, document)`` of a file written by ``kappatune scan -o`` / ``--json``."""
    from .table import KappaTable

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{path}: cannot read it as JSON ({e})") from None
    except RecursionError:
        raise CLIError(f"{path}: cannot read it as JSON (nested too deeply); it is not a scan result") from None
    if not isinstance(doc, dict) or doc.get("format") != SCAN_FORMAT:
        raise CLIError(f"{path}: not a kappatune scan result (write one with: kappatune scan MODEL -o {path.name})")
    if not isinstance(doc.get("version"), int) or doc["version"] > SCAN_VERSION:
        raise CLIError(f"{path}: scan result version {doc.get('version')!r} is not supported by this kappatune")
    problem = _scan_doc_problem(doc)
    if problem is None:
        try:
            table = KappaTable.from_dict(doc["table"])
        except Exception as e:  # whatever the file holds, one line naming it
            problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise CLIError(f"{path}: malformed scan result ({problem}); write it again with: kappatune scan MODEL -o "
                       f"{path.name}")
    return table, doc


def _scan_doc_problem(doc: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the structure of a scan document, or None."""
    src = doc.get("source")
    if not isinstance(src, list) or not src or not all(isinstance(x, str) for x in src):
        return "'source' is not a list of paths"
    tab = doc.get("table")
    if not isinstance(tab, dict) or not isinstance(tab.get("entries"), list):
        return "'table.entries' is not a list"
    if not isinstance(tab.get("skipped", {}), dict):
        return "'table.skipped' is not an object"
    for i, e in enumerate(tab["entries"]):
        if not isinstance(e, dict):
            return f"entry {i} is {type(e).__name__}, not an object"
        name, shape, numel = e.get("name"), e.get("shape"), e.get("numel")
        if not isinstance(name, str) or not name:
            return f"entry {i} has no name"
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            return f"{name}: shape {shape!r} is not a list of positive whole numbers"
        if isinstance(numel, bool) or not isinstance(numel, int) or numel != math.prod(shape):
            return f"{name}: numel {numel!r} is not the product of its shape {shape}"
        k = e.get("kappa")
        if not (isinstance(k, (int, float)) and not isinstance(k, bool) and k >= 1) and k != encode_float(math.inf):
            return f"{name}: kappa {k!r} is not a number >= 1"
    return None


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
    except RecursionError:
        raise CLIError(f"{p}: cannot read it as JSON (nested too deeply); it is not a scan result") from None
    if isinstance(head, dict) and "weight_map" in head:
        return None  # a sharded checkpoint's index
    if isinstance(head, dict) and head.get("format") == "kappatune-kappa-cache":
        raise CLIError(f"{p} is a κ cache, not a scan result; save a scan with: kappatune scan MODEL -o table.json")
    return p


def _scan(args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """Scan the checkpoint in ``args.paths``; returns (table, document)."""
    from . import __version__
    from .cache import KappaCache, default_cache_dir
    from .checkpoint import checkpoint_files, checkpoint_refs
    from .pipeline import resolve_workers as scan_workers
    from .pipeline import scan_refs
    from .refs import NameFilter

    files = checkpoint_files(args.paths)
    refs = checkpoint_refs(args.paths)
    cache = None if args.no_cache else KappaCache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    progress = args.progress  # None: a bar only when stderr is a terminal (tqdm's disable=None)
    try:  # the patterns checked here, so that a bad one is named as the flag the user typed
        NameFilter(args.include, args.exclude, arg_names=("--include", "--exclude"))
    except ValueError as e:
        raise CLIError(str(e)) from None
    options = {
        "min_ndim": 2 if args.min_ndim is None else args.min_ndim,
        "max_dim": (DEFAULT_MAX_DIM if args.max_dim is None else None if args.max_dim == "none" else args.max_dim),
        "include": args.include,
        "exclude": args.exclude,
        "aggregate": args.aggregate or "mean",
    }
    t0 = time.perf_counter()
    table = scan_refs(refs, cache=cache if cache is not None else False, recompute=args.recompute,
                      progress=progress, num_workers=args.workers, **options)
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
            "workers": scan_workers(args.workers),
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
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}


def _fmt_options(opts: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None) or "defaults"


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
_FLAGS = {k: "--" + k.replace("_", "-") for k in ("num_tensors", "top_fraction", "param_budget", "max_kappa")}


def _policy(args: argparse.Namespace, required: bool) -> Any:
    """The one :class:`~kappatune.selection.SelectionPolicy` of the command line, or None."""
    from .selection import SelectionPolicy

    try:
        return SelectionPolicy.resolve(spelling=_FLAGS, required=required, group_by=getattr(args, "group_by", None),
                                       **{k: getattr(args, k) for k in _FLAGS})
    except ValueError as e:
        raise CLIError(str(e)) from None


def _candidates(table: Any, args: argparse.Namespace) -> Any:
    """The table restricted to --include/--exclude (what is shown and selectable)."""
    from .refs import NameFilter

    try:
        names = NameFilter(args.include, args.exclude, arg_names=("--include", "--exclude"))
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not names.active:
        return table
    keep = [e.name for e in table if names(e.name)]
    if not keep:
        raise CLIError(f"no tensor of the {len(table)} in the κ table passes --include {args.include} "
                       f"--exclude {args.exclude}")
    sub = table.subset(keep)
    sub.skipped = dict(table.skipped)
    return sub


def _select(table: Any, args: argparse.Namespace, required: bool) -> Tuple[List[str], Dict[str, Any]]:
    policy = _policy(args, required)
    if policy is None:
        return [], {}
    names = policy.apply(table)
    return names, {**policy.to_dict(), "include": args.include, "exclude": args.exclude}


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
    from .plot import image_format, plot_kappa

    fmt = image_format(args.output)  # a bad suffix fails before any scanning
    table, doc = _load(args)
    table = _candidates(table, args)
    names, policy = _select(table, args, required=False)
    title = args.title
    if title is None:
        title = "κ of " + ", ".join(Path(p).name or str(p) for p in doc["source"])
        if policy:
            title += f" — {len(names)} selected"
    import io

    fig = plot_kappa(table, names, None, title=title, dpi=args.dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=args.dpi)  # a plain Figure: no pyplot, nothing to close
    write_output(args.output, buf.getvalue())
    print(f"wrote {args.output} ({len(table)} tensors, {len(names)} selected)")
    return 0


def _cmd_apply_delta(args: argparse.Namespace) -> int:
    from .delta import DeltaError, apply_delta_to_checkpoint

    try:
        res = apply_delta_to_checkpoint(args.base, args.delta, args.output, alpha=args.alpha)
    except DeltaError as e:
        raise CLIError(str(e)) from None
    print(f"kappatune: wrote {res['out']}: {res['tensors']} tensor(s) blended at alpha={args.alpha:g}, "
          f"{res['copied']} copied, {len(res['files'])} file(s), {res['bytes'] / 1e6:.1f} MB")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study.command import run

    return run(args, out=lambda s: print(s, flush=True), err=lambda s: print(s, file=sys.stderr, flush=True))


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
    write_output(path, text.encode("utf-8"))


_STD_STREAMS = {"/dev/stdout": 1, "/dev/stderr": 2}


def _inherited_fd(path: str) -> Optional[int]:
    """The descriptor ``path`` names if it is one of ours (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``: the shell's ``>(cmd)`` or a redirection), else None."""
    if path in _STD_STREAMS:
        return _STD_STREAMS[path]
    for prefix in ("/dev/fd/", "/proc/self/fd/"):
        if path.startswith(prefix) and path[len(prefix):].isdigit():
            return int(path[len(prefix):])
    return None


def _own_stream(st: os.stat_result) -> Optional[int]:
    """1 or 2 if ``st`` is the file this process's stdout or stderr is open on, else None.

    Catches what a name cannot: a link to ``/proc/self/fd/1``, or the very file the shell
    redirected stdout to (``-o out.txt > out.txt``).
    """
    for fd in (1, 2):
        try:
            own = os.fstat(fd)
        except OSError:
            continue
        if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
            return fd
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_output(path: str, data: bytes) -> None:
    """Write ``data`` where ``-o PATH`` says, the way a user expects.

    * ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N`` (the shell's ``-o >(jq .)``): written to that
      open descriptor, so its position and any redirection are kept; so is any path that leads to the
      file stdout or stderr is open on (a link to ``/proc/self/fd/1``, the file stdout is redirected
      to): compared by device and inode, it is written through the stream, never replaced;
    * a FIFO, a character device (``/dev/null``), a socket, or a link to one: written into, never
      replaced;
    * a regular file (or a new name): a temporary file with an unpredictable name is created in the
      same folder (``O_EXCL``, so no existing path is followed), written, given the file's mode (a new
      file ``0666 & ~umask``) and renamed onto it: readers see the old or the new file, never half of
      one. A symbolic link is kept and its target replaced. The temporary file is removed on every
      failure. When the folder does not allow a new file but the file is writable, it is written in place.
    """
    fd = _inherited_fd(path)
    if fd is not None:
        if fd in (1, 2):
            (sys.stdout if fd == 1 else sys.stderr).flush()
        try:
            _write_all(fd, data)
            return
        except OSError as e:
            if e.errno != 9:  # EBADF: not open here, so open the path below
                raise
    p = Path(path).expanduser()
    try:
        st: Optional[os.stat_result] = os.stat(p)  # what the name leads to (links followed)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CLIError(f"{path}: is a folder; give -o a file name")
    own = None if st is None else _own_stream(st)
    if own is not None:  # stdout/stderr itself: replacing it would lose everything printed later
        (sys.stdout if own == 1 else sys.stderr).flush()
        _write_all(own, data)
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        out = os.open(p, os.O_WRONLY)  # a FIFO blocks here until a reader opens it, as with `cat > fifo`
        try:
            _write_all(out, data)
        finally:
            os.close(out)
        return
    target = Path(os.path.realpath(p)) if p.is_symlink() else p
    if not target.parent.is_dir():
        raise CLIError(f"{path}: the folder {target.parent} does not exist")
    from ._files import write_atomic

    try:
        write_atomic(target, data, mode=None if st is None else stat.S_IMODE(st.st_mode))
    except PermissionError:
        if st is None:
            raise
        out = os.open(target, os.O_WRONLY | os.O_TRUNC)  # a writable file in a folder we may not add to
        try:
            _write_all(out, data)
        finally:
            os.close(out)


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
    """Run the command line; returns the exit status (0 ok, 1 unexpected failure, 2 bad input).

    Args:
        argv (Sequence[str], optional): the arguments after the program name, e.g.
            ``["show", "model_dir", "--top-fraction", "0.1"]``. Default: ``None`` (``sys.argv[1:]``).
    """
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
