"""The kappatune command line, run as a subprocess on checkpoints written here.

Independent invocations run concurrently (``_run_all``) to keep the python+torch start-up cost low.
"""

import json
import os
import re
import struct
import subprocess
import sys

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


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KAPPATUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.default_cli_cache_dir() == tmp_path / "xdg" / "kappatune"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "README.md").write_text("κ cache of kappatune runs\n")
    assert cli.default_cli_cache_dir().resolve() == (tmp_path / "cache").resolve()
    monkeypatch.setenv("KAPPATUNE_CACHE_DIR", str(tmp_path / "env"))
    assert cli.default_cli_cache_dir() == tmp_path / "env"
