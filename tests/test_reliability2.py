"""Issue 24, "Reliability, second pass": one test (or a few) per point, each failing on the code before it.

1. a cache on a read-only mount or another user's folder is read, and says once that nothing is saved;
2. a symbolic link at a file the cache creates is never followed;
3. a row that is not a valid entry (a table made by hand) never fails a scan;
4. errors say what happened (a full disk, a checkpoint the user may not read, a saved scan nested
   too deeply);
5. ``-o`` never replaces what stdout goes to;
6. a tied tensor is frozen or trained as one; a plain optimizer state dict that cannot fit is
   refused at load; ``names=`` takes any iterable;
7. float8 weights are analysed by ``scan(model)`` and by the checkpoint reader alike.

Tests that need another user run a forked child that drops to ``nobody`` (root is not stopped by
``chmod``; a fork rather than a subprocess because the interpreter may live where ``nobody`` may not
execute it, so everything the child uses is imported before the fork).
"""

import contextlib
import io
import json
import logging
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse  # noqa: F401 - used by the cache in a forked child, which may not import it
from pathlib import Path

import pytest
import torch

import kappatune
from kappatune import cli
from kappatune.cache import KappaCache, tensor_digest
from kappatune.checkpoint import CheckpointError, checkpoint_refs, scan_checkpoint
from kappatune.resolve import resolve_selection
from kappatune.selection import SelectionPolicy

from .conftest import make_tiny_llama

safetensors_torch = pytest.importorskip("safetensors.torch")




def small_model(n=3, seed=0):
    torch.manual_seed(seed)
    return {f"l{i}.weight": torch.randn(12, 8) for i in range(n)}


def keys_of(model):
    return [KappaCache.key(tensor_digest(t), "matrix") for t in model.values()]


def cache_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("kappatune") and r.levelno >= logging.WARNING]


# -- another user, a world-traversable folder -------------------------------------------------------
def as_nobody(fn):
    """``fn()`` run in a forked child as the user ``nobody``; returns what it returns (JSON-able).

    The child's kappatune log (warnings) comes back as ``result["log"]`` when ``fn`` returns a dict.
    """
    if not hasattr(os, "fork") or os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    tensor_digest(torch.zeros(1))  # import the digest (xxhash) now: nobody may not read site-packages
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        out = json.dumps({"error": "the child did not finish"})
        try:
            os.close(r)
            records = []
            handler = logging.Handler()
            handler.emit = lambda rec: records.append(rec.getMessage())
            logging.getLogger("kappatune").addHandler(handler)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            res = fn()
            if isinstance(res, dict):
                res["log"] = records
            out = json.dumps({"ok": res})
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = json.dumps({"error": f"{type(e).__name__}: {e}"})
        finally:
            data = out.encode()
            while data:
                data = data[os.write(w, data):]
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    res = json.loads(raw)
    assert "error" not in res, res["error"]
    return res["ok"]


@pytest.fixture
def shared_tmp():
    """A folder every user may enter (pytest's own tmp folders are 0700, root's)."""
    d = Path(tempfile.mkdtemp(prefix="kappatune-issue24-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for root, dirs, _ in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o755)
    shutil.rmtree(d, ignore_errors=True)


# -- 1. read-only caches --------------------------------------------------------------------------
@pytest.mark.parametrize("writer_open", [False, True], ids=["closed", "a-writer-has-it-open"])
def test_a_cache_in_a_folder_another_user_may_not_write_is_read(shared_tmp, writer_open):
    model = small_model()
    folder = shared_tmp / "c"
    owner = KappaCache(folder)
    kappatune.scan(model, cache=owner, progress=False)
    if not writer_open:
        owner.clear_memory()  # connection closed: SQLite removes the -wal and -shm files
    os.chmod(folder, 0o555)
    keys = keys_of(model)
    before = sorted(os.listdir(folder))

    def child():
        c = KappaCache(folder)
        got = c.get_many(keys, shapes=[(12, 8)] * 3, dtypes=["float32"] * 3)
        c.put("new|matrix", kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[4, 4], dtype="float32", layout="matrix")
        saved = c.save()
        again = len(c.get_many(keys))
        return {"hits": len(got), "again": again, "saved": saved}

    res = as_nobody(child)
    assert res["hits"] == 3 and res["again"] == 3  # today: 0, every κ recomputed
    assert res["saved"] is False
    warned = [m for m in res["log"] if "will not be saved" in m]
    assert len(warned) == 1 and "may not be written" in warned[0] and str(folder) in warned[0], res["log"]
    assert not [m for m in res["log"] if m not in warned], res["log"]
    assert sorted(os.listdir(folder)) == before


def test_a_cache_on_a_read_only_mount_is_read(tmp_path, caplog, count_computations):
    model = small_model()
    src, ro = tmp_path / "src", tmp_path / "ro"
    kappatune.scan(model, cache=src, progress=False)
    ro.mkdir()
    try:
        p = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True, text=True)
    except OSError:
        pytest.skip("no mount command")
    if p.returncode != 0:
        pytest.skip(f"a read-only bind mount is not permitted here: {p.stderr.strip()}")
    try:
        count_computations.clear()
        cache = KappaCache(ro)
        with caplog.at_level(logging.WARNING, logger="kappatune"):
            t1 = kappatune.scan(model, cache=cache, progress=False)
            t2 = kappatune.scan(small_model(seed=1), cache=cache, progress=False)  # new values: not saved
        assert sorted(count_computations) == sorted(small_model(seed=1))  # the first scan was all hits
        assert len(t1) == len(t2) == 3
        warned = cache_warnings(caplog)
        assert len(warned) == 1, warned
        assert "read-only file system" in warned[0] and "will not be saved" in warned[0]
    finally:
        with contextlib.suppress(NameError):
            cache.clear_memory()  # closes the database: an open file keeps the mount busy
        if subprocess.run(["umount", str(ro)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)  # never leave a mount behind
    assert sorted(os.listdir(src)) == ["kappa_cache.sqlite"]


# -- 2. symbolic links ----------------------------------------------------------------------------
@pytest.mark.parametrize("link", ["kappa_cache.sqlite", "kappa_cache.sqlite-wal", "kappa_cache.sqlite-shm",
                                  "kappa_cache.sqlite-journal", "kappa_cache.sqlite.lock", "k.sqlite", "k.sqlite.lock"])
def test_a_link_at_a_file_the_cache_creates_is_never_followed(tmp_path, caplog, link, count_computations):
    folder = tmp_path / "c"
    folder.mkdir()
    outside = tmp_path / "elsewhere" / "victim"
    outside.parent.mkdir()
    os.symlink(outside, folder / link)  # dangling
    path = folder / "k.sqlite" if link.startswith("k.sqlite") else folder
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(small_model(), cache=path, progress=False)
    assert len(table) == 3 and len(count_computations) == 3
    assert not os.path.lexists(outside) and os.listdir(outside.parent) == []  # today: created there
    assert os.path.islink(folder / link)
    warned = cache_warnings(caplog)
    assert len(warned) == 1 and str(folder / link) in warned[0] and "symbolic link" in warned[0], warned
    assert sorted(os.listdir(folder)) == [link]  # nothing else made either


# -- 3. rows that are not entries -------------------------------------------------------------------
def test_rows_of_a_table_made_by_hand_without_text_affinity_never_fail_a_scan(tmp_path, caplog, count_computations):
    model = small_model(4)
    good = tmp_path / "good"
    kappatune.scan(model, cache=good, progress=False)
    con = sqlite3.connect(str(good / "kappa_cache.sqlite"))
    rows = dict(con.execute("SELECT key, entry FROM entries"))
    con.close()
    db = tmp_path / "hand" / "kappa_cache.sqlite"
    db.parent.mkdir()
    con = sqlite3.connect(str(db))
    with con:
        con.execute("CREATE TABLE meta (k, v)")  # no declared types: values keep their own
        con.execute("CREATE TABLE entries (key PRIMARY KEY, entry)")
        con.execute("INSERT INTO meta VALUES ('format', 'kappatune-kappa-cache'), ('schema_version', 1)")
        bad = [3, 2.5, None, b"\x00\x01"]
        for (k, _), v in zip(sorted(rows.items()), bad):
            con.execute("INSERT INTO entries VALUES (?, ?)", (k, v))
        con.execute("INSERT INTO entries VALUES (?, ?)", (7, "{}"))  # a key that is not text
    con.close()
    count_computations.clear()
    cache = KappaCache(db.parent)
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        table = kappatune.scan(model, cache=cache, progress=False)  # today: TypeError
    assert len(table) == 4 and len(count_computations) == 4
    warned = cache_warnings(caplog)
    assert len(warned) == 1 and "not as JSON text" in warned[0], warned
    assert set(cache.keys()) == set(rows)  # the fresh values replaced the bad rows; the int key is not listed
    count_computations.clear()
    kappatune.scan(model, cache=KappaCache(db.parent), progress=False)
    assert count_computations == []


# -- 4. errors say what happened ---------------------------------------------------------------------
def test_a_full_disk_is_reported_as_such(tmp_path, caplog):
    cache = KappaCache(tmp_path / "c")
    e = dict(kappa=2.0, sigma_max=2.0, sigma_min=1.0, shape=[4, 4], dtype="float32", layout="matrix")
    cache.put("first|matrix", **e)
    assert cache.save()
    con = cache._sql.connect()
    con.execute(f"PRAGMA max_page_count={con.execute('PRAGMA page_count').fetchone()[0]}")  # SQLITE_FULL
    for i in range(400):
        cache.put(f"k{i}|matrix", **e, name="x" * 60)
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        assert cache.save() is False
    text = " ".join(cache_warnings(caplog))
    assert "database or disk is full" in text and "cannot rollback" not in text, text
    assert list(KappaCache(tmp_path / "c").keys()) == ["first|matrix"]


def test_a_checkpoint_the_user_may_not_read_is_reported_as_permission_denied(shared_tmp, capsys):
    folder = shared_tmp / "m"
    folder.mkdir()
    f = folder / "model.safetensors"
    safetensors_torch.save_file({"a.weight": torch.randn(4, 4)}, str(f))
    assert cli.main(["scan", str(f), "--no-cache"]) == 0  # imports what the command needs (nobody may not)
    capsys.readouterr()
    os.chmod(f, 0o600)  # root's; nobody may not read it

    def child():
        out = {}
        try:
            checkpoint_refs(folder)
        except CheckpointError as e:
            out["library"] = str(e)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out["rc"] = cli.main(["scan", str(f), "--no-cache"])
        out["cli"] = err.getvalue()
        return out

    res = as_nobody(child)
    assert "permission denied" in res["library"] and str(f) in res["library"], res
    assert "No such file" not in res["library"]
    assert res["rc"] == 2 and res["cli"].count("\n") == 1 and "permission denied" in res["cli"], res


@pytest.mark.parametrize("command", ["show", "export", "scan"])
def test_a_saved_scan_nested_too_deeply_is_one_line_exit_2(tmp_path, capsys, command):
    f = tmp_path / "deep.json"
    f.write_text('{"format": "kappatune-scan", "version": 1, "table": ' + "[" * 100_000 + "]" * 100_000 + "}")
    argv = [command, str(f)] + (["--num-tensors", "1", "--format", "names"] if command == "export" else [])
    assert cli.main(argv) == 2  # today: 1, "unexpected RecursionError"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested too deeply" in err and str(f) in err, err


# -- 5. -o never replaces stdout -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["link to /proc/self/fd/1", "the file stdout goes to"])
def test_output_that_is_stdout_is_written_through_it(tmp_path, how):
    if not os.path.exists("/proc/self/fd/1"):
        pytest.skip("no /proc")
    ck = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    safetensors_torch.save_file({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)}, str(ck))
    log = tmp_path / "log.txt"
    if how.startswith("link"):
        target = tmp_path / "out.json"
        os.symlink("/proc/self/fd/1", target)
    else:
        target = log
    with open(log, "wb") as out:
        ino = os.fstat(out.fileno()).st_ino
        p = subprocess.run([sys.executable, "-m", "kappatune", "scan", str(ck), "--no-cache", "-o", str(target)],
                           stdout=out, stderr=subprocess.PIPE, text=True, timeout=180,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    assert os.stat(log).st_ino == ino  # not replaced
    text = log.read_text()
    assert text.startswith("{") and '"format": "kappatune-scan"' in text
    assert "analysed 2 tensors" in text and "lowest κ" in text  # printed after the JSON: today lost


# -- 6. tied tensors, plain state dicts, names= ---------------------------------------------------------
def tied_llama():
    m = make_tiny_llama()
    m.lm_head.weight = m.model.embed_tokens.weight
    return m


def test_excluding_one_name_of_a_tied_tensor_freezes_it(caplog):
    model = tied_llama()
    embed = model.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="kappatune"):
        opt = kappatune.KappaTuneOptimizer(model, torch.optim.SGD, max_kappa=float("inf"), exclude=["lm_head"],
                                           cache=None, progress=False, lr=0.1)
    assert not embed.requires_grad  # today: trained through its other name
    assert all(p is not embed for g in opt.param_groups for p in g["params"])
    assert "model.embed_tokens.weight" not in opt.selected and "lm_head.weight" not in opt.selected
    warned = [m for m in cache_warnings(caplog) if "tied" in m]
    assert len(warned) == 1 and "model.embed_tokens.weight" in warned[0] and "lm_head.weight" in warned[0]
    before = embed.detach().clone()
    x = torch.randint(0, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert torch.equal(embed, before)


def test_including_one_name_of_a_tied_tensor_selects_it_once():
    model = tied_llama()
    sel = resolve_selection(model, SelectionPolicy(max_kappa=float("inf")), include=["lm_head"], cache=None,
                            progress=False)
    assert sel.names == ["model.embed_tokens.weight"]  # today: "nothing selectable"
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.SGD, num_tensors=5, include="lm_head", cache=None,
                                       progress=False, lr=0.1)
    assert [p for g in opt.param_groups for p in g["params"]] == [model.lm_head.weight]
    table = kappatune.scan(model, cache=None, progress=False)  # the same rule for a given table
    sel = resolve_selection(model, SelectionPolicy(num_tensors=3), exclude="lm_head", table=table)
    assert "model.embed_tokens.weight" not in sel.names and len(sel.names) == 3


def test_names_may_be_any_iterable():
    model = make_tiny_llama()
    wanted = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    opt = kappatune.KappaTuneOptimizer(model, torch.optim.SGD, names=(n for n in wanted), cache=None, lr=0.1)
    assert sorted(opt.selected) == sorted(wanted)  # today: "names= is empty"
    assert sorted(resolve_selection(model, names=iter(wanted), cache=None).names) == sorted(wanted)


def _plain_state(model, names):
    by = dict(model.named_parameters())
    inner = torch.optim.AdamW([by[n] for n in names], lr=1e-3)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    inner.step()
    return inner.state_dict()


def test_a_plain_state_dict_of_another_model_is_refused_at_load():
    a = make_tiny_llama(hidden=64, vocab=64)
    b = make_tiny_llama(hidden=32, vocab=64)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    sd = _plain_state(a, names)
    opt = kappatune.KappaTuneOptimizer(b, torch.optim.AdamW, names=names, cache=None, lr=1e-3)
    flags = {n: p.requires_grad for n, p in b.named_parameters()}
    with pytest.raises(ValueError, match=r"no kappatune selection.*'exp_avg'.*q_proj.weight.*\(32, 32\)"):
        opt.load_state_dict(sd)  # today: a warning, then step() crashes
    assert opt.state == {} and {n: p.requires_grad for n, p in b.named_parameters()} == flags
    with pytest.raises(ValueError, match=r"no kappatune selection.*hold \[1\] tensor.*\[2\]"):
        opt.load_state_dict(_plain_state(a, names[:1]))
    # a plain state dict of the same tensors still loads, and steps
    ok = kappatune.KappaTuneOptimizer(a, torch.optim.AdamW, names=names, cache=None, lr=1e-3)
    ok.load_state_dict(sd)
    x = torch.randint(0, 64, (2, 8))
    a(input_ids=x, labels=x).loss.backward()
    ok.step()


# -- 7. float8: one rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_analysed_by_the_model_scan_and_the_checkpoint_reader_alike(tmp_path, dtype):
    torch.manual_seed(0)
    w = torch.randn(24, 16).to(dtype)
    sd = {"q.weight": w, "k.weight": torch.randn(16, 16).to(dtype)}
    f = tmp_path / "f8.safetensors"
    safetensors_torch.save_file(sd, str(f))
    cache = KappaCache(tmp_path / "c")
    from_disk = scan_checkpoint(f, cache=cache, progress=False)  # today: both skipped, "not floating point"
    assert sorted(from_disk.names) == ["k.weight", "q.weight"] and from_disk.skipped == {}
    s = torch.linalg.svdvals(w.to(torch.float64))
    assert from_disk["q.weight"].kappa == pytest.approx((s[0] / s[-1]).item(), rel=1e-6)
    assert from_disk["q.weight"].dtype == str(dtype).replace("torch.", "")
    warm = KappaCache(tmp_path / "c")
    from_model = kappatune.scan(sd, cache=warm, progress=False)
    assert warm.hits == 2 and warm.misses == 0  # the same entries
    assert from_model.to_dict() == from_disk.to_dict()
