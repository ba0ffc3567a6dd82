"""The kappatune command line, run as a subprocess on checkpoints written here.

Independent invocations run concurrently (``_run_all``) to keep the python+torch start-up cost low.
"""

import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import kappatune
from kappatune import cli
from kappatune.cache import KappaCache

from .conftest import make_tiny_llama

yaml = pytest.importorskip("yaml")


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _run_all(*argvs, cwd=None):
    """Run ``python -m kappatune ARGS`` for each argv at once; [(returncode, stdout, stderr)]."""
    procs = [subprocess.Popen([sys.executable, "-m", "kappatune", *map(str, a)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env()) for a in argvs]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=180)
        out.append((p.returncode, so, se))
    return out


def _ok(res):
    rc, so, se = res
    assert rc == 0, f"exit {rc}\nstdout:\n{so}\nstderr:\n{se}"
    return so


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _shown(stdout):
    """(names marked *, {name: κ}) from a `kappatune show` table."""
    marked, kappas = [], {}
    for line in stdout.splitlines():
        m = re.match(r"^\s*\d+\s+(\S+)\s+\S+\s+[\d,]+\s+(\S+)\s*(\*?)\s*$", line)
        if m:
            kappas[m.group(1)] = float(m.group(2))
            if m.group(3):
                marked.append(m.group(1))
    return marked, kappas


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved by save_pretrained as a sharded float32 checkpoint (index + 2+ shards)."""
    model = make_tiny_llama(seed=3)
    d = tmp_path_factory.mktemp("llama_sharded")
    model.save_pretrained(d, max_shard_size="150KB")
    return model, d


def test_scan_sharded_then_show_plot_export(sharded, tmp_path, capsys):
    model, ckpt = sharded
    assert (ckpt / "model.safetensors.index.json").is_file()
    cache_dir = tmp_path / "cache"
    table_json = tmp_path / "table.json"
    doc = json.loads(_ok(_run_all(["scan", ckpt, "--cache-dir", cache_dir, "-o", table_json, "--json",
                                   "--no-progress"])[0]))
    assert len(doc["files"]) >= 2 and doc["summary"]["computed"] == len(doc["table"]["entries"])
    assert json.loads(table_json.read_text()) == doc

    # the numbers are the library's, under the names of named_parameters()
    table = kappatune.KappaTable.from_dict(doc["table"])
    ref = kappatune.scan(model, cache=False, progress=False)
    assert table.names == ref.names
    assert set(table.names) == {n for n, p in model.named_parameters() if p.ndim >= 2}
    for e in ref:
        assert table[e.name].kappa == pytest.approx(e.kappa, rel=1e-12)
    # the library reuses the CLI's cache for the loaded model: nothing is recomputed
    cache = KappaCache(cache_dir)
    kappatune.scan(model, cache=cache, progress=False)
    assert (cache.hits, cache.misses) == (len(table), 0)

    png = tmp_path / "kappa.png"
    show, axo, plot = _run_all(
        ["show", table_json, "--num-tensors", 5],
        ["export", table_json, "--top-fraction", 0.25, "--group-by", "kind", "--format", "axolotl"],
        ["plot", table_json, "--num-tensors", 5, "-o", png, "--dpi", 80],
    )
    marked, kappas = _shown(_ok(show))
    assert marked == ref.select(num_tensors=5)
    assert set(kappas) == set(ref.names)
    assert all(kappas[n] == pytest.approx(ref[n].kappa, rel=1e-4) for n in kappas)

    # Axolotl: anchored patterns; Axolotl reads every dot as a literal dot
    want = ref.select(top_fraction=0.25, group_by="kind")
    patterns = yaml.safe_load(_ok(axo))["unfrozen_parameters"]
    params = [n for n, _ in model.named_parameters()]
    as_axolotl = [re.compile(p.replace(".", r"\.")) for p in patterns]
    assert [[n for n in params if r.match(n)] for r in as_axolotl] == [[n] for n in want]
    assert all(re.fullmatch(p, n) for p, n in zip(patterns, want))

    # PEFT: LoRA lands on exactly the selected matrices
    peft = pytest.importorskip("peft")
    assert cli.main(["export", str(table_json), "--param-budget", "30%", "--format", "peft"]) == 0
    modules = json.loads(capsys.readouterr().out)
    want = ref.select(param_budget=0.3)
    assert modules == [n[: -len(".weight")] for n in want]
    lora = peft.get_peft_model(make_tiny_llama(seed=3), peft.LoraConfig(r=2, target_modules=modules))
    adapted = {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
               for n, _ in lora.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(modules)

    assert "wrote" in _ok(plot)
    from kappatune.plot import figure_size, kappa_grid

    grid = kappa_grid(table)
    w, h = figure_size(len(grid.rows), len(grid.cols))
    width, height = _png_size(png)
    assert abs(width - w * 80) <= 1 and abs(height - h * 80) <= 1
    assert png.stat().st_size > 10_000


def test_bf16_file_show_and_export_scan_through_the_cache(tmp_path, capsys):
    model = make_tiny_llama(seed=5, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    cache_dir = tmp_path / "cache"
    show = _ok(_run_all(["show", weights, "--num-tensors", 4, "--cache-dir", cache_dir, "--no-progress"])[0])
    ref = kappatune.scan(model, cache=False, progress=False)
    marked, kappas = _shown(show)
    assert marked == ref.select(num_tensors=4)
    assert all(kappas[n] == pytest.approx(ref[n].kappa, rel=1e-4) for n in ref.names)
    cache = KappaCache(cache_dir)
    kappatune.scan(model, cache=cache, progress=False)  # the bf16 model reuses the bf16 checkpoint's κ
    assert (cache.hits, cache.misses) == (len(ref), 0)
    # export straight from the model folder (warm cache), selection restricted to the MLP
    assert cli.main(["export", str(tmp_path / "m"), "--cache-dir", str(cache_dir), "--max-kappa", "1e9",
                     "--include", r"mlp\.", "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    mlp = [n for n in ref.names if "mlp." in n]
    assert exported["selected"] == mlp and exported["analysed_tensors"] == len(mlp)
    assert [t["kappa"] for t in exported["tensors"]] == pytest.approx([ref[n].kappa for n in mlp], rel=1e-12)


def test_bad_input_one_line_and_nonzero_exit(tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "config.json").write_text("{}")
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8, 8)}, str(good))
    (tmp_path / "corrupt.safetensors").write_bytes(good.read_bytes()[:-7])
    (tmp_path / "notes.txt").write_text("not a tensor file\n")
    cases = {
        "missing": (["scan", tmp_path / "no_such_model"], "no_such_model: no such file or folder"),
        "no weights": (["show", tmp_path / "empty_model"], "empty_model: folder has no .safetensors weights"),
        "corrupt": (["scan", tmp_path / "corrupt.safetensors"], "corrupt.safetensors: not a valid safetensors"),
        "not tensors": (["export", tmp_path / "notes.txt", "--num-tensors", 1, "--format", "names"],
                        "notes.txt: not a valid safetensors file"),
    }
    results = _run_all(*[argv for argv, _ in cases.values()], cwd=tmp_path)
    for (what, (_, expected)), (rc, so, se) in zip(cases.items(), results):
        lines = se.strip().splitlines()
        assert rc == 2, (what, rc, se)
        assert len(lines) == 1 and lines[0].startswith("kappatune: error: ") and expected in lines[0], (what, se)
        assert "Traceback" not in se and so == "", what


def test_in_process_formats_and_argument_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {f"model.layers.{i}.mlp.{k}.weight": torch.randn(12, 8) for i in range(3) for k in ("up_proj", "down_proj")}
    sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.randn(2, 8, 6)
    save_file(sd, str(tmp_path / "w.safetensors"))
    saved = tmp_path / "t.json"
    assert cli.main(["scan", str(tmp_path / "w.safetensors"), "--no-cache", "-o", str(saved), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "analysed 7 tensors" in out and "0 from the cache, 7 computed" in out and "lowest κ (3 of 7)" in out
    table = cli.read_scan(saved)[0]

    assert cli.main(["export", str(saved), "--num-tensors", "3", "--format", "names"]) == 0
    assert capsys.readouterr().out.splitlines() == table.names[:3]
    # a selected fused expert parameter is not a module weight: PEFT gets the rest, with a warning
    assert cli.main(["export", str(saved), "--max-kappa", "1e12", "--format", "peft"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == [n[:-7] for n in table.names if n.endswith(".weight")]
    assert "target_parameters" in cap.err and "experts.gate_up_proj" in cap.err
    assert cli.main(["export", str(saved), "--num-tensors", "2", "--format", "json", "-o", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["selected"] == table.names[:2]

    svg = tmp_path / "k.svg"
    assert cli.main(["plot", str(saved), "--top-fraction", "0.5", "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000]

    (tmp_path / "other.json").write_text('{"format": "something else"}')
    errors = [
        (["plot", str(tmp_path / "other.json"), "-o", str(tmp_path / "k.png")], "other.json: not a kappatune scan"),
        (["export", str(saved), "--format", "names"], "give a selection policy"),
        (["show", str(saved), "--num-tensors", "2", "--max-kappa", "3"], "only one selection policy"),
        (["show", str(saved), "--max-dim", "10"], "--max-dim only applies when scanning"),
        (["show", str(saved), "--include", "("], "invalid regular expression"),
        (["show", str(saved), "--include", "attn"], "no tensor of the 7"),
        (["export", str(saved), "--max-kappa", "1e-3", "--format", "names"], "no tensor has κ <= 0.001"),
        (["plot", str(saved), "-o", str(tmp_path / "k.gif")], "ending in .png, .svg, .pdf"),
    ]
    for argv, msg in errors:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("kappatune: error: ") and msg in err and err.count("\n") == 1, (argv, err)
    for cmd in ("scan", "show", "plot", "export"):
        with pytest.raises(SystemExit) as exc:
            cli.main([cmd, "--help"])
        assert exc.value.code == 0
        assert "--include" in capsys.readouterr().out


def test_workers_reach_the_scan_and_change_no_value(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    import importlib

    scan_mod = importlib.import_module("kappatune.pipeline")   # the module (kappatune.scan is the function)
    torch.manual_seed(0)
    save_file({f"layers.{i}.w": torch.randn(24, 16) for i in range(6)}, str(tmp_path / "w.safetensors"))
    seen = []
    real = scan_mod.resolve_workers
    monkeypatch.setattr(scan_mod, "resolve_workers", lambda n=None: seen.append(n) or real(n))
    docs = {}
    for w in ("1", "3"):
        out = tmp_path / f"t{w}.json"
        assert cli.main(["scan", str(tmp_path / "w.safetensors"), "--no-cache", "--workers", w, "-o", str(out)]) == 0
        docs[w] = json.loads(out.read_text())
    assert 1 in seen and 3 in seen
    assert docs["1"]["summary"]["workers"] == 1 and docs["3"]["summary"]["workers"] == 3
    assert docs["1"]["table"] == docs["3"]["table"]                   # the same κ values, bit for bit
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["scan", str(tmp_path / "w.safetensors"), "--no-cache", "--workers", "0"])
    assert exc.value.code == 2
    assert "argument --workers: expected a whole number >= 1" in capsys.readouterr().err
    assert cli.main(["show", str(tmp_path / "t1.json"), "--workers", "2"]) == 2   # a saved scan: refused
    assert "--workers only applies when scanning a checkpoint" in capsys.readouterr().err


def test_default_cache_dir_is_the_librarys(tmp_path):
    """The command line uses kappatune.cache.default_cache_dir(), wherever it runs (no ./cache rule)."""
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "README.md").write_text("κ cache of kappatune runs\n")
    env = _env()
    env.pop("KAPPATUNE_CACHE_DIR", None)
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    p = subprocess.run([sys.executable, "-m", "kappatune", "scan", "w.safetensors", "--json"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["summary"]["cache"] == str(tmp_path / "xdg" / "kappatune" / "kappa_cache.sqlite")
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / "README.md"]


# -- -o writes into what it should not replace ----------------------------------------------------
@pytest.fixture(scope="module")
def saved_scan(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    save_file({f"l{i}.weight": torch.randn(6, 5) for i in range(3)}, str(d / "w.safetensors"))
    assert cli.main(["scan", str(d / "w.safetensors"), "--no-cache", "-o", str(d / "t.json")]) == 0
    return d / "t.json"


def _export(saved, out, *extra):
    return _run_all(["export", saved, "--num-tensors", 2, "--format", "names", "-o", out, *extra])[0]


def test_output_onto_a_fifo_writes_into_it(saved_scan, tmp_path):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    _ok(_export(saved_scan, fifo))
    reader.join(30)
    assert got == ["l0.weight\nl2.weight\n"] or len(got[0].splitlines()) == 2
    assert stat_is(fifo, "FIFO")


def stat_is(path, kind):
    import stat as st

    mode = os.lstat(path).st_mode
    return {"FIFO": st.S_ISFIFO, "CHR": st.S_ISCHR, "LNK": st.S_ISLNK, "REG": st.S_ISREG}[kind](mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a character device needs root")
def test_output_onto_a_device_writes_into_it(saved_scan, tmp_path):
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    _ok(_export(saved_scan, dev))
    assert stat_is(dev, "CHR")  # today's code turned it into a regular file


def test_output_to_stdout_and_to_an_inherited_descriptor(saved_scan, tmp_path):
    p = subprocess.run([sys.executable, "-m", "kappatune", "export", str(saved_scan), "--num-tensors", "2",
                        "--format", "names", "-o", "/dev/stdout"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2, p.stderr
    r, w = os.pipe()  # what the shell's `-o >(jq .)` passes: /dev/fd/N
    proc = subprocess.Popen([sys.executable, "-m", "kappatune", "export", str(saved_scan), "--num-tensors", "2",
                             "--format", "json", "-o", f"/dev/fd/{w}"], pass_fds=(w,), env=_env(),
                            stderr=subprocess.PIPE)
    os.close(w)
    with os.fdopen(r) as f:
        doc = json.loads(f.read())
    assert proc.wait(120) == 0 and doc["num_selected"] == 2


def test_output_never_follows_a_planted_temp_link_and_keeps_links(saved_scan, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out.txt"
    os.symlink(victim, tmp_path / "out.txt.tmp")  # what today's code wrote through
    _ok(_export(saved_scan, out))
    assert victim.read_text() == "precious\n"
    assert stat_is(out, "REG") and len(out.read_text().splitlines()) == 2
    # -o a link to a regular file: the link stays, its target gets the new content
    target = tmp_path / "real.txt"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "link.txt"
    os.symlink(target, link)
    _ok(_export(saved_scan, link))
    assert stat_is(link, "LNK") and len(target.read_text().splitlines()) == 2
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o640)  # the file's mode is kept
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp") and p.name != "out.txt.tmp"] == []


def test_output_temp_file_is_removed_on_failure(saved_scan, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.txt"

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    assert cli.main(["export", str(saved_scan), "--num-tensors", "1", "--format", "names", "-o", str(out)]) == 2
    monkeypatch.undo()
    assert "No space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_new_output_file_honours_the_umask(saved_scan, tmp_path):
    old = os.umask(0o027)
    try:
        assert cli.main(["export", str(saved_scan), "--num-tensors", "1", "--format", "names", "-o",
                         str(tmp_path / "n.txt")]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "n.txt").st_mode & 0o777) == oct(0o640)


# -- bad input: one line, exit 2 -------------------------------------------------------------------
def test_malformed_inputs_give_one_line_and_exit_2(saved_scan, tmp_path, capsys):
    doc = json.loads(saved_scan.read_text())
    e0 = doc["table"]["entries"][0]
    variants = {
        "negative numel": {**doc, "table": {**doc["table"], "entries": [{**e0, "numel": -30}]}},
        "entries a list of lists": {**doc, "table": {**doc["table"], "entries": [[1, 2]]}},
        "entries not a list": {**doc, "table": {**doc["table"], "entries": {"a": 1}}},
        "no source": {k: v for k, v in doc.items() if k != "source"},
        "kappa true": {**doc, "table": {**doc["table"], "entries": [{**e0, "kappa": True}]}},
    }
    for label, bad in variants.items():
        f = tmp_path / f"{label.replace(' ', '_')}.json"
        f.write_text(json.dumps(bad))
        capsys.readouterr()
        assert cli.main(["show", str(f)]) == 2, label
        err = capsys.readouterr().err
        assert err.startswith("kappatune: error: ") and err.count("\n") == 1, (label, err)
        assert "malformed scan result" in err and "unexpected" not in err, (label, err)
    with pytest.raises(SystemExit) as exc:
        cli.main(["scan", str(saved_scan), "--top", "-1"])
    assert exc.value.code == 2 and "--top: expected a whole number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["show", str(saved_scan), "--top", "-1"])
    assert exc.value.code == 2


def test_bad_checkpoints_give_one_line_and_exit_2_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    esc = tmp_path / "esc"
    esc.mkdir()
    (esc / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    cases = {
        "fifo": (["scan", tmp_path / "fifo.safetensors"], "is a FIFO"),
        "empty index": (["scan", ckpt], "weight_map is empty"),
        "escaping shard": (["show", esc], "outside the checkpoint folder"),
    }
    results = _run_all(*[argv for argv, _ in cases.values()])
    for (what, (_, expected)), (rc, so, se) in zip(cases.items(), results):
        assert rc == 2 and expected in se and se.count("\n") == 1 and "Traceback" not in se, (what, rc, se)


# -- start-up and progress -------------------------------------------------------------------------
def test_help_and_argument_errors_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from kappatune.cli import main
        for argv in (["--help"], ["scan", "--help"], ["scan"], ["show", "x.json", "--top", "-1"], ["--version"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = sorted(m for m in ("torch", "numpy", "safetensors", "transformers") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path):
    from safetensors.torch import save_file

    pytest.importorskip("tqdm")
    save_file({f"l{i}.weight": torch.randn(8, 8) for i in range(3)}, str(tmp_path / "w.safetensors"))
    auto, forced = _run_all(["scan", tmp_path / "w.safetensors", "--no-cache"],
                            ["scan", tmp_path / "w.safetensors", "--no-cache", "--progress"])
    _ok(auto)
    _ok(forced)
    assert "\r" not in auto[2] and "κ scan" not in auto[2]
    assert "κ scan" in forced[2]


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_a_bad_pattern_is_named_as_the_flag_when_scanning_a_checkpoint(sharded, capsys, flag):
    _, ckpt = sharded
    assert cli.main(["show", str(ckpt), flag, "(", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kappatune: error: {flag}: invalid regular expression") and err.count("\n") == 1


@pytest.mark.parametrize("argv, msg", [
    (["scan"], "kappatune scan: error: the following arguments are required: PATH"),
    (["bogus"], "kappatune: error: argument COMMAND: invalid choice: 'bogus'"),
    (["study", "--steps", "0"], "kappatune study: error: argument --steps: expected a whole number >= 1"),
    (["show", "x", "--top-fraction", "abc"], "kappatune show: error: argument --top-fraction"),
])
def test_argument_errors_are_one_line_with_exit_2(capsys, argv, msg):
    """argparse's own errors read like the command's: one line, where the help is, exit status 2."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(msg) and err.count("\n") == 1 and "--help" in err and "usage:" not in err
