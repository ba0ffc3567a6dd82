"""Result files of the benchmarks: ``benchmarks/results/<name>/results.json`` and ``results.md``.

Every benchmark writes both: ``results.json`` (the measurements, the command and the machine, for
programs) and ``results.md`` (its markdown tables, the command that reproduces them and the machine
they ran on, for people). ``benchmarks/make_docs.py`` turns every ``results.md`` into a page of the
documentation site, so a table is never copied by hand.

Use::

    from results_io import machine_info, write_results
    write_results("train_step", data, markdown_body, command=sys.argv)
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> Dict[str, str]:
    out: Dict[str, str] = {"python": platform.python_version()}
    for mod in ("torch", "numpy", "transformers", "peft", "kappatune"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = str(m.__version__)
    return out


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(threads: Optional[int] = None) -> Dict[str, Any]:
    """What the numbers were measured on: CPU, core count, load, library versions, thread settings."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    info: Dict[str, Any] = {
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "load_average_1_5_15": load,
        "versions": _versions(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                        if k in os.environ},
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": os.environ.get("KAPPATUNE_BENCH_COMMIT") or _git_commit(),
    }
    if threads is not None:
        info["threads"] = threads
    return info


def machine_markdown(info: Dict[str, Any]) -> str:
    """One paragraph describing ``info`` (from :func:`machine_info`)."""
    v = ", ".join(f"{k} {val}" for k, val in info.get("versions", {}).items())
    load = info.get("load_average_1_5_15")
    load_s = f"; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) at the end" if load else ""
    n = info.get("threads")
    thr = f"; {n} torch thread{'' if n == 1 else 's'}" if n is not None else ""
    env = info.get("env_threads") or {}
    env_s = ("; " + ", ".join(f"{k}={val}" for k, val in env.items())) if env else ""
    commit = f" at commit `{info['commit']}`" if info.get("commit") else ""
    return (f"**Machine**: {info.get('cpu')}, {info.get('nproc')} logical CPUs ({info.get('machine')}, "
            f"{info.get('system')}){thr}{env_s}{load_s}; {v}; measured {info.get('date_utc')}{commit}.")


def command_string(argv: Union[str, Sequence[str], None] = None) -> str:
    """The command line that reproduces a run, relative to the repository root."""
    if isinstance(argv, str):
        return argv
    argv = list(sys.argv if argv is None else argv)
    for flag in ("--note",):  # a caveat for results.md, not part of what reproduces the numbers
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    if argv:
        p = Path(argv[0]).resolve()
        try:
            argv[0] = str(p.relative_to(ROOT))
        except ValueError:
            pass
    return "python " + " ".join(shlex.quote(a) for a in argv)


def write_results(name: str, data: Dict[str, Any], markdown: str, *, title: str,
                  command: Union[str, Sequence[str], None] = None, info: Optional[Dict[str, Any]] = None,
                  notes: str = "", out_dir: Optional[Path] = None) -> Path:
    """Write ``results.json`` and ``results.md`` under ``benchmarks/results/<name>/``; returns the folder.

    Args:
        name (str): the benchmark's folder name under ``benchmarks/results/``.
        data (dict): the measurements (JSON-serialisable); stored under ``"results"``.
        markdown (str): the markdown body (tables, bullet points).
        title (str): the page title (first heading of ``results.md``).
        command (str or list of str, optional): the reproducing command; default ``sys.argv``.
        info (dict, optional): :func:`machine_info` output; measured now when omitted.
        notes (str, optional): a paragraph printed under the machine line (caveats, e.g. load).
        out_dir (Path, optional): write here instead of ``benchmarks/results/<name>``.
    """
    info = machine_info() if info is None else info
    cmd = command_string(command)
    folder = Path(out_dir) if out_dir is not None else RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(
        {"benchmark": name, "command": cmd, "machine": info, "results": data}, indent=1, default=str) + "\n")
    parts = [f"# {title}", "", "Reproduce (from the repository root):", "", "```bash", cmd, "```", "",
             machine_markdown(info), ""]
    if notes:
        parts += [notes.strip(), ""]
    parts += [markdown.strip(), ""]
    (folder / "results.md").write_text("\n".join(parts))
    return folder
