"""The forgetting study v2 (``benchmarks/forgetting.py``) on a tiny config-built Llama and synthetic windows:
the whole study end to end and resumed, each arm's selection rule, the statistics on known inputs, Spectrum's SNR
on known spectra, the corpus readers."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

kappatune = pytest.importorskip("kappatune")
pytest.importorskip("peft")

import forgetting  # noqa: E402
import forgetting_stats as st  # noqa: E402
import forgetting_v2 as fv  # noqa: E402
import spectrum  # noqa: E402


def _args(out, *extra):
    return ["--tiny", "--out", str(out), "--threads", "1", "--no-progress", "--bootstrap", "300", *extra]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fv2") / "study"
    assert forgetting.main(_args(out)) == 0
    return out


def test_study_end_to_end(study):
    cfg = fv.tiny_config()
    runs = fv.load_runs(study, cfg)
    ready, waiting, chosen = fv.plan(cfg, runs)
    assert not ready and not waiting
    n_grid = sum(len(cfg.lrs[a]) for a in cfg.arms)
    n_expected = n_grid + len(cfg.arms) * (len(cfg.seeds) - 1) + (len(cfg.long_arms) + len(cfg.seq_arms)) * len(cfg.seeds)
    assert len(runs) == n_expected
    base = json.loads((study / "base.json").read_text())
    sel = json.loads((study / "selections.json").read_text())
    ref = sel["reference_params"]
    for r in runs.values():
        assert r["config_fingerprint"] == cfg.fingerprint() and r["cpu_s"] > 0 and r["wall_s"] > 0
        assert len(r.get("task1", r).get("step_cpu_s", [])) == (cfg.steps if r["phase"] != "long" else cfg.long_steps)
        if r["arm"] != "full":
            assert abs(r["trainable_params"] / ref - 1) <= cfg.match_tol
        if r["phase"] == "seq":
            continue
        # the curve starts at the base model, has a point every eval_every steps, per-window losses kept
        c = r["curve"]
        assert c[0]["task_curve_pw"] == base["task_curve_pw"]
        assert [p["step"] for p in c] == list(range(0, r["steps"] + 1, cfg.eval_every))
        assert len(c[-1]["control_curve_pw"]) == cfg.curve_windows
        assert len(r["final"]["control_final_pw"]) == cfg.final_windows
        assert r["final"]["control_final_loss"] == pytest.approx(np.mean(r["final"]["control_final_pw"]), abs=1e-6)
        # the primary endpoint is the interpolation of the logged curve at L*
        x = st.crossing([p["task_curve_loss"] for p in c], [p["control_curve_loss"] for p in c], base["L_star"],
                        [p["step"] for p in c])
        if x is None:
            assert r["dcontrol_at_lstar"] is None
        else:
            assert r["dcontrol_at_lstar"] == pytest.approx(x[0] - base["control_curve_loss"])
        if r["arm"] in fv.SELECTIVE:
            assert r["selected"] == sel["arms"][str(r["seed"])][r["arm"]]["names"]
    # every arm's seeds ≥ 1 and the long/seq phases ran at the LR the seed-0 rule chose
    for a in cfg.arms:
        grid = [runs[fv.RunSpec(a, lr, 0).run_id] for lr in cfg.lrs[a]]
        assert chosen[a] == fv.choose_lr(grid)
        assert all(fv.RunSpec(a, chosen[a], s).run_id in runs for s in cfg.seeds[1:])
    # a longer run of a seed starts with exactly the shorter run's batches (same losses, same curve)
    a = cfg.long_arms[0]
    short, long_ = runs[fv.RunSpec(a, chosen[a], 1).run_id], runs[fv.RunSpec(a, chosen[a], 1, "long").run_id]
    assert long_["train_losses"][:cfg.steps] == pytest.approx(short["train_losses"], abs=1e-5)
    assert long_["steps"] == cfg.long_steps
    # sequential phase: κ re-scanned through the cache, only the tensors task 1 changed were recomputed
    seq = runs[fv.RunSpec("kappa_low", chosen["kappa_low"], 0, "seq").run_id]
    rs = seq["task2"]["rescan"]
    assert rs["changed_tensors"] == len(seq["selected"]) and rs["recomputed"] == rs["changed_tensors"]
    assert rs["cache_hits"] == len(sel["kappa"]) - rs["changed_tensors"]
    assert 0 < seq["task2"]["trainable_params"] <= cfg.budget * sel["linear_params"]
    assert seq["task1_forgetting"] == pytest.approx(seq["after_task2"]["task_final_loss"]
                                                    - seq["after_task1"]["task_final_loss"])
    lora = runs[fv.RunSpec("lora", chosen["lora"], 0, "seq").run_id]
    assert "rescan" not in lora["task2"] and lora["task2"]["trainable_params"] == sel["lora"]["params"]
    # report: summary in the shape, tables, plots
    s = json.loads((study / "summary.json").read_text())
    for arm in cfg.arms:
        assert len(s["arms"][arm]["seeds"]) == len(cfg.seeds)
        if arm != "kappa_low":
            assert set(s["arms"][arm]["vs_kappa_low"]) >= {"mean_diff", "ci95", "p_holm"}
    for arm in cfg.seq_arms:
        assert len(s["sequential"]["arms"][arm]["seeds"]) == len(cfg.seeds)
    md = (study / "results.md").read_text()
    assert f"All {n_expected} planned runs finished." in md and "## Headline (computed from the CIs)" in md
    assert "--model PATH" in md and "κ re-scan" in md
    for p in ("frontier.png", "sequential.png"):
        assert (study / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_redoes_only_missing_runs_and_refuses_other_settings(study, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(study, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    victim = out / "runs" / "main_random_kind_s1_lr0.01.json"
    if not victim.exists():
        victim = next((out / "runs").glob("main_random_kind_s1_*.json"))
    old = json.loads(victim.read_text())
    victim.unlink()
    capsys.readouterr()
    assert forgetting.main(_args(out, "--no-plot")) == 0
    log = capsys.readouterr().out
    assert log.count("[run ") == 1 and victim.stem in log
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert set(after) == set(before) and all(after[k] == v for k, v in before.items() if k != victim.name)
    new = json.loads(victim.read_text())
    assert new["train_losses"] == pytest.approx(old["train_losses"], abs=1e-6)   # same data, seed, selection
    assert new["selected"] == old["selected"]
    other = fv.tiny_config()
    other.steps += 2
    with pytest.raises(ValueError, match="other study settings"):
        fv.load_runs(out, other)


def test_claims_let_workers_share_a_folder(tmp_path):
    import socket
    import subprocess

    claims = tmp_path / "claims"
    claims.mkdir()
    assert fv.claim_run(claims, "a") and fv.claim_run(claims, "a")        # exclusive, re-entrant for the holder
    assert json.loads((claims / "a.claim").read_text())["pid"] == __import__("os").getpid()
    live = {"pid": __import__("os").getppid(), "host": socket.gethostname()}
    (claims / "b.claim").write_text(json.dumps(live))
    assert not fv.claim_run(claims, "b")                                    # a live worker holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (claims / "c.claim").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert fv.claim_run(claims, "c")                                        # a dead worker's claim is taken over
    (claims / "d.claim").write_text("{torn")
    assert fv.claim_run(claims, "d")                                        # unreadable claim: stale
    fv.release_run(claims, "a")
    assert not (claims / "a.claim").exists()


def test_a_second_worker_skips_runs_another_worker_holds(study, tmp_path, capsys):
    import os
    import shutil
    import socket

    out = tmp_path / "copy"
    shutil.copytree(study, out)
    a, b = sorted((out / "runs").glob("main_*_s1_*.json"))[:2]
    a.unlink()
    b.unlink()
    (out / "claims").mkdir(exist_ok=True)
    (out / "claims" / f"{a.stem}.claim").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    capsys.readouterr()
    assert forgetting.main(_args(out, "--no-plot", "--max-runs", "1")) == 0
    log = capsys.readouterr().out
    started = [line for line in log.splitlines() if "[run " in line]
    assert len(started) == 1 and started[0].endswith(b.stem)
    assert b.exists() and not a.exists() and not (out / "claims" / f"{b.stem}.claim").exists()


@pytest.fixture(scope="module")
def table_and_model():
    cfg = fv.tiny_config()
    model, _ = fv.tiny_model_and_data(cfg)
    return fv.kappa_scan(model, None, cfg.max_dim), model, cfg


def test_arm_selection_rules(table_and_model):
    table, model, cfg = table_and_model
    assert not any("embed" in n for n in table.names)
    snr = spectrum.snr_table({n: p for n, p in model.named_parameters() if n in set(table.names)})
    kappa = table.kappas
    for seed in (0, 1, 2):
        sel = fv.select_arms(table, snr, cfg, seed)
        low = sel["kappa_low"]["names"]
        assert low == table.select(param_budget=cfg.budget)
        ref = sel["kappa_low"]["params"]
        comp = fv.kinds_of(low)
        for arm, d in sel.items():
            assert abs(d["params"] / ref - 1) <= cfg.match_tol, arm
            assert d["params"] <= cfg.budget * table.total_numel
            assert len(set(d["names"])) == len(d["names"])
        # same kind composition as κ-low; κ-high takes each kind's highest κ
        assert fv.kinds_of(sel["random_kind"]["names"]) == comp
        assert fv.kinds_of(sel["kappa_high_kind"]["names"]) == comp
        for k, c in comp.items():
            of_kind = sorted((n for n in table.names if fv.module_kind(n) == k), key=lambda n: kappa[n])
            hi = [n for n in sel["kappa_high_kind"]["names"] if fv.module_kind(n) == k]
            assert sorted(hi) == sorted(of_kind[-c:])
        # within-kind κ-low: in each kind it took the lowest-κ tensors of that kind
        for k, c in fv.kinds_of(sel["kappa_low_kind"]["names"]).items():
            of_kind = sorted((n for n in table.names if fv.module_kind(n) == k), key=lambda n: kappa[n])
            took = [n for n in sel["kappa_low_kind"]["names"] if fv.module_kind(n) == k]
            assert sorted(took) == sorted(of_kind[:c])
        assert len(fv.kinds_of(sel["kappa_low_kind"]["names"])) > len(comp)   # spread over more kinds
        # Spectrum: the highest-SNR tensors of each kind it took
        for k, c in fv.kinds_of(sel["spectrum"]["names"]).items():
            of_kind = sorted((n for n in table.names if fv.module_kind(n) == k), key=lambda n: -snr[n])
            assert sorted(n for n in sel["spectrum"]["names"] if fv.module_kind(n) == k) == sorted(of_kind[:c])
    s0, s1 = fv.select_arms(table, snr, cfg, 0), fv.select_arms(table, snr, cfg, 1)
    assert s0["random_kind"]["names"] != s1["random_kind"]["names"] and s0["random"]["names"] != s1["random"]["names"]
    assert s0["kappa_low"]["names"] == s1["kappa_low"]["names"]
    assert fv.select_arms(table, snr, cfg, 0)["random"]["names"] == s0["random"]["names"]   # seeded
    # LoRA's rank: the adapter peft really makes has the predicted size, within ±5 % of κ-low
    from peft import LoraConfig, get_peft_model
    import copy

    r, n, targets = fv.lora_rank_for(model, table, s0["kappa_low"]["params"])
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, target_modules=targets))
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == n
    with pytest.raises(ValueError, match=r"outside the ±5% match"):
        fv.check_match("random", 1060, 1000, 0.05)


def test_fill_by_kind_spreads_a_budget_smaller_than_one_share():
    numel = {"a1": 10, "a2": 10, "b1": 30, "b2": 30, "c1": 5}
    ranked = {"a": ["a1", "a2"], "b": ["b1", "b2"], "c": ["c1"]}
    score = {"a1": 1, "a2": 4, "b1": 2, "b2": 3, "c1": 9}
    # round 1 (by score): a1, b1, c1 (45); round 2: a2 fits (55), b2 does not
    assert fv.fill_by_kind(ranked, score, numel, 60) == ["a1", "b1", "c1", "a2"]
    assert fv.fill_by_kind(ranked, score, numel, 60, start=["b2"]) == ["b2", "a1", "c1", "a2"]
    assert fv.fill_by_kind(ranked, score, numel, 4) == []


def test_choose_lr_rule():
    def run(lr, d, last, diverged=False):
        return {"lr": lr, "dcontrol_at_lstar": d, "curve": [{"task_curve_loss": last}], "diverged": diverged}

    assert fv.choose_lr([run(1, 0.2, 3.0), run(2, 0.1, 3.5)]) == 2        # both reach: lower Δcontrol at L*
    assert fv.choose_lr([run(1, None, 3.0), run(2, 0.3, 3.5)]) == 2       # only one reaches
    assert fv.choose_lr([run(1, None, 3.0), run(2, None, 2.9)]) == 2      # none: lower last task loss
    assert fv.choose_lr([run(1, None, 3.0), run(2, 0.0, 1.0, True)]) == 1  # diverged never wins


def test_crossing_interpolates_and_batch_matches():
    assert st.crossing([4.0, 3.6, 3.2], [3.0, 3.1, 3.5], 3.4, [0, 20, 40]) == pytest.approx((3.3, 30.0))
    assert st.crossing([4.0, 3.6], [3.0, 3.1], 3.4) is None
    assert st.crossing([3.0, 2.0], [1.0, 5.0], 3.5) == (1.0, 0.0)
    rng = np.random.default_rng(0)
    T = np.cumsum(-rng.random((50, 7)), axis=1) + 4
    C = rng.random((50, 7))
    got = st.crossing_batch(T, C, 2.5)
    for b in range(50):
        x = st.crossing(list(T[b]), list(C[b]), 2.5)
        assert (np.isnan(got[b]) and x is None) or got[b] == pytest.approx(x[0])


def test_paired_bootstrap_covers_the_true_difference():
    """Per-window control increases: arm = ref + 0.05 + noise (paired windows); the CI holds 0.05,
    excludes 0, and a null arm gets a CI that includes 0."""
    rng = np.random.default_rng(1)
    n, B = 64, 1000
    W = st.window_weights(n, B, rng)
    assert np.allclose(W.sum(1), 1) and np.allclose(W[0], 1 / n)
    ref, arm, null = {}, {}, {}
    for s in range(3):
        base = rng.normal(0.2, 0.1, n) + rng.normal(0, 0.02)
        ref[s] = W @ base
        arm[s] = W @ (base + 0.05 + rng.normal(0, 0.02, n) + rng.normal(0, 0.005))
        null[s] = W @ (base + rng.normal(0, 0.02, n))
    r = st.paired_bootstrap(arm, ref, B, np.random.default_rng(2))
    lo, hi = r["ci95"]
    assert lo < 0.05 < hi and lo > 0 and r["p"] <= 2 / B
    assert r["mean_diff"] == pytest.approx(np.mean(r["diffs"]))
    assert r["t_ci95"][0] < r["mean_diff"] < r["t_ci95"][1]
    z = st.paired_bootstrap(null, ref, B, np.random.default_rng(2))
    assert z["ci95"][0] < 0 < z["ci95"][1] or abs(z["mean_diff"]) < 0.01
    one = st.paired_bootstrap({0: arm[0]}, ref, B, np.random.default_rng(2))
    assert one["ci95"] is None and one["mean_diff"] is not None                      # too few seeds
    nr = dict(arm)
    nr[1] = np.full(B + 1, np.nan)                                                     # not reached
    assert st.paired_bootstrap(nr, ref, B, np.random.default_rng(2))["seeds"] == [0, 2]
    part = dict(arm)
    part[1] = arm[1].copy()
    part[1][1::2] = np.nan                           # seed 1's curve misses L* in half the replicates
    pb = st.paired_bootstrap(part, ref, B, np.random.default_rng(2))
    # pre-registered: a replicate whose drawn seeds include a miss is dropped whole (P(no seed 1) = (2/3)^3)
    assert pb["valid"] == pytest.approx(0.5 + 0.5 * (2 / 3) ** 3, abs=0.05)


def test_lstar_follows_the_resampled_base_loss():
    """L* = base task loss − Δ on the *resampled* windows: a run whose per-window task and control
    losses fall by 0.1 per point on every window crosses each replicate's L* at the same Δcontrol."""
    import forgetting_report as fr

    rng = np.random.default_rng(3)
    n, B, delta = 32, 400, 0.35
    base = rng.normal(4.0, 0.5, n)
    run = {"curve": [{"task_curve_pw": list(base - 0.1 * k), "control_curve_pw": list(base - 0.1 * k)}
                     for k in range(8)]}
    W = st.window_weights(n, B, rng)
    got = fr._curve_endpoint(run, W, W, fr.resampled_level(W, base, float(base.mean()) - delta))
    assert got[0] == pytest.approx(-delta) and np.allclose(got, -delta)
    C = W @ np.stack([np.asarray(c["control_curve_pw"]) for c in run["curve"]]).T
    fixed = st.crossing_batch(C, C, float(base.mean()) - delta) - C[:, 0]
    assert np.nanstd(fixed) > 0.01                   # a fixed level would turn window noise into endpoint noise
    lv = np.full(B + 1, 3.0)
    lv[0] = 10.0
    T = np.tile(np.linspace(4, 2, 5), (B + 1, 1))
    assert st.crossing_batch(T, T, lv)[0] == 4.0 and np.allclose(st.crossing_batch(T, T, lv)[1:], 3.0)


def test_holm_and_mde():
    adj = st.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06), "d": None}
    assert st.holm({"a": 0.5, "b": 0.9}) == {"a": 1.0, "b": 1.0}
    fam = st.holm({"a": 0.01, "b": 0.02}, m=7)       # the pre-registered family counts arms without a p yet
    assert fam == {"a": pytest.approx(0.07), "b": pytest.approx(0.12)}
    with pytest.raises(ValueError, match="family size"):
        st.holm({"a": 0.01, "b": 0.02}, m=1)
    assert st.t_quantile_975(11) == pytest.approx(2.228)   # untabulated df: the wider neighbour
    assert st.mde(0.01) == pytest.approx(0.028, abs=2e-4)
    assert st.z_for_alpha(0.05) == pytest.approx(1.95996, abs=1e-4)
    assert st.t_interval([1.0, 2.0, 3.0]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))


def test_a_comparison_does_not_move_when_other_arms_land():
    import forgetting_report as rep

    B, g = 400, np.random.default_rng(3)
    vals = {a: {s: g.normal(0.1 * i, 0.05, size=B + 1) for s in range(3)}
            for i, a in enumerate(["kappa_low", "random_kind", "lora", "full"])}
    fam = ["random_kind", "lora", "full"]
    alone = rep._compare({a: vals[a] for a in ("kappa_low", "lora")}, B, 12345, "primary", fam)
    every = rep._compare(vals, B, 12345, "primary", fam)
    for key in ("mean_diff", "ci95", "p", "se"):
        assert alone["lora"][key] == every["lora"][key]
    other = rep._compare(vals, B, 12345, "last", fam)     # another endpoint draws other seeds
    assert other["lora"]["ci95"] != every["lora"]["ci95"]


def test_spectrum_snr_on_known_spectra():
    # σ = [10, 1, 1, 1, 1] on a 5×20 matrix: IQR of the values = 0 → threshold 0 → every σ is "signal",
    # noise sum falls back to 1 (as Spectrum does): SNR = 14 / 1 / 10
    assert spectrum.snr_from_singular_values([10, 1, 1, 1, 1], (5, 20)) == pytest.approx(1.4)
    s = np.array([8.0, 4.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1])
    q75, q25 = np.quantile(s, [0.75, 0.25])
    tau = (q75 - q25) / 1.349 * (1 + math.sqrt(8 / 32))
    want = s[s > tau].sum() / s[s <= tau].sum() / 8.0
    assert spectrum.snr_from_singular_values(s, (32, 8)) == pytest.approx(want)
    assert spectrum.mp_threshold(1.0, (8, 32)) == pytest.approx(1.5)
    # a real matrix with exactly these singular values gives the same SNR through the SVD
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(32, 8, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    Wm = U @ torch.diag(torch.tensor(s)) @ V.T
    assert spectrum.snr_of(Wm) == pytest.approx(want, rel=1e-9)
    assert spectrum.snr_of(Wm.T) == pytest.approx(want, rel=1e-9)
    # the signal/noise ratio is scale-free, the division by σ_max is not: SNR(c·W) = SNR(W) / c
    assert spectrum.snr_of(3 * Wm) == pytest.approx(want / 3, rel=1e-9)


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "b.json").write_text(json.dumps({"y": {"extract": "second"}, "x": {"extract": "first"}}))
    (tmp_path / "c.txt").write_text("para one\nstill one\n\n\npara two\n")
    c = fv.read_corpus([tmp_path / "a.jsonl"], "task")
    assert c.docs == ["one", "two"] and c.sep == "\n"
    assert fv.read_corpus([tmp_path / "b.json"], "control").docs == ["first", "second"]
    t = fv.read_corpus([tmp_path / "c.txt"], "control")
    assert t.docs == ["para one\nstill one", "para two"] and t.sep == "\n\n"
    with pytest.raises(ValueError, match="--task: .*does not exist"):
        fv.read_corpus([tmp_path / "nope.txt"], "task")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        fv.read_corpus([tmp_path / "bad.jsonl"], "task")
    files = fv.stdlib_py_files()
    assert files and not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert forgetting.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--dry-run",
                            "--phases", "main"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and "\n" not in err
