r"""The report of a study: ``results.md``, a strict-JSON ``summary.json`` and the plots, from the run
files alone.

:func:`analyse` computes, for each arm (and each blended arm, ``blend:ARM``) and seed, the lower
envelope over the arm's grid (:mod:`~kappatune.study.frontier`) and from it the endpoints declared
in the study file: Δcontrol at each task-loss level (``level:X``) and the mean envelope over the
area's range (``area``; the difference of two is the area between the envelopes divided by the
range's width). Each declared comparison ``a − b`` is paired over seeds, with

* the **paired bootstrap over seeds and windows** (:func:`kappatune.study.stats.paired_bootstrap`:
  one window draw shared by every run, the task-loss levels following the resampled base loss) and
  the Monte-Carlo error of its p;
* the **paired t** over seeds (:func:`kappatune.study.stats.paired_t`);
* **Holm's** correction over the declared family (every family endpoint × every comparison), done
  separately for the bootstrap and the t p-values, and the minimum detectable effect of both at
  :math:`\alpha` and at Holm's first level :math:`\alpha / m`;
* the verdict by the declared rule (``verdict_on``: both tests, or one), with the bootstrap
  replicates raised until no verdict can flip by Monte-Carlo noise
  (:func:`kappatune.study.stats.stable_replicates`).

With a second task (``task2_steps``), a section and ``summary.json``'s ``task2`` give, per arm and
grid point, how far task 1 went, how much of it task 2 took back (and its share of task 1's gain),
the control after each task and task 2's own loss change (:func:`task2_summary`; descriptive), and
``task2.png`` the curves through both tasks.

A study that cannot give evidence (the quick preset, fewer than 3 seeds or 100 steps;
:attr:`~kappatune.study.config.StudyConfig.evidence_grade`) is stamped "smoke test, not evidence"
at the top of its report, shows no verdicts and links no pre-registration; a pre-registration is
linked only when the study file names one. matplotlib is imported only to draw the plots.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import frontier as fr
from . import stats as st
from .config import StudyConfig
from .folder import ResultsFolder, atomic_write_bytes, atomic_write_json
from .plan import RunSpec, plan

__all__ = ["analyse", "summary", "write_report", "write_plots", "SMOKE_STAMP"]

SMOKE_STAMP = "Smoke test, not evidence"
"""The first words of the report of a study that cannot give evidence."""


def finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``None`` (so the JSON is strict)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating,)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _rng(seed: int, label: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def _arms_of(cfg: StudyConfig) -> List[str]:
    return [a.name for a in cfg.arms] + [f"blend:{b}" for b in cfg.blend_arms]


def _source_arm(arm: str) -> str:
    """The trained arm behind ``arm``: a blend's source arm, else ``arm`` itself."""
    return arm.split(":", 1)[1] if arm.startswith("blend:") else arm


def _seed_runs(cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], arm: str, seed: int
               ) -> Optional[List[Tuple[RunSpec, Mapping[str, Any]]]]:
    """The runs of ``arm`` on ``seed`` over its whole grid, or ``None`` while any is missing (an
    envelope over part of the grid would be biased)."""
    src = _source_arm(arm)
    a = cfg.arm(src)
    out = []
    for lr, d in a.grid():
        spec = RunSpec(src, seed, lr, d)
        r = runs.get(spec.run_id)
        if r is None:
            return None
        out.append((spec, r))
    return out


def _curves(arm: str, group: Sequence[Tuple[RunSpec, Mapping[str, Any]]]) -> List[Tuple[RunSpec, List[Any]]]:
    blend = arm.startswith("blend:")
    out = []
    for spec, r in group:
        pts = fr.blend_run_points(r) if blend else fr.run_points(r)
        if len(pts) >= 2:
            out.append((spec, pts))
    return out


def _grid_label(spec: RunSpec) -> str:
    return f"lr {spec.lr:g}" + (f", λ {spec.decay:g}" if spec.decay else "")


# ----------------------------------------------------------------------------------------------
# endpoints
def _endpoint_values(cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                     Wt: Optional[np.ndarray], Wc: Optional[np.ndarray]) -> Dict[str, Dict[str, Dict[int, Any]]]:
    """``{arm: {endpoint: {seed: (R,) values}}}`` plus ``_info`` per arm/seed (row 0 only)."""
    bt = (np.asarray([np.mean(base["task_curve_pw"])]) if Wt is None
          else Wt @ np.asarray(base["task_curve_pw"], dtype=np.float64))
    levels = fr.levels_for(bt, cfg.levels)                             # (R, nL)
    grid = fr.range_grid(*cfg.area)
    area_levels = fr.levels_for(bt, grid)                              # (R, nA)
    out: Dict[str, Dict[str, Dict[int, Any]]] = {}
    for arm in _arms_of(cfg):
        vals: Dict[str, Dict[int, Any]] = {e: {} for e in cfg.endpoints()}
        info: Dict[int, Any] = {}
        for s in cfg.seeds:
            group = _seed_runs(cfg, runs, arm, s)
            if group is None:
                continue
            curves = _curves(arm, group)
            if not curves:
                continue
            lv, ar, stp = [], None, []
            for spec, pts in curves:
                T, D, steps = fr.replicate_curve(pts, Wt, Wc)
                lv.append(fr.crossing_levels(T, D, levels))
                a = fr.crossing_levels(T, D, area_levels)
                ar = a if ar is None else np.fmin(ar, a)
                stp.append(fr.crossing_levels(T[:1], np.broadcast_to(steps, T[:1].shape), levels[:1])[0])
            env = fr.envelope(lv)                                        # (R, nL)
            for i, x in enumerate(cfg.levels):
                vals[f"level:{x:g}"][s] = env[:, i]
            vals["area"][s] = fr.mean_over_range(ar, grid)
            idx = fr.envelope_index([v[:1] for v in lv])[0]             # (nL,) which run, row 0
            # an edge of the arm's declared LR grid (a blend's: its source arm's), whether or not every run of
            # the grid gave a curve (a diverged run has no blend)
            lrs = cfg.arm(_source_arm(arm)).lrs
            diverged = {spec.run_id for spec, r in group if r.get("diverged")}
            info[s] = {"envelope_run": [None if i < 0 else curves[i][0].run_id for i in idx],
                       "envelope_point": [None if i < 0 else _grid_label(curves[i][0]) for i in idx],
                       "edge": [None if i < 0 else (len(set(lrs)) > 1 and curves[i][0].lr in (min(lrs), max(lrs)))
                                for i in idx],
                       "diverged": [None if i < 0 else curves[i][0].run_id in diverged for i in idx],
                       "steps": [None if i < 0 else stp[i][j] for j, i in enumerate(idx)],
                       "steps_fastest": [float(np.nanmin([x[j] for x in stp])) if np.isfinite([x[j] for x in stp]).any()
                                         else None for j in range(len(cfg.levels))]}
        out[arm] = {**vals, "_info": info}                               # type: ignore[dict-item]
    return out


MIN_VALID = 0.95
"""A comparison whose bootstrap keeps fewer replicates than this share is not evaluable (no verdict)."""


def _compare(cfg: StudyConfig, values: Mapping[str, Any], B: int) -> Dict[str, Dict[str, Any]]:
    """Every declared comparison at every endpoint: ``{"endpoint|a/b": result}``."""
    res: Dict[str, Dict[str, Any]] = {}
    for e in cfg.endpoints():
        for a, b in cfg.comparisons:
            va, vb = values.get(a, {}).get(e, {}), values.get(b, {}).get(e, {})
            key = f"{e}|{a}/{b}"
            r = st.paired_bootstrap(va, vb, B, st.comparison_rng(cfg.bootstrap_seed, e, f"{a}/{b}"))
            r["seeds_finished"] = sorted(set(va) & set(vb))   # both arms' whole grids finished on these seeds
            r["seeds_declared"] = len(cfg.seeds)
            t = st.paired_t(r["diffs"]) if len(r["diffs"]) >= 2 else None
            r.update(endpoint=e, a=a, b=b, family=e in cfg.family,
                     t_stat=None if t is None else t["t"], t_df=None if t is None else t["df"],
                     t_se=None if t is None else t["se"], t_p=None if t is None else t["p"])
            res[key] = r
    groups: Dict[str, List[str]] = {"family": [k for k, r in res.items() if r["family"]]}
    for e in cfg.endpoints():
        if e not in cfg.family:
            groups[f"secondary:{e}"] = [k for k, r in res.items() if r["endpoint"] == e]
    for g, keys in groups.items():
        m = max(1, len(keys))
        pb = {k: res[k]["p"] for k in keys}
        adj, adj_se = st.holm(pb, m=m), st.holm_mc_se(pb, {k: res[k]["p_mc_se"] for k in keys}, m=m)
        adj_t = st.holm({k: res[k]["t_p"] for k in keys}, m=m)
        z_a, z_h, z_p = st.z_for_alpha(cfg.alpha), st.z_for_alpha(cfg.alpha / m), st.Z80
        for k in keys:
            r = res[k]
            dec_b = st.decide(r["ci95"], adj[k], cfg.alpha)
            dec_t = st.decide(r["t_ci95"], adj_t[k], cfg.alpha)
            verdict = (dec_b if cfg.verdict_on == "bootstrap" else dec_t if cfg.verdict_on == "t"
                       else (dec_b if dec_b == dec_t else 0))
            incomplete = len(r.get("seeds") or ()) < len(cfg.seeds)  # a verdict needs every declared seed
            # a bootstrap that had to drop many replicates (a drawn seed missing the level) is conditioned on
            # reaching it: not evaluable
            unevaluable = r.get("valid") is not None and r["valid"] < MIN_VALID
            if incomplete or unevaluable:
                verdict = 0
            r.update(holm_group=g, holm_m=m, p_holm=adj[k], p_holm_mc_se=adj_se[k], t_p_holm=adj_t[k],
                     mde=st.mde(r["se"], z_a, z_p), mde_holm=st.mde(r["se"], z_h, z_p),
                     t_mde=st.mde_t(r["t_se"], r["t_df"], cfg.alpha), t_mde_holm=st.mde_t(r["t_se"], r["t_df"],
                                                                                          cfg.alpha / m),
                     decision=dec_b, t_decision=dec_t, verdict=verdict, incomplete=incomplete,
                     not_evaluable=unevaluable)
    return res


def analyse(cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
            B: Optional[int] = None) -> Dict[str, Any]:
    """Every number of the report (see the module docstring).

    Args:
        cfg (StudyConfig): the study (resolved).
        runs (mapping): the finished runs, ``{run_id: run}``.
        base (mapping): ``base.json``'s content.
        B (int, optional): bootstrap replicates to start from. Default: ``None``
            (``cfg.bootstrap_start``; raised up to ``cfg.bootstrap_max`` until no verdict can flip by
            Monte-Carlo noise).

    Returns:
        dict: ``arms`` (per arm: per-seed envelope values at each endpoint, the grid point giving the
            envelope, steps), ``comparisons`` (``{"endpoint|a/b": …}``), ``bootstrap`` (the replicates
            used and whether the verdicts are stable), ``point`` (the same endpoints without resampling).
    """
    point = _endpoint_values(cfg, runs, base, None, None)
    nt, nc = len(base["task_curve_pw"]), len(base["control_curve_pw"])

    def evaluate(b: int) -> Dict[str, Any]:
        Wt = st.window_weights(nt, b, _rng(cfg.bootstrap_seed, "windows/task"))
        Wc = st.window_weights(nc, b, _rng(cfg.bootstrap_seed, "windows/control"))
        return _compare(cfg, _endpoint_values(cfg, runs, base, Wt, Wc), b)

    b0 = B or cfg.bootstrap_start
    b_max = max(b0, cfg.bootstrap_max) if cfg.evidence_grade else b0     # a smoke test shows no verdict to protect
    # every comparison carries a verdict (the primary family's and each secondary endpoint's own Holm family), so
    # the replicates are raised until none of them can flip
    comps, boot = st.stable_replicates(evaluate, lambda c: c, B=b0, B_max=b_max, alpha=cfg.alpha)
    arms: Dict[str, Any] = {}
    for arm in _arms_of(cfg):
        pv = point[arm]
        info = pv["_info"]
        d: Dict[str, Any] = {"seeds_complete": sorted(info), "endpoints": {}}
        for e in cfg.endpoints():
            per = {s: float(v[0]) for s, v in pv[e].items()}
            xs = [x for x in per.values() if math.isfinite(x)]
            d["endpoints"][e] = {"per_seed": {str(s): per.get(s) for s in cfg.seeds},
                                 "mean": statistics.mean(xs) if xs else None,
                                 "reached": f"{len(xs)}/{len(cfg.seeds)}",
                                 "t_ci95": list(st.t_interval(xs)) if len(xs) >= 2 else None}
        d["envelope"] = {str(s): i for s, i in info.items()}
        arms[arm] = d
    return {"arms": arms, "comparisons": comps, "bootstrap": boot}


# ----------------------------------------------------------------------------------------------
# text
def _v(x: Any, nd: int = 3, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _p(x: Any) -> str:
    return "—" if x is None else (f"{x:.2g}" if x < 0.01 else f"{x:.3f}")


def _verdict_text(c: Mapping[str, Any], evidence: bool) -> str:
    if not evidence:
        return "— (smoke test)"
    finished, declared = len(c["seeds_finished"]), c["seeds_declared"]
    if finished < declared:
        return f"incomplete: runs of {finished} of the {declared} declared seeds finished; no verdict yet"
    if c.get("mean_diff") is None or c.get("p_holm") is None or c.get("incomplete"):
        n = len(c.get("seeds") or ())
        return f"no verdict: both envelopes reach this endpoint on {n} of the {declared} seeds"
    if c.get("not_evaluable"):
        return (f"not evaluable: the bootstrap kept {100 * c['valid']:.0f} % of its replicates (< "
                f"{100 * MIN_VALID:.0f} %: a drawn seed often misses the level)")
    v = c["verdict"]
    if v == 0:
        extra = ""
        if c["decision"] != c["t_decision"]:
            extra = " (only the " + ("bootstrap" if c["decision"] else "paired t") + " finds one)"
        return "no difference detected" + extra
    return f"**{c['a']} {'forgets more' if v > 0 else 'forgets less'} than {c['b']}**"


def _status(cfg: StudyConfig, runs: Mapping[str, Any]) -> Tuple[int, int, List[str]]:
    todo = plan(cfg, runs)
    total = len(plan(cfg))
    return total - len(todo), total, [s.run_id for s in todo]


def _last_step_rows(cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any]) -> List[str]:
    rows = []
    t0, c0 = base["task_final_loss"], base["control_final_loss"]
    for s in cfg.seeds:
        for a in cfg.arms:
            for lr, d in a.grid():
                r = runs.get(RunSpec(a.name, s, lr, d).run_id)
                if r is None:
                    continue
                f = r["final"]
                rows.append(f"| {a.name} | {s} | {_grid_label(RunSpec(a.name, s, lr, d))} | {r['steps']}"
                            f"{' (diverged)' if r.get('diverged') else ''} | {_v(f['task_final_loss'] - t0)} | "
                            f"{_v(f['control_final_loss'] - c0)} |")
    return rows


def _compute(runs: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """CPU and wall time per arm, and, for each arm whose runs were blended back, the cost of its blends
    against a training run's.

    A blend point (one α) is evaluated on the same curve windows as a run's evaluation point, both
    corpora, without training. The run files time evaluation as a whole, not the blends apart, so a blend
    point's CPU is estimated as the run's evaluation CPU per window × the windows of one point (its task
    and control curve windows); a run's blends (every α) cost that × the number of α, which is the rule the
    v3 pre-registration's amendment declares for question (c) (``blends_cpu_s`` and ``ratio``; one point's
    are ``point_cpu_s`` and ``point_ratio``). The training run they are set against is the whole run on
    the task, its evaluations included: a run that went on to task 2 counts its CPU time less task 2's
    (``task2.timing.cpu_s``).
    """
    by_arm: Dict[str, Dict[str, float]] = {}
    blend: Dict[str, Dict[str, Any]] = {}
    for r in runs.values():
        t = r.get("timing") or {}
        d = by_arm.setdefault(r["arm"], {"runs": 0, "cpu_s": 0.0, "wall_s": 0.0, "steps": 0, "train_cpu_s": 0.0})
        d["runs"] += 1
        d["cpu_s"] += t.get("cpu_s") or 0.0
        d["wall_s"] += t.get("wall_s") or 0.0
        d["steps"] += r.get("steps") or 0
        d["train_cpu_s"] += t.get("train_cpu_s") or 0.0
        points = r.get("blend") or []
        if points and t.get("eval_cpu_s") and t.get("eval_windows"):
            windows = len(points[0].get("task_curve_pw") or []) + len(points[0].get("control_curve_pw") or [])
            b = blend.setdefault(r["arm"], {"runs": 0, "points": 0, "point_cpu_s": 0.0, "run_cpu_s": 0.0,
                                            "windows_per_point": windows})
            b["runs"] += 1
            b["points"] += len(points)
            b["point_cpu_s"] += t["eval_cpu_s"] / t["eval_windows"] * windows
            # the training run on the task: a run's cpu_s includes its task 2, which is not part of it
            t2 = (r.get("task2") or {}).get("timing") or {}
            b["run_cpu_s"] += (t.get("cpu_s") or 0.0) - (t2.get("cpu_s") or 0.0)
    for d in by_arm.values():
        d["cpu_s_per_step"] = d["train_cpu_s"] / d["steps"] if d["steps"] else None
    for b in blend.values():
        b["point_cpu_s"] /= b["runs"]          # the mean estimate of one blend point
        b["points_per_run"] = b["points"] / b["runs"]
        b["blends_cpu_s"] = b["point_cpu_s"] * b["points_per_run"]   # every α of one run: the declared rule
        b["run_cpu_s"] /= b["runs"]            # the mean CPU of one training run of the arm
        b["ratio"] = b["blends_cpu_s"] / b["run_cpu_s"] if b["run_cpu_s"] else None
        b["point_ratio"] = b["point_cpu_s"] / b["run_cpu_s"] if b["run_cpu_s"] else None
    return {"by_arm": by_arm, "cpu_s": sum(d["cpu_s"] for d in by_arm.values()),
            "wall_s": sum(d["wall_s"] for d in by_arm.values()),
            "devices": sorted({(r.get("timing") or {}).get("device", "?") for r in runs.values()}),
            "blend": blend}


# ----------------------------------------------------------------------------------------------
# task 2
TASK2_MEASURES = {
    "dtask1_after_task1": "task-1 loss after task 1 − base (how far task 1 went; negative = learned)",
    "task1_forgetting": "task-1 loss after task 2 − after task 1 (positive = task 1 forgotten)",
    "task1_gain_lost": "task-1 forgetting / task 1's gain (base − after task 1): the share of the gain lost",
    "dcontrol_after_task1": "control loss after task 1 − base",
    "dcontrol_after_task2": "control loss after task 2 − base",
    "dtask2_after_task2": "task-2 loss after task 2 − base",
}
"""The measures of task 2, per run, on the final windows (``summary.json``'s ``task2``)."""


def task2_measures(run: Mapping[str, Any], base: Mapping[str, Any]) -> Optional[Dict[str, Optional[float]]]:
    """:data:`TASK2_MEASURES` of one run (final windows; ``None`` when the run has no task 2)."""
    t2 = run.get("task2")
    if not t2:
        return None
    a1, a2 = run["final"], t2["final"]
    gain = base["task_final_loss"] - a1["task_final_loss"]
    forgetting = a2["task_final_loss"] - a1["task_final_loss"]
    return {"dtask1_after_task1": -gain, "task1_forgetting": forgetting,
            "task1_gain_lost": forgetting / gain if gain > 0 else None,
            "dcontrol_after_task1": a1["control_final_loss"] - base["control_final_loss"],
            "dcontrol_after_task2": a2["control_final_loss"] - base["control_final_loss"],
            "dtask2_after_task2": a2["task2_final_loss"] - base["task2_final_loss"]}


def task2_summary(cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any]) -> Dict[str, Any]:
    """Task 2 per arm and grid point: each measure per seed, its mean over seeds and paired-t 95 %
    interval over seeds (descriptive: the arms' task-1 adaptation differs, so no verdict is drawn)."""
    arms: Dict[str, Any] = {}
    for a in cfg.arms:
        if a.name not in cfg.task2_arms:
            continue
        points: Dict[str, Any] = {}
        for lr, d in a.grid():
            per: Dict[str, Any] = {}
            for s in cfg.seeds:
                r = runs.get(RunSpec(a.name, s, lr, d).run_id)
                if r is not None:
                    per[str(s)] = task2_measures(r, base)
            mean: Dict[str, Any] = {}
            ci: Dict[str, Any] = {}
            for m in TASK2_MEASURES:
                xs = [v[m] for v in per.values() if v is not None and v[m] is not None and math.isfinite(v[m])]
                mean[m] = statistics.mean(xs) if xs else None
                ci[m] = list(st.t_interval(xs)) if len(xs) >= 2 else None
            points[_grid_label(RunSpec(a.name, 0, lr, d))] = {"lr": lr, "decay": d, "per_seed": per, "mean": mean,
                                                               "t_ci95": ci}
        arms[a.name] = points
    return {"steps": cfg.task2_steps, "eval_at": list(cfg.task2_eval_at), "measures": dict(TASK2_MEASURES),
            "arms": arms}


def _task2_lines(cfg: StudyConfig, T: Mapping[str, Any], desc: str) -> List[str]:
    heads = ("Δtask 1 after task 1", "task-1 forgetting", "share of task-1 gain lost", "Δcontrol after task 1",
             "Δcontrol after task 2", "Δtask 2")
    lines = [f"## Task 2 in sequence: {cfg.task2_steps} more steps on {desc}", "",
             "After its last step on the task, each run of " + ", ".join(cfg.task2_arms) + " goes on training the "
             "same tensors (adapter, parameters) on task 2, AdamW's moments reset, at the same grid point. On the "
             "final windows: how far task 1 went (task-1 loss after task 1 − base), how much of it task 2 took "
             "back (task-1 forgetting = after task 2 − after task 1, and its share of task 1's gain), the control "
             "after each task, and task 2's own loss change. Mean over seeds [per seed]; descriptive: arms that "
             "went unequally far on task 1 are not compared here (`—` = no task 2: the run is missing or "
             "diverged on task 1).", "",
             "| arm | grid point | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for arm, points in T["arms"].items():
        for label, p in points.items():
            cells = []
            for m in TASK2_MEASURES:
                def fmt(x: Optional[float], pct: bool = m == "task1_gain_lost") -> str:
                    return "—" if x is None else f"{100 * x:+.0f} %" if pct else f"{x:+.3f}"

                per = ", ".join(fmt(None if v is None else v[m]) for v in p["per_seed"].values())
                cells.append(fmt(p["mean"][m]) + (f" [{per}]" if per else ""))
            lines.append(f"| {arm} | {label} | " + " | ".join(cells) + " |")
    return lines + ["", "Paired-t 95 % intervals over seeds of every measure are in `summary.json` (`task2`)."]


def summary(cfg: StudyConfig, A: Mapping[str, Any], base: Mapping[str, Any], runs: Mapping[str, Any],
            manifest: Mapping[str, Any], sel: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The content of ``summary.json`` (strict JSON: non-finite values are ``null``); with a second
    task, its measures under ``task2`` (:func:`task2_summary`).

    Args:
        cfg (StudyConfig): the study (resolved).
        A (mapping): :func:`analyse`'s result (``arms``, ``comparisons``, ``bootstrap``).
        base (mapping): ``base.json``'s content; its per-window losses (``*_pw``) and ``eval_wall_s``
            are left out.
        runs (mapping): the finished runs, ``{run_id: run}`` (their count, the missing ones, the compute
            they took).
        manifest (mapping): ``study.json``'s content: its ``fingerprints``, and the analysis fingerprint
            the study was started with (``analysis_amended`` when it is not ``cfg``'s).
        sel (mapping or None): ``selections.json``'s content (its ``reference_params``), ``None`` when
            the folder has none.

    Returns:
        dict: ``format``, ``version``, ``status`` (evidence or smoke test), ``study``, ``fingerprints``,
            ``analysis_amended``, ``base``, ``arms``, ``comparisons``, ``bootstrap``,
            ``reference_params``, ``runs`` (finished, planned, missing), ``compute`` and, with a second
            task, ``task2``.
    """
    done, total, missing = _status(cfg, runs)
    extra = {"task2": task2_summary(cfg, runs, base)} if cfg.task2 else {}
    return finite({
        "format": "kappatune-study-summary", "version": 1,
        "status": "evidence" if cfg.evidence_grade else "smoke test, not evidence",
        "study": cfg.to_dict(), "fingerprints": dict(manifest.get("fingerprints") or {}),
        "analysis_amended": manifest.get("analysis_fingerprint") not in (None, cfg.analysis_fingerprint()),
        "base": {k: v for k, v in base.items() if not k.endswith("_pw") and k != "eval_wall_s"},
        "arms": A["arms"], "comparisons": A["comparisons"], "bootstrap": A["bootstrap"],
        "reference_params": None if sel is None else sel.get("reference_params"),
        "runs": {"finished": done, "planned": total, "missing": missing},
        "compute": _compute(runs), **extra})


def _preregistration_line(where: str, out: Path) -> str:
    """The report's pointer to its pre-registration: a link that works from ``results.md`` (inside
    ``out``), whether ``where`` was given relative to the working directory or to the results folder."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", where, re.I):
        return f"Pre-registration: <{where}>."
    for cand in (Path(where), out / where):
        if cand.is_file():
            try:
                rel = Path(os.path.relpath(cand.resolve(), out.resolve())).as_posix()
            except ValueError:          # another drive (Windows): no relative path exists
                rel = cand.resolve().as_uri()
            return f"Pre-registration: [{rel}]({rel})."
    return f"Pre-registration: `{where}` (not found from the results folder)."


def write_report(folder: ResultsFolder, cfg: StudyConfig, manifest: Mapping[str, Any], command: str = "",
                 plots: bool = True, B: Optional[int] = None,
                 on_problem: Callable[[str], None] = lambda s: None) -> str:
    """Write ``results.md``, ``summary.json`` and the plots of the folder's finished runs; returns the
    text of ``results.md``.

    Args:
        folder (ResultsFolder): the results folder.
        cfg (StudyConfig): the study (the folder's own study file).
        manifest (mapping): ``study.json``'s content (fingerprints).
        command (str, optional): the command that made the folder, quoted. Default: ``""``.
        plots (bool, optional): draw the plots (matplotlib). Default: ``True``.
        B (int, optional): bootstrap replicates to start from. Default: ``None`` (the study's).
        on_problem (callable, optional): receives one line per unusable run file. Default: nothing.
    """
    fps = manifest.get("fingerprints") or {}
    runs, bad = folder.load_runs({"settings": cfg.settings_fingerprint(), "model": fps.get("model"),
                                  "data": fps.get("windows")}, report=on_problem,
                                 task2_arms=cfg.task2_arms if cfg.task2 else ())
    smoke = not cfg.evidence_grade
    lines: List[str] = []
    if smoke:
        lines += [f"> {SMOKE_STAMP}: {'the --quick preset' if cfg.preset == 'quick' else 'an ad-hoc design'} "
                  f"({len(cfg.seeds)} seed(s), {cfg.steps} steps; evidence needs at least 3 seeds and 100 steps). "
                  "It shows that the pipeline runs on this model; read no conclusion from its numbers.", ""]
    lines += [f"# {cfg.title}", ""]
    if command:
        lines += [f"Made with: `{command}`", ""]
    if cfg.preregistration and not smoke:
        lines += [_preregistration_line(cfg.preregistration, folder.path), ""]
    lines += [f"The rules of this report were declared in `study.json` before the first run (settings fingerprint "
              f"`{cfg.settings_fingerprint()}`, analysis fingerprint `{cfg.analysis_fingerprint()}`)."]
    if manifest.get("analysis_fingerprint") not in (None, cfg.analysis_fingerprint()):
        lines += [f"The analysis rules were amended after the study file was written (fingerprint "
                  f"`{manifest['analysis_fingerprint']}` then)."]
    lines += [""]
    base_p = folder.path / "base.json"
    if not base_p.exists():
        text = "\n".join(lines + ["Nothing has run yet."]) + "\n"
        atomic_write_bytes(folder.path / "results.md", text.encode("utf-8"))
        return text
    from .folder import read_json

    base = read_json(base_p)
    sel_p = folder.path / "selections.json"
    sel = read_json(sel_p) if sel_p.exists() else None
    A = analyse(cfg, runs, base, B)
    done, total, missing = _status(cfg, runs)
    study = manifest.get("study") or {}
    corp = study.get("corpora") or {}
    lines += ["## Setup", "",
              f"- Model: {manifest.get('model_description') or cfg.model} (weights fingerprint `{fps.get('model')}`).",
              f"- Task: {(corp.get('task') or {}).get('description', '?')}; control (never trained on): "
              f"{(corp.get('control') or {}).get('description', '?')} (token windows fingerprint "
              f"`{fps.get('windows')}`).",
              f"- {cfg.steps} steps of {cfg.batch} × {cfg.seq_len} tokens, AdamW (weight decay {cfg.weight_decay:g}, "
              f"{cfg.schedule} LR, grad-norm clip {cfg.grad_clip:g}), {cfg.precision}; seeds {list(cfg.seeds)}; every "
              "grid point of every arm on every seed.",
              f"- Evaluation at steps {list(cfg.eval_at)} on {cfg.curve_windows} + {cfg.curve_windows} held-out "
              f"curve windows; {cfg.final_windows} + {cfg.final_windows} other held-out windows after the last step; "
              "per-window losses kept.",
              f"- Base model: task loss {base['task_curve_loss']:.4f} (curve windows), control "
              f"{base['control_curve_loss']:.4f}. Levels: base − {', '.join(f'{x:g}' for x in cfg.levels)} nats; "
              f"area over base − {cfg.area[0]:g} … {cfg.area[1]:g}.", ""]
    if sel is not None:
        ref = sel["reference_params"]
        lines += [f"Budget {sel['budget']}: κ-low trains {ref:,} parameters "
                  f"({ref / max(1, sel['table_params']):.2%} of the {sel['table_params']:,} in the κ table).", "",
                  "| arm | kind | grid (lr × λ) | trainable (vs κ-low) | rule (seed " + str(cfg.seeds[0]) + ") |",
                  "|---|---|---|---|---|"]
        for a in cfg.arms:
            d = (sel["arms"].get(str(cfg.seeds[0])) or {}).get(a.name)
            if a.kind == "lora" and sel.get("lora"):
                n, rule = sel["lora"]["params"], f"LoRA r={sel['lora']['r']} on {', '.join(sel['lora']['targets'])}"
            elif d is not None:
                n, rule = d["params"], d["rule"]
            else:
                n, rule = None, "—"
            grid = ", ".join(f"{x:g}" for x in a.lrs) + ("" if a.decays == (0.0,) else
                                                         " × λ " + ", ".join(f"{x:g}" for x in a.decays))
            tp = "—" if n is None else f"{n:,} ({n / ref - 1:+.1%})" if n <= 2 * ref else f"{n:,} ({n / ref:.0f}×)"
            lines.append(f"| {a.name} | {a.kind} | {grid} | {tp} | {rule} |")
        if cfg.blend_arms:
            lines += ["", f"Blended arms (no training; each finished run of the arm at W₀ + α(W₁ − W₀), α ∈ "
                          f"{', '.join(f'{x:g}' for x in cfg.alphas)}, with kappatune.apply_delta): "
                          + ", ".join(f"blend:{b}" for b in cfg.blend_arms) + "."]
        lines.append("")
    lines += ["## Δcontrol on each arm's envelope (nats; lower = less forgetting)", "",
              "Each seed's value is the lowest Δcontrol among the arm's grid points at the level (the lower envelope "
              "over learning rates); `n/r` = no grid point reached the level; `…` = the seed's runs of the arm have "
              "not all finished. Mean over seeds with the t 95 % interval over the arm's seeds (one arm, not a "
              "difference). The list below the table names the grid point behind each value and marks `(edge)` "
              "where it is the lowest or highest LR of the arm's grid.", "",
              "| arm | " + " | ".join(f"base − {x:g}" for x in cfg.levels) + f" | mean over {cfg.area[0]:g}…"
              f"{cfg.area[1]:g} |", "|---" * (len(cfg.levels) + 2) + "|"]
    for arm, d in A["arms"].items():
        cells = []
        for e in cfg.endpoints():
            m = d["endpoints"][e]
            per = ", ".join("…" if v is None else "n/r" if not math.isfinite(v) else f"{v:+.3f}"
                            for v in m["per_seed"].values())
            ci = m["t_ci95"]
            cells.append(f"{_v(m['mean'])} [{per}]" + ("" if ci is None else f" (t-CI {_v(ci[0])}, {_v(ci[1])})"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Grid point giving each seed's envelope, and the steps it needed (per level; for a blend, the α "
                  "at which the blend reaches the level):", ""]
    for arm, d in A["arms"].items():
        unit = "α" if arm.startswith("blend:") else "step"
        nd = 2 if arm.startswith("blend:") else 1
        for s, inf in d["envelope"].items():
            marks = [", ".join(m for m, on in (("edge", e), ("diverged later", dv)) if on)
                     for e, dv in zip(inf["edge"], inf["diverged"])]
            pts = "; ".join(f"base − {x:g}: " + ("n/r" if p is None else f"{p}{f' ({m})' if m else ''}, {unit} "
                                                 f"{_v(st_, nd, False)}")
                            for x, p, m, st_ in zip(cfg.levels, inf["envelope_point"], marks, inf["steps"]))
            lines.append(f"- {arm}, seed {s}: {pts}")
    lines += ["", "## Comparisons (paired over seeds; a − b, nats)", "",
              f"Bootstrap over seeds and windows ({A['bootstrap']['B']:,} replicates"
              + ("" if A["bootstrap"]["stable"] or smoke else f"; still at risk of a Monte-Carlo flip at the maximum: "
                 f"{', '.join(A['bootstrap']['at_risk'])}") + ") and paired t over seeds, side by side; Holm over "
              f"the family ({', '.join(cfg.family)} × {len(cfg.comparisons)} comparisons) for each test"
              + ("" if len(cfg.endpoints()) == len(cfg.family) else
                 f", and each secondary endpoint as its own family of {len(cfg.comparisons)}")
              + ("" if smoke else f"; replicates raised from {A['bootstrap']['B_start']:,} until no Holm p, primary or "
                 "secondary, lay within 3 Monte-Carlo SEs of α") + ". MDE at α "
              f"{cfg.alpha:g} and at Holm's first level, 80 % power. Verdicts rest on "
              + {"both": "both tests (a difference only where both find it)", "bootstrap": "the bootstrap",
                 "t": "the paired t"}[cfg.verdict_on] + f". With {len(cfg.seeds)} seeds the bootstrap over seeds has "
              f"{math.comb(2 * len(cfg.seeds) - 1, len(cfg.seeds))} distinct seed draws and its p sits at its floor "
              f"whenever all seed differences share a sign; the paired t has {len(cfg.seeds) - 1} degree(s) of "
              "freedom.", "",
              "| endpoint | a − b | diff | bootstrap 95 % CI | p (± MC) | Holm p (± MC) | paired-t 95 % CI | t p | "
              "t Holm p | "
              "MDE boot / Holm | MDE t / Holm | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in A["comparisons"].items():
        ci, tci = c.get("ci95"), c.get("t_ci95")
        fam = "" if c["family"] else " (secondary)"
        mc = "" if c.get("p_mc_se") is None else f" ± {c['p_mc_se']:.1g}"
        hmc = "" if c.get("p_holm_mc_se") is None else f" ± {c['p_holm_mc_se']:.1g}"
        ci_s = "—" if ci is None else f"[{_v(ci[0], 4)}, {_v(ci[1], 4)}]"
        tci_s = "—" if tci is None else f"[{_v(tci[0], 4)}, {_v(tci[1], 4)}]"
        lines.append(
            f"| {c['endpoint']}{fam} | {c['a']} − {c['b']} | {_v(c.get('mean_diff'), 4)} | {ci_s} | "
            f"{_p(c.get('p'))}{mc} | "
            f"{_p(c.get('p_holm'))}{hmc} | {tci_s} | "
            f"{_p(c.get('t_p'))} | {_p(c.get('t_p_holm'))} | {_v(c.get('mde'), 3, False)} / "
            f"{_v(c.get('mde_holm'), 3, False)} | {_v(c.get('t_mde'), 3, False)} / "
            f"{_v(c.get('t_mde_holm'), 3, False)} | "
            f"{_verdict_text(c, not smoke)} |")
    lines += ["", f"`area` is the mean envelope over base − {cfg.area[0]:g} … {cfg.area[1]:g}: its difference times "
                  f"{cfg.area[1] - cfg.area[0]:g} is the area between the two envelopes (nats²).", ""]
    lines += ["## Last step of every run (final windows; descriptive)", "",
              "| arm | seed | grid point | steps | Δtask | Δcontrol |", "|---|---|---|---|---|---|"]
    lines += _last_step_rows(cfg, runs, base)
    if cfg.task2:
        lines += [""] + _task2_lines(cfg, task2_summary(cfg, runs, base),
                                     (corp.get("task2") or {}).get("description") or "the second task")
    C = _compute(runs)
    lines += ["", "## Compute", "",
              f"{done} runs: {C['cpu_s'] / 3600:.2f} CPU-hours, {C['wall_s'] / 3600:.2f} h wall summed over runs "
              f"(devices: {', '.join(C['devices']) or '—'}).", "",
              "| arm | runs | CPU h | CPU s / training step |", "|---|---|---|---|"]
    for arm, d in C["by_arm"].items():
        lines.append(f"| {arm} | {d['runs']} | {d['cpu_s'] / 3600:.3f} | {_v(d['cpu_s_per_step'], 2, False)} |")
    lines.append("")
    if C["blend"]:
        lines += ["What blending a finished run back costs against a training run of its arm (descriptive). The run "
                  "files time evaluation as a whole, so one blend point (one α) is estimated as the run's evaluation "
                  "CPU per window × its windows; a run's blends are every α of it; the training run counts its "
                  "evaluations too:", "",
                  "| arm blended | runs | windows per point | CPU s per blend point | α per run | CPU s for a run's "
                  "blends | CPU s per training run | blends / run | one point / run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm, b in C["blend"].items():
            lines.append(f"| {arm} | {b['runs']} | {b['windows_per_point']} | {b['point_cpu_s']:.1f} | "
                         f"{b['points_per_run']:g} | {b['blends_cpu_s']:.1f} | {b['run_cpu_s']:.1f} | "
                         f"{_v(b['ratio'], 3, False)} | {_v(b['point_ratio'], 3, False)} |")
        lines.append("")
    if missing:
        lines += [f"## Not finished: {done} of {total} runs", "",
                  "Resume with the same command (finished runs are kept). Missing: "
                  + ", ".join(missing[:30]) + (" …" if len(missing) > 30 else ""), ""]
    else:
        lines += [f"All {total} planned runs finished.", ""]
    if bad:
        lines += ["Unusable run files (not used; redone on the next start): "
                  + "; ".join(f"{k}: {v}" for k, v in bad.items()), ""]
    if plots:
        made = write_plots(folder.path, cfg, runs, base, A)
        if made:
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in made] + [""]
    text = "\n".join(lines)
    atomic_write_json(folder.path / "summary.json", summary(cfg, A, base, runs, manifest, sel), strict=True)
    atomic_write_bytes(folder.path / "results.md", text.encode("utf-8"))
    return text


# ----------------------------------------------------------------------------------------------
# plots
def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _curve_on(deltas: np.ndarray, pts: Sequence[Mapping[str, Any]], bt: float) -> Tuple[np.ndarray, np.ndarray]:
    T, D, steps = fr.replicate_curve(pts)
    lv = fr.levels_for(np.asarray([bt]), deltas)
    return fr.crossing_levels(T, D, lv)[0], fr.crossing_levels(T, np.broadcast_to(steps, T.shape), lv)[0]


def write_plots(out: Path, cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any],
                A: Mapping[str, Any]) -> List[Path]:
    """Draw the plots of a study: ``frontier.png`` (per arm: every run's curve, each seed's envelope,
    the mean envelope over seeds where every seed reaches the level, with the band of the seeds'
    range) and ``levels.png`` (Δcontrol on the envelope at each level, t-intervals over seeds; in its
    second panel, the steps the envelope's run needs to reach each level); with a second task,
    ``task2.png`` (the task-1, control and task-2 losses of every run through both tasks). matplotlib
    is imported here.

    Args:
        out (Path): the folder the files are written to (atomically; an existing plot is replaced).
        cfg (StudyConfig): the study (resolved): its arms, seeds, levels and title.
        runs (mapping): the finished runs, ``{run_id: run}``.
        base (mapping): ``base.json``'s content (the base model's task loss, which the drops are
            measured from).
        A (mapping): :func:`analyse`'s result (Δcontrol and steps at each level, per arm).

    Returns:
        list of Path: the files written, in the order above.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    arms = _arms_of(cfg)
    bt = float(np.mean(base["task_curve_pw"]))
    reach = [bt - min(p["task_curve_loss"] for p in fr.run_points(r)) for r in runs.values()] or [max(cfg.levels)]
    deltas = np.linspace(0.0, max(max(reach), max(cfg.levels)), 80)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    made: List[Path] = []
    n = len(arms) + 1
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    flat = axes.ravel()
    overlay = flat[0]
    for i, arm in enumerate(arms):
        ax = flat[i + 1]
        col = colors[i % len(colors)]
        envs = []
        for s in cfg.seeds:
            group = _seed_runs(cfg, runs, arm, s)
            if group is None:
                continue
            ys = []
            for j, (spec, pts) in enumerate(_curves(arm, group)):
                T, D, _ = fr.replicate_curve(pts)
                ax.plot(bt - T[0], D[0], "-o", ms=2, lw=0.8, alpha=0.45, color=colors[j % len(colors)],
                        label=_grid_label(spec) if s == cfg.seeds[0] else None)
                ys.append(_curve_on(deltas, pts, bt)[0])
            if ys:
                env = fr.envelope([y[None, :] for y in ys])[0]
                envs.append(env)
                ax.plot(deltas, env, "-", color="k", lw=1.0, alpha=0.6)
        if envs:
            E = np.vstack(envs)
            with warnings.catch_warnings():                # levels no seed reaches: nan, not drawn
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanmin(E, 0), np.nanmax(E, 0)
                # the mean only where every seed's envelope reaches the level: a mean over whichever seeds
                # remain would jump where one stops; the band still shows the levels some seeds reach
                mean = np.where(np.isnan(E).any(0), np.nan, np.nanmean(E, 0))
            for a_ in (ax, overlay):
                a_.plot(deltas, mean, "-", color=col if a_ is overlay else "k", lw=2.0,
                        label=f"{arm} envelope" if a_ is overlay else "mean envelope")
                if len(envs) > 1:
                    a_.fill_between(deltas, lo, hi, color=col, alpha=0.15, lw=0)
        ax.set_title(arm, fontsize=9)
    for ax in flat[:n]:
        for x in cfg.levels:
            ax.axvline(x, color="grey", ls=":", lw=0.7)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("task-loss drop below base (nats; more adapted →)", fontsize=8)
        ax.set_ylabel("Δcontrol (nats; up = forgetting)", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.set_visible(False)
    overlay.set_title("learning–forgetting frontiers: every arm's mean envelope\nover seeds (where all reach), "
                      "band = seed range", fontsize=9)
    fig.suptitle(cfg.title, fontsize=10)
    fig.tight_layout()
    p = out / "frontier.png"
    _save(fig, p)
    plt.close(fig)
    made.append(p)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        d = A["arms"][arm]
        xs = np.arange(len(cfg.levels)) + (i - (len(arms) - 1) / 2) * width
        means, lo, hi = [], [], []
        for x in cfg.levels:
            m = d["endpoints"][f"level:{x:g}"]
            means.append(np.nan if m["mean"] is None else m["mean"])
            ci = m["t_ci95"]
            lo.append(0 if ci is None or m["mean"] is None else m["mean"] - ci[0])
            hi.append(0 if ci is None or m["mean"] is None else ci[1] - m["mean"])
        ax1.errorbar(xs, means, yerr=[lo, hi], fmt="o", color=colors[i % len(colors)], label=arm, capsize=3)
        if arm.startswith("blend:"):                   # a blend needs no steps (its "step" is α)
            continue
        stp = []
        for j in range(len(cfg.levels)):
            vals = [inf["steps"][j] for inf in d["envelope"].values() if inf["steps"][j] is not None]
            stp.append(vals)
        ax2.errorbar(xs, [np.mean(v) if v else np.nan for v in stp],
                     yerr=[[np.mean(v) - min(v) if v else 0 for v in stp],
                           [max(v) - np.mean(v) if v else 0 for v in stp]],
                     fmt="s", color=colors[i % len(colors)], label=arm, capsize=3)
    for ax, yl in ((ax1, "Δcontrol on the envelope (nats)"), (ax2, "steps to the level (envelope's run)")):
        ax.set_xticks(range(len(cfg.levels)))
        ax.set_xticklabels([f"base − {x:g}" for x in cfg.levels])
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_title("Δcontrol at each level: mean over seeds, t 95 % interval over seeds", fontsize=9)
    ax2.set_title("steps to each level: mean, range over seeds", fontsize=9)
    fig.tight_layout()
    p = out / "levels.png"
    _save(fig, p)
    plt.close(fig)
    made.append(p)
    if cfg.task2 and any(r.get("task2") for r in runs.values()):
        made.append(_plot_task2(out, cfg, runs, base, plt, colors))
    return made


def _plot_task2(out: Path, cfg: StudyConfig, runs: Mapping[str, Mapping[str, Any]], base: Mapping[str, Any], plt: Any,
                colors: Sequence[str]) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = (("task_curve_loss", "task 1"), ("control_curve_loss", "control"), ("task2_curve_loss", "task 2"))
    for i, a in enumerate(x for x in cfg.arms if x.name in cfg.task2_arms):
        first = True
        for s in cfg.seeds:
            for lr, d in a.grid():
                r = runs.get(RunSpec(a.name, s, lr, d).run_id)
                if r is None or not r.get("task2"):
                    continue
                for ax, (k, _) in zip(axes, keys):
                    b0 = base[k]
                    pts = [(p["step"], p[k]) for p in r["curve"] if k in p]
                    pts += [(cfg.steps + p["step"], p[k]) for p in r["task2"]["curve"]]
                    ax.plot([x for x, _ in pts], [y - b0 for _, y in pts], "-", lw=0.8, alpha=0.7,
                            color=colors[i % len(colors)], label=a.name if first else None)
                first = False
    for ax, (_, name) in zip(axes, keys):
        ax.axvline(cfg.steps, color="k", ls=":", lw=0.8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel(f"step (task 1, then task 2 from step {cfg.steps})", fontsize=8)
        ax.set_ylabel(f"{name} loss − base (nats, curve windows)", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{cfg.title}: task 1 then task 2 (one line per run)", fontsize=10)
    fig.tight_layout()
    p = out / "task2.png"
    _save(fig, p)
    plt.close(fig)
    return p

