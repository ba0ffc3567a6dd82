"""The forgetting study v2's record and design: its report and its generated page written again from its
committed run files by the package (``kappatune.study.v2``) give the committed ones, every number and every
byte; its design in the study vocabulary (``v2_study.json``, ``v2_long_study.json``) is v2's; and
``benchmarks/forgetting.py`` is a preset of ``kappatune study`` that runs it."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from kappatune.study import config as sc
from kappatune.study import stats as st
from kappatune.study import v2
from kappatune.study.folder import FolderError
from kappatune.study.plan import plan

ROOT = Path(__file__).resolve().parent.parent
V2 = ROOT / "benchmarks" / "results" / "forgetting_v2"
sys.path.insert(0, str(ROOT / "benchmarks"))

import forgetting  # noqa: E402
import make_docs  # noqa: E402


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """A copy of the v2 record whose report the package has written again (the figures as they are), by
    ``python benchmarks/forgetting.py --v2-report DIR``."""
    results = tmp_path_factory.mktemp("v2") / "results"
    out = results / "forgetting_v2"
    shutil.copytree(V2, out)
    (out / "results.md").unlink()
    (out / "summary.json").unlink()
    assert forgetting.main(["--v2-report", str(out), "--no-plot"]) == 0
    return out


def test_v2_report_is_written_again_by_the_package_to_the_byte(regenerated):
    assert (regenerated / "results.md").read_bytes() == (V2 / "results.md").read_bytes()
    assert (regenerated / "summary.json").read_bytes() == (V2 / "summary.json").read_bytes()
    s = json.loads((regenerated / "summary.json").read_text())
    assert s["monte_carlo"]["B"] == 16000 and s["monte_carlo"]["stable"]        # raised until no verdict can flip
    assert s["finished_runs"] == sorted(p.stem for p in (V2 / "runs").glob("*.json"))


def test_the_generated_page_is_the_regenerated_report(regenerated):
    slug, page, files, _ = make_docs.render_page(regenerated / "results.md", regenerated.parent)
    assert slug == "forgetting_v2"
    assert page == (ROOT / "docs" / "benchmarks" / "forgetting_v2.md").read_text(encoding="utf-8")
    for rel, content in files.items():
        assert (ROOT / "docs" / "benchmarks" / rel).read_bytes() == content


def test_v2_record_is_read_as_written_and_an_altered_one_is_refused(tmp_path):
    cfg = v2.read_design(V2)
    assert cfg.fingerprint() == "b1c3bad9b637" == json.loads((V2 / "config.json").read_text())["fingerprint"]
    runs = v2.load_runs(V2, cfg)
    missing, waiting, chosen = v2.plan(cfg, runs)
    assert not missing and not waiting and len(runs) == 50
    assert chosen == json.loads((V2 / "summary.json").read_text())["chosen_lr"]
    out = tmp_path / "v2"
    shutil.copytree(V2, out)
    r = json.loads((out / "runs" / "main_lora_s1_lr0.0005.json").read_text())
    r["config_fingerprint"] = "0" * 12
    (out / "runs" / "main_lora_s1_lr0.0005.json").write_text(json.dumps(r))
    with pytest.raises(FolderError, match="other study settings"):
        v2.write_report(out, plots=False)
    d = json.loads((out / "config.json").read_text())
    d["steps"] = 121
    (out / "config.json").write_text(json.dumps(d))
    with pytest.raises(FolderError, match="not that of its settings"):
        v2.read_design(out)


def test_v2_study_files_declare_v2s_design():
    d = json.loads((V2 / "config.json").read_text())
    main, long_ = sc.load_study(V2 / "v2_study.json"), sc.load_study(V2 / "v2_long_study.json")
    for cfg, arms, steps in ((main, d["arms"], d["steps"]), (long_, d["long_arms"], d["long_steps"])):
        assert [a.name for a in cfg.arms] == [a.kind for a in cfg.arms] == arms
        assert {a.name: list(a.lrs) for a in cfg.arms} == {a: d["lrs"][a] for a in arms}
        assert all(a.decays == (0.0,) and a.weight_decay is None and a.schedule is None for a in cfg.arms)
        assert cfg.budget == {"param_budget": d["budget"]} and list(cfg.seeds) == d["seeds"] and cfg.steps == steps
        assert list(cfg.eval_at) == list(range(0, steps + 1, d["eval_every"]))
        for k in ("batch", "seq_len", "curve_windows", "final_windows", "eval_batch", "held_out", "data_seed",
                  "weight_decay", "grad_clip", "lora_alpha_over_r", "max_dim", "precision"):
            assert getattr(cfg, k) == d[k], k
        assert cfg.schedule == "constant" and cfg.model == "smollm2" and cfg.exclude == sc.EMBEDDINGS
        assert cfg.reference == "kappa_low" and cfg.verdict_on == "bootstrap" and cfg.alpha == v2.ALPHA
        assert (cfg.bootstrap_seed, cfg.bootstrap_start, cfg.bootstrap_max) == (12345, v2.PREREGISTERED_B, v2.B_MAX)
        assert cfg.evidence_grade and not cfg.blend_arms
        # every run v2 made of this phase is a run of the rerun (which runs every grid point on every seed)
        phase = "main" if cfg is main else "long"
        ids = {s.run_id for s in plan(cfg)}
        for p in (V2 / "runs").glob(f"{phase}_*.json"):
            r = json.loads(p.read_text())
            assert f"{r['arm']}_s{r['seed']}_lr{r['lr']:g}" in ids
    # the primary endpoint (L* = base − 0.35) is the family; the exploratory level 0.45 is reported too
    assert main.levels == (d["lstar_delta"], 0.45) and main.family == (f"level:{d['lstar_delta']:g}",)
    assert long_.levels == (d["lstar_delta"], d["long_lstar_delta"])
    assert long_.family == (f"level:{d['long_lstar_delta']:g}",)
    # task 2 in sequence: v2's sequential phase (the standard library source after the task, same arm and LR)
    assert main.task2_steps == d["seq_steps"] and list(main.task2_arms) == d["seq_arms"]
    assert main.corpora["task2"]["files"] is None and not long_.task2
    seq = {f"{r['arm']}_s{r['seed']}_lr{r['lr']:g}" for r in map(lambda p: json.loads(p.read_text()),
                                                                 (V2 / "runs").glob("seq_*.json"))}
    assert seq <= {s.run_id for s in plan(main) if s.arm in main.task2_arms}


def test_forgetting_py_is_a_preset_of_kappatune_study(capsys, tmp_path):
    assert forgetting.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 arm(s), seeds [0, 1, 2], 120 steps" in out and "48 runs (48 not finished)" in out
    assert "task 2: 120 more steps" in out and "kappa_high_kind_s0_lr0.0005" in out
    assert forgetting.main(["--long", "--dry-run", "--out", str(tmp_path / "long")]) == 0
    assert "3 arm(s), seeds [0, 1, 2], 300 steps" in capsys.readouterr().out
    assert not (tmp_path / "long").exists()
    # the study file sets the design: a setting flag is refused in one line
    assert forgetting.main(["--model", str(tmp_path / "m"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error: --model") and "edit the file" in err and "\n" not in err


def test_choose_lr_rule():
    def run(lr, d, last, diverged=False):
        return {"lr": lr, "dcontrol_at_lstar": d, "curve": [{"task_curve_loss": last}], "diverged": diverged}

    assert v2.choose_lr([run(1, 0.2, 3.0), run(2, 0.1, 3.5)]) == 2        # both reach: lower Δcontrol at L*
    assert v2.choose_lr([run(1, None, 3.0), run(2, 0.3, 3.5)]) == 2       # only one reaches
    assert v2.choose_lr([run(1, None, 3.0), run(2, None, 2.9)]) == 2      # none: lower last task loss
    assert v2.choose_lr([run(1, None, 3.0), run(2, 0.0, 1.0, True)]) == 1  # diverged never wins
    assert v2.choose_lr([]) is None


def test_lstar_follows_the_resampled_base_loss():
    """L* = base task loss − Δ on the *resampled* windows: a run whose per-window task and control
    losses fall by 0.1 per point on every window crosses each replicate's L* at the same Δcontrol."""
    rng = np.random.default_rng(3)
    n, B, delta = 32, 400, 0.35
    base = rng.normal(4.0, 0.5, n)
    run = {"curve": [{"task_curve_pw": list(base - 0.1 * k), "control_curve_pw": list(base - 0.1 * k)}
                     for k in range(8)]}
    W = st.window_weights(n, B, rng)
    got = v2.curve_endpoint(run, W, W, st.resampled_level(W, base, float(base.mean()) - delta))
    assert got[0] == pytest.approx(-delta) and np.allclose(got, -delta)
    C = W @ np.stack([np.asarray(c["control_curve_pw"]) for c in run["curve"]]).T
    fixed = st.crossing_batch(C, C, float(base.mean()) - delta) - C[:, 0]
    assert np.nanstd(fixed) > 0.01                   # a fixed level would turn window noise into endpoint noise


def _listing(d: Path):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.rglob("*"))}


def _v2_report_refused(folder: Path, capsys) -> str:
    before = _listing(folder)
    capsys.readouterr()
    assert forgetting.main(["--v2-report", str(folder), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert _listing(folder) == before                                   # nothing written
    return err


@pytest.mark.parametrize("case", ["deleted_run", "no_runs", "altered_run", "no_base", "altered_base", "added_run",
                                  "no_record", "altered_record"])
def test_v2_report_refuses_a_record_that_is_not_whole(tmp_path, capsys, case):
    """--v2-report DIR writes only from v2's whole record: every file record.json lists, with its SHA-256,
    and no other run file; anything else is refused in one line, exit 2, nothing written."""
    out = tmp_path / "forgetting_v2"
    shutil.copytree(V2, out)
    run = out / "runs" / "main_lora_s1_lr0.0005.json"
    if case == "deleted_run":
        run.unlink()
    elif case == "no_runs":
        shutil.rmtree(out / "runs")
        run = out / "runs" / sorted(p.name for p in (V2 / "runs").glob("*.json"))[0]
    elif case == "altered_run":                  # a value changed, its settings fingerprint kept
        r = json.loads(run.read_text())
        r["final"]["control_final_pw"][0] += 0.5
        run.write_text(json.dumps(r))
    elif case in ("no_base", "altered_base"):
        run = out / "base.json"
        if case == "no_base":
            run.unlink()
        else:
            b = json.loads(run.read_text())
            b["task_curve_loss"] += 0.01
            run.write_text(json.dumps(b))
    elif case == "added_run":
        r = json.loads(run.read_text())
        r["run_id"] = "main_lora_s3_lr0.0005"
        run = out / "runs" / "main_lora_s3_lr0.0005.json"
        run.write_text(json.dumps(r))
    elif case == "no_record":
        run = out / "record.json"
        run.unlink()
    elif case == "altered_record":               # the manifest itself edited to match an altered run
        r = json.loads(run.read_text())
        r["dcontrol_last"] = 0.0
        run.write_text(json.dumps(r))
        rec = json.loads((out / "record.json").read_text())
        rec["files"]["runs/" + run.name] = v2.record_files(out)["runs/" + run.name]
        (out / "record.json").write_text(json.dumps(rec, indent=1) + "\n")
        run = out / "record.json"
    err = _v2_report_refused(out, capsys)
    assert str(run) in err
    want = {"deleted_run": "missing from v2's record", "no_runs": "missing from v2's record",
            "altered_run": "differs from v2's record", "no_base": "missing from v2's record",
            "altered_base": "differs from v2's record", "added_run": "not a file of v2's record",
            "no_record": "no such file", "altered_record": "not the manifest of v2's record"}[case]
    assert want in err and ("restore it" in err or "move it away" in err)


def test_the_record_lists_every_committed_file_of_the_report():
    rec = json.loads((V2 / "record.json").read_text())
    assert rec["files"] == v2.record_files(V2)
    runs = {n for n in rec["files"] if n.startswith("runs/")}
    assert len(runs) == 50 and {"base.json", "config.json", "selections.json"} <= set(rec["files"])
    assert runs == {f"runs/{r}.json" for r in json.loads((V2 / "summary.json").read_text())["finished_runs"]}
    v2.verify_record(V2)


@pytest.mark.parametrize("case", ["list", "no_run_id", "no_final", "seq_no_after"])
def test_a_malformed_v2_run_file_is_named_in_one_line(tmp_path, capsys, case):
    out = tmp_path / "forgetting_v2"
    shutil.copytree(V2, out)
    run = out / "runs" / ("seq_lora_s1_lr0.0005.json" if case == "seq_no_after" else "main_lora_s1_lr0.0005.json")
    r = json.loads(run.read_text())
    if case == "list":
        r = [1, 2]
    elif case == "no_run_id":
        del r["run_id"]
    elif case == "no_final":
        del r["final"]
    else:
        del r["after_task2"]
    run.write_text(json.dumps(r))
    with pytest.raises(FolderError, match="not a v2 run file as written"):
        v2.load_runs(out, v2.read_design(out))
    err = _v2_report_refused(out, capsys)
    assert str(run) in err and {"list": "holds a JSON list", "no_run_id": "lacks run_id", "no_final": "lacks final",
                                "seq_no_after": "lacks after_task2"}[case] in err
