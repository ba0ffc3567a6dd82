"""The κ cache: keyed by content, validated on read, crash-safe, concurrent, shared-folder safe.

Most tests run on both stores: a folder (SQLite, the default) and a ``.json`` file path.
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

STORES = ["folder", "json"]


def cache_path(tmp_path, store):
    """What to pass as ``cache=``: the folder (SQLite store) or a .json file path."""
    return tmp_path / "c" if store == "folder" else tmp_path / "c" / "kappas.json"


def data_file(tmp_path, store):
    return tmp_path / "c" / ("kappa_cache.sqlite" if store == "folder" else "kappas.json")


def raw_entries(tmp_path, store):
    """{key: entry} as stored on disk, read without kappatune."""
    f = data_file(tmp_path, store)
    if store == "json":
        return json.loads(f.read_text())["entries"]
    con = sqlite3.connect(str(f))
    try:
        return {k: json.loads(e) for k, e in con.execute("SELECT key, entry FROM entries")}
    finally:
        con.close()


def set_raw(tmp_path, store, key, text):
    """Store ``text`` (JSON of one entry, taken verbatim) under ``key``, bypassing kappatune."""
    f = data_file(tmp_path, store)
    if store == "json":
        data = json.loads(f.read_text())
        data["entries"][key] = "@@"
        f.write_text(json.dumps(data).replace('"@@"', text))
        return
    con = sqlite3.connect(str(f))
    with con:
        con.execute("INSERT OR REPLACE INTO entries VALUES (?, ?)", (key, text))
    con.close()




def n_eligible(model):
    return sum(1 for _, p in model.named_parameters() if p.ndim >= 2)


# -- keyed by content ----------------------------------------------------------------------------
@pytest.mark.parametrize("store", STORES)
def test_warm_scan_computes_nothing_and_gives_same_table(tmp_path, store, count_computations):
    model = make_tiny_llama()
    cold = kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    assert len(count_computations) == n_eligible(model) == len(cold)
    count_computations.clear()
    warm = kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    assert count_computations == []
    assert warm.to_dict() == cold.to_dict()
    if store == "json":
        data = json.loads(data_file(tmp_path, store).read_text())
        assert data["format"] == CACHE_FORMAT and data["schema_version"] == SCHEMA_VERSION
    else:
        con = sqlite3.connect(str(data_file(tmp_path, store)))
        assert dict(con.execute("SELECT k, v FROM meta"))["format"] == CACHE_FORMAT
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.close()
    entries = raw_entries(tmp_path, store)
    assert len(entries) == len(cold)
    assert {"kappa", "shape", "dtype", "layout", "sigma_max", "sigma_min"} <= set(next(iter(entries.values())))


@pytest.mark.parametrize("store", STORES)
def test_cache_of_model_a_is_not_used_for_model_b(tmp_path, store, count_computations):
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)   # same names and shapes, other weights
    kappatune.scan(a, cache=cache_path(tmp_path, store), progress=False)
    count_computations.clear()
    tb = kappatune.scan(b, cache=cache_path(tmp_path, store), progress=False)
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


@pytest.mark.parametrize("name", ["my_kappas.json", "my_kappas.sqlite", "my_kappas.db"])
def test_file_paths_are_accepted(tmp_path, name):
    f = tmp_path / name
    kappatune.scan(make_tiny_llama(), cache=f, progress=False)
    assert f.is_file() and len(KappaCache(f)) == n_eligible(make_tiny_llama())
    assert KappaCache(os.fsencode(f)).path == f  # bytes paths too


def test_cache_path_that_is_a_plain_file_is_rejected(tmp_path):
    f = tmp_path / "cachefile"
    f.write_text("x")
    with pytest.raises(ValueError, match="does not end in .json"):
        KappaCache(f)


def test_legacy_json_cache_in_the_folder_is_imported_once(tmp_path, caplog, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=tmp_path / "kappa_cache.json", progress=False)  # as earlier versions wrote it
    count_computations.clear()
    with caplog.at_level(logging.INFO, logger="kappatune"):
        kappatune.scan(model, cache=tmp_path, progress=False)
        assert count_computations == []
        assert caplog.text.count("imported") == 1
        kappatune.scan(model, cache=tmp_path, progress=False)
    assert caplog.text.count("imported") == 1  # not again while the JSON file is unchanged
    assert (tmp_path / "kappa_cache.sqlite").is_file() and (tmp_path / "kappa_cache.json").is_file()


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
    }
    return bad


@pytest.mark.parametrize("store", STORES)
def test_poisoned_or_inconsistent_entries_are_recomputed(tmp_path, store, caplog, count_computations):
    model = make_tiny_llama()
    fresh = kappatune.scan(model, cache=False, progress=False)
    kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    entries = raw_entries(tmp_path, store)
    name = "model.layers.0.self_attn.q_proj.weight"
    key = next(k for k, e in entries.items() if e["name"] == name)
    for label, text in _poisoned_variants(entries[key], 64).items():
        if store == "json" and label == "deeply nested":
            continue  # a JSON file nested too deeply cannot be parsed at all: corrupt (tested below)
        set_raw(tmp_path, store, key, text)
        count_computations.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kappatune"):
            table = kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
        assert count_computations == [name], label
        assert table.kappas == fresh.kappas, label
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and str(data_file(tmp_path, store)) in warnings[0].getMessage(), (label, caplog.text)
        # the fresh value replaced it, and the file stays strict JSON
        assert raw_entries(tmp_path, store)[key] == entries[key], label
        if store == "json":
            json.loads(data_file(tmp_path, store).read_text(), parse_constant=lambda c: pytest.fail(c))


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


@pytest.mark.parametrize("dup_first", [True, False])
def test_duplicate_json_keys_are_not_decided_by_the_last_one(tmp_path, caplog, count_computations, dup_first):
    model = make_tiny_llama()
    f = tmp_path / "k.json"
    kappatune.scan(model, cache=f, progress=False)
    data = json.loads(f.read_text())
    key = next(iter(data["entries"]))
    good = json.dumps(data["entries"][key])
    liar = json.dumps({**data["entries"][key], "kappa": 1.0, "sigma_max": 1.0, "sigma_min": 1.0})
    first, second = (liar, good) if dup_first else (good, liar)
    text = f.read_text().replace(json.dumps(key) + ":" + json.dumps(data["entries"][key], separators=(",", ":")),
                                 f"{json.dumps(key)}:{first},{json.dumps(key)}:{second}")
    assert text.count(json.dumps(key)) == 2
    f.write_text(text)
    count_computations.clear()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=f, progress=False)
    assert len(count_computations) == 1 and "duplicate" in caplog.text


@pytest.mark.parametrize("store", STORES)
def test_save_never_fails_the_scan_with_a_non_finite_value(tmp_path, store, caplog):
    c = KappaCache(cache_path(tmp_path, store))
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        c.put("a|matrix", kappa=float("nan"), sigma_max=float("nan"), sigma_min=1.0, shape=(2, 2), dtype="float32",
              layout="matrix")
        c.put("b|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
        assert c.save()
    assert "not storing" in caplog.text
    assert list(KappaCache(cache_path(tmp_path, store)).keys()) == ["b|matrix"]


def test_json_nan_literal_does_not_break_later_saves(tmp_path, count_computations):
    """Today's defect: a NaN literal was accepted on read and every later save raised ValueError."""
    model = make_tiny_llama()
    f = tmp_path / "k.json"
    kappatune.scan(model, cache=f, progress=False)
    data = json.loads(f.read_text())
    key = next(iter(data["entries"]))
    f.write_text(f.read_text().replace(json.dumps(key) + ":{", json.dumps(key) + ':{"extra":NaN,', 1))
    other = make_tiny_llama(seed=7)
    assert len(kappatune.scan(other, cache=f, progress=False)) == n_eligible(other)
    json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(c))  # the file is strict JSON again
    count_computations.clear()
    kappatune.scan(other, cache=f, progress=False)
    assert count_computations == []  # and the new model's entries were saved


@pytest.mark.parametrize("store", STORES)
def test_corrupt_file_warns_recomputes_and_is_kept_aside(tmp_path, store, caplog, count_computations):
    path = data_file(tmp_path, store)
    path.parent.mkdir(parents=True)
    garbage = ('{"format": "kappatune-kappa-cache", "schema_version": 1, "entries": {tru' if store == "json"
               else "this is not an SQLite database, but it has our file name" * 10)
    path.write_text(garbage)
    model = make_tiny_llama()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert len(count_computations) == n_eligible(model)
    assert len(KappaCache(cache_path(tmp_path, store))) == n_eligible(model)   # a fresh valid file
    aside = list(path.parent.glob(path.name + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == garbage                # the bad one kept, not lost


def test_deeply_nested_json_file_is_corrupt_not_a_crash(tmp_path, caplog):
    f = tmp_path / "k.json"
    f.write_text('{"format": "kappatune-kappa-cache", "schema_version": 1, "entries": ' + "[" * 100000
                 + "]" * 100000 + "}")
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert len(kappatune.scan(make_tiny_llama(), cache=f, progress=False)) > 0
    assert "corrupt" in caplog.text


def test_corrupt_files_moved_aside_in_the_same_second_keep_distinct_names(tmp_path):
    f = tmp_path / "k.json"
    for i in range(3):
        f.write_text("{broken %d" % i)
        c = KappaCache(f)
        c.put("a|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
        assert c.save()
    aside = sorted(p.read_text() for p in tmp_path.glob("k.json.corrupt-*"))
    assert aside == ["{broken 0", "{broken 1", "{broken 2"]


@pytest.mark.parametrize("store", STORES)
def test_malformed_entries_are_dropped(tmp_path, store, caplog, count_computations):
    model = make_tiny_llama()
    kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    key = next(iter(raw_entries(tmp_path, store)))
    set_raw(tmp_path, store, key, json.dumps({**raw_entries(tmp_path, store)[key], "kappa": "not a number"}))
    count_computations.clear()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(model, cache=cache_path(tmp_path, store), progress=False)
    assert "malformed" in caplog.text
    assert len(count_computations) == 1


@pytest.mark.parametrize("content", [
    '{"some": "other tool"}',
    '{"lm_head.weight": 1.0}',  # the reference kappaTune's condition_file
    json.dumps({"format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION + 1, "entries": {}}),
])
def test_foreign_or_newer_file_is_neither_used_nor_overwritten(tmp_path, caplog, content):
    path = tmp_path / "kappa_cache.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(make_tiny_llama(), cache=path, progress=False)
    assert len(table) > 0
    assert path.read_text() == content
    assert "not be overwritten" in caplog.text


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


def test_old_schema_is_ignored_and_rewritten(tmp_path, caplog):
    path = tmp_path / "kappa_cache.json"
    path.write_text(json.dumps({"format": CACHE_FORMAT, "schema_version": 0, "entries": {"x": {}}}))
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        kappatune.scan(make_tiny_llama(), cache=path, progress=False)
    assert "old schema" in caplog.text
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("store", STORES)
def test_unwritable_location_warns_and_scan_succeeds(tmp_path, store, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    cache = KappaCache(blocker / "sub" if store == "folder" else blocker / "sub" / "k.json")
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


# -- crash safety --------------------------------------------------------------------------------
def test_interrupted_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    model = make_tiny_llama()
    path = tmp_path / "kappa_cache.json"
    kappatune.scan(model, cache=path, progress=False)
    before = path.read_bytes()

    def crash(self, entries):
        import tempfile as tf

        fd, tmp = tf.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.write(fd, b'{"format": "kappatune-kappa-cache", "entr')   # half a file, then die
        os.close(fd)
        raise KeyboardInterrupt("simulated crash mid-write")

    real = cache_mod._JsonStore._write_atomic
    monkeypatch.setattr(cache_mod._JsonStore, "_write_atomic", crash)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.5)
    with pytest.raises(KeyboardInterrupt):
        kappatune.scan(model, cache=path, progress=False)
    assert path.read_bytes() == before
    monkeypatch.setattr(cache_mod._JsonStore, "_write_atomic", real)
    kappatune.scan(model, cache=path, progress=False)  # the next save removes what the crash left
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


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


@pytest.mark.parametrize("store", STORES)
def test_sigkill_mid_save_loses_nothing_committed(tmp_path, store):
    """Real SIGKILLs of a process saving in a loop: every save it reported is there, the file is valid,
    and no temporary file is left once the next save has run."""
    path = str(cache_path(tmp_path, store))
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
    if store == "folder":
        con = sqlite3.connect(str(data_file(tmp_path, store)))
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


@pytest.mark.parametrize("store", STORES)
def test_concurrent_writers_merge_every_entry(tmp_path, store):
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(cache_path(tmp_path, store)), w, 60, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = raw_entries(tmp_path, store)
    assert len(entries) == 4 * 60
    assert {f"w{w}-{i}|matrix" for w in range(4) for i in range(60)} == set(entries)


_HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sqlite3, sys, time
    path, kind = sys.argv[1], sys.argv[2]
    if kind == "json":
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    else:
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
""")


@pytest.mark.parametrize("store", STORES)
def test_a_held_lock_is_waited_for_with_a_message(tmp_path, store, caplog):
    c = KappaCache(cache_path(tmp_path, store))
    c.put("a|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
    assert c.save()
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_LOCK)
    p = subprocess.Popen([sys.executable, str(script), str(data_file(tmp_path, store)), store, "2.5"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    c.put("b|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=(2, 2), dtype="float32", layout="matrix")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert c.save()
    assert time.monotonic() - t0 > 1.0
    p.wait(10)
    assert "waiting" in caplog.text and str(data_file(tmp_path, store)) in caplog.text
    if store == "json":
        assert f"process {p.pid}" in caplog.text
    assert set(KappaCache(cache_path(tmp_path, store)).keys()) == {"a|matrix", "b|matrix"}


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


def test_digest_without_xxhash_is_blake2b(monkeypatch):
    """The fallback is a cryptographic 128-bit hash, not CRC-32 + Adler-32 (collisions crafted in a second)."""
    import builtins
    import hashlib

    real_import = builtins.__import__

    def no_xxhash(name, *a, **kw):
        if name == "xxhash":
            raise ImportError("no xxhash")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_xxhash)
    monkeypatch.setattr(cache_mod, "_DIGEST", None)
    x = torch.randn(16, 16)
    d = tensor_digest(x)
    monkeypatch.setattr(cache_mod, "_DIGEST", None)
    h = hashlib.blake2b(f"{x.dtype}|{tuple(x.shape)}|".encode(), digest_size=16)
    h.update(x.numpy().tobytes())
    assert d == "blake2b128:" + h.hexdigest()


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
