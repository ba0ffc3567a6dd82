"""The κ cache: keyed by content, validated on read, crash-safe, concurrent, shared-folder safe.

The store is one SQLite database: ``kappa_cache.sqlite`` in a folder (the default), or a path
ending in ``.sqlite``/``.sqlite3``/``.db``; a ``.json`` path is refused.
"""

import importlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kappatune
from kappatune.cache import CACHE_FORMAT, SCHEMA_VERSION, KappaCache, default_cache_dir, tensor_digest

from .conftest import make_tiny_llama

cache_mod = importlib.import_module("kappatune.cache")

STORES = ["folder", "file"]


def cache_path(tmp_path, store="folder"):
    """What to pass as ``cache=``: the folder, or a .sqlite file path in it."""
    return tmp_path / "c" if store == "folder" else tmp_path / "c" / "kappas.sqlite"


def data_file(tmp_path, store="folder"):
    return tmp_path / "c" / ("kappa_cache.sqlite" if store == "folder" else "kappas.sqlite")


def raw_entries(tmp_path, store="folder"):
    """{key: entry} as stored on disk, read without kappatune."""
    con = sqlite3.connect(str(data_file(tmp_path, store)))
    try:
        return {k: json.loads(e) for k, e in con.execute("SELECT key, entry FROM entries")}
    finally:
        con.close()


def set_raw(tmp_path, key, text, store="folder"):
    """Store ``text`` (JSON of one entry, taken verbatim) under ``key``, bypassing kappatune."""
    con = sqlite3.connect(str(data_file(tmp_path, store)))
    with con:
        con.execute("INSERT OR REPLACE INTO entries VALUES (?, ?)", (key, text))
    con.close()


def n_eligible(model):
    return sum(1 for _, p in model.named_parameters() if p.ndim >= 2)


# -- keyed by content ----------------------------------------------------------------------------
def test_warm_scan_computes_nothing_and_gives_same_table(tmp_path, count_computations):
    model = make_tiny_llama()
    cold = kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    assert len(count_computations) == n_eligible(model) == len(cold)
    count_computations.clear()
    warm = kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    assert count_computations == []
    assert warm.to_dict() == cold.to_dict()
    con = sqlite3.connect(str(data_file(tmp_path)))
    meta = dict(con.execute("SELECT k, v FROM meta"))
    assert meta["format"] == CACHE_FORMAT and meta["schema_version"] == str(SCHEMA_VERSION)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    entries = raw_entries(tmp_path)
    assert len(entries) == len(cold)
    assert {"kappa", "shape", "dtype", "layout", "sigma_max", "sigma_min"} <= set(next(iter(entries.values())))


def test_cache_of_model_a_is_not_used_for_model_b(tmp_path, count_computations):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)   # same names and shapes, other weights
    kappatune.scan(a, cache=cache_path(tmp_path), progress=False)
    count_computations.clear()
    tb = kappatune.scan(b, cache=cache_path(tmp_path), progress=False)
    assert len(count_computations) == n_eligible(b)
    fresh = kappatune.scan(b, cache=None, progress=False)
    assert tb.kappas == fresh.kappas


def test_one_changed_tensor_is_the_only_recomputation(tmp_path, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    count_computations.clear()
    kappatune.scan(model, cache=tmp_path, progress=False)
    assert count_computations == ["model.layers.1.mlp.up_proj.weight"]


def test_recompute_forces_fresh_values(tmp_path, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path, progress=False)
    count_computations.clear()
    kappatune.scan(model, cache=tmp_path, recompute=True, progress=False)
    assert len(count_computations) == n_eligible(model)


def test_default_cache_location_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    kappatune.scan(make_tiny_llama(), progress=False)  # cache=True by default
    assert (tmp_path / "here" / "kappa_cache.sqlite").is_file()
    monkeypatch.delenv("KAPPATUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kappatune"


@pytest.mark.parametrize("name", ["my_kappas.sqlite", "my_kappas.sqlite3", "my_kappas.db"])
def test_file_paths_are_accepted(tmp_path, name):
    f = tmp_path / name
    kappatune.scan(make_tiny_llama(), cache=f, progress=False)
    assert f.is_file() and len(KappaCache(f)) == n_eligible(make_tiny_llama())
    assert KappaCache(os.fsencode(f)).path == f  # bytes paths too


def test_cache_path_that_is_a_plain_file_is_rejected(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(ValueError, match="does not end in .sqlite"):
        KappaCache(f)


@pytest.mark.parametrize("content", [None, '{"lm_head.weight": 1.0}',
                                     json.dumps({"format": CACHE_FORMAT, "schema_version": 1, "entries": {}})],
                         ids=["no file", "the reference's name-to-kappa file", "an earlier kappatune's JSON cache"])
def test_a_json_cache_path_is_a_one_line_error_and_nothing_is_written(tmp_path, content, capsys):
    """The κ cache is an SQLite database: a .json path is refused, saying what to pass instead."""
    from kappatune import cli

    f = tmp_path / "kappas.json"
    if content is not None:
        f.write_text(content)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError) as err:
        KappaCache(f)
    msg = str(err.value)
    assert "\n" not in msg and str(f) in msg and ".json" in msg and "SQLite" in msg
    assert "pass a folder" in msg and ".sqlite" in msg
    with pytest.raises(ValueError, match="ends in .json"):
        kappatune.scan(make_tiny_llama(), cache=str(f), progress=False)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    ckpt = tmp_path / "m" / "model.safetensors"
    ckpt.parent.mkdir()
    safetensors_torch.save_file({"a.weight": torch.randn(4, 4)}, str(ckpt))
    capsys.readouterr()
    assert cli.main(["scan", str(ckpt), "--cache-dir", str(f)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "ends in .json" in err_text and "Traceback" not in err_text, err_text
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["m"])  # nothing made beside it
    assert os.listdir(ckpt.parent) == ["model.safetensors"]
    if content is None:
        assert not f.exists()
    else:
        assert f.read_text() == content  # never read, never overwritten
    folder = tmp_path / "a_folder.json"  # an existing folder is a folder, whatever its name
    folder.mkdir()
    assert KappaCache(folder).path == folder / "kappa_cache.sqlite"


def test_batch_methods(tmp_path):
    c = KappaCache(tmp_path)
    n = c.put_many({f"d{i}|matrix": dict(kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[2, 3], dtype="float32",
                                         layout="matrix") for i in range(5)})
    assert n == 5 and c.save()
    got = KappaCache(tmp_path).get_many([f"d{i}|matrix" for i in range(7)])
    assert sorted(got) == [f"d{i}|matrix" for i in range(5)] and got["d0|matrix"]["kappa"] == 2.0


# -- validated on read ---------------------------------------------------------------------------
def _poisoned_variants(entry, shape0):
    """(label, entry JSON text) that must never be used."""
    e = dict(entry)
    ratio = e["sigma_max"] / e["sigma_min"]
    liar = {**e, "kappa": 1.0, "sigma_max": 1.0, "sigma_min": 1.0}
    bad = {
        "nan literal": json.dumps(e).replace(json.dumps(e["kappa"]), "NaN", 1),
        "infinity literal": json.dumps({**e, "sigma_min": "@"}).replace('"@"', "Infinity"),
        "kappa disagrees with sigmas": json.dumps({**e, "kappa": 1.0, "sigma_max": 1.5e4, "sigma_min": 1.0}),
        "negative kappa": json.dumps({**e, "kappa": -ratio}),
        "kappa true": json.dumps({**e, "kappa": True}),
        "sigma_min above sigma_max": json.dumps({**e, "sigma_max": e["sigma_min"], "sigma_min": e["sigma_max"]}),
        "negative sigmas": json.dumps({**e, "sigma_max": -e["sigma_min"], "sigma_min": -e["sigma_max"]}),
        "empty per_matrix": json.dumps({**e, "per_matrix": []}),
        "wrong shape rank": json.dumps({**e, "shape": [shape0]}),
        "negative shape": json.dumps({**e, "shape": [-1, 4]}),
        "layout not the key's": json.dumps({**e, "layout": "flatten"}),
        "deeply nested": json.dumps({**e, "name": "@"}).replace('"@"', "[" * 50000 + "]" * 50000),
        "not an object": "[1, 2, 3]",
        # every field twice: a consistent but wrong value (κ = 1) first or last; never "the last one wins"
        "duplicate fields, the wrong ones last": json.dumps(e)[:-1] + ", " + json.dumps(liar)[1:],
        "duplicate fields, the wrong ones first": json.dumps(liar)[:-1] + ", " + json.dumps(e)[1:],
    }
    return bad


def test_poisoned_or_inconsistent_entries_are_recomputed(tmp_path, caplog, count_computations):
    model = make_tiny_llama()
    fresh = kappatune.scan(model, cache=False, progress=False)
    kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    entries = raw_entries(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    key = next(k for k, e in entries.items() if e["name"] == name)
    for label, text in _poisoned_variants(entries[key], 64).items():
        set_raw(tmp_path, key, text)
        count_computations.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kappatune"):
            table = kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
        assert count_computations == [name], label
        assert table.kappas == fresh.kappas, label
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and str(data_file(tmp_path)) in warnings[0].getMessage(), (label, caplog.text)
        assert raw_entries(tmp_path)[key] == entries[key], label  # the fresh value replaced it


def test_stack_entries_are_checked_against_their_matrices(tmp_path, count_computations):
    sd = {"experts": torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(0))}
    fresh = kappatune.scan(sd, cache=False, progress=False)
    kappatune.scan(sd, cache=tmp_path, progress=False)
    con = sqlite3.connect(str(tmp_path / "kappa_cache.sqlite"))
    (key, entry), = [(k, json.loads(e)) for k, e in con.execute("SELECT key, entry FROM entries")]
    con.close()
    assert len(entry["per_matrix"]) == 3
    variants = {
        "two values for three matrices": {**entry, "per_matrix": entry["per_matrix"][:2]},
        "aggregate is not kappa": {**entry, "kappa": entry["kappa"] * 3},
        "per_matrix missing": {**entry, "per_matrix": None},
        "value below 1": {**entry, "per_matrix": [0.5] + entry["per_matrix"][1:]},
    }
    for label, e in variants.items():
        con = sqlite3.connect(str(tmp_path / "kappa_cache.sqlite"))
        with con:
            con.execute("UPDATE entries SET entry=? WHERE key=?", (json.dumps(e), key))
        con.close()
        count_computations.clear()
        assert kappatune.scan(sd, cache=tmp_path, progress=False).kappas == fresh.kappas, label
        assert count_computations == ["experts"], label


def test_entry_of_another_shape_or_dtype_is_not_used(tmp_path):
    c = KappaCache(tmp_path)
    c.put("x|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(4, 6), dtype="float32", layout="matrix")
    assert c.get("x|matrix", shape=(4, 6), dtype="float32")["kappa"] == 2.0
    assert c.get("x|matrix", shape=(6, 4), dtype="float32") is None
    assert c.get("x|matrix", shape=(4, 6), dtype="bfloat16") is None


def test_save_never_fails_the_scan_with_a_non_finite_value(tmp_path, caplog):
    c = KappaCache(cache_path(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        c.put("a|matrix", kappa=float("nan"), sigma_max=float("nan"), sigma_min=1.0, shape=(2, 2), dtype="float32",
              layout="matrix")
        c.put("b|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
        assert c.save()
    assert "not storing" in caplog.text
    assert list(KappaCache(cache_path(tmp_path)).keys()) == ["b|matrix"]


def test_a_nan_literal_in_a_row_does_not_break_later_saves(tmp_path, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    key, entry = next(iter(raw_entries(tmp_path).items()))
    set_raw(tmp_path, key, json.dumps(entry)[:-1] + ', "extra": NaN}')
    other = make_tiny_llama(seed=7)
    c = KappaCache(cache_path(tmp_path))
    assert len(kappatune.scan(other, cache=c, progress=False)) == n_eligible(other)
    assert c.misses == n_eligible(other)
    count_computations.clear()
    kappatune.scan(other, cache=cache_path(tmp_path), progress=False)
    assert count_computations == []  # the new model's entries were saved
    kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    assert count_computations == [entry["name"]]  # the row with NaN was not used, and was replaced
    json.loads(next(iter(sqlite3.connect(str(data_file(tmp_path))).execute(
        "SELECT entry FROM entries WHERE key = ?", (key,))))[0], parse_constant=lambda c: pytest.fail(c))


def test_corrupt_file_warns_recomputes_and_is_kept_aside(tmp_path, caplog, count_computations):
    path = data_file(tmp_path)
    path.parent.mkdir(parents=True)
    garbage = "this is not an SQLite database, but it has our file name" * 10
    path.write_text(garbage)
    model = make_tiny_llama()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert len(count_computations) == n_eligible(model)
    assert len(KappaCache(cache_path(tmp_path))) == n_eligible(model)   # a fresh valid file
    aside = list(path.parent.glob(path.name + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == garbage                # the bad one kept, not lost


def test_corrupt_files_moved_aside_in_the_same_second_keep_distinct_names(tmp_path):
    f = tmp_path / "k.sqlite"
    for i in range(3):
        f.write_text("{broken %d" % i)
        c = KappaCache(f)
        c.put("a|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
        assert c.save()
        c.clear_memory()  # closes the database before the next round overwrites it
    aside = sorted(p.read_text() for p in tmp_path.glob("k.sqlite.corrupt-*"))
    assert aside == ["{broken 0", "{broken 1", "{broken 2"]


def test_malformed_entries_are_dropped(tmp_path, caplog, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    key = next(iter(raw_entries(tmp_path)))
    set_raw(tmp_path, key, json.dumps({**raw_entries(tmp_path)[key], "kappa": "not a number"}))
    count_computations.clear()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=cache_path(tmp_path), progress=False)
    assert "malformed" in caplog.text
    assert len(count_computations) == 1


@pytest.mark.parametrize("what", ["other program", "newer schema"])
def test_foreign_or_newer_database_is_neither_used_nor_overwritten(tmp_path, caplog, what):
    db = tmp_path / "kappa_cache.sqlite"
    con = sqlite3.connect(str(db))
    with con:
        if what == "other program":
            con.execute("CREATE TABLE t (x)")
        else:
            con.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
            con.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, entry TEXT NOT NULL)")
            con.execute("INSERT INTO meta VALUES ('format', ?), ('schema_version', ?)",
                        (CACHE_FORMAT, str(SCHEMA_VERSION + 1)))
    con.close()
    before = db.read_bytes()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert len(kappatune.scan(make_tiny_llama(), cache=tmp_path, progress=False)) > 0
    assert db.read_bytes() == before and "not be overwritten" in caplog.text


@pytest.mark.parametrize("store", STORES)
def test_unwritable_location_warns_and_scan_succeeds(tmp_path, store, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    cache = KappaCache(blocker / "sub" if store == "folder" else blocker / "sub" / "k.sqlite")
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(make_tiny_llama(), cache=cache, progress=False)
    assert len(table) > 0
    assert "sub" in caplog.text and ("could not be written" in caplog.text or "could not be opened" in caplog.text)


# -- shared folders ------------------------------------------------------------------------------
@pytest.mark.parametrize("store", STORES)
def test_files_honour_the_umask(tmp_path, store):
    old = os.umask(0o002)
    try:
        kappatune.scan(make_tiny_llama(), cache=cache_path(tmp_path, store), progress=False)
    finally:
        os.umask(old)
    made = [p for p in (tmp_path / "c").iterdir() if p.is_file()]
    assert data_file(tmp_path, store) in made
    for p in made:
        assert stat.S_IMODE(p.stat().st_mode) == 0o664, (p.name, oct(p.stat().st_mode))


@pytest.mark.parametrize("store", STORES)
def test_unreadable_file_is_skipped_never_treated_as_corrupt(tmp_path, store, caplog, monkeypatch):
    """Another user's file we may not read: warned about, left exactly as it is (not moved aside)."""
    import builtins
    import io

    model = make_tiny_llama()
    kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    path = data_file(tmp_path, store)
    before = path.read_bytes()
    real_open = builtins.open

    def denied(file, *a, **kw):  # what open() does on a 0600 file of another user (we run as root here)
        if not isinstance(file, int) and os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(io, "open", denied)
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(make_tiny_llama(seed=2), cache=cache_path(tmp_path, store), progress=False)
    monkeypatch.undo()
    assert len(table) > 0
    assert "cannot be read" in caplog.text and "Permission denied" in caplog.text and "corrupt" not in caplog.text
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.corrupt-*"))


_KILL_WRITER = textwrap.dedent("""
    import sys
    from kappatune.cache import KappaCache
    path, start = sys.argv[1], int(sys.argv[2])
    i = start
    while True:
        c = KappaCache(path)
        for j in range(200):
            c.put(f"k{i}-{j}|matrix", kappa=3.0, sigma_max=3.0, sigma_min=1.0, shape=[4, 4], dtype="float32",
                  layout="matrix", name="x" * 200)
        assert c.save()
        print(i, flush=True)
        i += 1
""")


def test_sigkill_mid_save_loses_nothing_committed(tmp_path):
    """Real SIGKILLs of a process saving in a loop: every save it reported is there, the database is
    valid, and no temporary file is left once the next save has run."""
    path = str(cache_path(tmp_path))
    script = tmp_path / "writer.py"
    script.write_text(_KILL_WRITER)
    reported = []
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, str(script), path, str(round_ * 1000)], stdout=subprocess.PIPE,
                             text=True)
        first = p.stdout.readline()  # it has saved at least once
        time.sleep(0.05 + 0.037 * round_)
        os.kill(p.pid, signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
        reported += [int(x) for x in (first + rest).split()]
    assert reported
    c = KappaCache(path)
    keys = set(c.keys())
    assert all(f"k{i}-{j}|matrix" in keys for i in reported for j in range(200))
    assert all(c.get(k) is not None for k in list(keys)[:50])
    con = sqlite3.connect(str(data_file(tmp_path)))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    c.put("one more|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[2, 2], dtype="float32", layout="matrix")
    assert c.save()
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")] == []


# -- concurrency ---------------------------------------------------------------------------------
def _writer(path, worker, n_entries, rounds):
    cache = KappaCache(path)
    for r in range(rounds):
        for i in range(n_entries // rounds):
            idx = r * (n_entries // rounds) + i
            cache.put(f"w{worker}-{idx}|matrix", kappa=1.0 + idx, sigma_max=1.0 + idx, sigma_min=1.0,
                      shape=[2, 2], dtype="float32", layout="matrix")
        assert cache.save()


def test_concurrent_writers_merge_every_entry(tmp_path):
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(cache_path(tmp_path)), w, 60, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = raw_entries(tmp_path)
    assert len(entries) == 4 * 60
    assert {f"w{w}-{i}|matrix" for w in range(4) for i in range(60)} == set(entries)


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sqlite3, sys, time
    path, kind = sys.argv[1], sys.argv[2]
    if kind == "lock file":  # the lock under which a corrupt database is moved aside
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


@pytest.mark.parametrize("kind", ["database", "lock file"])
def test_a_held_lock_is_waited_for_with_a_message(tmp_path, kind, caplog):
    c = KappaCache(cache_path(tmp_path))
    c.put("a|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
    assert c.save()
    if kind == "lock file":
        c.clear_memory()
        data_file(tmp_path).write_text("not a database")  # the next open moves it aside, under the lock
        c = KappaCache(cache_path(tmp_path))
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_LOCK)
    p = subprocess.Popen([sys.executable, str(script), str(data_file(tmp_path)), kind, "2.5"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kappatune"):  # the file is opened at the first put
        c.put("b|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
        assert c.save()
    assert time.monotonic() - t0 > 1.0
    p.wait(10)
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waiting) == 1 and str(data_file(tmp_path)) in waiting[0], caplog.text
    if kind == "lock file":
        assert str(data_file(tmp_path)) + ".lock" in waiting[0]
        assert [f.read_text() for f in tmp_path.glob("c/kappa_cache.sqlite.corrupt-*")] == ["not a database"]
        assert set(KappaCache(cache_path(tmp_path)).keys()) == {"b|matrix"}
    else:
        assert set(KappaCache(cache_path(tmp_path)).keys()) == {"a|matrix", "b|matrix"}


# -- digests -------------------------------------------------------------------------------------
def test_digest_depends_on_bytes_dtype_and_shape_only():
    x = torch.randn(6, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert tensor_digest(x.t().contiguous().t()) == tensor_digest(x)   # layout in memory does not matter
    assert tensor_digest(x) != tensor_digest(x.reshape(4, 6))
    assert tensor_digest(x) != tensor_digest(x.double())
    y = x.clone()
    y[5, 3] = torch.nextafter(y[5, 3], torch.tensor(float("inf")))    # one ulp in one element
    assert tensor_digest(x) != tensor_digest(y)
    assert tensor_digest(x.to(torch.bfloat16)) != tensor_digest(x.to(torch.float16))


def test_digest_is_xxh3_128_of_dtype_shape_and_bytes():
    import xxhash

    x = torch.randn(16, 16)
    h = xxhash.xxh3_128(f"{x.dtype}|{tuple(x.shape)}|".encode())
    h.update(x.numpy().tobytes())
    assert tensor_digest(x) == "xxh3_128:" + h.hexdigest()
    empty = torch.zeros(0, 3)
    assert tensor_digest(empty) == "xxh3_128:" + xxhash.xxh3_128(b"torch.float32|(0, 3)|").hexdigest()


def test_network_file_system_uses_the_rollback_journal(tmp_path, monkeypatch):
    """WAL needs memory shared by every process, so one host: on NFS and the like it is not used."""
    monkeypatch.setattr(cache_mod, "_network_fs", lambda path: True)
    kappatune.scan(make_tiny_llama(), cache=tmp_path, progress=False)
    con = sqlite3.connect(str(tmp_path / "kappa_cache.sqlite"))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    assert len(KappaCache(tmp_path)) == n_eligible(make_tiny_llama())


def test_a_cache_alive_at_interpreter_exit_closes_quietly(tmp_path):
    """A module-level cache is finalized while the interpreter tears its modules down: no
    "Exception ignored in KappaCache.__del__" on stderr."""
    code = textwrap.dedent(f"""
        import torch, kappatune
        cache = kappatune.KappaCache({str(tmp_path / "c")!r})
        table = kappatune.scan(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), cache=cache)
        assert len(table) == 2
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
