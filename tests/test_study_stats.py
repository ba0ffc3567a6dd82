"""kappatune.study.stats against textbook cases: Student's t (closed forms and printed tables), a paired-t
interval and p known to the digit, Holm on a known family, the coverage of the bootstrap percentile interval,
the Monte-Carlo error of a bootstrap p, and the rule that raises the replicates until no verdict can flip."""

import math
import zlib

import numpy as np
import pytest

from kappatune.study import stats as st

# Student's sleep data (Cushny & Peebles; R's `sleep`): extra hours of sleep, drug 2 − drug 1, 10 patients.
# R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p-value = 0.002833,
# 95 percent CI of group1 − group2: -2.4598858 -0.7001142 (here the sign is flipped: group2 − group1).
SLEEP_DIFFS = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_t_distribution_matches_closed_forms_and_printed_tables():
    for t in (0.0, 0.1, 0.7, 1.0, 2.5, 7.0, 60.0):
        # df = 1 is Cauchy; df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
        assert st.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert st.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-13)
        assert st.t_cdf(-t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), abs=1e-13)
        assert st.t_pvalue(-t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-13)
    # a large df is nearly the normal distribution (the gap is φ(t)(t³ + t)/(4ν) ≈ 1.4e-7 here)
    assert st.t_cdf(1.959963984540054, 10**6) == pytest.approx(0.975 - 1.4e-7, abs=2e-8)
    # quantiles as printed in the usual tables (3 decimals)
    table_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
    for df, q in table_975.items():
        assert st.t_quantile(0.975, df) == pytest.approx(q, abs=5e-4), df
        assert st.t_quantile_975(df) == q                            # the pre-registered (tabulated) value
    assert st.t_quantile(0.995, 2) == pytest.approx(9.925, abs=5e-4)
    assert st.t_quantile(0.95, 5) == pytest.approx(2.015, abs=5e-4)
    assert st.t_quantile(0.8, 2) == pytest.approx(1.061, abs=5e-4)
    assert st.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    q = 0.99
    assert st.t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-10)
    assert st.t_cdf(st.t_quantile(0.9973, 7), 7) == pytest.approx(0.9973, abs=1e-12)
    with pytest.raises(ValueError, match="q must be in"):
        st.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be > 0"):
        st.t_pvalue(1.0, 0)


def test_paired_t_on_the_sleep_data():
    r = st.paired_t(SLEEP_DIFFS)
    assert r["mean"] == pytest.approx(1.58)
    assert r["df"] == 9
    assert r["t"] == pytest.approx(4.062128, rel=1e-6)
    assert r["p"] == pytest.approx(0.002832890, abs=2e-9)
    # the interval uses the tabulated 2.262 (R's exact 2.262157): R's bounds to 1e-4
    assert r["ci95"] == pytest.approx([0.7001142, 2.4598858], abs=1e-4)
    # by hand: [1, 2, 3] has mean 2, s = 1, t = 2·sqrt(3), df 2: p = 1 − t / sqrt(t² + 2)
    h = st.paired_t([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert h["t"] == pytest.approx(t) and h["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)
    assert h["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
    assert st.paired_t([0.5, 0.5, 0.5])["p"] == 0.0 and st.paired_t([0.0, 0.0])["p"] == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        st.paired_t([1.0])


def test_holm_on_a_known_family():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") -> 0.03 0.06 0.06 0.02
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    adj = st.holm(p)
    assert adj == {"a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06),
                   "d": pytest.approx(0.02)}
    assert sorted(k for k, v in adj.items() if v < 0.05) == ["a", "d"]     # Holm rejects a and d at 0.05
    assert st.holm({"a": 0.01, "b": None}, m=7) == {"a": pytest.approx(0.07), "b": None}
    with pytest.raises(ValueError, match="family size"):
        st.holm(p, m=3)
    # Monte-Carlo SE through Holm's step: d ×4, a ×3, then c ×2 sets the running maximum, which b keeps
    se = st.holm_mc_se(p, {"a": 0.001, "b": 0.002, "c": 0.003, "d": 0.0005})
    assert se == {"a": pytest.approx(0.003), "b": pytest.approx(0.006), "c": pytest.approx(0.006),
                  "d": pytest.approx(0.002)}


def test_the_bootstrap_percentile_interval_covers_the_mean_at_its_nominal_rate():
    """1000 samples of 25 from N(0.3, 1): the seed bootstrap's percentile interval (seeds = observations, no
    window noise) holds the true mean in ~94 % of them (the percentile interval's known slight undercoverage
    at n = 25), the t interval in ~95 %."""
    rng = np.random.default_rng(7)
    n, B, sims, mu = 25, 999, 1000, 0.3
    zeros = {s: np.zeros(B + 1) for s in range(n)}
    boot = t_hits = 0
    for _ in range(sims):
        x = rng.normal(mu, 1.0, n)
        r = st.paired_bootstrap({s: np.full(B + 1, x[s]) for s in range(n)}, zeros, B, rng)
        boot += r["ci95"][0] <= mu <= r["ci95"][1]
        t_hits += r["t_ci95"][0] <= mu <= r["t_ci95"][1]
        assert r["mean_diff"] == pytest.approx(x.mean())
    assert 0.91 <= boot / sims <= 0.975
    assert 0.93 <= t_hits / sims <= 0.975


def test_mc_se_formula_and_the_spread_of_a_bootstrap_p():
    assert st.mc_se(0.05, 2000) == pytest.approx(math.sqrt(0.05 * 1.95 / 2000))
    assert st.mc_se(0.05, 2000, two_sided=False) == pytest.approx(math.sqrt(0.05 * 0.95 / 2000))
    assert st.mc_se(None, 2000) is None and st.mc_se(0.0, 10) == 0.0
    with pytest.raises(ValueError, match="p must be in"):
        st.mc_se(1.5, 10)
    # 20 seeds whose mean is ~2 standard errors from 0: a bootstrap p near 0.05; 400 independent bootstraps of
    # the same data spread as the two-sided formula says (the one-sided one is ~1.4× too small)
    g = np.random.default_rng(11)
    x = g.normal(0.0, 1.0, 20)
    x = x - x.mean() + 2.0 * x.std(ddof=1) / math.sqrt(20)
    B = 2000
    zeros = {s: np.zeros(B + 1) for s in range(20)}
    arm = {s: np.full(B + 1, x[s]) for s in range(20)}
    ps = []
    for k in range(400):
        r = st.paired_bootstrap(arm, zeros, B, np.random.default_rng([5, k]))
        assert r["p_mc_se"] == pytest.approx(st.mc_se(r["p"], r["kept"])) and r["kept"] == B
        ps.append(r["p"])
    sd, p = float(np.std(ps, ddof=1)), float(np.mean(ps))
    assert 0.02 < p < 0.1
    two, one = st.mc_se(p, B), st.mc_se(p, B, two_sided=False)
    assert 0.85 < sd / two < 1.18
    assert abs(sd - two) < abs(sd - one)


def test_three_same_sign_seeds_put_the_bootstrap_p_at_its_floor_and_the_paired_t_far_above():
    """The v2 study's full-FT case (issue 22): three per-seed differences of one sign. Every seed replicate has
    that sign, so the bootstrap p is its floor 1/B at any B; the paired t over the 3 seeds gives p 0.028,
    0.197 after Holm over 7 comparisons."""
    diffs = [-0.05005390941607324, -0.059403800759767034, -0.08744971563103121]
    for B in (2000, 16000):
        r = st.paired_bootstrap({s: np.full(B + 1, d) for s, d in enumerate(diffs)},
                                {s: np.zeros(B + 1) for s in range(3)}, B, np.random.default_rng(0))
        assert r["p"] == 1 / B and r["p_at_floor"]
    t = st.paired_t(diffs)
    assert t["p"] == pytest.approx(0.0281, abs=1e-4)
    assert st.holm({"full": t["p"], **{f"x{i}": 0.5 for i in range(6)}})["full"] == pytest.approx(0.197, abs=1e-3)


def _family(rng, B, shifts):
    W = st.window_weights(32, B, rng)
    out = {}
    for arm, shift in shifts.items():
        out[arm] = {s: W @ (rng.normal(0.2 + shift, 0.1, 32) + 0.02 * s) for s in range(3)}
    return out


def test_compare_to_reference_runs_both_tests_with_holm_over_the_family():
    B = 1000
    vals = _family(np.random.default_rng(4), B, {"ref": 0.0, "big": 0.3, "none": 0.0})
    fam = ["ref", "big", "none", "not_run_yet"]
    res = st.compare_to_reference(vals, "ref", B, 12345, "primary", fam)
    assert set(res) == {"big", "none"}
    m = 3
    ps = {a: r["p"] for a, r in res.items()}
    for a, r in res.items():
        assert r["holm_m"] == m
        assert r["p_holm"] == st.holm(ps, m=m)[a]
        assert r["t_p"] == pytest.approx(st.paired_t(r["diffs"])["p"])
        assert r["t_p_holm"] == st.holm({k: c["t_p"] for k, c in res.items()}, m=m)[a]
        assert r["mde_holm"] == pytest.approx((st.z_for_alpha(0.05 / m) + st.Z80) * r["se"])
        assert r["t_mde"] == pytest.approx((4.302653 + 1.060660) * r["t_se"], rel=1e-6)
        assert r["t_mde_holm"] == pytest.approx((st.t_quantile(1 - 0.05 / (2 * m), 2) + st.t_quantile(0.8, 2))
                                                * r["t_se"])
        assert r["decision"] == st.decide(r["ci95"], r["p_holm"])
        assert r["t_decision"] == st.decide(r["t_ci95"], r["t_p_holm"])
        # each comparison draws from its own generator, keyed by (seed, label, arm)
        again = st.paired_bootstrap(vals[a], vals["ref"], B,
                                    np.random.default_rng([12345, zlib.crc32(f"primary/{a}".encode())]))
        assert again["ci95"] == r["ci95"] and again["p"] == r["p"]
    assert res["big"]["decision"] == 1 and res["none"]["decision"] == 0
    assert st.decide([0.1, 0.2], 0.01) == 1 and st.decide([-0.2, -0.1], 0.01) == -1
    assert st.decide([0.1, 0.2], 0.06) == 0 and st.decide([-0.1, 0.2], 0.01) == 0 and st.decide(None, None) == 0


def test_the_replicates_rise_until_no_verdict_can_flip():
    def fake(ps):
        """An analysis whose Holm p-values have MC-SE 0.01 at B = 2000, falling as 1/sqrt(B)."""
        def evaluate(B):
            return {k: {"p_holm": p, "p_holm_mc_se": 0.01 * math.sqrt(2000 / B), "ci95": [0.1, 0.2],
                        "ci95_mc_se": [0.001, 0.001]} for k, p in ps.items()}
        calls = []
        return evaluate, calls

    # far from alpha: settled at once
    evaluate, _ = fake({"far": 0.5})
    res, info = st.stable_replicates(evaluate, lambda r: r, B=2000, B_max=64000)
    assert info["B"] == 2000 and info["stable"] and [h["B"] for h in info["history"]] == [2000]
    # 0.06 needs 3 · 0.01 · sqrt(2000 / B) < 0.01, i.e. B > 18000: doubled up to 32000
    evaluate, _ = fake({"far": 0.5, "near": 0.06})
    res, info = st.stable_replicates(evaluate, lambda r: r, B=2000, B_max=64000)
    assert [h["B"] for h in info["history"]] == [2000, 4000, 8000, 16000, 32000]
    assert info["history"][3]["at_risk"] == ["near"] and info["stable"] and info["at_risk"] == []
    assert res["near"]["p_holm_mc_se"] == pytest.approx(0.01 * math.sqrt(2000 / 32000))
    # on alpha: never settled; stops at the maximum and says so
    evaluate, _ = fake({"near": 0.06, "on": 0.0501})
    res, info = st.stable_replicates(evaluate, lambda r: r, B=2000, B_max=64000)
    assert info["B"] == 64000 and not info["stable"] and info["at_risk"] == ["on"]
    # the interval bound nearest zero also counts below alpha
    c = {"p_holm": 0.001, "p_holm_mc_se": 0.0001, "ci95": [0.002, 0.3], "ci95_mc_se": [0.001, 0.001]}
    assert st.verdict_at_risk(c) and not st.verdict_at_risk({**c, "ci95": [0.01, 0.3]})
    assert not st.verdict_at_risk({"p_holm": None})
    with pytest.raises(ValueError, match="B_max=100 is below"):
        st.stable_replicates(evaluate, lambda r: r, B=2000, B_max=100)


def test_the_paired_bootstrap_drops_replicates_with_a_missing_seed_and_keeps_its_mc_error():
    B = 2000
    rng = np.random.default_rng(9)
    W = st.window_weights(40, B, rng)
    assert W.shape == (B + 1, 40) and np.allclose(W.sum(1), 1) and np.allclose(W[0], 1 / 40)
    ref = {s: W @ rng.normal(0.0, 0.1, 40) for s in range(3)}
    arm = {s: W @ rng.normal(0.05, 0.1, 40) for s in range(3)}
    arm[1] = arm[1].copy()
    arm[1][1::2] = np.nan
    r = st.paired_bootstrap(arm, ref, B, np.random.default_rng(1))
    assert r["valid"] == pytest.approx(0.5 + 0.5 * (2 / 3) ** 3, abs=0.03)
    assert r["kept"] == round(r["valid"] * B)
    assert r["p_mc_se"] == pytest.approx(st.mc_se(r["p"], r["kept"]))
    lo_se, hi_se = r["ci95_mc_se"]
    assert 0 < lo_se < r["se"] and 0 < hi_se < r["se"]
    level = st.resampled_level(W, np.arange(40.0), 3.0)
    assert level[0] == 3.0 and np.allclose(level - 3.0, W @ np.arange(40.0) - 19.5)


def test_crossing_interpolates_and_the_batch_version_matches():
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
    # one level per curve: the first row's level is out of reach
    lv = np.full(5, 3.0)
    lv[0] = 10.0
    T = np.tile(np.linspace(4, 2, 5), (5, 1))
    assert st.crossing_batch(T, T, lv)[0] == 4.0 and np.allclose(st.crossing_batch(T, T, lv)[1:], 3.0)


def test_the_paired_bootstrap_holds_a_known_difference_and_needs_paired_seeds():
    """Per-window control increases: arm = ref + 0.05 + noise (paired windows); the CI holds 0.05 and
    excludes 0; a null arm's CI holds 0; one seed gives a mean but no interval; a seed whose run never
    reaches the level in any replicate is left out of the pairs."""
    rng = np.random.default_rng(1)
    n, B = 64, 1000
    W = st.window_weights(n, B, rng)
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
    nr[1] = np.full(B + 1, np.nan)                                                     # never reached
    assert st.paired_bootstrap(nr, ref, B, np.random.default_rng(2))["seeds"] == [0, 2]


def test_a_comparison_does_not_move_when_other_arms_land():
    B, g = 400, np.random.default_rng(3)
    vals = {a: {s: g.normal(0.1 * i, 0.05, size=B + 1) for s in range(3)}
            for i, a in enumerate(["kappa_low", "random_kind", "lora", "full"])}
    fam = ["random_kind", "lora", "full"]
    alone = st.compare_to_reference({a: vals[a] for a in ("kappa_low", "lora")}, "kappa_low", B, 12345, "primary",
                                    fam)
    every = st.compare_to_reference(vals, "kappa_low", B, 12345, "primary", fam)
    for key in ("mean_diff", "ci95", "p", "se"):
        assert alone["lora"][key] == every["lora"][key]
    other = st.compare_to_reference(vals, "kappa_low", B, 12345, "last", fam)     # another endpoint: other draws
    assert other["lora"]["ci95"] != every["lora"]["ci95"]


def test_tabulated_t_quantile_mde_and_normal_quantile():
    assert st.t_quantile_975(11) == pytest.approx(2.228)   # an untabulated df takes the wider neighbour
    assert st.mde(0.01) == pytest.approx(0.028, abs=2e-4)
    assert st.z_for_alpha(0.05) == pytest.approx(1.95996, abs=1e-4)
    assert st.t_interval([1.0, 2.0, 3.0]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
