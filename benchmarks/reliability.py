"""Before → after figures of issue 13 (the κ cache at scale, checkpoints with many tensors, CLI start-up,
the digest), the "before" measured in the same run on the code of an earlier commit.

The earlier code is taken with ``git archive REV`` into a temporary folder (the working tree is not
touched) and run in subprocesses with ``PYTHONPATH`` pointing at it; the current code runs the same
snippets from this checkout. Every figure is the median of ``--repeat`` runs.

Cases:

* **cache at scale**: a cache of ``--entries`` (default 100 000) entries; what a warm scan of a
  3-tensor model costs in the cache (open + 3 lookups + save with nothing new) and what adding 2
  entries costs (open + 2 misses + 2 puts + save), each in a fresh ``KappaCache``; before: the JSON
  file of the earlier code; after: the SQLite store (folder) and, for reference, the ``.json`` store
  of the current code. Also the end-to-end warm ``kappatune.scan`` of a 3-tensor model (digests
  included) and the one-time import of the earlier JSON cache into SQLite.
* **checkpoint with many tensors**: one ``.safetensors`` file of ``--tensors`` (default 4000) small
  tensors: ``checkpoint_refs`` + ``load()`` of every tensor.
* **CLI start-up**: ``python -m kappatune --help`` and an argument error, wall time of the process.
* **digest**: GB/s of the old stdlib fallback (CRC-32 + Adler-32), the new one (BLAKE2b-128) and
  xxHash3-128 on a 64 MiB tensor.

Usage::

    python benchmarks/reliability.py                       # before = 72d705a, 100k entries, 4000 tensors
    python benchmarks/reliability.py --before HEAD~5 --entries 20000 --tensors 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "reliability"
BEFORE = "72d705a"  # main before the reliability work of issue 13


def _run(code: str, pythonpath: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800,
                       cwd=tempfile.gettempdir())  # not this checkout: PYTHONPATH decides which code runs
    if p.returncode != 0:
        raise RuntimeError(f"benchmark snippet failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


CACHE_SNIPPET = textwrap.dedent("""
    import json, statistics, sys, time, shutil, logging
    logging.disable(logging.WARNING)
    from kappatune.cache import KappaCache
    path, repeat, n_entries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    E = dict(kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[64, 64], dtype="float32", layout="matrix")
    hits = [f"xxh3_128:{i:032x}|matrix" for i in (7, n_entries // 2, n_entries - 1)]
    def warm():
        c = KappaCache(path)
        assert all(c.get(k) is not None for k in hits)
        c.save()
    n = [0]
    def add2():
        c = KappaCache(path)
        for j in range(2):
            k = f"new:{n[0]}-{j}|matrix"
            assert c.get(k) is None
            c.put(k, **E)
        n[0] += 1
        assert c.save()
    out = {}
    for name, fn in (("warm", warm), ("add2", add2)):
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    print(json.dumps(out))
""")

SCAN_SNIPPET = textwrap.dedent("""
    import json, statistics, sys, time, logging, torch
    logging.disable(logging.WARNING)
    import kappatune
    path, repeat = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = {f"l{i}.weight": torch.randn(64, 64) for i in range(3)}
    kappatune.scan(model, cache=path, progress=False)  # cold: adds 3 entries
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); kappatune.scan(model, cache=path, progress=False); ts.append(time.perf_counter() - t0)
    print(json.dumps({"warm_scan": statistics.median(ts)}))
""")

IMPORT_SNIPPET = textwrap.dedent("""
    import json, sys, time, logging, shutil
    logging.disable(logging.WARNING)
    from kappatune.cache import KappaCache
    folder = sys.argv[1]
    t0 = time.perf_counter(); c = KappaCache(folder); n = len(c); t = time.perf_counter() - t0
    t0 = time.perf_counter(); c2 = KappaCache(folder); len(c2); t2 = time.perf_counter() - t0
    print(json.dumps({"import": t, "entries": n, "after_import_open": t2}))
""")

CKPT_SNIPPET = textwrap.dedent("""
    import json, statistics, sys, time
    from kappatune.checkpoint import checkpoint_refs
    path, repeat = sys.argv[1], int(sys.argv[2])
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        refs = checkpoint_refs(path)
        for r in refs:
            r.load()
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"load_all": statistics.median(ts), "tensors": len(refs)}))
""")

DIGEST_SNIPPET = textwrap.dedent("""
    import hashlib, json, statistics, sys, time, zlib, torch, xxhash
    x = torch.randn(16 * 1024 * 1024)  # 64 MiB
    data = memoryview(x.view(torch.uint8).numpy())
    def crc_adler(): zlib.crc32(data); zlib.adler32(data)
    def blake2b(): hashlib.blake2b(data, digest_size=16).digest()
    def xxh(): xxhash.xxh3_128(data).digest()
    out = {}
    for name, fn in (("crc32+adler32", crc_adler), ("blake2b-128", blake2b), ("xxh3-128", xxh)):
        ts = []
        for _ in range(int(sys.argv[1])):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        out[name] = data.nbytes / statistics.median(ts) / 1e9
    print(json.dumps(out))
""")


def _write_json_cache(path: Path, n: int) -> None:
    """A schema-1 JSON cache of ``n`` valid entries, as earlier versions wrote it (~225 bytes each)."""
    entries = {f"xxh3_128:{i:032x}|matrix": {"kappa": 2.0, "sigma_max": 2.0, "sigma_min": 1.0, "shape": [64, 64],
                                              "dtype": "float32", "layout": "matrix", "per_matrix": None,
                                              "name": f"model.layers.{i % 32}.mlp.up_proj.weight"}
               for i in range(n)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": "kappatune-kappa-cache", "schema_version": 1, "entries": entries},
                               separators=(",", ":")))


def _time_cmd(cmd, pythonpath: Path, repeat: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, cwd=tempfile.gettempdir())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _secs(x: float) -> str:
    return f"{x:.2f} s" if x >= 1 else f"{x * 1000:.1f} ms" if x >= 0.01 else f"{x * 1000:.2f} ms"


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    torch_version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    import sqlite3

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch_version,
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' code (default {BEFORE})")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--tensors", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kappatune-reliability-"))
    old = work / "before"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "kappatune"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    new = ROOT
    rows = []
    res: dict = {"before": args.before, "entries": args.entries, "tensors": args.tensors, "repeat": args.repeat}

    # -- the cache at scale -----------------------------------------------------------------
    print(f"cache with {args.entries:,} entries ...", flush=True)
    old_json = work / "old" / "kappa_cache.json"
    _write_json_cache(old_json, args.entries)
    size_mb = old_json.stat().st_size / 1e6
    before = _run(CACHE_SNIPPET, old, str(old_json), str(args.repeat), str(args.entries))
    new_json = work / "newjson" / "kappa_cache.json"
    _write_json_cache(new_json, args.entries)
    after_json = _run(CACHE_SNIPPET, new, str(new_json), str(args.repeat), str(args.entries))
    folder = work / "sqlite"
    _write_json_cache(folder / "kappa_cache.json", args.entries)  # imported once, on first use
    imp = _run(IMPORT_SNIPPET, new, str(folder))
    after = _run(CACHE_SNIPPET, new, str(folder), str(args.repeat), str(args.entries))
    scan_after = _run(SCAN_SNIPPET, new, str(folder), str(args.repeat))
    old_scan_json = work / "old_scan" / "kappa_cache.json"
    _write_json_cache(old_scan_json, args.entries)
    scan_before = _run(SCAN_SNIPPET, old, str(old_scan_json.parent), str(args.repeat))
    res["cache"] = {"json_mb": size_mb, "before_json": before, "after_sqlite": after, "after_json_store": after_json,
                    "import": imp, "warm_scan_before": scan_before["warm_scan"],
                    "warm_scan_after": scan_after["warm_scan"]}
    rows += [
        (f"warm scan of 3 tensors, cache part ({args.entries:,} entries)", before["warm"], after["warm"]),
        (f"adding 2 entries ({args.entries:,} entries)", before["add2"], after["add2"]),
        (f"warm kappatune.scan of 3 tensors, end to end ({args.entries:,} entries)", scan_before["warm_scan"],
         scan_after["warm_scan"]),
    ]

    # -- checkpoint with many tensors -------------------------------------------------------
    print(f"checkpoint with {args.tensors} tensors ...", flush=True)
    ck = work / "many.safetensors"
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        torch.manual_seed(0)
        save_file({{f"layers.{{i}}.weight": torch.randn(16, 16) for i in range({args.tensors})}}, {str(ck)!r})
    """)], check=True)
    ck_repeat = max(1, min(args.repeat, 3))
    ck_before = _run(CKPT_SNIPPET, old, str(ck), str(ck_repeat))
    ck_after = _run(CKPT_SNIPPET, new, str(ck), str(ck_repeat))
    res["checkpoint"] = {"before": ck_before, "after": ck_after}
    rows.append((f"read {args.tensors} tensors of one .safetensors file", ck_before["load_all"], ck_after["load_all"]))

    # -- CLI start-up -----------------------------------------------------------------------
    print("CLI start-up ...", flush=True)
    help_cmd = [sys.executable, "-m", "kappatune", "--help"]
    err_cmd = [sys.executable, "-m", "kappatune", "scan", "--top", "-1", "x"]
    cli = {"help_before": _time_cmd(help_cmd, old, args.repeat), "help_after": _time_cmd(help_cmd, new, args.repeat),
           "error_before": _time_cmd(err_cmd, old, args.repeat), "error_after": _time_cmd(err_cmd, new, args.repeat)}
    res["cli"] = cli
    rows += [("kappatune --help (process wall time)", cli["help_before"], cli["help_after"]),
             ("kappatune with an argument error (process wall time)", cli["error_before"], cli["error_after"])]

    # -- digest -----------------------------------------------------------------------------
    print("digest ...", flush=True)
    dig = _run(DIGEST_SNIPPET, new, str(args.repeat))
    res["digest_gb_s"] = dig
    res["machine"] = _machine()
    res["command"] = " ".join(["python", "benchmarks/reliability.py", *sys.argv[1:]])

    # -- report -----------------------------------------------------------------------------
    lines = ["| what | before | after | before / after |", "|---|---:|---:|---:|"]
    for what, b, a in rows:
        lines.append(f"| {what} | {_secs(b)} | {_secs(a)} | {b / a:.1f}× |")
    lines += ["", f"The {args.entries:,}-entry cache is {size_mb:.1f} MB of JSON before; after, it is imported once "
              f"into SQLite ({_secs(imp['import'])}; `len()` of a fresh `KappaCache` then takes "
              f"{_secs(imp['after_import_open'])}). For reference, the current `.json` store (each entry validated when used, every one before a save "
              f"rewrites the file): warm {_secs(after_json['warm'])}, adding 2 entries {_secs(after_json['add2'])}.",
              "", "| digest (64 MiB tensor) | GB/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in dig.items()]
    m = res["machine"]
    md = "\n".join([
        "# Reliability figures (issue 13): before → after", "",
        f"Before: the code of `{args.before}`; after: this checkout; medians of {args.repeat} runs, one process "
        "per case.", "", *lines, "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, Python {m['python']}, torch {m['torch']}, "
        f"SQLite {m['sqlite']}, {m['platform']}.", ""])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (OUT / "results.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
