"""The v1 forgetting benchmark's harness (``benchmarks/forgetting_v1.py``), on a tiny config-built Llama and synthetic token windows.

Runs the real ``benchmarks/forgetting.py --tiny --quick`` path end to end (training, matched-target
stopping, equal-budget selections, LoRA via peft, resumable run files, report and plot), plus the
selection helpers and the best-LR rule on their own.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import forgetting_v1 as forgetting  # noqa: E402
import forgetting_lib as fl  # noqa: E402

kappatune = pytest.importorskip("kappatune")
pytest.importorskip("peft")


def _args(out):
    return ["--tiny", "--quick", "--out", str(out), "--threads", "1", "--no-progress"]


def test_quick_tiny_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "fg"
    assert forgetting.main(_args(out)) == 0
    cfg = fl.tiny_config(quick=True)
    runs = fl.load_runs(out, cfg)
    ready, blocked = fl.plan(cfg, runs)
    assert not ready and not blocked
    # full FT once per LR, every other method at every budget, random at every seed
    n_expected = len(cfg.lrs["full"]) + len(cfg.budgets) * (3 + len(cfg.random_seeds))
    assert len(runs) == n_expected
    assert {r["method"] for r in runs.values()} == set(fl.METHODS)

    model, data = fl.tiny_model_and_data(cfg)
    table = kappatune.scan(model, cache=False, progress=False)
    target = fl.target_from([r for r in runs.values() if r["method"] == "full"])
    base = json.loads((out / "base.json").read_text())
    for r in runs.values():
        assert r["curve"][0]["task_loss"] == base["task_curve"]          # every curve starts at the base model
        assert [c["step"] for c in r["curve"]][-1] == r["steps"]
        if r["method"] == "full":
            assert r["steps"] == cfg.ft_steps and r["trainable_params"] == sum(p.numel() for p in model.parameters())
            continue
        ref = fl.reference_count(table, r["budget"])
        assert abs(r["trainable_params"] / ref - 1) <= cfg.match_tol      # equal budget, ±5%
        assert r["target_task_loss"] == pytest.approx(target)
        # stop rule: a run that reached the target stopped at the first check below it
        checks = [c for c in r["curve"][1:]]
        if r["reached_target"]:
            assert checks[-1]["task_loss"] <= target and all(c["task_loss"] > target for c in checks[:-1])
            assert r["steps_to_target"] == r["steps"]
        else:
            assert r["steps"] == cfg.cap_steps and all(c["task_loss"] > target for c in checks)
        assert r["forgetting"] == pytest.approx(r["control_ppl"] / torch.tensor(base["control_final"]).exp().item())
        if r["method"] == "kappa_low":
            assert r["selected"] == table.select(param_budget=r["budget"])
        if r["method"] == "kappa_high":
            assert r["selected"] == fl.kappa_high_names(table, r["budget"])
            assert max(table[n].kappa for n in r["selected"]) == table[-1].kappa
        if r["method"] == "lora":
            assert r["lora_rank"] >= 1

    md = (out / "results.md").read_text()
    assert f"All {n_expected} planned runs finished." in md
    for label in ("full FT", "κ-low", "κ-high", "random (seed 1)", "LoRA r="):
        assert label in md
    assert "## Headline" in md and "κ-low − random mean" in md
    png = (out / "tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # resumable: a second call redoes nothing; a deleted run file is redone, alone
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    victim = next(p for p in (out / "runs").glob("random_*_s1_*.json"))
    victim.unlink()
    capsys.readouterr()
    assert forgetting.main(_args(out) + ["--no-plot"]) == 0
    log = capsys.readouterr().out
    assert log.count("trainable, ") == 1 and victim.stem in log
    again = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert set(again) == set(mtimes)
    assert all(again[k] == v for k, v in mtimes.items() if k != victim.name)
    assert json.loads(victim.read_text())["task_loss"] == pytest.approx(
        runs[victim.stem]["task_loss"], rel=1e-4)                             # same data, same seed → same run

    # --report aggregates only; settings that differ are refused rather than mixed in
    assert forgetting.main(_args(out) + ["--report", "--no-plot"]) == 0
    with pytest.raises(ValueError, match="other benchmark settings"):
        fl.load_runs(out, fl.tiny_config(quick=False))


def test_only_runs_the_target_then_the_named_method(tmp_path):
    out = tmp_path / "only"
    assert forgetting.main(_args(out) + ["--only", "kappa_low", "--max-runs", "2", "--no-plot"]) == 0
    methods = sorted(r["method"] for r in fl.load_runs(out).values())
    assert methods == ["full", "kappa_low"]
    assert "NOT FINISHED" in (out / "results.md").read_text()


def test_equal_budget_selection_helpers():
    model = make_tiny_llama(layers=4)
    table = kappatune.scan(model, cache=False, progress=False)
    numel = {e.name: e.numel for e in table}
    for b in (0.1, 0.3, 0.5, 20_000):
        # the helper's walk in κ order is exactly KappaTable.select(param_budget=...)
        assert fl.walk_budget(table.names, numel, fl.budget_count(table, b)) == table.select(param_budget=b)
        hi = fl.kappa_high_names(table, b)
        assert hi == fl.walk_budget(table.names[::-1], numel, fl.budget_count(table, b))
        assert sum(numel[n] for n in hi) <= fl.budget_count(table, b)
    lo, hi = table.select(param_budget=0.3), fl.kappa_high_names(table, 0.3)
    assert max(table[n].kappa for n in lo) <= min(table[n].kappa for n in hi)
    r0, r1 = fl.random_names(table, 0.3, 0), fl.random_names(table, 0.3, 1)
    assert r0 == fl.random_names(table, 0.3, 0) and r0 != r1
    # the LoRA rank's predicted size is what peft really makes trainable
    from peft import LoraConfig, get_peft_model

    r, n = fl.lora_rank_for(model, 30_000)
    pm = get_peft_model(model, LoraConfig(r=r, target_modules=list(fl.LORA_TARGETS)))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == n
    with pytest.raises(ValueError, match=r"outside the ±5% match"):
        fl.check_match("random s0", 1060, 1000, 0.05)


def test_best_lr_rule():
    def run(lr, reached, forgetting, task_loss, diverged=False):
        return dict(lr=lr, reached_target=reached, forgetting=forgetting, task_loss=task_loss, diverged=diverged)

    # among runs that reached the target: lowest forgetting, even with a worse task loss
    assert fl.best_of([run(1, True, 1.05, 2.0), run(2, True, 1.02, 2.1), run(3, False, 1.0, 3.0)])["lr"] == 2
    # none reached: lowest task loss; a diverged run never wins while another exists
    assert fl.best_of([run(1, False, 1.0, 2.5), run(2, False, 1.3, 2.2), run(3, False, 1.0, 1.0, True)])["lr"] == 2
    assert fl.best_of([]) is None


@pytest.mark.skipif(not fl.have_kappatune_optimizer(), reason="kappatune.KappaTuneOptimizer not available yet")
def test_kappatune_optimizer_path_matches_freeze_path():
    """κ-low through KappaTuneOptimizer(param_budget=, table=) and κ-high through (names=) train
    exactly like freeze_all_but + AdamW on the same tensors."""
    cfg = fl.tiny_config(quick=True)
    model, data = fl.tiny_model_and_data(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    table = kappatune.scan(model, cache=False, progress=False)
    base = {k: fl.evaluate(model, getattr(data, k), cfg.eval_batch)
            for k in ("task_curve", "control_curve", "task_final", "control_final")}
    for method in ("kappa_low", "kappa_high"):
        spec = fl.RunSpec(method, 3e-3, 0.3)
        ref = fl.reference_count(table, 0.3)
        a = fl.train_run(model, spec, table, data, cfg, base, None, ref, progress=False, impl="optimizer")
        b = fl.train_run(model, spec, table, data, cfg, base, None, ref, progress=False, impl="freeze")
        assert a["optimizer_impl"].startswith("kappatune.KappaTuneOptimizer")
        assert a["selected"] == b["selected"] and a["trainable_params"] == b["trainable_params"]
        assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-5)
        assert a["control_loss"] == pytest.approx(b["control_loss"], rel=1e-5)


def test_lr_probe_uses_main_target_and_code_and_leaves_main_runs_alone(tmp_path, capsys):
    out = tmp_path / "probe"
    probe = _args(out) + ["--lr-probe", "0.003", "0.01", "--probe-methods", "kappa_low", "random",
                          "--probe-budget", "0.3"]
    with pytest.raises(SystemExit, match=r"needs the main benchmark's full-FT runs \['full_lr0.001'\]"):
        forgetting.main(probe)
    assert not (out / "lr_probe").exists()
    # main: full FT (the target) and κ-low's sweep run at b=0.3, lr 3e-3
    assert forgetting.main(_args(out) + ["--only", "kappa_low", "--max-runs", "2", "--no-plot"]) == 0
    cfg = fl.tiny_config(quick=True)
    main_runs = fl.load_runs(out, cfg)
    assert sorted(main_runs) == ["full_lr0.001", "kappa_low_b0.3_lr0.003"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    report = (out / "results.md").read_text()

    capsys.readouterr()
    assert forgetting.main(probe) == 0
    assert capsys.readouterr().out.count("[probe ") == 4
    assert {p: p.stat().st_mtime_ns for p in before} == before and (out / "results.md").read_text() == report
    assert fl.load_runs(out, cfg) == main_runs                                  # main runs untouched
    runs = fl.load_runs(out / "lr_probe", cfg)                                  # same settings fingerprint
    assert sorted(runs) == ["kappa_low_b0.3_lr0.003", "kappa_low_b0.3_lr0.01", "random_b0.3_s0_lr0.003",
                            "random_b0.3_s0_lr0.01"]
    target = fl.target_from([main_runs["full_lr0.001"]])
    model, _ = fl.tiny_model_and_data(cfg)
    table = kappatune.scan(model, cache=False, progress=False)
    for r in runs.values():
        assert r["phase"] == "lr_probe" and r["target_task_loss"] == pytest.approx(target)
    assert runs["random_b0.3_s0_lr0.01"]["selected"] == fl.random_names(table, 0.3, 0)
    # the probe at the main run's LR is the main run again: same code, data, base and target
    a, b = runs["kappa_low_b0.3_lr0.003"], main_runs["kappa_low_b0.3_lr0.003"]
    assert a["train_losses"] == pytest.approx(b["train_losses"], rel=1e-5)
    assert (a["steps"], a["reached_target"]) == (b["steps"], b["reached_target"])
    assert a["forgetting"] == pytest.approx(b["forgetting"], rel=1e-5)

    md = (out / "lr_probe" / "results.md").read_text()
    assert "| κ-low | 0.3 | 0.003 | main |" in md and "| κ-low | 0.3 | 0.003 | probe |" in md
    assert "| random (seed 0) | 0.3 | 0.01 | probe |" in md
    assert "All 4 probe run(s) of the latest command finished; 4 probe run(s) in all." in md
    # resumable: nothing is redone; --report only rewrites the probe table
    probe_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "lr_probe" / "runs").glob("*.json")}
    capsys.readouterr()
    assert forgetting.main(probe) == 0 and forgetting.main(probe + ["--report"]) == 0
    assert "[probe " not in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "lr_probe" / "runs").glob("*.json")} == probe_mtimes
    # a later probe (another random seed) adds its run; the report keeps every earlier probe run
    assert forgetting.main(_args(out) + ["--lr-probe", "0.01", "--probe-methods", "random", "--probe-seed", "1",
                                         "--probe-budget", "0.3"]) == 0
    md = (out / "lr_probe" / "results.md").read_text()
    assert "| random (seed 1) | 0.3 | 0.01 | probe |" in md and "| κ-low | 0.3 | 0.01 | probe |" in md
    assert "| random (seed 0) | 0.3 | 0.01 | probe |" in md and "5 probe run(s) in all." in md
