"""Before → after: the behaviour cases of issue 24 and the figures of issue 13 (the κ cache at scale,
checkpoints with many tensors, CLI start-up, the digest), the "before" run in the same run on the
code of an earlier commit.

The earlier code is taken with ``git archive REV`` into a temporary folder (the working tree is not
touched) and run in subprocesses with ``PYTHONPATH`` pointing at it; the current code runs the same
snippets from this checkout. Every figure is the median of ``--repeat`` runs.

Behaviour cases (issue 24; nothing is timed): each runs in a fresh process on the code before
(``--before-24``) and on this checkout, and the table shows what happened:

* a cache folder another user may not write (``chmod 555``, read by ``nobody``): entries used;
* a dangling symbolic link at ``kappa_cache.sqlite``: files created where it points;
* an entries table made by hand holding an integer entry: whether the scan survives;
* a full database (SQLite's ``max_page_count``): the warning;
* a checkpoint ``nobody`` may not read, and a saved scan nested 100 000 levels deep: exit status
  and error line of ``kappatune``;
* ``-o`` a link to ``/proc/self/fd/1`` with stdout redirected to a file: what the file holds;
* ``exclude=["lm_head"]`` on a model whose head is tied to the embedding: whether it trains;
* a plain ``torch.optim`` state dict of another model: ``load_state_dict`` then ``step()``;
* ``names=`` a generator; a float8 ``.safetensors`` file.

The cases that need another user run only as root (they fork and drop to ``nobody``).

Timed cases (issue 13):

* **cache at scale**: a cache of ``--entries`` (default 100 000) entries; what a warm scan of a
  3-tensor model costs in the cache (open + 3 lookups + save with nothing new) and what adding 2
  entries costs (open + 2 misses + 2 puts + save), each in a fresh ``KappaCache``; before: the JSON
  file of the earlier code; after: the SQLite store (a folder) holding the same entries, written in
  one save (timed too). Also the end-to-end warm ``kappatune.scan`` of a 3-tensor model (digests
  included).
* **checkpoint with many tensors**: one ``.safetensors`` file of ``--tensors`` (default 4000) small
  tensors: ``checkpoint_refs`` + ``load()`` of every tensor.
* **CLI start-up**: ``python -m kappatune --help`` and an argument error, wall time of the process.
* **digest**: GB/s of the stdlib fallbacks of earlier code (CRC-32 + Adler-32, then BLAKE2b-128)
  and of xxHash3-128, the digest now, on a 64 MiB tensor.

Usage::

    python benchmarks/reliability.py                       # before = 72d705a, 100k entries, 4000 tensors
    python benchmarks/reliability.py --before HEAD~5 --entries 20000 --tensors 1000 --repeat 3
    python benchmarks/reliability.py --behaviour-only      # issue 24's cases; keeps the timed figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "reliability"
BEFORE = "72d705a"  # main before the reliability work of issue 13
BEFORE_24 = "4335c7f"  # main before the second pass (issue 24)


def _checkout(rev: str, dest: Path) -> Path:
    """The package ``kappatune`` of ``rev``, extracted with ``git archive`` into ``dest`` (the working tree
    is not touched); returns ``dest``, for ``PYTHONPATH``."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kappatune"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


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

FILL_SNIPPET = textwrap.dedent("""
    import json, sys, time, logging
    logging.disable(logging.WARNING)
    from kappatune.cache import KappaCache
    folder, n = sys.argv[1], int(sys.argv[2])
    E = dict(kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[64, 64], dtype="float32", layout="matrix")
    t0 = time.perf_counter()
    c = KappaCache(folder)
    c.put_many({f"xxh3_128:{i:032x}|matrix": dict(E, name=f"model.layers.{i % 32}.mlp.up_proj.weight")
                for i in range(n)})
    assert c.save()
    t = time.perf_counter() - t0
    t0 = time.perf_counter(); c2 = KappaCache(folder); m = len(c2); t2 = time.perf_counter() - t0
    print(json.dumps({"fill": t, "entries": m, "after_fill_open": t2}))
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


# -- behaviour cases (issue 24) ------------------------------------------------------------------
CASE_PRELUDE = textwrap.dedent("""
    import contextlib, io, json, logging, os, pwd, sqlite3, subprocess, sys, urllib.parse
    import torch
    from torch import nn
    from safetensors.torch import save_file
    import kappatune, kappatune.cache, kappatune.checkpoint, kappatune.cli
    work = sys.argv[1]
    msgs = []
    _h = logging.Handler()
    _h.emit = lambda r: msgs.append(r.getMessage())
    logging.getLogger("kappatune").addHandler(_h)
    logging.getLogger("kappatune").setLevel(logging.WARNING)

    def short(text, n=230):
        text = " ".join(str(text).replace(work, "…").split())
        return text if len(text) <= n else text[:n - 1] + "…"

    def warned(prefix="; warning: "):
        return prefix + msgs[0] if msgs else ""

    def done(outcome):
        print(json.dumps({"outcome": short(outcome)}))

    def model3():
        torch.manual_seed(0)
        return {f"l{i}.weight": torch.randn(12, 8) for i in range(3)}

    def as_nobody(fn):
        kappatune.cache.tensor_digest(torch.zeros(1))  # import the digest before: nobody may not read it
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            out = "the child failed"
            try:
                os.close(r)
                pw = pwd.getpwnam("nobody")
                os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
                out = fn()
            except BaseException as e:
                out = f"{type(e).__name__}: {e}"
            finally:
                data = json.dumps(out).encode()
                while data:
                    data = data[os.write(w, data):]
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            raw = f.read()
        os.waitpid(pid, 0)
        return json.loads(raw)
""")

CASES = {
    "read-only cache folder (`chmod 555`, read by `nobody`)": ("root", """
        m, folder = model3(), os.path.join(work, "c")
        c = kappatune.KappaCache(folder)
        kappatune.scan(m, cache=c, progress=False)
        c.clear_memory()
        os.chmod(folder, 0o555)
        def child():
            c = kappatune.KappaCache(folder)
            kappatune.scan(m, cache=c, progress=False)
            return [c.hits, msgs[:1]]
        res = as_nobody(child)
        done(res if isinstance(res, str)
             else f"{res[0]} of 3 entries used" + (f"; warning: {res[1][0]}" if res[1] else ""))
    """),
    "dangling link at `kappa_cache.sqlite`": ("", """
        folder, outside = os.path.join(work, "c"), os.path.join(work, "elsewhere")
        os.mkdir(folder); os.mkdir(outside)
        os.symlink(os.path.join(outside, "victim"), os.path.join(folder, "kappa_cache.sqlite"))
        kappatune.scan(model3(), cache=folder, progress=False)
        made = sorted(os.listdir(outside))
        done((f"created where the link points: {', '.join(made)}" if made else "nothing created where the link points")
             + warned())
    """),
    "an integer in an entries table made by hand": ("", """
        m, folder = model3(), os.path.join(work, "c")
        os.mkdir(folder)
        con = sqlite3.connect(os.path.join(folder, "kappa_cache.sqlite"))
        with con:
            con.execute("CREATE TABLE meta (k, v)"); con.execute("CREATE TABLE entries (key PRIMARY KEY, entry)")
            con.execute("INSERT INTO meta VALUES ('format', 'kappatune-kappa-cache'), ('schema_version', 1)")
            key = kappatune.KappaCache.key(kappatune.cache.tensor_digest(m["l0.weight"]), "matrix")
            con.execute("INSERT INTO entries VALUES (?, 3)", (key,))
        con.close()
        try:
            t = kappatune.scan(m, cache=folder, progress=False)
            done(f"scan ok ({len(t)} tensors)" + warned())
        except Exception as e:
            done(f"scan fails: {type(e).__name__}: {e}")
    """),
    "full database (SQLite `max_page_count`)": ("", """
        c = kappatune.KappaCache(os.path.join(work, "c"))
        e = dict(kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[4, 4], dtype="float32", layout="matrix")
        c.put("first|matrix", **e); c.save()
        con = c._sql.connect()
        con.execute(f"PRAGMA max_page_count={con.execute('PRAGMA page_count').fetchone()[0]}")
        for i in range(400):
            c.put(f"k{i}|matrix", **e, name="x" * 60)
        c.save()
        done(warned(""))
    """),
    "`kappatune scan` of a checkpoint `nobody` may not read": ("root", """
        d = os.path.join(work, "m"); os.mkdir(d); os.chmod(d, 0o755)
        f = os.path.join(d, "model.safetensors")
        save_file({"a.weight": torch.randn(4, 4)}, f)
        with contextlib.redirect_stdout(io.StringIO()):  # every module the command imports, imported now
            kappatune.cli.main(["scan", f, "--no-cache"])
        os.chmod(f, 0o600)
        def child():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = kappatune.cli.main(["scan", f, "--no-cache"])
            return f"exit {rc}: {err.getvalue().strip()}"
        done(as_nobody(child))
    """),
    "`kappatune show` of a saved scan nested 100 000 levels deep": ("", """
        f = os.path.join(work, "deep.json")
        with open(f, "w") as fh:
            fh.write('{"format": "kappatune-scan", "version": 1, "table": ' + "[" * 100000 + "]" * 100000 + "}")
        p = subprocess.run([sys.executable, "-m", "kappatune", "show", f], capture_output=True, text=True)
        done(f"exit {p.returncode}: {p.stderr.strip()}")
    """),
    "`scan -o` a link to `/proc/self/fd/1`, stdout redirected to a file": ("", """
        ck, link, log = (os.path.join(work, n) for n in ("m.safetensors", "out.json", "log.txt"))
        save_file(model3(), ck)
        os.symlink("/proc/self/fd/1", link)
        with open(log, "wb") as out:
            p = subprocess.run([sys.executable, "-m", "kappatune", "scan", ck, "--no-cache", "-o", link], stdout=out,
                               stderr=subprocess.PIPE, text=True)
        text = open(log).read()
        done(f"exit {p.returncode}; the file holds the JSON: {'yes' if text.lstrip().startswith('{') else 'no'}; "
             f"the summary printed after it: {'yes' if 'analysed 3 tensors' in text else 'lost'}")
    """),
    "`exclude=['lm_head']`, head tied to the embedding": ("", """
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(16, 8); self.body = nn.Linear(8, 8); self.lm_head = nn.Linear(8, 16)
                self.lm_head.weight = self.embed.weight
        torch.manual_seed(0)
        net = M()
        opt = kappatune.KappaTuneOptimizer(net, torch.optim.SGD, max_kappa=float("inf"), exclude=["lm_head"],
                                           cache=None, progress=False, lr=0.1)
        trained = any(p is net.embed.weight for g in opt.param_groups for p in g["params"])
        done(("the shared tensor trains, as embed.weight" if trained else "the shared tensor stays frozen") + warned())
    """),
    "plain `torch.optim` state dict of another model": ("", """
        torch.manual_seed(0)
        a, b = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
        inner = torch.optim.AdamW([a[0].weight, a[1].weight], lr=1e-3)
        a(torch.randn(2, 8)).sum().backward(); inner.step()
        opt = kappatune.KappaTuneOptimizer(b, torch.optim.AdamW, names=["0.weight", "1.weight"], cache=None, lr=1e-3)
        try:
            opt.load_state_dict(inner.state_dict())
        except ValueError as e:
            done(f"refused at load: {e}")
            sys.exit(0)
        b(torch.randn(2, 6)).sum().backward()
        try:
            opt.step()
            done("loaded (with a warning); step() ran")
        except Exception as e:
            done(f"loaded (with a warning); step() fails: {type(e).__name__}: {e}")
    """),
    "`names=` a generator": ("", """
        net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        try:
            opt = kappatune.KappaTuneOptimizer(net, torch.optim.SGD, names=(n for n in ["0.weight", "1.weight"]),
                                               cache=None, lr=0.1)
            done(f"trains {', '.join(opt.selected)}")
        except Exception as e:
            done(f"{type(e).__name__}: {e}")
    """),
    "float8 `.safetensors` file (`F8_E4M3`, `F8_E5M2`)": ("", """
        torch.manual_seed(0)
        sd = {"q.weight": torch.randn(24, 16).to(torch.float8_e4m3fn),
              "k.weight": torch.randn(16, 16).to(torch.float8_e5m2)}
        f = os.path.join(work, "f8.safetensors")
        save_file(sd, f)
        t = kappatune.checkpoint.scan_checkpoint(f, cache=False, progress=False)
        tm = kappatune.scan(sd, cache=False, progress=False)
        why = f" ({', '.join(sorted(set(t.skipped.values())))})" if t.skipped else ""
        done(f"checkpoint: {len(t)} analysed, {len(t.skipped)} skipped{why}; kappatune.scan of the same tensors: "
             f"{len(tm)} analysed")
    """),
}


def _behaviour(work: Path, old: Path, new: Path, rev: str) -> dict:
    """Each case of :data:`CASES` on the code of ``rev`` and on this checkout: ``{case: {before, after}}``."""
    out: dict = {"before": rev, "cases": {}}
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    for n, (case, (needs, code)) in enumerate(CASES.items()):
        row = {}
        for side, path in (("before", old), ("after", new)):
            if needs == "root" and not root:
                row[side] = "not run (needs root, to become the user nobody)"
                continue
            d = work / f"case{n}-{side}"
            d.mkdir()
            os.chmod(d, 0o755)
            try:
                row[side] = _run(CASE_PRELUDE + textwrap.dedent(code), path, str(d))["outcome"]
            except RuntimeError as e:
                row[side] = "the case crashed: " + " ".join(str(e).split())[-200:]
        print(f"  {case}: {row['after']}", flush=True)
        out["cases"][case] = row
    return out


def _render_behaviour(b: dict, command: str) -> List[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"| case | before (`{b['before']}`) | after |", "|---|---|---|"]
    lines += [f"| {case} | {cell(r['before'])} | {cell(r['after'])} |" for case, r in b["cases"].items()]
    return [
        "## Behaviour", "",
        f"Each case runs in a fresh process on the code of `{b['before']}` (before) and on this checkout (after); "
        "nothing is timed. Temporary paths are shown as `…`.", "", *lines, "",
        f"Command: `{command}`", ""]


def _timing(args: argparse.Namespace, work: Path, old: Path, new: Path) -> dict:
    """Issue 13's timed cases, "before" = ``args.before``; the measurements, as stored in results.json."""
    res: dict = {"before": args.before, "entries": args.entries, "tensors": args.tensors, "repeat": args.repeat}

    # -- the cache at scale -----------------------------------------------------------------
    print(f"cache with {args.entries:,} entries ...", flush=True)
    old_json = work / "old" / "kappa_cache.json"
    _write_json_cache(old_json, args.entries)
    size_mb = old_json.stat().st_size / 1e6
    before = _run(CACHE_SNIPPET, old, str(old_json), str(args.repeat), str(args.entries))
    folder = work / "sqlite"
    fill = _run(FILL_SNIPPET, new, str(folder), str(args.entries))  # the same entries, in one save
    after = _run(CACHE_SNIPPET, new, str(folder), str(args.repeat), str(args.entries))
    scan_after = _run(SCAN_SNIPPET, new, str(folder), str(args.repeat))
    old_scan_json = work / "old_scan" / "kappa_cache.json"
    _write_json_cache(old_scan_json, args.entries)
    scan_before = _run(SCAN_SNIPPET, old, str(old_scan_json.parent), str(args.repeat))
    res["cache"] = {"json_mb": size_mb, "before_json": before, "after_sqlite": after, "fill": fill,
                    "warm_scan_before": scan_before["warm_scan"],
                    "warm_scan_after": scan_after["warm_scan"]}

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

    # -- CLI start-up -----------------------------------------------------------------------
    print("CLI start-up ...", flush=True)
    help_cmd = [sys.executable, "-m", "kappatune", "--help"]
    err_cmd = [sys.executable, "-m", "kappatune", "scan", "--top", "-1", "x"]
    res["cli"] = {"help_before": _time_cmd(help_cmd, old, args.repeat),
                  "help_after": _time_cmd(help_cmd, new, args.repeat),
                  "error_before": _time_cmd(err_cmd, old, args.repeat),
                  "error_after": _time_cmd(err_cmd, new, args.repeat)}

    # -- digest -----------------------------------------------------------------------------
    print("digest ...", flush=True)
    res["digest_gb_s"] = _run(DIGEST_SNIPPET, new, str(args.repeat))
    res["machine"] = _machine()
    res["command"] = " ".join(["python", "benchmarks/reliability.py", *sys.argv[1:]])
    return res


def _render_timing(res: dict) -> List[str]:
    """The markdown of the timed cases (from a results.json, fresh or kept)."""
    c, ck, cli, dig = res["cache"], res["checkpoint"], res["cli"], res["digest_gb_s"]
    n = res["entries"]
    rows = [
        (f"warm scan of 3 tensors, cache part ({n:,} entries)", c["before_json"]["warm"], c["after_sqlite"]["warm"]),
        (f"adding 2 entries ({n:,} entries)", c["before_json"]["add2"], c["after_sqlite"]["add2"]),
        (f"warm kappatune.scan of 3 tensors, end to end ({n:,} entries)", c["warm_scan_before"],
         c["warm_scan_after"]),
        (f"read {res['tensors']} tensors of one .safetensors file", ck["before"]["load_all"],
         ck["after"]["load_all"]),
        ("kappatune --help (process wall time)", cli["help_before"], cli["help_after"]),
        ("kappatune with an argument error (process wall time)", cli["error_before"], cli["error_after"]),
    ]
    lines = ["| what | before | after | before / after |", "|---|---:|---:|---:|"]
    for what, b, a in rows:
        lines.append(f"| {what} | {_secs(b)} | {_secs(a)} | {b / a:.1f}× |")
    if "fill" in c:
        fill = c["fill"]
        lines += ["", f"The {n:,}-entry cache is {c['json_mb']:.1f} MB of JSON before; after, it is an SQLite "
                  f"database written in one save ({_secs(fill['fill'])}; `len()` of a fresh `KappaCache` then "
                  f"takes {_secs(fill['after_fill_open'])})."]
    else:  # a results.json of a run when a .json store still existed (kept by --behaviour-only)
        imp, aj = c["import"], c["after_json_store"]
        lines += ["", f"The {n:,}-entry cache is {c['json_mb']:.1f} MB of JSON before; after, it is imported once "
                  f"into SQLite ({_secs(imp['import'])}; `len()` of a fresh `KappaCache` then takes "
                  f"{_secs(imp['after_import_open'])}). For reference, the `.json` store of that time (each entry "
                  f"validated when used, every one before a save rewrites the file): warm {_secs(aj['warm'])}, "
                  f"adding 2 entries {_secs(aj['add2'])}."]
    lines += ["", "| digest (64 MiB tensor) | GB/s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in dig.items()]
    m = res["machine"]
    return [
        "## Speed", "",
        f"Before: the code of `{res['before']}`; after: the checkout it ran on; medians of {res['repeat']} runs, one "
        "process per case.", "", *lines, "",
        f"Command: `{res['command']}`", "",
        f"Machine: {m['nproc']} CPUs (`nproc`), {m['cpu']}, Python {m['python']}, torch {m['torch']}, "
        f"SQLite {m['sqlite']}, {m['platform']}.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' code (default {BEFORE})")
    ap.add_argument("--before-24", default=BEFORE_24,
                    help=f"git revision of the 'before' code of the behaviour cases (default {BEFORE_24})")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--tensors", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--behaviour-only", action="store_true",
                    help="run only the behaviour cases (issue 24, nothing timed) and keep the timed figures of the "
                         "existing results.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kappatune-reliability-"))
    os.chmod(work, 0o755)  # the cases run as the user nobody read files in it
    kept = None
    if args.behaviour_only:
        try:
            saved = json.loads((OUT / "results.json").read_text())
            kept = saved["timing"] if "timing" in saved else {k: saved[k] for k in (
                "before", "entries", "tensors", "repeat", "cache", "checkpoint", "cli", "digest_gb_s", "machine",
                "command")}  # a results.json written before the behaviour cases existed
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"--behaviour-only needs an earlier full run's {OUT / 'results.json'} ({e})")
    try:
        timing = kept if kept is not None else _timing(args, work, _checkout(args.before, work / "before"), ROOT)
        print("behaviour cases (issue 24) ...", flush=True)
        behaviour = _behaviour(work, _checkout(args.before_24, work / "before24"), ROOT, args.before_24)
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(work)], check=False)  # the cases leave read-only folders
        shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python", "benchmarks/reliability.py", *sys.argv[1:]])
    res = {"timing": timing, "behaviour": behaviour, "command": command}
    md = "\n".join([
        "# Reliability: before → after", "",
        *_render_behaviour(behaviour, command),
        *_render_timing(timing),
        *([f"The speed figures are those of the last full run (`{timing['command']}`), kept by `{command}`.", ""]
          if kept is not None else [])])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (OUT / "results.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
